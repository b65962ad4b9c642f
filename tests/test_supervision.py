"""Contract tests for the one_for_one supervisor, on trio's MockClock (exact times)."""

from __future__ import annotations

import functools
import math

import pytest
import trio
import trio.testing

from claude_code_api.supervision import (
    Backoff,
    ChildExit,
    ChildSpec,
    Restart,
    Supervisor,
    TooManyRestarts,
)


class Crash(Exception):
    pass


class StartFailed(Exception):
    pass


class Fake:
    """A child whose every incarnation is scripted or driven by the test.

    ``lifetimes[i]``: incarnation i crashes that many seconds after started()
    (missing or None: runs until told). ``fail_starts``: incarnations that
    raise before started(). The stop hook makes it finish ``stop_takes``
    seconds later, unless ``ignore_stop``. ``events`` is shared between fakes
    to record order.
    """

    def __init__(
        self, name, events, *, lifetimes=(), fail_starts=(), stop_takes=0.0, ignore_stop=False
    ):
        self.name, self.events = name, events
        self.lifetimes, self.fail_starts = list(lifetimes), set(fail_starts)
        self.stop_takes, self.ignore_stop = stop_takes, ignore_stop
        self.starts: list[float] = []  # trio time of every start attempt
        self.running = False
        self.cancelled = False
        self._finish = trio.Event()
        self._error: Exception | None = None
        self._stopping = False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        i = len(self.starts)
        self.starts.append(trio.current_time())
        if i in self.fail_starts:
            raise StartFailed(f"{self.name} #{i}")
        self.events.append(f"start {self.name}")
        self._finish, self._error, self._stopping = trio.Event(), None, False
        self.running = True
        try:
            task_status.started(i)
            lifetime = self.lifetimes[i] if i < len(self.lifetimes) else None
            if lifetime is not None:
                await trio.sleep(lifetime)
                raise Crash(f"{self.name} #{i}")
            await self._finish.wait()
            if self._stopping:
                await trio.sleep(self.stop_takes)  # cleaning up
            if self._error is not None:
                raise self._error
        except trio.Cancelled:
            self.cancelled = True
            raise
        finally:
            self.running = False
            self.events.append(f"stop {self.name}")

    def crash(self, error: Exception | None = None) -> Exception:
        self._error = error or Crash(self.name)
        self._finish.set()
        return self._error

    def exit(self) -> None:
        self._finish.set()

    def request_stop(self) -> None:
        self.events.append(f"asked {self.name}")
        if not self.ignore_stop:
            self._stopping = True
            self._finish.set()

    def spec(self, **kwargs) -> ChildSpec:
        return ChildSpec(self.name, self.run, **kwargs)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_start_in_order_stop_in_reverse(autojump_clock):
    events: list[str] = []
    fakes = [Fake(n, events) for n in "abc"]
    sup = Supervisor("top", [f.spec() for f in fakes])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            assert events == ["start a", "start b", "start c"]
            assert all(f.running for f in fakes)
            sup.request_stop()
            sup.request_stop()  # idempotent
    assert events[3:] == ["stop c", "stop b", "stop a"]
    assert all(f.cancelled for f in fakes)  # no hook: cancelled at once
    assert trio.current_time() == 0


async def test_request_stop_before_run(autojump_clock):
    events: list[str] = []
    sup = Supervisor("top", [Fake(n, events).spec() for n in "ab"])
    sup.request_stop()
    with trio.fail_after(10):
        await sup.run()
    assert events == ["start a", "start b", "stop b", "stop a"]


async def test_crash_does_not_disturb_sibling(autojump_clock):
    events: list[str] = []
    a, b = Fake("a", events), Fake("b", events)
    sup = Supervisor("top", [a.spec(), b.spec()])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            error = b.crash()
            await settle()
            assert a.running and a.starts == [0] and not a.cancelled  # same incarnation
            assert b.running and len(b.starts) == 2
            assert sup.last_failure == ChildExit("b", error)
            sup.request_stop()


async def test_permanent_restarted_after_normal_exit_and_crash(autojump_clock):
    child = Fake("w", [])
    sup = Supervisor("top", [child.spec(restart=Restart.PERMANENT)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            child.exit()
            await settle()
            assert child.running and len(child.starts) == 2
            child.crash()
            await settle()
            assert child.running and len(child.starts) == 3
            sup.request_stop()


async def test_transient_restarted_only_after_crash(autojump_clock):
    child = Fake("w", [])
    sup = Supervisor("top", [child.spec(restart=Restart.TRANSIENT)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            child.crash()
            await settle()
            assert child.running and len(child.starts) == 2
            child.exit()
            await settle()
            assert not child.running and len(child.starts) == 2
            sup.request_stop()


async def test_temporary_never_restarted(autojump_clock):
    crashes, exits = Fake("crashes", []), Fake("exits", [])
    sup = Supervisor("top", [c.spec(restart=Restart.TEMPORARY) for c in (crashes, exits)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            error = crashes.crash()
            exits.exit()
            await settle()
            assert not crashes.running and not exits.running
            assert len(crashes.starts) == len(exits.starts) == 1
            assert sup.last_failure == ChildExit("crashes", error)
            sup.request_stop()


async def test_child_returning_without_started_counts_as_started(autojump_clock):
    async def setup(*, task_status):
        return  # one-shot work, never calls started()

    worker = Fake("w", [])
    sup = Supervisor("top", [ChildSpec("setup", setup, restart=Restart.TRANSIENT), worker.spec()])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await settle()
            assert worker.running
            sup.request_stop()


async def test_too_many_restarts_escalates_after_stopping_siblings(autojump_clock, caplog):
    events: list[str] = []
    a, c = Fake("a", events), Fake("c", events)
    crasher = Fake("b", events, lifetimes=[1] * 10)  # crashes 1 s after every start
    sup = Supervisor("top", [a.spec(), crasher.spec(), c.spec()], intensity=3, period=5)
    with trio.fail_after(10), pytest.raises(TooManyRestarts, match="'b'") as info:
        await sup.run()
    # Crashes at 1, 2, 3 are restarted; the one at 4 would be the 4th restart within 5 s.
    assert crasher.starts == [0, 1, 2, 3]
    assert trio.current_time() == 4
    assert info.value.last_exit.name == "b"
    assert isinstance(info.value.last_exit.reason, Crash)
    assert events[-2:] == ["stop c", "stop a"]
    assert "too many restarts" in caplog.text


async def test_restarts_older_than_period_are_forgotten(autojump_clock):
    crasher = Fake("w", [], lifetimes=[3] * 10)  # one crash every 3 s
    sup = Supervisor("top", [crasher.spec()], intensity=2, period=5)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(20)
            assert crasher.starts == [0, 3, 6, 9, 12, 15, 18]
            sup.request_stop()


async def test_failed_restarts_count_toward_intensity(autojump_clock):
    child = Fake("w", [], lifetimes=[1], fail_starts={1, 2, 3, 4})
    sup = Supervisor("top", [child.spec()], intensity=3, period=5)
    with trio.fail_after(10), pytest.raises(TooManyRestarts) as info:
        await sup.run()
    assert child.starts == [0, 1, 1, 1]  # the crash, then three failed restarts
    assert isinstance(info.value.last_exit.reason, StartFailed)


async def test_failed_restart_does_not_crash_supervisor(autojump_clock):
    child = Fake("w", [], lifetimes=[1], fail_starts={1, 2})
    sup = Supervisor("top", [child.spec()], intensity=3, period=5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(2)
            assert child.running and child.starts == [0, 1, 1, 1]
            assert isinstance(sup.last_failure.reason, StartFailed)
            sup.request_stop()


async def test_backoff_doubles_up_to_cap(autojump_clock):
    crasher = Fake("w", [], lifetimes=[0] * 100)  # crashes right after every start
    sup = Supervisor(
        "top", [crasher.spec()], intensity=3, period=5, backoff=Backoff(initial=1, factor=2, cap=8)
    )
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(0.5)
            assert sup.backing_off_until == 1
            await trio.sleep_until(31.5)
            assert crasher.starts == [0, 0, 0, 0, 1, 3, 7, 15, 23, 31]
            assert sup.backing_off_until == 39
            sup.request_stop()  # abandons the pending restart
    assert trio.current_time() == 31.5
    assert len(crasher.starts) == 10


async def test_backoff_resets_after_quiet_period(autojump_clock):
    # Six instant crashes, one incarnation that lives 10 s, then instant crashes again.
    crasher = Fake("w", [], lifetimes=[0] * 6 + [10] + [0] * 100)
    sup = Supervisor("top", [crasher.spec()], intensity=3, period=5, backoff=Backoff())
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep_until(20.5)
            # At 17 the 10 s incarnation crashes: quiet since the restart at 7, so
            # three immediate restarts again, then delays start over at 1 s.
            assert crasher.starts == [0, 0, 0, 0, 1, 3, 7, 17, 17, 17, 18, 20]
            assert sup.backing_off_until == 24
            sup.request_stop()
    assert sup.backing_off_until is None


async def test_exits_are_handled_while_backing_off(autojump_clock):
    crasher = Fake("crasher", [], lifetimes=[0] * 100)
    sibling = Fake("sibling", [], lifetimes=[0.5])
    sup = Supervisor(
        "top", [crasher.spec(), sibling.spec()], intensity=3, period=5, backoff=Backoff()
    )
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep_until(6)
            # Intensity is counted across children: the sibling's crash at 0.5 is
            # handled at once, and its restart is delayed by the next step (2 s).
            assert sibling.starts == [0, 2.5] and sibling.running
            assert crasher.starts == [0, 0, 0, 0, 1, 5]
            sup.request_stop()


async def test_graceful_stop_lets_children_finish(autojump_clock):
    events: list[str] = []
    a, b = Fake("a", events, stop_takes=2), Fake("b", events, stop_takes=2)
    sup = Supervisor("top", [f.spec(request_stop=f.request_stop, shutdown_grace=5) for f in (a, b)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            sup.request_stop()
    # One at a time, in reverse: b takes 0..2, then a takes 2..4; nobody is cancelled.
    assert events[2:] == ["asked b", "stop b", "asked a", "stop a"]
    assert trio.current_time() == 4
    assert not a.cancelled and not b.cancelled


async def test_child_ignoring_stop_is_cancelled_at_grace(autojump_clock):
    stubborn = Fake("w", [], ignore_stop=True)
    sup = Supervisor("top", [stubborn.spec(request_stop=stubborn.request_stop, shutdown_grace=3)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(1)
            sup.request_stop()
    assert stubborn.cancelled
    assert trio.current_time() == 4


async def test_failure_before_started_fails_run_and_stops_earlier_children(autojump_clock):
    events: list[str] = []
    a, b, c = Fake("a", events), Fake("b", events, fail_starts={0}), Fake("c", events)
    sup = Supervisor("top", [a.spec(), b.spec(), c.spec()])
    with trio.fail_after(10), pytest.raises(StartFailed, match="b #0"):
        await sup.run()
    assert events == ["start a", "stop a"]
    assert b.starts == [0] and c.starts == []


async def test_nested_supervisor(autojump_clock):
    events: list[str] = []
    db, w1, w2, api = (Fake(n, events) for n in ("db", "w1", "w2", "api"))
    pool = Supervisor("pool", [w1.spec(), w2.spec()], intensity=0)
    top = Supervisor(
        "top",
        [
            db.spec(),
            ChildSpec("pool", pool.run, request_stop=pool.request_stop),
            api.spec(),
        ],
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(top.run)
            assert events == ["start db", "start w1", "start w2", "start api"]
            # The pool gives up on its first crash; top restarts the whole pool.
            w1.crash()
            await settle()
            assert isinstance(top.last_failure.reason, TooManyRestarts)
            assert len(w1.starts) == len(w2.starts) == 2 and w1.running and w2.running
            assert db.starts == api.starts == [0] and db.running and api.running
            del events[:]
            top.request_stop()
    assert events == ["stop api", "stop w2", "stop w1", "stop db"]


@pytest.mark.parametrize("grace", [0, 2.5])
async def test_nested_supervisor_stops_within_grace(autojump_clock, grace):
    slow = Fake("slow", [], stop_takes=1)
    inner = Supervisor(
        "inner", [slow.spec(request_stop=slow.request_stop, shutdown_grace=math.inf)]
    )
    top = Supervisor(
        "top",
        [
            ChildSpec(
                "inner",
                functools.partial(inner.run),
                request_stop=inner.request_stop,
                shutdown_grace=grace,
            )
        ],
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(top.run)
            top.request_stop()
    # The inner supervisor waits for its child, unless its own grace runs out first.
    assert trio.current_time() == min(1, grace)
    assert slow.cancelled == (grace < 1)
