"""Open HTTP connections: how many there may be, and which are idle.

Hypercorn serves each connection with a :class:`~hypercorn.trio.tcp_server.TCPServer`;
:class:`HttpConnection` is that server with a few adaptations, and
:class:`ConnectionTable` bounds how many are open at once.

Why hypercorn's bookkeeping is replaced or shielded: hypercorn does the work
that follows a response from inside the application's final ``send()``, i.e.
in quart-trio's request task: it restarts the idle timer that closes a
kept-alive connection ``keep_alive_timeout`` seconds later (``Updated(idle=True)``),
or closes the connection when the response said ``Connection: close`` or the
server is stopping (``Closed()``). While that ``send()`` runs, hypercorn also
tells the app the request is over (``http.disconnect``), on which quart-trio
cancels the request's nursery; work with a checkpoint there meets that
cancellation and is abandoned. So an idle connection would never time out, and
a connection that should close would stay open, both forever. Hence:

* the idle timer is :class:`IdleTimer`: one task for the connection's life
  whose deadline moves, set without a checkpoint. (Hypercorn stops a task when a
  request arrives and starts another, waiting for it to start, when the
  response is sent: two scheduler rounds and a lock on every request.)
* closing only closes the socket and tells the protocol: shielded here.
  (``tests/test_http_server.py::test_upstream_*`` reproduce the abandonment on
  plain hypercorn and fail once upstream no longer needs this.)
* an empty write (the end of a body whose length was declared) is not sent:
  nothing to write, and one scheduler round less per response.
* the head of a final response with a ``Content-Length`` is held until the
  next write, and sent with it in one ``send()``: hypercorn writes the head on
  ``http.response.start`` and the body on the next message, and every response
  with a declared length here sends its body right after its head. One system
  call and one scheduler round less per response, and the client reads one
  segment instead of two. Streams (no length: chunked) and 1xx heads go out at once.
* once the request or its response said ``Connection: close``, what the client
  sends next (pipelined requests) is dropped, not fed to h11: it refuses it, and
  hypercorn then closed the connection under the response still being written.
* closing waits (boundedly) for a write in progress: hypercorn half-closes the
  socket outside its send lock, and a write it overlapped failed.
* a request h11 cannot parse is answered with a JSON body, as every other error
  (hypercorn's answer has none).

Why a bound: every connection is a file descriptor, and the service needs
descriptors for its agents' pipes and its database. When the table is full and
a new connection is waiting, the longest-idle connection is closed to make
room (as HTTP lets a server do at any time; clients retry); a connection with
a request in progress is never closed for this. When none is idle, new
connections wait in the listen backlog until one ends.
"""

from __future__ import annotations

import functools
import logging
import math
import resource
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState

from .json_run import json_bytes

log = logging.getLogger(__name__)

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
# How long closing a connection waits for a response being written (HttpConnection._close).
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
    """Counts open connections (at most ``limit``) and knows which are idle.

    The accept loop calls :meth:`reserve` before it accepts and the connection's
    task calls :meth:`release` when it ends. Connections report themselves idle or
    not; the idle ones are kept longest-idle first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = trio.Semaphore(limit)
        self._idle: dict[HttpConnection, None] = {}  # insertion order: idle since
        self._warned_at = -float("inf")

    @property
    def open(self) -> int:
        return self.limit - self._slots.value

    def try_reserve(self) -> bool:
        """Take room for one more connection if there is any, without waiting."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    async def reserve(self) -> None:
        """Wait for room for one more connection, closing the longest-idle one if full."""
        if self._slots.value == 0 and self._idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.evict()
            now = trio.current_time()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning(
                    "%d connections open (the limit): closing idle ones to make room", self.limit
                )
        await self._slots.acquire()

    def release(self) -> None:
        self._slots.release()

    def idle(self, connection: HttpConnection) -> None:
        self._idle.pop(connection, None)
        self._idle[connection] = None

    def not_idle(self, connection: HttpConnection) -> None:
        """Busy with a request, or gone: never to be evicted."""
        self._idle.pop(connection, None)


class IdleTimer:
    """Closes a kept-alive connection left idle for ``keep_alive_timeout`` seconds.

    Stands in for hypercorn's per-request timer task (``TCPServer.idle_task``,
    same ``restart``/``stop`` calls): one task, started with the connection's
    first idle period and ended with the connection; ``restart`` and ``stop``
    only move its deadline, without a checkpoint, so they cannot be abandoned
    half-way by a cancelled request task (module docstring). When the deadline
    passes, or the server is stopping and the connection is idle (at once, or
    when its request is answered), ``close()`` runs, shielded. :meth:`end` (the
    connection is over) ends the task without it.
    """

    def __init__(
        self,
        timeout_s: float,
        terminated: Callable[[], Awaitable[Any]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self._timeout_s = timeout_s
        self._terminated = terminated
        self._close = close
        self._scope = trio.CancelScope()
        self._started = False
        self._busy = False
        self._stopping = False
        self._ended = False

    async def restart(self, task_group: Any, action: object = None) -> None:
        """Idle from now on. ``task_group``: hypercorn's, where the timer's task runs."""
        self._busy = False
        self._scope.deadline = trio.current_time() + (0 if self._stopping else self._timeout_s)
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._run)

    async def stop(self) -> None:
        """Busy with a request: no timeout until the next :meth:`restart`."""
        self._busy = True
        self._scope.deadline = math.inf

    def end(self) -> None:
        """The connection is over: the task ends without closing anything."""
        self._ended = True
        self._scope.cancel()

    async def _run(self) -> None:
        with self._scope:
            await self._terminated()
            self._stopping = True
            if self._busy:
                await trio.sleep_forever()  # until restart() moves the deadline to now
        if not self._ended:
            with trio.CancelScope(shield=True):
                await self._close()


# What a request h11 cannot parse is answered (by hypercorn, before any app sees it).
PROTOCOL_ERRORS = {
    400: "malformed HTTP request",
    431: "request header fields too large",
    501: "unsupported Transfer-Encoding",
}


async def _send_json_protocol_error(protocol: H11Protocol, status_code: int) -> None:
    """Hypercorn's answer to a request h11 refuses, with a JSON body instead of none.

    Stands in for ``H11Protocol._send_error_response`` (same headers: a length and
    ``Connection: close``): every error the service gives is ``{"error": ...}``.
    """
    try:
        reason = PROTOCOL_ERRORS.get(status_code) or HTTPStatus(status_code).phrase
    except ValueError:
        reason = "malformed HTTP request"
    body = json_bytes({"error": reason})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *protocol.config.response_headers("h11"),
    ]
    await protocol._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await protocol._send_h11_event(h11.Data(data=body))
    await protocol._send_h11_event(h11.EndOfMessage())


def _is_sized_response_head(data: bytes) -> bool:
    """Whether ``data`` is exactly the head of a final (2xx-5xx) response with a Content-Length."""
    return (
        data.startswith(b"HTTP/1.1 ")
        and data[9:10] != b"1"
        and data.endswith(b"\r\n\r\n")
        and data.count(b"\r\n\r\n") == 1
        and b"\r\ncontent-length:" in data.lower()
    )


class HttpConnection(TCPServer):
    """Hypercorn's server for one connection, registered in a :class:`ConnectionTable`.

    Resource handling: :meth:`serve` always closes the socket, also when the
    connection is evicted (cancelled) in the middle of hypercorn's own closing.
    """

    def __init__(
        self,
        table: ConnectionTable,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream,
    ) -> None:
        # (TCPServer's annotation says SSLStream; it serves plain sockets as well.)
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self._socket = stream.socket
        self._table = table
        self._held_head = b""
        self._scope = trio.CancelScope()
        self.idle_task: IdleTimer = IdleTimer(  # type: ignore[assignment]
            config.keep_alive_timeout, context.terminated.wait, self._initiate_server_close
        )

    async def serve(self) -> None:
        self._table.idle(self)  # until its first request arrives
        try:
            with self._scope:
                await self.run()
        finally:
            self._table.not_idle(self)
            self._socket.close()

    def evict(self) -> None:
        """Close this connection now (it is idle: no request is in progress)."""
        self._scope.cancel()

    async def _read_data(self) -> None:
        """Hypercorn's read loop, except that data after a closing request is dropped."""
        protocol = getattr(self.protocol, "protocol", None)  # hypercorn's HTTP/1.1 protocol
        if isinstance(protocol, H11Protocol):
            protocol._send_error_response = functools.partial(  # type: ignore[method-assign]
                _send_json_protocol_error, protocol
            )
        try:
            while True:
                try:
                    with trio.fail_after(self.config.read_timeout or math.inf):
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                if data and self._closes_after_this_response():
                    continue
                await self.protocol.handle(RawData(bytes(data)))
                if not data:
                    break
            await self.protocol.handle(Closed())
        finally:
            # Nothing more will arrive: nothing to time out. (Hypercorn's timer
            # would keep the connection's task, and its slot, for the timeout.)
            self.idle_task.end()

    def _closes_after_this_response(self) -> bool:
        """Whether the connection ends once the response in progress is sent.

        The response (or its request) said ``Connection: close``: RFC 9112 §9.6, the
        server processes no further request on the connection. A client that pipelined
        more requests behind it sends data h11 refuses ("expecting EOF"); fed to it, that
        makes hypercorn close the connection at once, cutting off the response still
        being written (which was lost). It is dropped instead: the response completes,
        then the connection closes, and the client sends those requests again elsewhere.
        """
        protocol = getattr(self.protocol, "protocol", None)  # hypercorn's HTTP/1.1 protocol
        connection = getattr(protocol, "connection", None)
        return isinstance(connection, h11.Connection) and connection.their_state in (
            h11.MUST_CLOSE,
            h11.CLOSED,
        )

    async def _close(self) -> None:
        """Half-close and close the socket, after the write in progress (if any).

        Hypercorn's ``_close`` sends the end of the stream without its send lock, so
        from the read loop (a request that broke the protocol) it could overlap the
        response another task is writing: that write failed with BusyResourceError and
        the response was lost. A write that cannot finish (a client that reads nothing)
        is not waited for longer than :data:`CLOSE_WAITS_FOR_WRITE_S`: the socket is
        then closed under it.
        """
        with trio.move_on_after(CLOSE_WAITS_FOR_WRITE_S):
            async with self.send_lock:
                await super()._close()
                return
        await self.stream.aclose()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if self._held_head:
                event = RawData(self._held_head + event.data)
                self._held_head = b""
            elif not event.data:
                return
            elif _is_sized_response_head(event.data):
                # Its body follows at once: one write for both (module docstring).
                self._held_head = event.data
                return
        elif self._held_head:
            held, self._held_head = self._held_head, b""
            with trio.CancelScope(shield=isinstance(event, Closed)):  # as the Closed below
                await super().protocol_send(RawData(held))
        if isinstance(event, Updated):
            if event.idle:
                self._table.idle(self)
            else:
                self._table.not_idle(self)
        if isinstance(event, Closed):
            # Possibly called from the app's task, already cancelled (module docstring).
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
        else:
            await super().protocol_send(event)
