"""StopSignal: a graceful-stop request cancels exactly the guarded phases."""

from __future__ import annotations

import trio
import trio.testing

from claude_code_api.actors.stopping import StopSignal


async def test_a_stop_cancels_the_guarded_wait_only(autojump_clock):
    with trio.fail_after(10):
        stop = StopSignal()
        reached = []

        async def actor() -> None:
            with stop.guard():
                await trio.sleep_forever()
            reached.append(trio.current_time())
            await trio.sleep(1)  # unguarded work finishes despite the stop
            reached.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(actor)
            await trio.sleep(5)
            stop.request_stop()
        assert reached == [5, 6]
        assert stop.requested


async def test_a_guard_entered_after_the_stop_is_cancelled_at_once(autojump_clock):
    with trio.fail_after(10):
        stop = StopSignal()
        stop.request_stop()
        with stop.guard() as scope:
            await trio.sleep(100)
        assert scope.cancelled_caught and trio.current_time() == 0


async def test_a_scope_passed_in_is_cancelled_but_entered_by_its_owner(autojump_clock):
    with trio.fail_after(10):
        stop = StopSignal()
        turn = trio.CancelScope()
        with stop.guard(turn):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: trio.sleep(3))
                with turn:
                    nursery.start_soon(lambda: _stop_later(stop))
                    await trio.sleep(100)
        assert turn.cancelled_caught and trio.current_time() == 3


async def _stop_later(stop: StopSignal) -> None:
    await trio.sleep(3)
    stop.request_stop()
