"""No deadline in the dispatcher stays in the past once it has been handled.

The dispatcher waits for its next message under ``move_on_at(next deadline)``.
A deadline left in the past would cancel every ``receive()`` before it takes
anything: 100 % CPU, ``/health`` hanging, and the message that would clear the
deadline never received. Each kind of deadline is checked here on its own, on
trio's autojump clock, and the reproduced livelock end to end.
"""

from __future__ import annotations

import math

import trio

from claude_code_api.actors.dispatcher import Dispatcher, SessionLimits
from claude_code_api.http.jobs import pool_snapshot
from claude_code_api.messages import (
    Job,
    Queued,
    RunResult,
    SessionIdle,
    SessionKey,
    SessionStarted,
    SessionStopped,
    Submit,
)
from tests.collab.test_turn import make_job

IDLE_S = 60.0
KEY = SessionKey("u", "s")


def new_dispatcher(*, max_live: int = 1) -> tuple[Dispatcher, trio.MemoryReceiveChannel]:
    _, inbox = trio.open_memory_channel(0)
    starts_send, starts = trio.open_memory_channel(max_live)
    registry_send, _ = trio.open_memory_channel(16)
    dispatcher = Dispatcher(
        inbox,
        pool_size=1,
        queue_max=10,
        session_starter=starts_send,
        registry=registry_send,
        session_limits=SessionLimits(max_live=max_live, per_session_max=5, idle_s=IDLE_S),
    )
    return dispatcher, starts


def session_job(timeout_s: float) -> tuple[Job, trio.MemoryReceiveChannel]:
    job, reply = make_job(timeout_s=timeout_s)
    return Job(
        id=job.id,
        user_id=KEY.user_id,
        prompt=job.prompt,
        submitted_at=job.submitted_at,
        deadline=job.deadline,
        reply=job.reply,
        session_id=KEY.session_id,
    ), reply


def assert_no_deadline_due(dispatcher: Dispatcher) -> None:
    now = trio.current_time()
    dispatcher.on_time(now)
    assert dispatcher.next_deadline() > now


async def test_an_overdue_queued_job_is_answered_and_its_deadline_gone(autojump_clock):
    dispatcher, _ = new_dispatcher()
    job, reply = make_job(timeout_s=5)
    dispatcher.handle(Submit(job))
    assert dispatcher.next_deadline() == job.deadline
    await trio.sleep(5)
    assert_no_deadline_due(dispatcher)
    assert dispatcher.next_deadline() == math.inf
    assert reply.receive_nowait() == Queued(0)
    terminal = reply.receive_nowait()
    assert isinstance(terminal, RunResult) and terminal.timed_out


async def test_an_overdue_session_turn_waiting_for_a_slot_is_answered(autojump_clock):
    dispatcher, _ = new_dispatcher(max_live=1)
    dispatcher.handle(Submit(session_job(60)[0]))  # takes the only slot (starting)
    other = Job(
        id="other",
        user_id="u",
        prompt="p",
        submitted_at=trio.current_time(),
        deadline=trio.current_time() + 5,
        reply=trio.open_memory_channel(4)[0],
        session_id="other",
    )
    dispatcher.handle(Submit(other))
    dispatcher.on_time(trio.current_time())
    await trio.sleep(5)
    assert_no_deadline_due(dispatcher)


async def test_an_idle_session_whose_actor_already_ended_does_not_keep_its_deadline(
    autojump_clock,
):
    # The reproduction: the actor ended (its inbox is closed) and its idle time
    # runs out before its SessionStopped arrives; the Hibernate cannot be sent.
    dispatcher, _ = new_dispatcher()
    job, _ = session_job(60)
    dispatcher.handle(Submit(job))
    dispatcher.on_time(trio.current_time())  # starting
    inbox_send, inbox_receive = trio.open_memory_channel(4)
    dispatcher.handle(SessionStarted(KEY, inbox_send))
    dispatcher.handle(SessionIdle(KEY, None))
    dispatcher.on_time(trio.current_time())  # the turn is handed over
    assert inbox_receive.receive_nowait() is job
    dispatcher.handle(SessionIdle(KEY, True))
    inbox_receive.close()  # the actor is gone; its SessionStopped is on its way
    await trio.sleep(IDLE_S)
    assert_no_deadline_due(dispatcher)
    dispatcher.handle(SessionStopped(KEY))
    assert dispatcher.sessions.entries == {}


async def test_an_idle_session_that_cannot_take_its_next_turn_does_not_keep_its_deadline(
    autojump_clock,
):
    dispatcher, _ = new_dispatcher()
    first, _ = session_job(600)
    dispatcher.handle(Submit(first))
    dispatcher.on_time(trio.current_time())
    inbox_send, inbox_receive = trio.open_memory_channel(4)
    dispatcher.handle(SessionStarted(KEY, inbox_send))
    dispatcher.handle(SessionIdle(KEY, None))
    inbox_receive.close()
    dispatcher.on_time(trio.current_time())  # the hand-over fails: the actor is ending
    await trio.sleep(IDLE_S)
    assert_no_deadline_due(dispatcher)


async def test_the_livelock_reproduction_end_to_end_stays_responsive():
    # Real clock, short idle time: a spinning dispatcher would never answer the
    # status request nor receive the SessionStopped.
    with trio.fail_after(10):
        inbox_send, inbox = trio.open_memory_channel(0)
        starts_send, _starts = trio.open_memory_channel(1)
        registry_send, _ = trio.open_memory_channel(16)
        dispatcher = Dispatcher(
            inbox,
            pool_size=1,
            queue_max=10,
            session_starter=starts_send,
            registry=registry_send,
            session_limits=SessionLimits(max_live=1, per_session_max=5, idle_s=0.05),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.serve)
            job, _ = session_job(60)
            await inbox_send.send(Submit(job))
            session_inbox_send, session_inbox = trio.open_memory_channel(4)
            await inbox_send.send(SessionStarted(KEY, session_inbox_send))
            await inbox_send.send(SessionIdle(KEY, None))
            assert await session_inbox.receive() is job
            await inbox_send.send(SessionIdle(KEY, True))
            session_inbox.close()
            await trio.sleep(0.2)  # well past the idle time
            with trio.fail_after(1):
                snapshot = await pool_snapshot(inbox_send)
            assert [view.key for view in snapshot.sessions] == [KEY]
            with trio.fail_after(1):
                await inbox_send.send(SessionStopped(KEY))
                snapshot = await pool_snapshot(inbox_send)
            assert snapshot.sessions == ()
            nursery.cancel_scope.cancel()
