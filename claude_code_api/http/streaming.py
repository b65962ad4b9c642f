"""Server-sent events: a job's reply as it happens (``POST /run`` with ``stream``).

:func:`event_stream` turns a job's :data:`~claude_code_api.messages.ReplyEvent` s
into SSE frames (through :func:`relay_stream`, which the OpenAI- and
Anthropic-compatible routes share with their own encoders: :mod:`.compat`),
each with a unique ``id:`` and one line of JSON ``data:``:
``queued``, ``started``, ``text``, ``tool_use``, ``tool_result``,
``upstream_retry``, then exactly one ``result`` or ``error``; nothing follows.
A comment line (``: keep-alive``) goes out after every :data:`KEEP_ALIVE_S` of
silence so that proxies do not close an idle stream.

The stream owns the request's job from the moment its response starts: when it
ends for any reason — its terminal event sent, the client gone (the response is
cancelled), the server stopping — it calls its ``on_end``, which cancels a run
still going exactly as a JSON request's departure does (:func:`~.jobs.open_job`).
If the response never even begins to iterate the stream (the client left
between the handler and the first byte), :func:`with_request_cleanups` runs
the same clean-up when the request ends, so a run is never left behind.

Error handling: an event that cannot be encoded is a bug and is logged, never
sent half-written; failures of the job itself arrive as the ``error`` event.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol

import attrs
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from ..messages import (
    TERMINAL_EVENTS,
    AssistantText,
    Job,
    JobFailed,
    JobStarted,
    Queued,
    ReplyEvent,
    RunResult,
    ToolResult,
    ToolUse,
    UpstreamRetry,
)
from .jobs import BACKSTOP_S, NO_ANSWER, OUTLIVED, Finished

log = logging.getLogger(__name__)

# Silence after which a comment line is sent (proxies commonly close idle streams at 30-60 s).
KEEP_ALIVE_S = 15.0
KEEP_ALIVE = b": keep-alive\n\n"
# Events sent in one write at most, when several are waiting.
MAX_BATCH = 64
# A tool call's input is summarised in at most this many characters.
SUMMARY_CHARS = 200
# Input fields that say what a tool call does, in the order they are looked for.
SUMMARY_FIELDS = ("command", "file_path", "path", "pattern", "url", "query", "description")

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers responses unless told not to.
    "X-Accel-Buffering": "no",
}

Cleanup = Callable[[], Awaitable[None]]
_request_cleanups: contextvars.ContextVar[list[Cleanup] | None] = contextvars.ContextVar(
    "request_cleanups", default=None
)


def wants_event_stream(stream: bool | None, accept: str | None) -> bool:
    """Whether to stream: the body's ``stream`` if given, else ``Accept: text/event-stream``."""
    if stream is not None:
        return stream
    for item in (accept or "").split(","):
        media_type, *params = (part.strip() for part in item.split(";"))
        if media_type.lower() != "text/event-stream":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return True
        return True
    return False


def tool_summary(tool_input: dict[str, Any]) -> str:
    """A short, one-line idea of what a tool call does (its command, file, pattern...)."""
    for field in SUMMARY_FIELDS:
        value = tool_input.get(field)
        if isinstance(value, str) and value:
            text = value
            break
    else:
        text = json.dumps(tool_input, ensure_ascii=False, default=str) if tool_input else ""
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def frame(event_id: int, name: str, data: dict[str, Any]) -> bytes:
    """One SSE event. ``json.dumps`` writes no newline, so ``data:`` is one line.

    A lone surrogate (JSON lets a string hold one, and agents' text may: half an
    emoji) has no UTF-8 form: it goes out as its JSON escape ``\\udXXX``, which
    only ever occurs inside a JSON string here, as a JSON reply writes it.
    """
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event_id}\nevent: {name}\ndata: {payload}\n\n".encode("utf-8", "backslashreplace")


def event_data(event: ReplyEvent, job: Job) -> tuple[str, dict[str, Any]] | None:
    """The SSE name and data of a non-terminal event (None: not shown to clients)."""
    match event:
        case Queued(position):
            return "queued", {"runId": job.id, "position": position}
        case JobStarted(at=at):
            queued_ms = max(0, round((at - job.submitted_at) * 1000))
            return "started", {"runId": job.id, "queuedMs": queued_ms}
        case AssistantText(text):
            return "text", {"text": text}
        case ToolUse(name, tool_input):
            return "tool_use", {"name": name, "summary": tool_summary(tool_input)}
        case ToolResult(ok):
            return "tool_result", {"ok": ok}
        case UpstreamRetry(status, message, attempt, max_retries):
            return "upstream_retry", {
                "status": status,
                "message": message,
                "attempt": attempt,
                "maxRetries": max_retries,
            }
    return None


class StreamEncoder(Protocol):
    """How a stream writes a job's events: ``/run``'s events, or a compatible route's."""

    def event(self, event: ReplyEvent) -> bytes:
        """The bytes for a non-terminal event (empty: not shown to clients)."""
        ...

    def terminal(self, finished: Finished) -> bytes:
        """The bytes that end the stream (the result, or the failure)."""
        ...


@attrs.define
class RunEvents:
    """``POST /run``'s SSE events (see the module docstring), numbered from 1."""

    job: Job
    result_body: Callable[[RunResult, Finished, Job], dict[str, Any]]
    numbers: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    def event(self, event: ReplyEvent) -> bytes:
        shown = event_data(event, self.job)
        return b"" if shown is None else frame(next(self.numbers), *shown)

    def terminal(self, finished: Finished) -> bytes:
        return terminal_frame(next(self.numbers), self.job, finished, self.result_body)


def event_stream(
    job: Job,
    events: trio.MemoryReceiveChannel[ReplyEvent],
    first: ReplyEvent,
    *,
    result_body: Callable[[RunResult, Finished, Job], dict[str, Any]],
    on_end: Callable[[Finished | None], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """SSE frames for ``job``: ``first`` (already received), then every event up to the terminal one.

    ``result_body`` makes the ``result`` event's data (the JSON reply's body).
    ``on_end(finished)`` runs however the stream ends (``finished`` None: before
    its terminal event — the client left or the server stopped).
    """
    return relay_stream(job, events, first, RunEvents(job, result_body), on_end=on_end)


async def relay_stream(
    job: Job,
    events: trio.MemoryReceiveChannel[ReplyEvent],
    first: ReplyEvent,
    encoder: StreamEncoder,
    *,
    on_end: Callable[[Finished | None], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """``encoder``'s bytes for ``first`` and every later event of ``job``, up to the terminal one.

    Keep-alive comments after :data:`KEEP_ALIVE_S` of silence; a job that outlives its
    deadline and the backstop ends as a 504. ``on_end`` as for :func:`event_stream`.
    """
    started_at: float | None = None
    finished: Finished | None = None
    backstop = job.deadline + BACKSTOP_S
    try:
        batch: list[ReplyEvent] = [first]
        while finished is None:
            if not batch:
                event: ReplyEvent | None = None
                # Never yield inside a cancel scope: receive in it, send outside.
                with trio.move_on_at(min(backstop, trio.current_time() + KEEP_ALIVE_S)):
                    try:
                        event = await events.receive()
                    except trio.EndOfChannel:
                        event = NO_ANSWER
                if event is None:
                    if trio.current_time() < backstop:
                        yield KEEP_ALIVE
                        continue
                    event = OUTLIVED
                batch = [event]
            # Events that have arrived meanwhile go out in the same write: a stream that
            # fell behind (a busy machine, a slow client) catches up in fewer sends.
            batch += _already_arrived(events, MAX_BATCH - len(batch))
            frames = []
            for event in batch:
                if isinstance(event, JobStarted):
                    started_at = event.at
                if isinstance(event, TERMINAL_EVENTS):
                    finished = Finished(event, started_at)
                    frames.append(encoder.terminal(finished))
                    break  # nothing follows it
                frames.append(encoder.event(event))
            batch = []
            payload = b"".join(frames)
            if payload:
                yield payload
    finally:
        await on_end(finished)


def _already_arrived(events: trio.MemoryReceiveChannel[ReplyEvent], limit: int) -> list[ReplyEvent]:
    """Up to ``limit`` events waiting in ``events`` now (a closed channel: the 502 answer)."""
    arrived: list[ReplyEvent] = []
    while len(arrived) < limit:
        try:
            arrived.append(events.receive_nowait())
        except trio.WouldBlock:
            break
        except trio.EndOfChannel:
            arrived.append(NO_ANSWER)
            break
    return arrived


def terminal_frame(
    event_id: int,
    job: Job,
    finished: Finished,
    result_body: Callable[[RunResult, Finished, Job], dict[str, Any]],
) -> bytes:
    terminal = finished.terminal
    if isinstance(terminal, JobFailed):
        data = {"error": terminal.error, "status": terminal.status, "runId": job.id}
        return frame(event_id, "error", data)
    return frame(event_id, "result", result_body(terminal, finished, job))


# --- clean-up when a request ends ---------------------------------------------


def on_request_end(cleanup: Cleanup) -> None:
    """Run ``cleanup`` when the current HTTP request is over, however it ended.

    For what a streamed response owns: if the response never starts iterating
    its body, its own ``finally`` never runs. ``cleanup`` must be idempotent.
    """
    cleanups = _request_cleanups.get()
    if cleanups is not None:
        cleanups.append(cleanup)


def with_request_cleanups(
    asgi_app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]],
) -> Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]:
    """ASGI middleware: runs what :func:`on_request_end` registered once a request is over.

    The handler runs in tasks started from here, which copy this context: they
    see the same list. The clean-ups run shielded (the request may be cancelled).
    """

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return
        cleanups: list[Cleanup] = []
        token = _request_cleanups.set(cleanups)
        try:
            await asgi_app(scope, receive, send)
        finally:
            _request_cleanups.reset(token)
            with trio.CancelScope(shield=True):
                for cleanup in reversed(cleanups):
                    try:
                        await cleanup()
                    except Exception:
                        log.exception("clean-up after %s failed", scope.get("path"))

    return app
