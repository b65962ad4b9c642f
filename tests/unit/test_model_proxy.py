"""The model proxy against the mock Messages API, driven by an HTTP client as an agent's CLI.

Fast: no CLI. What the real CLI does through it is in test_e2e_real_cli_model_proxy.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from claude_code_api.agent.protocol import Charge
from claude_code_api.demo.mock_messages_api import (
    ApiError,
    MockMessagesApi,
    TextReply,
    open_mock_api,
)
from claude_code_api.limits.usage import UsageLedger
from claude_code_api.proxy.model import (
    SANDBOX_MODEL_PORT,
    ModelProxy,
    UpstreamCredential,
    model_env,
)

KEY = "sk-ant-the-real-key"
BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


@asynccontextmanager
async def proxied(
    tmp_path: Path, ledger: UsageLedger | None = None, upstream: str | None = None
) -> AsyncIterator[tuple[MockMessagesApi, ModelProxy]]:
    async with open_mock_api(expected_key=KEY) as api, trio.open_nursery() as nursery:
        proxy = ModelProxy(
            tmp_path / "run",
            upstream or api.url,
            UpstreamCredential.from_environment({"ANTHROPIC_API_KEY": KEY}),
            ledger,
        )
        await nursery.start(proxy.serve)
        try:
            yield api, proxy
        finally:
            nursery.cancel_scope.cancel()
            await proxy.aclose()


def agent_client(proxy: ModelProxy, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=proxy.address(in_netns=False), headers={"x-api-key": token}, timeout=10
    )


async def test_a_live_agents_token_reaches_the_model_with_the_real_key_and_no_other(tmp_path):
    with trio.fail_after(20):
        async with proxied(tmp_path) as (api, proxy):
            token, grant = proxy.grants.register("worker-0 (a)")
            async with agent_client(proxy, token) as client:
                api.enqueue(TextReply("hello"))
                answer = await client.post("/v1/messages?beta=true", json=BODY)
                counted = await client.post("/v1/messages/count_tokens", json=BODY)
            async with agent_client(proxy, KEY) as client:  # the real key itself is no token
                refused = await client.post("/v1/messages", json=BODY)
    assert answer.status_code == 200 and answer.json()["content"][0]["text"] == "hello"
    assert counted.status_code == 200
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert [call.headers["x-api-key"] for call in api.requests] == [KEY, KEY]
    assert api.requests[0].target == "/v1/messages?beta=true"
    assert grant.calls == 2


async def test_a_token_used_after_its_agent_ended_is_refused_and_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "claude_code_api.proxy.model")
    with trio.fail_after(20):
        async with proxied(tmp_path) as (api, proxy):
            token, grant = proxy.grants.register("session alice/s1 (b)")
            grant.charge = Charge("alice", "run-1", "s1")
            proxy.grants.revoke(grant)
            async with agent_client(proxy, token) as client:
                refused = await client.post("/v1/messages", json=BODY)
                again = await client.post("/v1/messages", json=BODY)  # same connection
    assert refused.status_code == again.status_code == 401
    assert "ended" in refused.json()["error"]["message"]
    assert api.requests == []
    assert "session alice/s1 (b) (user alice), which ended" in caplog.text


async def test_a_stream_comes_back_byte_for_byte_and_its_usage_is_counted(tmp_path):
    ledger = UsageLedger()
    with trio.fail_after(20):
        async with proxied(tmp_path, ledger) as (api, proxy):
            token, grant = proxy.grants.register("worker-0 (c)")
            grant.charge = Charge("alice", "run-1")
            api.enqueue(TextReply("one two three", chunk_size=4))
            async with agent_client(proxy, token) as client:
                async with client.stream(
                    "POST", "/v1/messages", json={**BODY, "stream": True}
                ) as response:
                    streamed = b"".join([chunk async for chunk in response.aiter_raw()])
            async with httpx.AsyncClient(base_url=api.url, headers={"x-api-key": KEY}) as direct:
                api.enqueue(TextReply("one two three", chunk_size=4))
                expected = (
                    await direct.post("/v1/messages", json={**BODY, "stream": True})
                ).content
    events = [line for line in streamed.split(b"\n") if line.startswith(b"event:")]
    assert response.headers["content-type"] == "text/event-stream"
    assert len(events) == len([ln for ln in expected.split(b"\n") if ln.startswith(b"event:")])
    # (Ids differ from one answer to the next; the rest is the same.)
    assert streamed.replace(b"mock000", b"").count(b"text_delta") == 4
    spend, refused = ledger.take_run("run-1")
    assert spend is not None and not refused
    assert spend.tokens["output_tokens"] > 0 and spend.tokens["input_tokens"] > 0
    assert spend.cost_usd > 0 and ledger.spent_today("alice") == spend.cost_usd


async def test_a_warming_agents_call_is_answered_here_and_never_reaches_the_model(tmp_path):
    ledger = UsageLedger()
    with trio.fail_after(20):
        async with proxied(tmp_path, ledger) as (api, proxy):
            token, grant = proxy.grants.register("worker-0 (w)")
            grant.warming = True
            async with agent_client(proxy, token) as client:
                plain = await client.post("/v1/messages?beta=true", json=BODY)
                async with client.stream(
                    "POST", "/v1/messages", json={**BODY, "stream": True}
                ) as response:
                    streamed = b"".join([chunk async for chunk in response.aiter_raw()])
                other = await client.post("/v1/messages/count_tokens", json=BODY)
                grant.warming = False  # warm: its calls go to the model API again
                api.enqueue(TextReply("hello"))
                forwarded = await client.post("/v1/messages", json=BODY)
    assert plain.status_code == 200
    assert plain.json()["content"] == [{"type": "text", "text": "ok"}]
    assert plain.json()["model"] == BODY["model"] and plain.json()["stop_reason"] == "end_turn"
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = [
        line.split(b": ", 1)[1] for line in streamed.split(b"\n") if line.startswith(b"event:")
    ]
    assert events[0] == b"message_start" and events[-1] == b"message_stop"
    assert b'"text_delta", "text": "ok"' in streamed
    assert other.status_code == 403
    assert forwarded.json()["content"][0]["text"] == "hello"
    assert len(api.requests) == 1  # the warm-up's calls never left the service
    assert ledger.take_run("run-1") == (None, False) and grant.calls == 4


async def test_model_api_errors_pass_through_unchanged(tmp_path):
    with trio.fail_after(20):
        async with proxied(tmp_path) as (api, proxy):
            token, _ = proxy.grants.register("worker-0 (d)")
            api.enqueue(ApiError(529), ApiError(401, "invalid x-api-key"))
            async with agent_client(proxy, token) as client:
                overloaded = await client.post("/v1/messages", json=BODY)
                unauthorized = await client.post("/v1/messages", json=BODY)
    assert overloaded.status_code == 529
    assert overloaded.json()["error"]["type"] == "overloaded_error"
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["message"] == "invalid x-api-key"


async def test_an_unreachable_model_api_is_a_connection_error_as_without_the_proxy(
    tmp_path, caplog
):
    caplog.set_level(logging.WARNING, "claude_code_api.proxy.model")
    with trio.fail_after(20):
        # (A port nothing listens on.)
        async with proxied(tmp_path, upstream="http://127.0.0.1:9") as (_api, proxy):
            token, _ = proxy.grants.register("worker-0 (e)")
            async with agent_client(proxy, token) as client:
                with pytest.raises(httpx.TransportError):
                    await client.post("/v1/messages", json=BODY)
    # A warning saying so, and no fault: the proxy did what it should.
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "unreachable" in caplog.records[0].getMessage()


async def test_an_agent_gone_mid_answer_is_no_fault_and_the_next_call_is_served(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "claude_code_api.proxy.model")
    with trio.fail_after(20):
        async with proxied(tmp_path) as (api, proxy):
            token, _ = proxy.grants.register("worker-0 (i)")
            api.enqueue(TextReply("a slow answer " * 20, chunk_size=8, chunk_delay=0.05))
            async with agent_client(proxy, token) as client:
                async with client.stream(
                    "POST", "/v1/messages", json={**BODY, "stream": True}
                ) as response:
                    async for _ in response.aiter_raw():
                        break  # the agent is killed with the answer half sent
            await api.wait_until(lambda: api.requests[0].disconnected)
            api.enqueue(TextReply("next"))
            async with agent_client(proxy, token) as client:
                answer = await client.post("/v1/messages", json=BODY)
    assert answer.status_code == 200 and answer.json()["content"][0]["text"] == "next"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_agent_that_hangs_up_while_the_model_thinks_cancels_the_call(tmp_path):
    with trio.fail_after(20):
        async with proxied(tmp_path) as (api, proxy):
            token, _ = proxy.grants.register("worker-0 (f)")
            api.enqueue(TextReply("late", first_byte_delay=30))
            async with agent_client(proxy, token) as client:
                with trio.move_on_after(1):
                    await client.post("/v1/messages", json=BODY)
            await api.wait_until(lambda: bool(api.requests) and api.requests[0].disconnected)


async def test_over_budget_a_users_model_call_is_refused_not_anothers(tmp_path):
    ledger = UsageLedger(budget_usd=0.000001)
    with trio.fail_after(20):
        async with proxied(tmp_path, ledger) as (api, proxy):
            alice, alice_grant = proxy.grants.register("worker-0 (g)")
            bob, bob_grant = proxy.grants.register("worker-1 (h)")
            alice_grant.charge = Charge("alice", "run-a")
            bob_grant.charge = Charge("bob", "run-b")
            async with agent_client(proxy, alice) as client:
                spent = await client.post("/v1/messages", json=BODY)
                refused = await client.post("/v1/messages", json=BODY)
            async with agent_client(proxy, bob) as client:
                bobs = await client.post("/v1/messages", json=BODY)
    assert spent.status_code == 200 and bobs.status_code == 200
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false"
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    assert "USER_DAILY_BUDGET_USD" in refused.json()["error"]["message"]
    assert ledger.take_run("run-a")[1] is True and ledger.take_run("run-b")[1] is False
    assert len(api.model_calls) == 2


async def test_the_unix_socket_serves_as_the_tcp_port_does(tmp_path):
    with trio.fail_after(20):
        async with proxied(tmp_path) as (_api, proxy):
            token, _ = proxy.grants.register("worker-0 (i)")
            transport = httpx.AsyncHTTPTransport(uds=str(proxy.socket_path))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://model", headers={"x-api-key": token}
            ) as client:
                answer = await client.post("/v1/messages", json=BODY)
    assert answer.status_code == 200
    assert not proxy.socket_path.exists()  # removed when the proxy closed


def test_an_agents_environment_names_the_proxy_and_its_token_only():
    env = model_env("ccapi-agent-x", f"http://127.0.0.1:{SANDBOX_MODEL_PORT}")
    assert env == {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8480",
        "ANTHROPIC_API_KEY": "ccapi-agent-x",
        "ANTHROPIC_AUTH_TOKEN": "",
        "CLAUDE_CODE_OAUTH_TOKEN": "",
    }
    assert json.dumps(env).count("sk-ant") == 0


def test_a_login_goes_on_as_a_bearer_with_the_oauth_beta_the_cli_sends_for_it():
    credential = UpstreamCredential.for_service({}, use_api_key=False)
    assert credential.method == "oauth" and credential.apply([]) is None  # no login yet
    credential.update("the-access-token")
    beta = (b"anthropic-beta", b"claude-code-20250219,effort-2025-11-24")
    assert credential.apply([beta, (b"x-app", b"cli")]) == [
        (b"anthropic-beta", b"claude-code-20250219,effort-2025-11-24,oauth-2025-04-20"),
        (b"x-app", b"cli"),
        (b"authorization", b"Bearer the-access-token"),
    ]
    assert credential.apply([]) == [
        (b"anthropic-beta", b"oauth-2025-04-20"),
        (b"authorization", b"Bearer the-access-token"),
    ]
    setup_token = UpstreamCredential.for_service({"CLAUDE_CODE_OAUTH_TOKEN": "long"}, False)
    setup_token.update(None)  # (the file's login does not replace it)
    assert setup_token.apply([])[-1] == (b"authorization", b"Bearer long")
    keyed = UpstreamCredential.for_service({"ANTHROPIC_API_KEY": "k"}, use_api_key=True)
    assert keyed.apply([]) == [(b"x-api-key", b"k")]
    # (Without USE_CLAUDE_API_KEY the service's key is not used: the login is.)
    assert UpstreamCredential.for_service({"ANTHROPIC_API_KEY": "k"}, False).method == "oauth"


async def test_without_credentials_the_proxy_says_what_to_do_and_remembers_refusals(tmp_path):
    with trio.fail_after(20):
        async with open_mock_api(expected_key="the-access-token") as api:
            credential = UpstreamCredential.for_service({}, use_api_key=False)
            proxy = ModelProxy(tmp_path / "run", api.url, credential)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                token, _ = proxy.grants.register("worker-0 (j)")
                async with agent_client(proxy, token) as client:
                    none_yet = await client.post("/v1/messages", json=BODY)
                    credential.update("a-stale-token")
                    refused = await client.post("/v1/messages", json=BODY)
                    seen = proxy.last_refusal
                    credential.update("the-access-token")
                    fine = await client.post("/v1/messages", json=BODY)
                nursery.cancel_scope.cancel()
            await proxy.aclose()
    assert none_yet.status_code == 401 and "claude-code-api login" in none_yet.text
    assert refused.status_code == 401 and fine.status_code == 200
    assert seen is not None and seen.status == 401 and "wrong or missing key" in seen.message
    assert proxy.last_refusal is None  # a call went through since
    assert len(api.model_calls) == 2
