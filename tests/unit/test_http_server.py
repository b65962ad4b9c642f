"""The HTTP server in-process: keep-alive, the connection bound, refusals.

A real :class:`HttpServer` on 127.0.0.1 with a tiny Quart-Trio app and short
timeouts, talked to over raw sockets (:mod:`tests.support.raw_http`). The real
clock: hypercorn's timers and the kernel's sockets run on it.

``test_upstream_*`` reproduce, on plain hypercorn, each defect that
:mod:`claude_code_api.http._hypercorn_fixes` fixes (numbered as there): when one
fails, upstream has fixed it, and the fix can go.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from quart_trio import QuartTrio

from claude_code_api.http import _hypercorn_fixes as connections
from claude_code_api.http._hypercorn_fixes import (
    AccessLogger,
    ConnectionTable,
    FixedConfig,
    connection_limit,
)
from claude_code_api.http.server import HttpServer
from claude_code_api.observe.logs import ACCESS_LOG_FORMAT
from tests.support.raw_http import RawConnection

KEEP_ALIVE_S = 0.3


class Gate:
    """Holds ``/slow`` requests until opened; counts what reached the app."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.requests = 0
        self.waiting = 0


def make_app(gate: Gate) -> QuartTrio:
    app = QuartTrio("test")

    @app.route("/", methods=["GET", "POST"])
    async def index() -> str:
        gate.requests += 1
        return "hi"

    @app.get("/slow")
    async def slow() -> str:
        gate.requests += 1
        gate.waiting += 1
        await gate.open.wait()
        return "slow"

    @app.get("/close")
    async def close() -> tuple[str, dict[str, str]]:
        gate.requests += 1
        return "bye", {"Connection": "close"}

    async def late_chunks() -> AsyncIterator[bytes]:
        await gate.open.wait()
        yield b"late"

    @app.get("/stream")
    async def stream() -> tuple[object, dict[str, str]]:
        gate.requests += 1
        return late_chunks(), {"Content-Type": "text/plain"}

    async def whole_body_then_a_pause() -> AsyncIterator[bytes]:
        yield b"hi"
        await trio.sleep(0.05)  # the client has it all, the app is not done yet

    @app.get("/sized-stream")
    async def sized_stream() -> tuple[object, dict[str, str]]:
        gate.requests += 1
        return whole_body_then_a_pause(), {"Content-Type": "text/plain", "Content-Length": "2"}

    @app.get("/closing-stream")
    async def closing_stream() -> tuple[object, dict[str, str]]:
        gate.requests += 1
        return late_chunks(), {"Content-Type": "text/plain", "Connection": "close"}

    return app


@asynccontextmanager
async def serving(
    *, max_connections: int = 64, graceful_timeout: float = 2.0
) -> AsyncIterator[tuple[HttpServer, str, Gate]]:
    gate = Gate()
    server = HttpServer(
        make_app(gate),
        "127.0.0.1",
        0,
        graceful_timeout=graceful_timeout,
        max_connections=max_connections,
    )
    server.config.keep_alive_timeout = KEEP_ALIVE_S
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(server.serve)
        yield server, url, gate
        server.request_stop()


@asynccontextmanager
async def stock_serving() -> AsyncIterator[tuple[str, Gate]]:
    """The same app on plain ``hypercorn.trio.serve``: none of the fixes."""
    gate = Gate()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = logging.getLogger("hypercorn.access")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.keep_alive_timeout = KEEP_ALIVE_S
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(
            lambda task_status: serve(make_app(gate), config, task_status=task_status)
        )
        yield url, gate
        nursery.cancel_scope.cancel()


async def get(url: str, path: str = "/") -> tuple[RawConnection, int]:
    """Open a connection, make one request on it, return it kept alive."""
    connection = await RawConnection.open(url)
    await connection.request("GET", path)
    response = await connection.response()
    assert response is not None and not response.closes
    return connection, response.status


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.mark.parametrize("path", ["/", "/close"])
async def test_upstream_hypercorn_with_quart_trio_leaves_connections_open(path):
    """Fix 1. Plain hypercorn + Quart-Trio: after a response the connection never
    closes, neither when idle past the keep-alive timeout nor when the response said
    ``Connection: close``.
    """
    with trio.fail_after(10):
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.keep_alive_timeout = KEEP_ALIVE_S
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(
                lambda task_status: serve(make_app(Gate()), config, task_status=task_status)
            )
            connection = await RawConnection.open(url)
            await connection.request("GET", path)
            assert (await connection.response()).status == 200
            with trio.move_on_after(KEEP_ALIVE_S * 5) as waited:
                await connection.wait_closed()
            assert waited.cancelled_caught, "upstream now closes the connection"
            nursery.cancel_scope.cancel()


async def test_an_idle_keep_alive_connection_closes_after_the_timeout():
    with trio.fail_after(10):
        async with serving() as (_server, url, _gate):
            connection, status = await get(url)
            assert status == 200
            started = trio.current_time()
            await connection.wait_closed()
            # The server's timer starts a moment before the client sees the response (or
            # its connection accepted) in this same event loop: a little slack below.
            assert KEEP_ALIVE_S - 0.05 <= trio.current_time() - started < KEEP_ALIVE_S + 1

            silent = await RawConnection.open(url)  # never sends a request
            started = trio.current_time()
            await silent.wait_closed()
            assert KEEP_ALIVE_S - 0.05 <= trio.current_time() - started < KEEP_ALIVE_S + 1


async def test_each_request_moves_the_idle_deadline_of_its_connection():
    with trio.fail_after(10):
        async with serving() as (_server, url, _gate):
            connection, _status = await get(url)
            for _ in range(4):  # 4 × 0.2 s: longer than the timeout, never idle that long
                await trio.sleep(KEEP_ALIVE_S * 2 / 3)
                await connection.request("GET", "/")
                response = await connection.response()
                assert response is not None and response.status == 200
            last = trio.current_time()
            await connection.wait_closed()
            assert KEEP_ALIVE_S <= trio.current_time() - last < KEEP_ALIVE_S + 1


async def test_a_connection_the_client_closes_frees_its_place_at_once():
    with trio.fail_after(10):
        async with serving() as (server, url, _gate):
            server.config.keep_alive_timeout = 60  # hypercorn's timer held it this long
            connection, _status = await get(url)
            await trio.sleep(0.1)  # the response is over: the keep-alive timer runs
            during = server.connections.open
            await connection.stream.aclose()
            await wait_for(lambda: server.connections.open == during - 1, timeout=1)


async def test_a_response_with_connection_close_closes_the_connection():
    with trio.fail_after(10):
        async with serving() as (server, url, _gate):
            server.config.keep_alive_timeout = 60
            connection = await RawConnection.open(url)
            await connection.request("GET", "/close")
            response = await connection.response()
            assert response.body == b"bye" and response.closes
            await connection.wait_closed()


async def test_a_request_pipelined_behind_a_closing_response_does_not_cut_it_off():
    """RFC 9112 §9.6: after ``Connection: close`` no further request is processed.

    Found by the input audit: hypercorn fed the pipelined request to h11, which
    refused it ("expecting EOF"), and closed the connection at once, while the
    closing response was still being written: its body (there, a 401) was lost.
    """
    with trio.fail_after(10):
        async with serving() as (_server, url, gate):
            received = await pipeline_behind_a_closing_response(url, gate)
    assert received.endswith(b"\r\n\r\n4\r\nlate\r\n0\r\n\r\n"), received
    assert received.count(b"HTTP/1.1 ") == 1 and gate.requests == 1


async def pipeline_behind_a_closing_response(url: str, gate: Gate) -> bytes:
    """All the bytes of a closing stream's response with a request pipelined behind it."""
    connection = await RawConnection.open(url)
    await connection.request("GET", "/closing-stream")
    received = b""
    while b"\r\n\r\n" not in received:
        received += await connection.stream.receive_some(65536)
    await connection.request("GET", "/")  # pipelined behind the closing response
    await trio.sleep(0.2)  # read by the server while the body is still to come
    gate.open.set()
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await connection.stream.receive_some(65536):
            received += data
    await connection.aclose()
    return received


async def test_upstream_hypercorn_cuts_a_closing_response_off_for_a_pipelined_request():
    """Fix 2: plain hypercorn closes the connection before the response is written."""
    with trio.fail_after(10):
        async with stock_serving() as (url, gate):
            received = await pipeline_behind_a_closing_response(url, gate)
    assert not received.endswith(b"0\r\n\r\n"), "upstream now completes the response"


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Bad: a\x00b\r\n\r\n", 400, "malformed HTTP request"),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            "malformed HTTP request",
        ),
        # Over h11's 16 KiB for an incomplete head, in one read (nothing left unread
        # to make the close a reset).
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000, 431, None),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501, None),
    ],
    ids=["nul-in-header", "two-lengths", "huge-header", "unknown-coding"],
)
async def test_a_request_h11_refuses_is_answered_in_json_and_closed(request_bytes, status, error):
    # Hypercorn answers these itself, before any app: its reply had an empty body.
    with trio.fail_after(10):
        async with serving() as (_server, url, gate):
            connection = await RawConnection.open(url)
            await connection.send(request_bytes)
            response = await connection.response()
            assert response is not None and response.status == status
            assert response.headers["content-type"] == "application/json" and response.closes
            assert set(response.json()) == {"error"} and response.body.endswith(b"}\n")
            if error is not None:
                assert response.json()["error"] == error
            await connection.wait_closed()
            await connection.aclose()
            assert gate.requests == 0


async def test_upstream_hypercorn_answers_a_request_h11_refuses_with_no_body():
    """Fix 3: plain hypercorn's answer to a request it cannot parse has an empty body."""
    with trio.fail_after(10):
        async with stock_serving() as (url, _gate):
            connection = await RawConnection.open(url)
            await connection.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Bad: a\x00b\r\n\r\n")
            response = await connection.response()
            assert response is not None and response.status == 400
            assert response.body == b"", "upstream now lets the answer have a body"
            await connection.aclose()


@asynccontextmanager
async def bare_connection(
    config: Config | None = None,
) -> AsyncIterator[tuple[TCPServer, trio.SocketStream]]:
    """Hypercorn's server for one end of a socket pair (no app behind it), and the other end.

    With the service's config (the fixes apply) unless ``config`` is given.
    """
    ours, theirs = trio.socket.socketpair()
    stream, peer = trio.SocketStream(ours), trio.SocketStream(theirs)
    connection = TCPServer(
        None,  # type: ignore[arg-type]
        config or FixedConfig(ConnectionTable(4)),
        WorkerContext(None),
        ConnectionState({}),  # type: ignore[arg-type]
        stream,  # type: ignore[arg-type]
    )
    async with stream, peer:
        yield connection, peer


async def test_upstream_hypercorn_closes_a_connection_under_a_write_in_progress():
    """Fix 6: plain hypercorn half-closes the socket while a response is being written."""
    with trio.fail_after(10):
        async with bare_connection(Config()) as (connection, peer):
            async with connection.send_lock:  # a response is being written
                await connection._close()
            assert await peer.receive_some(100) == b"", "upstream now waits for the write"


async def test_closing_a_connection_waits_for_the_write_in_progress():
    # Hypercorn half-closed the socket without its send lock: from the read loop,
    # that overlapped a response being written, which then failed (BusyResourceError).
    with trio.fail_after(10):
        async with bare_connection() as (connection, peer), trio.open_nursery() as nursery:
            async with connection.send_lock:  # a response is being written
                nursery.start_soon(connection._close)
                with trio.move_on_after(0.2) as waited:
                    await peer.receive_some(100)  # no end of stream yet
                assert waited.cancelled_caught
                await connection.stream.send_all(b"the rest of the response")
            received = b""
            while data := await peer.receive_some(100):
                received += data
            assert received == b"the rest of the response"


async def test_closing_does_not_wait_for_a_write_that_cannot_finish(monkeypatch):
    # A client that reads nothing: the socket is closed under the stuck write.
    monkeypatch.setattr(connections, "CLOSE_WAITS_FOR_WRITE_S", 0.2)
    with trio.fail_after(10):
        async with bare_connection() as (connection, peer), trio.open_nursery() as nursery:

            async def stuck_write() -> None:
                async with connection.send_lock:
                    await trio.sleep_forever()

            nursery.start_soon(stuck_write)
            await wait_for(connection.send_lock.locked)
            await connection._close()
            assert await peer.receive_some(100) == b""
            nursery.cancel_scope.cancel()


def test_upstream_hypercorn_has_no_bound_on_connections():
    """Fix 5: no setting bounds the connections plain hypercorn serves at once."""
    assert not {"max_connections", "limit_concurrency"} & set(dir(Config()))


async def test_a_full_table_closes_the_longest_idle_connection_for_a_newcomer():
    with trio.fail_after(10):
        async with serving(max_connections=4) as (server, url, gate):
            server.config.keep_alive_timeout = 60  # only the bound closes anything here
            busy = await RawConnection.open(url)
            await busy.request("GET", "/slow")
            await wait_for(lambda: gate.waiting == 1)
            idle = [(await get(url))[0] for _ in range(3)]
            assert server.connections.open == 4

            newcomer, status = await get(url)
            assert status == 200
            await idle[0].wait_closed()  # the longest idle made room
            assert server.connections.open == 4

            newest, status = await get(url)
            assert status == 200
            await idle[1].wait_closed()

            gate.open.set()  # the busy connection was never touched
            response = await busy.response()
            assert response is not None and response.body == b"slow"


async def test_a_full_table_of_busy_connections_makes_newcomers_wait():
    with trio.fail_after(10):
        async with serving(max_connections=2) as (server, url, gate):
            busy = []
            for _ in range(2):
                connection = await RawConnection.open(url)
                await connection.request("GET", "/slow")
                busy.append(connection)
            await wait_for(lambda: gate.waiting == 2)

            waiting = await RawConnection.open(url)  # the kernel's backlog holds it
            await waiting.request("GET", "/")
            await trio.sleep(0.3)
            assert gate.requests == 2 and server.connections.open == 2

            gate.open.set()
            for connection in busy:
                assert (await connection.response()).body == b"slow"
                await connection.aclose()
            response = await waiting.response()
            assert response is not None and response.body == b"hi"


async def test_beyond_the_waiting_newcomers_a_newcomer_is_closed_at_once(monkeypatch):
    monkeypatch.setattr(connections, "MAX_WAITING", 1)
    with trio.fail_after(10):
        async with serving(max_connections=1) as (server, url, gate):
            busy = await RawConnection.open(url)
            await busy.request("GET", "/slow")
            await wait_for(lambda: gate.waiting == 1)
            waiting = await RawConnection.open(url)
            await waiting.request("GET", "/")
            await wait_for(lambda: server.connections.waiting == 1)
            refused = await RawConnection.open(url)
            await refused.wait_closed()
            gate.open.set()
            assert (await busy.response()).body == b"slow"
            await busy.aclose()
            response = await waiting.response()
            assert response is not None and response.body == b"hi"


async def test_idle_sockets_beyond_the_bound_do_not_stop_another_client():
    with trio.fail_after(30):
        async with serving(max_connections=50) as (server, url, _gate):
            server.config.keep_alive_timeout = 60
            idle: list[RawConnection] = []

            async def open_idle(count: int) -> None:
                for _ in range(count):
                    idle.append(await RawConnection.open(url))
                    assert server.connections.open <= 50

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(open_idle, 30)
            connection, status = await get(url)
            assert status == 200
            for connection in idle:
                await connection.aclose()


async def test_after_refuse_every_request_is_answered_503_and_closed():
    with trio.fail_after(10):
        async with serving() as (server, url, gate):
            kept = [(await get(url))[0] for _ in range(3)]
            slow = await RawConnection.open(url)
            await slow.request("GET", "/slow")
            await wait_for(lambda: gate.waiting == 1)

            server.refuse_new_requests()
            for connection, (method, path) in zip(
                kept, [("GET", "/"), ("POST", "/"), ("GET", "/health")], strict=True
            ):
                body = b'{"prompt": "x"}' if method == "POST" else b""
                await connection.request(method, path, body=body)
                response = await connection.response()
                assert response is not None
                assert response.status == 503 and response.closes
                assert response.json()["error"] == "service is shutting down"
                assert response.body.endswith(b"}\n") and b", " not in response.body  # jsonify's
                await connection.wait_closed()
            assert gate.requests == 4  # none of them reached the app
            fresh = await RawConnection.open(url)
            await fresh.request("GET", "/")
            assert (await fresh.response()).status == 503

            gate.open.set()  # what was in progress is still answered
            assert (await slow.response()).body == b"slow"


async def test_health_while_refusing_still_says_stopping():
    with trio.fail_after(10):
        async with serving() as (server, url, _gate):
            server.refuse_new_requests()
            connection = await RawConnection.open(url)
            await connection.request("GET", "/health")
            response = await connection.response()
            assert response.status == 503
            assert response.json() == {"status": "stopping", "error": "service is shutting down"}


async def test_a_connection_that_breaks_hypercorn_ends_alone():
    """An exception in one connection's protocol handling ends that connection only.

    The trigger is hypercorn's own (0.18): over HTTP/2, body data arriving for a
    request already answered (here: the app answers without reading a 1 MB body)
    raises ``KeyError`` out of its protocol. Reaching the server's nursery, it
    cancelled every other connection (requests in progress lost their answers) and
    restarted the server; a few such requests a second stopped the service.
    """
    with trio.fail_after(10):
        async with serving() as (_server, url, gate):
            busy = await RawConnection.open(url)
            await busy.request("GET", "/slow")
            await wait_for(lambda: gate.waiting == 1)
            async with httpx.AsyncClient(http1=False, http2=True) as h2_client:
                with contextlib.suppress(httpx.TransportError):
                    await h2_client.post(f"{url}/", content=b"x" * 1_000_000)
            gate.open.set()
            answer = await busy.response()
            assert answer is not None and answer.status == 200
            _connection, status = await get(url)
            assert status == 200


async def test_upstream_hypercorn_ends_every_connection_when_one_breaks_it():
    """Fix 4: over HTTP/2, data for a stream already answered raises KeyError out of
    plain hypercorn's protocol, through its server: every connection ends with it."""
    with trio.fail_after(10), pytest.RaisesGroup(KeyError, flatten_subgroups=True):
        async with stock_serving() as (url, _gate):
            async with httpx.AsyncClient(http1=False, http2=True) as h2_client:
                with contextlib.suppress(httpx.TransportError):
                    await h2_client.post(f"{url}/", content=b"x" * 1_000_000)
            await trio.sleep(1)  # (the server's failure cancels this)


async def test_stop_closes_idle_connections_at_once_and_lets_busy_ones_finish():
    with trio.fail_after(10):
        async with serving(graceful_timeout=5) as (server, url, gate):
            server.config.keep_alive_timeout = 60
            idle = [(await get(url))[0] for _ in range(3)]
            busy = await RawConnection.open(url)
            await busy.request("GET", "/slow")
            await wait_for(lambda: gate.waiting == 1)
            stopped_at = trio.current_time()
            server.request_stop()
            for connection in idle:
                await connection.wait_closed()
            assert trio.current_time() - stopped_at < 1
            gate.open.set()
            response = await busy.response()
            assert response.body == b"slow"
            await busy.wait_closed()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n",
    ],
)
async def test_content_length_with_transfer_encoding_is_400_and_closes(framing):
    with trio.fail_after(10):
        async with serving() as (_server, url, gate):
            connection = await RawConnection.open(url)
            smuggled = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
            await connection.send(b"POST / HTTP/1.1\r\nHost: test\r\n" + framing + smuggled)
            response = await connection.response()
            assert response is not None
            assert response.status == 400 and response.closes
            assert "Transfer-Encoding" in response.json()["error"]
            await connection.wait_closed()
            assert gate.requests == 0  # neither the request nor what followed reached the app


async def test_a_stream_head_is_sent_before_its_first_chunk_exists():
    with trio.fail_after(10):
        async with serving() as (_server, url, gate):
            connection = await RawConnection.open(url)
            await connection.request("GET", "/stream")
            head = b""
            while b"\r\n\r\n" not in head:  # while the chunk is still held back by the gate
                head += await connection.stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
            assert gate.requests == 1 and not gate.open.is_set()
            gate.open.set()
            rest = head.split(b"\r\n\r\n", 1)[1]
            while not rest.endswith(b"0\r\n\r\n"):
                rest += await connection.stream.receive_some(65536)
            assert b"late" in rest


@pytest.mark.parametrize(
    ("soft_limit", "agents", "expected"),
    [
        (1024, 9, 1024 - 64 - 8 * 9),  # the usual `ulimit -n`, POOL_SIZE 1 + 8 sessions
        (resource.RLIM_INFINITY, 9, 4096),
        (1_048_576, 9, 4096),
        (100, 9, 16),  # too low to leave room: the floor, and a warning
    ],
)
def test_the_connection_bound_leaves_descriptors_for_agents(
    monkeypatch, soft_limit, agents, expected
):
    monkeypatch.setattr(
        connections.resource, "getrlimit", lambda _which: (soft_limit, resource.RLIM_INFINITY)
    )
    assert connection_limit(agents) == expected


@pytest.mark.parametrize("client", [("127.0.0.1", 4321), ("unix",), None])
@pytest.mark.parametrize(
    "response",
    [
        None,
        {"status": 200, "headers": [(b"content-type", b"text/plain"), (b"Content-Length", b"5")]},
        {"status": 404, "headers": []},
        {"status": 599, "headers": [(b"content-length", b"0")]},
    ],
)
def test_access_lines_show_no_query_and_no_header(client, response):
    request = {
        "type": "http",
        "method": "POST",
        "path": "/runs/abc",
        "query_string": b"key=secret",
        "http_version": "1.1",
        "scheme": "http",
        "client": client,
        "headers": [(b"x-api-key", b"sk-secret"), (b"user-agent", b"curl")],
    }
    line = ACCESS_LOG_FORMAT % AccessLogger(Config()).atoms(request, response, 0.0123456)
    status = "-" if response is None else str(response["status"])
    assert f'"POST /runs/abc" {status} ' in line and line.endswith(" 0.012346s")
    assert "secret" not in line and "curl" not in line


def test_access_atoms_hold_neither_the_environment_nor_the_headers(monkeypatch):
    """Hypercorn's atoms copy every header and the whole environment (its secrets among
    it) into a dict for every request; ours are the access line's six fields."""
    monkeypatch.setenv("SOME_SECRET", "sk-from-the-environment")
    request = {
        "type": "http",
        "method": "GET",
        "path": "/health",
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "client": ("127.0.0.1", 4321),
        "headers": [(b"x-api-key", b"sk-from-a-header")],
    }
    response = {"status": 200, "headers": [(b"content-length", b"2")]}
    atoms = AccessLogger(Config()).atoms(request, response, 0.5)
    assert dict(atoms) == {
        "h": "127.0.0.1:4321",
        "m": "GET",
        "U": "/health",
        "s": "200",
        "b": "2",
        "L": "0.500000",
    }
    # A field the format may name one day and these atoms do not give: "-", as hypercorn's.
    a_later_format = "%(a)s %(L)s"
    assert a_later_format % atoms == "- 0.500000"


def close_on_each_whole_response(url: str, path: str, requests: int) -> None:
    """A client in a thread of its own (truly in parallel with the server): one request
    per connection, closed as soon as the whole response is in, as curl does."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for _ in range(requests):
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            received = b""
            while not received.endswith(b"\r\n\r\nhi"):
                data = client.recv(65536)
                assert data, f"closed after {received!r}"
                received += data


async def test_one_access_line_per_request_also_when_the_client_closes_at_once(caplog):
    """Found by a newcomer: ``"GET /health" - - 0.007s`` before the real 200 line.

    A client that closes as soon as it has the whole response can be seen by
    hypercorn's read loop before the app has sent its last (empty) message: the
    stream-closed path logged the request with no response, then the app's end
    logged it again with its status (~1 request in 4 here, before the fix).
    ``/sized-stream`` holds that window open: the app, told the client left, never
    sends its last message, and the one line said ``- -`` for a response the client had.
    """
    caplog.set_level(logging.INFO, logger="hypercorn.access")
    with trio.fail_after(20):
        async with serving() as (server, url, _gate):
            await trio.to_thread.run_sync(close_on_each_whole_response, url, "/", 200)
            await trio.to_thread.run_sync(close_on_each_whole_response, url, "/sized-stream", 3)
            # A stream the client leaves: one line too, with no status (it never completed).
            connection = await RawConnection.open(url)
            await connection.request("GET", "/stream")
            await connection.stream.receive_some(65536)  # its head
            await connection.aclose()
            await wait_for(lambda: server.connections.open <= 1)
            await trio.sleep(0.1)  # (a second line would come from the app's end, 50 ms later)
    lines = [r.getMessage() for r in caplog.records if r.name == "hypercorn.access"]
    requests = [line.split('"')[1] + line.split('"')[2].rsplit(" ", 1)[0] for line in lines]
    assert requests == ["GET / 200 2"] * 200 + ["GET /sized-stream 200 2"] * 3 + [
        "GET /stream - -"
    ], [line for line in lines if "200" not in line]


async def test_upstream_hypercorn_logs_a_whole_response_without_its_status(caplog):
    """Fix 7: a client that closes once it has a whole sized response, before the
    app's last message: plain hypercorn logs the request with no response."""
    caplog.set_level(logging.INFO, logger="hypercorn.access")
    with trio.fail_after(20):
        async with stock_serving() as (url, _gate):
            await trio.to_thread.run_sync(close_on_each_whole_response, url, "/sized-stream", 1)
            await trio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "hypercorn.access"]
    assert [line.split('"')[2].split()[:2] for line in lines] == [["-", "-"]], lines
