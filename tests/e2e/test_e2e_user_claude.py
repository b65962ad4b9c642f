"""Per-user CLAUDE.md end to end: the real service, the real SDK, the fake CLI.

The fake CLI reads CLAUDE.md files at start as the real one does (user memory
from ``$CLAUDE_CONFIG_DIR``, project files up the cwd) and keeps the
``<system-reminder>`` blocks a message brings; ``[[fake:memory]]`` makes it
answer with all of it (``memory: user: ... | context: ...``). So these tests see
which user's instructions reached which agent: one-shots through a one-worker
pool (whose agents are warmed before their user is known), and sessions.
"""

from __future__ import annotations

import json
import os

import pytest
import trio

from claude_code_api.agent.sandbox import probe_sandbox
from claude_code_api.store.user_paths import user_workspace
from tests.support.harness import run_service, wait_healthy

SANDBOX_REASON = probe_sandbox(__import__("shutil").which("bwrap"))
KEYS = {"API_KEYS": "alice:sk-alice-key,bob:sk-bob-key,carol:sk-carol-key"}
AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}
AS_CAROL = {"x-api-key": "sk-carol-key"}
# As claude-code-web sends every call, GETs included.
WEB_HEADERS = {"Content-Type": "application/json"}


async def run(client, prompt: str, headers, **fields) -> dict:
    response = await client.post("/run", json={"prompt": prompt, **fields}, headers=headers)
    body = response.json()
    assert response.status_code == 200 and body["success"], body
    return body


async def memory_of(client, headers, **fields) -> str:
    """What memory the agent serving this request was given (the fake's answer)."""
    output = (await run(client, "[[fake:memory]]", headers, **fields))["output"]
    assert output.startswith("memory: "), output
    return output


async def put(client, content, headers):
    return await client.put(
        "/user-claude", json={"content": content}, headers={**WEB_HEADERS, **headers}
    )


async def get(client, headers) -> dict:
    response = await client.get("/user-claude", headers={**WEB_HEADERS, **headers})
    assert response.status_code == 200, response.text
    return response.json()


async def test_get_and_put_round_trip_each_user_their_own_with_limits(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env=KEYS) as service:
            async with service.client() as client:
                assert await get(client, AS_ALICE) == {"content": ""}
                saved = await put(client, "# Alice\nAnswer in French. ✓\n", AS_ALICE)
                assert (saved.status_code, saved.json()) == (200, {"saved": True})
                assert await get(client, AS_ALICE) == {"content": "# Alice\nAnswer in French. ✓\n"}
                assert await get(client, AS_BOB) == {"content": ""}

                too_big = await put(client, "x" * (100 * 1024 + 1), AS_ALICE)
                assert too_big.status_code == 413
                assert too_big.json() == {"error": "content: exceeds 102400 bytes (100 KiB)"}
                exactly = await put(client, "y" * (100 * 1024), AS_BOB)
                assert exactly.status_code == 200
                for body, message in [
                    ({}, "content: required"),
                    ({"content": 7}, "content: expected a string, got number"),
                ]:
                    refused = await client.put("/user-claude", json=body, headers=AS_ALICE)
                    assert refused.status_code == 400
                    assert refused.json()["error"].startswith(message)
                not_json = await client.put(
                    "/user-claude", content=b"hello", headers={**WEB_HEADERS, **AS_ALICE}
                )
                assert not_json.status_code == 400 and "error" in not_json.json()
                # Nothing above changed alice's file.
                assert await get(client, AS_ALICE) == {"content": "# Alice\nAnswer in French. ✓\n"}
                assert len((await get(client, AS_BOB))["content"]) == 100 * 1024

                assert (await client.get("/user-claude")).status_code == 401
                assert (await put(client, "x", {"x-api-key": "wrong"})).status_code == 401
                assert (await client.post("/user-claude", headers=AS_ALICE)).status_code == 405

                cleared = await put(client, "", AS_ALICE)
                assert cleared.status_code == 200
                assert await get(client, AS_ALICE) == {"content": ""}

                # Her own session agent may put anything in its place, e.g. a FIFO: a read
                # would block forever. It fails at once instead, for GET and one-shots alike.
                fifo = user_workspace(service.data_dir, "alice") / ".claude" / "CLAUDE.md"
                os.mkfifo(fifo)
                with trio.fail_after(5):
                    unreadable = await client.get("/user-claude", headers=AS_ALICE)
                    one_shot = await client.post("/run", json={"prompt": "hi"}, headers=AS_ALICE)
                for response in (unreadable, one_shot):
                    assert response.status_code == 503
                    assert response.json() == {
                        "error": "cannot read your CLAUDE.md: .claude/CLAUDE.md is not a regular file"
                    }
                assert (await put(client, "", AS_ALICE)).status_code == 200  # removes it
                assert not fifo.exists()
            stored = sorted(service.data_dir.rglob("CLAUDE.md"))
    # Where a session agent's CLI loads it: $HOME/.claude, its CLAUDE_CONFIG_DIR.
    assert stored == [user_workspace(service.data_dir, "bob") / ".claude" / "CLAUDE.md"]


@pytest.mark.parametrize("sandbox", ["off", "on"])
async def test_each_users_claude_md_reaches_only_their_requests_one_shots_and_sessions(
    tmp_path, sandbox
):
    if sandbox == "on" and SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    env = {**KEYS, "POOL_SIZE": "1", "AGENT_SANDBOX": sandbox}
    if sandbox == "on":
        env["FAKE_CLAUDE_HOME"] = ""  # transcripts in the agent's own HOME, as the real CLI
    with trio.fail_after(120):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                assert (await put(client, "ALICE-RULE-1", AS_ALICE)).status_code == 200
                assert (await put(client, "BOB-RULE", AS_BOB)).status_code == 200

                # One-shots, one after another through the one pre-warmed worker.
                alice = await memory_of(client, AS_ALICE)
                bob = await memory_of(client, AS_BOB)
                carol = await memory_of(client, AS_CAROL)
                alice_again = await memory_of(client, AS_ALICE)

                # A session loads it itself, as user memory, from the user's HOME.
                await run(client, "My name is Alice.", AS_ALICE, sessionId="s1")
                session = await memory_of(client, AS_ALICE, sessionId="s1")
                bob_session = await memory_of(client, AS_BOB, sessionId="s1")

                # An update: in effect from the next one-shot, and the live session is
                # restarted (resuming its conversation) before its next turn.
                assert (await put(client, "ALICE-RULE-2", AS_ALICE)).status_code == 200
                alice_updated = await memory_of(client, AS_ALICE)
                session_updated = await memory_of(client, AS_ALICE, sessionId="s1")
                name = await run(client, "What is my name?", AS_ALICE, sessionId="s1")
                bob_session_after = await memory_of(client, AS_BOB, sessionId="s1")

    for one_shot in (alice, alice_again):
        assert "context: <system-reminder>" in one_shot and "ALICE-RULE-1" in one_shot
        assert "BOB-RULE" not in one_shot and "user: " not in one_shot
    assert "BOB-RULE" in bob and "ALICE" not in bob
    assert carol == "memory: none"
    assert "user: ALICE-RULE-1" in session and "context:" not in session
    assert "user: BOB-RULE" in bob_session and "ALICE" not in bob_session
    assert "ALICE-RULE-2" in alice_updated and "ALICE-RULE-1" not in alice_updated
    assert "user: ALICE-RULE-2" in session_updated and "ALICE-RULE-1" not in session_updated
    assert name["output"] == "Your name is Alice."  # the same conversation
    assert bob_session_after == bob_session
    restarts = service.log_text().count("CLAUDE.md changed; restarting it")
    assert restarts == 1  # alice's session; bob's kept its process


async def test_a_one_shot_with_a_claude_md_runs_on_the_agent_warmed_before_it(tmp_path):
    """No cold start for a user with a CLAUDE.md: the agent that answers was already warm."""
    log = tmp_path / "fake.log"
    env = {**KEYS, "POOL_SIZE": "1", "FAKE_CLAUDE_LOG": str(log)}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            warm = set(service.fake_pids())
            async with service.client() as client:
                assert (await put(client, "ALICE-RULE", AS_ALICE)).status_code == 200
                reply = await memory_of(client, AS_ALICE)
    assert "ALICE-RULE" in reply
    entries = map(json.loads, log.read_text().splitlines())
    # (A "/clear" follows: the agent is kept for Alice's next request, AGENT_REUSE_S.)
    turns = [e for e in entries if e["event"] == "turn" and e["prompt"] != "/clear"]
    assert len(turns) == 1 and turns[0]["pid"] in warm
    assert turns[0]["prompt"] == "[[fake:memory]]"  # the context is not part of the prompt
