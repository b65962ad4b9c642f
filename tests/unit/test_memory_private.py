"""keep_memory_private: a process of the service's own OS user cannot read its environment.

Agents without the sandbox may run as the service's user; the service holds the model
API's key in its environment. Played here by a child of another uid (nobody) and its own
child, both as that uid. The service's own long-lived child, the agents' watchdog, is
dumpable again once it execs: it must hold none of that environment.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess

import pytest
import trio

from claude_code_api.actors.reaper import ReaperMessage, serve_reaper
from claude_code_api.proxy.model import keep_memory_private

SETPRIV = shutil.which("setpriv")
# A Python any uid may run (this one's venv may be under /root); the function's own text.
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"
FUNCTION = inspect.getsource(keep_memory_private)
needs_root = pytest.mark.skipif(
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


@needs_root
def test_a_process_of_the_same_user_cannot_read_a_private_services_environ():
    assert run_as_nobody("plain") == "True"  # (what it guards against)
    assert "PermissionError" in run_as_nobody("private")


def watchdog_environ() -> bytes:
    """The environment of this process's watchdog child (``agent/reaper_process.py``)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rpartition(b")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                watchdog = b"reaper_process" in cmdline.read()
            if parent == os.getpid() and watchdog:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    return environ.read()
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError("no watchdog running")


async def test_the_agents_watchdog_holds_none_of_the_services_environment(monkeypatch):
    """Any process of its uid reads a dumpable child's /proc/<pid>/environ: the key too."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-the-real-key")
    send, receive = trio.open_memory_channel[ReaperMessage](0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_reaper, receive)
            environ = watchdog_environ()
            await send.aclose()
    assert b"sk-ant-the-real-key" not in environ
