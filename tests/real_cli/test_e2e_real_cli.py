"""The real service with the real bundled Claude Code CLI, against the mock Messages API.

Nothing is faked but the model: the service runs as ``python -m claude_code_api``
with the bundled CLI (``CLAUDE_EXECUTABLE`` unset) and ``ANTHROPIC_BASE_URL``
pointing at :mod:`claude_code_api.demo.mock_messages_api` in this test's trio loop. The mock
scripts the model's answers — text, a Bash or Read tool call, HTTP errors,
silence — and records what the CLI sends back (so a test reads what a tool call
printed from the next request). As root, ``IS_SANDBOX=1``, as the CLI demands.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from claude_code_api.agent.sandbox import probe_sandbox
from claude_code_api.demo.mock_messages_api import (
    ApiError,
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from tests.e2e.test_e2e_metrics import by_state, get, scrape
from tests.support.harness import run_service, wait_healthy, wait_until
from tests.support.real_cli import requires_real_cli, service_overrides

pytestmark = requires_real_cli

SANDBOX_REASON = probe_sandbox(__import__("shutil").which("bwrap"))
AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}
# A real CLI warms in ~1 s on a quiet machine; several per test on a loaded one.
BUDGET_S = 120


def real_cli_env(api, tmp_path: Path, **extra: str) -> dict[str, str]:
    return service_overrides(api.url, tmp_path, **extra)


async def run(client, prompt: str, headers=AS_ALICE, **fields) -> dict:
    response = await client.post("/run", json={"prompt": prompt, **fields}, headers=headers)
    return {"status": response.status_code, **response.json()}


async def test_one_shots_and_a_session_with_the_real_cli(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with run_service(tmp_path, env=real_cli_env(api, tmp_path)) as service:
                await wait_healthy(service, ready=1, timeout=60)
                assert api.model_calls == []  # warm-up makes no model call
                async with service.client() as client:
                    api.enqueue(TextReply("Four."))
                    one_shot = await run(client, "What is 2+2?")
                    assert len(api.model_calls) == 1  # one model call per one-shot
                    first = await run(client, "My name is Alice.", sessionId="s1")
                    second = await run(client, "What is my name?", sessionId="s1")
            transcripts = list((service.data_dir / "users").rglob("*.jsonl"))
            leftovers = list((service.data_dir / "workers").rglob("*.jsonl"))
    assert one_shot["status"] == 200 and one_shot["output"] == "Four.", one_shot
    assert first["output"] == "echo: My name is Alice."
    assert second["output"] == "echo: What is my name?"
    # The session's second model call carries the first turn: one conversation.
    assert "My name is Alice." in api.model_calls[-1].all_text()
    assert len(transcripts) == 1 and leftovers == []


@pytest.mark.skipif(SANDBOX_REASON is not None, reason=str(SANDBOX_REASON))
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_the_agents_tools_see_no_secret_and_no_other_user(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = real_cli_env(api, tmp_path, AGENT_SANDBOX="on")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                data = service.data_dir
                async with service.client() as client:
                    api.enqueue(TextReply("noted"))
                    bob = await run(client, "remember my secret", headers=AS_BOB, sessionId="b")
                    assert bob["status"] == 200, bob
                    command = (
                        "echo keys=[$API_KEYS] secret=[$NEXTAUTH_SECRET]; "
                        f"ls {data}/users | wc -l; cat {data}/sessions.sqlite3 | head -c 15; "
                        "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-bob; "
                        f"grep -rl 'remember my secre[t]' {data} 2>/dev/null | wc -l"
                    )
                    api.enqueue(
                        ToolUseReply("Bash", {"command": command}),
                        TextReply("looked"),
                        ToolUseReply("Read", {"file_path": f"{data}/sessions.sqlite3"}),
                        TextReply("read"),
                    )
                    looked = await run(client, "look around", sessionId="a")
                    read = await run(client, "read the database")
    assert looked["status"] == 200 and read["status"] == 200, (looked, read)
    bash_result = api.model_calls[-3].tool_results()[0]
    # (The CLI appends a <system-reminder> to what the tool printed.)
    output = str(bash_result["content"]).split("<system-reminder>")[0]
    assert "keys=[] secret=[]" in output
    lines = output.strip().splitlines()
    assert lines[1].strip() == "1"  # only alice's own directory under users/
    assert "SQLite format" not in output
    assert lines[-2:] == ["0", "0"]  # no key in any visible environ; bob's words nowhere
    read_result = api.model_calls[-1].tool_results()[0]
    assert read_result.get("is_error") is True or "SQLite" not in str(read_result["content"])


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_refused_api_key_fails_fast(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with run_service(tmp_path, env=real_cli_env(api, tmp_path)) as service:
                await wait_healthy(service, ready=1, timeout=60)
                api.enqueue(ApiError(401, "invalid x-api-key", times=None))
                async with service.client() as client:
                    started = trio.current_time()
                    reply = await run(client, "hello", timeoutMs=120_000)
                    took = trio.current_time() - started
                    auth = (await client.get("/auth/status", headers=AS_ALICE)).json()
    assert reply["status"] == 502, reply
    assert reply["error"].startswith("upstream API error 401")
    assert took < 15  # not the 120 s timeout, nor the CLI's 3 minutes of retries
    assert auth["lastUpstreamAuthError"]["status"] == 401 and auth["authenticated"] is False


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_retryable_error_is_reported_when_time_runs_out(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with run_service(tmp_path, env=real_cli_env(api, tmp_path)) as service:
                await wait_healthy(service, ready=1, timeout=60)
                api.enqueue(ApiError(529, times=None))
                async with service.client() as client:
                    reply = await run(client, "hello", timeoutMs=4000)
    assert reply["status"] == 200 and reply["timedOut"] is True, reply
    assert reply["upstreamError"]["status"] == 529 and reply["upstreamError"]["retries"] >= 1


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_clear_survives_a_restart(tmp_path):
    with trio.fail_after(2 * BUDGET_S):
        async with open_mock_api() as api:
            env = real_cli_env(api, tmp_path)
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    await run(client, "My name is Alice.", sessionId="s1")
                    cleared = await run(client, "/clear", sessionId="s1")
                    assert cleared["status"] == 200, cleared
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    after = await run(client, "What is my name?", sessionId="s1")
    assert after["status"] == 200, after
    assert "Alice" not in api.model_calls[-1].all_text()


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_client_that_leaves_during_a_model_call_is_noticed_at_once(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with run_service(tmp_path, env=real_cli_env(api, tmp_path)) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    await run(client, "hello", sessionId="s1")
                    api.enqueue(TextReply("very late", first_byte_delay=60))
                    with trio.move_on_after(2):
                        await run(client, "think for a minute", sessionId="s1")
                    left_at = trio.current_time()

                    async def call_aborted() -> bool:
                        return api.model_calls[-1].disconnected

                    await wait_until(call_aborted, timeout=10)
                    assert trio.current_time() - left_at < 3
                    nxt = await run(client, "still there?", sessionId="s1")
    assert nxt["status"] == 200 and nxt["output"] == "echo: still there?", nxt


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI's root check only applies to root")
async def test_as_root_without_is_sandbox_agents_answer(tmp_path):
    """The CLI refuses bypassPermissions to root without IS_SANDBOX=1; a root service's
    agents run as AGENT_UID (see test_e2e_real_cli_launch.py), so it never needs it."""
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = real_cli_env(api, tmp_path, IS_SANDBOX="")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    reply = await run(client, "hello")
    assert reply["status"] == 200 and reply["output"] == "echo: hello", reply
    assert "bypassPermissions" not in service.log_text()


async def test_a_users_next_one_shot_runs_on_the_cleared_agent_with_no_file_left(tmp_path):
    """AGENT_REUSE_S with the real CLI: /clear and an emptied HOME between two requests (the
    user's second and third: their first keeps no agent, as they may never come back)."""
    write = 'echo A > note.txt; echo A > "$HOME/loose"; echo "home=$HOME"'
    look = 'ls -A; echo /; ls -A "$HOME"; echo "home=$HOME"'
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = real_cli_env(api, tmp_path, AGENT_REUSE_S="60")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    api.enqueue(
                        TextReply("hello"),
                        ToolUseReply("Bash", {"command": write}),
                        TextReply("written"),
                        ToolUseReply("Bash", {"command": look}),
                        TextReply("listed"),
                    )
                    assert (await run(client, "hello"))["status"] == 200
                    wrote = await run(client, "write a note")
                    listed = await run(client, "list the files")
    assert wrote["status"] == 200 and listed["status"] == 200, (wrote, listed)
    # hello; write, its tool result, look, its tool result
    _, _, wrote_result, second, looked_result = api.model_calls
    wrote_out = tool_result_text(wrote_result.tool_results()[0]).split("<system-")[0]
    looked_out = tool_result_text(looked_result.tool_results()[0]).split("<system-")[0]
    home = [line for line in wrote_out.splitlines() if line.startswith("home=")]
    assert home and home[0] in looked_out, (wrote_out, looked_out)  # the same agent
    assert "note.txt" not in looked_out and "loose" not in looked_out, looked_out
    # /clear between them: the second request's conversation holds none of the first's.
    assert "write a note" not in second.all_text()
    assert wrote["claudeSessionId"] != listed["claudeSessionId"]


def priced_tokens(reply: dict) -> int:
    """A turn's own tokens (its reply's usage), output ones counted 5 times: Claude's list
    prices charge an output token five times an input one (claude-sonnet-4-6: 3 and 15 USD
    per million), and the cost the CLI reports is the tokens times those prices."""
    return reply["usage"]["input_tokens"] + 5 * reply["usage"]["output_tokens"]


async def cost_metric(client) -> float:
    # (The service's total: no user label unless METRICS_PER_USER=1.)
    return get(await scrape(client), "claude_code_api_cost_usd_total")


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_each_turn_reports_its_own_cost_across_a_resume_and_a_restart(tmp_path):
    """The CLI's ``total_cost_usd`` is the conversation's running total, carried over to a
    process that resumes it: the replies used to report 0.05, 0.10, 0.15... (issue 19)."""
    replies = []
    with trio.fail_after(BUDGET_S + 60):
        async with open_mock_api() as api:
            # Idle sessions hibernate after 1 s; one-shots reuse their user's agent (/clear).
            env = real_cli_env(api, tmp_path, SESSION_IDLE_MS="1000", AGENT_REUSE_S="60")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    for prompt in ("My name is Ada.", "one", "two"):
                        replies.append(await run(client, prompt, sessionId="s"))

                    async def hibernated() -> bool:
                        states = by_state(await scrape(client), "claude_code_api_sessions")
                        return states.get("hibernated") == 1

                    await wait_until(hibernated, timeout=30)
                    replies.append(await run(client, "three", sessionId="s"))  # resumed
                    replies.append(await run(client, "a one-shot"))
                    replies.append(await run(client, "another one-shot"))  # same agent, cleared
                    metric = await cost_metric(client)
            async with run_service(tmp_path, env=env) as service:  # a restart
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    replies.append(await run(client, "four", sessionId="s"))
    assert [reply["status"] for reply in replies] == [200] * 7, replies
    assert len({reply["claudeSessionId"] for reply in replies[:4] + replies[6:]}) == 1
    # ~20.4k input tokens a turn, ~0.061 USD each: the replies used to say 0.061, 0.123, 0.185...
    price = replies[0]["costUsd"] / priced_tokens(replies[0])
    assert [reply["costUsd"] for reply in replies] == [
        pytest.approx(price * priced_tokens(reply), rel=1e-6) for reply in replies
    ]
    assert metric == pytest.approx(sum(reply["costUsd"] for reply in replies[:6]), rel=1e-6)
