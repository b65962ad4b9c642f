"""A scriptable mock of the Anthropic Messages API on 127.0.0.1, for the real CLI.

The bundled Claude Code CLI talks to ``$ANTHROPIC_BASE_URL``; pointing that at
this server lets tests and benchmarks drive the real CLI with no network and no
credentials. It serves:

* ``POST /v1/messages`` — an SSE stream when the body says ``"stream": true``
  (``message_start``, ``content_block_start``/``_delta``/``_stop`` per block,
  ``message_delta`` with ``stop_reason`` and usage, ``message_stop``), plain
  JSON otherwise;
* ``POST /v1/messages/count_tokens`` — ``{"input_tokens": N}``;
* ``/`` — 200 (the CLI's first request is ``HEAD /``); anything else — 404 with an
  Anthropic-shaped error body. A ``HEAD`` gets the headers alone. Whatever a client
  sends, the server answers or hangs up on that one connection, and goes on.

What the model calls answer is scripted: :meth:`MockMessagesApi.enqueue` adds
steps (:class:`TextReply`, :class:`ToolUseReply`, :class:`ApiError`), each
``/v1/messages`` call takes the next one, and an empty script falls back to
``default`` (by default an echo of the last user text). Every request is
recorded in ``requests`` — so a test can read the ``tool_result`` that the CLI
sent back, or the system prompt — and a client that hangs up during a reply
is recorded as ``disconnected`` instead of raising.

Use inside trio (tests, benchmarks)::

    async with open_mock_api() as api:
        api.enqueue(ToolUseReply("Bash", {"command": "echo hi"}), TextReply("done"))
        env = {"ANTHROPIC_BASE_URL": api.url, ...}
        ...
        assert api.model_calls[1].tool_results()[0]["content"] == "hi"

Use from outside (a shell, a script in another language, a service under
test)::

    python -m claude_code_api.demo.mock_messages_api --port 8999 [--first-byte-delay S] [--chunk-delay S]

which prints ``listening on http://127.0.0.1:PORT`` and echoes forever.

Why a small HTTP/1.1 server on h11 and not hypercorn: the mock must notice a
client that hangs up *while it is waiting* (so tests can see the CLI abort its
call on an interrupt), stop at once when its nursery is cancelled (no graceful
drain of keep-alive connections), and have no framework timeouts that cut long
streams. Over h11 (already installed with hypercorn) all three are a few
explicit lines. It serves one request at a time per connection, with keep-alive,
which is what the CLI's HTTP client does.

Error handling: a malformed request gets a 400 and its connection is closed; a
client that disconnects is recorded and never raises into the caller's nursery.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024
RECEIVE_CHUNK = 65536

# The error "type" the real API puts in its body for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# --- scripted steps -----------------------------------------------------------------


@attrs.frozen
class TextReply:
    """A text answer with ``stop_reason`` ``end_turn``.

    ``first_byte_delay`` waits before the response headers (``math.inf``: never
    answer); ``chunk_size``/``chunk_delay`` split the text into deltas with
    pauses between them (slow streaming).
    """

    text: str
    first_byte_delay: float = 0.0
    chunk_size: int | None = None
    chunk_delay: float = 0.0


@attrs.frozen
class ToolUseReply:
    """A ``tool_use`` block (optionally after some text), ``stop_reason`` ``tool_use``.

    The CLI runs the tool and sends its ``tool_result`` in the next request.
    """

    name: str
    input: dict[str, Any]
    text: str | None = None
    tool_use_id: str | None = None
    first_byte_delay: float = 0.0


@attrs.frozen
class ApiError:
    """An HTTP error with an Anthropic-shaped body, for ``times`` calls (None: forever)."""

    status: int
    message: str | None = None
    times: int | None = 1
    headers: tuple[tuple[str, str], ...] = ()
    first_byte_delay: float = 0.0

    def body(self, request_id: str) -> dict[str, Any]:
        error_type = ERROR_TYPES.get(self.status, "api_error")
        message = self.message or f"mock {error_type} ({self.status})"
        return {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }


Step = TextReply | ToolUseReply | ApiError


# --- recorded requests --------------------------------------------------------------


@attrs.define
class RecordedRequest:
    """One request as the mock saw it, and what became of its answer."""

    number: int
    method: str
    target: str  # with the query string, e.g. "/v1/messages?beta=true"
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes if the body was not JSON
    step: Step | None = None  # what a /v1/messages call was answered with
    status: int | None = None
    disconnected: bool = False  # the client hung up before the answer was complete
    completed: bool = False

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", []) if isinstance(self.body, dict) else []

    def system_text(self) -> str:
        """The system prompt, joined into one string whether sent as str or blocks."""
        system = self.body.get("system", "") if isinstance(self.body, dict) else ""
        return system if isinstance(system, str) else "\n".join(_texts(system))

    def all_text(self) -> str:
        """Every text in the system prompt and all messages (to look for CLAUDE.md etc.)."""
        parts = [self.system_text()]
        for message in self.messages:
            content = message.get("content")
            parts.extend([content] if isinstance(content, str) else _texts(content or []))
        return "\n".join(parts)

    def last_user_text(self) -> str:
        """The text of the last user message (its last text block)."""
        for message in reversed(self.messages):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                return content
            texts = _texts(content or [])
            if texts:
                return texts[-1]
        return ""

    def tool_results(self) -> list[dict[str, Any]]:
        """The ``tool_result`` blocks of the last user message, in order."""
        for message in reversed(self.messages):
            if message.get("role") == "user" and isinstance(message.get("content"), list):
                return [b for b in message["content"] if b.get("type") == "tool_result"]
        return []


def _texts(blocks: list[Any]) -> list[str]:
    return [b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text"]


def tool_result_text(block: dict[str, Any]) -> str:
    """The text of a ``tool_result`` block, whether its content is a str or blocks."""
    content = block.get("content", "")
    return content if isinstance(content, str) else "\n".join(_texts(content))


def echo(request: RecordedRequest) -> Step:
    """The default answer: ``echo: <last user text>``."""
    return TextReply(f"echo: {request.last_user_text()}")


# --- the server ---------------------------------------------------------------------


@attrs.define(eq=False)
class MockMessagesApi:
    """The mock's state: its script, its default answer and what it has seen.

    Owns no tasks itself; :func:`open_mock_api` serves it.
    """

    host: str = ""
    port: int = 0
    default: Callable[[RecordedRequest], Step] = echo
    # The credential every model call must carry (x-api-key, or a bearer token); a call
    # without it is answered 401 and kept in ``wrong_keys``. None: anything goes.
    expected_key: str | None = None
    requests: list[RecordedRequest] = attrs.Factory(list)
    wrong_keys: list[RecordedRequest] = attrs.Factory(list)
    _script: list[Step] = attrs.Factory(list)
    _error_repeats: dict[int, int] = attrs.Factory(dict)
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    @property
    def url(self) -> str:
        """The base URL, for ``ANTHROPIC_BASE_URL``."""
        return f"http://{self.host}:{self.port}"

    # - for tests -

    def enqueue(self, *steps: Step) -> None:
        """Append steps; each ``/v1/messages`` call takes the next one."""
        self._script.extend(steps)

    def clear_script(self) -> None:
        self._script.clear()

    @property
    def pending_steps(self) -> int:
        return len(self._script)

    @property
    def model_calls(self) -> list[RecordedRequest]:
        """The ``POST /v1/messages`` requests, in arrival order."""
        return [r for r in self.requests if r.path == "/v1/messages"]

    async def wait_for_requests(self, count: int) -> list[RecordedRequest]:
        """Return once at least ``count`` requests (of any kind) have arrived."""
        while len(self.requests) < count:
            await self._changed.park()
        return self.requests

    async def wait_for_model_calls(self, count: int) -> list[RecordedRequest]:
        """Return once at least ``count`` model calls have arrived."""
        while len(self.model_calls) < count:
            await self._changed.park()
        return self.model_calls

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked after every request event."""
        while not predicate():
            await self._changed.park()

    # - for the server -

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_mock{next(self._ids):06d}"

    def _take_step(self, request: RecordedRequest) -> Step:
        if not self._script:
            return self.default(request)
        step = self._script[0]
        if isinstance(step, ApiError):
            if step.times is None:
                return step  # forever: stays at the head of the script
            served = self._error_repeats.get(id(step), 0) + 1
            if served < step.times:
                self._error_repeats[id(step)] = served
                return step
            self._error_repeats.pop(id(step), None)
        self._script.pop(0)
        return step

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self._notify()

    def _notify(self) -> None:
        self._changed.unpark_all()


class _ClientGone(Exception):
    """The client closed its side of the connection."""


@asynccontextmanager
async def open_mock_api(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    default: Callable[[RecordedRequest], Step] = echo,
    expected_key: str | None = None,
) -> AsyncIterator[MockMessagesApi]:
    """Serve a :class:`MockMessagesApi` on ``host`` (a random port by default).

    Resource handling: the listener and every connection live in a nursery
    that is cancelled when the block exits, so open keep-alive connections and
    replies still streaming never delay the exit.
    """
    api = MockMessagesApi(default=default, expected_key=expected_key)
    async with trio.open_nursery() as nursery:
        handler = partial(_serve_connection, api)
        listeners = await nursery.start(partial(trio.serve_tcp, handler, port, host=host))
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        api.host, api.port = bound_host, bound_port
        try:
            yield api
        finally:
            nursery.cancel_scope.cancel()


async def _serve_connection(api: MockMessagesApi, stream: trio.SocketStream) -> None:
    """Answer requests on one connection until the client closes it."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        while True:
            incoming = await _read_request(connection, stream)
            if incoming is None:
                return
            request, body_bytes = incoming
            await _answer(api, connection, stream, request, body_bytes)
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    except h11.RemoteProtocolError:
        # A malformed request: answer 400 if we still can, then hang up.
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = _error_json(400, "invalid_request_error", "malformed HTTP request")
            try:
                await _send_all(connection, stream, _json_response(400, body))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    except Exception:
        # A bug answering one request costs that connection, never the server (its listener
        # and every other connection share a nursery with this one).
        log.exception("mock Messages API: request failed; connection closed")
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


async def _read_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body, or None when the client closed the connection."""
    request = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data and request is None and not connection.trailing_data[0]:
                return None
            connection.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BYTES:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _answer(
    api: MockMessagesApi,
    connection: h11.Connection,
    stream: trio.SocketStream,
    request: h11.Request,
    body_bytes: bytes,
) -> None:
    try:
        body: Any = json.loads(body_bytes) if body_bytes else None
    except ValueError:
        body = body_bytes
    recorded = RecordedRequest(
        number=len(api.requests) + 1,
        method=request.method.decode(),
        target=request.target.decode(),
        headers={k.decode().lower(): v.decode(errors="replace") for k, v in request.headers},
        body=body,
    )
    api._record(recorded)
    async with trio.open_nursery() as nursery:
        # While answering, watch the socket: an EOF means the client hung up
        # (e.g. the CLI aborted its call on an interrupt), even during a delay.
        nursery.start_soon(_watch_for_hangup, connection, stream, recorded, nursery.cancel_scope)
        try:
            await _respond(api, connection, stream, recorded)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            recorded.disconnected = True
        nursery.cancel_scope.cancel()
    if not recorded.completed:
        recorded.disconnected = True
    api._notify()
    if recorded.disconnected:
        raise _ClientGone


async def _watch_for_hangup(
    connection: h11.Connection,
    stream: trio.SocketStream,
    recorded: RecordedRequest,
    scope: trio.CancelScope,
) -> None:
    try:
        while data := await stream.receive_some(RECEIVE_CHUNK):
            connection.receive_data(data)  # an early next request: h11 keeps it for later
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if connection.our_state in (h11.DONE, h11.MUST_CLOSE):
        return  # the whole answer was handed over before the client closed
    recorded.disconnected = True
    scope.cancel()


async def _respond(
    api: MockMessagesApi,
    connection: h11.Connection,
    stream: trio.SocketStream,
    recorded: RecordedRequest,
) -> None:
    body = recorded.body if isinstance(recorded.body, dict) else {}
    if recorded.path.startswith("/v1/") and not _has_key(api, recorded):
        api.wrong_keys.append(recorded)
        recorded.status = 401
        error = _error_json(401, "authentication_error", "mock: wrong or missing key")
        await _send_all(connection, stream, _json_response(401, error))
    elif recorded.method == "POST" and recorded.path == "/v1/messages/count_tokens":
        recorded.status = 200
        tokens = _estimate_tokens(body)
        await _send_all(connection, stream, _json_response(200, {"input_tokens": tokens}))
    elif recorded.method == "POST" and recorded.path == "/v1/messages":
        step = api._take_step(recorded)
        recorded.step = step
        await trio.sleep(step.first_byte_delay)  # math.inf: never answer
        if isinstance(step, ApiError):
            recorded.status = step.status
            error = step.body(api._next_id("req"))
            await _send_all(
                connection,
                stream,
                _json_response(step.status, error, extra_headers=step.headers),
            )
        elif body.get("stream"):
            recorded.status = 200
            await _stream_message(api, connection, stream, step, body)
        else:
            recorded.status = 200
            message = _message_json(api, step, body)
            await _send_all(connection, stream, _json_response(200, message))
    else:
        # Anything else the CLI (or a probe) asks, e.g. its first request, `HEAD /`: answered,
        # never fatal. A HEAD answer has the headers of the GET one and no body (h11 refuses one).
        if recorded.path == "/":
            recorded.status, reply = 200, {"type": "mock", "messages": "/v1/messages"}
        else:
            recorded.status = 404
            reply = _error_json(404, "not_found_error", f"mock: no route {recorded.target}")
        events = _json_response(recorded.status, reply)
        if recorded.method == "HEAD":
            events = [event for event in events if not isinstance(event, h11.Data)]
        await _send_all(connection, stream, events)
    recorded.completed = True


def _has_key(api: MockMessagesApi, recorded: RecordedRequest) -> bool:
    if api.expected_key is None:
        return True
    return api.expected_key in (
        recorded.headers.get("x-api-key"),
        recorded.headers.get("authorization", "").removeprefix("Bearer "),
    )


# --- response bodies ----------------------------------------------------------------


def _estimate_tokens(body: dict[str, Any]) -> int:
    return max(1, len(json.dumps(body)) // 4)


def _blocks(api: MockMessagesApi, step: TextReply | ToolUseReply) -> list[dict[str, Any]]:
    if isinstance(step, TextReply):
        return [{"type": "text", "text": step.text}]
    blocks: list[dict[str, Any]] = []
    if step.text:
        blocks.append({"type": "text", "text": step.text})
    tool_use_id = step.tool_use_id or api._next_id("toolu")
    blocks.append({"type": "tool_use", "id": tool_use_id, "name": step.name, "input": step.input})
    return blocks


def _stop_reason(step: TextReply | ToolUseReply) -> str:
    return "tool_use" if isinstance(step, ToolUseReply) else "end_turn"


def _usage(body: dict[str, Any], output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": _estimate_tokens(body),
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message_json(
    api: MockMessagesApi, step: TextReply | ToolUseReply, body: dict[str, Any]
) -> dict[str, Any]:
    blocks = _blocks(api, step)
    return {
        "id": api._next_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "mock-model"),
        "content": blocks,
        "stop_reason": _stop_reason(step),
        "stop_sequence": None,
        "usage": _usage(body, max(1, len(json.dumps(blocks)) // 4)),
    }


async def _stream_message(
    api: MockMessagesApi,
    connection: h11.Connection,
    stream: trio.SocketStream,
    step: TextReply | ToolUseReply,
    body: dict[str, Any],
) -> None:
    headers = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("request-id", api._next_id("req")),
    ]
    await _send_all(connection, stream, h11.Response(status_code=200, headers=headers))

    async def event(name: str, data: dict[str, Any]) -> None:
        payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        await _send_all(connection, stream, h11.Data(data=payload))

    message = _message_json(api, step, body)
    start = dict(message, content=[], stop_reason=None, usage=_usage(body, 1))
    await event("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            await event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": dict(block, text=""),
                },
            )
            for n, piece in enumerate(_chunks(block["text"], step)):
                if n and isinstance(step, TextReply) and step.chunk_delay:
                    await trio.sleep(step.chunk_delay)
                delta = {"type": "text_delta", "text": piece}
                await event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
        else:
            await event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": dict(block, input={}),
                },
            )
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            await event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        await event("content_block_stop", {"type": "content_block_stop", "index": index})
    await event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        },
    )
    await event("message_stop", {"type": "message_stop"})
    await _send_all(connection, stream, h11.EndOfMessage())


def _chunks(text: str, step: TextReply | ToolUseReply) -> list[str]:
    size = step.chunk_size if isinstance(step, TextReply) else None
    if not size or not text:
        return [text]
    return [text[i : i + size] for i in range(0, len(text), size)]


def _error_json(status: int, error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _json_response(
    status: int, body: dict[str, Any], extra_headers: tuple[tuple[str, str], ...] = ()
) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    payload = json.dumps(body).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(payload))),
        *extra_headers,
    ]
    if "request_id" in body:
        headers.append(("request-id", body["request_id"]))
    return [
        h11.Response(status_code=status, headers=headers, reason=_reason(status)),
        h11.Data(data=payload),
        h11.EndOfMessage(),
    ]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Overloaded" if status == 529 else b""


async def _send_all(connection: h11.Connection, stream: trio.SocketStream, events: Any) -> None:
    for event in events if isinstance(events, list) else [events]:
        data = connection.send(event)
        if data:
            await stream.send_all(data)


# --- standalone ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Serve an echoing mock until interrupted (for benchmarks and manual runs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-byte-delay", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="between 16-char chunks")
    args = parser.parse_args(argv)

    def slow_echo(request: RecordedRequest) -> Step:
        return TextReply(
            f"echo: {request.last_user_text()}",
            first_byte_delay=args.first_byte_delay,
            chunk_size=16 if args.chunk_delay else None,
            chunk_delay=args.chunk_delay,
        )

    async def serve() -> None:
        async with open_mock_api(args.host, args.port, default=slow_echo) as api:
            print(f"listening on {api.url}", flush=True)
            await trio.sleep_forever()

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
