"""How agents are launched, wherever the service is installed and whoever runs it.

The real bundled CLI against the mock Messages API, through the real service. A
service running as root (containers, fresh VMs) runs its agents as ``AGENT_UID``:
they answer without ``IS_SANDBOX`` (the CLI refuses bypassPermissions to root), are
not root, cannot read a root-only file, and own what they write. With the sandbox
and without. And a CLI installed under ``/tmp`` (which the sandbox replaces) still
runs sandboxed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from claude_code_api.actors.registry import user_workspace
from claude_code_api.config import Settings
from tests.real_cli import BUNDLED_CLI, requires_real_cli
from tests.test_e2e_real_cli_escape import (
    BUDGET_S,
    SANDBOX_REASON,
    agents_service,
    bash_as_alice,
    needs_sandbox,
)

pytestmark = requires_real_cli
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="about a service running as root")
SECRET = "words-only-root-may-read"
SANDBOX_PARAMETERS = [
    pytest.param("auto", id="sandbox", marks=needs_sandbox),
    pytest.param("off", id="no-sandbox"),
]


@pytest.fixture
def root_only_file() -> Iterator[Path]:
    """A file mode 0600, root's, in a directory everyone may pass, outside /tmp."""
    directory = Path(tempfile.mkdtemp(prefix="root-only-", dir="/var/tmp"))
    try:
        directory.chmod(0o755)
        path = directory / "secret"
        path.write_text(SECRET)
        path.chmod(0o600)
        yield path
    finally:
        shutil.rmtree(directory)


@needs_root
@pytest.mark.parametrize("sandbox", SANDBOX_PARAMETERS)
async def test_a_root_services_agents_run_as_a_user_of_their_own(tmp_path, root_only_file, sandbox):
    command = (
        f"echo uid=$(id -u); cat {root_only_file}; echo flag=[$IS_SANDBOX]; "
        'echo mine > made-here && stat -c "owner=%u" made-here'
    )
    with trio.fail_after(BUDGET_S):
        # No IS_SANDBOX=1: the CLI refuses bypassPermissions to root without it.
        async with agents_service(tmp_path, sandbox, IS_SANDBOX="") as (api, service, client):
            outputs = [
                await bash_as_alice(client, api, command),
                await bash_as_alice(client, api, command, sessionId="a"),
            ]
            made = user_workspace(service.data_dir, "alice") / "workspace" / "made-here"
            owner = made.stat().st_uid
            log = service.log_text()
    uid = Settings().agent_uid
    for output in outputs:
        assert f"uid={uid}" in output, output
        assert SECRET not in output and "Permission denied" in output, output
        assert "flag=[]" in output and f"owner={uid}" in output, output
    assert owner == uid
    assert ("agents run sandboxed" in log) is (sandbox == "auto"), log
    assert "unusable" not in log and "cannot start" not in log, log


@needs_sandbox
async def test_a_cli_installed_under_tmp_runs_in_the_sandbox(tmp_path):
    """The sandbox's /tmp is its own: the CLI (a clone and its venv under /tmp) is bound in."""
    install = Path(tempfile.mkdtemp(prefix="install-", dir="/tmp"))
    try:
        cli = install / "venv" / "claude"
        cli.parent.mkdir()
        try:
            os.link(BUNDLED_CLI, cli)
        except OSError:  # another file system
            shutil.copy2(BUNDLED_CLI, cli)
        with trio.fail_after(BUDGET_S):
            async with agents_service(tmp_path, "auto", CLAUDE_EXECUTABLE=str(cli)) as running:
                api, service, client = running
                one_shot = await bash_as_alice(client, api, "echo $((6 * 7)) in $PWD")
                in_session = await bash_as_alice(client, api, "echo $((6 * 7))", sessionId="a")
                log = service.log_text()
    finally:
        shutil.rmtree(install)
    assert "42 in" in one_shot and "42" in in_session
    assert "agents run sandboxed" in log and "unusable" not in log, log
    assert SANDBOX_REASON is None
