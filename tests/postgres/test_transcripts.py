"""The SDK's transcript store on PostgreSQL: the SDK's conformance suite, and more."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from claude_agent_sdk.testing import run_session_store_conformance
from claude_agent_sdk.types import SessionKey

from claude_code_api.store import database as database_module
from claude_code_api.store.database import Database, DatabaseUnavailable, open_database
from claude_code_api.store.transcripts import PostgresTranscriptStore
from tests.postgres.conftest import clear_transcripts
from tests.postgres.support import TIMEOUT, Databases, TcpLink

KEY: SessionKey = {"project_key": "alice", "session_id": "5d0c7b3e-0000-4000-8000-000000000001"}


def entry(**fields: Any) -> Any:
    return {"type": "user", **fields}


async def test_passes_the_sdks_conformance_suite(database: Database) -> None:
    async def fresh_store() -> PostgresTranscriptStore:
        await database.run(clear_transcripts)
        return PostgresTranscriptStore(database)

    with trio.fail_after(TIMEOUT):
        # Every optional method too: none is skipped.
        await run_session_store_conformance(fresh_store)


async def test_an_entrys_uuid_is_its_idempotency_key(database: Database) -> None:
    store = PostgresTranscriptStore(database)
    batch = [entry(uuid="u1", n=1), entry(n=2), entry(uuid="u2", n=3)]
    with trio.fail_after(TIMEOUT):
        await store.append(KEY, batch)
        # The SDK sends a batch again when an append it gave up on had landed after all.
        await store.append(KEY, batch)
        await store.append(KEY, [entry(uuid="u3", n=4), entry(uuid="u3", n=5)])
        loaded = await store.load(KEY)
        # A subagent's transcript has its own uuids.
        await store.append({**KEY, "subpath": "subagents/agent-1"}, [entry(uuid="u1", n=6)])
        subagent = await store.load({**KEY, "subpath": "subagents/agent-1"})
    # Entries without a uuid are never taken for repeats.
    assert loaded == [*batch, entry(n=2), entry(uuid="u3", n=4)]
    assert subagent == [entry(uuid="u1", n=6)]


async def test_entries_come_back_deep_equal(database: Database) -> None:
    store = PostgresTranscriptStore(database)
    awkward = entry(
        uuid="u1",
        # JSONB would refuse "\u0000"; a tool's output may hold it, and lone surrogates.
        text='nul \u0000, emoji \U0001f600, surrogate \ud800, quote " and \\',
        nested={"list": [1, 2.5, None, True, {"deep": []}], "big": 2**70},
        tool_use_result="x" * 200_000,
    )
    with trio.fail_after(TIMEOUT):
        await store.append(KEY, [awkward])
        assert await store.load(KEY) == [awkward]


async def test_each_append_is_stamped_later(database: Database) -> None:
    store = PostgresTranscriptStore(database)
    with trio.fail_after(TIMEOUT):
        stamps = []
        for n in range(5):
            await store.append(KEY, [entry(n=n)])
            [listed] = await store.list_sessions(KEY["project_key"])
            [summary] = await store.list_session_summaries(KEY["project_key"])
            assert summary["mtime"] == listed["mtime"]
            stamps.append(listed["mtime"])
    assert stamps == sorted(set(stamps))


async def append_from_two_replicas(
    database: Database, url: str, batches: dict[str, list[list[Any]]]
) -> list[Any]:
    """Two pools (as two replicas) append their batches to one session at once; the
    transcript as it is then."""

    async def replica(store: PostgresTranscriptStore, mine: list[list[Any]]) -> None:
        for batch in mine:
            await store.append(KEY, batch)

    async with open_database(url) as other:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replica, PostgresTranscriptStore(database), batches["a"])
            nursery.start_soon(replica, PostgresTranscriptStore(other), batches["b"])
    loaded = await PostgresTranscriptStore(database).load(KEY)
    assert loaded is not None
    return loaded


BATCH = 50


def batches_of(name: str) -> list[list[Any]]:
    return [[entry(uuid=f"{name}{n}.{i}", text="x" * 500) for i in range(BATCH)] for n in range(8)]


async def test_two_replicas_appending_at_once_keep_every_batch_whole(
    database: Database, shared_url: str
) -> None:
    with trio.fail_after(TIMEOUT):
        loaded = await append_from_two_replicas(
            database, shared_url, {"a": batches_of("a"), "b": batches_of("b")}
        )
    uuids = [item["uuid"] for item in loaded]
    assert len(uuids) == 2 * 8 * BATCH
    # Each batch in one piece: the appends to a session are one after the other.
    for start in range(0, len(uuids), BATCH):
        names = {uuid.rpartition(".")[0] for uuid in uuids[start : start + BATCH]}
        assert len(names) == 1, names
    for name in "ab":
        mine = [uuid for uuid in uuids if uuid.startswith(name)]
        assert mine == [item["uuid"] for batch in batches_of(name) for item in batch]


async def test_the_same_batches_from_two_replicas_are_kept_once(
    database: Database, shared_url: str
) -> None:
    with trio.fail_after(TIMEOUT):
        loaded = await append_from_two_replicas(
            database, shared_url, {"a": batches_of("a"), "b": batches_of("a")}
        )
    assert loaded == [item for batch in batches_of("a") for item in batch]


async def test_the_database_away_is_database_unavailable(
    databases: Databases, link: TcpLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "CONNECT_TIMEOUT_S", 2.0)
    name = databases.create().rpartition("/")[2]
    with trio.fail_after(TIMEOUT):
        async with open_database(link.url(name)) as database:
            store = PostgresTranscriptStore(database)
            await store.append(KEY, [entry(uuid="u1")])
            link.cut()
            with pytest.raises(DatabaseUnavailable):
                await store.append(KEY, [entry(uuid="u2")])
            with pytest.raises(DatabaseUnavailable):
                await store.load(KEY)
            link.restore()
            # Back by itself: the pool reconnects (on a loaded machine a first try may
            # still find none of its connections ready within CONNECT_TIMEOUT_S).
            with trio.fail_after(20):
                while True:
                    try:
                        await store.append(KEY, [entry(uuid="u2")])
                        break
                    except DatabaseUnavailable:
                        await trio.sleep(0.2)
            assert await store.load(KEY) == [entry(uuid="u1"), entry(uuid="u2")]
