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
    Job,
    JobFailed,
    RunResult,
    SessionIdle,
    SessionKey,
    SessionStarted,
)

LIMIT = 1000


class FakeActors:
    """Session actors that answer every turn "ok"; records each start."""

    def __init__(self) -> None:
        self.starts: list[SessionKey] = []
        self.fail_with: JobFailed | None = None

    async def run(self, key: SessionKey, dispatcher, stop: StopSignal) -> None:
        self.starts.append(key)
        if self.fail_with is not None:
            raise SessionFailed(self.fail_with)
        inbox_send, inbox = trio.open_memory_channel(4)
        async with dispatcher, inbox:
            await dispatcher.send(SessionStarted(key, inbox_send))
            await dispatcher.send(SessionIdle(key, None))
            with stop.guard():
                async for command in inbox:
                    if not isinstance(command, Job):
                        return
                    command.answer(RunResult(success=True, output="ok", duration_ms=0))
                    await dispatcher.send(SessionIdle(key, True))


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
        assert actors.starts == [SessionKey("u", "s")]
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
