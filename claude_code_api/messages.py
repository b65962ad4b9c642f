"""Every message that travels on a channel between actors.

Messages are frozen attrs classes and nothing else travels on channels. The
channels, who owns each end, and who closes it:

* **dispatcher inbox** (``MemorySendChannel[DispatcherMessage]``, buffer 0): both
  ends belong to the supervision tree (``Service``), which closes them when the
  tree ends, so a restarted dispatcher reads the same inbox. Every other actor
  sends on its own ``clone()`` and closes that clone when it ends: HTTP handlers
  (:class:`Submit`, :class:`Withdraw`, :class:`CancelRun`, :class:`StatusRequest`,
  :class:`CloseSession`, :class:`Drain`, :class:`UserMemoryChanged`), workers
  (``Worker*``), the session supervisor (:class:`SessionsReset`,
  :class:`SessionStopped`) and session actors (:class:`SessionStarted`,
  :class:`SessionIdle`).
* **worker command inbox** (``MemorySendChannel[WorkerCommand]``, buffer 1): made
  by a worker for each :class:`WorkerReady` and :class:`WorkerDormant`; the worker
  owns and closes the receive end, the dispatcher closes the send end after sending
  one command (a :class:`Job`, :class:`Warm` or :class:`Retire`), or when the worker
  is gone.
* **session starts** (``MemorySendChannel[StartSession]``): tree-owned like the
  dispatcher inbox; the dispatcher sends, the session supervisor reads.
* **session inbox** (``MemorySendChannel[SessionCommand]``): made by a session
  actor and offered in :class:`SessionStarted`; the actor owns and closes the
  receive end when it ends; the dispatcher closes the send end when it learns
  the actor stopped (:class:`SessionStopped`) or forgets it (:class:`SessionsReset`).
* **a job's reply** (``MemorySendChannel[ReplyEvent]``, ``Job.reply``): a stream of
  :data:`ReplyEvent` ending in exactly one terminal event (:class:`RunResult` or
  :class:`JobFailed`). The HTTP handler owns the receive end. The send end belongs
  to the dispatcher while the job is queued and to the worker or session actor
  once it runs; that holder sends the terminal event and closes it
  (:meth:`Job.answer`). The dispatcher answers every :class:`Submit` at once:
  :class:`Queued` when it took the job, or the terminal refusal (429, 503), so a
  streaming reply knows its status before it starts.
* **credentials inbox** (``MemorySendChannel[CredentialsMessage]``, buffer 0):
  tree-owned like the dispatcher inbox; HTTP handlers send, the credentials actor reads.
* **request/reply channels** inside :class:`StatusRequest`, :class:`Drain`,
  :class:`CloseSession`, :class:`CancelRun` and the credentials requests: made by the
  requester (who owns the receive end); the one who answers sends once and closes the
  send end.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import attrs
import trio

from .observe import metrics

# --- jobs and their replies -------------------------------------------------

Answer = TypeVar("Answer")


def answer_once(reply: trio.MemorySendChannel[Answer], value: Answer) -> None:
    """Send the one answer ``reply`` carries and close it; only its holder may. Never
    blocks: an asker that is gone, or that left the channel full, is not answered."""
    try:
        reply.send_nowait(value)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    reply.close()


@attrs.frozen
class SessionKey:
    """A conversation: ``session_id`` is only unique within the caller's ``user_id``."""

    user_id: str
    session_id: str


@attrs.define(eq=False)
class Cancellation:
    """A one-shot request to stop a job, set by the job's HTTP side.

    The client left before the answer (``reason`` "client gone"), or asked to
    cancel. Whoever runs the job interrupts the agent at once, even while the
    agent is silent (a long model call): it waits for :attr:`event`, or has
    :meth:`calling` call it back from :meth:`cancel` (no task to wake).
    """

    event: trio.Event = attrs.Factory(trio.Event)
    reason: str | None = None
    _callbacks: list[Callable[[], None]] = attrs.Factory(list)

    def cancel(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()
            for callback in tuple(self._callbacks):
                callback()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @contextmanager
    def calling(self, callback: Callable[[], None]) -> Iterator[None]:
        """Within: :meth:`cancel` calls ``callback()`` (at once if cancelled already).

        ``callback`` runs inside :meth:`cancel`, on the trio thread: it must not
        block or raise (cancelling a cancel scope is what it is for).
        """
        self._callbacks.append(callback)
        try:
            if self.requested:
                callback()
            yield
        finally:
            self._callbacks.remove(callback)


# The SDK's permission modes (claude_agent_sdk.types.PermissionMode).
PERMISSION_MODES = ("default", "acceptEdits", "plan", "bypassPermissions", "dontAsk", "auto")
# Every agent runs commands and edits files without asking unless its request asks otherwise.
DEFAULT_PERMISSION_MODE = "bypassPermissions"


@attrs.frozen
class RunOptions:
    """What a request asked of its agent beyond the service's defaults (None: the default).

    ``model`` and ``permission_mode`` can change on a running agent (control
    requests); the others are process arguments, so a job that sets any of them
    needs an agent process of its own (:attr:`needs_own_process`).
    """

    model: str | None = None
    system_prompt: str | None = None  # appended to Claude Code's own
    allowed_tools: tuple[str, ...] | None = None
    disallowed_tools: tuple[str, ...] | None = None
    max_turns: int | None = None
    max_budget_usd: float | None = None
    permission_mode: str | None = None

    @property
    def needs_own_process(self) -> bool:
        return (
            self.system_prompt is not None
            or self.allowed_tools is not None
            or self.disallowed_tools is not None
            or self.max_turns is not None
            or self.max_budget_usd is not None
        )

    def to_json(self) -> dict[str, Any]:
        """The options that are set, by their attribute names (for a session's record)."""
        values = {field.name: getattr(self, field.name) for field in attrs.fields(RunOptions)}
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in values.items()
            if value is not None
        }

    @classmethod
    def from_json(cls, data: object) -> RunOptions:
        """Read :meth:`to_json`'s output back; anything unknown or mistyped is dropped."""
        if not isinstance(data, dict):
            return cls()
        kept: dict[str, Any] = {}
        for field in attrs.fields(cls):
            value = data.get(field.name)
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                kept[field.name] = tuple(value)
            elif isinstance(value, str | int | float) and not isinstance(value, bool):
                kept[field.name] = value
        try:
            return cls(**kept)
        except TypeError:
            return cls()


# What a request that asks for nothing special gets.
DEFAULT_OPTIONS = RunOptions()

# The image types the model reads (Anthropic's Messages API takes these four).
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


@attrs.frozen
class Image:
    """An image sent with a prompt: its media type and its bytes in base64 (checked already).

    The agent receives it as an image content block before the prompt's text.
    """

    media_type: str
    data: str = attrs.field(repr=False)  # base64, as the Messages API takes it

    def block(self) -> dict[str, Any]:
        """The Messages API's image content block."""
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": self.media_type, "data": self.data},
        }


@attrs.frozen(eq=False)
class Job:
    """One prompt to run. ``deadline`` (trio time) covers queue wait and run."""

    id: str
    user_id: str
    prompt: str
    submitted_at: float
    deadline: float
    reply: trio.MemorySendChannel[ReplyEvent] = attrs.field(repr=False)
    session_id: str | None = None
    # The user's CLAUDE.md, handed to a one-shot job's agent with the prompt: that agent
    # started before its user was known. (A session's agent loads it from its HOME.)
    memory: str | None = attrs.field(default=None, repr=False)
    cancellation: Cancellation = attrs.field(factory=Cancellation, repr=False)
    options: RunOptions = DEFAULT_OPTIONS
    # Images sent with the prompt (``images`` of /run, image parts of the compatible routes).
    images: tuple[Image, ...] = attrs.field(default=(), repr=False)
    # A one-shot's agent may be kept for its user's next one (AGENT_REUSE_S): the dispatcher
    # says no for a user who did not come back within it (returning_users.py).
    keep_agent: bool = True

    @property
    def session_key(self) -> SessionKey | None:
        return None if self.session_id is None else SessionKey(self.user_id, self.session_id)

    def answer(self, event: RunResult | JobFailed) -> None:
        """Send the terminal event and close ``reply``; only its current holder may.

        Never blocks: a client that is gone, or that left its reply buffer full,
        is simply not answered. Every run is counted here, once (:mod:`.metrics`).
        """
        result = event if isinstance(event, RunResult) else None
        metrics.run_answered(
            self.user_id,
            trio.current_time() - self.submitted_at,
            event.outcome,
            None if result is None else result.cost_usd,
            None if result is None else result.usage,
        )
        answer_once(self.reply, event)


@attrs.frozen
class Queued:
    """The dispatcher took the job: ``position`` runs will start before it (0: none)."""

    position: int


@attrs.frozen
class JobStarted:
    """The job left the queue and an agent is working on it.

    ``at``: when (trio time) the worker or session actor took it, so the reply can
    say how long it waited (not compared: it is a measurement).
    """

    worker_id: str
    at: float = attrs.field(default=0.0, eq=False)


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
class ToolResult:
    """A tool call finished; ``ok`` is False when the tool reported an error."""

    ok: bool


@attrs.frozen
class UpstreamRetry:
    """The agent's call to the model API failed and the CLI will retry it.

    ``status`` is the HTTP status (None: the API could not be reached).
    """

    status: int | None
    message: str
    attempt: int
    max_retries: int | None = None


@attrs.frozen
class SessionIdChanged:
    """The CLI moved the conversation to a new session id (e.g. after ``/clear``)."""

    claude_session_id: str


# What an agent reports while it works on a turn.
AgentEvent = AssistantText | ToolUse | ToolResult | UpstreamRetry | SessionIdChanged


@attrs.frozen
class UpstreamError:
    """The last upstream API failure of a turn, for the reply (``upstreamError``)."""

    status: int | None
    message: str
    retries: int


@attrs.frozen
class RunResult:
    """Terminal: the agent's turn ended (successfully, with an agent error, timed out or stopped)."""

    success: bool
    output: str
    duration_ms: int
    timed_out: bool = False
    output_truncated: bool = False
    cancelled: bool = False
    stopped: bool = False  # cut short by the service stopping (after SHUTDOWN_GRACE_S)
    cost_usd: float | None = None
    num_turns: int | None = None
    usage: dict[str, Any] | None = None
    claude_session_id: str | None = None
    model: str | None = None
    upstream_error: UpstreamError | None = None
    # A session's saved options that the ceilings in force changed for this turn: the
    # API's field names with the values that ran (OptionCeiling.hold); None: none changed.
    lowered_options: dict[str, Any] | None = None

    @property
    def outcome(self) -> str:
        """How it ended: ``ok``, ``timeout``, ``cancelled``, ``stopped`` or ``agent_error``."""
        if self.timed_out:
            return "timeout"
        if self.cancelled:
            return "cancelled"
        if self.stopped:
            return "stopped"
        return "ok" if self.success else "agent_error"


@attrs.frozen
class JobFailed:
    """Terminal: the service could not run the job. ``status`` is the HTTP status to answer."""

    status: int
    error: str
    retry_after_s: int | None = None

    # How it ended, in :attr:`RunResult.outcome`'s words.
    outcome = "failed"


ReplyEvent = Queued | JobStarted | AgentEvent | RunResult | JobFailed
TerminalEvent = RunResult | JobFailed
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
class CancelRun:
    """HTTP -> dispatcher: DELETE /runs/{run_id} by ``user_id``.

    ``ack`` gets True when the run was ``user_id``'s and queued (it is answered
    ``cancelled`` at once) or running (its turn is interrupted and answers
    ``cancelled``); False for a run that is unknown, over, or someone else's.
    """

    user_id: str
    run_id: str
    ack: trio.MemorySendChannel[bool] = attrs.field(repr=False)


@attrs.frozen
class WorkerStarting:
    """A worker is starting (or replacing) its agent process."""

    worker_id: str


@attrs.frozen
class Warm:
    """Dispatcher -> dormant worker: start an agent for anyone (the pool is short of one)."""


@attrs.frozen
class Retire:
    """Dispatcher -> idle worker: close the agent and go dormant (hold no process).

    Sent to the oldest kept agent past ``AGENT_REUSE_MAX``, and to a warm
    unassigned agent beyond ``POOL_SIZE`` of them.
    """


# What the dispatcher sends on a worker's one-command inbox.
WorkerCommand = Job | Warm | Retire


@attrs.frozen
class WorkerReady:
    """A worker's agent is warm. Send it one command on ``inbox``: a :class:`Job`, or
    :class:`Retire`.

    ``bound_to``: the user whose last request this agent served, kept for their
    next one (``AGENT_REUSE_S``); it takes another user's job only after
    replacing its agent. None: a fresh agent that has served nobody (unassigned).
    """

    worker_id: str
    inbox: trio.MemorySendChannel[WorkerCommand] = attrs.field(repr=False)
    bound_to: str | None = None


@attrs.frozen
class WorkerDormant:
    """A worker holds no agent process. Send it :class:`Warm` on ``inbox`` to start one.

    Workers beyond ``POOL_SIZE`` start so; a kept agent that is retired or whose
    ``AGENT_REUSE_S`` ran out leaves its worker so.
    """

    worker_id: str
    inbox: trio.MemorySendChannel[WorkerCommand] = attrs.field(repr=False)


@attrs.frozen
class WorkerFinished:
    """A worker finished a job; ``ok`` is False for an error or timeout."""

    worker_id: str
    job_id: str
    ok: bool
    upstream_error: UpstreamError | None = None


@attrs.frozen
class WorkerFailed:
    """A worker's agent failed to start or died; it will be restarted by its supervisor."""

    worker_id: str
    reason: str


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # warming an agent for anyone
    READY = "ready"  # a warm agent for anyone (unassigned)
    BUSY = "busy"
    ERROR = "error"
    KEPT = "kept"  # a warm agent kept for the user it served last (AGENT_REUSE_S)
    DORMANT = "dormant"  # no process: a spare worker, woken when the pool is short


class SessionState(enum.StrEnum):
    WAITING = "waiting"  # for a live slot
    STARTING = "starting"
    IDLE = "idle"  # shown to clients as "live"
    BUSY = "busy"
    STOPPING = "stopping"


@attrs.frozen
class WorkerView:
    id: str
    state: WorkerState
    busy_since: float | None  # wall-clock seconds
    jobs: int
    last_error: str | None


@attrs.frozen
class SessionView:
    key: SessionKey
    state: SessionState


class RunState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"


@attrs.frozen
class RunView:
    """One queued or running job, for ``/status`` (times are wall-clock seconds)."""

    run_id: str
    user_id: str
    state: RunState
    session_id: str | None
    queued_at: float
    started_at: float | None = None


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
    # The newest 401/403 from the model API (until a later turn succeeds), with its wall time.
    upstream_auth_error: UpstreamError | None = None
    upstream_auth_error_at: float | None = None
    # The queued and running jobs of the user the snapshot was asked for.
    runs: tuple[RunView, ...] = ()


@attrs.frozen
class StatusRequest:
    """Ask the dispatcher for a :class:`PoolSnapshot`, answered on ``reply``.

    With ``user_id`` the snapshot lists that user's runs too.
    """

    reply: trio.MemorySendChannel[PoolSnapshot] = attrs.field(repr=False)
    user_id: str | None = None


@attrs.frozen
class Drain:
    """Shutdown has begun: refuse new jobs, let running ones finish.

    The dispatcher sends ``None`` on ``done`` (and closes it) once no job is running.
    """

    done: trio.MemorySendChannel[None] = attrs.field(repr=False)


# --- sessions ---------------------------------------------------------------


@attrs.frozen
class StartSession:
    """Dispatcher -> session supervisor: start an actor for ``key``.

    ``options``: those of the turn it starts for; a new session keeps them.
    """

    key: SessionKey
    options: RunOptions = RunOptions()


@attrs.frozen
class Hibernate:
    """Dispatcher -> idle session actor: close the process, keep the record, end."""


@attrs.frozen
class CloseSessionNow:
    """Dispatcher -> session actor: interrupt any running turn and end."""


SessionCommand = Job | Hibernate | CloseSessionNow


# Which actor of a session a message is about: the session supervisor numbers
# every actor it starts. After a supervisor restart a stale start can make a
# second, short-lived actor for a session; its messages must not be taken for
# the current one's.
ActorId = int


@attrs.frozen
class SessionStarted:
    """A session actor is up; send it jobs and commands on ``inbox``."""

    key: SessionKey
    inbox: trio.MemorySendChannel[SessionCommand] = attrs.field(repr=False)
    actor: ActorId = 0


@attrs.frozen
class SessionIdle:
    """A session's agent is warm and idle. ``finished_ok``: the turn just ended (None: none)."""

    key: SessionKey
    finished_ok: bool | None = None
    upstream_error: UpstreamError | None = None
    actor: ActorId = 0


@attrs.frozen
class SessionStopped:
    """A session actor ended: hibernated or closed (``failure`` None) or failed.

    ``failure`` answers the turns still waiting for that session when the actor
    could not even start (e.g. its user has too many sessions: 429).
    """

    key: SessionKey
    failure: JobFailed | None = None
    actor: ActorId = 0


@attrs.frozen
class SessionsReset:
    """The session supervisor (re)started: no session actor runs now.

    A restarted supervisor's old actors were cancelled without reporting
    :class:`SessionStopped`; the dispatcher forgets every live session so no
    live slot leaks.
    """


@attrs.frozen
class CloseSession:
    """HTTP -> dispatcher: DELETE /session.

    ``ack`` gets True if the dispatcher knew the session (live or waiting). Once no
    actor runs for it any more, the dispatcher asks the registry to delete the
    record, and the registry answers on ``deleted`` (:data:`SessionDeleted`).
    """

    key: SessionKey
    ack: trio.MemorySendChannel[bool] = attrs.field(repr=False)
    deleted: trio.MemorySendChannel[SessionDeleted] = attrs.field(repr=False)


# What DELETE /session hears on CloseSession.deleted: whether the record existed, or why
# it could not be deleted: the dispatcher's JobFailed (the registry's inbox was full) or
# the store's error (a RegistryError, named here only as an Exception: messages import
# nothing of the store).
SessionDeleted = bool | JobFailed | Exception


@attrs.frozen
class UserMemoryChanged:
    """HTTP -> dispatcher: ``user_id``'s CLAUDE.md was saved anew.

    Their live sessions restart at the next turn boundary to load it (a running
    Claude Code process never re-reads it); one-shot jobs read it themselves.
    """

    user_id: str


@attrs.frozen
class HandOverSession:
    """Session leases -> dispatcher: another replica asks for ``key``, or this one lost its lease.

    The session hibernates at its next turn boundary once no turn of it waits here (its
    lease is released when its actor ends: ``actors/session_leases.py``); a session not
    live here is left alone.
    """

    key: SessionKey


# The dispatcher's inbox, by who sends: the HTTP side, the workers, the session side.
ClientRequest = Submit | Withdraw | CancelRun | StatusRequest | Drain
WorkerReport = WorkerStarting | WorkerReady | WorkerFinished | WorkerFailed | WorkerDormant
SessionReport = (
    SessionStarted
    | SessionIdle
    | SessionStopped
    | SessionsReset
    | CloseSession
    | UserMemoryChanged
    | HandOverSession
)
DispatcherMessage = ClientRequest | WorkerReport | SessionReport


# --- credentials inbox ------------------------------------------------------
# Tree-owned like the dispatcher inbox: HTTP handlers send, the credentials actor
# reads; each request carries the channel its answer comes back on.


@attrs.frozen
class RefreshFailure:
    """The newest failed attempt to refresh the OAuth login (wall-clock seconds)."""

    message: str
    at: float
    next_attempt_at: float


@attrs.frozen
class CredentialsStatus:
    """What the service knows about the credentials agents use (``GET /auth/status``)."""

    method: str  # "apiKey" | "oauth" | "none"
    expires_at_ms: int | None = None
    # Whether the service can refresh the login before it expires (it has a refresh token).
    refreshable: bool = False
    refresh_failure: RefreshFailure | None = None
    # When the credentials last changed while the service ran (wall-clock seconds).
    changed_at: float | None = None


@attrs.frozen
class CredentialsStatusRequest:
    reply: trio.MemorySendChannel[CredentialsStatus] = attrs.field(repr=False)


@attrs.frozen
class StartLogin:
    """``POST /auth/login``: answered with the URL to open."""

    reply: trio.MemorySendChannel[str] = attrs.field(repr=False)


@attrs.frozen
class LoginSaved:
    """``/auth/exchange`` succeeded: the new login is stored and in effect."""


@attrs.frozen
class AuthFailed:
    """An ``/auth/*`` request failed; ``status`` is the HTTP status to answer."""

    status: int
    error: str


@attrs.frozen
class ExchangeCode:
    """``POST /auth/exchange``: trade ``code`` of the pending login ``state`` for tokens."""

    code: str = attrs.field(repr=False)
    state: str = attrs.field(repr=False)
    reply: trio.MemorySendChannel[LoginSaved | AuthFailed] = attrs.field(repr=False)


CredentialsMessage = CredentialsStatusRequest | StartLogin | ExchangeCode
