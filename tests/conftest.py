"""Test-wide fixtures."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest

from tests import raw_http

# Scripts with `#!/usr/bin/env python3` (the fake CLI) find the test interpreter first, not
# a version manager's shim: pyenv's costs ~0.3 s a start, and the fake starts for every agent.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])


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
