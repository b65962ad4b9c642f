"""keep_memory_private: a process of the service's own OS user cannot read its environment.

Agents without the sandbox may run as the service's user; the service holds the model
API's key in its environment. Played here by a child of another uid (nobody) and its own
child, both as that uid.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess

import pytest

from claude_code_api.proxy.model import keep_memory_private

SETPRIV = shutil.which("setpriv")
# A Python any uid may run (this one's venv may be under /root); the function's own text.
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"
FUNCTION = inspect.getsource(keep_memory_private)
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv (to become another uid)"
)

# The "service": makes itself non-dumpable (or not), then starts an "agent" of its own uid
# that reads the service's /proc/<pid>/environ.
SERVICE = """
import os, subprocess, sys
exec(sys.argv[2])
if sys.argv[1] == "private":
    assert keep_memory_private()
agent = "import os; print(b'THE-KEY' in open(f'/proc/{os.getppid()}/environ', 'rb').read())"
done = subprocess.run([sys.executable, "-c", agent], capture_output=True, text=True)
print(done.stdout.strip() or done.stderr.strip().splitlines()[-1])
"""


def run_as_nobody(mode: str) -> str:
    assert SETPRIV is not None
    done = subprocess.run(
        [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"]
        + [PYTHON, "-c", SERVICE, mode, FUNCTION],
        env={"PATH": "/usr/bin:/bin", "SECRET": "THE-KEY"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or done.stderr


def test_a_process_of_the_same_user_cannot_read_a_private_services_environ():
    assert run_as_nobody("plain") == "True"  # (what it guards against)
    assert "PermissionError" in run_as_nobody("private")
