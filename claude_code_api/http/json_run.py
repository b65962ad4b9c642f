"""``POST /run`` with a JSON reply, served on plain ASGI in front of Quart.

The service's most frequent request skips Quart's request and response objects,
its request context and its two tasks per request: measured, that is a large
share of a turn's overhead over the agent's own time (see README,
"Performance"). It behaves as the Quart routes do (:mod:`.app`, :mod:`.runs`):
the same authentication, ``Content-Type`` check, body limit (413), validation
(:func:`~.requests.parse_run_request`), JSON errors, reply body
(:func:`~.runs.result_body`), ``X-Run-Id`` and ``Retry-After`` headers and log line,
and ``Connection: close`` after an error answered before the body was read. A
request that asks for a stream (``"stream": true``, or ``Accept:
text/event-stream``) is handed to the Quart app with its body replayed; so is
every other route and method.

A client that disconnects before its answer cancels the request at once (as
quart-trio does): the job's cancellation interrupts its agent. Anything
unexpected is logged and answered 500 JSON, like the Quart app's handler.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..config import Settings
from ..messages import DispatcherMessage, Job, JobFailed
from .auth import Unauthorized, authenticate
from .jobs import Finished, follow_job, open_job
from .observe import note_route
from .parsing import parse_body
from .requests import (
    BadRequest,
    ImageLimits,
    OptionCeiling,
    check_content_type,
    parse_run_request,
)
from .runs import failure_reply, log_run_end, result_body
from .streaming import wants_event_stream
from .user_claude import MemoryUnavailable, load_memory

log = logging.getLogger(__name__)

AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]

# Quart's default BODY_TIMEOUT: how long a request body may take to arrive.
BODY_TIMEOUT_S = 60.0


def json_bytes(value: Any, *, sort_keys: bool = True) -> bytes:
    """JSON as Quart's ``jsonify`` writes it: sorted keys, compact, ASCII, a final newline.

    ``sort_keys=False`` keeps the keys in their order (a run's result: see README)."""
    return (json.dumps(value, sort_keys=sort_keys, separators=(",", ":")) + "\n").encode()


def serve_json_runs(
    app: AsgiApp,
    *,
    settings: Settings,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    ceiling: OptionCeiling,
) -> AsgiApp:
    """ASGI: answer ``POST /run`` (JSON replies) here, pass everything else to ``app``."""
    data_dir: Path = settings.data_dir
    parse = partial(
        parse_run_request,
        max_prompt_chars=settings.max_prompt_chars,
        max_timeout_ms=settings.max_timeout_ms,
        ceiling=ceiling,
        image_limits=ImageLimits.of(settings),
    )

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/run" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        note_route(scope, "/run")
        request = _Request(scope, receive, send)
        try:
            await _run(request)
        except _ClientGone:
            pass
        except _Delegate as delegate:
            await app(scope, delegate.replay, send)
        except Exception:
            log.exception("unexpected error handling POST /run")
            if not request.answered:
                await request.reply(500, {"error": "internal error"})

    async def _run(request: _Request) -> None:
        try:
            user_id = authenticate(request.headers, settings)
            check_content_type(request.headers.get("content-type"))
            body = await request.read_body(settings.max_body_bytes)
            run_request = await parse_body(body, parse)
            if wants_event_stream(run_request.stream, request.headers.get("accept")):
                raise _Delegate(body, request.receive)
            # A one-shot's agent was warmed before its user was known: it gets their
            # CLAUDE.md with the prompt. (A session's agent loads it from the user's HOME.)
            memory = None
            if run_request.session_id is None:
                memory = await load_memory(data_dir, user_id) or None
        except Unauthorized as exc:
            await request.reply(401, {"error": exc.message})
            return
        except BadRequest as exc:
            await request.reply(exc.status, {"error": exc.message})
            return
        except MemoryUnavailable as exc:
            await request.reply(503, {"error": exc.message})
            return
        started = time.monotonic()
        finished: Finished | None = None
        async with trio.open_nursery() as nursery:
            # The client leaving ends the request (and so the job) at once. The watcher
            # is stopped after the reply: its exit is one more scheduler round.
            nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope)
            async with open_job(
                dispatcher,
                user_id=user_id,
                prompt=run_request.prompt,
                timeout_s=(run_request.timeout_ms or settings.default_timeout_ms) / 1000,
                session_id=run_request.session_id,
                memory=memory,
                options=run_request.options,
                images=run_request.images,
            ) as (job, events):
                finished = await follow_job(job, events)
            await _reply_with(request, finished, job)
            nursery.cancel_scope.cancel()
        if finished is None:
            return  # the client left: nobody was answered
        # After the reply: writing the line is not the client's wait.
        log_run_end(user_id, run_request, started, job.id, finished.terminal, "json")

    return serve


async def _reply_with(request: _Request, finished: Finished, job: Job) -> None:
    """The JSON reply of a run that ended: its result, or its failure."""
    terminal = finished.terminal
    if isinstance(terminal, JobFailed):
        body, headers = failure_reply(terminal, job.id)
        encoded = [(name.lower().encode(), value.encode()) for name, value in headers]
        await request.reply(terminal.status, body, encoded)
    else:
        run_id = [(b"x-run-id", job.id.encode())]
        # In the documented order, the original's four fields first (as a stream's
        # `result` event has them), not sorted as the other replies are.
        body = result_body(terminal, finished, job)
        await request.reply(200, body, run_id, sort_keys=False)


class _ClientGone(Exception):
    """The client left while its request's body was being read: nobody to answer."""


class _Delegate(Exception):
    """Hand the request to the Quart app: its body, read already, is replayed to it."""

    def __init__(self, body: bytes, receive: Callable[[], Awaitable[Any]]) -> None:
        super().__init__("delegated")
        self._body: bytes | None = body
        self._receive = receive

    async def replay(self) -> Any:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()


class _Request:
    """One ``POST /run``: its headers, its body as read so far, and its one reply."""

    def __init__(self, scope: Any, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        self.receive = receive
        self._send = send
        # Lower-cased names; the first of repeated headers, as werkzeug's Headers.get.
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            self.headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        length = self.headers.get("content-length", "")
        chunked = "chunked" in self.headers.get("transfer-encoding", "")
        self._has_body = chunked or (length.isdigit() and int(length) > 0)
        self._body_read = False
        self.answered = False

    async def read_body(self, limit: int) -> bytes:
        """The whole body; 413 beyond ``limit`` bytes, 408 if it takes over BODY_TIMEOUT_S."""
        too_large = BadRequest(f"Request body exceeds {limit} bytes", 413)
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(BODY_TIMEOUT_S) as waited:
            while True:
                message = await self.receive()
                if message["type"] != "http.request":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if waited.cancelled_caught:
            raise BadRequest(f"Request body not received within {BODY_TIMEOUT_S:g} s", 408)
        self._body_read = True
        return b"".join(chunks)

    async def reply(
        self,
        status: int,
        body: Any,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        sort_keys: bool = True,
    ) -> None:
        payload = json_bytes(body, sort_keys=sort_keys)
        all_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *(headers or []),
        ]
        # An error answered before the body was read leaves that body on a kept-alive
        # connection and would wedge the next request.
        if status >= 400 and self._has_body and not self._body_read:
            all_headers.append((b"connection", b"close"))
        self.answered = True
        await self._send({"type": "http.response.start", "status": status, "headers": all_headers})
        await self._send({"type": "http.response.body", "body": payload, "more_body": False})


async def _cancel_on_disconnect(
    receive: Callable[[], Awaitable[Any]], scope: trio.CancelScope
) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
