"""Test-wide fixtures."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests import raw_http

# Scripts with `#!/usr/bin/env python3` (the fake CLI) find the test interpreter first, not
# a version manager's shim: pyenv's costs ~0.3 s a start, and the fake starts for every agent.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])


def pytest_configure(config: pytest.Config) -> None:
    """As root, tests' directories live where the agents' OS user may be let in.

    A root service's agents run as AGENT_UID, and the harness opens each test's
    directory to them (``harness.open_to_agents``). pytest's own base for root,
    ``/tmp/pytest-of-root``, is set back to mode 0700 by every pytest that starts on
    the machine: this run's base is its own instead (one per checkout, cleared at start).
    """
    if os.geteuid() != 0 or config.option.basetemp or hasattr(config, "workerinput"):
        return
    checkout = hashlib.sha256(str(config.rootpath).encode()).hexdigest()[:8]
    config.option.basetemp = str(Path(tempfile.gettempdir(), f"pytest-root-{checkout}"))


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
