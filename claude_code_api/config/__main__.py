"""``python -m claude_code_api.config README.md``: see :func:`.settings.main`."""

import sys

from .settings import main

sys.exit(main(sys.argv[1:]))
