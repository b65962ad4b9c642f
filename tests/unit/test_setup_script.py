"""``scripts/setup``: pip runs only when the virtualenv lacks this ``pyproject.toml``'s install.

README (Quick start): ``scripts/serve`` sets up ``.venv`` "on first run ... and again only when
``pyproject.toml`` changes, so later runs work offline". ``scripts/test`` installs the package
with its test extras into the same ``.venv``: that install holds everything ``scripts/serve``
needs, so a ``scripts/serve`` after ``scripts/test`` must not run pip again (offline it would
fail: the editable build fetches its build tools from the index).

The virtualenv here is a stand-in whose ``python`` only records how it was called.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup"
BUDGET_S = 15


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A virtualenv whose python writes its arguments to a log and succeeds."""
    venv, calls = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >>"{calls}"\n')
    python.chmod(0o755)
    return venv, calls


async def setup(venv: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(BUDGET_S):
        return await trio.run_process(
            [str(SETUP), *args],
            env={**os.environ, "VENV": str(venv)},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def pip_installs(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line for line in lines if "pip install" in line]


async def test_serve_after_test_runs_no_pip_and_test_after_serve_does(tmp_path):
    venv, calls = fake_venv(tmp_path)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".installed-test").write_text(f"{digest} .[test]\n")

    serve = await setup(venv)  # what scripts/serve runs: no extras

    assert serve.returncode == 0, serve.stderr
    assert pip_installs(calls) == []

    (venv / ".installed-test").unlink()
    (venv / ".installed").write_text(f"{digest} .\n")
    test = await setup(venv, "test")  # the package alone lacks the test tools

    assert test.returncode == 0, test.stderr
    assert len(pip_installs(calls)) == 1 and ".[test]" in pip_installs(calls)[0]
