"""The session registry: the SQLite table's own behaviour, and the actor (collaboration).

What every session table does is in tests/contract/test_store_contract.py; here is
what is SQLite's (WAL, migrations, a full disk, a file deleted, replaced or
spoilt) and the registry actor over it. Store tests use a real database file
under ``tmp_path``. Refusal tests check two things besides the exception type:
the message names the path in one line, and the refused file (and its
directory) are left exactly as they were.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from claude_code_api.actors.registry import (
    DeleteSession,
    ListSessions,
    LoadSession,
    SaveSession,
    serve_registry,
)
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.messages import SessionKey
from claude_code_api.store import (
    SessionPage,
    SessionRecord,
    SqliteSessionTable,
    StoreUnavailable,
    new_session_record,
    open_store,
)
from claude_code_api.store.sqlite import DB_FILENAME, MIGRATIONS, SCHEMA_VERSION
from tests.contract.test_store_contract import listed, record

TIMEOUT = 10


# --- the SQLite table (the contract every table passes: tests/contract/) ------


async def test_closing_checkpoints_the_wal_into_the_database_file(tmp_path):
    with trio.fail_after(TIMEOUT):
        data_dir = tmp_path / "nested" / "data"  # parents are created
        store = open_store(data_dir)
        store.save_many([record("u", f"s{i}", last=float(i), turns=i) for i in range(5)])
        store.close()
        assert (data_dir / DB_FILENAME).is_file()
        assert not (data_dir / f"{DB_FILENAME}-wal").exists()
        raw = sqlite3.connect(data_dir / DB_FILENAME)
        try:
            assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("SELECT count(*) FROM sessions").fetchone() == (5,)
        finally:
            raw.close()


async def test_new_session_record():
    with trio.fail_after(TIMEOUT):
        key = SessionKey("alice", "s1")
        a, b = new_session_record(key, 123.0), new_session_record(key, 123.0)
        assert a.key == key
        assert (a.created_at, a.last_activity, a.turns, a.total_cost_usd) == (123.0, 123.0, 0, 0.0)
        assert a.transcript_started is False
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
            a.claude_session_id,
        )
        assert a.claude_session_id != b.claude_session_id


async def test_save_many_is_one_transaction(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        try:
            a, b = record("u", "a"), record("u", "b")
            store.save_many([a, b])
            assert listed(store, "u") == [a, b]
            # A batch that cannot be written whole is not written at all.
            full = record("u", "c", last=200.0)
            store.save(full)
            with _full(store):
                with pytest.raises(StoreUnavailable, match="disk is full"):
                    store.save_many([attrs.evolve(a, turns=9), _huge("u", "d")])
            assert store.load(a.key) == a
            assert store.load(SessionKey("u", "d")) is None
        finally:
            store.close()


async def test_paging_and_expiry_use_indexes(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        try:
            store.save_many([record(f"u{i % 5}", f"s{i}", last=float(i)) for i in range(500)])
            raw = sqlite3.connect(tmp_path / DB_FILENAME)
            raw.execute("ANALYZE")

            def plan(sql, *params):
                return " | ".join(r[-1] for r in raw.execute(f"EXPLAIN QUERY PLAN {sql}", params))

            page = plan(
                "SELECT * FROM sessions WHERE user_id = ? ORDER BY last_activity DESC, session_id"
                " LIMIT 10 OFFSET 20",
                "u1",
            )
            assert "sessions_by_activity" in page and "TEMP B-TREE" not in page, page
            count = plan("SELECT count(*) FROM sessions WHERE user_id = ?", "u1")
            assert "USING COVERING INDEX" in count, count
            expiry = plan(
                "SELECT * FROM sessions WHERE last_activity < ? ORDER BY last_activity LIMIT 5",
                10.0,
            )
            assert "sessions_by_last_activity" in expiry and "TEMP B-TREE" not in expiry, expiry
            raw.close()
        finally:
            store.close()


async def test_store_runs_wal_with_synchronous_normal(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        try:
            assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        finally:
            store.close()


def _version_1_database(path: Path) -> None:
    """A database exactly as the service wrote it at schema version 1, with two records."""
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    for statement in MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.executemany(
        "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("alice", "s1", "cid-1", 50.0, 100.0, 3, 0.25, 1),
            ("bob", "s2", "cid-2", 60.0, 70.0, 0, 0.0, 0),
        ],
    )
    raw.close()


async def test_a_version_1_database_is_migrated(tmp_path):
    with trio.fail_after(TIMEOUT):
        path = tmp_path / DB_FILENAME
        _version_1_database(path)
        store = open_store(tmp_path)
        try:
            assert store.load(SessionKey("alice", "s1")) == SessionRecord(
                "alice", "s1", "cid-1", 50.0, 100.0, 3, 0.25, True, ()
            )
            assert listed(store, "bob")[0].previous_claude_session_ids == ()
            later = attrs.evolve(
                store.load(SessionKey("bob", "s2")), previous_claude_session_ids=("cid-0",)
            )
            store.save(later)
            assert store.load(later.key) == later
        finally:
            store.close()
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA user_version").fetchone() == (3,) == (SCHEMA_VERSION,)
            indexes = {r[1] for r in raw.execute("PRAGMA index_list(sessions)")}
            assert {"sessions_by_activity", "sessions_by_last_activity"} <= indexes
        finally:
            raw.close()
        open_store(tmp_path).close()  # opening a migrated file again changes nothing


# --- the store: storage failures --------------------------------------------


def _huge(user: str, session: str) -> SessionRecord:
    return attrs.evolve(record(user, session), claude_session_id="x" * 200_000)


@contextmanager
def _full(store: SqliteSessionTable):
    """Make the database "full": no page may be added (real SQLITE_FULL), then undo it."""
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        yield
    finally:
        store._db.execute("PRAGMA max_page_count = 1073741823")


async def test_a_full_disk_fails_the_write_and_says_so(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        try:
            with _full(store):
                with pytest.raises(StoreUnavailable) as caught:
                    store.save(_huge("u", "s"))
                with pytest.raises(StoreUnavailable, match="disk is full"):
                    store.create(_huge("u", "t"), 10)
            message = str(caught.value)
            assert str(tmp_path / DB_FILENAME) in message and "\n" not in message
            assert "disk is full" in message and "free" in message
            assert store.count() == 0
            store.save(_huge("u", "s"))  # space again: writes work again
            assert store.count() == 1
        finally:
            store.close()


async def test_a_deleted_database_file_fails_writes(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        try:
            kept = record("u", "kept")
            store.save(kept)
            (tmp_path / DB_FILENAME).unlink()
            for write in (
                lambda: store.save(record("u", "lost")),
                lambda: store.save_many([record("u", "lost")]),
                lambda: store.create(record("u", "lost"), 10),
                lambda: store.delete(kept.key),
                lambda: store.delete_inactive(1e12, 10),
            ):
                with pytest.raises(StoreUnavailable, match="deleted") as caught:
                    write()
                assert "restart the service" in str(caught.value)
            assert store.load(kept.key) == kept  # reads still see what it had
        finally:
            store.close()
        assert not (tmp_path / DB_FILENAME).exists()  # and it did not recreate it


async def test_a_replaced_database_file_fails_writes(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        other = tmp_path / "other"
        other.mkdir()
        try:
            store.save(record("u", "a"))
            open_store(other).close()  # a valid store, moved over ours
            os.replace(other / DB_FILENAME, tmp_path / DB_FILENAME)
            with pytest.raises(StoreUnavailable, match="replaced.*restart the service"):
                store.save(record("u", "lost"))
        finally:
            store.close()
        # SQLite would replay the old file's WAL onto the new one: closing removed it.
        assert not (tmp_path / f"{DB_FILENAME}-wal").exists()
        restarted = open_store(tmp_path)
        try:
            assert restarted.count() == 0  # the new file, as it was
        finally:
            restarted.close()


async def test_restart_after_the_file_was_deleted_starts_empty(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        store.save(record("u", "a"))
        (tmp_path / DB_FILENAME).unlink()
        store.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stale -wal, -shm
        restarted = open_store(tmp_path)
        try:
            assert restarted.count() == 0
        finally:
            restarted.close()


async def test_a_wal_without_its_database_is_refused_and_left_alone(tmp_path):
    with trio.fail_after(TIMEOUT):
        # What a service that crashed after its file was deleted leaves behind.
        (tmp_path / f"{DB_FILENAME}-wal").write_bytes(b"frames of a deleted database")
        before = _snapshot(tmp_path)
        with pytest.raises(StoreUnavailable, match="-wal exists without the database"):
            open_store(tmp_path)
        assert _snapshot(tmp_path) == before


# --- the store: refusing a file it must not touch ---------------------------


def _real_database(path: Path, rows: int) -> None:
    store = SqliteSessionTable(path)
    for i in range(rows):
        store.save(record(f"user-{i % 7}", f"session-{i:05d}-" + "x" * 400, last=float(i)))
    store.close()


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(10_000))


def corrupted_in_the_middle(path: Path) -> None:
    _real_database(path, 300)
    size = path.stat().st_size
    assert size > 20 * 4096  # many pages, so the middle is a b-tree page
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(random.Random(2).randbytes(600))


def truncated(path: Path) -> None:
    _real_database(path, 300)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2 + 100)


def directory(path: Path) -> None:
    path.mkdir()
    (path / "keep-me").write_text("precious")


def newer_schema(path: Path) -> None:
    _real_database(path, 3)
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()


def someone_elses_database(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    raw.execute("INSERT INTO invoices (amount) VALUES (12.5)")
    raw.commit()
    raw.close()


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry under ``directory``: file contents, or None for a directory."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


@pytest.mark.parametrize(
    "spoil",
    [garbage, corrupted_in_the_middle, truncated, directory, newer_schema, someone_elses_database],
)
async def test_refuses_a_bad_file_and_leaves_it_alone(tmp_path, spoil):
    with trio.fail_after(TIMEOUT):
        path = tmp_path / DB_FILENAME
        spoil(path)
        before = _snapshot(tmp_path)

        with pytest.raises(StoreUnavailable) as caught:  # and no other exception type
            open_store(tmp_path)

        message = str(caught.value)
        assert str(path) in message
        assert "\n" not in message
        assert _snapshot(tmp_path) == before  # byte for byte, and no new files


async def test_refusal_messages_say_why(tmp_path):
    with trio.fail_after(TIMEOUT):
        cases = {
            garbage: "not a database",
            directory: "not a regular file",
            newer_schema: f"schema version {SCHEMA_VERSION + 1}",
            someone_elses_database: "not a session store",
        }
        for spoil, expected in cases.items():
            data_dir = tmp_path / spoil.__name__
            data_dir.mkdir()
            spoil(data_dir / DB_FILENAME)
            with pytest.raises(StoreUnavailable, match=expected):
                open_store(data_dir)


async def test_a_parent_that_is_a_file_is_a_registry_error(tmp_path):
    with trio.fail_after(TIMEOUT):
        (tmp_path / "data").write_text("not a directory")
        with pytest.raises(StoreUnavailable, match="data"):
            open_store(tmp_path / "data")


# --- the actor: collaboration -----------------------------------------------


class RecordingStore(SqliteSessionTable):
    """A real store that logs every call with the thread it ran on."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.calls: list[tuple[str, object]] = []
        self.threads: set[int] = set()
        self.threads_of: dict[str, set[int]] = {}
        self.closed = False

    def _note(self, name, arg):
        self.calls.append((name, arg))
        self.threads.add(threading.get_ident())
        self.threads_of.setdefault(name, set()).add(threading.get_ident())

    def load(self, key):
        self._note("load", key)
        return super().load(key)

    def save_many(self, records, **options):
        self._note("save", [r.key.session_id for r in records])
        return super().save_many(records, **options)

    def create(self, record, max_per_user, in_use=None):
        self._note("create", record.key)
        return super().create(record, max_per_user, in_use)

    def delete(self, key):
        self._note("delete", key)
        return super().delete(key)

    def delete_inactive(self, before, limit):
        deleted = super().delete_inactive(before, limit)
        self._note("expire", len(deleted))
        return deleted

    def list_for_user(self, user_id, limit, offset=0):
        self._note("list", user_id)
        return super().list_for_user(user_id, limit, offset)

    def close(self):
        self._note("close", None)
        self.closed = True
        super().close()

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _reply():
    return trio.open_memory_channel(1)


async def test_requests_are_answered_in_order(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(32)
        await nursery.start(serve_registry, store, inbox)

        a, b = record("u", "a", last=1.0), record("u", "b", last=2.0)
        replies = [_reply() for _ in range(8)]
        messages = [
            LoadSession(a.key, replies[0][0]),  # before the save: None
            SaveSession(a, replies[1][0]),
            SaveSession(b, replies[2][0]),
            LoadSession(a.key, replies[3][0]),  # after it: a
            ListSessions("u", 10, 0, replies[4][0]),
            DeleteSession(a.key, replies[5][0]),
            DeleteSession(a.key, replies[6][0]),
            ListSessions("u", 10, 0, replies[7][0]),
        ]
        async with send:
            for m in messages:  # all queued before the first is handled
                send.send_nowait(m)

            answers = []
            for _, receive in replies:
                async with receive:
                    answers.append(await receive.receive())
                    with pytest.raises(trio.EndOfChannel):  # the registry closed it
                        await receive.receive()

        assert answers == [
            None, None, None, a, SessionPage((b, a), 2), True, False, SessionPage((b,), 1)
        ]  # fmt: skip
        # The two saves queued together were committed together.
        assert store.calls[:7] == [
            ("load", a.key), ("save", ["a", "b"]), ("load", a.key), ("list", "u"),
            ("delete", a.key), ("delete", a.key), ("list", "u"),
        ]  # fmt: skip


async def test_client_round_trip(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        send, inbox = trio.open_memory_channel(0)
        await nursery.start(serve_registry, open_store(tmp_path), inbox)
        async with send:
            client = RegistryClient(send)
            r = record(turns=2)
            assert await client.load(r.key) is None
            await client.save(r)
            assert await client.load(r.key) == r
            assert await client.list_for_user(r.user_id, 10) == SessionPage((r,), 1)
            assert await client.delete(r.key) is True
            assert await client.delete(r.key) is False
            assert await client.list_for_user(r.user_id, 10) == SessionPage((), 0)
            with pytest.raises(ValueError):
                await client.list_for_user(r.user_id, -1)
            with pytest.raises(ValueError):
                await client.create(r, -1)


async def test_a_requester_that_went_away_does_not_kill_the_actor(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        send, inbox = trio.open_memory_channel(0)
        await nursery.start(serve_registry, open_store(tmp_path), inbox)
        async with send:
            gone_send, gone_receive = _reply()
            gone_receive.close()  # the requester gave up before the answer
            await send.send(LoadSession(SessionKey("u", "s"), gone_send))

            full_send, _full_receive = trio.open_memory_channel(0)  # nobody receiving
            await send.send(ListSessions("u", 10, 0, full_send))

            closed_send, _closed_receive = _reply()
            closed_send.close()
            await send.send(DeleteSession(SessionKey("u", "s"), closed_send))

            gone_save, gone_save_receive = _reply()
            gone_save_receive.close()
            await send.send(SaveSession(record("u", "gone"), gone_save))

            await send.send(object())  # not a registry message at all

            client = RegistryClient(send)
            await client.save(record("u", "s"))
            assert await client.load(SessionKey("u", "s")) == record("u", "s")
            # A save whose requester left is still written.
            assert await client.load(SessionKey("u", "gone")) == record("u", "gone")


async def test_a_cancelled_requester_does_not_kill_the_actor(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        store = BlockingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(0)
        await nursery.start(serve_registry, store, inbox)
        async with send:
            client = RegistryClient(send)
            with trio.move_on_after(0.05):
                await client.load(SessionKey("u", "slow"))  # blocks in the worker thread
            store.release.set()
            assert await client.list_for_user("u", 10) == SessionPage((), 0)


class FailingStore(SqliteSessionTable):
    """Fails for the user ``broken``: StoreUnavailable, or ValueError (a bug) for ``buggy``."""

    def _fail(self, user_id):
        if user_id == "broken":
            raise StoreUnavailable(f"session store {self.path}: disk on fire")
        if user_id == "buggy":
            raise ValueError("oops")

    def load(self, key):
        self._fail(key.user_id)
        return super().load(key)

    def save_many(self, records, **options):
        for r in records:
            self._fail(r.user_id)
        return super().save_many(records, **options)

    def create(self, record, max_per_user, in_use=None):
        self._fail(record.user_id)
        return super().create(record, max_per_user, in_use)

    def delete(self, key):
        self._fail(key.user_id)
        return super().delete(key)

    def list_for_user(self, user_id, limit, offset=0):
        self._fail(user_id)
        return super().list_for_user(user_id, limit, offset)


async def test_store_errors_are_answered_and_the_actor_carries_on(tmp_path, nursery, caplog):
    caplog.set_level(logging.ERROR, logger="claude_code_api.actors.registry")
    with trio.fail_after(TIMEOUT):
        send, inbox = trio.open_memory_channel(0)
        await nursery.start(serve_registry, FailingStore(tmp_path / DB_FILENAME), inbox)
        async with send:
            client = RegistryClient(send)
            broken = SessionKey("broken", "s")
            with pytest.raises(StoreUnavailable, match="disk on fire"):
                await client.load(broken)
            with pytest.raises(StoreUnavailable, match="disk on fire"):
                await client.delete(broken)
            with pytest.raises(StoreUnavailable, match="disk on fire"):
                await client.list_for_user("broken", 10)
            with pytest.raises(StoreUnavailable, match="ValueError: oops"):
                await client.load(SessionKey("buggy", "s"))
            # Saves are acknowledged: a failed write fails the request that needed it.
            with pytest.raises(StoreUnavailable, match="disk on fire"):
                await client.save(record("broken", "s"))
            with pytest.raises(StoreUnavailable, match="ValueError: oops"):
                await client.save(record("buggy", "s"))
            with pytest.raises(StoreUnavailable, match="disk on fire"):
                await client.create(record("broken", "s"), 10)

            ok = record("fine", "s")
            await client.save(ok)
            assert await client.load(ok.key) == ok

    logged = caplog.text
    assert "disk on fire" in logged and "save" in logged and "oops" in logged


async def test_queued_requests_are_answered_when_the_inbox_closes(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(8)
        records = [record("u", f"s{i}", last=float(i)) for i in range(5)]
        replies = [_reply() for _ in records]
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_registry, store, inbox)
            async with send:
                for r, (reply, _) in zip(records, replies, strict=True):
                    send.send_nowait(SaveSession(r, reply))  # still queued when we close
        # serve_registry returned on its own: the nursery exited.
        for _, answers in replies:
            assert answers.receive_nowait() is None  # each was acknowledged
        assert store.closed and store.calls[-1] == ("close", None)
        assert store.names() == ["save", "close"]  # one transaction for the five
        assert not (tmp_path / f"{DB_FILENAME}-wal").exists()

        reopened = open_store(tmp_path)
        try:
            assert listed(reopened, "u") == records[::-1]
        finally:
            reopened.close()


async def test_the_store_is_closed_when_the_actor_is_cancelled(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(0)
        async with send:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_registry, store, inbox)
                await RegistryClient(send).save(record())
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            assert store.closed
            assert store.names() == ["save", "close"]
            # The inbox belongs to the supervision tree: once its owner closes the
            # receive end, requests fail fast instead of hanging.
            inbox.close()
            with pytest.raises(trio.BrokenResourceError):
                send.send_nowait(SaveSession(record(), _reply()[0]))
            with pytest.raises(StoreUnavailable, match="not running"):
                await RegistryClient(send).load(SessionKey("a", "b"))
            with pytest.raises(StoreUnavailable, match="not running"):
                await RegistryClient(send).save(record())


class BlockingStore(RecordingStore):
    """``load`` of session ``slow`` blocks its thread until ``release`` is set (max 5 s)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def load(self, key):
        if key.session_id == "slow":
            self.entered.set()
            self.released_in_time = self.release.wait(timeout=5)
            self.calls.append(("load finished", key))
        return super().load(key)


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await trio.sleep(0.001)


async def test_store_calls_but_saves_run_in_a_worker_thread_and_the_loop_stays_free(
    tmp_path, nursery
):
    with trio.fail_after(TIMEOUT):
        store = BlockingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(0)
        await nursery.start(serve_registry, store, inbox)
        async with send:
            client = RegistryClient(send)
            answers = []

            async def slow_load():
                answers.append(await client.load(SessionKey("u", "slow")))

            nursery.start_soon(slow_load)
            # While the store is stuck inside load, the trio loop keeps running
            # this task: if load ran on the trio thread we could not get here,
            # and the wait in load would time out (released_in_time False).
            await _until(store.entered)
            ticks = 0
            with trio.move_on_after(0.05):
                while True:
                    await trio.sleep(0)
                    ticks += 1
            assert ticks > 10
            store.release.set()
            await client.save(record("u", "fast"))
            page = await client.list_for_user("u", 10)
            assert page.records == (record("u", "fast"),)

        assert answers == [None]
        assert store.released_in_time is True
        here = threading.get_ident()
        assert here not in store.threads_of["load"] | store.threads_of["list"]
        # A save is a WAL append (no sync): on the trio thread, no thread switches.
        assert store.threads_of["save"] == {here}


async def test_cancelling_the_actor_waits_for_the_running_call_before_closing(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = BlockingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(4)
        async with send, trio.open_nursery() as nursery:
            await nursery.start(serve_registry, store, inbox)
            reply, answers = _reply()
            await send.send(LoadSession(SessionKey("u", "slow"), reply))
            await _until(store.entered)
            # Queued behind the running call; never handled.
            queued_reply, queued_answers = _reply()
            await send.send(SaveSession(record("u", "queued"), queued_reply))
            nursery.cancel_scope.cancel()  # while the worker thread is inside load
            with trio.CancelScope(shield=True):
                await trio.testing.wait_all_tasks_blocked()  # the cancel reached the actor
                assert not store.closed
                store.release.set()
        # Never two threads in the store: close came after load finished.
        assert store.names()[-3:] == ["load finished", "load", "close"]
        assert store.released_in_time is True
        # The running call finished, so it was answered; the queued one was refused.
        assert answers.receive_nowait() is None
        with pytest.raises(trio.EndOfChannel):
            queued_answers.receive_nowait()
        assert "save" not in store.names()
