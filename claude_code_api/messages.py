"""Every message that travels on a channel between actors.

Messages are frozen attrs classes and nothing else travels on channels. The
channels themselves, and who owns them:

* ``HTTP handler -> dispatcher``: the dispatcher's inbox (:class:`Submit`,
  :class:`Withdraw`, :class:`StatusRequest`). Owned by the supervisor tree; each
  sender holds a clone.
* ``worker -> dispatcher``: the same inbox (:class:`WorkerStarting`,
  :class:`WorkerReady`, :class:`WorkerFinished`, :class:`WorkerFailed`).
* ``dispatcher -> worker``: each worker's own job inbox; the worker owns the
  receive end, the dispatcher holds the send end it was given in :class:`WorkerReady`.
* ``dispatcher -> session supervisor``: :class:`StartSession` on the supervisor's
  inbox (the dispatcher owns the send end).
* ``dispatcher -> session actor``: the actor's inbox, offered in
  :class:`SessionStarted`; the actor owns the receive end. It carries :class:`Job`,
  :class:`Hibernate` and :class:`CloseSessionNow`; jobs only while the actor is idle.
* ``session actor -> dispatcher``: :class:`SessionStarted`, :class:`SessionIdle`;
  its supervisor sends :class:`SessionStopped` when it ends.
* ``whoever holds the job -> HTTP handler``: ``Job.reply``, a stream of
  :data:`ReplyEvent` ending in exactly one terminal event (:class:`RunResult` or
  :class:`JobFailed`). The HTTP handler owns the receive end. The send end belongs
  to the dispatcher while the job is queued and to the worker once it runs; the
  holder sends the terminal event and closes it.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

# --- jobs and their replies -------------------------------------------------


@attrs.frozen
class SessionKey:
    """A conversation: ``session_id`` is only unique within the caller's ``user_id``."""

    user_id: str
    session_id: str


@attrs.frozen(eq=False)
class Job:
    """One prompt to run. ``deadline`` (trio time) covers queue wait and run."""

    id: str
    user_id: str
    prompt: str
    submitted_at: float
    deadline: float
    reply: trio.MemorySendChannel = attrs.field(repr=False)
    session_id: str | None = None

    @property
    def session_key(self) -> SessionKey | None:
        return None if self.session_id is None else SessionKey(self.user_id, self.session_id)

    def answer(self, event: RunResult | JobFailed) -> None:
        """Send the terminal event and close ``reply``; only its current holder may.

        Never blocks: the reply channel has room, and nothing was sent on it yet.
        A client that is gone is simply not answered.
        """
        try:
            self.reply.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.reply.close()


@attrs.frozen
class JobStarted:
    """The job left the queue and an agent is working on it."""

    worker_id: str


@attrs.frozen
class AssistantText:
    """A block of text the agent wrote."""

    text: str


@attrs.frozen
class ToolUse:
    """The agent called a tool."""

    name: str
    input: dict[str, Any]


@attrs.frozen
class RunResult:
    """Terminal: the agent's turn ended (successfully, with an agent error, or timed out)."""

    success: bool
    output: str
    duration_ms: int
    timed_out: bool = False
    output_truncated: bool = False
    cost_usd: float | None = None
    num_turns: int | None = None
    usage: dict[str, Any] | None = None
    claude_session_id: str | None = None


@attrs.frozen
class JobFailed:
    """Terminal: the service could not run the job. ``status`` is the HTTP status to answer."""

    status: int
    error: str
    retry_after_s: int | None = None


ReplyEvent = JobStarted | AssistantText | ToolUse | RunResult | JobFailed
TERMINAL_EVENTS = (RunResult, JobFailed)


# --- dispatcher inbox -------------------------------------------------------


@attrs.frozen
class Submit:
    """Queue ``job``; the dispatcher answers on ``job.reply``."""

    job: Job


@attrs.frozen
class Withdraw:
    """The client of ``job_id`` went away: drop it if it is still queued."""

    job_id: str


@attrs.frozen
class WorkerStarting:
    """A worker is starting (or replacing) its agent process."""

    worker_id: str


@attrs.frozen
class WorkerReady:
    """A worker's agent is warm. Send it one :class:`Job` on ``inbox``."""

    worker_id: str
    inbox: trio.MemorySendChannel = attrs.field(repr=False)


@attrs.frozen
class WorkerFinished:
    """A worker finished a job; ``ok`` is False for an error or timeout."""

    worker_id: str
    job_id: str
    ok: bool


@attrs.frozen
class WorkerFailed:
    """A worker's agent failed to start or died; it will be restarted by its supervisor."""

    worker_id: str
    reason: str


@attrs.frozen
class WorkerView:
    id: str
    state: str  # "starting" | "ready" | "busy" | "error"
    busy_since: float | None  # wall-clock seconds
    jobs: int
    last_error: str | None


@attrs.frozen
class SessionView:
    key: SessionKey
    state: str  # "waiting" (for a live slot) | "starting" | "live" | "busy" | "stopping"


@attrs.frozen
class PoolSnapshot:
    """What ``/health`` and ``/status`` show, as the dispatcher sees it."""

    workers: tuple[WorkerView, ...]
    queue_length: int
    queue_max: int
    processed: int
    failed: int
    degraded_reason: str | None
    draining: bool
    ever_ready: bool  # some worker has been warm at least once
    sessions: tuple[SessionView, ...] = ()


@attrs.frozen
class StatusRequest:
    """Ask the dispatcher for a :class:`PoolSnapshot`, answered on ``reply``."""

    reply: trio.MemorySendChannel = attrs.field(repr=False)


@attrs.frozen
class Drain:
    """Shutdown has begun: refuse new jobs, let running ones finish.

    The dispatcher sends ``None`` on ``done`` (and closes it) once no job is running.
    """

    done: trio.MemorySendChannel = attrs.field(repr=False)


# --- sessions ---------------------------------------------------------------


@attrs.frozen
class StartSession:
    """Dispatcher -> session supervisor: start an actor for ``key``."""

    key: SessionKey


@attrs.frozen
class SessionStarted:
    """A session actor is up; send it jobs and commands on ``inbox``."""

    key: SessionKey
    inbox: trio.MemorySendChannel = attrs.field(repr=False)


@attrs.frozen
class SessionIdle:
    """A session's agent is warm and idle. ``finished_ok``: the turn just ended (None: none)."""

    key: SessionKey
    finished_ok: bool | None = None


@attrs.frozen
class SessionStopped:
    """A session actor ended: hibernated or closed (``reason`` None) or failed."""

    key: SessionKey
    reason: str | None = None


@attrs.frozen
class Hibernate:
    """Dispatcher -> idle session actor: close the process, keep the record, end."""


@attrs.frozen
class CloseSessionNow:
    """Dispatcher -> session actor: interrupt any running turn and end."""


@attrs.frozen
class CloseSession:
    """HTTP -> dispatcher: DELETE /session.

    ``ack`` gets True if the dispatcher knew the session (live or waiting). Once no
    actor runs for it any more, the dispatcher asks the registry to delete the
    record, and the registry answers on ``deleted``.
    """

    key: SessionKey
    ack: trio.MemorySendChannel = attrs.field(repr=False)
    deleted: trio.MemorySendChannel = attrs.field(repr=False)


DispatcherMessage = (
    Submit
    | Withdraw
    | WorkerStarting
    | WorkerReady
    | WorkerFinished
    | WorkerFailed
    | StatusRequest
    | Drain
    | SessionStarted
    | SessionIdle
    | SessionStopped
    | CloseSession
)
