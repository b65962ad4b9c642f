"""The lease keeper with a fake lease table, on trio's autojump clock: renewals every third
of the ttl in one call, leases lost (taken over, or unrenewed past their expiry) reported
at once, releases on request and at shutdown."""

from __future__ import annotations

from collections.abc import Collection

import attrs
import pytest
import trio
import trio.testing

from claude_code_api.actors.lease_keeper import LeaseKeeper, LeaseLost, LossReason
from claude_code_api.messages import SessionKey
from claude_code_api.store.database import DatabaseUnavailable
from claude_code_api.store.leases import Held, Lease, key_digest

LIMIT = 1000
TTL = 15.0
ME = "me"
A, B, C = (SessionKey("alice", f"s-{n}") for n in (1, 2, 3))


@attrs.define
class Row:
    owner: str | None
    fence: int
    expires: float


@attrs.define
class FakeLeases:
    """The lease table's rules on trio's clock; ``down`` makes every call fail after
    ``down_delay_s`` (the pool's connect timeout), ``hang`` makes renewals never answer."""

    rows: dict[SessionKey, Row] = attrs.Factory(dict)
    calls: list[tuple[float, str, object]] = attrs.Factory(list)
    down: bool = False
    down_delay_s: float = 5.0
    hang: bool = False

    async def _call(self, name: str, argument: object) -> None:
        self.calls.append((trio.current_time(), name, argument))
        if self.down:
            await trio.sleep(self.down_delay_s)
            raise DatabaseUnavailable("connection refused")

    async def acquire(self, key: SessionKey, owner: str, ttl_s: float) -> Lease | Held:
        await self._call("acquire", key)
        now = trio.current_time()
        row = self.rows.setdefault(key, Row(None, 0, now))
        if row.owner not in (None, owner) and row.expires > now:
            return Held(key, row.owner, None, row.expires - now)  # type: ignore[arg-type]
        if row.owner != owner:
            row.owner, row.fence = owner, row.fence + 1
        row.expires = now + ttl_s
        return Lease(key, owner, row.fence)

    async def renew(
        self, owner: str, keys: Collection[SessionKey], ttl_s: float
    ) -> set[SessionKey]:
        await self._call("renew", sorted(keys, key=lambda k: k.session_id))
        if self.hang:
            await trio.sleep_forever()
        now = trio.current_time()
        lost = set()
        for key in keys:
            row = self.rows.get(key)
            if row is None or row.owner != owner or row.expires <= now:
                lost.add(key)
            else:
                row.expires = now + ttl_s
        return lost

    async def release(self, lease: Lease) -> bool:
        await self._call("release", lease)
        row = self.rows.get(lease.key)
        if row is None or (row.owner, row.fence) != (lease.owner, lease.fence):
            return False
        row.owner = None
        return True

    async def release_all(self, owner: str) -> int:
        await self._call("release_all", owner)
        mine = [row for row in self.rows.values() if row.owner == owner]
        for row in mine:
            row.owner = None
        return len(mine)

    def take_over(self, key: SessionKey, owner: str) -> None:
        row = self.rows[key]
        row.owner, row.fence, row.expires = owner, row.fence + 1, trio.current_time() + TTL

    def named(self, name: str) -> list[tuple[float, object]]:
        return [(at, argument) for at, called, argument in self.calls if called == name]


async def start_keeper(nursery: trio.Nursery, fake: FakeLeases) -> LeaseKeeper:
    keeper = LeaseKeeper(fake, ME, TTL)
    await nursery.start(keeper.serve)
    return keeper


async def test_every_lease_is_renewed_every_third_of_the_ttl_in_one_call(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases()
        keeper = await start_keeper(nursery, fake)
        assert await keeper.acquire(A) == Lease(A, ME, 1)
        await trio.sleep(1)
        assert await keeper.acquire(B) == Lease(B, ME, 1)
        await trio.sleep(20)
        assert fake.named("renew") == [
            (5.0, [A, B]),
            (10.0, [A, B]),
            (15.0, [A, B]),
            (20.0, [A, B]),
        ]
        assert keeper.held() == {A: Lease(A, ME, 1), B: Lease(B, ME, 1)}


async def test_a_lease_held_by_another_is_not_kept(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases()
        await fake.acquire(A, "other", TTL)
        keeper = await start_keeper(nursery, fake)
        held = await keeper.acquire(A)
        assert isinstance(held, Held) and held.owner == "other"
        await trio.sleep(10)
        assert fake.named("renew") == [] and keeper.held() == {}


async def test_a_lease_taken_over_is_reported_at_the_next_renewal(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases()
        keeper = await start_keeper(nursery, fake)
        lease = await keeper.acquire(A)
        await keeper.acquire(B)
        await trio.sleep(6)
        fake.take_over(A, "other")
        lost = await keeper.lost.receive()
        assert lost == LeaseLost(lease, LossReason.TAKEN)  # type: ignore[arg-type]
        assert trio.current_time() == 10.0
        await trio.sleep(6)
        assert fake.named("renew")[-1] == (15.0, [B])
        assert keeper.held().keys() == {B}


@pytest.mark.parametrize("hang", [False, True])
async def test_leases_unrenewed_until_their_expiry_are_lost_at_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, hang: bool
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases()
        keeper = await start_keeper(nursery, fake)
        first = await keeper.acquire(A)
        await trio.sleep(4)
        second = await keeper.acquire(B)  # valid until 19
        await trio.sleep(0.5)
        # Renewals from t=5 on fail after a connect timeout, or never answer.
        fake.down, fake.hang = not hang, hang
        assert await keeper.lost.receive() == LeaseLost(first, LossReason.UNRENEWED)  # type: ignore[arg-type]
        assert trio.current_time() == TTL  # acquired at 0, never renewed
        assert await keeper.lost.receive() == LeaseLost(second, LossReason.UNRENEWED)  # type: ignore[arg-type]
        assert trio.current_time() == 4 + TTL
        assert keeper.held() == {}


async def test_an_outage_shorter_than_the_ttl_loses_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases(down_delay_s=1.0)
        keeper = await start_keeper(nursery, fake)
        await keeper.acquire(A)
        await trio.sleep(4)
        fake.down = True  # the renewal at 5 fails (at 6)
        await trio.sleep(5)
        fake.down = False  # the next, at 11, succeeds: valid until 26
        await trio.sleep(30)
        assert keeper.held().keys() == {A}
        with pytest.raises(trio.WouldBlock):
            keeper.lost.receive_nowait()


async def test_release_on_request_stops_renewing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases()
        keeper = await start_keeper(nursery, fake)
        lease = await keeper.acquire(A)
        await keeper.acquire(B)
        await trio.sleep(6)
        assert await keeper.release(A)
        assert not await keeper.release(A)  # once
        assert fake.named("release") == [(6.0, lease)]
        await trio.sleep(5)
        assert fake.named("renew")[-1] == (10.0, [B])
        # Re-acquired after the release: a new fence, kept again.
        assert await keeper.acquire(A) == Lease(A, ME, 2)


async def test_a_hand_over_request_names_a_held_key_by_its_digest(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    with trio.fail_after(LIMIT):
        keeper = await start_keeper(nursery, FakeLeases())
        await keeper.acquire(A)
        assert keeper.key_for(key_digest(A).hex()) == A
        assert keeper.key_for(key_digest(B).hex()) is None
        await keeper.release(A)
        assert keeper.key_for(key_digest(A).hex()) is None


async def test_shutdown_releases_every_lease_and_closes_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases()
        async with trio.open_nursery() as nursery:
            keeper = await start_keeper(nursery, fake)
            await keeper.acquire(A)
            await keeper.acquire(C)
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        assert fake.named("release_all") == [(3.0, ME)]
        assert all(row.owner is None for row in fake.rows.values())
        with pytest.raises(trio.EndOfChannel):
            await keeper.lost.receive()


async def test_shutdown_with_the_database_away_still_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT):
        fake = FakeLeases(down_delay_s=1000.0)
        async with trio.open_nursery() as nursery:
            keeper = await start_keeper(nursery, fake)
            await keeper.acquire(A)
            fake.down = True
            nursery.cancel_scope.cancel()
        assert trio.current_time() == 10.0  # RELEASE_ALL_TIMEOUT_S
