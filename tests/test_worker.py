"""The worker actor with a fake agent and a fake dispatcher, on trio's autojump clock.

The test plays the dispatcher: it reads what the worker sends on its channel
(``WorkerStarting``, ``WorkerReady``, ``WorkerFinished``, ``WorkerFailed``) and
hands jobs to the one-job inbox the worker offers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.turn import TurnLimits
from claude_code_api.actors.worker import WorkerConfig, serve_worker
from claude_code_api.agent import AgentStartError
from claude_code_api.messages import (
    Job,
    JobFailed,
    JobStarted,
    RunResult,
    UpstreamError,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from tests.fake_agent import FakeAgents, Finish, Retry, Say, Wait
from tests.test_turn import make_job

LIMIT = 1000
CONFIG = WorkerConfig(warmup_timeout_s=30, turn=TurnLimits(2.0, 1000))


async def start_worker(
    nursery: trio.Nursery, agents: FakeAgents, stop: StopSignal | None = None
) -> trio.MemoryReceiveChannel:
    """Start worker "w" in ``nursery``; return what it sends the dispatcher."""
    send, receive = trio.open_memory_channel(0)
    nursery.start_soon(
        serve_worker, "w", CONFIG, send, agents, Path("/homes"), stop or StopSignal()
    )
    return receive


async def ready(messages: trio.MemoryReceiveChannel) -> trio.MemorySendChannel[Job]:
    assert await messages.receive() == WorkerStarting("w")
    offer = await messages.receive()
    assert isinstance(offer, WorkerReady)
    return offer.inbox


async def test_a_worker_runs_one_job_per_agent_and_retires_it_gracefully(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("hi"), Finish("done")])
        messages = await start_worker(nursery, agents)
        inbox = await ready(messages)
        job, reply = make_job()
        inbox.send_nowait(job)
        assert await reply.receive() == JobStarted("w")
        await reply.receive()  # the text
        terminal = await reply.receive()
        assert isinstance(terminal, RunResult) and terminal.output == "done"
        with pytest.raises(trio.EndOfChannel):
            await reply.receive()
        assert await messages.receive() == WorkerFinished("w", job.id, True)
        await ready(messages)  # the next agent warms while the first retires
        first, second = agents.made
        assert first.events == ["start", "turn hello", "closed"]
        assert second.events == ["start"]
        assert first.spec.home != second.spec.home and first.spec.ephemeral


async def test_a_failed_warm_up_is_reported_before_the_worker_fails(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(start_failure="cannot prepare the agent's directory: read-only")
        send, messages = trio.open_memory_channel(0)
        failure: list[BaseException] = []

        async def run() -> None:
            try:
                await serve_worker("w", CONFIG, send, agents, Path("/h"), StopSignal())
            except AgentStartError as exc:
                failure.append(exc)

        nursery.start_soon(run)
        assert await messages.receive() == WorkerStarting("w")
        assert await messages.receive() == WorkerFailed(
            "w", "cannot prepare the agent's directory: read-only"
        )
        await trio.testing.wait_all_tasks_blocked()
        assert len(failure) == 1


async def test_an_idle_agent_that_exits_is_replaced(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_worker(nursery, agents)
        await ready(messages)
        agents.made[0].exit_now()
        inbox = await ready(messages)
        assert len(agents.made) == 2
        job, reply = make_job()
        inbox.send_nowait(job)
        assert await reply.receive() == JobStarted("w")


async def test_a_stop_interrupts_the_running_job_which_is_still_answered(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("partial"), Wait(100)])
        stop = StopSignal()
        messages = await start_worker(nursery, agents, stop)
        inbox = await ready(messages)
        job, reply = make_job()
        inbox.send_nowait(job)
        await reply.receive()  # started
        await reply.receive()  # "partial"
        stop.request_stop()
        terminal = await reply.receive()
        assert terminal == RunResult(success=False, output="partial", duration_ms=0)
        assert await messages.receive() == WorkerFinished("w", job.id, False)
        await trio.sleep(1)  # the retiring close
        assert agents.made[0].events[-2:] == ["interrupted", "closed"]


async def test_a_refused_credential_reaches_the_dispatcher(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Retry(401, "bad key"), Wait(100)])
        messages = await start_worker(nursery, agents)
        inbox = await ready(messages)
        job, reply = make_job()
        inbox.send_nowait(job)
        finished = await messages.receive()
        assert finished == WorkerFinished("w", job.id, False, UpstreamError(401, "bad key", 1))
        events = [reply.receive_nowait() for _ in range(3)]
        assert events[-1] == JobFailed(502, "upstream API error 401: bad key")
