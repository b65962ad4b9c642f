"""Hypercorn serving the app, as a supervised child in the service's trio run.

:class:`HttpServer` runs hypercorn's per-connection protocol
(:class:`~.connections.HttpConnection`) under its own accept loop instead of
``hypercorn.trio.serve``, so that it can bound open connections
(:mod:`.connections`). In front of the app sits a small ASGI layer that answers,
without the app, what the app must not see: a request whose framing is
ambiguous, and any request once shutdown has begun.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import attrs
import trio
from hypercorn.config import Config
from hypercorn.logging import Logger
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    ConnectionState,
    Scope,
    WWWScope,
)
from hypercorn.utils import repr_socket_addr, wrap_app
from quart_trio import QuartTrio

from ..logs import ACCESS_LOG_FORMAT
from .compat import error_body
from .connections import ConnectionTable, HttpConnection
from .json_run import json_bytes

log = logging.getLogger(__name__)

SHUTTING_DOWN = "service is shutting down"
AMBIGUOUS_LENGTH = "Content-Length and Transfer-Encoding must not both be sent"
# accept() failing for want of descriptors or memory: wait and retry, as trio's serve_listeners.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_S = 0.1
# How long a refused request's body may take to arrive; it is read (and dropped)
# so that closing the connection does not reset it before the client reads the answer.
DISCARD_BODY_S = 1.0


# Where the front door keeps a request's ResponseProgress in its ASGI scope.
PROGRESS_KEY = "claude_code_api.response_progress"


@attrs.define
class ResponseProgress:
    """How much of a request's response the app has handed to hypercorn, for its access line.

    Kept in the request's scope by the front door (:data:`PROGRESS_KEY`), read by
    :class:`AccessLogger`. A sized response counts as complete once its declared
    length has been handed over: the client may have it all and close before the
    app's last (empty) message.
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


def response_progress(scope: WWWScope | Scope) -> ResponseProgress | None:
    progress = cast(Mapping[str, Any], scope).get(PROGRESS_KEY)
    return progress if isinstance(progress, ResponseProgress) else None


class AccessLogger(Logger):
    """Hypercorn's logger, with an access line's fields computed for our format only,
    and one line per request.

    Hypercorn's own atoms copy every request header, every response header and
    every environment variable into a dict for each line, which was most of an
    access line's cost; :data:`~..logs.ACCESS_LOG_FORMAT` uses six fields. Each is
    computed as hypercorn computes it (a test compares the lines).

    Hypercorn logs a request when its response ends, and also when its connection
    closes first, with no response (``"GET /health" - -``). A client that closes as
    soon as it has a whole sized response can do so before the app's last message:
    that made two lines, the second with the status. Here a request's first line is
    its only one, and a response whose declared length was all handed over is
    logged with its status even when the connection closed before it ended.
    """

    async def access(self, request: WWWScope, response: Any, request_time: float) -> None:
        progress = response_progress(request)
        if progress is not None:
            if progress.logged:
                return
            progress.logged = True
            if response is None and progress.complete:
                response = progress.head
        await super().access(request, response, request_time)

    def atoms(self, request: Any, response: Any, request_time: float) -> Mapping[str, str]:
        client = request.get("client")
        if client is None:
            remote = "None"  # (hypercorn formats its None)
        elif len(client) == 2:
            remote = f"{client[0]}:{client[1]}"
        else:
            remote = str(client[0]) if len(client) == 1 else f"<???{client}???>"
        status = length = "-"
        if response is not None:
            status = str(response["status"])
            for name, value in response.get("headers", []):
                if name.lower() == b"content-length":
                    length = value.decode("latin1")
        return {
            "h": remote,
            "m": request["method"] if request["type"] == "http" else "GET",
            "U": request["path"],
            "s": status,
            "b": length,
            "L": f"{request_time:.6f}",
        }


class HttpServer:
    """Owns the listening sockets and every open connection.

    ``request_stop`` closes the listeners, closes idle connections, lets requests
    in progress finish for ``graceful_timeout`` seconds, then cancels them.
    ``refuse_new_requests`` (called when the service starts shutting down) makes
    every later request get 503 JSON with ``Connection: close``, answered here
    without touching the app or the actors behind it, which may already have stopped.

    Error handling: a failure to bind raises from ``serve`` before ``started``;
    ``accept`` failing for want of descriptors is logged and retried; a connection
    whose handling fails is logged and closed, the others go on.
    """

    def __init__(
        self,
        app: QuartTrio,
        host: str,
        port: int,
        graceful_timeout: float,
        max_connections: int,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.config = Config()
        # Through logging, in the service's format (see logs.py); no headers in it.
        self.config.accesslog = logging.getLogger("hypercorn.access")
        self.config.access_log_format = ACCESS_LOG_FORMAT
        self.config.logger_class = AccessLogger
        self.config.graceful_timeout = graceful_timeout
        self.connections = ConnectionTable(max_connections)
        self.refusing = False
        self._stop = trio.Event()

    def refuse_new_requests(self) -> None:
        """From now on, answer every request 503 ``service is shutting down`` and close."""
        self.refusing = True

    def request_stop(self) -> None:
        self.refusing = True
        self._stop.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``request_stop``; ``started`` with the bound addresses."""
        app = wrap_app(self._front_door, self.config.wsgi_max_body_size, "asgi")
        context = WorkerContext(None)
        state: dict[str, Any] = {}
        lifespan = Lifespan(app, self.config, state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            # A short backlog (hypercorn's 100): when the table is full and a crowd
            # keeps connecting, the kernel drops the crowd's SYNs (they retry after
            # 1 s, 3 s...) instead of queueing thousands ahead of everyone else.
            listeners = await trio.open_tcp_listeners(
                self.port, host=self.host, backlog=self.config.backlog
            )
            binds = [
                f"http://{repr_socket_addr(each.socket.family, each.socket.getsockname())}"
                for each in listeners
            ]
            log.info("%d connections at most", self.connections.limit)
            for bind in binds:
                log.info("listening on %s", bind)

            async def serve_connection(stream: trio.SocketStream) -> None:
                try:
                    connection = HttpConnection(
                        self.connections,
                        app,
                        self.config,
                        context,
                        ConnectionState(state.copy()),
                        stream,
                    )
                    await connection.serve()
                except Exception:
                    # A failure inside hypercorn's handling of one connection (e.g. its
                    # HTTP/2 code's KeyError on data for a stream already answered) must
                    # not reach the shared nursery: it would cancel every other
                    # connection, and the server's restarts would soon stop the service.
                    log.exception("connection failed inside the HTTP server; closed")
                finally:
                    self.connections.release()

            async with trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(
                                self._accept, listener, connections, serve_connection
                            )
                        task_status.started(binds)
                        await self._stop.wait()
                        accepting.cancel_scope.cancel()
                finally:
                    for listener in listeners:
                        listener.socket.close()
                # Idle connections close now; busy ones after their response.
                await context.terminated.set()
                connections.cancel_scope.deadline = (
                    trio.current_time() + self.config.graceful_timeout
                )
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _accept(
        self,
        listener: trio.SocketListener,
        connections: trio.Nursery,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        """Accept connections while the table has room (it makes room from idle ones)."""
        while True:
            if not self.connections.try_reserve():
                # Full: wait for a client before making room, so that an idle
                # connection is closed only for someone who is actually waiting.
                await trio.lowlevel.wait_readable(listener.socket)
                await self.connections.reserve()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.connections.release()
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in %gs", exc, ACCEPT_RETRY_S)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            connections.start_soon(handler, stream)

    async def _front_door(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """ASGI: refuse what the app must not see, pass everything else to it."""
        if scope["type"] == "http":
            progress = ResponseProgress()
            cast(dict[str, Any], scope)[PROGRESS_KEY] = progress
            inner_send = send

            async def send(message: ASGISendEvent) -> None:
                # Before handing it over: the client may have it, and close, before this returns.
                progress.note(message)
                await inner_send(message)

            if self.refusing:
                body = error_body(scope["path"], 503, SHUTTING_DOWN)
                if scope["path"] == "/health":
                    body["status"] = "stopping"  # what /health says while the service stops
                await _refuse(receive, send, 503, body)
                return
            names = {name.lower() for name, _value in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                # RFC 9112 §6.1: the length is ambiguous (a smuggling vector); the
                # connection must be closed after responding.
                await _refuse(receive, send, 400, error_body(scope["path"], 400, AMBIGUOUS_LENGTH))
                return
        await self.app(scope, receive, send)


async def _refuse(
    receive: ASGIReceiveCallable, send: ASGISendCallable, status: int, body: dict[str, Any]
) -> None:
    """Answer ``status`` with a JSON body and ``Connection: close``, dropping the request body."""
    with trio.move_on_after(DISCARD_BODY_S):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
    payload = json_bytes(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})
