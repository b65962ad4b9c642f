"""The mock Messages API on its own, over real HTTP (no CLI needed)."""

from __future__ import annotations

import json
from functools import partial

import httpx
import pytest
import trio

from claude_code_api.demo.mock_messages_api import ApiError, TextReply, ToolUseReply, open_mock_api

BUDGET_S = 10


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def messages_body(text: str = "hi", *, stream: bool = False) -> dict:
    return {
        "model": "claude-test",
        "max_tokens": 100,
        "stream": stream,
        "system": [{"type": "text", "text": "You are a test."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    }


async def test_streamed_text_reply_has_the_anthropic_event_sequence():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            api.enqueue(TextReply("Hello there", chunk_size=5))
            response = await http.post("/v1/messages?beta=true", json=messages_body(stream=True))

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = parse_sse(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["model"] == "claude-test"
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == (
        "Hello there"
    )
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"]["output_tokens"] > 0
    (call,) = api.model_calls
    assert (call.path, call.status, call.completed, call.disconnected) == (
        "/v1/messages",
        200,
        True,
        False,
    )
    assert call.system_text() == "You are a test."


async def test_tool_use_reply_streams_input_json_and_stops_for_the_tool():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            api.enqueue(ToolUseReply("Bash", {"command": "ls"}, text="Let me look."))
            response = await http.post("/v1/messages", json=messages_body(stream=True))

    events = parse_sse(response.text)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "Bash" and starts[1]["id"].startswith("toolu_")
    (tool_delta,) = [
        d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 1
    ]
    assert json.loads(tool_delta["partial_json"]) == {"command": "ls"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_plain_json_reply_and_default_echo():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            response = await http.post("/v1/messages", json=messages_body("ping"))

    assert response.status_code == 200
    message = response.json()
    assert message["content"] == [{"type": "text", "text": "echo: ping"}]
    assert (message["type"], message["role"], message["stop_reason"]) == (
        "message",
        "assistant",
        "end_turn",
    )


async def test_errors_for_n_calls_then_the_script_goes_on():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            api.enqueue(ApiError(529, times=2), ApiError(401), TextReply("finally"))
            responses = [await http.post("/v1/messages", json=messages_body()) for _ in range(5)]

    assert [r.status_code for r in responses] == [529, 529, 401, 200, 200]
    assert responses[0].json()["error"]["type"] == "overloaded_error"
    assert responses[0].json()["type"] == "error"
    assert responses[2].json()["error"]["type"] == "authentication_error"
    assert responses[3].json()["content"][0]["text"] == "finally"
    assert responses[4].json()["content"][0]["text"] == "echo: hi"


async def test_an_error_forever_stays_until_the_script_is_cleared():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            api.enqueue(ApiError(500, "down", times=None, headers=(("x-should-retry", "false"),)))
            statuses = [(await http.post("/v1/messages", json=messages_body())) for _ in range(3)]
            api.clear_script()
            after = await http.post("/v1/messages", json=messages_body())

    assert [r.status_code for r in statuses] == [500, 500, 500]
    assert statuses[0].json()["error"]["message"] == "down"
    assert statuses[0].headers["x-should-retry"] == "false"
    assert after.status_code == 200


async def test_count_tokens_and_unknown_routes():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            counted = await http.post("/v1/messages/count_tokens", json=messages_body())
            missing = await http.get("/v1/models")

    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    assert api.model_calls == []  # neither is a model call
    assert [r.path for r in api.requests] == ["/v1/messages/count_tokens", "/v1/models"]


async def test_a_client_leaving_mid_stream_is_recorded_not_raised():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            api.enqueue(TextReply("z" * 100, chunk_size=1, chunk_delay=0.05))
            async with httpx.AsyncClient(base_url=api.url) as http:
                request = http.build_request(
                    "POST", "/v1/messages", json=messages_body(stream=True)
                )
                response = await http.send(request, stream=True)
                async for _ in response.aiter_bytes():
                    break  # the first bytes arrived: hang up
                await response.aclose()
            await api.wait_until(lambda: api.model_calls[0].disconnected)
            # The server lives on.
            async with httpx.AsyncClient(base_url=api.url) as http:
                again = await http.post("/v1/messages", json=messages_body())

    first = api.model_calls[0]
    assert (first.disconnected, first.completed) == (True, False)
    assert again.status_code == 200


async def test_a_client_leaving_before_the_first_byte_is_noticed_at_once():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            api.enqueue(TextReply("never", first_byte_delay=float("inf")))
            async with httpx.AsyncClient(base_url=api.url) as http, trio.open_nursery() as nursery:
                nursery.start_soon(partial(http.post, "/v1/messages", json=messages_body()))
                await api.wait_for_model_calls(1)
                nursery.cancel_scope.cancel()  # the client gives up and closes its socket
            with trio.fail_after(2):
                await api.wait_until(lambda: api.model_calls[0].disconnected)


async def test_keep_alive_serves_requests_in_turn_on_one_connection():
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with httpx.AsyncClient(base_url=api.url) as http:
                for n in range(3):
                    response = await http.post("/v1/messages", json=messages_body(f"n{n}"))
                    assert response.json()["content"][0]["text"] == f"echo: n{n}"
            # A malformed request gets a 400 and the connection is closed.
            stream = await trio.open_tcp_stream(api.host, api.port)
            await stream.send_all(b"NOT HTTP\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
            await stream.aclose()

    assert reply.startswith(b"HTTP/1.1 400 ")
    assert [r.last_user_text() for r in api.model_calls] == ["n0", "n1", "n2"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 529])
async def test_error_bodies_are_anthropic_shaped(status):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            api.enqueue(ApiError(status))
            response = await http.post("/v1/messages", json=messages_body(stream=True))

    assert response.status_code == status
    body = response.json()
    assert set(body) == {"type", "error", "request_id"}
    assert set(body["error"]) == {"type", "message"}
    assert response.headers["request-id"] == body["request_id"]


async def test_head_and_any_other_request_are_answered_and_the_server_lives_on():
    # The CLI's first request is a HEAD (`/api/hello` for 2.1.331, unless
    # CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC): a 404 with a body there once killed the mock
    # (h11: "Too much data for declared Content-Length"), and every later call then waited
    # for minutes of the CLI's retries.
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, httpx.AsyncClient(base_url=api.url) as http:
            head = await http.head("/")
            head_missing = await http.head("/api/hello")
            root = await http.get("/")
            other = [
                await http.request(method, path)
                for method, path in [
                    ("GET", "/v1/models"),
                    ("OPTIONS", "/v1/messages"),
                    ("DELETE", "/api/anything"),
                    ("PUT", "/v1/messages"),
                ]
            ]
            stream = await trio.open_tcp_stream(api.host, api.port)
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            garbage = await stream.receive_some(4096)
            await stream.aclose()
            after = await http.post("/v1/messages", json=messages_body("still there?"))

    assert head.status_code == 200 and head.content == b""
    assert head_missing.status_code == 404 and head_missing.content == b""
    assert root.status_code == 200
    assert [r.status_code for r in other] == [404, 404, 404, 404]
    assert all(r.json()["type"] == "error" for r in other)
    assert garbage.startswith(b"HTTP/1.1 400")
    assert after.status_code == 200
    assert after.json()["content"][0]["text"] == "echo: still there?"
