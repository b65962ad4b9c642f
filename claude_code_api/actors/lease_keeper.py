"""Lease keeper actor: this replica's session leases, renewed while their sessions are live.

A session becomes live here only under a lease (:mod:`claude_code_api.store.leases`):
:meth:`LeaseKeeper.acquire` takes it, and from then on the keeper renews every lease it
holds every third of the lease's time to live (``SESSION_LEASE_S``), all in one call.
A lease it can no longer vouch for is *lost*, reported once on :attr:`LeaseKeeper.lost`
so that its session stops at once, before another replica may take the session over:

* :attr:`LossReason.TAKEN`: a renewal found it released, expired or another's;
* :attr:`LossReason.UNRENEWED`: no renewal succeeded before it expires. The keeper counts
  the time to live from the moment it *sent* the last successful call, so by its own clock
  it gives a lease up no later than the database's clock lets anyone else take it.

Ownership: the keeper owns the set of held leases and the sending side of
:attr:`LeaseKeeper.lost` (closed when :meth:`LeaseKeeper.serve` ends); its single consumer
(the session registry) owns the receiving side. The channel's buffer is unbounded on
purpose: each held lease is reported at most once, so it never holds more than the leases
held, and renewing never waits for the consumer. Session tasks call :meth:`acquire`,
:meth:`release` and :meth:`key_for` directly (one trio thread: no locks).

Error handling: :meth:`acquire` and :meth:`release` raise the database's
:class:`~claude_code_api.store.database.DatabaseUnavailable` to their caller (a lease
asked to be released is dropped here either way, and expires by itself). A failed renewal
is logged once per outage and retried at the next third; leases that reach their expiry
meanwhile are reported lost. At the end of :meth:`serve` (cancelled: the service
stopping) every lease of this owner is released, within :data:`RELEASE_ALL_TIMEOUT_S`;
if the database does not answer they expire by themselves.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Collection
from typing import Protocol

import attrs
import trio

from ..messages import SessionKey
from ..store.database import DatabaseUnavailable
from ..store.leases import Held, Lease, LeaseTable, key_digest

log = logging.getLogger(__name__)

# The shutdown's release of every lease: one database call, bounded by its connect timeout.
RELEASE_ALL_TIMEOUT_S = 10.0


class Leases(Protocol):
    """The lease table as the keeper calls it from trio (:class:`ThreadedLeases`, or a fake)."""

    async def acquire(self, key: SessionKey, owner: str, ttl_s: float) -> Lease | Held: ...

    async def renew(
        self, owner: str, keys: Collection[SessionKey], ttl_s: float
    ) -> set[SessionKey]: ...

    async def release(self, lease: Lease) -> bool: ...

    async def release_all(self, owner: str) -> int: ...


class ThreadedLeases:
    """A :class:`~claude_code_api.store.leases.LeaseTable` called from trio, each call in a
    worker thread (a cancelled caller waits for the call's transaction to end)."""

    def __init__(self, table: LeaseTable) -> None:
        self._table = table

    async def acquire(self, key: SessionKey, owner: str, ttl_s: float) -> Lease | Held:
        return await trio.to_thread.run_sync(self._table.acquire, key, owner, ttl_s)

    async def renew(
        self, owner: str, keys: Collection[SessionKey], ttl_s: float
    ) -> set[SessionKey]:
        return await trio.to_thread.run_sync(self._table.renew, owner, keys, ttl_s)

    async def release(self, lease: Lease) -> bool:
        return await trio.to_thread.run_sync(self._table.release, lease)

    async def release_all(self, owner: str) -> int:
        return await trio.to_thread.run_sync(self._table.release_all, owner)


class LossReason(enum.StrEnum):
    TAKEN = "released, expired or taken over, as a renewal found it"
    UNRENEWED = "not renewed before its expiry (the database did not answer)"


@attrs.frozen
class LeaseLost:
    """This replica no longer holds ``lease``: its session must stop at once."""

    lease: Lease
    reason: LossReason


@attrs.define(eq=False)
class _Kept:
    """A held lease and the trio time until which the database surely still counts it."""

    lease: Lease
    valid_until: float


class LeaseKeeper:
    """This replica's leases, as ``owner`` (:func:`~claude_code_api.store.leases.new_owner`),
    each for ``ttl_s`` seconds at a time; :meth:`serve` keeps them. See the module docstring."""

    def __init__(self, leases: Leases, owner: str, ttl_s: float) -> None:
        self.owner = owner
        self.ttl_s = ttl_s
        self._leases = leases
        self._held: dict[SessionKey, _Kept] = {}
        self._digests: dict[str, SessionKey] = {}
        self._lost_send, self.lost = trio.open_memory_channel[LeaseLost](math.inf)
        self._renewing_failed = False

    async def acquire(self, key: SessionKey) -> Lease | Held:
        """``key``'s lease, kept from now on; or who holds it and until when."""
        sent = trio.current_time()
        outcome = await self._leases.acquire(key, self.owner, self.ttl_s)
        if isinstance(outcome, Lease):
            self._held[key] = _Kept(outcome, sent + self.ttl_s)
            self._digests[key_digest(key).hex()] = key
        return outcome

    async def release(self, key: SessionKey) -> bool:
        """Stop keeping ``key``'s lease and release it (announced to the other replicas);
        True if it was held here and released now."""
        kept = self._forget(key)
        return kept is not None and await self._leases.release(kept.lease)

    def key_for(self, digest: str) -> SessionKey | None:
        """The held key whose digest (hex, as wake-ups name keys) is ``digest``."""
        key = self._digests.get(digest)
        return key if key in self._held else None

    def held(self) -> dict[SessionKey, Lease]:
        """The leases held now."""
        return {key: kept.lease for key, kept in self._held.items()}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew and watch the held leases until cancelled; then release them all."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_every_third)
                nursery.start_soon(self._give_up_unrenewed, nursery)
                task_status.started()
        finally:
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + RELEASE_ALL_TIMEOUT_S
            ):
                await self._release_all()
            self._lost_send.close()

    def _forget(self, key: SessionKey) -> _Kept | None:
        kept = self._held.pop(key, None)
        if kept is not None:
            self._digests.pop(key_digest(key).hex(), None)
        return kept

    def _lose(self, key: SessionKey, reason: LossReason) -> Lease:
        kept = self._forget(key)
        assert kept is not None
        log.warning("lease of %r lost: %s", key, reason)
        self._lost_send.send_nowait(LeaseLost(kept.lease, reason))
        return kept.lease

    async def _renew_every_third(self) -> None:
        while True:
            await trio.sleep(self.ttl_s / 3)
            await self._renew_once()

    async def _renew_once(self) -> None:
        """One call for every held lease; updates their validity, reports the lost."""
        kept = dict(self._held)
        if not kept:
            return
        sent = trio.current_time()
        try:
            lost = await self._leases.renew(self.owner, list(kept), self.ttl_s)
        except DatabaseUnavailable as exc:
            if not self._renewing_failed:
                self._renewing_failed = True
                log.warning("renewing leases failed (%s); retrying every %g s", exc, self.ttl_s / 3)
            return
        if self._renewing_failed:
            self._renewing_failed = False
            log.info("renewing leases again")
        for key, was in kept.items():
            if self._held.get(key) is not was:
                continue  # released, lost or acquired again meanwhile
            if key in lost:
                self._lose(key, LossReason.TAKEN)
            else:
                was.valid_until = sent + self.ttl_s

    async def _give_up_unrenewed(self, nursery: trio.Nursery) -> None:
        """Report each lease lost when its validity runs out. A lease acquired while this
        sleeps is valid for a whole ttl, so never runs out before this wakes."""
        while True:
            now = trio.current_time()
            for key, kept in list(self._held.items()):
                if kept.valid_until <= now:
                    lease = self._lose(key, LossReason.UNRENEWED)
                    # A renewal still in flight may yet have extended it: free it if so.
                    nursery.start_soon(self._release_quietly, lease)
            wake = min((kept.valid_until for kept in self._held.values()), default=now + self.ttl_s)
            await trio.sleep_until(wake)

    async def _release_quietly(self, lease: Lease) -> None:
        try:
            await self._leases.release(lease)
        except DatabaseUnavailable:
            pass  # it expires by itself

    async def _release_all(self) -> None:
        self._held.clear()
        self._digests.clear()
        try:
            await self._leases.release_all(self.owner)
        except DatabaseUnavailable as exc:
            log.warning("leases not released at shutdown (%s): they expire by themselves", exc)
