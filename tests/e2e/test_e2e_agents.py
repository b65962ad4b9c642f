"""What agents can see and do, end to end: the real service, the real SDK, the fake CLI.

The fake CLI's ``[[fake:bash]]`` directive runs the rest of the prompt with
/bin/sh as a Bash tool call and answers its output, so these tests ask the
agent to look for secrets and other users' data as a model would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import trio

from claude_code_api.agent.sandbox import probe_sandbox
from claude_code_api.agent.warm_up import PROMPT as WARM_UP_PROMPT
from tests.support.harness import (
    API_KEY,
    AUTH,
    FAKE_CLAUDE,
    for_one_test,
    process_exists,
    run_service,
    shared_service,
    wait_healthy,
    wait_until,
)

SANDBOX_REASON = probe_sandbox(__import__("shutil").which("bwrap"))
needs_sandbox = pytest.mark.skipif(SANDBOX_REASON is not None, reason=str(SANDBOX_REASON))
ALICE, BOB = "alice:sk-alice-key", "bob:sk-bob-key"
KEYS = {"API_KEYS": f"{ALICE},{BOB}", "NEXTAUTH_SECRET": "the-nextauth-secret"}
SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-withheld"}  # not passed on (USE_CLAUDE_API_KEY unset)
AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}


@pytest.fixture
async def service(plain):
    return await for_one_test(plain)


async def run(client, prompt: str, headers=AUTH, **fields) -> dict:
    response = await client.post("/run", json={"prompt": prompt, **fields}, headers=headers)
    return {"status": response.status_code, **response.json()}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Agents unconfined, the service holding secrets (keys, NEXTAUTH_SECRET, an Anthropic
    key it does not pass on); shared by tests that each use a user or session of their own."""
    env = {**KEYS, "API_KEYS": f"{API_KEY},{ALICE},{BOB}", **SECRETS, "AGENT_SANDBOX": "off"}
    with shared_service(tmp_path_factory.mktemp("plain"), env=env) as service:
        yield service


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory):
    """As ``plain`` with every agent in the sandbox, transcripts in the agent's own HOME
    (as the real CLI keeps them)."""
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    env = {**KEYS, **SECRETS, "AGENT_SANDBOX": "on", "FAKE_CLAUDE_HOME": ""}
    with shared_service(tmp_path_factory.mktemp("sandboxed"), env=env) as service:
        yield service


@pytest.fixture
def plain_or_sandboxed(request, sandbox):
    return request.getfixturevalue("plain" if sandbox == "off" else "sandboxed")


@pytest.mark.parametrize("sandbox", ["off", "on"])
async def test_an_agent_does_not_see_the_services_secrets(plain_or_sandboxed, sandbox):
    service = await for_one_test(plain_or_sandboxed)
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            reply = await run(
                client,
                "[[fake:bash]] echo keys=[$API_KEYS] secret=[$NEXTAUTH_SECRET]"
                " ant=[$ANTHROPIC_API_KEY]; env | grep -c -e API_KEYS -e NEXTAUTH || true",
                headers=AS_ALICE,
            )
    assert reply["status"] == 200, reply
    # ANTHROPIC_API_KEY: the agent's own token for the model proxy, never a service's key.
    assert "keys=[] secret=[] ant=[ccapi-agent-" in reply["output"]
    assert "sk-alice-key" not in reply["output"] and "the-nextauth-secret" not in reply["output"]
    if sandbox == "on":  # inside the sandbox the names are gone too
        assert reply["output"].rstrip().endswith("0")


@needs_sandbox
async def test_an_agent_cannot_reach_another_users_data_or_the_database(sandboxed):
    service = await for_one_test(sandboxed)
    with trio.fail_after(90):
        await wait_healthy(service, ready=1)
        data = service.data_dir
        async with service.client() as client:
            # Bob writes a note in his session's workspace.
            wrote = await run(
                client,
                "[[fake:bash]] echo bobs-private-no''te > note.txt && pwd",
                headers=AS_BOB,
                sessionId="bob-s",
            )
            assert wrote["status"] == 200, wrote
            bob_workspace = wrote["output"].strip()
            assert (Path(bob_workspace) / "note.txt").read_text() == "bobs-private-note\n"
            # Alice, one-shot and in a session, goes looking.
            probe = (
                f"[[fake:bash]] cat {bob_workspace}/note.txt; ls {data}/users; "
                f"cat {data}/sessions.sqlite3 | head -c 100; "
                # (a pattern that does not match itself in alice's own transcript)
                f"grep -r bobs-private-not[e] {data} 2>&1 | head -3; "
                f"echo x > {bob_workspace}/planted.txt; echo done"
            )
            one_shot = await run(client, probe, headers=AS_ALICE)
            in_session = await run(client, probe, headers=AS_ALICE, sessionId="alice-s")
    for reply in (one_shot, in_session):
        assert reply["status"] == 200, reply
        assert "bobs-private-note" not in reply["output"]
        assert "SQLite format" not in reply["output"]
        assert "done" in reply["output"]
    assert not (Path(bob_workspace) / "planted.txt").exists()


async def test_one_shot_requests_leave_nothing_behind(tmp_path):
    with trio.fail_after(90):
        async with run_service(tmp_path, env={"FAKE_CLAUDE_HOME": ""}) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                for n in range(3):
                    reply = await run(client, f"[[fake:bash]] echo {n} > file-{n}.txt; echo ok")
                    assert reply["status"] == 200, reply
            workers = service.data_dir / "workers"

            def leftovers() -> list[Path]:
                return list(workers.rglob("*.jsonl")) + list(workers.rglob("file-*.txt"))

            async def only_the_warm_agents_home_is_left() -> bool:
                # The agent kept for the user (emptied) and the one warm for anyone.
                homes = [p for p in workers.glob("*/*") if p.is_dir()]
                return len(homes) <= 2 and not leftovers()

            # Retiring a used agent (and removing its home) overlaps the next warm-up.
            await wait_until(only_the_warm_agents_home_is_left, timeout=10)
            launchers = sorted(p.name for p in (service.data_dir / "run").glob("*.sh"))
            assert len(launchers) <= 2
            assert all(n.startswith(("worker-0-", "worker-1-")) for n in launchers)


async def test_a_pool_agent_runs_its_warm_up_turn_before_anyones(tmp_path):
    log = tmp_path / "fake.log"
    env = {"AGENT_WARM_UP_TURN": "on", "FAKE_CLAUDE_LOG": str(log), "AGENT_REUSE_S": "0"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await run(client, "hello")
            records = [json.loads(line) for line in log.read_text().splitlines()]
    assert reply["status"] == 200 and reply["output"] == "echo: hello", reply
    turns = [r for r in records if r["event"] == "turn"]
    [served] = [r["pid"] for r in turns if r["prompt"] == "hello"]
    # Before the user's prompt, on the same process: the warm-up turn, its exchange kept (a
    # /clear after it makes the CLI redo its per-conversation set-up on the user's turn).
    assert [r["prompt"] for r in turns if r["pid"] == served] == [WARM_UP_PROMPT, "hello"]


async def test_a_deleted_session_takes_its_transcripts_with_it(tmp_path):
    with trio.fail_after(90):
        async with run_service(tmp_path, env={"FAKE_CLAUDE_HOME": ""}) as service:
            await wait_healthy(service, ready=1)
            users = service.data_dir / "users"
            async with service.client() as client:
                assert (await run(client, "My name is Ada.", sessionId="s1"))["status"] == 200
                assert (await run(client, "/clear", sessionId="s1"))["status"] == 200
                assert (await run(client, "hello", sessionId="s1"))["status"] == 200
                transcripts = list(users.rglob("*.jsonl"))
                assert len(transcripts) == 2  # before and after /clear
                deleted = await client.request(
                    "DELETE", "/session", json={"sessionId": "s1"}, headers=AUTH
                )
                assert deleted.status_code == 200
            assert list(users.rglob("*.jsonl")) == []


async def test_clear_sticks_across_a_restart(tmp_path):
    env = {"FAKE_CLAUDE_HOME": ""}
    with trio.fail_after(120):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                await run(client, "My name is Ada.", sessionId="s1")
                assert (await run(client, "What is my name?", sessionId="s1"))[
                    "output"
                ] == "Your name is Ada."
                await run(client, "/clear", sessionId="s1")
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await run(client, "What is my name?", sessionId="s1")
    assert reply["output"] == "I don't know your name."


async def test_a_client_that_leaves_a_silent_turn_frees_the_session_within_a_second(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            await run(client, "My name is Ada.", sessionId="s1")
            with trio.move_on_after(1.0):
                await run(client, "[[fake:sleep:30]] think hard", sessionId="s1")
            left_at = trio.current_time()

            async def session_idle() -> bool:
                status = (await client.get("/status", headers=AUTH)).json()
                return [s["state"] for s in status["sessions"]] == ["live"]

            await wait_until(session_idle, timeout=5)
            assert trio.current_time() - left_at < 1.5
            reply = await run(client, "What is my name?", sessionId="s1")
    assert reply["output"] == "Your name is Ada."  # interrupted, not killed: same conversation
    log = service.log_text()
    assert "turn cut short (client gone); agent idle" in log


async def test_a_refused_credential_fails_fast_and_shows_in_auth_status(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                started = trio.current_time()
                reply = await run(client, "[[fake:retry:401:0:0.3]] hi", timeoutMs=60_000)
                took = trio.current_time() - started
                auth = (await client.get("/auth/status", headers=AUTH)).json()
    assert reply["status"] == 502
    assert reply["error"].startswith("upstream API error 401: ")
    assert took < 5
    assert auth["authenticated"] is False
    assert auth["lastUpstreamAuthError"]["status"] == 401
    assert "upstream API error 401 (attempt 1)" in service.log_text()


async def test_a_retryable_upstream_error_is_reported_when_time_runs_out(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            reply = await run(client, "[[fake:retry:529:0:0.3]] hi", timeoutMs=2000)
    assert reply["status"] == 200 and reply["timedOut"] is True
    assert reply["upstreamError"]["status"] == 529
    assert reply["upstreamError"]["retries"] >= 3


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI's root check only applies to root")
async def test_a_root_services_agents_are_not_root_so_the_clis_root_check_passes(tmp_path):
    """The real CLI refuses bypassPermissions as root without IS_SANDBOX=1 (the fake too,
    asked to): a root service's agents run as AGENT_UID, so none is needed."""
    env = {"FAKE_CLAUDE_REFUSE_ROOT": "1", "IS_SANDBOX": ""}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await run(client, "hello")
    assert reply["status"] == 200 and reply["success"] is True, reply
    assert "Traceback" not in service.log_text()


def cli_the_sandbox_hides(workdir: Path) -> Path:
    """A copy of the fake CLI in DATA_DIR, which the sandbox hides from every agent."""
    cli = workdir / "data" / "bin" / "claude"
    cli.parent.mkdir(parents=True)
    shutil.copy2(FAKE_CLAUDE, cli)
    return cli


async def test_auto_runs_agents_unconfined_with_one_warning_when_none_starts_sandboxed(tmp_path):
    """bwrap works, but the agent cannot start in it: the start-up probe runs the real
    executable, with the real settings, in the sandbox, and ``auto`` falls back."""
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    cli = cli_the_sandbox_hides(tmp_path)
    env = {"AGENT_SANDBOX": "auto", "CLAUDE_EXECUTABLE": str(cli)}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await run(client, "hello")
    assert reply["status"] == 200 and reply["success"] is True, reply
    warnings = [line for line in service.log_text().splitlines() if "unusable" in line]
    assert len(warnings) == 1 and str(cli) in warnings[0], warnings


async def test_agents_die_with_a_killed_service(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, stop_signal=signal.SIGKILL, expect_exit=None) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                # A session with a turn in flight, and the warm worker.
                async with trio.open_nursery() as nursery:

                    async def hung_turn() -> None:
                        await run(client, "[[fake:sleep:300]] x", sessionId="s1")

                    nursery.start_soon(hung_turn)

                    async def two_agents() -> bool:
                        return len(service.live_fake_pids()) >= 2

                    await wait_until(two_agents, timeout=20)
                    agents = service.live_fake_pids()
                    service.process.kill()
                    nursery.cancel_scope.cancel()

    async def all_gone() -> bool:
        return not any(process_exists(pid) for pid in agents)

    await wait_until(all_gone, timeout=10)
