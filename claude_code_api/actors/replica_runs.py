"""Runs across replicas: every replica's runs in PostgreSQL, and cancels sent to their owner.

With ``DATABASE_URL``, each replica records its dispatcher's queued and running runs in
the ``runs`` table (:mod:`claude_code_api.store.runs`) under its owner id (the one its
session leases are held under), so that ``/status`` on any replica lists a user's runs on
all of them (:meth:`ReplicaRuns.runs_of`) and ``DELETE /runs/{runId}`` on any replica
reaches the one that runs it (:meth:`ReplicaRuns.cancel`): a :class:`CancelRequest` NOTIFY
to that replica, whose :class:`ReplicaRuns` turns it into its own dispatcher's
:class:`~claude_code_api.messages.CancelRun` and answers with a :class:`CancelReply`.

The dispatcher never waits for the database: it only sets :attr:`PoolView.changed` at
each turn of its loop. :meth:`ReplicaRuns.serve`'s recorder then reads the runs (on the
trio thread, from the dispatcher's state as :class:`PoolView` publishes it) and writes
the difference from what it wrote last, one transaction at a time in a worker thread;
changes made while a write is in flight go in the next one (a run queued and answered
meanwhile is never written). So the table lags the dispatcher by about one write, and a
run that just started may be unknown to another replica for that long. The same write
renews this replica's ``replicas`` row at least every third of ``SESSION_LEASE_S``: a
replica that died leaves rows that everyone ignores once that row expires.

What :meth:`serve` runs: the recorder, a wake-up listener on the run channels (a
connection of its own) and the loop acting on what it hears. At its end (the service
stopping) the replica's row and runs are deleted.

Channels: it sends on its own clone of the dispatcher's inbox (closed when it ends); it
owns the wake-ups channel between the listener and its loop.

Error handling: the database failing never reaches the dispatcher or a run: a failed
write is logged (once per outage) and retried every :data:`RETRY_S`, the next one
replacing all of this replica's rows. :meth:`runs_of` and :meth:`cancel` raise
:class:`~claude_code_api.store.StoreUnavailable` when the database does not answer.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from functools import partial

import trio

from ..http.jobs import cancel_run
from ..messages import DispatcherMessage, RunView
from ..store.database import Database, DatabaseUnavailable
from ..store.errors import StoreUnavailable
from ..store.runs import RunRow, Runs, RunTable, changed
from ..store.wakeups import (
    RUN_CHANNELS,
    CancelReply,
    CancelRequest,
    Wakeup,
    notify,
    serve_wakeups,
    user_digest,
)
from .dispatcher import PoolView

log = logging.getLogger(__name__)

# How long DELETE /runs/{runId} waits for the replica running the run to answer.
CANCEL_WAIT_S = 2.0
# Between two attempts to write while the database is away.
RETRY_S = 1.0
# The shutdown's clean-up: one database call, bounded.
LEAVE_TIMEOUT_S = 5.0


class ReplicaRuns:
    """This replica's side of runs across replicas (module docstring), as ``owner``.

    ``database`` opens the pool (blocking; the schema brought up to date) and ``url`` is
    the same database, for the listener; ``view`` is the dispatcher's published state;
    ``ttl_s`` how long the replica's row vouches for its runs (``SESSION_LEASE_S``).
    """

    def __init__(
        self,
        database: Callable[[], Database],
        url: str,
        owner: str,
        ttl_s: float,
        view: PoolView,
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
    ) -> None:
        self._open_database = database
        self.url = url
        self.owner = owner
        self.ttl_s = ttl_s
        self.view = view
        self.dispatcher = dispatcher
        self._table: RunTable | None = None
        # Cancels sent to other replicas and not answered yet, by request id.
        self._asked: dict[str, trio.MemorySendChannel[bool]] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record the runs and answer cancels until cancelled; then leave the table."""
        table = RunTable(await trio.to_thread.run_sync(self._open_database))
        send, receive = trio.open_memory_channel[Wakeup](math.inf)
        try:
            async with self.dispatcher.clone() as dispatcher, trio.open_nursery() as nursery:
                await nursery.start(self._record, table)
                listen = partial(serve_wakeups, self.url, self.owner, send, channels=RUN_CHANNELS)
                await nursery.start(listen)
                nursery.start_soon(self._on_wakeups, receive, dispatcher, nursery)
                self._table = table
                task_status.started()
        finally:
            self._table = None
            with trio.CancelScope(shield=True, deadline=trio.current_time() + LEAVE_TIMEOUT_S):
                try:
                    await trio.to_thread.run_sync(table.leave, self.owner)
                except DatabaseUnavailable as exc:
                    log.warning("runs: this replica's runs were not removed (%s)", exc)

    async def runs_of(self, user_id: str) -> tuple[RunView, ...]:
        """``user_id``'s runs on the other live replicas (none while not serving)."""
        table = self._table
        if table is None:
            return ()
        try:
            return await trio.to_thread.run_sync(table.runs_of, user_id, self.owner)
        except DatabaseUnavailable as exc:
            raise StoreUnavailable(f"run store unavailable: {exc}") from exc

    async def cancel(self, user_id: str, run_id: str) -> bool | None:
        """Cancel ``user_id``'s run ``run_id`` on the replica running it: True if it did,
        False if no live replica but this one has such a run (or it was over when asked),
        None if its replica did not answer within :data:`CANCEL_WAIT_S`."""
        table = self._table
        if table is None:
            raise StoreUnavailable("run store unavailable: not connected yet")
        try:
            owner = await trio.to_thread.run_sync(table.owner_of, user_id, run_id, self.owner)
            if owner is None:
                return False
            request = secrets.token_hex(8)
            send, receive = trio.open_memory_channel[bool](1)
            self._asked[request] = send  # before asking: the answer may come at once
            try:
                asked = CancelRequest(owner, run_id, user_digest(user_id), self.owner, request)
                await notify(table.database, asked)
                with trio.move_on_after(CANCEL_WAIT_S):
                    return await receive.receive()
                log.warning("run %s: replica %s did not answer its cancel in time", run_id, owner)
                return None
            finally:
                del self._asked[request]
        except DatabaseUnavailable as exc:
            raise StoreUnavailable(f"run store unavailable: {exc}") from exc

    async def _record(
        self, table: RunTable, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the dispatcher's runs whenever they change, and renew the replica's row;
        started after the first write was tried (a failed one is retried: never blocks the
        service's start)."""
        written: Runs | None = None  # what the table holds for us (None: unknown)
        next_beat = trio.current_time()
        failing = False
        while True:
            now = {view.run_id: RunRow.of(view) for view in self.view.runs()}
            beat = trio.current_time() >= next_beat
            if beat or written is None or _differ(written, now):
                try:
                    sync = partial(table.sync, self.owner, self.ttl_s, written, now, forget=beat)
                    await trio.to_thread.run_sync(sync)
                except DatabaseUnavailable as exc:
                    if not failing:
                        log.warning("runs: not recorded (%s); retrying", exc)
                    failing, written = True, None
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    await trio.sleep(RETRY_S)
                    continue
                if failing:
                    log.info("runs: recorded again")
                written, failing = now, False
                if beat:
                    next_beat = trio.current_time() + self.ttl_s / 3
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
            with trio.move_on_at(next_beat):
                await self.view.wait_changed()

    async def _on_wakeups(
        self,
        wakeups: trio.MemoryReceiveChannel[Wakeup],
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
        nursery: trio.Nursery,
    ) -> None:
        async with wakeups:
            async for wakeup in wakeups:
                match wakeup:
                    case CancelRequest():
                        nursery.start_soon(self._cancel_here, wakeup, dispatcher)
                    case CancelReply(request=request, cancelled=cancelled):
                        waiting = self._asked.get(request)
                        if waiting is not None:
                            try:
                                waiting.send_nowait(cancelled)
                            except trio.WouldBlock:
                                pass  # (answered twice: the first one counts)

    async def _cancel_here(
        self, asked: CancelRequest, dispatcher: trio.MemorySendChannel[DispatcherMessage]
    ) -> None:
        """Another replica's DELETE of a run of ours: cancel it here, and answer."""
        # The run's user as this dispatcher knows it: the request names it by digest only.
        users = [v.user_id for v in self.view.runs() if v.run_id == asked.run_id]
        cancelled = False
        if users and user_digest(users[0]) == asked.user:
            cancelled = await cancel_run(dispatcher, users[0], asked.run_id)
        table = self._table
        if table is None:
            return
        try:
            await notify(table.database, CancelReply(asked.asker, asked.request, cancelled))
        except DatabaseUnavailable as exc:
            log.warning("run %s: the answer to a cancel was not sent (%s)", asked.run_id, exc)


def _differ(written: Runs, now: Runs) -> bool:
    if written.keys() != now.keys():
        return True
    return any(changed(row, now[run_id]) for run_id, row in written.items())
