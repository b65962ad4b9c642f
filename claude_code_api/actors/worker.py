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
mode, the agent is retired as without reuse. The user's CLAUDE.md
comes with every one-shot prompt (``Job.memory``), so a kept agent uses the
current one.

A job whose options are process arguments (a system prompt, tools, turn or
budget limits: :attr:`RunOptions.needs_own_process`) runs on an agent started for
it alone, while the warm one waits unused and is offered again afterwards; a
job that only names a model or permission mode runs on the warm agent, switched
by control requests before its prompt (no new process).

Channels: it sends on its own clone of the dispatcher's inbox (and closes it
when it ends); it owns the receive end of the one-job inbox it offers in each
:class:`WorkerReady`; while running a job it owns ``job.reply`` and answers it.

Error handling: a warm-up that fails or times out (including a directory that
cannot be created) is reported to the dispatcher as :class:`WorkerFailed` — so
``/health`` says why and ``/run`` answers 503 at once once every worker fails —
and then raised as :class:`AgentStartError`: the worker supervisor restarts the
worker, backing off in a crash loop. A job whose agent dies or misbehaves is that
job's failure (502), not the worker's: the broken process is retired and a new
one warms, so one bad prompt cannot put the pool into backoff for everyone. An
idle agent that exits is replaced, and a job handed over at that moment runs on
the replacement.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import attrs
import trio

from ..agent import Agent, AgentError, AgentFactory, AgentSpec, AgentStartError
from ..messages import (
    DEFAULT_OPTIONS,
    DispatcherMessage,
    Job,
    JobFailed,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from .stopping import StopSignal
from .turn import TurnLimits, TurnOutcome, outcome_before_start, run_turn

log = logging.getLogger(__name__)

SHUTTING_DOWN = JobFailed(503, "service is shutting down")
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


async def serve_worker(
    worker_id: str,
    config: WorkerConfig,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    new_agent: AgentFactory,
    homes: Path,
    stop: StopSignal,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run worker ``worker_id`` until cancelled or ``stop`` is requested.

    A stop request interrupts a running job (it is still answered) or ends the
    wait for one. ``dispatcher`` is this worker's own clone: it is closed here.
    """
    task_status.started()
    async with dispatcher, trio.open_nursery() as retiring:
        failure = await _work(worker_id, config, dispatcher, new_agent, homes, stop, retiring)
    if failure is not None:  # raised out here, so not wrapped in the nursery's group
        raise failure


async def _work(
    worker_id: str,
    config: WorkerConfig,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    new_agent: AgentFactory,
    homes: Path,
    stop: StopSignal,
    retiring: trio.Nursery,
) -> AgentStartError | None:
    """The worker's loop; returns the warm-up failure that ends it, if one does."""
    # A job handed over that the agent at hand must not run (it died while idle, or it
    # served another user): it runs on the next agent, still this worker's job for the
    # dispatcher (so no WorkerStarting for it).
    carried: Job | None = None
    while not stop.requested:
        if carried is None:
            await dispatcher.send(WorkerStarting(worker_id))
        spec = AgentSpec(name=worker_id, home=homes / uuid.uuid4().hex[:12], ephemeral=True)
        agent = new_agent(spec)
        # A carried job's deadline and cancellation (DELETE, a departed client) cut the
        # warm-up it waits for: it is answered then, not when the agent is warm.
        start_scope = trio.CancelScope(deadline=math.inf if carried is None else carried.deadline)
        try:
            with _cut_by(carried, start_scope), stop.guard(start_scope), start_scope:
                await agent.start(config.warmup_timeout_s)
        except AgentStartError as exc:
            if carried is not None:  # answered first: the send below may be cancelled
                carried.answer(JobFailed(502, str(exc)))
            await dispatcher.send(WorkerFailed(worker_id, str(exc)))
            return exc
        except BaseException:  # cancelled from outside while warming: nobody else answers it
            if carried is not None:
                carried.answer(SHUTTING_DOWN)
            raise
        if stop.requested:  # stopped while warming up
            await agent.close(grace=0)
            break
        if start_scope.cancelled_caught:  # the carried job ended while its agent warmed
            assert carried is not None
            ended, carried = carried, None
            ended.answer(outcome_before_start(ended).terminal)
            retiring.start_soon(agent.close)
            await dispatcher.send(WorkerFinished(worker_id, ended.id, False, None))
            continue  # and warm another, for whoever comes next
        binding: Binding | None = None  # whom the agent serves, once it has served anyone
        try:
            while True:
                job, carried = carried, None
                if job is None:
                    job = await _offer(worker_id, dispatcher, stop, agent.wait_exited, binding)
                if job is not None and agent.exited:
                    log.warning("%s: agent exited while idle; starting another", worker_id)
                    carried = job
                elif job is not None and binding is not None and not binding.may_run(job):
                    # Never across users: another user's job gets a fresh agent.
                    carried = job
                if job is None or carried is not None:
                    break
                taken_at = trio.current_time()
                if job.options.needs_own_process:
                    # Options that are process arguments: a process of its own for this
                    # job; the warm one stays unused and is offered again, as it was.
                    outcome = await _run_on_own_agent(
                        worker_id, config, job, new_agent, homes, stop, retiring, taken_at
                    )
                else:
                    turn_scope = trio.CancelScope()
                    with stop.guard(turn_scope):
                        outcome = await run_turn(
                            agent,
                            job,
                            worker_id=worker_id,
                            limits=config.turn,
                            turn_scope=turn_scope,
                            taken_at=taken_at,
                            model=job.options.model,
                            permission_mode=job.options.permission_mode,
                            home=spec.home,
                        )
                job.answer(outcome.terminal)
                await dispatcher.send(
                    WorkerFinished(worker_id, job.id, outcome.ok, outcome.upstream_error)
                )
                if stop.requested:
                    break
                if job.options.needs_own_process:
                    continue
                # What follows (a reset, or a retirement and a warm-up) waits for the reply.
                await after_the_reply()
                binding = await _keep_for_user(worker_id, config, agent, job, outcome, binding)
                if binding is None:
                    break
        except BaseException:
            await agent.close(grace=0)
            if carried is not None:
                carried.answer(SHUTTING_DOWN)
            raise
        # Retire the used process in the background so the next one warms meanwhile.
        retiring.start_soon(agent.close)
    if carried is not None:
        carried.answer(SHUTTING_DOWN)
    return None


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
    or permission mode of its own), at most :data:`MAX_REUSES` times, while
    ``AGENT_REUSE_S`` is on. A reset that fails retires the agent.
    """
    uses = 0 if binding is None else binding.uses
    if (
        config.reuse_s <= 0
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
    worker_id: str,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    stop: StopSignal,
    agent_exited: Callable[[], Awaitable[None]],
    binding: Binding | None = None,
) -> Job | None:
    """Tell the dispatcher this worker is ready and wait for its one job.

    Returns None when stopped, when a ``binding``'s time is up with no job, or
    when the idle agent's process exited and no job had been handed over; the
    caller checks ``agent.exited``.
    """
    # Buffer 1: the dispatcher hands over exactly one job without waiting.
    job_send, job_receive = trio.open_memory_channel[Job](1)
    async with job_receive:
        bound_to = None if binding is None else binding.user_id
        await dispatcher.send(WorkerReady(worker_id, job_send, bound_to))
        job = None
        # A task per offer, not one for the agent's life: waiting for the exit of an
        # agent is also what retires it when its credentials are stale (RetiredWhenStale),
        # which must happen while it is idle only.
        async with trio.open_nursery() as nursery:

            async def end_wait_if_agent_exits() -> None:
                await agent_exited()
                nursery.cancel_scope.cancel()

            nursery.start_soon(end_wait_if_agent_exits)
            with stop.guard(), trio.move_on_at(math.inf if binding is None else binding.until):
                job = await job_receive.receive()
            nursery.cancel_scope.cancel()
        if job is not None:
            return job
        # A job handed over at the very moment the wait ended must not be lost.
        try:
            job = job_receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None
        if stop.requested:
            job.answer(SHUTTING_DOWN)
            return None
        return job
