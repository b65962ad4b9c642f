"""What stock hypercorn 0.18.0 under quart-trio 0.12.0 gets wrong for us, and the fixes.

The service is served by ``hypercorn.trio.serve`` itself (its accept loop, its
connection lifetimes: :mod:`.server`). This module holds every fix it needs,
each for a defect a ``tests/unit/test_http_server.py::test_upstream_*`` test
reproduces on plain hypercorn (they fail once upstream has fixed it: then the
fix goes). The fixes that patch hypercorn act only for a server whose config is
a :class:`FixedConfig`; any other hypercorn server in the process (tests,
``bench/bare_http.py``) stays stock. The pinned versions are checked at import:
a new version must be checked against the reproductions before it is used.

1. **Connections that never close** (:func:`shield_final_send`, an ASGI layer).
   Hypercorn does what follows a response (restart the keep-alive timer, or
   close the connection after ``Connection: close`` or during shutdown) inside
   the app's last ``send()``, after telling the app ``http.disconnect``; on that,
   quart-trio cancels the request's nursery, so the bookkeeping meets the
   cancellation at its first checkpoint and is abandoned: an idle connection is
   never timed out, a closing one stays open. Fix: that ``send()`` is shielded.
   *Upstream (quart-trio, and hypercorn):* "After a response, hypercorn's
   keep-alive timer and connection close run in the app's final ``send()``;
   quart-trio cancels the request on the ``http.disconnect`` hypercorn sends
   from there, so connections never time out or close (reproduction: plain
   ``hypercorn.trio.serve`` of a one-route QuartTrio app, one request, the
   connection stays open past ``keep_alive_timeout``). Either quart-trio should
   not cancel a send in progress, or hypercorn should not run connection
   bookkeeping in the app's task."
2. **Pipelined requests after a close** (``H11Protocol.handle``). Once a request
   or its response said ``Connection: close``, what the client sent next was fed
   to h11, which refuses it; hypercorn then closed the connection under the
   response still being written (lost). Fix: that data is dropped (RFC 9112
   §9.6: no further request is processed). *Upstream (hypercorn):* "A request
   pipelined behind a ``Connection: close`` response makes the H11 protocol
   close the connection before that response is written; it should ignore data
   received in h11's MUST_CLOSE state."
3. **Parser refusals without a body** (``H11Protocol._send_error_response``).
   A request h11 cannot parse (400, 431, 501) was answered with an empty body;
   every error of the service is ``{"error": ...}``. Fix: the same answer with a
   JSON body. *Upstream (hypercorn):* "Let an application or config give the
   body of the responses hypercorn sends for protocol errors."
4. **One connection's exception stops them all** (``TCPServer.run``). Over
   HTTP/2, body data for a stream already answered raises ``KeyError`` out of
   hypercorn's protocol; it reached the server's nursery and cancelled every
   connection (a few such requests a second stopped the service). Fix: a
   connection's exception is logged and ends that connection only.
   *Upstream (hypercorn):* "H2Protocol raises KeyError on DATA for a stream
   already closed by the app (POST a 1 MB body over h2 to a route that answers
   without reading it), and ``TCPServer.run`` lets any exception reach the
   handler nursery of ``trio.serve_listeners``, ending the whole server."
5. **No bound on connections** (:class:`ConnectionTable`, through
   ``TCPServer.run``/``protocol_send``/``_read_data``). Every connection is a
   file descriptor, which the agents' pipes and the database also need. Fix: at
   most ``limit`` are served; a newcomer beyond it closes the longest-idle one
   (HTTP lets a server close an idle connection at any time), or waits for a
   place if none is idle (at most :data:`MAX_WAITING` of them: hypercorn has
   accepted it, so it holds a descriptor; more are closed at once, and their
   clients retry); a connection whose client has closed ends at once
   instead of keeping its place for ``keep_alive_timeout``. *Upstream
   (hypercorn):* "A ``max_connections`` setting (uvicorn's ``limit_concurrency``),
   and end a connection when its read side is closed rather than when its idle
   timer expires."
6. **Closing under a write** (``TCPServer._close``). Hypercorn half-closes the
   socket without its send lock: from the read loop (a request that broke the
   protocol) that overlapped a response being written, which failed. Fix: close
   after the write in progress, waiting :data:`CLOSE_WAITS_FOR_WRITE_S` at most.
   *Upstream (hypercorn):* "``TCPServer._close`` should take ``send_lock``."
7. **Two access lines for one request** (:class:`AccessLogger`, hypercorn's
   ``logger_class`` setting, and :func:`shield_final_send` noting progress). A
   client that closes as soon as it has a whole sized response can be seen
   before the app's last (empty) message: hypercorn logged the request with no
   response, then again with its status. Fix: a request's first line is its
   only one, with the status if the whole declared length was handed over.
   *Upstream (hypercorn):* "``HTTPStream`` logs an access line both on
   ``StreamClosed`` and on the app's final message when the client closes in
   between."

Error handling: a pinned version that does not match raises ``RuntimeError`` at import.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http import HTTPStatus
from importlib.metadata import version
from typing import Any, cast

import attrs
import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData, Updated
from hypercorn.logging import Logger
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
    WWWScope,
)

from .parsing import json_bytes

log = logging.getLogger(__name__)

PINNED = {"hypercorn": "0.18.0", "quart-trio": "0.12.0", "h11": "0.16.0"}
for _name, _pinned in PINNED.items():
    if version(_name) != _pinned:
        raise RuntimeError(
            f"{_name} {version(_name)} is installed, the HTTP fixes are for {_pinned}: run "
            "tests/unit/test_http_server.py's test_upstream_* and review claude_code_api/http/"
            "_hypercorn_fixes.py"
        )

# Descriptors the service uses besides connections and agents: the listening
# sockets, the event loop's, the session database and its journal, logging, threads.
RESERVED_FDS = 64
# A running agent holds its stdin/stdout/stderr pipes and a process handle (4);
# twice that covers one being replaced while its successor starts.
FDS_PER_AGENT = 8
# Even without a descriptor limit, more idle connections only cost memory.
MAX_CONNECTIONS = 4096
# Below this the service could hardly be reached; run it with a higher `ulimit -n`.
MIN_CONNECTIONS = 16
# Connections accepted beyond the bound that may wait for a place, each holding a
# descriptor (hypercorn accepts without limit): half of RESERVED_FDS. More are closed at once.
MAX_WAITING = 32
# How long closing a connection waits for a response being written (fix 6).
CLOSE_WAITS_FOR_WRITE_S = 5.0


def connection_limit(agent_processes: int) -> int:
    """How many connections may be open at once under this process's ``RLIMIT_NOFILE``.

    ``agent_processes`` is how many agent processes may run at once
    (``POOL_SIZE + MAX_LIVE_SESSIONS``); descriptors for them are kept free.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    room = soft - RESERVED_FDS - FDS_PER_AGENT * agent_processes
    if room < MIN_CONNECTIONS:
        log.warning(
            "open-file limit %d leaves little room for %d agents; allowing %d connections",
            soft,
            agent_processes,
            MIN_CONNECTIONS,
        )
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, room))


class ConnectionTable:
    """Fix 5: at most ``limit`` connections served at once, and which of them are idle.

    A connection takes a place (:meth:`serving`) before hypercorn serves it and
    gives it back when it ends. Connections are idle from their start and after
    each response (hypercorn's ``Updated`` events), longest-idle first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting = 0
        self._places = trio.Semaphore(limit)
        self._idle: dict[TCPServer, trio.CancelScope] = {}  # insertion order: idle since
        self._scopes: dict[TCPServer, trio.CancelScope] = {}
        self._warned_at = -math.inf

    @property
    def open(self) -> int:
        """How many connections hold a place."""
        return self.limit - self._places.value

    @contextmanager
    def _place(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._places.release()

    async def admit(self) -> bool:
        """Wait for a place, closing the longest-idle connection if the table is full.

        False (no place taken) when :data:`MAX_WAITING` connections wait already.
        """
        if self._places.value == 0 and not self._idle and self.waiting >= MAX_WAITING:
            return False
        if self._places.value == 0 and self._idle:
            oldest = next(iter(self._idle))
            self._idle.pop(oldest).cancel()
            now = trio.current_time()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning(
                    "%d connections open (the limit): closing idle ones to make room", self.limit
                )
        self.waiting += 1
        try:
            await self._places.acquire()
        finally:
            self.waiting -= 1
        return True

    @contextmanager
    def serving(self, connection: TCPServer) -> Iterator[trio.CancelScope]:
        """The admitted ``connection``'s place, and the scope that closes it if evicted."""
        scope = trio.CancelScope()
        self._scopes[connection] = scope
        self._idle[connection] = scope
        with self._place():
            try:
                yield scope
            finally:
                self._idle.pop(connection, None)
                del self._scopes[connection]

    def note(self, connection: TCPServer, idle: bool) -> None:
        scope = self._scopes.get(connection)
        self._idle.pop(connection, None)
        if idle and scope is not None:
            self._idle[connection] = scope


class FixedConfig(Config):
    """Hypercorn's config for a server this module's fixes apply to (fixes 2-6)."""

    def __init__(self, connections: ConnectionTable) -> None:
        super().__init__()
        self.connections = connections


def _table(config: Config) -> ConnectionTable | None:
    return config.connections if isinstance(config, FixedConfig) else None


_stock_run = TCPServer.run
_stock_protocol_send = TCPServer.protocol_send
_stock_read_data = TCPServer._read_data
_stock_close = TCPServer._close
_stock_handle = H11Protocol.handle
_stock_send_error_response = H11Protocol._send_error_response


async def _run(self: TCPServer) -> None:
    """Fixes 4 and 5: serve within the bound; an exception ends this connection only."""
    table = _table(self.config)
    if table is None:
        await _stock_run(self)
        return
    try:
        if not await table.admit():
            return  # (closed below) too many wait already
        with table.serving(self) as evicted:
            with evicted:
                await _stock_run(self)
    except Exception:
        log.exception("connection failed inside the HTTP server; closed")
    finally:
        # Also when evicted or cancelled in the middle of hypercorn's own closing.
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def _protocol_send(self: TCPServer, event: Event) -> None:
    """Fix 5: the table learns when the connection turns idle or busy."""
    table = _table(self.config)
    if table is not None and isinstance(event, Updated):
        table.note(self, event.idle)
    await _stock_protocol_send(self, event)


async def _read_data(self: TCPServer) -> None:
    """Fix 5: once nothing more can arrive, no keep-alive timer holds the connection."""
    await _stock_read_data(self)
    if _table(self.config) is not None:
        await self.idle_task.stop()


async def _close(self: TCPServer) -> None:
    """Fix 6: half-close and close after the write in progress, if any (bounded)."""
    if _table(self.config) is None:
        await _stock_close(self)
        return
    with trio.move_on_after(CLOSE_WAITS_FOR_WRITE_S):
        async with self.send_lock:
            await _stock_close(self)
            return
    await self.stream.aclose()


async def _handle(self: H11Protocol, event: Event) -> None:
    """Fix 2: data after a request or response that said ``Connection: close`` is dropped."""
    if (
        isinstance(event, RawData)
        and event.data
        and _table(self.config) is not None
        and isinstance(self.connection, h11.Connection)
        and self.connection.their_state in (h11.MUST_CLOSE, h11.CLOSED)
    ):
        return
    await _stock_handle(self, event)


# What a request h11 cannot parse is answered (fix 3).
PROTOCOL_ERRORS = {
    400: "malformed HTTP request",
    431: "request header fields too large",
    501: "unsupported Transfer-Encoding",
}


async def _send_error_response(self: H11Protocol, status_code: int) -> None:
    """Fix 3: hypercorn's answer to a request h11 refuses, with a JSON body.

    The same head as hypercorn's (a length and ``Connection: close``).
    """
    if _table(self.config) is None:
        await _stock_send_error_response(self, status_code)
        return
    try:
        reason = PROTOCOL_ERRORS.get(status_code) or HTTPStatus(status_code).phrase
    except ValueError:
        reason = "malformed HTTP request"
    body = json_bytes({"error": reason})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


TCPServer.run = _run  # type: ignore[method-assign]
TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
TCPServer._read_data = _read_data  # type: ignore[method-assign]
TCPServer._close = _close  # type: ignore[method-assign]
H11Protocol.handle = _handle  # type: ignore[method-assign]
H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]


# --- fixes 1 and 7: an ASGI layer and hypercorn's logger_class -----------------------

# Where shield_final_send keeps a request's ResponseProgress in its ASGI scope.
PROGRESS_KEY = "claude_code_api.response_progress"


@attrs.define
class ResponseProgress:
    """How much of a request's response the app has handed to hypercorn (fix 7).

    A sized response counts as complete once its declared length has been handed
    over: the client may have it all and close before the app's last (empty) message.
    """

    head: Mapping[str, Any] | None = None  # the http.response.start message
    length: int | None = None  # its Content-Length
    sent: int = 0
    logged: bool = False

    def note(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start":
            self.head = message
            for name, value in message.get("headers", []):
                if name.lower() == b"content-length" and value.isdigit():
                    self.length = int(value)
        elif message["type"] == "http.response.body":
            self.sent += len(message.get("body", b""))

    @property
    def complete(self) -> bool:
        return self.head is not None and self.length is not None and self.sent >= self.length


def shield_final_send(app: Any) -> Any:
    """ASGI: fixes 1 and 7 for ``app`` (an ASGI app; HTTP requests only).

    The response's last message is handed to hypercorn shielded from the
    request's cancellation (fix 1), and what was handed over is noted for the
    access line (fix 7).
    """

    async def fixed(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        progress = ResponseProgress()
        cast(dict[str, Any], scope)[PROGRESS_KEY] = progress

        async def shielded_send(message: ASGISendEvent) -> None:
            # Before handing it over: the client may have it, and close, before this returns.
            progress.note(message)
            last = message["type"] == "http.response.body" and not message.get("more_body")
            with trio.CancelScope(shield=last):
                await send(message)

        await app(scope, receive, shielded_send)

    return fixed


class _Atoms(dict[str, str]):
    """An access line's fields; one the format names and we do not give is ``-`` (as
    hypercorn's), never a KeyError that loses the line."""

    def __missing__(self, key: str) -> str:
        return "-"


class AccessLogger(Logger):
    """Fix 7: hypercorn's logger, with one access line per request.

    A request's first line is its only one, and a response whose declared length
    was all handed over is logged with its status even when the connection
    closed before the app's last message.

    Its :meth:`atoms` (hypercorn's documented hook) are the access line's own fields
    (``ACCESS_LOG_FORMAT``), not hypercorn's: those copy every request header and the
    whole process environment into a dict for every request.
    """

    def atoms(self, request: WWWScope, response: Any, request_time: float) -> Mapping[str, str]:
        client = request.get("client")
        length = "-"
        for name, value in (response or {}).get("headers", ()):
            if name.lower() == b"content-length":
                length = value.decode("latin1")
        return _Atoms(
            h="-" if client is None else ":".join(str(part) for part in client),
            m=request["method"] if request["type"] == "http" else "GET",
            U=request["path"],
            s="-" if response is None else str(response["status"]),
            b=length,
            L=f"{request_time:.6f}",
        )

    async def access(self, request: WWWScope, response: Any, request_time: float) -> None:
        progress = cast(Mapping[str, Any], request).get(PROGRESS_KEY)
        if isinstance(progress, ResponseProgress):
            if progress.logged:
                return
            progress.logged = True
            if response is None and progress.complete:
                response = progress.head
        await super().access(request, response, request_time)
