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
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from claude_code_api.config.settings import Settings
from claude_code_api.store.user_paths import user_workspace
from tests.real_cli.test_e2e_real_cli_escape import (
    BUDGET_S,
    SANDBOX_REASON,
    agents_service,
    bash_as_alice,
    needs_sandbox,
)
from tests.support.real_cli import BUNDLED_CLI, requires_real_cli

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
        f"echo uid=$(id -u) name=$(whoami); cat {root_only_file}; echo flag=[$IS_SANDBOX]; "
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
    if sandbox == "auto":  # (the sandbox's /etc/passwd names it; the host's need not)
        assert all("name=claude-agent" in output for output in outputs), outputs
    assert ("agents run sandboxed" in log) is (sandbox == "auto"), log
    assert "unusable" not in log and "cannot start" not in log, log


def install_cli(directory: Path) -> Path:
    """The bundled CLI, as a venv in ``directory`` would hold it (a hard link: 400 MB)."""
    cli = directory / "venv" / "claude"
    cli.parent.mkdir()
    try:
        os.link(BUNDLED_CLI, cli)
    except OSError:  # another file system
        shutil.copy2(BUNDLED_CLI, cli)
    return cli


@needs_root
@pytest.mark.parametrize("sandbox", SANDBOX_PARAMETERS)
async def test_a_cli_behind_a_directory_only_root_may_pass(tmp_path, sandbox):
    """A clone and its venv under /root (mode 0700): AGENT_UID cannot pass it. The
    sandbox makes the way to the CLI (and hides the rest); without, the service gives
    AGENT_UID search permission on it by an ACL entry: passing through, not listing."""
    private = Path(tempfile.mkdtemp(prefix="private-", dir="/var/tmp"))  # mode 0700
    try:
        cli = install_cli(private)
        with trio.fail_after(BUDGET_S):
            async with agents_service(tmp_path, sandbox, CLAUDE_EXECUTABLE=str(cli)) as (
                api,
                service,
                client,
            ):
                output = await bash_as_alice(client, api, f"ls {private}; echo listed")
                log = service.log_text()
        mode = stat.S_IMODE(private.stat().st_mode)
    finally:
        shutil.rmtree(private)
    assert "listed" in output, output
    if sandbox == "auto":
        assert "agents run sandboxed" in log, log
        assert "venv" in output  # (the way to the CLI, nothing else of it)
        assert "gave uid" not in log and mode == 0o700, log
    else:
        assert "Permission denied" in output and "venv" not in output, output  # no listing
        assert f"gave uid {Settings().agent_uid} (AGENT_UID) search permission on {private}" in log
        assert mode == 0o710, oct(mode)  # (the ACL's mask shows as the group's bits)


@needs_sandbox
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_cli_installed_under_tmp_runs_in_the_sandbox(tmp_path):
    """The sandbox's /tmp is its own: the CLI (a clone and its venv under /tmp) is bound in."""
    install = Path(tempfile.mkdtemp(prefix="install-", dir="/tmp"))
    try:
        cli = install_cli(install)
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
