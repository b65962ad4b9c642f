"""``python -m claude_code_api.observe.healthcheck``: the container's HEALTHCHECK, without curl.

Asks this machine's service for ``GET /health`` on ``$PORT`` (default 8080) and
exits 0 when it answers 200 (``starting`` or ``ok``), 1 otherwise: 503
(``degraded``, ``stopping``), no answer within the timeout, or nothing
listening. Standard library only, and it imports nothing else of the package,
so a check costs one short-lived Python process.

Error handling: every failure is one line on standard error and exit status 1,
which is what Docker and Podman count as unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def main() -> None:
    port = os.environ.get("PORT", "").strip() or "8080"
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        sys.exit(1)
    if status != 200:
        print(f"healthcheck: {url} answered {status}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
