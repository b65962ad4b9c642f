"""Runs: the dispatcher's acknowledgement, runs view and cancellation by id; per-request
options on workers and sessions. Actors with fakes, on trio's autojump clock.
"""

from __future__ import annotations

import itertools
import random
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from claude_code_api.actors.dispatcher import Dispatcher, PoolView
from claude_code_api.actors.fair_line import FairLine
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.actors.session import serve_session
from claude_code_api.actors.stopping import StopSignal
from claude_code_api.http.jobs import cancel_run, pool_snapshot
from claude_code_api.messages import (
    DEFAULT_OPTIONS,
    Job,
    JobFailed,
    JobStarted,
    Queued,
    RunOptions,
    RunResult,
    RunState,
    SessionKey,
    StartSession,
    Submit,
    WorkerFinished,
    WorkerReady,
)
from tests.collab.test_session_actor import CONFIG as SESSION_CONFIG
from tests.collab.test_session_actor import KEY, FakeRegistry, Harness, session_job
from tests.collab.test_worker import ready, start_worker
from tests.support.fake_agent import FakeAgents, Finish, Say, Wait

LIMIT = 1000
OWN_PROCESS = RunOptions(system_prompt="Be brief.", max_turns=2)


def make_job(
    job_id: str,
    user_id: str = "alice",
    *,
    session_id: str | None = None,
    options: RunOptions = DEFAULT_OPTIONS,
    timeout_s: float = 600.0,
) -> tuple[Job, trio.MemoryReceiveChannel]:
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=job_id,
        user_id=user_id,
        prompt=f"prompt of {job_id}",
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
        session_id=session_id,
        options=options,
    )
    return job, reply_receive


async def start_dispatcher(nursery: trio.Nursery, **kwargs) -> trio.MemorySendChannel:
    inbox_send, inbox_receive = trio.open_memory_channel(0)
    kwargs.setdefault("pool_size", 1)
    kwargs.setdefault("queue_max", 20)
    await nursery.start(Dispatcher(inbox_receive, **kwargs).serve)
    return inbox_send


async def take_one(inbox: trio.MemorySendChannel, worker_id: str = "w0") -> Job:
    """Play a warm worker: offer, and return the job it is handed."""
    job_send, job_receive = trio.open_memory_channel(1)
    await inbox.send(WorkerReady(worker_id, job_send))
    return await job_receive.receive()


def drain(reply: trio.MemoryReceiveChannel) -> list:
    events = []
    while True:
        try:
            events.append(reply.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return events


# --- the acknowledgement ----------------------------------------------------------------


def test_ahead_of_counts_what_pop_next_returns_first():
    rng = random.Random(9)
    for _ in range(300):
        line: FairLine[str, str] = FairLine()
        numbers = itertools.count()
        for _ in range(rng.randrange(1, 30)):
            if len(line) and rng.random() < 0.2:
                line.pop_next()
            elif len(line) and rng.random() < 0.1:
                line.push_front(*_front_item(line))
            else:
                owner = rng.choice("abcd")
                key = f"{owner}{next(numbers)}"
                line.push(owner, key, key)
        predicted = {key: line.ahead_of(key) for key in list(line.values())}
        served = []
        while len(line):
            served.append(line.pop_next())
        assert predicted == {key: served.index(key) for key in served}


def _front_item(line: FairLine[str, str]) -> tuple[str, str, str]:
    """Take the next item and give it back as a job that could not be handed over."""
    key = line.pop_next()
    assert key is not None
    return key[0], key, key


async def test_the_dispatcher_acknowledges_each_taken_job_with_its_place_in_line(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        # Five workers: at most POOL_SIZE one-shots run at once (the order is what is tested).
        inbox = await start_dispatcher(nursery, pool_size=5)
        replies = {}
        for job_id, user in [("a0", "alice"), ("a1", "alice"), ("a2", "alice"), ("b0", "bob")]:
            job, replies[job_id] = make_job(job_id, user)
            await inbox.send(Submit(job))
        carol, carol_reply = make_job("c0", "carol")
        await inbox.send(Submit(carol))
        await wait_all_tasks_blocked()
        # Its place when it was queued: users take turns (a0, b0, c0, a1, a2), so bob's
        # job goes before alice's second, and carol's before it too (it said 1).
        assert [drain(replies[j]) for j in ("a0", "a1", "a2", "b0")] == [
            [Queued(0)],
            [Queued(1)],
            [Queued(2)],
            [Queued(1)],
        ]
        assert drain(carol_reply) == [Queued(2)]
        served = [(await take_one(inbox, f"w{n}")).id for n in range(5)]
        assert served == ["a0", "b0", "c0", "a1", "a2"]


async def test_a_refused_job_gets_its_refusal_and_no_acknowledgement(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, queue_max=0)
        job, reply = make_job("j")
        await inbox.send(Submit(job))
        [refusal] = [event async for event in reply]
        assert isinstance(refusal, JobFailed) and refusal.status == 429


# --- the runs view and cancellation -----------------------------------------------------------


async def test_status_lists_the_callers_queued_and_running_runs_only(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        running, _ = make_job("running")
        await inbox.send(Submit(running))
        await trio.sleep(2)
        assert await take_one(inbox) is running
        queued, _ = make_job("queued")
        await inbox.send(Submit(queued))
        await inbox.send(Submit(make_job("bobs", "bob")[0]))
        runs = (await pool_snapshot(inbox, "alice")).runs
        assert [(r.run_id, r.state) for r in runs] == [
            ("running", RunState.RUNNING),
            ("queued", RunState.QUEUED),
        ]
        assert runs[0].started_at is not None and runs[1].started_at is None
        assert runs[1].queued_at - runs[0].queued_at == pytest.approx(2, abs=0.01)
        assert (await pool_snapshot(inbox)).runs == ()  # /health asks for no one's
        await inbox.send(WorkerFinished("w0", "running", ok=True))
        assert [r.run_id for r in (await pool_snapshot(inbox, "alice")).runs] == ["queued"]


async def test_cancelling_a_queued_run_answers_it_at_once_and_only_for_its_owner(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        job, reply = make_job("j")
        await inbox.send(Submit(job))
        await trio.sleep(3)
        assert await cancel_run(inbox, "bob", "j") is False
        assert await cancel_run(inbox, "alice", "nope") is False
        assert (await pool_snapshot(inbox)).queue_length == 1
        assert await cancel_run(inbox, "alice", "j") is True
        assert [event async for event in reply] == [
            Queued(0),
            RunResult(success=False, output="", duration_ms=3000, cancelled=True),
        ]
        assert (await pool_snapshot(inbox)).queue_length == 0
        assert await cancel_run(inbox, "alice", "j") is False  # over


async def test_cancelling_a_running_run_sets_its_cancellation(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        job, _ = make_job("j")
        await inbox.send(Submit(job))
        assert await take_one(inbox) is job
        assert await cancel_run(inbox, "bob", "j") is False
        assert not job.cancellation.requested
        assert await cancel_run(inbox, "alice", "j") is True
        assert job.cancellation.reason == "cancelled"
        await inbox.send(WorkerFinished("w0", "j", ok=False))
        assert await cancel_run(inbox, "alice", "j") is False


async def test_a_session_turn_is_queued_running_and_cancellable_like_any_run(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        starts_send, starts = trio.open_memory_channel(8)
        registry_send, _ = trio.open_memory_channel(8)
        inbox = await start_dispatcher(nursery, session_starter=starts_send, registry=registry_send)
        first, _ = make_job("t1", session_id="s", options=RunOptions(model="m"))
        second, second_reply = make_job("t2", session_id="s")
        await inbox.send(Submit(first))
        await inbox.send(Submit(second))
        # The session starts with its first turn's options.
        assert starts.receive_nowait() == StartSession(
            SessionKey("alice", "s"), RunOptions(model="m")
        )
        runs = (await pool_snapshot(inbox, "alice")).runs
        assert [(r.run_id, r.state, r.session_id) for r in runs] == [
            ("t1", RunState.QUEUED, "s"),
            ("t2", RunState.QUEUED, "s"),
        ]
        assert await cancel_run(inbox, "alice", "t2") is True
        assert [type(e) for e in drain(second_reply)] == [Queued, RunResult]


# --- options on a worker -----------------------------------------------------------------


async def test_model_and_permission_mode_are_set_on_the_warm_agent(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_worker(nursery, agents)
        job_inbox = await ready(messages)
        job, reply = make_job("j", options=RunOptions(model="m", permission_mode="plan"))
        job_inbox.send_nowait(job)
        events = [event async for event in reply]
        assert events[-1].model == "m"
        assert agents.made[0].events[:4] == [
            "start",
            "set_model m",
            "set_permission_mode plan",
            "turn prompt of j",
        ]


async def test_options_that_are_process_arguments_get_a_process_and_the_warm_one_waits(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_worker(nursery, agents)
        job_inbox = await ready(messages)
        job, reply = make_job("own", options=OWN_PROCESS)
        job_inbox.send_nowait(job)
        events = [event async for event in reply]
        assert isinstance(events[-1], RunResult) and events[-1].success
        warm, own = agents.made
        assert own.spec.options == OWN_PROCESS
        assert own.events == ["start", "turn prompt of own"]
        assert warm.spec.options == RunOptions() and warm.events == ["start"]
        assert isinstance(await messages.receive(), WorkerFinished)
        # The warm agent is offered again, untouched, and runs the next job.
        offer = await messages.receive()
        assert isinstance(offer, WorkerReady)
        plain, plain_reply = make_job("plain")
        offer.inbox.send_nowait(plain)
        [event async for event in plain_reply]
        assert warm.events[:2] == ["start", "turn prompt of plain"]
        await trio.sleep(1)
        assert own.events[-1] == "closed"  # retired in the background
        assert len(agents.made) == 2


async def test_a_run_cancelled_while_its_own_agent_starts_ends_at_once(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_worker(nursery, agents)
        job_inbox = await ready(messages)
        agents.start_s = 10.0
        job, reply = make_job("own", options=OWN_PROCESS)
        job_inbox.send_nowait(job)
        await trio.sleep(1)
        job.cancellation.cancel("cancelled")
        events = [event async for event in reply]
        # Submitted and taken at 1 s (after the warm agent's start), cancelled a second later.
        assert events == [RunResult(success=False, output="", duration_ms=1000, cancelled=True)]
        assert trio.current_time() == 2
        await wait_all_tasks_blocked()
        assert agents.made[1].events == ["start", "closed (already exited)"]


async def test_an_own_agent_that_cannot_start_fails_its_run_not_the_worker(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        messages = await start_worker(nursery, agents)
        job_inbox = await ready(messages)
        agents.start_failure = "bad flag"
        job, reply = make_job("own", options=OWN_PROCESS)
        job_inbox.send_nowait(job)
        assert [event async for event in reply] == [
            JobFailed(502, "agent failed to start: bad flag")
        ]
        agents.start_failure = None
        finished = await messages.receive()
        assert isinstance(finished, WorkerFinished) and not finished.ok
        assert isinstance(await messages.receive(), WorkerReady)  # the warm one, again


async def test_started_says_when_the_worker_took_the_job_not_when_its_agent_began(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Wait(1), Finish("ok")])
        messages = await start_worker(nursery, agents)
        job, reply = make_job("j", options=OWN_PROCESS)
        await trio.sleep(5)  # it waited 5 s, then 1 s more for the worker's warm-up
        job_inbox = await ready(messages)
        job_inbox.send_nowait(job)
        started = [e async for e in reply][0]
        # Its own agent took another second to start: that is not time in the queue.
        assert started == JobStarted("w+own") and started.at - job.submitted_at == 6
        assert trio.current_time() == 8


# --- options on a session ------------------------------------------------------------------


async def start_session_with(
    nursery: trio.Nursery, agents: FakeAgents, registry: FakeRegistry, options: RunOptions
) -> Harness:
    registry_send, registry_receive = trio.open_memory_channel(16)
    nursery.start_soon(registry.serve, registry_receive)
    send, receive = trio.open_memory_channel(0)
    harness = Harness(receive, agents, registry, StopSignal(), [])
    nursery.start_soon(
        partial(
            serve_session,
            KEY,
            SESSION_CONFIG,
            send,
            RegistryClient(registry_send),
            agents,
            Path("/home/alice"),
            harness.stop,
            options=options,
        )
    )
    return harness


def with_options(job_and_reply, options: RunOptions):
    job, reply = job_and_reply
    return attrs.evolve(job, options=options), reply


async def test_a_session_keeps_its_first_turns_options_and_remembers_a_new_model(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("hi"), Finish("ok")])
        registry = FakeRegistry()
        first = RunOptions(system_prompt="Be terse.", model="m1")
        session = await start_session_with(nursery, agents, registry, first)
        await session.idle()
        assert agents.made[0].spec.options == first
        assert registry.records[KEY].options == first

        async def turn(options: RunOptions) -> list:
            job, reply = with_options(session_job(f"t{trio.current_time()}", 60), options)
            session.inbox.send_nowait(job)
            events = [event async for event in reply]
            await session.idle()
            return events

        await turn(RunOptions(system_prompt="Be verbose."))  # ignored: not the first turn
        assert registry.records[KEY].options == first
        events = await turn(RunOptions(model="m2"))
        assert events[-1].model == "m2"
        assert "set_model m2" in agents.made[0].events and len(agents.made) == 1
        assert registry.records[KEY].options == RunOptions(system_prompt="Be terse.", model="m2")


async def test_a_resumed_session_starts_with_its_records_options(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        registry = FakeRegistry()
        kept = RunOptions(system_prompt="Be terse.")
        session = await start_session_with(nursery, agents, registry, kept)
        await session.idle()
        await session.turn("one")
        await session.idle()
        session.stop.request_stop()
        await wait_all_tasks_blocked()
        again = await start_session_with(nursery, agents, registry, RunOptions(max_turns=1))
        await again.idle()
        assert agents.made[-1].spec.options == kept
        assert agents.made[-1].spec.resume is not None


async def test_the_view_publishes_every_users_runs_and_each_change(autojump_clock, nursery):
    """What the runs across replicas record (actors/replica_runs.py): every user's runs,
    read without a message, and a wake-up at each of the dispatcher's turns."""
    with trio.fail_after(LIMIT):
        view = PoolView()
        assert view.runs() == ()  # no dispatcher yet
        inbox = await start_dispatcher(nursery, view=view)
        await view.wait_changed()  # its first turn
        alices, _ = make_job("alices")
        await inbox.send(Submit(alices))
        await view.wait_changed()
        assert [(r.run_id, r.user_id, r.state) for r in view.runs()] == [
            ("alices", "alice", RunState.QUEUED)
        ]
        await trio.sleep(1)
        await inbox.send(Submit(make_job("bobs", "bob")[0]))
        await view.wait_changed()
        assert await take_one(inbox) is alices
        await view.wait_changed()
        assert [(r.run_id, r.user_id, r.state) for r in view.runs()] == [
            ("alices", "alice", RunState.RUNNING),
            ("bobs", "bob", RunState.QUEUED),
        ]
        nursery.cancel_scope.cancel()
    await wait_all_tasks_blocked()
    assert view.runs() == ()  # the dispatcher is gone: none published
