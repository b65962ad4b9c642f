"""A graceful-stop request for one actor: OTP's shutdown signal, before the kill.

A supervisor calls :meth:`StopSignal.request_stop` (through :class:`Stoppable`, the
child it serves); the actor wraps each phase that may have to end early in
:meth:`StopSignal.guard`. A guarded running turn is interrupted and still
answered (partial output, ``success: false``); a guarded idle wait just ends.
If the actor has not finished when the supervisor's grace runs out, the
supervisor cancels it outright.

It is owned by the actor's spec and only ever touched from the trio thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext

import trio


class StopSignal:
    def __init__(self) -> None:
        self.requested = False
        self._guarded: set[trio.CancelScope] = set()

    def request_stop(self) -> None:
        self.requested = True
        for scope in self._guarded:
            scope.cancel()

    @contextmanager
    def guard(self, scope: trio.CancelScope | None = None) -> Iterator[trio.CancelScope]:
        """Enter ``scope`` (a new one by default), cancelled as soon as a stop is requested.

        A scope passed in is not entered here (its owner enters it); it is only
        cancelled on a stop.
        """
        owned = scope is None
        guarded = trio.CancelScope() if scope is None else scope
        self._guarded.add(guarded)
        if self.requested:
            guarded.cancel()
        try:
            with guarded if owned else nullcontext():
                yield guarded
        finally:
            self._guarded.discard(guarded)


class Stoppable:
    """An actor (``ChildSpec.actor``) made of a function that runs until its stop signal.

    ``run(stop, task_status=...)`` is served once with a :class:`StopSignal` of this
    incarnation's own (``on_stop`` is called too when the stop is requested): a restart makes a new ``Stoppable`` (its supervisor calls the
    factory again), so a stop requested of the last one never reaches the next.
    """

    def __init__(
        self, run: Callable[..., Awaitable[None]], on_stop: Callable[[], object] | None = None
    ) -> None:
        self._run = run
        self._on_stop = on_stop  # (e.g. close the inbox an actor drains, then ends)
        self.stop = StopSignal()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._run(self.stop, task_status=task_status)

    def request_stop(self) -> None:
        self.stop.request_stop()
        if self._on_stop is not None:
            self._on_stop()
