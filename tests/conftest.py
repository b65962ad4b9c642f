"""Test-wide fixtures."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import raw_http

# Scripts with `#!/usr/bin/env python3` (the fake CLI) find the test interpreter first, not
# a version manager's shim: pyenv's costs ~0.3 s a start, and the fake starts for every agent.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])


def pytest_configure(config: pytest.Config) -> None:
    """As root, tests' directories live where the agents' OS user may be let in.

    A root service's agents run as AGENT_UID, and the harness opens each test's
    directory to them (``harness.open_to_agents``). pytest's own base for root,
    ``/tmp/pytest-of-root``, is set back to mode 0700 by every pytest that starts on
    the machine: this run's base is its own instead, ``/tmp/pytest-root-<pid>``. Those
    of finished runs are removed, but the last two (to look into).
    """
    if os.geteuid() != 0 or config.option.basetemp or hasattr(config, "workerinput"):
        return
    root = Path(tempfile.gettempdir())
    finished = [
        path
        for path in root.glob("pytest-root-*")
        if not Path("/proc", path.name.rpartition("-")[2]).exists()
    ]
    for path in sorted(finished, key=lambda path: path.stat().st_mtime)[:-2]:
        shutil.rmtree(path, ignore_errors=True)
    config.option.basetemp = str(root / f"pytest-root-{os.getpid()}")


@pytest.fixture
async def close_raw_connections():
    """Close the raw HTTP connections a test left open (no unclosed-socket warnings)."""
    yield
    await raw_http.close_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every trio test gets it (a trio fixture can only serve trio tests).
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and inspect.iscoroutinefunction(function):
            item.fixturenames.append("close_raw_connections")  # type: ignore[attr-defined]
