"""Contract tests for the one_for_one supervisor, on trio's MockClock (exact times)."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import trio
import trio.testing

from claude_code_api.actors.supervision import (
    Backoff,
    ChildExit,
    ChildSpec,
    ExpectedFailure,
    Restart,
    StopOrder,
    Strategy,
    Supervisor,
    TooManyRestarts,
)

REST_FOR_ONE, ONE_FOR_ALL = Strategy.REST_FOR_ONE, Strategy.ONE_FOR_ALL


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
        self.ended: list[float] = []  # trio time each incarnation ended
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
            self.ended.append(trio.current_time())
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


# --- strategies ------------------------------------------------------------


def graceful(fake: Fake, **kwargs) -> ChildSpec:
    return fake.spec(request_stop=fake.request_stop, **kwargs)


async def test_rest_for_one_restarts_the_dead_child_and_those_after_it(autojump_clock):
    events: list[str] = []
    a, b, c, d = (Fake(n, events, stop_takes=1) for n in "abcd")
    sup = Supervisor(
        "top", [graceful(f, shutdown_grace=5) for f in (a, b, c, d)], strategy=REST_FOR_ONE
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(1)
            del events[:]
            error = b.crash()
            await trio.sleep(5)
            # Those after b stop as at shutdown: reverse order, hook, each takes 1 s.
            # Then b, c, d start again in order; a, before b, is not touched.
            assert events == [
                "stop b",
                "asked d",
                "stop d",
                "asked c",
                "stop c",
                "start b",
                "start c",
                "start d",
            ]
            assert a.starts == [0] and not a.cancelled
            assert b.starts == c.starts == d.starts == [0, 3]
            assert all(f.running for f in (a, b, c, d))
            assert sup.last_failure == ChildExit("b", error)
            sup.request_stop()


async def test_rest_for_one_last_child_restarts_alone(autojump_clock):
    events: list[str] = []
    a, b = Fake("a", events), Fake("b", events)
    sup = Supervisor("top", [a.spec(), b.spec()], strategy=REST_FOR_ONE)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            b.crash()
            await settle()
            assert events == ["start a", "start b", "stop b", "start b"]
            sup.request_stop()


async def test_one_for_all_restarts_every_child(autojump_clock):
    events: list[str] = []
    a, b, c = (Fake(n, events, stop_takes=1) for n in "abc")
    sup = Supervisor(
        "top", [graceful(f, shutdown_grace=5) for f in (a, b, c)], strategy=ONE_FOR_ALL
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            del events[:]
            b.crash()
            await trio.sleep(5)
            assert events == [
                "stop b",
                "asked c",
                "stop c",
                "asked a",
                "stop a",
                "start a",
                "start b",
                "start c",
            ]
            assert a.starts == b.starts == c.starts == [0, 2]
            sup.request_stop()


@pytest.mark.parametrize("strategy", [REST_FOR_ONE, ONE_FOR_ALL])
async def test_one_restart_per_event_however_many_children_it_starts(autojump_clock, strategy):
    a, b, c = Fake("a", []), Fake("b", [], lifetimes=[1, 1]), Fake("c", [])
    # One restart allowed per 5 s: b's first crash restarts a (for one_for_all), b and c
    # once -- a single restart; its second crash is the second restart, one too many.
    sup = Supervisor("top", [f.spec() for f in (a, b, c)], strategy=strategy, intensity=1)
    with trio.fail_after(10), pytest.raises(TooManyRestarts, match="'b'"):
        await sup.run()
    assert b.starts == c.starts == [0, 1]
    assert a.starts == ([0, 1] if strategy is ONE_FOR_ALL else [0])
    assert trio.current_time() == 2


@pytest.mark.parametrize("strategy", [REST_FOR_ONE, ONE_FOR_ALL])
async def test_a_child_that_is_not_restarted_disturbs_nobody(autojump_clock, strategy):
    events: list[str] = []
    a, temporary, transient, d = (Fake(n, events) for n in ("a", "temporary", "transient", "d"))
    sup = Supervisor(
        "top",
        [
            a.spec(),
            temporary.spec(restart=Restart.TEMPORARY),
            transient.spec(restart=Restart.TRANSIENT),
            d.spec(),
        ],
        strategy=strategy,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            del events[:]
            temporary.crash()  # never restarted: as OTP, only restarted children count
            transient.exit()  # a normal exit: not restarted either
            await settle()
            assert sorted(events) == ["stop temporary", "stop transient"]
            assert a.starts == d.starts == [0] and a.running and d.running
            sup.request_stop()


async def test_rest_for_one_leaves_temporary_siblings_stopped(autojump_clock):
    # As OTP: a restart takes temporary siblings down and does not bring them back,
    # and it starts every other sibling again, even a transient one that had finished.
    events: list[str] = []
    a, temporary, finished, d = (Fake(n, events) for n in ("a", "temporary", "finished", "d"))
    sup = Supervisor(
        "top",
        [
            a.spec(),
            temporary.spec(restart=Restart.TEMPORARY),
            finished.spec(restart=Restart.TRANSIENT),
            d.spec(),
        ],
        strategy=REST_FOR_ONE,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            finished.exit()
            await settle()
            del events[:]
            a.crash()
            await settle()
            assert events == [
                "stop a",
                "stop d",
                "stop temporary",
                "start a",
                "start finished",
                "start d",
            ]
            assert temporary.starts == [0] and not temporary.running
            assert finished.starts == [0, 0] and finished.running
            sup.request_stop()


async def test_exit_of_a_sibling_stopped_for_a_restart_is_not_reported(autojump_clock):
    events: list[str] = []
    a = Fake("a", events)
    b = Fake("b", events, lifetimes=[1])  # crashes at 1
    c = Fake("c", events, lifetimes=[1.5])  # crashes at 1.5, while d is still stopping
    d = Fake("d", events, stop_takes=2)
    sup = Supervisor(
        "top",
        [a.spec(), b.spec(), c.spec(), graceful(d, shutdown_grace=5)],
        strategy=REST_FOR_ONE,
        intensity=1,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(5)
            # b's restart took c down: c's own crash, not yet reported when its
            # restart started it again, is dropped -- neither restarts c a second
            # time nor counts against intensity (1 would have been exceeded).
            assert b.starts == c.starts == d.starts == [0, 3]
            assert all(f.running for f in (a, b, c, d))
            assert sup.last_failure.name == "b"
            sup.request_stop()


async def test_stop_requested_while_a_restart_stops_siblings(autojump_clock):
    events: list[str] = []
    a, b = Fake("a", events), Fake("b", events, lifetimes=[1])
    hung = Fake("hung", events, ignore_stop=True)
    sup = Supervisor(
        "top", [a.spec(), b.spec(), graceful(hung, shutdown_grace=4)], strategy=REST_FOR_ONE
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(2)  # b crashed at 1; hung was asked to stop then
            sup.request_stop()
    # The shutdown keeps the deadline the restart set (1 + 4), asks nobody twice,
    # and restarts nobody.
    assert trio.current_time() == 5
    assert events.count("asked hung") == 1 and hung.cancelled
    assert b.starts == [0] and hung.starts == [0]
    assert events[-1] == "stop a"


async def test_rest_for_one_backoff_restarts_the_group_when_due(autojump_clock):
    a, b, c = Fake("a", [], lifetimes=[1.5]), Fake("b", [], lifetimes=[1]), Fake("c", [])
    sup = Supervisor(
        "top",
        [f.spec() for f in (a, b, c)],
        strategy=REST_FOR_ONE,
        intensity=0,  # every restart is delayed
        backoff=Backoff(initial=1, factor=2, cap=8),
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(1.2)
            # b died at 1: c depends on it, so it stops now, not when b restarts.
            assert sup.backing_off_until == 2 and not b.running and not c.running
            await trio.sleep_until(2.2)
            # a died at 1.5: its restart (due 2.5) brings b and c back too, so
            # b's own restart, due at 2, was dropped.
            assert b.starts == c.starts == [0] and sup.backing_off_until == 2.5
            await trio.sleep_until(3)
            assert a.starts == b.starts == c.starts == [0, 2.5]
            assert all(f.running for f in (a, b, c))
            sup.request_stop()


@pytest.mark.parametrize("strategy", [REST_FOR_ONE, ONE_FOR_ALL])
async def test_failed_restart_in_a_group_is_an_exit_of_that_child(autojump_clock, strategy):
    events: list[str] = []
    a = Fake("a", events, lifetimes=[1])
    b = Fake("b", events, fail_starts={1})  # its first restart fails
    c = Fake("c", events)
    sup = Supervisor("top", [f.spec() for f in (a, b, c)], strategy=strategy)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(2)
            # As OTP: the failure is one more restart event, of b -- which takes a
            # down again only under one_for_all.
            assert a.starts == ([0, 1, 1] if strategy is ONE_FOR_ALL else [0, 1])
            assert b.starts == [0, 1, 1] and c.starts == [0, 1]
            assert all(f.running for f in (a, b, c))
            assert sup.last_failure.name == "b"
            assert isinstance(sup.last_failure.reason, StartFailed)
            sup.request_stop()


# --- fresh state for every incarnation -----------------------------------------


class Tally:
    """An actor with state of its own: it counts the jobs it did, and can be made to crash."""

    def __init__(self, made: list[Tally]) -> None:
        self.jobs = 0
        self.asked_to_stop = False
        self._wake = trio.Event()
        made.append(self)

    def work(self) -> None:
        self.jobs += 1

    def crash(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        self.asked_to_stop = True
        self._wake.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._wake.wait()
        if not self.asked_to_stop:
            raise Crash(f"with {self.jobs} jobs done")


async def test_start_function_builds_fresh_state_for_each_incarnation(autojump_clock):
    made: list[Tally] = []

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        await Tally(made).serve(task_status=task_status)  # state created here, per incarnation

    sup = Supervisor("top", [ChildSpec("tally", start)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            made[0].work()
            made[0].crash()
            await settle()
            assert len(made) == 2 and made[1].jobs == 0  # the restart did not inherit the job
            sup.request_stop()


async def test_actor_factory_makes_a_new_actor_and_stops_the_current_one(autojump_clock):
    made: list[Tally] = []
    sup = Supervisor(
        "top", [ChildSpec("tally", actor=lambda: Tally(made), shutdown_grace=math.inf)]
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            made[0].work()
            made[0].crash()
            await settle()
            assert len(made) == 2 and made[1].jobs == 0
            sup.request_stop()
    # The stop hook reached the incarnation that was running, not the one that crashed,
    # and it finished on its own (no grace: it would have hung otherwise).
    assert not made[0].asked_to_stop and made[1].asked_to_stop
    assert trio.current_time() == 0


async def test_supervisor_as_an_actor_comes_back_new(autojump_clock):
    events: list[str] = []
    w1, w2 = Fake("w1", events), Fake("w2", events)
    pools: list[Supervisor] = []

    def new_pool() -> Supervisor:
        pools.append(Supervisor("pool", [w1.spec(), w2.spec()], intensity=0))
        return pools[-1]

    top = Supervisor("top", [ChildSpec("pool", actor=new_pool)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(top.run)
            w2.crash()  # the pool gives up at once; top starts a new one
            await settle()
            assert len(pools) == 2 and w1.starts == w2.starts == [0, 0]
            assert isinstance(top.last_failure.reason, TooManyRestarts)
            del events[:]
            top.request_stop()
    assert events == ["stop w2", "stop w1"]


def test_child_spec_takes_start_or_actor():
    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        pass

    with pytest.raises(ValueError, match="exactly one"):
        ChildSpec("neither")
    with pytest.raises(ValueError, match="exactly one"):
        ChildSpec("both", start, actor=lambda: Tally([]))
    with pytest.raises(ValueError, match="its own request_stop"):
        ChildSpec("hook", actor=lambda: Tally([]), request_stop=lambda: None)


# --- stopping side by side -------------------------------------------------------


@pytest.mark.parametrize(("order", "took"), [(StopOrder.REVERSE, 8), (StopOrder.TOGETHER, 2)])
async def test_hung_children_stop_within_one_grace_together(autojump_clock, order, took):
    events: list[str] = []
    hung = [Fake(f"w{n}", events, ignore_stop=True) for n in range(4)]
    sup = Supervisor("pool", [graceful(f, shutdown_grace=2) for f in hung], stop_order=order)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(1)
            sup.request_stop()
    assert trio.current_time() == 1 + took
    assert all(f.cancelled for f in hung)
    if order is StopOrder.TOGETHER:  # every hook is called at once, still last started first
        assert events[4:8] == ["asked w3", "asked w2", "asked w1", "asked w0"]
        assert all(f.ended == [3] for f in hung)


async def test_together_each_child_keeps_its_own_grace(autojump_clock):
    quick = Fake("quick", [], stop_takes=0.5)
    hung_short = Fake("hung_short", [], ignore_stop=True)
    hung_long = Fake("hung_long", [], ignore_stop=True)
    no_hook = Fake("no_hook", [])
    sup = Supervisor(
        "pool",
        [
            graceful(quick, shutdown_grace=3),
            graceful(hung_short, shutdown_grace=1),
            graceful(hung_long, shutdown_grace=3),
            no_hook.spec(),
        ],
        stop_order=StopOrder.TOGETHER,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            sup.request_stop()
    ended = {f.name: f.ended for f in (quick, hung_short, hung_long, no_hook)}
    # All from the same moment: whoever finishes early ends early; hung ones are
    # cancelled at their own grace; the whole stop takes the largest grace.
    assert ended == {"no_hook": [0], "quick": [0.5], "hung_short": [1], "hung_long": [3]}
    assert not quick.cancelled and hung_short.cancelled and hung_long.cancelled
    assert trio.current_time() == 3


async def test_together_also_applies_to_siblings_stopped_for_a_restart(autojump_clock):
    hung = [Fake(f"w{n}", [], ignore_stop=True) for n in range(3)]
    crasher = Fake("crasher", [], lifetimes=[1])
    sup = Supervisor(
        "pool",
        [crasher.spec()] + [graceful(f, shutdown_grace=2) for f in hung],
        strategy=ONE_FOR_ALL,
        stop_order=StopOrder.TOGETHER,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(4)
            assert crasher.starts == [0, 3]  # the siblings took one grace, not three
            assert all(f.starts == [0, 3] and f.running for f in hung)
            sup.request_stop()


# --- logging ----------------------------------------------------------------------


class AgentCannotStart(ExpectedFailure):
    pass


def crash_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "child 'w'" in r.getMessage()]


@pytest.mark.parametrize(
    "error",
    [
        AgentCannotStart("claude refuses to run as root\n(see its stderr)"),
        ExceptionGroup("from a nursery", [AgentCannotStart("no"), AgentCannotStart("no")]),
    ],
)
async def test_expected_failure_is_logged_in_one_line(autojump_clock, caplog, error):
    child = Fake("w", [])
    sup = Supervisor("top", [child.spec()])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            child.crash(error)
            await settle()
            sup.request_stop()
    [record] = crash_records(caplog)
    assert record.exc_info is None and record.levelno == logging.WARNING
    assert "\n" not in record.getMessage() and "AgentCannotStart" in record.getMessage()
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    "error", [Crash("a bug"), ExceptionGroup("mixed", [AgentCannotStart("no"), Crash("a bug")])]
)
async def test_unexpected_crash_is_logged_with_its_traceback(autojump_clock, caplog, error):
    child = Fake("w", [])
    sup = Supervisor("top", [child.spec()])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            child.crash(error)
            await settle()
            sup.request_stop()
    [record] = crash_records(caplog)
    assert record.exc_info is not None and record.exc_info[1] is error
    assert "Traceback" in caplog.text


async def test_a_sub_supervisor_giving_up_is_one_line_in_its_parent(autojump_clock, caplog):
    w = Fake("w", [], lifetimes=[1])
    pool = Supervisor("pool", [w.spec()], intensity=0)
    top = Supervisor("top", [ChildSpec("pool", pool.run, request_stop=pool.request_stop)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(top.run)
            await trio.sleep(1.5)
            top.request_stop()
    [record] = [r for r in caplog.records if r.getMessage().startswith("top: child 'pool'")]
    assert record.exc_info is None and "TooManyRestarts" in record.getMessage()
