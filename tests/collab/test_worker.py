"""The worker actor with a fake agent and a fake dispatcher, on trio's autojump clock.

The test plays the dispatcher: it reads what the worker sends on its channel
(``WorkerStarting``, ``WorkerReady``, ``WorkerFinished``, ``WorkerFailed``) and
hands jobs to the one-job inbox the worker offers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from claude_code_api.actors import worker as worker_module
from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.turn import CutReason, TurnLimits
from claude_code_api.actors.worker import SHUTTING_DOWN, WorkerConfig, serve_worker
from claude_code_api.agent.protocol import AgentStartError
from claude_code_api.messages import (
    Job,
    JobFailed,
    JobStarted,
    Retire,
    RunOptions,
    RunResult,
    UpstreamError,
    Warm,
    WorkerDormant,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from tests.collab.test_turn import make_job
from tests.support.fake_agent import FakeAgents, Finish, Retry, Say, Wait

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
        assert terminal == RunResult(success=False, output="partial", duration_ms=0, stopped=True)
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


# --- reuse for the same user (AGENT_REUSE_S) ------------------------------------------

REUSE = attrs.evolve(CONFIG, reuse_s=5.0)


def user_job(user_id: str, job_id: str, **kwargs) -> tuple[Job, trio.MemoryReceiveChannel]:
    job, reply = make_job(**kwargs)
    return attrs.evolve(job, id=job_id, user_id=user_id, reply=job.reply), reply


async def start_reusing_worker(
    nursery: trio.Nursery, agents: FakeAgents, config: WorkerConfig = REUSE
) -> trio.MemoryReceiveChannel:
    send, receive = trio.open_memory_channel(0)
    nursery.start_soon(serve_worker, "w", config, send, agents, Path("/homes"), StopSignal())
    return receive


async def woken(messages: trio.MemoryReceiveChannel) -> trio.MemorySendChannel[Job]:
    """The worker went dormant: play the dispatcher waking it; the fresh agent's inbox."""
    dormant = await messages.receive()
    assert isinstance(dormant, WorkerDormant)
    dormant.inbox.send_nowait(Warm())
    return await ready(messages)


async def finish(job: Job, reply: trio.MemoryReceiveChannel, messages) -> object:
    """Read ``job``'s reply to its end and the worker's WorkerFinished; the terminal event."""
    events = [event async for event in reply]
    assert await messages.receive() == WorkerFinished("w", job.id, True)
    return events[-1]


async def kept_for_alice(nursery: trio.Nursery, agents: FakeAgents):
    """A reusing worker that ran alice's job "j1": (its messages, its offer bound to alice)."""
    messages = await start_reusing_worker(nursery, agents)
    inbox = await ready(messages)
    job, reply = user_job("alice", "j1")
    inbox.send_nowait(job)
    assert isinstance(await finish(job, reply, messages), RunResult)
    offer = await messages.receive()
    assert offer.bound_to == "alice"  # no WorkerStarting: the same agent, reset
    return messages, offer


async def test_a_used_agent_is_reset_and_offered_to_its_user_only(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages, offer = await kept_for_alice(nursery, agents)
        second, reply = user_job("alice", "j2", prompt="again")
        offer.inbox.send_nowait(second)
        assert isinstance(await finish(second, reply, messages), RunResult)
        assert (await messages.receive()).bound_to == "alice"
        assert len(agents.made) == 1
        assert agents.made[0].events == ["start", "turn hello", "reset", "turn again", "reset"]


async def test_another_users_job_runs_on_a_fresh_agent(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages, offer = await kept_for_alice(nursery, agents)
        bobs, reply = user_job("bob", "j2", prompt="bob's")
        offer.inbox.send_nowait(bobs)
        # Still this worker's job for the dispatcher: no WorkerStarting while it warms.
        assert isinstance(await finish(bobs, reply, messages), RunResult)
        assert (await messages.receive()).bound_to == "bob"
        alices_agent, bobs_agent = agents.made
        assert alices_agent.events == ["start", "turn hello", "reset", "closed"]
        assert bobs_agent.events == ["start", "turn bob's", "reset"]


async def test_a_job_carried_to_a_fresh_agent_is_answered_if_the_worker_is_cancelled(
    autojump_clock,
):
    # Bob's job waits for a fresh agent (the kept one served alice); the worker is
    # cancelled from outside (its supervisor) while that agent warms: bob is answered.
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        async with trio.open_nursery() as worker_nursery:
            messages, offer = await kept_for_alice(worker_nursery, agents)
            bobs, bobs_reply = user_job("bob", "j2")
            offer.inbox.send_nowait(bobs)
            await trio.sleep(agents.start_s / 2)
            assert len(agents.made) == 2  # bob's agent is warming
            worker_nursery.cancel_scope.cancel()
        assert [event async for event in bobs_reply] == [SHUTTING_DOWN]


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
async def test_a_carried_job_ends_while_its_fresh_agent_warms(autojump_clock, nursery, how):
    # Bob's job waits for a fresh agent (the kept one served alice). A DELETE, or its
    # deadline, ends it before that agent is warm: it is answered at once, and the
    # worker warms another agent for whoever comes next.
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages, offer = await kept_for_alice(nursery, agents)
        bobs, bobs_reply = user_job("bob", "j2", timeout_s=agents.start_s / 2)
        handed_at = trio.current_time()
        offer.inbox.send_nowait(bobs)
        if how == "cancelled":
            await trio.sleep(agents.start_s / 4)
            bobs.cancellation.cancel(CutReason.CANCELLED)
        [answer] = [event async for event in bobs_reply]
        assert isinstance(answer, RunResult) and not answer.success
        assert answer.cancelled == (how == "cancelled")
        assert answer.timed_out == (how == "timed out")
        waited = trio.current_time() - handed_at
        assert waited == (agents.start_s / 4 if how == "cancelled" else agents.start_s / 2)
        assert await messages.receive() == WorkerFinished("w", "j2", False)
        assert await messages.receive() == WorkerStarting("w")
        assert isinstance(await messages.receive(), WorkerReady)  # a third agent, unbound
        alices_agent, bobs_agent, next_agent = agents.made
        assert bobs_agent.events == ["start", "closed (already exited)"]  # cut while starting
        assert next_agent.events == ["start"]


async def test_a_kept_agent_that_exits_before_its_next_offer_is_replaced_at_once(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(reset_s=1.0)
        messages = await start_reusing_worker(nursery, agents)
        inbox = await ready(messages)
        job, reply = user_job("alice", "j1")
        inbox.send_nowait(job)
        assert isinstance(await finish(job, reply, messages), RunResult)
        await trio.sleep(0.5)  # the reset is under way: the agent is kept, then offered
        agents.made[0].exit_now()
        exited_at = trio.current_time()
        offer = await messages.receive()  # offered as it was kept, then withdrawn at once:
        assert isinstance(offer, WorkerReady) and offer.bound_to == "alice"
        # Dormant at once (the reset's end), not when the kept agent's time would be up:
        # the dispatcher wakes it when the pool is short.
        await woken(messages)
        assert trio.current_time() - exited_at < REUSE.reuse_s / 2


async def test_a_kept_agent_is_retired_when_its_time_is_up(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_reusing_worker(nursery, agents)
        inbox = await ready(messages)
        job, reply = user_job("alice", "j1")
        inbox.send_nowait(job)
        await finish(job, reply, messages)
        assert (await messages.receive()).bound_to == "alice"
        kept_at = trio.current_time()
        dormant = await messages.receive()  # when its time is up: no process
        assert isinstance(dormant, WorkerDormant)
        assert trio.current_time() - kept_at == REUSE.reuse_s
        dormant.inbox.send_nowait(Warm())
        await ready(messages)  # woken (the pool was short): a fresh agent
        assert agents.made[0].events[-1] == "closed" and agents.made[1].events == ["start"]


@pytest.mark.parametrize(
    "case",
    ["failed", "model", "reset fails", "reuse off"],
)
async def test_an_agent_is_retired_instead_of_kept(autojump_clock, nursery, case):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(
            script=lambda p: [Finish("bad", is_error=True)] if case == "failed" else [Finish("ok")],
            reset_failure="no /clear" if case == "reset fails" else None,
        )
        messages = await start_reusing_worker(
            nursery, agents, CONFIG if case == "reuse off" else REUSE
        )
        inbox = await ready(messages)
        job, reply = user_job("alice", "j1")
        if case == "model":  # a job that switched the agent's model leaves it switched
            job = attrs.evolve(job, options=RunOptions(model="other"))
        inbox.send_nowait(job)
        [event async for event in reply]
        assert (await messages.receive()).job_id == "j1"
        if case == "reuse off":  # replaced at once, as the original does
            await ready(messages)
        else:  # dormant: the dispatcher wakes it if the pool is short
            await woken(messages)
        assert agents.made[0].events[-1] == "closed" and len(agents.made) == 2


async def test_an_agent_serves_at_most_max_reuses_requests(autojump_clock, nursery, monkeypatch):
    monkeypatch.setattr(worker_module, "MAX_REUSES", 2)
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_reusing_worker(nursery, agents)
        offer = WorkerReady("w", await ready(messages))
        for n in range(3):
            job, reply = user_job("alice", f"j{n}")
            offer.inbox.send_nowait(job)
            await finish(job, reply, messages)
            offer = await messages.receive()
        assert isinstance(offer, WorkerDormant)
        offer.inbox.send_nowait(Warm())
        await ready(messages)
        assert agents.made[0].events.count("reset") == 2 and len(agents.made) == 2


async def test_retiring_and_warming_wait_for_the_reply_to_leave(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_worker(nursery, agents)
        inbox = await ready(messages)
        job, reply = make_job()
        inbox.send_nowait(job)
        [event async for event in reply]
        assert (await messages.receive()).job_id == job.id
        # The reply's reader is still busy (never blocked): the used agent is left alone.
        for _ in range(100):
            await trio.lowlevel.checkpoint()
            assert not agents.made[0]._closed
        await ready(messages)
        assert agents.made[0]._closed


# --- dormant spares (AGENT_REUSE_MAX) -------------------------------------------------


async def test_a_dormant_worker_holds_no_process_until_told_to_warm(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        send, messages = trio.open_memory_channel(0)
        nursery.start_soon(
            partial(
                serve_worker, "w", REUSE, send, agents, Path("/homes"), StopSignal(), dormant=True
            )
        )
        dormant = await messages.receive()
        assert isinstance(dormant, WorkerDormant)
        await trio.sleep(100)
        assert agents.made == []
        dormant.inbox.send_nowait(Warm())
        inbox = await ready(messages)
        job, reply = user_job("alice", "j1")
        inbox.send_nowait(job)
        assert isinstance(await finish(job, reply, messages), RunResult)


async def test_a_retired_kept_agent_is_closed_and_its_worker_goes_dormant(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages, offer = await kept_for_alice(nursery, agents)
        offer.inbox.send_nowait(Retire())
        assert isinstance(await messages.receive(), WorkerDormant)
        await trio.sleep(1)
        assert agents.made[0].events[-1] == "closed" and len(agents.made) == 1
