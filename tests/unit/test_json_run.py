"""``POST /run`` with a JSON reply, and ``GET /health``, in-process.

The app (:func:`claude_code_api.http.app.create_app`) is driven as hypercorn
drives an ASGI app (scope, ``receive``, ``send``), with a memory channel standing
for the dispatcher. End to end, every ``/run`` test of the service goes through
the same route as well.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from quart import Quart, jsonify

from claude_code_api.actors.dispatcher import PoolView
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.config.settings import load_settings
from claude_code_api.http.app import create_app
from claude_code_api.http.jobs import CLIENT_GONE
from claude_code_api.http.parsing import BODY_TIMEOUT_S, json_bytes
from claude_code_api.messages import (
    DispatcherMessage,
    Job,
    JobFailed,
    PoolSnapshot,
    Queued,
    RunResult,
    StatusRequest,
    Submit,
)

KEY = "sk-test"
SETTINGS_ENV = {"API_KEYS": f"alice:{KEY}"}
MAX_BODY_BYTES = 1000  # (fixed in the service: 1 MiB, and room for images)


class Exchange:
    """One request: what the client sends (``body`` chunks, then perhaps a disconnect)."""

    def __init__(self, method: str, path: str, headers: dict[str, str], chunks: list[bytes]):
        self.scope = {
            "type": "http",
            "http_version": "1.1",
            "scheme": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 4321),
            "server": ("127.0.0.1", 8000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        self.incoming: list[dict[str, Any]] = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ]
        self.disconnect = trio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.incoming:
            return self.incoming.pop(0)
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        assert self.sent[-1].get("more_body", False) is False
        return b"".join(message.get("body", b"") for message in self.sent[1:])

    def json(self) -> Any:
        return json.loads(self.body)


def post_run(body: Any, headers: dict[str, str] | None = None) -> Exchange:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    given = {"x-api-key": KEY, "content-type": "application/json"}
    given["content-length"] = str(len(raw))
    return Exchange("POST", "/run", given | (headers or {}), [raw])


def make_app(
    dispatcher: trio.MemorySendChannel[DispatcherMessage] | None = None,
    pool_view: PoolView | None = None,
) -> Any:
    """The service's app, with ``dispatcher`` standing for the dispatcher's inbox."""
    if dispatcher is None:
        dispatcher, _unused = trio.open_memory_channel[DispatcherMessage](10)
    settings = attrs.evolve(
        load_settings(SETTINGS_ENV), base_body_bytes=MAX_BODY_BYTES, max_images=0
    )
    registry, _registry_inbox = trio.open_memory_channel[Any](0)
    return create_app(settings, dispatcher, RegistryClient(registry), pool_view=pool_view)


def test_replies_are_written_as_quarts_jsonify_writes_them():
    value = {"b": [1, 2.5, None], "a": "é ✓ \u2028", "c": {"z": True, "y": "x"}}

    async def quart_bytes() -> bytes:
        app = Quart("check")
        async with app.app_context():
            return await jsonify(value).get_data()

    assert json_bytes(value) == trio.run(quart_bytes)


@pytest.mark.parametrize(
    "body, headers",
    [({"prompt": "hi", "stream": True}, {}), ({"prompt": "hi"}, {"accept": "text/event-stream"})],
)
async def test_a_stream_is_asked_for_in_the_body_or_by_accept(body, headers):
    exchange = post_run(body, headers)
    async with submitted(exchange) as job:
        await job.reply.send(Queued(0))
        await job.reply.send(RunResult(success=True, output="hello", duration_ms=3))
    assert exchange.status == 200
    assert exchange.headers[b"content-type"].startswith(b"text/event-stream")
    assert b"event: result" in exchange.body and b'"hello"' in exchange.body


@asynccontextmanager
async def submitted(exchange: Exchange) -> AsyncIterator[Job]:
    """Serve ``exchange`` with the layer; yield the job it submits, for the test to answer."""
    dispatcher, inbox = trio.open_memory_channel[DispatcherMessage](10)
    app = make_app(dispatcher)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, exchange.scope, exchange.receive, exchange.send)
            message = await inbox.receive()
            assert isinstance(message, Submit)
            yield message.job


async def test_a_json_run_is_submitted_and_answered_with_its_run_id():
    exchange = post_run({"prompt": "hi", "sessionId": "s1"})
    async with submitted(exchange) as job:
        assert (job.user_id, job.prompt, job.session_id) == ("alice", "hi", "s1")
        await job.reply.send(Queued(0))
        await job.reply.send(RunResult(success=True, output="hello", duration_ms=3))
    assert exchange.status == 200
    assert exchange.headers[b"x-run-id"] == job.id.encode()
    assert exchange.headers[b"content-type"] == b"application/json"
    reply = exchange.json()
    assert (reply["success"], reply["output"], reply["runId"]) == (True, "hello", job.id)
    assert reply["sessionId"] == "s1"
    # As README's "Result metadata" has them: the original's four fields first, then ours.
    assert list(reply) == [
        "success",
        "output",
        "durationMs",
        "timedOut",
        "runId",
        "sessionId",
        "claudeSessionId",
        "model",
        "costUsd",
        "usage",
        "numTurns",
        "queuedMs",
    ]


async def test_a_refused_run_says_when_to_retry():
    exchange = post_run({"prompt": "hi"})
    async with submitted(exchange) as job:
        await job.reply.send(JobFailed(429, "queue is full", retry_after_s=2))
    assert exchange.status == 429
    assert exchange.headers[b"retry-after"] == b"2"
    assert exchange.json() == {"error": "queue is full", "runId": job.id}


async def test_a_client_that_leaves_cancels_its_run_and_gets_no_reply():
    exchange = post_run({"prompt": "hi"})
    async with submitted(exchange) as job:
        await job.reply.send(Queued(0))
        assert not job.cancellation.requested
        exchange.disconnect.set()
    assert job.cancellation.reason == CLIENT_GONE
    assert exchange.sent == []


@pytest.mark.parametrize(
    "exchange, status, closes",
    [
        (post_run({"prompt": "hi"}, {"x-api-key": "wrong"}), 401, True),
        (post_run({"prompt": "hi"}, {"content-type": "text/html"}), 415, True),
        (post_run(b"x" * 1001), 413, True),  # said by Content-Length: unread
        (post_run({"prompt": 5}), 400, False),  # read: the connection can go on
        (
            Exchange(
                "POST",
                "/run",
                {"x-api-key": KEY, "transfer-encoding": "chunked"},
                [
                    b"x" * 600,
                    b"x" * 600,
                ],
            ),
            413,
            True,
        ),
    ],
)
async def test_bad_requests_are_json_errors_and_close_when_the_body_was_left(
    exchange, status, closes
):
    dispatcher, inbox = trio.open_memory_channel[DispatcherMessage](10)
    with trio.fail_after(5):
        await make_app(dispatcher)(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == status
    assert isinstance(exchange.json()["error"], str)
    assert (exchange.headers.get(b"connection") == b"close") is closes
    assert inbox.statistics().current_buffer_used == 0  # nothing submitted


async def test_a_body_that_does_not_arrive_in_time_is_a_408_json_error(autojump_clock):
    # README and the OpenAPI document: a body not received within 60 s is a 408.
    exchange = post_run({"prompt": "hi"})
    exchange.incoming[0]["more_body"] = True  # ... and the rest never comes
    dispatcher, inbox = trio.open_memory_channel[DispatcherMessage](10)
    with trio.fail_after(BODY_TIMEOUT_S + 1):
        await make_app(dispatcher)(exchange.scope, exchange.receive, exchange.send)
    assert trio.current_time() == pytest.approx(BODY_TIMEOUT_S)
    assert exchange.status == 408
    assert exchange.json() == {"error": "Request body not received within 60 s"}
    assert inbox.statistics().current_buffer_used == 0


async def test_an_unexpected_failure_is_a_500_json_error():
    dispatcher, inbox = trio.open_memory_channel[DispatcherMessage](10)
    inbox.close()  # the dispatcher is gone: submitting raises
    app = make_app(dispatcher)
    exchange = post_run({"prompt": "hi", "sessionId": "s1"})
    with trio.fail_after(5):
        await app(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 500
    assert exchange.json() == {"error": "internal error"}


# --- GET /health ------------------------------------------------------------------

SNAPSHOT = PoolSnapshot(
    workers=(),
    queue_length=0,
    queue_max=5,
    processed=0,
    failed=0,
    degraded_reason=None,
    draining=False,
    ever_ready=True,
)


@pytest.mark.parametrize(
    "method, headers, published",
    [
        ("GET", {}, True),
        ("GET", {"content-length": "0"}, True),
        ("GET", {"content-length": "2"}, True),  # a body, read and ignored
        ("HEAD", {}, True),
        ("GET", {}, False),  # nothing published (the dispatcher restarts): it is asked
    ],
)
async def test_health_is_answered_from_the_published_state_or_by_asking_the_dispatcher(
    method, headers, published
):
    dispatcher, inbox = trio.open_memory_channel[DispatcherMessage](10)
    view = PoolView()
    if published:
        view.source = lambda: attrs.evolve(SNAPSHOT, queue_length=3)
    app = make_app(dispatcher, pool_view=view)
    chunks = [b"{}"] if headers.get("content-length") == "2" else [b""]
    exchange = Exchange(method, "/health", headers, chunks)

    async def dispatcher_answers() -> None:
        message = await inbox.receive()
        assert isinstance(message, StatusRequest)
        await message.reply.send(attrs.evolve(SNAPSHOT, queue_length=7))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            if not published:
                nursery.start_soon(dispatcher_answers)
            await app(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 200  # (for HEAD, hypercorn drops the body)
    assert exchange.json()["queue"] == {"length": 3 if published else 7, "maxSize": 5}
    assert inbox.statistics().current_buffer_used == 0
