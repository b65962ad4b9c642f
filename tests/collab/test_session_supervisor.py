"""The session supervisor and the dispatcher agree on which sessions have an actor.

The real dispatcher and session supervisor, with a fake session actor that
follows the real one's protocol, on the autojump clock: a (re)started
supervisor resets the dispatcher's live sessions, and a session never gets two
actors, even when a start was already waiting in the channel when the
supervisor came up.
"""

from __future__ import annotations

import trio
import trio.testing

from claude_code_api.actors.dispatcher import Dispatcher, SessionLimits
from claude_code_api.actors.session import SessionFailed
from claude_code_api.actors.session_supervisor import SessionSupervisor
from claude_code_api.actors.stopping import StopSignal
from claude_code_api.http.jobs import pool_snapshot, run_job
from claude_code_api.messages import (
    CloseSessionNow,
    Job,
    JobFailed,
    RunResult,
    SessionIdle,
    SessionKey,
    SessionStarted,
    SessionState,
    SessionStopped,
    Submit,
)

LIMIT = 1000


class FakeActors:
    """Session actors that answer every turn "ok"; records each start."""

    def __init__(self) -> None:
        self.starts: list[SessionKey] = []
        self.running: set[SessionKey] = set()
        self.two_at_once: list[SessionKey] = []
        self.fail_with: JobFailed | None = None

    async def run(self, key: SessionKey, dispatcher, stop: StopSignal, actor: int, options) -> None:
        self.starts.append(key)
        if key in self.running:
            self.two_at_once.append(key)
        self.running.add(key)
        try:
            await self._run(key, dispatcher, stop, actor)
        finally:
            self.running.discard(key)

    async def _run(self, key: SessionKey, dispatcher, stop: StopSignal, actor: int) -> None:
        if self.fail_with is not None:
            raise SessionFailed(self.fail_with)
        inbox_send, inbox = trio.open_memory_channel(4)
        async with dispatcher, inbox:
            await dispatcher.send(SessionStarted(key, inbox_send, actor))
            await dispatcher.send(SessionIdle(key, None, actor=actor))
            with stop.guard():
                async for command in inbox:
                    if not isinstance(command, Job):
                        return
                    command.answer(RunResult(success=True, output="ok", duration_ms=0))
                    await dispatcher.send(SessionIdle(key, True, actor=actor))


async def start_dispatcher(nursery: trio.Nursery):
    inbox_send, inbox = trio.open_memory_channel(0)
    starts_send, starts = trio.open_memory_channel(8)
    registry_send, _ = trio.open_memory_channel(8)
    dispatcher = Dispatcher(
        inbox,
        pool_size=1,
        queue_max=10,
        session_starter=starts_send,
        registry=registry_send,
        session_limits=SessionLimits(max_live=8, per_session_max=5, idle_s=3600),
    )
    await nursery.start(dispatcher.serve)
    return inbox_send, starts


async def test_a_start_waiting_before_the_supervisor_came_up_makes_one_actor(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox, starts = await start_dispatcher(nursery)
        actors = FakeActors()
        replies: list = []

        async def turn() -> None:
            replies.append(
                await run_job(inbox, user_id="u", prompt="p", timeout_s=60, session_id="s")
            )

        nursery.start_soon(turn)  # queued: its StartSession waits in the channel
        await trio.testing.wait_all_tasks_blocked()
        supervisor = SessionSupervisor(starts, inbox, actors.run)
        await nursery.start(supervisor.serve)
        await trio.sleep(1)
        assert SessionKey("u", "s") in actors.starts and actors.two_at_once == []
        assert [type(r) for r in replies] == [RunResult]


async def test_a_restarted_supervisor_frees_the_live_slots_of_its_dead_actors(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox, starts = await start_dispatcher(nursery)
        actors = FakeActors()
        first = SessionSupervisor(starts, inbox, actors.run)
        first_scope = trio.CancelScope()
        nursery.start_soon(run_cancellable, first, first_scope)
        await run_job(inbox, user_id="u", prompt="p", timeout_s=60, session_id="s")
        first_scope.cancel()  # its actors die without a SessionStopped
        await trio.testing.wait_all_tasks_blocked()
        second = SessionSupervisor(starts, inbox, actors.run)
        await nursery.start(second.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert (await pool_snapshot(inbox)).sessions == ()
        reply = await run_job(inbox, user_id="u", prompt="p", timeout_s=60, session_id="s")
        assert isinstance(reply, RunResult)
        assert len(actors.starts) == 2


async def run_cancellable(supervisor: SessionSupervisor, scope: trio.CancelScope) -> None:
    with scope:
        await supervisor.serve()


async def test_an_actor_that_cannot_start_answers_the_waiting_turns_with_its_failure(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox, starts = await start_dispatcher(nursery)
        actors = FakeActors()
        actors.fail_with = JobFailed(429, "user 'u' already has 2 sessions, the most allowed")
        await nursery.start(SessionSupervisor(starts, inbox, actors.run).serve)
        reply = await run_job(inbox, user_id="u", prompt="p", timeout_s=60, session_id="s")
        assert reply == actors.fail_with


async def test_more_new_sessions_than_the_start_channel_holds_wait_their_turn(
    autojump_clock, nursery
):
    # The dispatcher once crashed (WouldBlock) when the supervisor came up late
    # and the starts it had not taken were all sent again after its reset.
    with trio.fail_after(LIMIT):
        inbox, starts = await start_dispatcher(nursery)  # 8 live slots, a channel of 8
        actors = FakeActors()
        replies: list = []

        async def turn(session_id: str) -> None:
            replies.append(
                await run_job(inbox, user_id="u", prompt="p", timeout_s=60, session_id=session_id)
            )

        for n in range(8):
            nursery.start_soon(turn, f"s{n}")
        await trio.testing.wait_all_tasks_blocked()  # 8 starts fill the channel
        await nursery.start(SessionSupervisor(starts, inbox, actors.run).serve)
        await trio.sleep(1)
        assert sorted(replies, key=repr) == [RunResult(True, "ok", 0)] * 8
        # A start taken twice (before and after the reset) may make a stale actor,
        # which the dispatcher closes at once; never two at a time for one session.
        assert {k.session_id for k in actors.starts} == {f"s{n}" for n in range(8)}
        assert actors.two_at_once == []
        # The dispatcher's view is what runs: no live slot leaked, no actor forgotten.
        snapshot = await pool_snapshot(inbox)
        assert {view.key for view in snapshot.sessions} == actors.running


async def test_a_stale_actors_messages_are_not_taken_for_the_current_ones(autojump_clock):
    # Direct calls, so the order is exactly the bad one: the current actor is up,
    # then a stale one (a start taken twice) announces itself, idles and stops.
    _, inbox = trio.open_memory_channel(0)
    starts_send, _starts = trio.open_memory_channel(8)
    dispatcher = Dispatcher(
        inbox,
        pool_size=1,
        queue_max=10,
        session_starter=starts_send,
        registry=trio.open_memory_channel(8)[0],
        session_limits=SessionLimits(max_live=8, per_session_max=5, idle_s=3600),
    )
    key = SessionKey("u", "s")
    job = Job(
        "j",
        "u",
        "p",
        trio.current_time(),
        trio.current_time() + 60,
        trio.open_memory_channel(8)[0],
        session_id="s",
    )
    dispatcher.handle(Submit(job))
    dispatcher.on_time(trio.current_time())
    current_send, current_inbox = trio.open_memory_channel(4)
    dispatcher.handle(SessionStarted(key, current_send, actor=2))
    dispatcher.handle(SessionIdle(key, None, actor=2))
    dispatcher.on_time(trio.current_time())
    assert current_inbox.receive_nowait() is job
    stale_send, stale_inbox = trio.open_memory_channel(4)
    dispatcher.handle(SessionStarted(key, stale_send, actor=1))
    assert isinstance(stale_inbox.receive_nowait(), CloseSessionNow)
    dispatcher.handle(SessionIdle(key, None, actor=1))  # must not make the busy one idle
    dispatcher.handle(SessionStopped(key, None, actor=1))  # must not forget the current one
    (view,) = dispatcher.sessions.views()
    assert view.state is SessionState.BUSY
    assert dispatcher.sessions.entries[key].inbox is current_send
