"""Runs across replicas on real PostgreSQL: the run table's diffs and liveness
(store/runs.py), and two :class:`ReplicaRuns` recording runs and cancelling each other's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import psycopg
import pytest
import trio

from claude_code_api.actors import replica_runs
from claude_code_api.actors.dispatcher import PoolView
from claude_code_api.actors.replica_runs import ReplicaRuns
from claude_code_api.messages import CancelRun, DispatcherMessage, RunState, RunView
from claude_code_api.store import runs as runs_module
from claude_code_api.store.database import Database, open_database
from claude_code_api.store.runs import RunRow, RunTable
from tests.postgres.support import TIMEOUT, Databases, TcpLink

TTL = 30.0
T = TypeVar("T")
QUEUED = RunRow("alice", None, RunState.QUEUED, 1000.0)
RUNNING = RunRow("alice", "s", RunState.RUNNING, 1001.0, 1002.0)


def clear_runs(connection: psycopg.Connection) -> None:
    connection.execute("TRUNCATE replicas, runs")


def rows(connection: psycopg.Connection) -> list[tuple]:
    return connection.execute(
        "SELECT run_id, owner, state, started_at FROM runs ORDER BY run_id"
    ).fetchall()


@pytest.fixture
async def table(database: Database) -> AsyncIterator[RunTable]:
    with trio.fail_after(TIMEOUT):
        await database.run(clear_runs)
    yield RunTable(database)


async def in_thread(function: Callable[..., T], *args: object, **kwargs: object) -> T:
    return await trio.to_thread.run_sync(lambda: function(*args, **kwargs))


async def test_a_sync_writes_the_difference_and_readers_see_live_replicas_only(
    table: RunTable, database: Database
) -> None:
    with trio.fail_after(TIMEOUT):
        await in_thread(table.sync, "a", TTL, None, {"r1": QUEUED})
        await in_thread(table.sync, "a", TTL, {"r1": QUEUED}, {"r1": RUNNING, "r2": QUEUED})
        assert await database.run(rows) == [
            ("r1", "a", "running", 1002.0),
            ("r2", "a", "queued", None),
        ]
        await in_thread(table.sync, "a", TTL, {"r1": RUNNING, "r2": QUEUED}, {"r2": QUEUED})
        assert [row[0] for row in await database.run(rows)] == ["r2"]
        # Another replica reads them, the oldest first; not the writer itself, nor another user.
        [view] = await in_thread(table.runs_of, "alice", "b")
        assert view == RunView("r2", "alice", RunState.QUEUED, None, 1000.0)
        assert await in_thread(table.runs_of, "alice", "a") == ()
        assert await in_thread(table.runs_of, "bob", "b") == ()
        assert await in_thread(table.owner_of, "alice", "r2", "b") == "a"
        assert await in_thread(table.owner_of, "bob", "r2", "b") is None
        assert await in_thread(table.owner_of, "alice", "r2", "a") is None
        assert await in_thread(table.owner_of, "alice", "r1", "b") is None  # answered


async def test_an_unknown_past_is_replaced_whole(table: RunTable, database: Database) -> None:
    with trio.fail_after(TIMEOUT):
        await in_thread(table.sync, "a", TTL, None, {"stale": QUEUED, "r1": QUEUED})
        # A write whose outcome the replica did not learn: it knows nothing (None).
        await in_thread(table.sync, "a", TTL, None, {"r1": RUNNING})
        assert await database.run(rows) == [("r1", "a", "running", 1002.0)]


async def test_an_expired_replicas_runs_are_ignored_then_forgotten(
    table: RunTable, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(TIMEOUT):
        await in_thread(table.sync, "dead", 0.2, None, {"r1": QUEUED})
        assert await in_thread(table.owner_of, "alice", "r1", "b") == "dead"
        await trio.sleep(0.3)
        assert await in_thread(table.runs_of, "alice", "b") == ()
        assert await in_thread(table.owner_of, "alice", "r1", "b") is None
        monkeypatch.setattr(runs_module, "FORGET_AFTER_S", 0.0)
        await in_thread(table.sync, "b", TTL, None, {}, forget=True)
        assert await database.run(rows) == []  # deleted with its replica's row
        # The dead one comes back, believing its rows are there: it writes them all again.
        await in_thread(table.sync, "dead", TTL, {"r1": QUEUED}, {"r1": QUEUED, "r2": QUEUED})
        assert [row[0] for row in await database.run(rows)] == ["r1", "r2"]
        await in_thread(table.leave, "dead")
        assert await database.run(rows) == []


class FakeDispatcher:
    """Plays a dispatcher for :class:`ReplicaRuns`: publishes ``runs`` and answers CancelRun
    for them (removing the run), or never answers with ``mute``."""

    def __init__(self, runs: dict[str, RunView], *, mute: bool = False) -> None:
        self.runs = runs
        self.mute = mute
        self.view = PoolView(runs_source=lambda: tuple(self.runs.values()))
        self.send, self.receive = trio.open_memory_channel[DispatcherMessage](0)
        self.cancelled: list[tuple[str, str]] = []

    def change(self) -> None:
        self.view.changed.set()

    async def serve(self) -> None:
        async for message in self.receive:
            assert isinstance(message, CancelRun)
            if self.mute:
                continue
            known = self.runs.get(message.run_id)
            ok = known is not None and known.user_id == message.user_id
            if ok:
                self.cancelled.append((message.user_id, message.run_id))
                del self.runs[message.run_id]
                self.change()
            message.ack.send_nowait(ok)


async def replica(
    nursery: trio.Nursery, url: str, database: Database, owner: str, fake: FakeDispatcher
) -> ReplicaRuns:
    runs = ReplicaRuns(lambda: database, url, owner, TTL, fake.view, fake.send)
    nursery.start_soon(fake.serve)
    await nursery.start(runs.serve)
    return runs


async def until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await trio.sleep(0.02)


async def test_two_replicas_list_and_cancel_each_others_runs(
    table: RunTable, database: Database, shared_url: str, nursery: trio.Nursery
) -> None:
    now = time.time()
    alices = RunView("r1", "alice", RunState.RUNNING, None, now, now)
    a_side = FakeDispatcher({"r1": alices})
    b_side = FakeDispatcher({})
    with trio.fail_after(TIMEOUT):
        a = await replica(nursery, shared_url, database, "a", a_side)
        b = await replica(nursery, shared_url, database, "b", b_side)
        assert await b.runs_of("alice") == (alices,)  # written before it started
        assert await a.runs_of("alice") == ()  # its own are the dispatcher's to show
        bobs = RunView("r2", "bob", RunState.QUEUED, "s", now + 1)
        a_side.runs["r2"] = bobs
        a_side.change()
        while await b.runs_of("bob") != (bobs,):
            await trio.sleep(0.02)
        assert await b.cancel("alice", "r2") is False  # bob's: not found for alice
        assert await b.cancel("alice", "nope") is False
        assert await b.cancel("alice", "r1") is True
        assert a_side.cancelled == [("alice", "r1")]
        while await b.runs_of("alice") != ():  # answered, and removed
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_a_cancel_its_replica_does_not_answer_says_so_in_time(
    table: RunTable,
    database: Database,
    shared_url: str,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replica_runs, "CANCEL_WAIT_S", 0.5)
    now = time.time()
    a_side = FakeDispatcher({"r1": RunView("r1", "alice", RunState.RUNNING, None, now)}, mute=True)
    with trio.fail_after(TIMEOUT):
        await replica(nursery, shared_url, database, "a", a_side)
        b = await replica(nursery, shared_url, database, "b", FakeDispatcher({}))
        started = trio.current_time()
        assert await b.cancel("alice", "r1") is None
        assert 0.5 <= trio.current_time() - started < 2
        nursery.cancel_scope.cancel()


async def test_the_runs_are_written_again_when_the_database_returns(
    databases: Databases,
    link: TcpLink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(replica_runs, "RETRY_S", 0.2)
    direct_url = databases.create()
    name = direct_url.rpartition("/")[2]
    now = time.time()
    first = RunView("r1", "alice", RunState.RUNNING, None, now, now)
    second = RunView("r2", "alice", RunState.QUEUED, None, now + 1)
    a_side = FakeDispatcher({"r1": first})
    with trio.fail_after(TIMEOUT):
        async with (
            open_database(link.url(name)) as database,
            open_database(direct_url) as direct,
            trio.open_nursery() as replicas,
        ):
            await replica(replicas, link.url(name), database, "a", a_side)
            assert [row[0] for row in await direct.run(rows)] == ["r1"]
            link.cut()
            # The runs change while nothing can be written: the dispatcher's side is
            # untouched (it never waits for the database), the recorder keeps trying.
            del a_side.runs["r1"]
            a_side.runs["r2"] = second
            a_side.change()
            while "runs: not recorded (" not in caplog.text:
                await trio.sleep(0.1)
            link.restore()
            while [row[0] for row in await direct.run(rows)] != ["r2"]:
                await trio.sleep(0.05)
            replicas.cancel_scope.cancel()
