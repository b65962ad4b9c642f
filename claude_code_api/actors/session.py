"""Session actor: one live multi-turn conversation.

It owns one agent (a Claude Code process) running in its user's HOME with the
session's Claude session UUID: ``--session-id`` while the conversation is new,
``--resume`` once its transcript exists — so after a crash, a hibernation or a
service restart the conversation continues from Claude Code's own transcript.
It runs one turn at a time, as the dispatcher hands them over. After each turn
it saves the record (turns, cost, last activity, and the conversation's current
Claude session id: the CLI moves a conversation to a new id on ``/clear``) and
answers the client only once the registry has it durably.

States (:class:`Phase`; each phase is a method of :class:`_SessionActor` that returns
the next):

* ``START`` — no agent: start one (resuming the conversation) → ``IDLE``, or ``TURN``
  with a turn handed over before the last agent went;
* ``IDLE`` — tell the dispatcher it is idle (unless it counts it idle already: the
  agent was replaced while idle), wait → ``TURN`` on a turn, ``RENEW`` when the
  credentials change, ``REPLACE`` when the agent exits, ``END`` on :class:`Hibernate`
  or :class:`CloseSessionNow`;
* ``TURN`` — run the turn, save the record, answer → ``IDLE``; ``RENEW`` when the
  credentials changed during it; ``START`` when the turn cost the agent;
* ``RENEW`` (credentials stale) and ``REPLACE`` (idle exit; the third in a row ends
  the session) — close the agent → ``START``; a turn that came as it went is held
  (:attr:`_SessionActor.job`) and runs on the next agent;
* ``END`` — hibernated or closed. A stop request ends it between any two phases.

Channels: it owns the receive end of its inbox (offered in
:class:`SessionStarted`) and closes it when it ends, answering any job still in
it; it sends on its own clone of the dispatcher's inbox, closed when it ends;
it owns ``job.reply`` while running a job.

Error handling:

* a turn whose agent dies is answered 502 and the process is started again
  (resuming) before the next turn; a timed-out, abandoned or cancelled turn is
  interrupted and drained, so the next turn answers its own prompt;
* an idle agent that exits (killed from outside) is replaced, resuming the
  conversation; one that keeps exiting while idle ends the session with a 502
  for what waits;
* when the Claude credentials change (``credentials``, see ``renewal.py``), an
  idle agent is closed and a new one resumes the conversation at once; a busy
  one finishes its turn first. Turns handed over meanwhile wait in the inbox;
* its saved options (those of its first turn) are held to the ceilings in force
  (``SessionConfig.ceiling``) each time its agent starts: the service may have been
  restarted with lower ones since they were saved. Each turn's result names what
  that changed (``lowered_options``); the record keeps what was asked;
* failures that end the actor carry the answer for the turns waiting on it
  (:class:`SessionFailed`): too many sessions (429), the session store failing
  (503), an agent that cannot start (502). A save that fails after a turn
  answers that turn 503 instead of its result: a reply is never acknowledged
  unless its record is durable.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol, assert_never

import attrs
import trio

from ..agent.protocol import Agent, AgentFactory, AgentSpec, AgentStartError
from ..auth.renewal import CredentialsStamp, CredentialsVersion
from ..config.ceiling import Held, OptionCeiling
from ..messages import (
    DEFAULT_OPTIONS,
    ActorId,
    CloseSessionNow,
    DispatcherMessage,
    Hibernate,
    Job,
    JobFailed,
    RunOptions,
    RunResult,
    SessionCommand,
    SessionIdle,
    SessionKey,
    SessionStarted,
    TerminalEvent,
    UpstreamError,
)
from ..observe import metrics
from ..store import SessionRecord, TooManySessions, new_session_record
from ..store import StoreUnavailable as RegistryError
from .idle import SHUTTING_DOWN, next_command
from .registry_client import RegistryClient
from .stopping import StopSignal
from .turn import TurnLimits, TurnOutcome, run_turn

log = logging.getLogger(__name__)

# Room for the one job the dispatcher hands over plus a Hibernate or a close.
SESSION_INBOX_SIZE = 4
NO_TRANSCRIPT = "No conversation found"
TRANSCRIPT_EXISTS = "already in use"
# An idle agent that exits this many times in a row (no turn in between) ends the session.
MAX_IDLE_EXITS = 3


class SessionTranscripts(Protocol):
    """The copy of sessions' Claude transcripts that every replica reads (``DATABASE_URL``:
    :class:`~claude_code_api.store.transcript_mirror.TranscriptMirror`). Both methods raise
    :class:`~claude_code_api.store.StoreUnavailable` when the store does not answer, and
    OSError when the local files cannot be read or written."""

    async def materialise(self, config_dir: Path, cwd: Path, claude_session_id: str) -> bool:
        """Before a resume: the stored transcript replaces the local one (if it has one)."""
        ...

    async def mirror(self, config_dir: Path, cwd: Path, claude_session_id: str) -> None:
        """After a turn: what the CLI added to the local transcript goes to the store."""
        ...


class SessionFailed(Exception):
    """The session actor cannot go on; ``failure`` answers the turns waiting for it."""

    def __init__(self, failure: JobFailed) -> None:
        super().__init__(failure.error)
        self.failure = failure


@attrs.frozen
class SessionConfig:
    warmup_timeout_s: float
    turn: TurnLimits
    max_sessions_per_user: int
    # The ceilings in force: a session's saved options are held to them whenever its agent
    # starts (None: as saved).
    ceiling: OptionCeiling | None = None
    # With DATABASE_URL: each turn's transcript is stored before the turn is answered, and
    # resumes start from the stored one (None: the local files alone).
    transcripts: SessionTranscripts | None = None


def store_failure(exc: RegistryError) -> JobFailed:
    return JobFailed(503, f"session store unavailable: {exc}")


async def serve_session(
    key: SessionKey,
    config: SessionConfig,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    registry: RegistryClient,
    new_agent: AgentFactory,
    home: Path,
    stop: StopSignal,
    actor: ActorId = 0,
    credentials: CredentialsVersion | None = None,
    options: RunOptions = DEFAULT_OPTIONS,
    workspace: Path | None = None,
) -> None:
    """Run the session ``key`` until hibernated, closed or stopped; see the module docstring.

    ``actor`` is this actor's number (its supervisor's), sent with its messages.
    ``options``: those of the turn it starts for, kept by a session that has not
    run a turn yet; a session keeps the options of its first turn (its record's),
    except that a turn asking for another model switches the model (and the
    record remembers it).

    ``home`` is the user's HOME (its Claude config dir; its workspace, unless
    ``workspace`` is given: ``WORKSPACES_DIR``'s directory for the user). A stop request
    (service shutdown) interrupts a running turn, which is still answered, and
    keeps the record: the conversation resumes after the restart.
    """
    record = await _load_or_create(key, registry, config.max_sessions_per_user, options)
    inbox_send, inbox = trio.open_memory_channel[SessionCommand](SESSION_INBOX_SIZE)
    name = f"session {key.user_id}/{key.session_id}"
    place = AgentSpec(name=name, home=home, ephemeral=False, workspace=workspace)
    actor_ = _SessionActor(
        key,
        config,
        dispatcher,
        inbox,
        _Session(key, record, registry, _Transcripts(config.transcripts, place)),
        partial(_start_agent, config=config, new_agent=new_agent, place=place),
        stop,
        actor,
        credentials or CredentialsVersion(),
    )
    async with dispatcher:
        try:
            await dispatcher.send(SessionStarted(key, inbox_send, actor))
            if not _closed_at_once(inbox):  # a stale start: no agent to spawn
                await actor_.run()
        except AgentStartError as exc:
            actor_.leftover = JobFailed(502, f"session agent failed to start: {exc}")
            raise SessionFailed(actor_.leftover) from exc
        except RegistryError as exc:
            actor_.leftover = store_failure(exc)
            raise SessionFailed(actor_.leftover) from exc
        finally:
            await actor_.close()


class Phase(enum.Enum):
    """What a session actor does next: each phase of its life returns one."""

    START = "start"  # no agent: start one, resuming the conversation
    IDLE = "idle"  # wait for a turn, the agent's exit, or new credentials
    TURN = "turn"  # run the turn in hand
    RENEW = "renew"  # the idle agent's credentials are stale: close it, start another
    REPLACE = "replace"  # the agent exited while idle: close it, count it, start another
    END = "end"  # hibernated, closed, or its inbox closed


@attrs.define
class _SessionActor:
    """One session actor's phases (see the module docstring) and what they share."""

    key: SessionKey
    config: SessionConfig
    dispatcher: trio.MemorySendChannel[DispatcherMessage]
    inbox: trio.MemoryReceiveChannel[SessionCommand]
    session: _Session
    start_agent: Callable[[SessionRecord, RunOptions], Awaitable[Agent]]
    stop: StopSignal
    actor: ActorId
    credentials: CredentialsVersion
    agent: Agent | None = None
    stamp: CredentialsStamp | None = None  # the credentials ``agent`` started with
    # A turn handed over that the agent at hand must not run (its credentials went stale,
    # or it exited, as the turn came): it runs on the next agent.
    job: Job | None = None
    idle_exits: int = 0  # in a row, no turn in between
    # Whether the next idle wait tells the dispatcher it is idle: not when the dispatcher
    # counts it idle already (its agent replaced while idle), which could get it a second
    # turn at once, nor while it holds a turn the dispatcher handed over.
    report_idle: bool = True
    finished_ok: bool | None = None  # the last turn's outcome, not reported yet
    leftover: JobFailed = SHUTTING_DOWN  # the answer for turns it leaves unrun

    async def run(self) -> None:
        phase = Phase.START
        while not self.stop.requested:
            match phase:
                case Phase.START:
                    phase = await self._start()
                case Phase.IDLE:
                    phase = await self._idle()
                case Phase.TURN:
                    phase = await self._turn()
                case Phase.RENEW:
                    phase = await self._renew()
                case Phase.REPLACE:
                    phase = await self._replace()
                case Phase.END:
                    return
                case _:
                    assert_never(phase)

    async def _start(self) -> Phase:
        """Start an agent with the saved options under the ceilings in force."""
        # Taken before the start: credentials that change during it make the agent stale.
        self.stamp = self.credentials.stamp()
        with self.stop.guard():
            held = _held(self.session.record, self.config.ceiling)
            self.agent = await self.start_agent(self.session.record, held.options)
        if self.agent is None:  # stopped while starting
            return Phase.END
        self.session.agent_started(self.agent, held.changed)
        return Phase.IDLE if self.job is None else self._take(self.job)

    async def _idle(self) -> Phase:
        """Say so (unless the dispatcher knows), then wait for the next command."""
        assert self.agent is not None and self.stamp is not None
        if self.report_idle:
            await self.dispatcher.send(
                SessionIdle(self.key, self.finished_ok, self.session.upstream_error, self.actor)
            )
            self.finished_ok = None  # counted once, not again after an idle exit
        self.report_idle = True
        command = await next_command(
            self.inbox, self.stop, self.agent.wait_exited, self.stamp.wait_stale
        )
        if (
            self.stamp.stale()
            and not self.agent.exited
            and not isinstance(command, Hibernate | CloseSessionNow)
        ):
            self.job, self.report_idle = command, False
            return Phase.RENEW
        return self._take(command)

    def _take(self, command: SessionCommand | None) -> Phase:
        """The phase for ``command`` (None: the wait ended without one)."""
        if isinstance(command, Hibernate | CloseSessionNow):
            self.session.transcripts.deleted = isinstance(command, CloseSessionNow)
            return Phase.END
        assert self.agent is not None
        self.job = command
        if self.agent.exited:
            return Phase.REPLACE
        return Phase.END if command is None else Phase.TURN

    async def _turn(self) -> Phase:
        """Run the turn in hand, answer it once its record is saved."""
        assert self.agent is not None and self.stamp is not None and self.job is not None
        job, self.job = self.job, None
        self.idle_exits = 0
        # Once it is answered, the dispatcher hears that the session is idle (a held turn
        # too, even one answered 503 below: the dispatcher counts it running till then).
        self.report_idle = True
        taken_at = trio.current_time()
        try:
            await self.session.before_turn()
        except RegistryError as exc:
            job.answer(store_failure(exc))
            return Phase.RENEW if self.stamp.stale() else Phase.IDLE
        outcome = await _run_turn(self.agent, job, self.key, self.config, self.stop, taken_at)
        outcome = self.session.say_what_was_lowered(outcome, self.agent, job.options)
        job.answer(await self.session.after_turn(self.agent, outcome, job.options))
        self.finished_ok = outcome.ok
        if not outcome.agent_usable:
            self.agent = None  # run_turn closed it
            return Phase.START
        # A busy agent finishes its turn on the old credentials, then goes.
        return Phase.RENEW if self.stamp.stale() else Phase.IDLE

    async def _renew(self) -> Phase:
        assert self.agent is not None
        log.info("session %s: new Claude credentials; replacing its agent", self.key)
        await self.agent.close()
        self.agent = None
        return Phase.START

    async def _replace(self) -> Phase:
        """Replace an agent that exited while idle; one that keeps exiting ends the session.

        The dispatcher counts the session idle still (or has just handed over a turn, which
        runs on the replacement): reporting idle again could get it a second turn while
        the first waits."""
        assert self.agent is not None
        self.idle_exits += 1
        log.warning("session %s: agent exited while idle; replacing it", self.key)
        await self.agent.close(grace=0)
        self.agent = None
        if self.idle_exits >= MAX_IDLE_EXITS:
            self.leftover = JobFailed(502, "session agent keeps exiting while idle")
            raise SessionFailed(self.leftover)
        self.report_idle = False
        return Phase.START

    async def close(self) -> None:
        """Close the agent, answer what it leaves unrun (:attr:`leftover`), close the inbox."""
        with trio.CancelScope(shield=True):
            if self.agent is not None:
                # EOF first: the CLI flushes its transcript before it exits.
                await self.agent.close()
            await self.session.transcripts.last_mirror(self.session.record)
        if self.job is not None:
            self.job.answer(self.leftover)
            self.job = None
        _close_inbox(self.inbox, self.leftover)


class _Transcripts:
    """A session's transcript in the shared store (``store`` None: none, nothing to do)."""

    # How long the mirror at a session's end may take (it is best effort: the turns were
    # answered once mirrored).
    LAST_MIRROR_S = 10.0

    def __init__(self, store: SessionTranscripts | None, place: AgentSpec) -> None:
        self.store = store
        self.place = place
        # A turn's transcript was mirrored: this process knows how far (else the last
        # mirror would send what it cannot tell stored from not).
        self.mirrored = False
        self.deleted = False  # the session was closed (DELETE): its transcript goes

    async def materialise(self, claude_session_id: str) -> None:
        """Before a resume. Raises RegistryError; AgentStartError when a file cannot be written."""
        if self.store is None:
            return
        try:
            await self.store.materialise(self.place.config_dir, self.place.cwd, claude_session_id)
        except OSError as exc:
            raise AgentStartError(f"cannot write the session's transcript: {exc}") from exc

    async def mirror(self, *claude_session_ids: str) -> None:
        """After a turn: its conversations (a turn that moved it with ``/clear``: the earlier
        one too, whose last lines the CLI wrote there). Raises RegistryError (the store, or
        a file that cannot be read: nothing unstored is acknowledged)."""
        if self.store is None:
            return
        try:
            for claude_id in dict.fromkeys(claude_session_ids):
                await self.store.mirror(self.place.config_dir, self.place.cwd, claude_id)
        except OSError as exc:
            raise RegistryError(f"cannot read the session's transcript: {exc}") from exc
        self.mirrored = True

    async def last_mirror(self, record: SessionRecord) -> None:
        """As the session ends (its agent closed): what the CLI wrote after the last turn's
        mirror. Best effort, bounded: a failure is logged. Not for a deleted session (its
        stored transcript is being deleted), nor one that ran no turn here."""
        if self.store is None or not self.mirrored or self.deleted:
            return
        with trio.move_on_after(self.LAST_MIRROR_S) as waited:
            try:
                await self.mirror(record.claude_session_id)
            except RegistryError as exc:
                log.warning("session %s: transcript not mirrored at its end: %s", record.key, exc)
        if waited.cancelled_caught:
            log.warning("session %s: transcript's last mirror timed out", record.key)


class _Session:
    """The record of a live session and how a turn updates it."""

    def __init__(
        self,
        key: SessionKey,
        record: SessionRecord,
        registry: RegistryClient,
        transcripts: _Transcripts,
    ) -> None:
        self.key = key
        self.record = record
        self.registry = registry
        self.transcripts = transcripts
        self.upstream_error: UpstreamError | None = None
        # What the ceilings changed in the saved options the current agent started with,
        # and the model it started with.
        self.lowered: dict[str, Any] = {}
        self.started_model: str | None = None

    def agent_started(self, agent: Agent, lowered: dict[str, Any]) -> None:
        self.lowered, self.started_model = lowered, agent.model

    def say_what_was_lowered(
        self, outcome: TurnOutcome, agent: Agent, asked: RunOptions
    ) -> TurnOutcome:
        """``outcome`` whose result names the saved options the ceilings changed (if any).

        The model only while the agent still runs the default model it fell back to
        and the turn did not name one itself."""
        lowered = dict(self.lowered)
        switched = asked.model is not None or agent.model != self.started_model
        if "model" in lowered and switched:
            del lowered["model"]
        if not lowered or not isinstance(outcome.terminal, RunResult):
            return outcome
        return attrs.evolve(
            outcome, terminal=attrs.evolve(outcome.terminal, lowered_options=lowered)
        )

    async def before_turn(self) -> None:
        if not self.record.transcript_started:
            # From now on the CLI may have a transcript: later starts must resume.
            await self._save(attrs.evolve(self.record, transcript_started=True))

    async def after_turn(
        self, agent: Agent, outcome: TurnOutcome, asked: RunOptions
    ) -> TerminalEvent:
        """Save what the turn changed; the terminal event to answer with (503 if not saved)."""
        self.upstream_error = outcome.upstream_error
        record = attrs.evolve(
            self.record,
            turns=self.record.turns + 1,
            last_activity=time.time(),
            total_cost_usd=self.record.total_cost_usd + (outcome.cost_usd or 0.0),
        )
        if asked.model is not None and asked.model == agent.model != record.options.model:
            # The turn switched the model: later processes of this session start with it.
            record = attrs.evolve(record, options=attrs.evolve(record.options, model=asked.model))
        current = agent.session_id
        if current is not None and current != record.claude_session_id:
            log.info(
                "session %s: the CLI moved the conversation to %s (was %s)",
                self.key,
                current,
                record.claude_session_id,
            )
            record = attrs.evolve(
                record,
                claude_session_id=current,
                previous_claude_session_ids=record.previous_claude_session_ids
                + (record.claude_session_id,),
                transcript_started=True,
            )
        try:
            # The transcript first: a saved record then never counts a turn it lacks.
            await self.transcripts.mirror(self.record.claude_session_id, record.claude_session_id)
            await self._save(record)
        except RegistryError as exc:
            log.error("session %s: turn not saved: %s", self.key, exc)
            return store_failure(exc)
        return outcome.terminal

    async def _save(self, record: SessionRecord) -> None:
        await self.registry.save(record)
        self.record = record


async def _load_or_create(
    key: SessionKey, registry: RegistryClient, max_per_user: int, options: RunOptions
) -> SessionRecord:
    """The session's record; a new one (or one that never ran a turn) takes ``options``.

    Its first turn saves it (:meth:`_Session.before_turn`).
    """
    try:
        record = await registry.load(key)
        if record is None:
            record = attrs.evolve(new_session_record(key, time.time()), options=options)
            await registry.create(record, max_per_user)
        else:
            metrics.session_woke()
            if not record.transcript_started and record.options != options:
                record = attrs.evolve(record, options=options)
    except TooManySessions as exc:
        raise SessionFailed(JobFailed(429, str(exc), retry_after_s=None)) from exc
    except RegistryError as exc:
        raise SessionFailed(store_failure(exc)) from exc
    return record


async def _run_turn(
    agent: Agent,
    job: Job,
    key: SessionKey,
    config: SessionConfig,
    stop: StopSignal,
    taken_at: float,
) -> TurnOutcome:
    """Run one turn; a stop (service shutdown) interrupts it, answered all the same.

    A close (``DELETE /session``) cuts it through its job's cancellation, which the
    dispatcher sets along with the :class:`CloseSessionNow` it sends, read after the
    turn. A turn that asks for a model switches the session's agent to it; its other
    options are the session's own (those of its first turn).
    """
    turn_scope = trio.CancelScope()
    with stop.guard(turn_scope):
        return await run_turn(
            agent,
            job,
            worker_id=f"session:{key.session_id}",
            limits=config.turn,
            turn_scope=turn_scope,
            taken_at=taken_at,
            model=job.options.model,
        )


def _held(record: SessionRecord, ceiling: OptionCeiling | None) -> Held:
    """The session's saved options under the ceilings in force (logged when changed)."""
    if ceiling is None:
        return Held(record.options)
    held = ceiling.hold(record.options)
    if held.changed:
        log.info(
            "session %s: saved options above the ceilings in force; running with %s",
            record.key,
            held.changed,
        )
    return held


async def _start_agent(
    record: SessionRecord,
    options: RunOptions,
    config: SessionConfig,
    new_agent: AgentFactory,
    place: AgentSpec,
) -> Agent:
    """Start the session's agent in ``place`` with ``options`` (its record's, under the
    ceilings): resume its transcript if it has one (from the shared store, with
    ``config.transcripts``), else begin it.

    Our record can be wrong about the transcript (a crash between saving the
    record and the CLI writing, or the reverse); the CLI says which in its error,
    so try the other way once.
    """
    resume = record.transcript_started
    transcripts = _Transcripts(config.transcripts, place)
    for attempt in range(2):
        uuid_ = record.claude_session_id
        if resume:
            await transcripts.materialise(uuid_)
        agent = new_agent(
            attrs.evolve(
                place,
                session_id=None if resume else uuid_,
                resume=uuid_ if resume else None,
                options=options,
            )
        )
        try:
            await agent.start(config.warmup_timeout_s)
            return agent
        except AgentStartError as exc:
            wrong_guess = NO_TRANSCRIPT in str(exc) if resume else TRANSCRIPT_EXISTS in str(exc)
            if attempt or not wrong_guess:
                raise
            log.info("session %s: %s; retrying with resume=%s", record.key, exc, not resume)
            resume = not resume
    raise AssertionError("unreachable")


def _closed_at_once(inbox: trio.MemoryReceiveChannel[SessionCommand]) -> bool:
    """Whether the dispatcher answered our SessionStarted with a close (a stale actor)."""
    try:
        command = inbox.receive_nowait()
    except (trio.WouldBlock, trio.EndOfChannel):
        return False
    if isinstance(command, CloseSessionNow):
        return True
    raise AssertionError(f"a session actor got {command!r} before it was idle")


def _close_inbox(inbox: trio.MemoryReceiveChannel[SessionCommand], failure: JobFailed) -> None:
    """Close the inbox; a job the dispatcher handed over that never ran is answered."""
    while True:
        try:
            command = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        if isinstance(command, Job):
            command.answer(failure)
    inbox.close()
