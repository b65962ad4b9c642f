"""Session leases on real PostgreSQL: one holder at a time, fences, expiry by the database's
clock, takeovers, and fenced writes."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import psycopg
import pytest
import trio

from claude_code_api.actors.lease_keeper import LeaseKeeper, ThreadedLeases
from claude_code_api.messages import SessionKey
from claude_code_api.store.database import Database
from claude_code_api.store.leases import Held, Lease, LeaseTable, holds, key_digest
from tests.postgres.support import TIMEOUT

KEY = SessionKey("alice", "s-1")
OTHER_KEY = SessionKey("alice", "s-2")
TTL = 30.0
SHORT = 0.3
T = TypeVar("T")


def clear_leases(connection: psycopg.Connection) -> None:
    connection.execute("TRUNCATE session_leases")


@pytest.fixture
async def table(database: Database) -> AsyncIterator[LeaseTable]:
    with trio.fail_after(TIMEOUT):
        await database.run(clear_leases)
    yield LeaseTable(database)


async def in_thread(function: Callable[..., T], *args: object) -> T:
    return await trio.to_thread.run_sync(function, *args)


async def test_two_owners_contend_for_one_key(table: LeaseTable) -> None:
    with trio.fail_after(TIMEOUT):
        won = await in_thread(table.acquire, KEY, "a", TTL)
        assert won == Lease(KEY, "a", 1)
        lost = await in_thread(table.acquire, KEY, "b", TTL)
        assert isinstance(lost, Held)
        assert (lost.key, lost.owner) == (KEY, "a")
        assert TTL - 5 < lost.remaining_s <= TTL
        # Another key is another lease.
        assert await in_thread(table.acquire, OTHER_KEY, "b", TTL) == Lease(OTHER_KEY, "b", 1)


async def test_the_owner_reacquiring_keeps_its_fence(table: LeaseTable) -> None:
    with trio.fail_after(TIMEOUT):
        first = await in_thread(table.acquire, KEY, "a", SHORT)
        await trio.sleep(2 * SHORT)  # expired, but no one took it
        assert await in_thread(table.acquire, KEY, "a", TTL) == first
        assert await in_thread(table.check, first)


async def test_an_expired_lease_is_taken_over_with_a_higher_fence(table: LeaseTable) -> None:
    with trio.fail_after(TIMEOUT):
        old = await in_thread(table.acquire, KEY, "a", SHORT)
        assert isinstance(await in_thread(table.acquire, KEY, "b", TTL), Held)
        await trio.sleep(2 * SHORT)
        new = await in_thread(table.acquire, KEY, "b", TTL)
        assert new == Lease(KEY, "b", 2)
        # The old holder learns it lost the key, and its fenced writes are refused.
        assert await in_thread(table.renew, "a", [KEY], TTL) == {KEY}
        assert not await in_thread(table.check, old)
        assert await in_thread(table.check, new)
        # Its release is refused too: the lease stays the new holder's.
        assert not await in_thread(table.release, old)
        assert await in_thread(table.check, new)


async def test_renew_extends_every_lease_still_held_and_names_the_others(
    table: LeaseTable,
) -> None:
    with trio.fail_after(TIMEOUT):
        kept = await in_thread(table.acquire, KEY, "a", SHORT)
        await in_thread(table.acquire, OTHER_KEY, "b", TTL)
        never = SessionKey("bob", "s-1")
        assert await in_thread(table.renew, "a", [KEY, OTHER_KEY, never], TTL) == {
            OTHER_KEY,
            never,
        }
        await trio.sleep(2 * SHORT)  # past the first ttl: the renewal extended it
        assert await in_thread(table.check, kept)
        assert await in_thread(table.renew, "a", [], TTL) == set()


async def test_an_expired_lease_is_lost_to_renew_even_if_no_one_took_it(
    table: LeaseTable,
) -> None:
    with trio.fail_after(TIMEOUT):
        lease = await in_thread(table.acquire, KEY, "a", SHORT)
        await trio.sleep(2 * SHORT)
        assert not await in_thread(table.check, lease)
        assert await in_thread(table.renew, "a", [KEY], TTL) == {KEY}


async def test_release_then_the_other_acquires(table: LeaseTable) -> None:
    with trio.fail_after(TIMEOUT):
        first = await in_thread(table.acquire, KEY, "a", TTL)
        assert await in_thread(table.release, first)
        assert not await in_thread(table.release, first)  # once
        assert not await in_thread(table.check, first)
        second = await in_thread(table.acquire, KEY, "b", TTL)
        assert second == Lease(KEY, "b", 2)
        # After a release even the same owner gets a new fence: the old one stays refused.
        assert await in_thread(table.release, second)
        third = await in_thread(table.acquire, KEY, "b", TTL)
        assert third == Lease(KEY, "b", 3)
        assert not await in_thread(table.check, second)


async def test_release_all_frees_only_the_owners_leases(table: LeaseTable) -> None:
    with trio.fail_after(TIMEOUT):
        await in_thread(table.acquire, KEY, "a", TTL)
        await in_thread(table.acquire, OTHER_KEY, "a", TTL)
        theirs = await in_thread(table.acquire, SessionKey("bob", "s-1"), "b", TTL)
        assert await in_thread(table.release_all, "a") == 2
        assert await in_thread(table.release_all, "a") == 0
        assert await in_thread(table.acquire, KEY, "c", TTL) == Lease(KEY, "c", 2)
        assert await in_thread(table.check, theirs)


def acquire_all_at_once(table: LeaseTable, owners: int, ttl_s: float) -> list[Lease | Held]:
    start = threading.Barrier(owners)

    def acquire(owner: int) -> Lease | Held:
        start.wait()
        return table.acquire(KEY, f"owner-{owner}", ttl_s)

    with ThreadPoolExecutor(owners) as executor:
        return list(executor.map(acquire, range(owners)))


@pytest.mark.parametrize("expired_before", [False, True])
async def test_many_threads_acquiring_at_once_get_exactly_one_lease(
    table: LeaseTable, expired_before: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        if expired_before:  # the race is then on the takeover, not the first insert
            await in_thread(table.acquire, KEY, "gone", SHORT)
            await trio.sleep(2 * SHORT)
        outcomes = await in_thread(acquire_all_at_once, table, 16, TTL)
        leases = [outcome for outcome in outcomes if isinstance(outcome, Lease)]
        assert len(leases) == 1
        assert leases[0].fence == (2 if expired_before else 1)
        held = [outcome for outcome in outcomes if isinstance(outcome, Held)]
        assert {h.owner for h in held} == {leases[0].owner} and len(held) == 15


async def test_a_fenced_write_holds_off_a_takeover_until_it_commits(
    database: Database, table: LeaseTable
) -> None:
    lease = await in_thread(table.acquire, KEY, "a", 1.0)
    committed = threading.Event()

    def fenced_write(connection: psycopg.Connection) -> bool:
        held = holds(connection, lease)
        time.sleep(1.5)  # the lease expires while the write is still running
        committed.set()
        return held

    async def take_over() -> tuple[Lease | Held, bool]:
        await trio.sleep(1.2)
        outcome = await in_thread(table.acquire, KEY, "b", TTL)
        return outcome, committed.is_set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def write() -> None:
                results.append(await database.run(fenced_write))

            async def other() -> None:
                results.append(await take_over())

            nursery.start_soon(write)
            nursery.start_soon(other)
        assert True in results
        # The takeover waited for the fenced write's commit, then won.
        assert (Lease(KEY, "b", 2), True) in results
        assert not await in_thread(table.check, lease)


async def test_any_user_id_is_a_key(table: LeaseTable) -> None:
    odd = SessionKey("u\x00\x01\ud800" + "é" * 20_000, "s-1")
    with trio.fail_after(TIMEOUT):
        lease = await in_thread(table.acquire, odd, "a", TTL)
        assert lease == Lease(odd, "a", 1)
        assert await in_thread(table.renew, "a", [odd, KEY], TTL) == {KEY}
        assert await in_thread(table.check, lease)
        assert len(key_digest(odd)) == 32


async def test_keepers_on_two_replicas_hand_a_lease_over(table: LeaseTable) -> None:
    threaded = ThreadedLeases(table)
    first, second = LeaseKeeper(threaded, "a", 3.0), LeaseKeeper(threaded, "b", 3.0)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            await outer.start(second.serve)
            async with trio.open_nursery() as nursery:
                await nursery.start(first.serve)
                lease = await first.acquire(KEY)
                await trio.sleep(4.0)  # past one ttl: renewed meanwhile
                assert isinstance(await second.acquire(KEY), Held)
                nursery.cancel_scope.cancel()  # the first replica stops: releases it all
            assert await second.acquire(KEY) == Lease(KEY, "b", 2)
            assert not await in_thread(table.check, lease)
            outer.cancel_scope.cancel()
