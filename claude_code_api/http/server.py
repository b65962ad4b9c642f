"""Hypercorn serving the app, as a supervised child in the service's trio run.

:class:`HttpServer` serves with ``hypercorn.trio.serve`` (its accept loop, its
connection lifetimes and graceful shutdown) and its settings; the fixes it still
needs, with why and what to send upstream, are in :mod:`._hypercorn_fixes`. In
front of the app sit two ASGI layers, outermost first:

* :func:`~._hypercorn_fixes.shield_final_send`: fixes 1 and 7 there (connections
  that close when they should, one access line per request);
* :meth:`HttpServer._front_door`: answers, without the app, what the app must not
  see: a request whose framing is ambiguous, and any request once shutdown has
  begun (the actors behind the app may have stopped).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart_trio import QuartTrio

from ..observe.logs import ACCESS_LOG_FORMAT
from ._hypercorn_fixes import AccessLogger, ConnectionTable, FixedConfig, shield_final_send
from .compat import error_body
from .parsing import json_bytes

log = logging.getLogger(__name__)

SHUTTING_DOWN = "service is shutting down"
AMBIGUOUS_LENGTH = "Content-Length and Transfer-Encoding must not both be sent"
# How long a refused request's body may take to arrive; it is read (and dropped)
# so that closing the connection does not reset it before the client reads the answer.
DISCARD_BODY_S = 1.0


def bind_address(host: str, port: int) -> str:
    """Hypercorn's ``bind`` for ``host`` and ``port`` (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpServer:
    """Owns hypercorn's server: its listening sockets and every open connection.

    ``request_stop`` closes the listeners and idle connections, lets requests in
    progress finish for ``graceful_timeout`` seconds, then cancels them (hypercorn's
    shutdown). ``refuse_new_requests`` (called when the service starts shutting
    down) makes every later request get 503 JSON with ``Connection: close``.
    ``max_connections`` bounds the connections open at once
    (:class:`~._hypercorn_fixes.ConnectionTable`).

    Error handling: a failure to bind raises from ``serve`` before ``started``; a
    connection whose handling fails is logged and closed, the others go on.
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
        self.connections = ConnectionTable(max_connections)
        self.config = FixedConfig(self.connections)
        self.config.bind = [bind_address(host, port)]
        # Through logging, in the service's format (see logs.py); no headers in it.
        self.config.accesslog = logging.getLogger("hypercorn.access")
        self.config.errorlog = logging.getLogger("hypercorn.error")
        self.config.access_log_format = ACCESS_LOG_FORMAT
        self.config.logger_class = AccessLogger
        self.config.graceful_timeout = graceful_timeout
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
        app = shield_final_send(self._front_door)
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, self.config, shutdown_trigger=self._stop.wait, mode="asgi")
            )
            log.info("%d connections at most", self.connections.limit)
            for bind in binds:
                log.info("listening on %s", bind)
            task_status.started(binds)

    async def _front_door(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """ASGI: refuse what the app must not see, pass everything else to it."""
        if scope["type"] == "http":
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
