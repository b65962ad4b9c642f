"""Session leases actor: a session is live on one replica at a time, and moves on request.

With ``DATABASE_URL``, every session actor runs under its session's lease
(:meth:`SessionLeases.hold`, around the whole actor): it takes the lease before it reads
the session's record, and releases it when it ends (hibernated, closed, failed). A
session whose lease another replica holds is *asked for*: a hand-over request goes to
the holder (NOTIFY, :mod:`claude_code_api.store.wakeups`), which hibernates the session
at its next turn boundary once no turn of it waits there (:class:`HandOverSession` to
its dispatcher), so its actor ends and releases the lease; the release's notice wakes
the asker, which takes the lease and resumes the conversation (its record and transcript
come from PostgreSQL). A replica that died holds its leases no longer than
``SESSION_LEASE_S``: the asker then takes the expired lease. Two turns of one session
sent to two replicas are so served one after the other.

What :meth:`serve` runs: the :class:`~.lease_keeper.LeaseKeeper` (renewals), the wake-up
listener, and two loops: hand-over requests addressed here and losses of leases (the
keeper could not renew one: the session must stop before another replica takes it) both
become :class:`HandOverSession` to the dispatcher; release notices wake the sessions
waiting for them.

Channels: it sends on its own clone of the dispatcher's inbox (closed when it ends); it
owns the wake-ups channel between the listener and its loop.

Error handling: a lease that cannot be had within ``wait_s`` (the holder neither hands
over nor dies), or a database that does not answer, fails the session's start with a 503
for the turns waiting on it (:class:`~.session.SessionFailed`). A release that fails is
logged: the lease expires by itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..messages import DispatcherMessage, HandOverSession, JobFailed, SessionKey
from ..store.database import Database, DatabaseUnavailable
from ..store.leases import Held, Lease, LeaseTable, key_digest
from ..store.wakeups import HandOverRequest, Released, Resumed, Wakeup, notify, serve_wakeups
from .lease_keeper import LeaseKeeper, ThreadedLeases
from .session import SessionFailed

log = logging.getLogger(__name__)

# The release when a session ends: one database call, bounded.
RELEASE_TIMEOUT_S = 10.0


class SessionLeases:
    """This replica's side of session leases (see the module docstring), as ``owner``.

    ``database`` opens the pool (blocking; the schema brought up to date) and ``url`` is
    the same database, for the listener. Leases last ``ttl_s`` (``SESSION_LEASE_S``);
    ``wait_s`` bounds how long a session's start waits for another replica's lease (its
    holder handing over, or the lease expiring). :meth:`serve` makes a fresh keeper at
    each (re)start: the previous one released what it held as it ended.
    """

    def __init__(
        self,
        database: Callable[[], Database],
        url: str,
        owner: str,
        ttl_s: float,
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
        wait_s: float,
        on_health: Callable[[str | None], None] = lambda failure: None,
    ) -> None:
        self._open_database = database
        self.url = url
        self.owner = owner
        self.ttl_s = ttl_s
        self.dispatcher = dispatcher
        self.wait_s = wait_s
        self._on_health = on_health
        self._database: Database | None = None
        self._keeper: LeaseKeeper | None = None
        # Sessions waiting for another replica's release, by key digest (hex).
        self._released: dict[str, trio.Event] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the leases, listen for wake-ups and act on them until cancelled."""
        database = await trio.to_thread.run_sync(self._open_database)
        keeper = LeaseKeeper(ThreadedLeases(LeaseTable(database)), self.owner, self.ttl_s)
        self._database, self._keeper = database, keeper
        send, receive = trio.open_memory_channel[Wakeup](math.inf)
        async with self.dispatcher.clone() as dispatcher, trio.open_nursery() as nursery:
            await nursery.start(keeper.serve)
            await nursery.start(serve_wakeups, self.url, self.owner, send)
            nursery.start_soon(self._on_wakeups, receive, dispatcher)
            nursery.start_soon(self._on_losses, keeper, dispatcher)
            nursery.start_soon(self._check_database, database)
            task_status.started()

    @asynccontextmanager
    async def hold(self, key: SessionKey) -> AsyncIterator[Lease]:
        """Within: ``key``'s lease is this replica's; released on the way out."""
        keeper, database = self._keeper, self._database
        if keeper is None or database is None:
            raise SessionFailed(JobFailed(503, "session store unavailable: leases not ready"))
        lease = await self._acquire(key, keeper, database)
        try:
            yield lease
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + RELEASE_TIMEOUT_S):
                try:
                    await keeper.release(key)
                except DatabaseUnavailable as exc:
                    log.warning("session %s: its lease was not released (%s)", key, exc)

    async def _acquire(self, key: SessionKey, keeper: LeaseKeeper, database: Database) -> Lease:
        digest = key_digest(key).hex()
        deadline = trio.current_time() + self.wait_s
        while True:
            # Listening before asking: a release that comes at once is not missed.
            released = self._released.setdefault(digest, trio.Event())
            try:
                outcome = await keeper.acquire(key)
                if isinstance(outcome, Lease):
                    return outcome
                await self._ask(database, outcome, digest, deadline)
            except DatabaseUnavailable as exc:
                self._on_health(f"session store unavailable: {exc}")
                raise SessionFailed(JobFailed(503, f"session store unavailable: {exc}")) from exc
            with trio.move_on_at(min(deadline, trio.current_time() + outcome.remaining_s)):
                await released.wait()
            if self._released.get(digest) is released:
                del self._released[digest]

    async def _ask(self, database: Database, held: Held, digest: str, deadline: float) -> None:
        """Ask ``held``'s owner to hand the session over; SessionFailed past ``deadline``."""
        if trio.current_time() >= deadline:
            raise SessionFailed(
                JobFailed(
                    503,
                    f"session {held.key.session_id!r} is live on another replica, which did"
                    f" not hand it over within {self.wait_s:g} s",
                )
            )
        log.info("session %s: live on %s; asking it to hand the session over", held.key, held.owner)
        await notify(database, HandOverRequest(held.owner, digest))

    async def _on_wakeups(
        self,
        wakeups: trio.MemoryReceiveChannel[Wakeup],
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
    ) -> None:
        async with wakeups:
            async for wakeup in wakeups:
                match wakeup:
                    case HandOverRequest(digest=digest):
                        key = None if self._keeper is None else self._keeper.key_for(digest)
                        if key is not None:
                            await dispatcher.send(HandOverSession(key))
                    case Released(digest=digest):
                        event = self._released.pop(digest, None)
                        if event is not None:
                            event.set()
                    case Resumed():  # notices may have been missed: everyone looks again
                        for event in self._released.values():
                            event.set()
                        self._released.clear()

    async def _check_database(self, database: Database) -> None:
        """Every third of a lease, whether the database answers: ``/health`` says so."""
        while True:
            try:
                await database.run(lambda connection: connection.execute("SELECT 1"))
                self._on_health(None)
            except DatabaseUnavailable as exc:
                self._on_health(f"session store unavailable: {exc}")
            await trio.sleep(self.ttl_s / 3)

    async def _on_losses(
        self, keeper: LeaseKeeper, dispatcher: trio.MemorySendChannel[DispatcherMessage]
    ) -> None:
        async for lost in keeper.lost:
            log.warning(
                "session %s: its lease is lost (%s); stopping it", lost.lease.key, lost.reason
            )
            await dispatcher.send(HandOverSession(lost.lease.key))
