"""A one_for_one supervisor for trio, after Erlang/OTP's ``supervisor``.

A `Supervisor` starts its children in order, restarts only the child that died
(according to its `Restart` type), escalates with `TooManyRestarts` when
children die faster than ``intensity`` per ``period`` (or, with a `Backoff`,
delays restarts instead), and stops its children in reverse order.

A supervisor is itself a child: ``ChildSpec("pool", sup.run, request_stop=sup.request_stop)``.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

import attrs
import trio

log = logging.getLogger(__name__)


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after an abnormal exit (an exception)
    TEMPORARY = "temporary"  # never restarted; its exit is only logged


@attrs.frozen
class ChildSpec:
    """How to start and stop one child.

    ``start`` is awaited as ``await start(task_status=ts)`` and must call
    ``ts.started()`` once ready. ``request_stop`` asks the child to finish; it
    is then cancelled ``shutdown_grace`` seconds later. Without a hook the
    child is cancelled at once.
    """

    name: str
    start: Callable[..., Awaitable[object]]
    restart: Restart = Restart.PERMANENT
    shutdown_grace: float = 5.0
    request_stop: Callable[[], object] | None = None


@attrs.frozen
class ChildExit:
    """Message: a child ended; ``reason`` is its exception, or None for a normal return."""

    name: str
    reason: BaseException | None


@attrs.frozen
class Backoff:
    """Crash-loop policy: delay excess restarts by initial, ×factor, ... up to cap seconds."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0


class TooManyRestarts(Exception):
    """Children died faster than the supervisor's intensity allows; carries the last exit."""

    def __init__(self, supervisor: str, last_exit: ChildExit) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: too many restarts; child {last_exit.name!r} "
            f"exited with {last_exit.reason!r}"
        )
        self.last_exit = last_exit


@attrs.define(eq=False)
class _Child:
    """Run-time state of one child; the runner owns ``scope`` and ``done``."""

    spec: ChildSpec
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None  # set when the current incarnation has fully ended


@attrs.define(eq=False)
class _WatchedStatus:
    """Forwards ``started()`` and remembers that it happened."""

    inner: trio.TaskStatus[object]
    called: bool = False

    def started(self, value: object = None) -> None:
        self.called = True
        self.inner.started(value)


class Supervisor:
    """Owns a nursery with its children in it, and decides what happens when one ends.

    Error handling: a child's ``Exception`` never reaches the nursery; the
    runner reports it as a `ChildExit` and the supervisor restarts the child,
    ignores its exit, or gives up. Giving up (intensity exceeded, no backoff)
    stops the remaining children in reverse order and raises `TooManyRestarts`
    from `run`. A child failing before ``started()`` during the initial start
    makes `run` raise that exception, after stopping the children already up.
    Cancellation from outside cancels everything, as usual in trio.

    Intensity and backoff are counted across all children, as in OTP.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        *,
        intensity: int = 3,
        period: float = 5.0,
        backoff: Backoff | None = None,
    ) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"supervisor {name!r}: duplicate child names in {names}")
        self.name = name
        self._specs = list(children)
        self._intensity = intensity
        self._period = period
        self._backoff = backoff
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
        self._pending: dict[str, float] = {}  # child name -> time of its delayed restart

    @property
    def backing_off_until(self) -> float | None:
        return min(self._pending.values(), default=None)

    @property
    def last_failure(self) -> ChildExit | None:
        return self._last_failure

    def request_stop(self) -> None:
        """Ask `run` to stop all children (reverse order, with grace) and return."""
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
                self._send = send
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
                await self._stop_children()
        finally:
            self._running = False
            self._stop_requested = False  # consumed; a later run() starts fresh
        if failure is not None:
            raise failure

    async def _run_child(self, child: _Child, *, task_status: trio.TaskStatus[None]) -> None:
        """Run one incarnation of a child and report how it ended.

        Before ``started()`` an exception propagates to whoever is starting
        the child (start_link); after it, it becomes a `ChildExit`.
        """
        child.done = done = trio.Event()
        status = _WatchedStatus(task_status)
        reason: Exception | None = None
        try:
            try:
                with trio.CancelScope() as child.scope:
                    await child.spec.start(task_status=status)
            except Exception as exc:  # never Cancelled: that is a BaseException
                if not status.called:
                    raise
                reason = exc
            if not status.called:  # returned without started(): started, then exited
                task_status.started()
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._send.send(ChildExit(child.spec.name, reason))
        finally:
            done.set()

    async def _supervise(self) -> None:
        """Handle exits and due restarts until cancelled by `request_stop`."""
        while True:
            exit_ = None
            # Waiting for the next exit, but no later than the next delayed restart.
            next_due = self.backing_off_until
            with trio.move_on_at(math.inf if next_due is None else next_due):
                exit_ = await self._recv.receive()
            if exit_ is not None:
                await self._handle_exit(exit_)
            now = trio.current_time()
            for name in [n for n, due in self._pending.items() if due <= now]:
                del self._pending[name]
                if (failed := await self._restart(self._children[name])) is not None:
                    await self._handle_exit(failed)

    async def _handle_exit(self, exit_: ChildExit | None) -> None:
        """Apply the child's restart type: restart now, later, not at all, or escalate."""
        while exit_ is not None:  # loops while restarts fail to start
            spec = self._children[exit_.name].spec
            if exit_.reason is None:
                log.info("%s: child %r exited normally", self.name, spec.name)
            else:
                self._last_failure = exit_
                log.warning(
                    "%s: child %r crashed: %r",
                    self.name,
                    spec.name,
                    exit_.reason,
                    exc_info=exit_.reason,
                )
            if spec.restart is Restart.TEMPORARY or (
                spec.restart is Restart.TRANSIENT and exit_.reason is None
            ):
                return
            delay = self._admit_restart(exit_)
            if delay > 0:
                self._pending[spec.name] = trio.current_time() + delay
                log.warning("%s: crash loop; restarting %r in %.3g s", self.name, spec.name, delay)
                return
            exit_ = await self._restart(self._children[spec.name])

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

    async def _restart(self, child: _Child) -> ChildExit | None:
        """Start the child again; a failure to start is returned as its exit."""
        now = trio.current_time()
        self._restarts.append(now)
        self._last_restart = now
        log.info("%s: restarting child %r", self.name, child.spec.name)
        try:
            await self._nursery.start(self._run_child, child)
        except Exception as exc:
            return ChildExit(child.spec.name, exc)
        return None

    async def _stop_children(self) -> None:
        """Stop running children one at a time, in reverse start order."""
        for child in reversed(self._children.values()):
            if child.scope is None or child.done is None or child.done.is_set():
                continue
            hook = child.spec.request_stop
            if hook is None:
                child.scope.cancel()
            else:
                try:
                    hook()
                    child.scope.deadline = trio.current_time() + child.spec.shutdown_grace
                except Exception:
                    log.exception(
                        "%s: stop hook of %r failed; cancelling", self.name, child.spec.name
                    )
                    child.scope.cancel()
            await child.done.wait()
