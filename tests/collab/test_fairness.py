"""Fairness between users and sessions, on trio's autojump clock.

One-shot jobs: the dispatcher's queue is round-robin between users' lines, FIFO
within one, and ``queue_max_per_user`` bounds one user's line (429) while other
users are still served. The test plays workers as in ``test_dispatcher.py``.

Sessions: a session waiting for a live slot gets one at the next turn boundary
of a live session, even when every live session has more turns queued; slots
go round-robin between users; a user's CLAUDE.md update restarts their live
sessions at their next turn boundary. The test plays the session supervisor and
actors with the fakes of ``test_session_scheduling.py``.
"""

from __future__ import annotations

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from claude_code_api.actors.dispatcher import (
    QUEUE_FULL_ERROR,
    RETRY_AFTER_S,
    USER_QUEUE_FULL_ERROR,
    Dispatcher,
    SessionLimits,
)
from claude_code_api.messages import (
    Job,
    JobFailed,
    Queued,
    Submit,
    UserMemoryChanged,
    Withdraw,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)
from tests.collab.test_session_scheduling import (
    FakeRegistry,
    FakeSessions,
    Service,
    answer,
    no_answer_yet,
    outcome,
    session_states,
)

LIMIT = 10_000


# --- one-shot jobs --------------------------------------------------------------------


async def start_dispatcher(
    nursery: trio.Nursery, *, queue_max: int = 200, queue_max_per_user: int | None = None
) -> trio.MemorySendChannel:
    inbox_send, inbox_receive = trio.open_memory_channel(0)
    dispatcher = Dispatcher(
        inbox_receive, pool_size=1, queue_max=queue_max, queue_max_per_user=queue_max_per_user
    )
    await nursery.start(dispatcher.serve)
    return inbox_send


def make_job(job_id: str, user_id: str, *, timeout_s: float = 600.0):
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=job_id,
        user_id=user_id,
        prompt=f"prompt of {job_id}",
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
    )
    return job, reply_receive


async def submit(inbox, job_id: str, user_id: str, **kwargs):
    job, reply = make_job(job_id, user_id, **kwargs)
    await inbox.send(Submit(job))
    return reply


async def serve_one(inbox, worker_id: str = "w0") -> str:
    """Play one worker cycle: offer, take a job, finish it. Returns the job's id."""
    job_send, job_receive = trio.open_memory_channel(1)
    await inbox.send(WorkerReady(worker_id, job_send))
    job = await job_receive.receive()
    job.answer(answer(job.prompt))
    await inbox.send(WorkerFinished(worker_id, job.id, ok=True))
    await inbox.send(WorkerStarting(worker_id))
    return job.id


async def refusal(reply) -> JobFailed | None:
    """The JobFailed the dispatcher answered at once, or None if the job is waiting."""
    await wait_all_tasks_blocked()
    try:
        event = reply.receive_nowait()
    except trio.WouldBlock:
        return None
    if isinstance(event, Queued):  # taken: it waits
        return None
    assert isinstance(event, JobFailed), event
    return event


async def test_a_users_hundred_queued_jobs_do_not_delay_another_users_single_job(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        for i in range(100):
            await submit(inbox, f"alice-{i}", "alice")
        bob = await submit(inbox, "bob-0", "bob")
        assert await refusal(bob) is None
        served = [await serve_one(inbox) for _ in range(101)]
        # Bob waits for at most one of alice's jobs; hers keep their order.
        assert served[:3] == ["alice-0", "bob-0", "alice-1"]
        assert [job for job in served if job.startswith("alice")] == [
            f"alice-{i}" for i in range(100)
        ]


async def test_users_take_turns_one_job_each(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        for user, count in [("alice", 4), ("bob", 2), ("carol", 1)]:
            for i in range(count):
                await submit(inbox, f"{user}-{i}", user)
        served = [await serve_one(inbox) for _ in range(7)]
        assert served == [
            "alice-0", "bob-0", "carol-0", "alice-1", "bob-1", "alice-2", "alice-3"
        ]  # fmt: skip


async def test_past_queue_max_per_user_that_user_gets_429_while_others_are_served(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, queue_max=6, queue_max_per_user=3)
        alice = [await submit(inbox, f"alice-{i}", "alice") for i in range(4)]
        assert [await refusal(reply) for reply in alice[:3]] == [None, None, None]
        assert await refusal(alice[3]) == JobFailed(
            429, USER_QUEUE_FULL_ERROR, retry_after_s=RETRY_AFTER_S
        )
        # Others are still taken, up to the global bound...
        bob = [await submit(inbox, f"bob-{i}", "bob") for i in range(2)]
        carol = await submit(inbox, "carol-0", "carol")
        assert [await refusal(reply) for reply in [*bob, carol]] == [None, None, None]
        # ...which still holds for everyone.
        dave = await submit(inbox, "dave-0", "dave")
        assert await refusal(dave) == JobFailed(429, QUEUE_FULL_ERROR, retry_after_s=RETRY_AFTER_S)
        # Once one of alice's jobs has run, she may queue another.
        assert await serve_one(inbox) == "alice-0"
        assert await refusal(await submit(inbox, "alice-4", "alice")) is None
        served = [await serve_one(inbox) for _ in range(6)]
        assert served == ["bob-0", "carol-0", "alice-1", "bob-1", "alice-2", "alice-4"]
        assert trio.current_time() == 0


async def test_withdrawn_and_expired_jobs_leave_their_users_line(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, queue_max_per_user=2)
        await submit(inbox, "alice-0", "alice")
        await submit(inbox, "alice-1", "alice", timeout_s=5)
        bob = await submit(inbox, "bob-0", "bob")
        await inbox.send(Withdraw("bob-0"))
        assert await bob.receive() == Queued(1)  # one of alice's jobs goes first
        with pytest.raises(trio.EndOfChannel):
            await bob.receive()
        await trio.sleep(10)  # alice-1 times out in the queue
        assert await refusal(await submit(inbox, "alice-2", "alice")) is None
        assert [await serve_one(inbox) for _ in range(2)] == ["alice-0", "alice-2"]


# --- sessions --------------------------------------------------------------------------


async def start_sessions(
    nursery: trio.Nursery,
    *,
    max_live: int,
    queue_max: int = 20,
    queue_max_per_user: int | None = None,
    turn_s: float = 0.0,
    stop_s: float = 0.0,
    start_s: float = 0.0,
) -> Service:
    """As ``test_session_scheduling.start_service``, with the queue bounds to set."""
    inbox_send, inbox_receive = trio.open_memory_channel(0)
    starts_send, starts_receive = trio.open_memory_channel(max_live)
    registry_send, registry_receive = trio.open_memory_channel(8)
    sessions = FakeSessions(inbox_send.clone(), start_s=start_s, turn_s=turn_s, stop_s=stop_s)
    registry = FakeRegistry(sessions)
    dispatcher = Dispatcher(
        inbox_receive,
        pool_size=1,
        queue_max=queue_max,
        queue_max_per_user=queue_max_per_user,
        session_starter=starts_send,
        registry=registry_send,
        session_limits=SessionLimits(max_live=max_live, per_session_max=50, idle_s=3600.0),
    )
    await nursery.start(sessions.serve, starts_receive)
    await nursery.start(registry.serve, registry_receive)
    await nursery.start(dispatcher.serve)
    return Service(inbox_send, sessions, registry)


async def turn(inbox, user_id: str, session_id: str, prompt: str):
    """Submit a session turn of ``user_id`` (its id is its prompt); returns its reply."""
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=prompt,
        user_id=user_id,
        prompt=prompt,
        submitted_at=now,
        deadline=now + 3600,
        reply=reply_send,
        session_id=session_id,
    )
    await inbox.send(Submit(job))
    return reply_receive


async def test_a_waiting_session_gets_a_slot_before_a_busy_session_takes_its_next_turn(
    autojump_clock, nursery
):
    """Two live sessions with 10 turns queued each must not keep a third one waiting."""
    with trio.fail_after(LIMIT):
        service = await start_sessions(nursery, max_live=2, turn_s=5, stop_s=1)
        fakes = service.sessions
        busy = {}
        for n in range(10):
            for session_id in ("a", "b"):
                prompt = f"{session_id}{n}"
                busy[prompt] = await turn(service.inbox, "alice", session_id, prompt)
        await trio.sleep(1)
        c_reply = await turn(service.inbox, "bob", "c", "c0")
        assert await session_states(service.inbox) == {"a": "busy", "b": "busy", "c": "waiting"}

        # At 5 s a and b end their first turn: one of them yields its slot (1 s to stop),
        # and c runs at once on it.
        assert await outcome(c_reply) == answer("c0", 5000)
        assert fakes.times("start", "c") == [6]
        assert trio.current_time() == 11
        assert [t for t, what, _ in fakes.events if what == "hibernate"] == [5, 10]
        # Nobody starves and every session's turns still run in order.
        for prompt, reply in busy.items():
            result = await outcome(reply)
            assert result.success and result.output == f"answer to {prompt}"
        turns = fakes.details("turn")
        for session_id in ("a", "b"):
            mine = [t for t in turns if t.startswith(session_id)]
            assert mine == [f"{session_id}{n}" for n in range(10)]
        assert fakes.max_alive == 2


async def test_live_slots_go_round_robin_between_users(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_sessions(nursery, max_live=1, turn_s=1)
        fakes = service.sessions
        fakes.hold("x0")
        x_reply = await turn(service.inbox, "carol", "x", "x0")
        await wait_all_tasks_blocked()
        replies = [await turn(service.inbox, "alice", f"a{n}", f"a{n}") for n in range(3)]
        replies.append(await turn(service.inbox, "bob", "b0", "b0"))
        fakes.release("x0")
        assert await outcome(x_reply) == answer("x0", 1000)
        for reply in replies:
            assert (await outcome(reply)).success
        assert fakes.details("start") == ["x", "a0", "b0", "a1", "a2"]


async def test_past_queue_max_per_user_a_users_new_session_gets_429_while_others_wait(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_sessions(nursery, max_live=1, queue_max=5, queue_max_per_user=2)
        fakes = service.sessions
        fakes.hold("x0")
        x_reply = await turn(service.inbox, "carol", "x", "x0")
        await wait_all_tasks_blocked()
        waiting = [await turn(service.inbox, "alice", f"a{n}", f"a{n}") for n in range(2)]
        refused = await turn(service.inbox, "alice", "a2", "a2")
        assert await outcome(refused) == JobFailed(
            429, "Too many of your requests are waiting, try again later", retry_after_s=1
        )
        # A turn for a session of hers that already waits is not a new waiting session.
        more = await turn(service.inbox, "alice", "a0", "a0 again")
        bob = await turn(service.inbox, "bob", "b0", "b0")
        for reply in [*waiting, more, bob]:
            assert await no_answer_yet(reply)
        fakes.release("x0")
        assert await outcome(x_reply) == answer("x0")
        for reply in [*waiting, more, bob]:
            assert (await outcome(reply)).success
        assert "a2" not in fakes.details("start")


async def test_a_claude_md_update_restarts_that_users_live_sessions_at_their_next_turn_boundary(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_sessions(nursery, max_live=4, turn_s=2, stop_s=1)
        fakes = service.sessions
        for user, session_id in [("alice", "idle"), ("alice", "busy"), ("bob", "other")]:
            assert (
                await outcome(await turn(service.inbox, user, session_id, f"{session_id}0"))
            ).success
        busy = await turn(service.inbox, "alice", "busy", "busy1")
        queued = await turn(service.inbox, "alice", "busy", "busy2")
        await trio.sleep(1)  # busy1 is running
        await service.inbox.send(UserMemoryChanged("alice"))
        assert await session_states(service.inbox) == {
            "idle": "stopping", "busy": "busy", "other": "live"
        }  # fmt: skip
        assert await outcome(busy) == answer("busy1", 2000)
        # Its next turn runs on a new actor (which loads the new CLAUDE.md).
        assert await outcome(queued) == answer("busy2", 2000)
        # (The first turns ran one after another: 0-2, 2-4, 4-6; busy1 6-8.)
        assert fakes.times("hibernate", "idle") == [7]
        assert fakes.times("hibernate", "busy") == [8]
        assert fakes.times("start", "busy") == [2, 9]
        assert trio.current_time() == 11
        assert fakes.details("hibernate") == ["idle", "busy"]  # bob's session untouched
        # The restarted session is not restarted again.
        await trio.sleep(10)
        assert fakes.details("start").count("busy") == 2
        assert await session_states(service.inbox) == {"busy": "live", "other": "live"}
