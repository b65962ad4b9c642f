"""Worker actor: one pre-warmed Claude Code process for one-shot jobs.

A worker loops: warm an agent (process started, ``initialize`` answered, no
model call), tell the dispatcher it is ready, run the one job it is given, then
retire that process while a fresh one warms — so nothing leaks from one request
to the next. Each agent is ephemeral: its own HOME under ``homes``, removed
when it retires, and no transcript kept. Retiring and warming wait until the
job's reply has left (:func:`after_the_reply`): they must not take the CPU from it.

Reuse for the same user (``AGENT_REUSE_S`` > 0): after a job that went well,
the worker may keep its agent for that job's user only — it resets it
(``/clear``, its HOME emptied: :meth:`Agent.reset`) and offers itself to the
dispatcher *bound* to that user (:class:`Binding`) for ``AGENT_REUSE_S``. The
dispatcher prefers it for that user's jobs. A job of any other user handed to
it never runs on that agent: the worker retires it and runs the job on a fresh
one; if that job's deadline passes or it is cancelled while the fresh agent
warms, it is answered then and the warm-up starts over for whoever comes next.
When the time is up, after :data:`MAX_REUSES` requests, or after a job that
failed, timed out, was cancelled or switched the agent's model or permission
mode, the agent is retired. The user's CLAUDE.md comes with every one-shot
prompt (``Job.memory``), so a kept agent uses the current one.

With reuse, kept agents are extra to the pool: the service starts spare workers
*dormant* (``serve_worker(dormant=True)``: no process, :class:`WorkerDormant`),
and the dispatcher wakes one (:class:`Warm`) to warm an agent for anyone in the
place of each agent kept, or retires a kept agent (:class:`Retire`). So a worker
whose agent served a user and is done — retired, its time up, not kept — goes
dormant rather than warm a fresh one: the dispatcher decides whether the pool
needs one. Without reuse a worker replaces its agent after every job at once.

States (:class:`Next`; each phase is a method of :class:`_Worker` that returns the next):

* ``SLEEP`` (:meth:`_Worker._sleep`) — dormant, no process: → ``WARM`` on
  :class:`Warm` or on a job (held in :attr:`_Worker.carried`, run on the new agent);
  stays on :class:`Retire`;
* ``WARM`` (:meth:`_Worker._warm`, then :meth:`_Worker._serve`) — start an agent,
  then offer it and run what it is given until it must go: → ``WARM`` again after a
  job without reuse, when the idle agent exits or its credentials go stale
  (``renewal.py``), or when a job it must not run comes (another user's, for a kept
  agent: held and run on the next one); → ``SLEEP`` after an agent that served a user
  (with reuse) and on :class:`Retire`; → ``STOP`` when its warm-up fails;
* ``STOP`` — stopped, or failed. A stop request ends it between any two phases.

A job whose options are process arguments (a system prompt, tools, turn or
budget limits: :attr:`RunOptions.needs_own_process`) runs on an agent started for
it alone, while the warm one waits unused and is offered again afterwards; a
job that only names a model or permission mode runs on the warm agent, switched
by control requests before its prompt (no new process).

Channels: it sends on its own clone of the dispatcher's inbox (and closes it
when it ends); it owns the receive end of the one-command inbox it offers in each
:class:`WorkerReady` and :class:`WorkerDormant`; while running a job it owns
``job.reply`` and answers it.

Error handling: a warm-up that fails or times out (including a directory that
cannot be created) is reported to the dispatcher as :class:`WorkerFailed` — so
``/health`` says why and ``/run`` answers 503 at once once every worker fails —
and then raised as :class:`AgentStartError`: the worker supervisor restarts the
worker, backing off in a crash loop. A job whose agent dies or misbehaves is that
job's failure (502), not the worker's: the broken process is retired and a new
one warms, so one bad prompt cannot put the pool into backoff for everyone. An
idle agent that exits, or whose credentials went stale, is replaced, and a job
handed over at that moment runs on the replacement.
"""

from __future__ import annotations

import enum
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import assert_never

import attrs
import trio

from ..agent.protocol import Agent, AgentError, AgentFactory, AgentSpec, AgentStartError
from ..auth.renewal import CredentialsStamp, CredentialsVersion
from ..messages import (
    DEFAULT_OPTIONS,
    DispatcherMessage,
    Job,
    JobFailed,
    Retire,
    Warm,
    WorkerCommand,
    WorkerDormant,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from .idle import SHUTTING_DOWN, next_command
from .stopping import StopSignal
from .turn import TurnLimits, TurnOutcome, outcome_before_start, run_turn

log = logging.getLogger(__name__)

# An agent is kept at most this many times (for one user), so its memory cannot creep.
MAX_REUSES = 50
# How long retiring a used agent and warming the next wait, at most, for the reply to leave.
REPLY_HEAD_START_S = 0.05


@attrs.frozen
class WorkerConfig:
    warmup_timeout_s: float
    turn: TurnLimits
    # AGENT_REUSE_S: how long a used agent waits for its user's next request (0: never).
    reuse_s: float = 0.0


class Next(enum.Enum):
    """What a worker does next: each phase of its life returns one."""

    WARM = "warm"  # start a fresh agent (for anyone, or for the carried job)
    SLEEP = "sleep"  # hold no process until the dispatcher says Warm (dormant)
    STOP = "stop"  # stopped, or its warm-up failed


async def serve_worker(
    worker_id: str,
    config: WorkerConfig,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    new_agent: AgentFactory,
    homes: Path,
    stop: StopSignal,
    *,
    dormant: bool = False,
    credentials: CredentialsVersion | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run worker ``worker_id`` until cancelled or ``stop`` is requested.

    It starts by warming an agent, or ``dormant`` (a spare beyond ``POOL_SIZE``: no
    process until the dispatcher wakes it). A stop request interrupts a running
    job (it is still answered) or ends the wait for one. ``dispatcher`` is this
    worker's own clone: it is closed here. An agent waiting for a job is replaced once
    ``credentials`` move past those it started with (see ``renewal.py``).
    """
    task_status.started()
    credentials = credentials or CredentialsVersion()
    async with dispatcher, trio.open_nursery() as retiring:
        worker = _Worker(
            worker_id, config, dispatcher, new_agent, homes, stop, retiring, credentials
        )
        await worker.run(Next.SLEEP if dormant else Next.WARM)
    if worker.failure is not None:  # raised out here, so not wrapped in the nursery's group
        raise worker.failure


@attrs.define
class _Worker:
    """One worker's phases: :meth:`_sleep` (dormant), :meth:`_warm`, :meth:`_serve`."""

    worker_id: str
    config: WorkerConfig
    dispatcher: trio.MemorySendChannel[DispatcherMessage]
    new_agent: AgentFactory
    homes: Path
    stop: StopSignal
    retiring: trio.Nursery  # where used agents close while the worker goes on
    credentials: CredentialsVersion
    stamp: CredentialsStamp | None = None  # the credentials the current agent started with
    # A job handed over that the agent at hand must not run (it died while idle, or it
    # served another user): it runs on the next agent, still this worker's job for the
    # dispatcher (so no WorkerStarting for it).
    carried: Job | None = None
    failure: AgentStartError | None = None  # the warm-up failure that ended it

    async def run(self, first: Next) -> None:
        step = first
        try:
            while not self.stop.requested:
                match step:
                    case Next.SLEEP:
                        step = await self._sleep()
                    case Next.WARM:
                        step = await self._warm_and_serve()
                    case Next.STOP:
                        break
                    case _:
                        assert_never(step)
        finally:
            if self.carried is not None:
                self.carried.answer(SHUTTING_DOWN)
                self.carried = None

    async def _sleep(self) -> Next:
        """Dormant: no process; wait for the dispatcher's word."""
        command = await _offer(partial(WorkerDormant, self.worker_id), self.dispatcher, self.stop)
        match command:
            case None:
                return Next.STOP
            case Warm():
                # The pool is short: a job took its agent, or one was kept for its user.
                # A reply on its way out goes first.
                await after_the_reply()
                return Next.WARM
            case Retire():
                return Next.SLEEP
            case Job():  # a dispatcher with no agent for it: warm one for this job
                self.carried = command
                return Next.WARM
            case _:
                assert_never(command)

    async def _warm_and_serve(self) -> Next:
        warm = await self._warm()
        if warm is None:
            return Next.STOP if self.failure is not None else Next.WARM
        agent, home = warm
        try:
            step = await self._serve(agent, home)
        except BaseException:
            await agent.close(grace=0)
            raise
        # Retire the used process in the background so the next one warms meanwhile.
        self.retiring.start_soon(agent.close)
        return step

    async def _warm(self) -> tuple[Agent, Path] | None:
        """Start a fresh agent; None when stopped, failed (:attr:`failure`), or when the
        carried job ended while it warmed (it is answered then)."""
        carried = self.carried
        if carried is None:
            await self.dispatcher.send(WorkerStarting(self.worker_id))
        spec = AgentSpec(
            name=self.worker_id, home=self.homes / uuid.uuid4().hex[:12], ephemeral=True
        )
        agent = self.new_agent(spec)
        # Taken before the start: credentials that change during it make the agent stale.
        self.stamp = self.credentials.stamp()
        # A carried job's deadline and cancellation (DELETE, a departed client) cut the
        # warm-up it waits for: it is answered then, not when the agent is warm.
        start_scope = trio.CancelScope(deadline=math.inf if carried is None else carried.deadline)
        try:
            with _cut_by(carried, start_scope), self.stop.guard(start_scope), start_scope:
                await agent.start(self.config.warmup_timeout_s)
        except AgentStartError as exc:
            if carried is not None:  # answered first: the send below may be cancelled
                self.carried = None
                carried.answer(JobFailed(502, str(exc)))
            await self.dispatcher.send(WorkerFailed(self.worker_id, str(exc)))
            self.failure = exc
            return None
        if self.stop.requested:  # stopped while warming up
            await agent.close(grace=0)
            return None
        if start_scope.cancelled_caught:  # the carried job ended while its agent warmed
            assert carried is not None
            self.carried = None
            carried.answer(outcome_before_start(carried).terminal)
            self.retiring.start_soon(agent.close)
            await self.dispatcher.send(WorkerFinished(self.worker_id, carried.id, False, None))
            return None  # and warm another, for whoever comes next
        return agent, spec.home

    async def _serve(self, agent: Agent, home: Path) -> Next:
        """Offer the warm ``agent`` and run the jobs it is given, until it must go."""
        binding: Binding | None = None  # whom the agent serves, once it has served anyone
        while True:
            job, self.carried = self.carried, None
            if job is None:
                given = await self._offered(agent, binding)
                if isinstance(given, Next):
                    return given
                job = given
            if agent.exited:
                log.warning("%s: agent exited while idle; starting another", self.worker_id)
            if agent.exited or (binding is not None and not binding.may_run(job)):
                # Held for a fresh agent: this one died, or serves another user (never
                # across users).
                self.carried = job
                return Next.WARM
            outcome = await self._run(agent, home, job)
            if self.stop.requested:
                return Next.STOP
            if job.options.needs_own_process:
                continue  # the warm agent did not run it: offered again as it was
            # What follows (a reset, or a retirement and a warm-up) waits for the reply.
            await after_the_reply()
            kept = await _keep_for_user(self.worker_id, self.config, agent, job, outcome, binding)
            if kept is None:
                return self._after_use()
            binding = kept

    async def _offered(self, agent: Agent, binding: Binding | None) -> Job | Next:
        """Offer ``agent`` (to anyone, or only to its ``binding``'s user until their time is
        up) until the dispatcher gives it a job; or the phase that follows when it must go."""
        assert self.stamp is not None
        while True:
            command = await _offer(
                partial(WorkerReady, self.worker_id, bound_to=_user_of(binding)),
                self.dispatcher,
                self.stop,
                (agent.wait_exited, self.stamp.wait_stale),
                math.inf if binding is None else binding.until,
            )
            if self.stamp.stale() and not agent.exited:
                # Still idle: it goes as an agent that exited while idle does.
                log.info("%s: new Claude credentials; replacing its idle agent", self.worker_id)
                await agent.close()
            match command:
                case None:  # stopped, its user's time is up, or the agent exited
                    if agent.exited:
                        log.warning("%s: idle agent exited", self.worker_id)
                    return self._after_use() if binding is not None else Next.WARM
                case Retire():
                    return Next.SLEEP
                case Warm():  # warm already
                    continue
                case Job():
                    return command
                case _:
                    assert_never(command)

    def _after_use(self) -> Next:
        """What follows an agent that served someone and is done: without reuse, a fresh
        one for the pool (as the original); with it, dormant — an agent that served a user
        took no unassigned one's place (that was refilled when it was taken or kept), and the
        dispatcher wakes a spare when the pool is short."""
        return Next.SLEEP if self.config.reuse_s > 0 else Next.WARM

    async def _run(self, agent: Agent, home: Path, job: Job) -> TurnOutcome:
        """Run ``job`` (on ``agent``, or on a process of its own), answer it, report it."""
        taken_at = trio.current_time()
        if job.options.needs_own_process:
            # Options that are process arguments: a process of its own for this
            # job; the warm one stays unused and is offered again, as it was.
            outcome = await _run_on_own_agent(
                self.worker_id,
                self.config,
                job,
                self.new_agent,
                self.homes,
                self.stop,
                self.retiring,
                taken_at,
            )
        else:
            turn_scope = trio.CancelScope()
            with self.stop.guard(turn_scope):
                outcome = await run_turn(
                    agent,
                    job,
                    worker_id=self.worker_id,
                    limits=self.config.turn,
                    turn_scope=turn_scope,
                    taken_at=taken_at,
                    model=job.options.model,
                    permission_mode=job.options.permission_mode,
                    home=home,
                )
        job.answer(outcome.terminal)
        await self.dispatcher.send(
            WorkerFinished(self.worker_id, job.id, outcome.ok, outcome.upstream_error)
        )
        return outcome


def _user_of(binding: Binding | None) -> str | None:
    return None if binding is None else binding.user_id


@attrs.frozen
class Binding:
    """The one user a used agent may serve next, until when, and how often it has."""

    user_id: str
    until: float  # trio time
    uses: int

    def may_run(self, job: Job) -> bool:
        """A job of its user; or one that runs on a process of its own, not this agent."""
        return job.user_id == self.user_id or job.options.needs_own_process


async def _keep_for_user(
    worker_id: str,
    config: WorkerConfig,
    agent: Agent,
    job: Job,
    outcome: TurnOutcome,
    binding: Binding | None,
) -> Binding | None:
    """Reset ``agent`` for ``job``'s user's next request; None: retire it instead.

    Kept only after a job that went well and changed nothing on the agent (no model
    or permission mode of its own), of a user who came back (``Job.keep_agent``), at most
    :data:`MAX_REUSES` times, while ``AGENT_REUSE_S`` is on. A reset that fails retires
    the agent.
    """
    uses = 0 if binding is None else binding.uses
    if (
        config.reuse_s <= 0
        or not job.keep_agent
        or uses >= MAX_REUSES
        or not outcome.ok
        or not outcome.agent_usable
        or outcome.cut is not None
        or job.options != DEFAULT_OPTIONS
        or agent.exited
    ):
        return None
    try:
        await agent.reset(config.warmup_timeout_s)
    except AgentError as exc:
        log.info("%s: agent not reused: %s", worker_id, exc)
        return None
    return Binding(job.user_id, trio.current_time() + config.reuse_s, uses + 1)


async def _run_on_own_agent(
    worker_id: str,
    config: WorkerConfig,
    job: Job,
    new_agent: AgentFactory,
    homes: Path,
    stop: StopSignal,
    retiring: trio.Nursery,
    taken_at: float,
) -> TurnOutcome:
    """Start an agent with ``job``'s options, run the job on it, retire it in the background.

    Its start counts against the job's deadline and stops at once when the job is
    cancelled (DELETE, a departed client) or the worker is stopped; an agent that
    cannot start fails the job (502), not the worker.
    """
    name = f"{worker_id}+own"
    spec = AgentSpec(
        name=name, home=homes / uuid.uuid4().hex[:12], ephemeral=True, options=job.options
    )
    agent = new_agent(spec)
    try:
        start_scope = trio.CancelScope(deadline=job.deadline)
        failure: JobFailed | None = None
        with job.cancellation.calling(start_scope.cancel), stop.guard(start_scope), start_scope:
            try:
                await agent.start(config.warmup_timeout_s)
            except AgentStartError as exc:
                failure = JobFailed(502, f"agent failed to start: {exc}")
        if failure is not None:
            return TurnOutcome(failure, agent_usable=False)
        if start_scope.cancelled_caught:  # cancelled, out of time or stopped while starting
            return outcome_before_start(job)
        turn_scope = trio.CancelScope()
        with stop.guard(turn_scope):
            return await run_turn(
                agent,
                job,
                worker_id=name,
                limits=config.turn,
                turn_scope=turn_scope,
                taken_at=taken_at,
                home=spec.home,
            )
    finally:
        retiring.start_soon(agent.close)


def _cut_by(job: Job | None, scope: trio.CancelScope) -> AbstractContextManager[None]:
    """Within: ``job``'s cancellation cancels ``scope`` (nothing without a job)."""
    return nullcontext() if job is None else job.cancellation.calling(scope.cancel)


async def after_the_reply() -> None:
    """Return once every other task waits — the reply just answered is on its socket.

    Retiring an agent and warming the next are CPU-heavy (a process exits, another
    starts); done at once, they compete with the reply they follow for the CPU.
    trio has no task priorities: waiting until all else waits is the lowest one.
    Under steady load the service may never be all idle, so it is bounded
    (:data:`REPLY_HEAD_START_S`).
    """
    # trio.testing is imported after the service listens (Service._agent_factory):
    # at start-up it would delay the first /health by its import.
    import trio.testing

    with trio.move_on_after(REPLY_HEAD_START_S):
        await trio.testing.wait_all_tasks_blocked()


async def _offer(
    offer: Callable[[trio.MemorySendChannel[WorkerCommand]], DispatcherMessage],
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    stop: StopSignal,
    ends: tuple[Callable[[], Awaitable[object]], ...] = (),
    until: float = math.inf,
) -> WorkerCommand | None:
    """Send the dispatcher ``offer(inbox)`` and wait for its one command on ``inbox``.

    Returns None when stopped, at ``until`` with no command, or when one of ``ends``
    (the idle agent's exit, its credentials going stale) returned with none.
    """
    # Buffer 1: the dispatcher sends exactly one command without waiting.
    command_send, command_receive = trio.open_memory_channel[WorkerCommand](1)
    async with command_receive:
        await dispatcher.send(offer(command_send))
        return await next_command(command_receive, stop, *ends, until=until)
