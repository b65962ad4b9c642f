"""New credentials reach running agents: idle ones are replaced at once, busy ones after
their turn. A worker and a session actor with fake agents, on trio's autojump clock."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.worker import serve_worker
from claude_code_api.auth.renewal import CredentialsVersion
from claude_code_api.messages import (
    JobFailed,
    JobStarted,
    RunResult,
    SessionIdle,
    Warm,
    WorkerDormant,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from tests.collab.test_session_actor import KEY, FakeRegistry, start_session, warm_agents
from tests.collab.test_turn import make_job
from tests.collab.test_worker import CONFIG, ready
from tests.support.fake_agent import FakeAgents, Finish, Say, Wait

LIMIT = 1000


async def test_the_version_wakes_its_waiters(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        version = CredentialsVersion()
        woke: list[float] = []

        async def wait() -> None:
            await version.wait_newer_than(0)
            woke.append(trio.current_time())

        nursery.start_soon(wait)
        await trio.sleep(5)
        assert woke == []
        version.bump()
        await trio.testing.wait_all_tasks_blocked()
        assert woke == [5.0] and version.newer_than(0) and not version.newer_than(1)
        with trio.fail_after(0):
            await version.wait_newer_than(0)  # already newer: no wait


async def start_worker(nursery, agents, version):
    send, receive = trio.open_memory_channel(0)
    nursery.start_soon(
        partial(
            serve_worker,
            "w",
            CONFIG,
            send,
            agents,
            Path("/homes"),
            StopSignal(),
            credentials=version,
        )
    )
    return receive


async def test_an_idle_worker_replaces_its_agent_when_the_credentials_change(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents, version = FakeAgents(), CredentialsVersion()
        messages = await start_worker(nursery, agents, version)
        await ready(messages)
        await trio.sleep(10)
        version.bump()
        inbox = await ready(messages)  # without any job
        first, second = agents.made
        assert first.events == ["start", "closed"]
        assert second.events == ["start"]
        job, reply = make_job()
        inbox.send_nowait(job)
        events = [event async for event in reply]
        assert events[0] == JobStarted("w") and isinstance(events[-1], RunResult)
        assert second.events[-1] == "turn hello"


async def test_a_busy_worker_finishes_its_turn_on_the_old_credentials(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("working"), Wait(5), Finish("done")])
        version = CredentialsVersion()
        messages = await start_worker(nursery, agents, version)
        inbox = await ready(messages)
        job, reply = make_job()
        inbox.send_nowait(job)
        assert await reply.receive() == JobStarted("w")
        version.bump()  # mid-turn
        events = [event async for event in reply]
        assert isinstance(events[-1], RunResult) and events[-1].output == "done"
        assert await messages.receive() == WorkerFinished("w", job.id, True)
        await ready(messages)
        first, second = agents.made
        assert first.events == ["start", "turn hello", "closed"]  # not interrupted
        assert second.events == ["start"]


async def test_credentials_that_change_during_the_warm_up_make_it_stale(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents, version = FakeAgents(start_s=2.0), CredentialsVersion()
        messages = await start_worker(nursery, agents, version)
        assert await messages.receive() == WorkerStarting("w")
        await trio.sleep(1)  # warming
        version.bump()
        assert isinstance(await messages.receive(), WorkerReady)
        await ready(messages)  # offered once, then replaced: the second agent is current
        assert [agent.events for agent in agents.made] == [["start", "closed"], ["start"]]


@pytest.fixture
def version():
    return CredentialsVersion()


async def test_an_idle_session_replaces_its_agent_resuming_without_a_new_idle_report(
    autojump_clock, nursery, version
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        session = await start_session(nursery, agents, FakeRegistry(), credentials=version)
        await session.idle()
        await session.turn("one")
        assert (await session.idle()).finished_ok is True
        version.bump()
        await trio.sleep(10)
        first, second = agents.made
        assert first.events == ["start", "turn one", "closed"]
        assert second.spec.resume == first.spec.session_id  # the same conversation
        # The dispatcher already counts it idle: no second SessionIdle.
        with pytest.raises(trio.WouldBlock):
            session.messages.receive_nowait()
        _, events = await session.turn("two")
        assert isinstance(events[-1], RunResult) and events[-1].output == "echo: two"
        assert second.events == ["start", "turn two"]


async def test_a_busy_session_finishes_its_turn_then_replaces_its_agent(
    autojump_clock, nursery, version
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Wait(5), Finish(f"re: {p}")])
        session = await start_session(nursery, agents, FakeRegistry(), credentials=version)
        await session.idle()

        async def bump_mid_turn() -> None:
            await trio.sleep(2)
            version.bump()

        nursery.start_soon(bump_mid_turn)
        _, events = await session.turn("one")
        assert isinstance(events[-1], RunResult) and events[-1].output == "re: one"
        idle = await session.idle()  # reported once the new agent is warm
        assert idle == SessionIdle(KEY, True, None)
        first, second = agents.made
        assert first.events == ["start", "turn one", "closed"]
        assert second.events == ["start"]


async def test_a_turn_arriving_as_the_credentials_change_runs_on_the_new_agent(
    autojump_clock, nursery, version
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        session = await start_session(nursery, agents, FakeRegistry(), credentials=version)
        await session.idle()
        version.bump()
        _, events = await session.turn("now")  # handed over in the same instant
        assert isinstance(events[-1], RunResult) and events[-1].output == "echo: now"
        first, second = agents.made
        assert first.events == ["start", "closed"]
        assert second.events == ["start", "turn now"]


async def test_a_held_turn_its_record_not_saved_still_ends_in_an_idle_report(
    autojump_clock, nursery, version
):
    with trio.fail_after(LIMIT):
        registry = FakeRegistry()
        session = await start_session(nursery, FakeAgents(), registry, credentials=version)
        await session.idle()
        registry.failing = "disk full"
        version.bump()
        _, events = await session.turn("now")  # held while the agent is replaced
        assert events[-1] == JobFailed(503, "session store unavailable: disk full")
        # The dispatcher counts the session busy with that turn until it hears otherwise.
        assert await session.idle() == SessionIdle(KEY, None, None)


async def test_an_idle_exit_does_not_report_the_last_turn_twice(autojump_clock, nursery, version):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        session = await start_session(nursery, agents, FakeRegistry(), credentials=version)
        await session.idle()
        await session.turn("one")
        assert (await session.idle()).finished_ok is True
        agents.made[0].exit_now()
        await warm_agents(agents, 2)
        # Replaced without a word: the dispatcher counted the turn once and counts the
        # session idle already.
        with pytest.raises(trio.WouldBlock):
            session.messages.receive_nowait()


async def test_an_agent_kept_for_its_user_is_replaced_when_the_credentials_change(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents, version = FakeAgents(), CredentialsVersion()
        send, messages = trio.open_memory_channel(0)
        config = attrs.evolve(CONFIG, reuse_s=60.0)
        worker = partial(
            serve_worker,
            "w",
            config,
            send,
            agents,
            Path("/homes"),
            StopSignal(),
            credentials=version,
        )
        nursery.start_soon(worker)
        inbox = await ready(messages)
        job, reply = make_job()
        inbox.send_nowait(job)
        [event async for event in reply]
        assert (await messages.receive()).job_id == job.id
        assert (await messages.receive()).bound_to == job.user_id  # kept
        await trio.sleep(10)
        version.bump()
        # Retired long before the 60 s are up: the worker goes dormant (the dispatcher
        # wakes it when the pool is short), then warms a fresh agent.
        dormant = await messages.receive()
        assert isinstance(dormant, WorkerDormant)
        assert trio.current_time() < 20
        dormant.inbox.send_nowait(Warm())
        await ready(messages)
        first, second = agents.made
        assert first.events == ["start", "turn hello", "reset", "closed"]
        assert second.events == ["start"]
