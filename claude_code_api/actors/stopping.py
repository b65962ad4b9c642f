"""A graceful-stop request for one actor: OTP's shutdown signal, before the kill.

A supervisor calls :meth:`StopSignal.request_stop` (a ``ChildSpec.request_stop``
hook); the actor wraps each phase that may have to end early in
:meth:`StopSignal.guard`. A guarded running turn is interrupted and still
answered (partial output, ``success: false``); a guarded idle wait just ends.
If the actor has not finished when the supervisor's grace runs out, the
supervisor cancels it outright.

It is owned by the actor's spec and only ever touched from the trio thread.
"""

from __future__ import annotations

from collections.abc import Iterator
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
