"""``POST /run`` (a JSON reply or a stream of events) and ``DELETE /runs/{runId}``.

A Quart blueprint; the app hands it how to tell who is calling and how to read
a JSON body, as to every route. Every run has an id, the job's: header
``X-Run-Id`` and field ``runId`` in every reply about it.

* ``POST /run`` reads its body once, submits the run and waits for the
  dispatcher's answer (queued, or a refusal: 429, 503... as a JSON error).
  Without ``stream`` (or ``Accept: text/event-stream``) the reply is the
  original's JSON, with fields added (:func:`result_body`), once the run ends;
  with it, a run that was taken becomes a ``text/event-stream`` (:mod:`.streaming`).
* ``DELETE /runs/{runId}`` cancels the caller's own queued or running run; the
  run's own request then answers ``cancelled``. Anyone else's run, or an unknown
  or finished one, is a 404. With several replicas (:class:`OtherReplicas`), a run
  unknown here is looked for on the others and cancelled where it runs: ``202``
  ``{"cancelled": false, "cancelling": true}`` if that replica did not say within
  seconds whether it was, ``503`` if the database holding the runs does not answer.

A request that ends before its run does (the client left) cancels it, streamed
or not (:func:`~.jobs.open_job`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
from quart import Blueprint, Response, jsonify, request

from ..messages import (
    DispatcherMessage,
    Job,
    JobFailed,
    PoolSnapshot,
    ReplyEvent,
    RunOptions,
    RunResult,
    RunView,
    TerminalEvent,
)
from ..store.errors import StoreUnavailable
from .jobs import Finished, cancel_run, follow_job, open_job
from .parsing import json_bytes, parse_body
from .requests import ImageLimits, OptionCeiling, RunRequest, parse_run_request
from .streaming import STREAM_HEADERS, event_stream, on_request_end, wants_event_stream
from .user_claude import SharedUserMemory, load_memory

log = logging.getLogger(__name__)


class OtherReplicas(Protocol):
    """The runs of the other replicas on the same database
    (:class:`~claude_code_api.actors.replica_runs.ReplicaRuns`); both raise
    :class:`~claude_code_api.store.StoreUnavailable` when the database does not answer."""

    async def runs_of(self, user_id: str) -> tuple[RunView, ...]:
        """``user_id``'s queued and running runs on the other live replicas."""
        ...

    async def cancel(self, user_id: str, run_id: str) -> bool | None:
        """Cancel it where it runs: True done, False no such run, None no answer in time."""
        ...


def result_body(outcome: RunResult, finished: Finished, job: Job) -> dict[str, Any]:
    """The JSON reply of a run that ended: the original's fields, then ours."""
    body: dict[str, Any] = {
        "success": outcome.success,
        "output": outcome.output,
        "durationMs": outcome.duration_ms,
        "timedOut": outcome.timed_out,
    }
    if outcome.timed_out:
        body["timeoutType"] = "hard"  # as the original reports it
    if outcome.output_truncated:
        body["outputTruncated"] = True
    if outcome.cancelled:
        body["cancelled"] = True
    if outcome.stopped:
        body["stopped"] = True
    if outcome.upstream_error is not None:
        body["upstreamError"] = {
            "status": outcome.upstream_error.status,
            "message": outcome.upstream_error.message,
            "retries": outcome.upstream_error.retries,
        }
    body["runId"] = job.id
    if job.session_id is not None:
        body["sessionId"] = job.session_id
    body.update(
        {
            "claudeSessionId": outcome.claude_session_id,
            "model": outcome.model,
            "costUsd": outcome.cost_usd,
            "usage": outcome.usage,
            "numTurns": outcome.num_turns,
            "queuedMs": finished.queued_ms(job),
        }
    )
    if outcome.lowered_options:
        body["loweredOptions"] = outcome.lowered_options
    return body


def failure_reply(
    failure: JobFailed, run_id: str | None = None
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The body and headers answering a run that failed (or a request about no run)."""
    body: dict[str, Any] = {"error": failure.error}
    headers = []
    if run_id is not None:
        body["runId"] = run_id
        headers.append(("X-Run-Id", run_id))
    if failure.retry_after_s is not None:
        headers.append(("Retry-After", str(failure.retry_after_s)))
    return body, headers


def json_reply(finished: Finished, job: Job) -> Response:
    """The JSON reply of a run that ended: its result, or its failure."""
    terminal = finished.terminal
    if isinstance(terminal, JobFailed):
        return error_reply(terminal, job.id)
    # In the documented order, the original's four fields first (as a stream's
    # `result` event has them), not sorted as the other replies are.
    body = json_bytes(result_body(terminal, finished, job), sort_keys=False)
    return Response(body, 200, content_type="application/json", headers={"X-Run-Id": job.id})


def error_reply(failure: JobFailed, run_id: str | None = None) -> Response:
    body, headers = failure_reply(failure, run_id)
    response = jsonify(body)
    response.status_code = failure.status
    for name, value in headers:
        response.headers[name] = value
    return response


def run_views(snapshot: PoolSnapshot, elsewhere: tuple[RunView, ...] = ()) -> list[dict[str, Any]]:
    """``/status``'s ``runs``: the caller's queued and running runs, here and
    ``elsewhere`` (other replicas'), the oldest first (times in ms)."""
    views = []
    for run in sorted(snapshot.runs + elsewhere, key=lambda run: run.queued_at):
        view: dict[str, Any] = {
            "runId": run.run_id,
            "state": run.state.value,
            "queuedAt": round(run.queued_at * 1000),
        }
        if run.session_id is not None:
            view["sessionId"] = run.session_id
        if run.started_at is not None:
            view["startedAt"] = round(run.started_at * 1000)
        views.append(view)
    return views


def outcome_word(outcome: TerminalEvent | None) -> str:
    if outcome is None:
        return "client gone"
    if isinstance(outcome, JobFailed):
        return f"{outcome.status} {outcome.error}"
    if outcome.cancelled:
        return "cancelled"
    if outcome.timed_out:
        return "timed out"
    return "ok" if outcome.success else "agent error"


def log_run_end(
    user_id: str,
    run_request: RunRequest,
    started: float,
    run_id: str,
    outcome: TerminalEvent | None,
    how: str,
) -> None:
    """The one log line of a run that ended (``started``: ``time.monotonic()`` at submission)."""
    log.info(
        "run user=%s session=%s prompt_chars=%d%s -> %s in %.0f ms (%s, run %s)",
        user_id,
        run_request.session_id or "-",
        len(run_request.prompt),
        _options_note(run_request.options),
        outcome_word(outcome),
        (time.monotonic() - started) * 1000,
        how,
        run_id,
        extra={"runId": run_id, "userId": user_id, "sessionId": run_request.session_id},
    )


@attrs.define
class StartedRun:
    """A run submitted for the current request, and the dispatcher's first answer.

    ``first`` is :class:`Queued`, or the refusal (a :class:`JobFailed`: 429, 503...).
    :meth:`close` ends the run if it is still going (the request is over); it also
    runs when the request ends without it (:func:`~.streaming.on_request_end`).
    """

    job: Job
    events: trio.MemoryReceiveChannel[ReplyEvent]
    first: ReplyEvent
    _owned: AsyncExitStack

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self._owned.aclose()

    async def follow(self) -> Finished:
        """Wait for the run's end (its terminal event); the refusal if it was refused."""
        if isinstance(self.first, JobFailed):
            return Finished(self.first)
        return await follow_job(self.job, self.events)


async def start_run(
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    user_id: str,
    run_request: RunRequest,
    *,
    data_dir: Path,
    default_timeout_ms: int,
    shared_memory: SharedUserMemory | None = None,
) -> StartedRun:
    """Submit ``run_request`` as ``user_id``'s job and wait for the dispatcher's answer.

    The one way every route that runs an agent (``/run``, the compatible routes)
    hands its request to the dispatcher. Raises :class:`MemoryUnavailable` when the
    user's CLAUDE.md cannot be read.
    """
    # A one-shot's agent was warmed before its user was known: it gets their CLAUDE.md
    # with the prompt. (A session's agent loads it from the user's HOME.)
    memory = None
    if run_request.session_id is None:
        memory = await load_memory(data_dir, user_id, shared_memory) or None
    submit = open_job(
        dispatcher,
        user_id=user_id,
        prompt=run_request.prompt,
        timeout_s=(run_request.timeout_ms or default_timeout_ms) / 1000,
        session_id=run_request.session_id,
        memory=memory,
        options=run_request.options,
        images=run_request.images,
    )
    owned = AsyncExitStack()
    job, events = await owned.enter_async_context(submit)
    on_request_end(owned.aclose)  # if a stream never starts, the run still ends
    try:
        first = await events.receive()
    except BaseException:
        with trio.CancelScope(shield=True):
            await owned.aclose()
        raise
    return StartedRun(job, events, first, owned)


def run_routes(
    *,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    caller: Callable[[], str],
    json_body: Callable[[], Awaitable[bytes]],
    data_dir: Path,
    max_prompt_chars: int,
    max_timeout_ms: int,
    default_timeout_ms: int,
    ceiling: OptionCeiling,
    image_limits: ImageLimits,
    other_replicas: OtherReplicas | None = None,
    shared_memory: SharedUserMemory | None = None,
) -> Blueprint:
    """The ``/run`` and ``/runs`` routes, for ``app.register_blueprint``."""
    routes = Blueprint("runs", __name__)

    parse = partial(
        parse_run_request,
        max_prompt_chars=max_prompt_chars,
        max_timeout_ms=max_timeout_ms,
        ceiling=ceiling,
        image_limits=image_limits,
    )

    @routes.post("/run")
    async def run() -> Response:
        user_id = caller()
        run_request = await parse_body(await json_body(), parse)
        streamed = wants_event_stream(run_request.stream, request.headers.get("accept"))
        began = time.monotonic()

        def log_end(run_id: str, outcome: TerminalEvent | None, how: str) -> None:
            log_run_end(user_id, run_request, began, run_id, outcome, how)

        # A stream's status must be known before it starts: the dispatcher's answer
        # (queued, or a refusal) comes first, for both kinds of reply.
        started = await start_run(
            dispatcher,
            user_id,
            run_request,
            data_dir=data_dir,
            default_timeout_ms=default_timeout_ms,
            shared_memory=shared_memory,
        )
        return await _reply(started, streamed, log_end)

    @routes.delete("/runs/<run_id>")
    async def delete_run(run_id: str) -> Response:
        user_id = caller()
        cancelled: bool | None = await cancel_run(dispatcher, user_id, run_id)
        if not cancelled and other_replicas is not None:
            try:
                cancelled = await other_replicas.cancel(user_id, run_id)
            except StoreUnavailable as exc:
                return error_reply(JobFailed(503, str(exc)))
            if cancelled is None:  # asked, but its replica did not say in time
                response = jsonify({"cancelled": False, "cancelling": True})
                response.status_code = 202
                return response
        if not cancelled:
            return error_reply(JobFailed(404, f"Run {run_id[:200]!r} not found"))
        return jsonify({"cancelled": True})

    return routes


async def _reply(
    started: StartedRun,
    streamed: bool,
    log_end: Callable[[str, TerminalEvent | None, str], None],
) -> Response:
    """The run's reply: its JSON once it ends, or its event stream (a refusal is JSON).

    Resource handling: the run is closed when the JSON reply is ready, when a stream
    is refused, or when a stream ends (also cancelled, the client gone).
    """
    job = started.job
    if not streamed:
        try:
            finished = await started.follow()
        finally:
            # Also when the client left (the request is cancelled): the run ends.
            await started.close()
        log_end(job.id, finished.terminal, "json")
        return json_reply(finished, job)
    if isinstance(started.first, JobFailed):
        await started.close()
        log_end(job.id, started.first, "stream refused")
        return error_reply(started.first, job.id)

    async def end(finished: Finished | None) -> None:
        # Also when the stream is cancelled (the client left): the run must end.
        await started.close()
        log_end(job.id, None if finished is None else finished.terminal, "stream")

    body = event_stream(job, started.events, started.first, result_body=result_body, on_end=end)
    return Response(body, 200, headers={**STREAM_HEADERS, "X-Run-Id": job.id})


def _options_note(options: RunOptions) -> str:
    """The options a request set, for its log line (names only: a prompt is private)."""
    given = sorted(options.to_json())
    return f" options={','.join(given)}" if given else ""
