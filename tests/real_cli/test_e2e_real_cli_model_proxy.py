"""The model proxy, end to end: the real service, the real bundled CLI, the mock Messages API.

The mock checks that the operator's key (``MOCK_API_KEY``) arrives on every model call
(``expected_key``): agents hold a token of their own, which the proxy swaps for it.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import trio

from claude_code_api.agent.sandbox import MODEL_PROXY_SOCKET, SANDBOX_MODEL_PORT, probe_sandbox
from claude_code_api.demo.mock_messages_api import (
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from tests.support import sse
from tests.support.harness import run_service, wait_healthy
from tests.support.real_cli import MOCK_API_KEY, requires_real_cli, service_overrides

pytestmark = requires_real_cli

SANDBOX_REASON = probe_sandbox(shutil.which("bwrap"))
AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}
BUDGET_S = 150
# What an agent's Bash prints about its own credentials: its environment, its config dir,
# what its process (and its parent, the CLI) were started with.
# (The key is put together by the shell: the command itself, in a transcript, holds it not.)
LOOK = (
    'K="${MOCK%%:*}"-mock-key; '
    "env | grep -i -e anthropic -e token; "
    'grep -rl -- "$K" "$CLAUDE_CONFIG_DIR" "$HOME" 2>/dev/null | head -3; '
    "cat /proc/self/environ /proc/$PPID/environ 2>/dev/null | tr '\\0' '\\n' | grep -c -- \"$K\"; "
    "echo token=$ANTHROPIC_API_KEY base=$ANTHROPIC_BASE_URL"
)


async def bash(client, api, command: str, headers=AS_ALICE, **fields) -> str:
    api.enqueue(ToolUseReply("Bash", {"command": command}), TextReply("done"))
    reply = await client.post("/run", json={"prompt": "go", **fields}, headers=headers)
    assert reply.status_code == 200, reply.text
    return tool_result_text(api.model_calls[-1].tool_results()[0]).split("<system-reminder>")[0]


def field(output: str, name: str) -> str:
    for word in output.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"no {name}= in {output!r}")


@pytest.mark.parametrize(
    "sandbox",
    [
        pytest.param(
            "on", marks=pytest.mark.skipif(SANDBOX_REASON is not None, reason=str(SANDBOX_REASON))
        ),
        "off",
    ],
)
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_agents_never_hold_the_key_and_a_finished_agents_token_is_refused(tmp_path, sandbox):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api(expected_key=MOCK_API_KEY) as api:
            env = service_overrides(api.url, tmp_path, AGENT_SANDBOX=sandbox)
            env.update(AGENT_ENV="MOCK", MOCK="sk-ant:")  # the key's head, for LOOK
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=90)
                async with service.client(timeout=60) as client:
                    one_shot = await bash(client, api, LOOK)
                    in_session = await bash(client, api, LOOK, sessionId="s1")
                    # A stream works through the proxy, unchanged.
                    api.enqueue(TextReply("streamed words", chunk_size=3))
                    response, events = await sse.stream_run(
                        client, {**AS_ALICE, "Content-Type": "application/json"}, {"prompt": "s"}
                    )
                    deleted = await client.request(
                        "DELETE", "/session", json={"sessionId": "s1"}, headers=AS_ALICE
                    )
                    assert deleted.status_code == 200, deleted.text
                    status = (await client.get("/status", headers=AS_ALICE)).json()
                # The session's agent has ended (the session was deleted): its token is dead.
                token = field(in_session, "token")
                base = field(in_session, "base")
                # An agent in a network namespace of its own reaches the proxy by its bridge
                # (127.0.0.1:8480 there, nothing here): outside, by the socket it leads to.
                transport = None
                if base == f"http://127.0.0.1:{SANDBOX_MODEL_PORT}":
                    socket = str(service.data_dir / "run" / MODEL_PROXY_SOCKET)
                    transport = httpx.AsyncHTTPTransport(uds=socket)
                async with httpx.AsyncClient(
                    base_url=base, timeout=30, transport=transport
                ) as agent_client:
                    stolen = await agent_client.post(
                        "/v1/messages",
                        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
                        json={"model": "m", "max_tokens": 1, "messages": []},
                    )
                    forged = await agent_client.post(
                        "/v1/messages", headers={"x-api-key": "sk-made-up"}, json={}
                    )
                log = service.log_text()
    for output in (one_shot, in_session):
        assert MOCK_API_KEY not in output, output
        assert field(output, "token").startswith("ccapi-agent-"), output
        counts = [line for line in output.splitlines() if line.strip().isdigit()]
        assert counts == ["0"], output  # the key in no environ the agent can read
    assert field(one_shot, "token") != field(in_session, "token")
    assert response.status_code == 200 and events[-1].data["output"] == "streamed words"
    # Every model call carried the real key; none was refused by the mock.
    assert api.wrong_keys == [] and len(api.model_calls) >= 5
    assert {call.headers.get("x-api-key") for call in api.model_calls} == {MOCK_API_KEY}
    assert stolen.status_code == 401 and forged.status_code == 401
    assert stolen.json()["error"]["type"] == "authentication_error"
    assert "which ended" in log and "session alice/s1" in log
    # The proxy counted alice's spend from the model's answers.
    assert status["usage"]["modelCalls"] >= 5 and status["usage"]["costUsd"] > 0


async def test_a_budget_stops_one_user_and_not_another(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api(expected_key=MOCK_API_KEY) as api:
            # One mock answer costs ~$0.04 at Sonnet's prices (~14 000 input tokens).
            env = service_overrides(api.url, tmp_path, USER_DAILY_BUDGET_USD="0.01")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=90)
                async with service.client(timeout=60) as client:
                    first = await client.post("/run", json={"prompt": "a"}, headers=AS_ALICE)
                    # Over budget now: new work is refused, with Retry-After.
                    second = await client.post("/run", json={"prompt": "b"}, headers=AS_ALICE)
                    bobs = await client.post("/run", json={"prompt": "c"}, headers=AS_BOB)
                    alice = (await client.get("/status", headers=AS_ALICE)).json()["usage"]
                    bob = (await client.get("/status", headers=AS_BOB)).json()["usage"]
                    metrics = (await client.get("/metrics")).text
    assert first.status_code == 200, first.text
    assert first.json()["costUsd"] > 0.01, first.json()
    assert first.json()["usage"]["input_tokens"] > 0
    assert second.status_code == 429 and "USER_DAILY_BUDGET_USD" in second.json()["error"]
    assert 0 < int(second.headers["retry-after"]) <= 86400
    assert bobs.status_code == 200, bobs.text
    assert alice["overBudget"] is True and alice["remainingUsd"] == 0
    assert alice["costUsd"] == pytest.approx(first.json()["costUsd"])
    assert bob["costUsd"] == pytest.approx(bobs.json()["costUsd"])  # his own, apart
    assert "claude_code_api_cost_usd_total" in metrics


async def test_a_running_turns_next_model_call_is_refused_once_the_budget_is_spent(tmp_path):
    """A tool call's turn makes two model calls: the first spends the budget, the second
    is refused by the proxy, and the turn ends with the budget named (429)."""
    with trio.fail_after(BUDGET_S):
        async with open_mock_api(expected_key=MOCK_API_KEY) as api:
            env = service_overrides(api.url, tmp_path, USER_DAILY_BUDGET_USD="0.01")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=90)
                api.enqueue(ToolUseReply("Bash", {"command": "echo hi"}), TextReply("never"))
                async with service.client(timeout=60) as client:
                    started = trio.current_time()
                    reply = await client.post(
                        "/run", json={"prompt": "a", "timeoutMs": 120_000}, headers=AS_ALICE
                    )
                    took = trio.current_time() - started
                    metrics = (await client.get("/metrics")).text
    assert reply.status_code == 429, reply.text
    assert "claude_code_api_budget_refusals_total 1.0" in metrics
    assert "claude_code_api_users_over_budget 1.0" in metrics
    assert "daily model budget" in reply.json()["error"]
    assert took < 30  # not the CLI's minutes of retries
    assert len(api.model_calls) == 1  # the second call never reached the model


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (AGENT_UID)")
async def test_an_unsandboxed_agent_as_agent_uid_cannot_read_the_services_environ(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api(expected_key=MOCK_API_KEY) as api:
            env = service_overrides(api.url, tmp_path, AGENT_SANDBOX="off")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=90)
                async with service.client(timeout=60) as client:
                    output = await bash(
                        client,
                        api,
                        f"cat /proc/{service.pid}/environ >/dev/null 2>&1 && echo read=yes"
                        " || echo read=no; id -u",
                    )
    assert "read=no" in output, output
