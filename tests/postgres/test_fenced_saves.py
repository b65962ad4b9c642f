"""Fenced saves: a replica never saves a session whose lease another replica holds.

The session table of replica A (``fence_owner`` "A") against leases taken in the same
database (store/leases.py): the table alone, then through the registry actor's group commit,
where the saves of the other sessions in the batch go through.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from claude_code_api.actors.registry import SaveSession, serve_registry
from claude_code_api.store import SessionMoved, SessionRecord, StoreUnavailable
from claude_code_api.store.database import Database, make_pool
from claude_code_api.store.leases import Lease, LeaseTable
from claude_code_api.store.postgres import PostgresSessionTable, open_postgres_table
from tests.postgres.support import TIMEOUT


def record(session: str, turns: int = 1) -> SessionRecord:
    return SessionRecord("u", session, "cid", created_at=0.0, last_activity=1.0, turns=turns)


@pytest.fixture
def a_table(fresh_url: str) -> Iterator[PostgresSessionTable]:
    table = open_postgres_table(fresh_url)
    table.fence_owner = "A"
    try:
        yield table
    finally:
        table.close()


@pytest.fixture
def leases(fresh_url: str, a_table: PostgresSessionTable) -> Iterator[LeaseTable]:
    pool = make_pool(fresh_url)
    pool.open()
    try:
        yield LeaseTable(Database(pool))
    finally:
        pool.close()


def test_a_session_another_replica_holds_is_not_saved(a_table, leases) -> None:
    a_table.save_many([record("mine"), record("taken")])
    assert isinstance(leases.acquire(record("taken").key, "B", 30), Lease)
    assert isinstance(leases.acquire(record("mine").key, "A", 30), Lease)
    with pytest.raises(SessionMoved) as refused:
        a_table.save_many([record("mine", turns=2), record("taken", turns=2)])
    assert refused.value.keys == {record("taken").key}
    assert "u/taken" in str(refused.value) and "another replica" in str(refused.value)
    # Nothing of the refused write: "mine" too is as it was.
    assert a_table.load(record("mine").key).turns == 1
    assert a_table.load(record("taken").key).turns == 1
    a_table.save_many([record("mine", turns=2)])  # its own lease: saved
    assert a_table.load(record("mine").key).turns == 2


def test_an_expired_or_released_lease_of_another_fences_nothing(a_table, leases) -> None:
    expired = leases.acquire(record("e").key, "B", 0.001)
    released = leases.acquire(record("r").key, "B", 30)
    assert isinstance(expired, Lease) and isinstance(released, Lease)
    assert leases.release(released)
    trio.run(trio.sleep, 0.05)
    a_table.save_many([record("e", turns=3), record("r", turns=3)])
    assert a_table.load(record("e").key).turns == 3 and a_table.load(record("r").key).turns == 3


async def test_the_registry_refuses_the_moved_session_and_saves_the_rest_of_its_batch(
    a_table, leases, nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(leases.acquire, record("taken").key, "B", 30)
        send, inbox = trio.open_memory_channel(8)
        await nursery.start(serve_registry, a_table, inbox)
        replies = [trio.open_memory_channel(1) for _ in range(2)]
        async with send:
            # Queued together: one batch.
            send.send_nowait(SaveSession(record("taken", turns=5), replies[0][0]))
            send.send_nowait(SaveSession(record("free", turns=5), replies[1][0]))
            answers = [await receive.receive() for _, receive in replies]
    assert isinstance(answers[0], StoreUnavailable) and "another replica" in str(answers[0])
    assert answers[1] is None
    assert a_table.load(record("free").key).turns == 5
    assert a_table.load(record("taken").key) is None


def test_a_session_live_on_another_replica_is_never_evicted_for_a_new_one(a_table, leases) -> None:
    a_table.save_many([record("oldest"), record("newer")])
    a_table.save_many([SessionRecord("u", "newer", "cid", created_at=0.0, last_activity=2.0)])
    assert isinstance(leases.acquire(record("oldest").key, "B", 30), Lease)  # live on B
    evicted = a_table.create(
        SessionRecord("u", "new", "cid", created_at=0.0, last_activity=3.0), 2, in_use=()
    )
    assert [r.session_id for r in evicted] == ["newer"]
    assert a_table.load(record("oldest").key) is not None
