"""A supervisor for trio, after Erlang/OTP's ``supervisor``.

A `Supervisor` starts its children in order and decides what happens when one
ends, as OTP does:

- **Restart type** of the child that ended (`Restart`): a permanent child is
  always restarted, a transient one only after an exception, a temporary one
  never. A child that is not restarted disturbs nobody: its siblings go on.
- **Strategy** (`Strategy`), when the child is to be restarted: one_for_one
  restarts only that child; rest_for_one first stops the children started
  after it (they depend on it), then starts it and them again in start order;
  one_for_all does the same with every child. Siblings taken down this way
  are stopped as at shutdown (their ``request_stop`` hook and grace); the
  restart starts every one of them that is not temporary, even a transient
  one that had already finished, and leaves temporary ones stopped.
- **Intensity**: one restart per event, however many children it starts.
  More than ``intensity`` restarts within ``period`` seconds stops every child
  and raises `TooManyRestarts` -- or, with a `Backoff`, delays each further
  restart, longer each time, until a quiet ``period`` has passed. A restart
  that fails to start counts as one more event.
- **Stopping** (`StopOrder`): one at a time in reverse start order, each child
  given its own grace (what a tree with dependencies needs), or all asked at
  once and each cancelled at its own grace counted from that same moment, so
  the whole stop takes the largest grace, not their sum (a pool of peers).

Each incarnation of a child is a new call of ``ChildSpec.start`` (or a new
object from ``ChildSpec.actor``), so a restarted child starts from fresh
state as long as its state is created there, not captured from outside. A
supervisor is itself a child, and starts afresh in every `Supervisor.run`:
``ChildSpec("pool", actor=lambda: Supervisor("pool", [...]))``.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, Protocol, cast

import attrs
import trio

log = logging.getLogger(__name__)


class Strategy(enum.Enum):
    """Which children a restart takes down and brings back (OTP's restart strategies)."""

    ONE_FOR_ONE = "one_for_one"  # only the child that ended
    REST_FOR_ONE = "rest_for_one"  # that child and every child started after it
    ONE_FOR_ALL = "one_for_all"  # every child


class Restart(enum.Enum):
    """When a child that ended is restarted."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit (an exception)
    TEMPORARY = "temporary"  # never; its exit is only logged


class StopOrder(enum.Enum):
    """How a supervisor stops several children: at shutdown, or for a restart."""

    REVERSE = "reverse"  # one at a time, last started first, each after the one before ended
    TOGETHER = "together"  # all asked at once, each cancelled at its own grace from that moment


class ExpectedFailure(Exception):
    """An operational failure a supervisor expects to see, such as an agent that cannot start.

    A child that ends with one (or with an exception group holding only these)
    is logged in one line without a traceback: a crash loop then says what is
    wrong once per attempt instead of burying it. Any other exception is
    logged with its traceback.
    """


class StartChild(Protocol):
    """``async def start(*, task_status)``: run one incarnation of a child.

    It calls ``task_status.started()`` once ready (the value is ignored) and
    runs until it is done, cancelled, or asked to stop.
    """

    def __call__(self, *, task_status: trio.TaskStatus[Any]) -> Awaitable[object]: ...


class Actor(Protocol):
    """A child as an object: served once, then thrown away (``ChildSpec.actor`` makes a new one)."""

    async def serve(self, *, task_status: trio.TaskStatus[Any]) -> None: ...

    def request_stop(self) -> None: ...


StopHook = Callable[[], object]


@attrs.frozen
class ChildSpec:
    """How to start and stop one child; give either ``start`` or ``actor``.

    ``start`` is called for every incarnation as ``await start(task_status=ts)``
    and must call ``ts.started()`` once ready. Create the child's state inside
    it: a bound method such as ``dispatcher.serve`` would make every restart
    reuse the object that crashed. ``request_stop`` asks the running child to
    finish; the same hook serves every incarnation, so it must reach the
    current one and must not break the next one (a latched event or a closed
    channel would stop a restarted child at once). Without a hook the child is
    cancelled at once.

    ``actor`` is called for every incarnation and returns a new `Actor`; the
    supervisor serves it and stops it with that object's own ``request_stop``.

    The supervisor calls the stop hook when it stops the child: at shutdown,
    when it gives up, and when a sibling's restart takes the child down
    (rest_for_one, one_for_all). The child is cancelled ``shutdown_grace``
    seconds after that, if it has not finished by then.
    """

    name: str
    start: StartChild | None = None
    restart: Restart = Restart.PERMANENT
    shutdown_grace: float = 5.0
    request_stop: StopHook | None = None
    actor: Callable[[], Actor] | None = None

    def __attrs_post_init__(self) -> None:
        if (self.start is None) == (self.actor is None):
            raise ValueError(f"child {self.name!r}: give exactly one of start and actor")
        if self.actor is not None and self.request_stop is not None:
            raise ValueError(f"child {self.name!r}: an actor is stopped by its own request_stop")


@attrs.frozen
class ChildExit:
    """Message: a child ended; ``reason`` is its exception, or None for a normal return."""

    name: str
    reason: Exception | None


@attrs.frozen
class Backoff:
    """Crash-loop policy: delay excess restarts by initial, ×factor, ... up to cap seconds."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0


class TooManyRestarts(ExpectedFailure):
    """Children died faster than the supervisor's intensity allows; carries the last exit.

    Expected by a parent supervisor: the crashes behind it were already logged
    by the supervisor that gave up.
    """

    def __init__(self, supervisor: str, last_exit: ChildExit) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: too many restarts; child {last_exit.name!r} "
            f"exited with {last_exit.reason!r}"
        )
        self.last_exit = last_exit


@attrs.define(eq=False)
class _Incarnation:
    """One run of a child; its runner owns ``scope`` and sets ``done`` when it has fully ended."""

    request_stop: StopHook | None
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    returned: bool = False  # it has ended; only its report may still be on its way
    stopping: bool = False  # the supervisor is stopping it on purpose: no report wanted


@attrs.define(eq=False)
class _Child:
    """Run-time state of one child: its spec and its current incarnation."""

    spec: ChildSpec
    current: _Incarnation | None = None

    @property
    def running(self) -> _Incarnation | None:
        """The current incarnation, unless it has ended."""
        if self.current is None or self.current.done.is_set():
            return None
        return self.current


@attrs.define(eq=False)
class _WatchedStatus:
    """Forwards ``started()`` and remembers that it happened."""

    inner: trio.TaskStatus[Any]
    called: bool = False

    def started(self, value: object = None) -> None:
        self.called = True
        self.inner.started(value)


def _is_expected(reason: BaseException) -> bool:
    """An `ExpectedFailure`, or a group of nothing else (a nursery inside the child)."""
    if isinstance(reason, BaseExceptionGroup):
        group = cast("BaseExceptionGroup[BaseException]", reason)  # isinstance forgets the type
        return all(_is_expected(inner) for inner in group.exceptions)
    return isinstance(reason, ExpectedFailure)


class Supervisor:
    """Owns a nursery with its children in it, and decides what happens when one ends.

    Error handling: a child's ``Exception`` never reaches the nursery; the
    runner reports it as a `ChildExit` and the supervisor restarts children,
    ignores the exit, or gives up. Giving up (intensity exceeded, no backoff)
    stops the remaining children and raises `TooManyRestarts` from `run`. A
    child failing before ``started()`` during the initial start makes `run`
    raise that exception, after stopping the children already up.
    Cancellation from outside cancels everything, as usual in trio.

    Intensity and backoff are counted across all children, as in OTP.
    ``on_restart(name)`` is told of every child started again (for metrics).
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: int = 3,
        period: float = 5.0,
        backoff: Backoff | None = None,
        stop_order: StopOrder = StopOrder.REVERSE,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"supervisor {name!r}: duplicate child names in {names}")
        self.name = name
        self._specs = list(children)
        self._strategy = strategy
        self._intensity = intensity
        self._period = period
        self._backoff = backoff
        self._stop_order = stop_order
        self._on_restart = on_restart
        self._stop_requested = False
        self._stop_scope: trio.CancelScope | None = None
        self._running = False
        self._last_failure: ChildExit | None = None
        self._reset()

    def _reset(self) -> None:
        # A restarted supervisor (e.g. a nested one) starts with a clean slate.
        self._children = {spec.name: _Child(spec) for spec in self._specs}
        self._restarts: list[float] = []  # trio times of recent restarts
        self._last_restart = -math.inf
        self._delay: float | None = None  # next backoff delay; None = not in a crash loop
        self._pending: dict[str, float] = {}  # dead child's name -> time of its delayed restart

    @property
    def backing_off_until(self) -> float | None:
        return min(self._pending.values(), default=None)

    @property
    def last_failure(self) -> ChildExit | None:
        return self._last_failure

    def request_stop(self) -> None:
        """Ask `run` to stop all children (in the supervisor's `StopOrder`) and return."""
        self._stop_requested = True
        if self._stop_scope is not None:
            self._stop_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children, supervise them until stopped, then stop them."""
        if self._running:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        self._running = True
        self._reset()
        self._stop_scope = trio.CancelScope()
        if self._stop_requested:  # asked before we were running
            self._stop_scope.cancel()
        failure: Exception | None = None
        try:
            send, self._recv = trio.open_memory_channel[ChildExit](0)
            async with send, trio.open_nursery() as self._nursery:
                self._send: trio.MemorySendChannel[ChildExit] = send
                try:
                    for child in self._children.values():
                        await self._nursery.start(self._run_child, child)
                    task_status.started()
                    with self._stop_scope:
                        await self._supervise()
                # Re-raised below, outside the nursery, so callers get it bare, not in a group.
                except Exception as exc:
                    failure = exc
                # Runners still reporting an exit find nobody listening, and move on.
                self._recv.close()
                self._pending.clear()
                await self._stop(list(self._children.values()))
        finally:
            self._running = False
            self._stop_requested = False  # consumed; a later run() starts fresh
        if failure is not None:
            raise failure

    serve = run  # the `Actor` protocol's name, so ``ChildSpec(actor=lambda: Supervisor(...))``

    async def _run_child(self, child: _Child, *, task_status: trio.TaskStatus[Any]) -> None:
        """Run one incarnation of a child and report how it ended.

        Before ``started()`` an exception propagates to whoever is starting
        the child (start_link); after it, it becomes a `ChildExit`.
        """
        spec = child.spec
        if spec.actor is not None:
            actor = spec.actor()
            start: StartChild = actor.serve
            incarnation = _Incarnation(actor.request_stop)
        else:
            assert spec.start is not None
            start, incarnation = spec.start, _Incarnation(spec.request_stop)
        child.current = incarnation
        status = _WatchedStatus(task_status)
        try:
            with incarnation.scope:
                reason: Exception | None = None
                try:
                    await start(task_status=status)
                except Exception as exc:  # never Cancelled: that is a BaseException
                    if not status.called:
                        raise
                    reason = exc
                if not status.called:  # returned without started(): started, then exited
                    task_status.started()
                incarnation.returned = True
                # Still inside the scope: a supervisor that stops this child on
                # purpose cancels a report it has not taken yet, so it never
                # receives an exit from an incarnation it already replaced.
                if not incarnation.stopping:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._send.send(ChildExit(spec.name, reason))
        finally:
            incarnation.done.set()

    async def _supervise(self) -> None:
        """Handle exits and due restarts until cancelled by `request_stop`."""
        while True:
            exit_ = None
            # Waiting for the next exit, but no later than the next delayed restart.
            next_due = self.backing_off_until
            with trio.move_on_at(math.inf if next_due is None else next_due):
                exit_ = await self._recv.receive()
            if exit_ is not None:
                self._children[exit_.name].current = None  # that incarnation is over
                await self._handle_exit(exit_)
            now = trio.current_time()
            for child in list(self._children.values()):  # due restarts, in start order
                due = self._pending.get(child.spec.name)
                if due is not None and due <= now:
                    del self._pending[child.spec.name]
                    await self._handle_exit(await self._restart(child))

    async def _handle_exit(self, exit_: ChildExit | None) -> None:
        """Apply the child's restart type: restart now, later, not at all, or escalate."""
        while exit_ is not None:  # loops while restarts fail to start
            dead = self._children[exit_.name]
            self._log_exit(exit_)
            if dead.spec.restart is Restart.TEMPORARY or (
                dead.spec.restart is Restart.TRANSIENT and exit_.reason is None
            ):
                return  # not restarted, so nobody else is disturbed either
            delay = self._admit_restart(exit_)
            group = self._group(dead)
            await self._stop([child for child in group if child is not dead])
            for child in group:  # this restart brings them back: theirs are superseded
                self._pending.pop(child.spec.name, None)
            if delay > 0:
                self._pending[dead.spec.name] = trio.current_time() + delay
                log.warning("%s: crash loop; restarting %r in %.3g s", self.name, exit_.name, delay)
                return
            exit_ = await self._restart(dead)

    def _log_exit(self, exit_: ChildExit) -> None:
        if exit_.reason is None:
            log.info("%s: child %r exited normally", self.name, exit_.name)
            return
        self._last_failure = exit_
        if _is_expected(exit_.reason):
            log.warning("%s: child %r failed: %r", self.name, exit_.name, exit_.reason)
        else:
            log.warning(
                "%s: child %r crashed: %r",
                self.name,
                exit_.name,
                exit_.reason,
                exc_info=exit_.reason,
            )

    def _group(self, dead: _Child) -> list[_Child]:
        """The children that the restart of ``dead`` takes down and brings back, in start order."""
        children = list(self._children.values())
        match self._strategy:
            case Strategy.ONE_FOR_ONE:
                return [dead]
            case Strategy.REST_FOR_ONE:
                return children[children.index(dead) :]
            case Strategy.ONE_FOR_ALL:
                return children

    def _admit_restart(self, exit_: ChildExit) -> float:
        """Return how long to delay this restart (0 = now), or raise `TooManyRestarts`."""
        now = trio.current_time()
        if self._delay is not None and now - self._last_restart >= self._period:
            self._delay = None  # a quiet period since the last restart: the loop is over
        self._restarts = [t for t in self._restarts if t > now - self._period]
        if self._delay is None and len(self._restarts) < self._intensity:
            return 0.0
        if self._backoff is None:
            log.error("%s: too many restarts (last: %r); giving up", self.name, exit_)
            raise TooManyRestarts(self.name, exit_) from exit_.reason
        # Once in a crash loop, every restart is delayed, each longer, until it is quiet again.
        delay = min(self._delay or self._backoff.initial, self._backoff.cap)
        self._delay = min(delay * self._backoff.factor, self._backoff.cap)
        return delay

    async def _restart(self, dead: _Child) -> ChildExit | None:
        """Start again, in order, the children that ``dead``'s restart brings back: one restart.

        A failure to start is returned as the exit of the child that failed.
        """
        now = trio.current_time()
        self._restarts.append(now)
        self._last_restart = now
        for child in self._group(dead):
            if child.running is not None or (
                child is not dead and child.spec.restart is Restart.TEMPORARY
            ):
                continue
            log.info("%s: restarting child %r", self.name, child.spec.name)
            if self._on_restart is not None:
                self._on_restart(child.spec.name)
            try:
                await self._nursery.start(self._run_child, child)
            except Exception as exc:
                return ChildExit(child.spec.name, exc)
        return None

    async def _stop(self, children: Sequence[_Child]) -> None:
        """Stop those of ``children`` (in start order) that are up, as the `StopOrder` says."""
        up = [(c.spec, running) for c in children if (running := c.running) is not None]
        if self._stop_order is StopOrder.TOGETHER:
            for spec, incarnation in reversed(up):
                self._ask_to_stop(spec, incarnation)
            for _, incarnation in up:
                await incarnation.done.wait()
        else:
            for spec, incarnation in reversed(up):
                self._ask_to_stop(spec, incarnation)
                await incarnation.done.wait()

    def _ask_to_stop(self, spec: ChildSpec, incarnation: _Incarnation) -> None:
        """Call the child's stop hook and set its kill deadline; or cancel it at once."""
        if incarnation.stopping:  # asked already (a restart's stop, then a shutdown)
            return
        incarnation.stopping = True
        if incarnation.returned or incarnation.request_stop is None:
            incarnation.scope.cancel()  # nothing to wait for: it ended, or has no hook
            return
        try:
            incarnation.request_stop()
        except Exception:
            log.exception("%s: stop hook of %r failed; cancelling", self.name, spec.name)
            incarnation.scope.cancel()
            return
        incarnation.scope.deadline = min(
            incarnation.scope.deadline, trio.current_time() + spec.shutdown_grace
        )
