"""``MAX_RUNNING_PER_USER``: one user's running work, one-shot jobs and session turns
counted together, on trio's autojump clock (issue 20 §4).

Fairness in the queue is not enough: a user whose long turns already hold every
worker and live-session slot keeps everyone else waiting. Here the dispatcher is
given a bound per user; the test plays the pool's workers (:class:`FakeWorkers`)
and the session supervisor and actors (the fakes of ``test_session_scheduling.py``),
all writing to one event log, so times are asserted exactly.
"""

from __future__ import annotations

import attrs
import trio
from trio.testing import wait_all_tasks_blocked

from claude_code_api.actors.dispatcher import USER_QUEUE_FULL_ERROR, Dispatcher, SessionLimits
from claude_code_api.config.settings import load_settings
from claude_code_api.messages import (
    Job,
    JobFailed,
    RunResult,
    Submit,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from tests.collab.test_session_scheduling import (
    FakeRegistry,
    FakeSessions,
    answer,
    no_answer_yet,
    outcome,
    session_states,
)

LIMIT = 10_000


@attrs.define(eq=False)
class FakeWorkers:
    """The pool's workers, played: each offers itself, runs a job for ``seconds[prompt]``
    (default ``job_s``), answers it and offers itself again. Logs ``oneshot`` (start)
    and ``oneshot done`` into the sessions' event log."""

    dispatcher: trio.MemorySendChannel
    log: FakeSessions
    job_s: float = 0.0
    seconds: dict[str, float] = attrs.Factory(dict)

    async def serve(self, worker_id: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            job_send, job_receive = trio.open_memory_channel(1)
            await self.dispatcher.send(WorkerReady(worker_id, job_send))
            job = await job_receive.receive()
            self.log.record("oneshot", job.prompt)
            began = trio.current_time()
            await trio.sleep(self.seconds.get(job.prompt, self.job_s))
            self.log.record("oneshot done", job.prompt)
            took_ms = round((trio.current_time() - began) * 1000)
            job.answer(RunResult(True, f"answer to {job.prompt}", took_ms))
            await self.dispatcher.send(WorkerFinished(worker_id, job.id, ok=True))
            await self.dispatcher.send(WorkerStarting(worker_id))


@attrs.frozen
class Service:
    inbox: trio.MemorySendChannel
    sessions: FakeSessions
    workers: FakeWorkers


async def start_service(
    nursery: trio.Nursery,
    *,
    max_running_per_user: int | None,
    pool_size: int = 1,
    max_live: int = 2,
    turn_s: float = 20.0,
    job_s: float = 20.0,
    queue_max_per_user: int | None = None,
) -> Service:
    inbox_send, inbox_receive = trio.open_memory_channel(0)
    starts_send, starts_receive = trio.open_memory_channel(max_live)
    registry_send, registry_receive = trio.open_memory_channel(8)
    sessions = FakeSessions(inbox_send.clone(), turn_s=turn_s)
    workers = FakeWorkers(inbox_send.clone(), sessions, job_s)
    dispatcher = Dispatcher(
        inbox_receive,
        pool_size=pool_size,
        queue_max=20,
        queue_max_per_user=queue_max_per_user,
        session_starter=starts_send,
        registry=registry_send,
        session_limits=SessionLimits(max_live=max_live, per_session_max=10, idle_s=3600.0),
        max_running_per_user=max_running_per_user,
    )
    await nursery.start(sessions.serve, starts_receive)
    await nursery.start(FakeRegistry(sessions).serve, registry_receive)
    await nursery.start(dispatcher.serve)
    for n in range(pool_size):
        await nursery.start(workers.serve, f"w{n}")
    await wait_all_tasks_blocked()
    return Service(inbox_send, sessions, workers)


async def submit(
    inbox, user_id: str, prompt: str, session_id: str | None = None, *, timeout_s: float = 3600
):
    """Submit a job of ``user_id`` (its id is its prompt); a session turn with ``session_id``."""
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=prompt,
        user_id=user_id,
        prompt=prompt,
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
        session_id=session_id,
    )
    await inbox.send(Submit(job))
    return reply_receive


def test_the_default_leaves_one_slot_that_one_user_alone_cannot_take():
    def bound(**env: str) -> int:
        return load_settings(env).running_per_user_max

    assert bound() == 7  # POOL_SIZE=1, MAX_LIVE_SESSIONS=8
    assert bound(POOL_SIZE="4", MAX_LIVE_SESSIONS="2") == 3
    assert bound(POOL_SIZE="1", MAX_LIVE_SESSIONS="1") == 1
    assert bound(POOL_SIZE="1", MAX_LIVE_SESSIONS="2") == 1
    assert bound(MAX_RUNNING_PER_USER="5") == 5


async def test_two_long_session_turns_of_one_user_do_not_keep_anothers_first_turn_waiting(
    autojump_clock, nursery
):
    """The issue's case: MAX_LIVE_SESSIONS=2 (so the bound is 1); alice's two 20 s session
    turns, then bob's first: bob's starts at once, alice's second after her first."""
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_running_per_user=1, max_live=2)
        fakes = service.sessions
        a1 = await submit(service.inbox, "alice", "a1", "s1")
        a2 = await submit(service.inbox, "alice", "a2", "s2")
        await trio.sleep(1)
        b1 = await submit(service.inbox, "bob", "b1", "t1")
        assert await session_states(service.inbox) == {"s1": "busy", "s2": "waiting", "t1": "busy"}
        assert await outcome(b1) == answer("b1", 20_000)
        assert fakes.times("turn", "b1") == [1]
        assert await outcome(a1) == answer("a1", 20_000)
        assert await outcome(a2) == answer("a2", 20_000)
        assert fakes.times("turn", "a2") == [20]
        assert fakes.times("start", "s2") == [20]


async def test_without_the_bound_the_same_turns_keep_the_other_user_waiting(
    autojump_clock, nursery
):
    """What the issue saw: the bound is what lets bob in."""
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_running_per_user=None, max_live=2)
        await submit(service.inbox, "alice", "a1", "s1")
        await submit(service.inbox, "alice", "a2", "s2")
        await trio.sleep(1)
        b1 = await submit(service.inbox, "bob", "b1", "t1")
        await outcome(b1)
        assert service.sessions.times("turn", "b1") == [20]


async def test_one_shot_jobs_and_session_turns_of_a_user_count_together(autojump_clock, nursery):
    """Bound 1, two workers, two live slots: alice's one-shot runs, so her session turn
    waits (a worker and a slot free) while bob's session turn and carol's one-shot run at
    once; then her running session turn keeps her next one-shot waiting."""
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_running_per_user=1, pool_size=2, max_live=2)
        fakes = service.sessions
        one_shot = await submit(service.inbox, "alice", "a-oneshot")
        turn = await submit(service.inbox, "alice", "a-turn", "s1")
        await trio.sleep(1)
        bob_turn = await submit(service.inbox, "bob", "b-turn", "t1")
        carol = await submit(service.inbox, "carol", "c-oneshot")
        assert await no_answer_yet(turn)
        assert await session_states(service.inbox) == {"s1": "waiting", "t1": "busy"}
        assert fakes.times("oneshot", "c-oneshot") == [1]
        assert fakes.times("turn", "b-turn") == [1]
        assert (await outcome(one_shot)).success
        assert await fakes.wait_for("turn", "a-turn") == 20
        # Now her session turn runs (20-40 s): her next one-shot waits with a worker idle.
        await trio.sleep(1)
        later = await submit(service.inbox, "alice", "a-later")
        assert (await outcome(turn)).success
        assert (await outcome(later)).success
        assert fakes.times("oneshot", "a-later") == [40]
        assert (await outcome(bob_turn)).success and (await outcome(carol)).success


async def test_one_shots_beyond_the_bound_wait_in_the_users_line_under_its_limit_and_deadline(
    autojump_clock, nursery
):
    """Three workers, bound 2: alice's third job waits with a worker idle (bob's takes it),
    her line is bounded by QUEUE_MAX_PER_USER (429), and a job waiting there times out."""
    with trio.fail_after(LIMIT):
        service = await start_service(
            nursery, max_running_per_user=2, pool_size=3, queue_max_per_user=2
        )
        fakes = service.sessions
        running = [await submit(service.inbox, "alice", f"a{n}") for n in range(2)]
        waiting = await submit(service.inbox, "alice", "a2")
        short = await submit(service.inbox, "alice", "a3", timeout_s=5)
        refused = await submit(service.inbox, "alice", "a4")
        assert await outcome(refused) == JobFailed(429, USER_QUEUE_FULL_ERROR, retry_after_s=1)
        await trio.sleep(1)
        assert fakes.details("oneshot") == ["a0", "a1"]  # a worker is idle, a2 waits
        bob = await submit(service.inbox, "bob", "b0")
        await wait_all_tasks_blocked()
        assert fakes.times("oneshot", "b0") == [1]
        timed_out = await outcome(short)
        assert isinstance(timed_out, RunResult) and timed_out.timed_out
        assert trio.current_time() == 5
        for reply in (*running, waiting, bob):
            assert (await outcome(reply)).success
        assert fakes.times("oneshot", "a2") == [20]
        assert "a3" not in fakes.details("oneshot")


async def test_a_live_session_held_back_by_its_users_bound_yields_its_slot(autojump_clock, nursery):
    """One live slot, bound 1: alice's live session has a turn queued but cannot run it
    while her one-shot runs; bob's new session gets its slot at once instead of waiting
    for her one-shot to end. Her turn runs afterwards, resuming her session."""
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_running_per_user=1, max_live=1)
        fakes = service.sessions
        first = await submit(service.inbox, "alice", "a-first", "s1")
        assert (await outcome(first)).success  # s1 is live and idle at 20 s
        one_shot = await submit(service.inbox, "alice", "a-oneshot")
        held_back = await submit(service.inbox, "alice", "a-second", "s1")
        await trio.sleep(1)
        assert await session_states(service.inbox) == {"s1": "live"}
        bob = await submit(service.inbox, "bob", "b-first", "t1")
        assert await outcome(bob) == answer("b-first", 20_000)
        assert fakes.times("hibernate", "s1") == [21]
        assert fakes.times("turn", "b-first") == [21]
        assert (await outcome(one_shot)).success
        assert (await outcome(held_back)).success
        assert fakes.times("turn", "a-second") == [41]
        assert fakes.times("start", "s1") == [0, 41]


async def test_a_session_its_users_bound_holds_back_pushes_no_other_session_out(
    autojump_clock, nursery
):
    """Bound 1, two live slots: bob's idle session keeps its slot while alice's second
    session waits for her first turn to end (taking the slot would not let it run)."""
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_running_per_user=1, max_live=2)
        fakes = service.sessions
        assert (await outcome(await submit(service.inbox, "bob", "b1", "t1"))).success
        a1 = await submit(service.inbox, "alice", "a1", "s1")
        a2 = await submit(service.inbox, "alice", "a2", "s2")
        await trio.sleep(5)
        assert await session_states(service.inbox) == {"t1": "live", "s1": "busy", "s2": "waiting"}
        b2 = await submit(service.inbox, "bob", "b2", "t1")
        assert await outcome(b2) == answer("b2", 20_000)
        assert fakes.times("start", "t1") == [0]  # never hibernated, never restarted
        assert fakes.times("turn", "b2") == [25]
        # Her first turn ends at 40: her idle first session gives its slot to her second.
        assert (await outcome(a1)).success and (await outcome(a2)).success
        assert fakes.times("turn", "a2") == [40]
        assert fakes.times("hibernate", "s1") == [40]


async def test_a_users_live_session_runs_its_queued_turn_before_a_new_one_gets_a_slot(
    autojump_clock, nursery
):
    """Bound 1: alice's turn for her live session and a first turn for a new session both
    wait for her one-shot. When it ends, the live session's turn (the older, and needing no
    process start) runs first; the new session gets its slot after."""
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_running_per_user=1, max_live=3)
        fakes = service.sessions
        assert (await outcome(await submit(service.inbox, "alice", "a-first", "s1"))).success
        one_shot = await submit(service.inbox, "alice", "a-oneshot")
        older = await submit(service.inbox, "alice", "a-second", "s1")
        newer = await submit(service.inbox, "alice", "n-first", "s2")
        assert await session_states(service.inbox) == {"s1": "live", "s2": "waiting"}
        assert (await outcome(one_shot)).success
        assert (await outcome(older)).success and (await outcome(newer)).success
        assert fakes.times("turn", "a-second") == [40]
        assert fakes.times("start", "s2") == [60]
