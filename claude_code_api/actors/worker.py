"""Worker actor: one pre-warmed Claude Code process for one-shot jobs.

A worker loops: warm an agent (CLI started, ``initialize`` answered, no model
call), tell the dispatcher it is ready, run the one job it is given, then retire
that process while a fresh one warms — so no conversation leaks from one
request to the next.

Channels: it sends on a clone of the dispatcher's inbox (and closes that clone
when it ends); it owns the receive end of the one-job inbox it offers in each
:class:`WorkerReady`; while running a job it owns ``job.reply`` and closes it.

Error handling: a warm-up that fails or times out raises :class:`AgentStartError`
after telling the dispatcher — the worker supervisor restarts the worker and
counts it toward its restart intensity. A job whose agent dies or misbehaves is
that job's failure (502), not the worker's: the broken process is retired and a
new one warms, so a prompt that crashes the CLI cannot put the pool into crash-loop
backoff for everyone.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import trio

from ..agent import Agent, AgentError, agent_options
from ..config import Settings
from ..messages import (
    Job,
    JobFailed,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from .stopping import StopSignal
from .turn import run_turn_for_job

log = logging.getLogger(__name__)


async def serve_worker(
    worker_id: str,
    settings: Settings,
    dispatcher: trio.MemorySendChannel,
    workspaces: Path,
    stop: StopSignal,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run worker ``worker_id`` until cancelled or ``stop`` is requested.

    Each agent runs in a fresh directory under ``workspaces``, removed when the
    agent retires, so files one job wrote are not seen by the next. A stop
    request interrupts a running job (it is still answered) or ends the wait
    for one.
    """
    task_status.started()
    # A job handed over just as the previous agent died while idle: run it on the next.
    carried: Job | None = None
    async with dispatcher, trio.open_nursery() as retiring:
        while not stop.requested:
            await dispatcher.send(WorkerStarting(worker_id))
            workspace = workspaces / uuid.uuid4().hex[:12]
            workspace.mkdir(parents=True)
            agent = Agent(agent_options(settings, cwd=workspace))
            try:
                with stop.guard():
                    await agent.start(settings.warmup_timeout_s)
            except AgentError as exc:
                log.warning("%s: warm-up failed: %s", worker_id, exc)
                await _remove_tree(workspace)
                await dispatcher.send(WorkerFailed(worker_id, str(exc)))
                if carried is not None:
                    carried.answer(JobFailed(502, str(exc)))
                raise
            if stop.requested:  # stopped while warming up
                await agent.close(grace=0)
                await _remove_tree(workspace)
                break
            try:
                job, carried = carried, None
                if job is None:
                    job = await _offer(worker_id, dispatcher, stop, agent)
                if job is not None and agent.exited:
                    log.warning("%s: agent exited while idle; starting another", worker_id)
                    carried = job
                elif job is not None:
                    turn_scope = trio.CancelScope()
                    with stop.guard(turn_scope):
                        outcome = await run_turn_for_job(
                            agent, job, worker_id, settings, turn_scope=turn_scope
                        )
                    await dispatcher.send(WorkerFinished(worker_id, job.id, outcome.ok))
            except BaseException:
                await agent.close(grace=0)
                await _remove_tree(workspace)
                raise
            # Retire the used process in the background so the next one warms meanwhile.
            retiring.start_soon(_retire, agent, workspace)
        if carried is not None:
            carried.answer(JobFailed(503, "service is shutting down"))


async def _retire(agent: Agent, workspace: Path) -> None:
    await agent.close()
    await _remove_tree(workspace)


async def _remove_tree(path: Path) -> None:
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(shutil.rmtree, path, True)


async def _offer(
    worker_id: str, dispatcher: trio.MemorySendChannel, stop: StopSignal, agent: Agent
) -> Job | None:
    """Tell the dispatcher this worker is ready and wait for its one job.

    Returns None when stopped, or when the idle agent's process exited and no
    job had been handed over; the caller checks ``agent.exited``.
    """
    # Buffer 1: the dispatcher hands over exactly one job without waiting.
    job_send, job_receive = trio.open_memory_channel[Job](1)
    async with job_receive:
        await dispatcher.send(WorkerReady(worker_id, job_send))
        job = None
        async with trio.open_nursery() as nursery:

            async def end_wait_if_agent_exits() -> None:
                await agent.wait_exited()
                nursery.cancel_scope.cancel()

            nursery.start_soon(end_wait_if_agent_exits)
            with stop.guard():
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
            job.answer(JobFailed(503, "service is shutting down"))
            return None
        return job
