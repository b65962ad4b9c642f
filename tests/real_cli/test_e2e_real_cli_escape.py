"""A malicious agent tries to leave its sandbox: the real CLI, the real service, a mock model.

Each test plays alice's agent as a prompt-injected model would: the mock Messages
API answers a model call with a Bash tool call, the real bundled Claude Code CLI
runs it inside the service's launcher (bubblewrap), and the test reads what the
command printed from the next model call, then checks the host for what it did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from claude_code_api.agent.cgroups import find_cgroups
from claude_code_api.agent.sandbox import probe_sandbox
from claude_code_api.demo.mock_messages_api import (
    MockMessagesApi,
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from claude_code_api.store.user_paths import user_workspace
from tests.support.harness import RunningService, run_service, wait_healthy
from tests.support.real_cli import requires_real_cli, service_overrides

SANDBOX_REASON = probe_sandbox(shutil.which("bwrap"))
# Where agents get cgroups, closing one kills all it started, whatever their process group.
_CGROUPS = find_cgroups(Path(tempfile.gettempdir()))
CGROUPS_REASON = _CGROUPS if isinstance(_CGROUPS, str) else None
needs_sandbox = pytest.mark.skipif(SANDBOX_REASON is not None, reason=str(SANDBOX_REASON))
pytestmark = requires_real_cli

AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}
BUDGET_S = 120
SERVICE_TOKEN = '{"claudeAiOauth": {"accessToken": "the-service-token"}}'


def service_credentials(tmp_path: Path) -> Path:
    """The service's Claude login file (what ``claude login`` leaves), before it starts."""
    path = tmp_path / "service-home" / ".claude" / ".credentials.json"
    path.parent.mkdir(parents=True)
    path.write_text(SERVICE_TOKEN)
    return path


async def bash_as_alice(client, api, command: str, headers=AS_ALICE, **fields: str) -> str:
    """Run ``command`` with alice's agent's Bash tool; what it printed."""
    api.enqueue(ToolUseReply("Bash", {"command": command}), TextReply("done"))
    reply = await client.post("/run", json={"prompt": "go", **fields}, headers=headers)
    assert reply.status_code == 200, reply.text
    return tool_result_text(api.model_calls[-1].tool_results()[0]).split("<system-reminder>")[0]


@asynccontextmanager
async def agents_service(
    tmp_path: Path, sandbox: str = "on", **overrides: str
) -> AsyncIterator[tuple[MockMessagesApi, RunningService, httpx.AsyncClient]]:
    """The service running the real CLI against the mock API, healthy, and a client of it.

    Agents are sandboxed (``AGENT_SANDBOX``) unless ``sandbox`` says otherwise;
    ``overrides`` are further settings.
    """
    async with open_mock_api() as api:
        env = service_overrides(api.url, tmp_path, AGENT_SANDBOX=sandbox, **overrides)
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1, timeout=60)
            async with service.client(timeout=60) as client:
                yield api, service, client


async def as_one_shot_and_session(
    tmp_path: Path, command: str, **overrides: str
) -> tuple[list[str], list[dict[str, str]]]:
    """``command`` run by alice's one-shot agent, then her session's, on a sandboxed service.

    Returns what each printed, and the headers of every model call.
    """
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path, **overrides) as (api, _service, client):
            outputs = [
                await bash_as_alice(client, api, command),
                await bash_as_alice(client, api, command, sessionId="a"),
            ]
            return outputs, [call.headers for call in api.model_calls]


@needs_sandbox
async def test_a_sandboxed_agent_holds_no_capability_to_undo_its_sandbox(tmp_path):
    """As root, bwrap keeps every capability unless told not to: mount could undo it all.

    With CAP_SYS_ADMIN the agent remounts the read-only binds writable (the service's
    credentials, the whole file system) and unmounts the tmpfs over DATA_DIR (every
    user's files, the database). Both agents, one-shot and session, must hold none.
    """
    credentials = service_credentials(tmp_path)
    command = (
        "grep CapEff /proc/self/status; "
        'target="$CLAUDE_CONFIG_DIR/.credentials.json"; '
        'mount -o remount,rw,bind "$target" && echo stolen >> "$target"; '
        "mount -o remount,rw,bind / && echo root-remounted-rw; "
        "unshare -m true && echo new-mount-namespace"
    )
    outputs, _ = await as_one_shot_and_session(tmp_path, command)
    for output in outputs:
        assert "CapEff:\t0000000000000000" in output, output
        assert "root-remounted-rw" not in output and "new-mount-namespace" not in output
    assert credentials.read_text() == SERVICE_TOKEN


@needs_sandbox
async def test_a_sandboxed_agent_cannot_change_the_hosts_kernel_settings(tmp_path):
    """Root needs no capability to write most of /proc/sys: its files are root's, mode 0644.

    bwrap covers /proc/sys only when the directory itself looks writable (0555: it never
    does). ``kernel.core_pattern`` or ``kernel.modprobe`` name a program the kernel runs
    as root outside every namespace. Checked with access(2), so nothing is written.
    """
    command = (
        "for name in core_pattern modprobe; do "
        'test -w /proc/sys/kernel/$name && echo "writable: $name"; done; echo checked'
    )
    outputs, _ = await as_one_shot_and_session(tmp_path, command)
    for output in outputs:
        assert "checked" in output and "writable" not in output, output


@pytest.mark.parametrize(
    "sandbox",
    [
        pytest.param("on", marks=needs_sandbox),
        # (A service of its own user runs its agents as that user: they read its file.)
        pytest.param("off", marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root")),
    ],
)
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_an_agent_holds_neither_token_of_the_login_the_proxy_puts_it_on(tmp_path, sandbox):
    """The model proxy puts the Claude login's access token on every model call, with the
    `oauth-2025-04-20` beta the CLI sends for a login; an agent holds only its own token.

    With the access token an agent's tool could use the operator's login for hours, with
    the refresh token for good (and, refreshing it, lock the service out for every user).
    """
    credentials = tmp_path / "service-home" / ".claude" / ".credentials.json"
    credentials.parent.mkdir(parents=True)
    login = {
        "accessToken": "the-access-token",
        "refreshToken": "the-refresh-token",
        "expiresAt": round(time.time() * 1000) + 86_400_000,
        "scopes": ["user:inference"],
        "subscriptionType": "max",
    }
    credentials.write_text(json.dumps({"claudeAiOauth": login}))
    credentials.chmod(0o600)
    command = (
        'cat "$CLAUDE_CONFIG_DIR/.credentials.json"; echo; ls -a "$CLAUDE_CONFIG_DIR"; '
        'grep -rl the-access-token "$HOME" /tmp 2>/dev/null | head -3; '
        "env | grep -i -e token -e key"
    )
    outputs, calls = await as_one_shot_and_session(
        tmp_path,
        command,
        sandbox=sandbox,
        USE_CLAUDE_API_KEY="0",
        AGENT_ENV="ANTHROPIC_BASE_URL",  # the mock's URL, without the API key
    )
    for output in outputs:
        assert "the-access-token" not in output and "the-refresh-token" not in output, output
        assert "credentials.json: No such file" in output, output
        assert "ANTHROPIC_API_KEY=ccapi-agent-" in output, output
    # Every model call carried the login (the proxy's doing); the service's file is untouched.
    assert {call.get("authorization") for call in calls} == {"Bearer the-access-token"}
    assert all("oauth-2025-04-20" in call["anthropic-beta"].split(",") for call in calls)
    assert json.loads(credentials.read_text()) == {"claudeAiOauth": login}


def processes_named(marker: str) -> list[int]:
    """The host's processes whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                if marker.encode() in file.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize(
    "sandbox",
    [
        pytest.param("on", marks=needs_sandbox),
        pytest.param(
            "off",
            marks=[
                pytest.mark.xfail(
                    CGROUPS_REASON is not None,
                    strict=True,
                    reason="the CLI starts each Bash command in a session of its own, out of"
                    " reach of the agent's process group; without a cgroup per agent"
                    f" ({CGROUPS_REASON}) unfixed, see README (Residual risks)",
                ),
                pytest.mark.slow,  # ~13 s: it waits out the escaped process's whole grace
            ],
        ),
    ],
)
async def test_a_background_process_a_tool_started_dies_with_its_agent(tmp_path, sandbox):
    marker = f"escapee-{os.getpid()}-{sandbox}"
    command = f"bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 & echo started"
    try:
        with trio.fail_after(BUDGET_S):
            # AGENT_REUSE_S=0: the agent retires right after its request.
            async with agents_service(tmp_path, sandbox, AGENT_REUSE_S="0") as (api, _, client):
                assert "started" in await bash_as_alice(client, api, command)
                # The worker retires the agent and warms a fresh one.
                with trio.move_on_after(10):
                    while processes_named(marker):
                        await trio.sleep(0.1)
                assert processes_named(marker) == []
    finally:
        for pid in processes_named(marker):
            os.kill(pid, signal.SIGKILL)


@needs_sandbox
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_nothing_alice_leaves_behind_reaches_bobs_next_agent(tmp_path):
    """Files in every place alice's agent may write, and a process; bob's agent meets none.

    One worker and AGENT_REUSE_S: alice's agent is kept for her, and bob's request makes
    the worker retire it and start a fresh one.
    """
    leave = (
        'for dir in "$HOME" "$HOME/workspace" "$CLAUDE_CONFIG_DIR" /tmp /dev/shm; do '
        'echo planted > "$dir/alice-was-here"; done; '
        "bash -c 'exec -a alice-was-here sleep 600' >/dev/null 2>&1 & echo planted"
    )
    look = (  # (the words spelled so that this command's own line does not hold them)
        'p=plant; grep -rl "${p}ed" "$HOME" /tmp /dev/shm 2>/dev/null; '
        'a=alice-was; grep -l "$a-here" /proc/[0-9]*/cmdline 2>/dev/null | grep -v self; '
        "echo looked"
    )
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path, AGENT_REUSE_S="60") as (api, _service, client):
            assert "planted" in await bash_as_alice(client, api, leave)
            seen = await bash_as_alice(client, api, look, headers=AS_BOB)
    assert seen.split() == ["looked"], seen


@needs_sandbox
async def test_an_agent_cannot_tell_which_users_have_agents_running(tmp_path):
    """/proc/net/unix lists every Unix socket bound in the agent's network namespace.

    In the host's, that was every agent's: the CLI's messaging socket went to
    ``$HOME/tmp/cc-socks/`` (when that path is short enough, as with ``DATA_DIR=/data``),
    and its path named the user of every running agent. In its own namespace an agent sees
    its own sockets, and its bridges' connections to the service's sockets in
    ``DATA_DIR/run``, which name no user.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="d", dir="/var/tmp"))  # short, outside /tmp
    try:
        with trio.fail_after(BUDGET_S):
            service_at = agents_service(tmp_path, DATA_DIR=str(data_dir))
            async with service_at as (api, _service, client):
                api.enqueue(TextReply("hello bob"))
                bob = await client.post(
                    "/run", json={"prompt": "hi", "sessionId": "b"}, headers=AS_BOB
                )
                assert bob.status_code == 200, bob.text
                seen = await bash_as_alice(client, api, "cat /proc/net/unix; echo looked")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert "looked" in seen
    shown = {word for word in seen.split() if word.startswith(str(data_dir))}
    assert shown <= {f"{data_dir}/run/model-proxy.sock", f"{data_dir}/run/egress-proxy.sock"}
    assert "bob" not in seen, seen


@needs_sandbox
async def test_what_bobs_agent_serves_on_loopback_is_not_alices_to_read(tmp_path):
    serve = (
        "echo bobs-private-notes > notes.txt; "
        "(python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &); "
        "for _ in $(seq 50); do curl -s 127.0.0.1:8765/notes.txt && break; sleep 0.1; done; "
        "echo serving"
    )
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path) as (api, _service, client):
            # (bob's server is up: his agent, live for his session, reads it.)
            served = await bash_as_alice(client, api, serve, headers=AS_BOB, sessionId="b")
            assert "bobs-private-notes" in served and "serving" in served, served
            seen = await bash_as_alice(client, api, "curl -s 127.0.0.1:8765/notes.txt; echo tried")
    assert "tried" in seen and "bobs-private-notes" not in seen, seen


def bobs_memory_and_transcripts(home: Path) -> dict[Path, str]:
    files = [home / ".claude" / "CLAUDE.md", *(home / ".claude" / "projects").rglob("*.jsonl")]
    return {path: path.read_text() for path in files if path.is_file()}


@needs_sandbox
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_links_alices_agent_leaves_in_her_home_never_lead_the_service_to_bob(tmp_path):
    """Alice's agent knows where bob's home is (its name derives from the user id), and
    points what the service later opens in her home at it: her CLAUDE.md, her
    transcripts, a directory in her workspace. The service reads, deletes and starts agents there;
    bob's files stay as they were and never reach alice.
    """
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path) as (api, service, client):
            bob_home = user_workspace(service.data_dir, "bob")
            api.enqueue(TextReply("noted"))
            put = await client.put("/user-claude", json={"content": "bobs-memory"}, headers=AS_BOB)
            assert put.status_code == 200, put.text
            bob = await client.post(
                "/run", json={"prompt": "bobs-words", "sessionId": "b"}, headers=AS_BOB
            )
            assert bob.status_code == 200, bob.text
            bob_files = bobs_memory_and_transcripts(bob_home)
            assert len(bob_files) == 2, bob_files
            plant = (
                'cd "$HOME" && rm -rf .claude/projects .claude/CLAUDE.md && '
                f"ln -s {bob_home}/.claude/projects .claude/projects && "
                f"ln -s {bob_home}/.claude/CLAUDE.md .claude/CLAUDE.md && "
                f"ln -s {bob_home}/workspace workspace/bob && echo planted"
            )
            planted = await bash_as_alice(client, api, plant, sessionId="a")
            assert "planted" in planted, planted
            memory = await client.get("/user-claude", headers=AS_ALICE)
            deleted = await client.request(
                "DELETE", "/session", json={"sessionId": "a"}, headers=AS_ALICE
            )
            look = 'cat "$CLAUDE_CONFIG_DIR/CLAUDE.md"; ls -R "$HOME"; echo looked'
            again = await bash_as_alice(client, api, look, sessionId="a2")
            # A one-shot's prompt carries her CLAUDE.md: refused, being a link.
            one_shot = await client.post("/run", json={"prompt": "hi"}, headers=AS_ALICE)
            assert bobs_memory_and_transcripts(bob_home) == bob_files
    assert deleted.status_code == 200, deleted.text
    assert "bobs-memory" not in memory.text and "bobs" not in one_shot.text
    assert "looked" in again and "bobs" not in again, again
    assert not any("bobs" in call.all_text() for call in api.model_calls[1:])


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
async def test_another_account_on_the_host_cannot_run_what_an_agent_made_setuid(tmp_path):
    """The agent owns its HOME: a copy of a shell made setuid there runs as the service's
    user (here root) for whoever can get to it, if nothing above the HOME stops them."""
    data_dir = Path(tempfile.mkdtemp(prefix="d", dir="/var/tmp"))
    data_dir.chmod(0o755)  # as an operator's volume usually is
    plant = 'cp /bin/true "$HOME/t" && chmod 4755 "$HOME/t" && chmod 755 "$HOME" && echo planted'
    try:
        with trio.fail_after(BUDGET_S):
            service_at = agents_service(tmp_path, DATA_DIR=str(data_dir))
            async with service_at as (api, _service, client):
                planted = await bash_as_alice(client, api, plant, sessionId="a")
        (setuid,) = data_dir.glob("users/*/t")
        nobody = subprocess.run(  # (a shell: setpriv's own exec skips the path's checks)
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + ["sh", "-c", 'exec "$0"', str(setuid)],
            capture_output=True,
            timeout=10,
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert "planted" in planted, planted
    assert nobody.returncode != 0, nobody
