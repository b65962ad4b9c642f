"""The registry actor's write path and lifecycle: group commit, acknowledged saves,
storage health, the per-user bound, transcripts deleted with their records, expiry.

Collaboration tests: the real actor over a real store under ``tmp_path``. The
expiry tests run on trio's MockClock (jumped by hand) with the store's wall clock
injected as ``1000 + trio.current_time()``.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from claude_code_api.actors import registry as registry_module
from claude_code_api.actors.registry import LoadSession, SaveSession, serve_registry
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.messages import SessionKey
from claude_code_api.observe import metrics
from claude_code_api.store import (
    SessionExists,
    SessionPage,
    StoreBusy,
    StoreUnavailable,
    TooManySessions,
    open_store,
)
from claude_code_api.store.sqlite import DB_FILENAME
from tests.collab.test_registry import BlockingStore, RecordingStore, _full, _huge, _reply, record

TIMEOUT = 10
LOGGER = "claude_code_api.actors.registry"


async def _start(nursery, store, *, buffer=64, **options) -> RegistryClient:
    send, inbox = trio.open_memory_channel(buffer)
    await nursery.start(lambda **kw: serve_registry(store, inbox, **options, **kw))
    return RegistryClient(send)


# --- group commit -----------------------------------------------------------


async def test_saves_queued_together_are_committed_in_one_transaction(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        store = BlockingStore(tmp_path / DB_FILENAME)
        client = await _start(nursery, store)
        records = [record("u", f"s{i:02d}") for i in range(20)]
        done = []

        async def save(r):
            await client.save(r)
            done.append(r.session_id)

        nursery.start_soon(client.load, SessionKey("u", "slow"))  # holds the store
        await _until_set(store.entered)
        for r in records:
            nursery.start_soon(save, r)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []  # nothing is acknowledged before it is committed
        store.release.set()
        while len(done) < 20:
            await trio.sleep(0.001)
        assert store.names().count("save") == 1  # one call, one transaction, for all
        assert sorted(store.calls[-1][1]) == [r.session_id for r in records]
        page = await client.list_for_user("u", 100)
        assert sorted(page.records, key=lambda r: r.session_id) == records


async def test_a_batch_stops_at_the_first_other_request_so_order_is_kept(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        store = BlockingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(16)
        await nursery.start(serve_registry, store, inbox)
        a, b, c = record("u", "a"), record("u", "b"), record("u", "c")
        replies = [_reply() for _ in range(5)]
        messages = [
            LoadSession(SessionKey("u", "slow"), replies[0][0]),
            SaveSession(a, replies[1][0]),
            LoadSession(b.key, replies[2][0]),  # before b is saved: None
            SaveSession(b, replies[3][0]),
            SaveSession(c, replies[4][0]),
        ]
        for m in messages:
            send.send_nowait(m)
        store.release.set()
        answers = [await receive.receive() for _, receive in replies]
        assert answers == [None, None, None, None, None]
        assert store.calls[-4:] == [
            ("load", SessionKey("u", "slow")), ("save", ["a"]), ("load", b.key),
            ("save", ["b", "c"]),
        ]  # fmt: skip


async def test_batches_are_bounded(tmp_path, nursery, monkeypatch):
    monkeypatch.setattr(registry_module, "MAX_SAVE_BATCH", 3)
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(16)
        replies = [_reply() for _ in range(7)]
        for i, (reply, _) in enumerate(replies):
            send.send_nowait(SaveSession(record("u", f"s{i}"), reply))
        await nursery.start(serve_registry, store, inbox)
        for _, receive in replies:
            assert await receive.receive() is None
        assert [len(ids) for name, ids in store.calls if name == "save"] == [3, 3, 1]


class FailForUser(RecordingStore):
    """Saves of a batch that holds a record of user ``broken`` fail with StoreUnavailable."""

    def save_many(self, records, **options):
        if any(r.user_id == "broken" for r in records):
            raise StoreUnavailable(f"session store {self.path}: disk on fire")
        return super().save_many(records, **options)


async def test_a_failed_batch_fails_every_save_in_it(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        store = FailForUser(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(16)
        replies = [_reply() for _ in range(3)]
        batch = [record("u", "a"), record("broken", "b"), record("u", "c")]
        for r, (reply, _) in zip(batch, replies, strict=True):
            send.send_nowait(SaveSession(r, reply))
        await nursery.start(serve_registry, store, inbox)
        errors = [await receive.receive() for _, receive in replies]
        assert all(isinstance(e, StoreUnavailable) and "disk on fire" in str(e) for e in errors)
        assert len({id(e) for e in errors}) == 3  # each requester raises its own
        client = RegistryClient(send)
        assert await client.list_for_user("u", 10) == SessionPage((), 0)  # all or nothing


# --- storage failures and health --------------------------------------------


async def test_a_full_disk_fails_saves_and_reports_health(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        health: list[str | None] = []
        client = await _start(nursery, store, on_health=health.append)
        await client.save(record("u", "a"))
        assert health == []  # healthy from the start: nothing to report
        with _full(store):  # the actor is idle: no other thread uses the store
            with pytest.raises(StoreUnavailable, match="disk is full"):
                await client.save(_huge("u", "b"))
            with pytest.raises(StoreUnavailable, match="disk is full"):
                await client.create(_huge("u", "c"), 10)
            assert await client.load(SessionKey("u", "a")) == record("u", "a")  # reads work
        assert len(health) == 1 and "disk is full" in health[0]  # once, not per failure
        assert str(tmp_path / DB_FILENAME) in health[0]
        await client.save(_huge("u", "b"))  # space again
        assert health[1:] == [None]
        assert (await client.load(SessionKey("u", "b"))) == _huge("u", "b")


async def test_a_deleted_database_fails_every_write_and_reports_health(tmp_path, nursery, caplog):
    caplog.set_level(logging.ERROR, logger=LOGGER)
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        health: list[str | None] = []
        client = await _start(nursery, store, on_health=health.append)
        kept = record("u", "kept")
        await client.save(kept)
        (tmp_path / DB_FILENAME).unlink()
        with pytest.raises(StoreUnavailable, match="deleted.*restart the service"):
            await client.save(record("u", "lost"))
        with pytest.raises(StoreUnavailable, match="deleted"):
            await client.create(record("u", "lost"), 10)
        with pytest.raises(StoreUnavailable, match="deleted"):
            await client.delete(kept.key)
        assert len(health) == 1 and "deleted" in health[0] and "restart" in health[0]
        assert "deleted" in caplog.text  # logged too


async def test_a_failing_health_callback_is_logged_and_ignored(tmp_path, nursery, caplog):
    caplog.set_level(logging.ERROR, logger=LOGGER)
    with trio.fail_after(TIMEOUT):

        def broken(reason):
            raise ValueError("health sink is broken")

        client = await _start(nursery, open_store(tmp_path), on_health=broken)
        (tmp_path / DB_FILENAME).unlink()
        with pytest.raises(StoreUnavailable, match="deleted"):
            await client.save(record())
        assert "health sink is broken" in caplog.text
        assert await client.load(record().key) is None  # still serving


# --- the per-user bound -----------------------------------------------------


async def test_create_is_bounded_per_user_even_when_racing(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        client = await _start(nursery, open_store(tmp_path))
        outcomes: dict[str, str] = {}

        async def create(n):
            try:
                await client.create(record("u", f"s{n}"), 3)
                outcomes[f"s{n}"] = "created"
            except TooManySessions:
                outcomes[f"s{n}"] = "refused"

        async with trio.open_nursery() as racers:
            for n in range(10):
                racers.start_soon(create, n)
        assert sorted(outcomes.values()) == ["created"] * 3 + ["refused"] * 7
        page = await client.list_for_user("u", 100)
        assert page.total == 3
        assert {r.session_id for r in page.records} == {
            s for s, o in outcomes.items() if o == "created"
        }
        await client.create(record("other", "s0"), 3)  # other users are not counted

        existing = page.records[0]
        with pytest.raises(SessionExists):
            await client.create(attrs.evolve(existing, turns=7), 100)
        assert await client.load(existing.key) == existing  # unchanged


# --- transcripts ------------------------------------------------------------


class Transcripts:
    """A fake ``remove_transcripts``: a file and a directory per CLI session id, under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.threads: set[int] = set()

    def __call__(self, user_id: str, claude_session_id: str) -> None:
        self.threads.add(threading.get_ident())
        if claude_session_id == "unlisted":
            raise OSError("cannot list transcripts")
        if claude_session_id == "broken":
            raise ValueError("a bug in the remover")
        file, directory = self._paths(user_id, claude_session_id)
        file.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def _paths(self, user_id: str, claude_session_id: str) -> list[Path]:
        base = self.root / user_id
        return [base / f"{claude_session_id}.jsonl", base / claude_session_id]

    def make(self, user_id: str, claude_session_id: str) -> None:
        file, directory = self._paths(user_id, claude_session_id)
        directory.mkdir(parents=True)
        (directory / "tool-output.txt").write_text("x")
        file.write_text("{}\n")

    def present(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")}


async def test_delete_removes_the_transcripts_of_every_claude_session_id(tmp_path, nursery, caplog):
    caplog.set_level(logging.ERROR, logger=LOGGER)
    with trio.fail_after(TIMEOUT):
        transcripts = Transcripts(tmp_path / "projects")
        client = await _start(nursery, open_store(tmp_path), remove_transcripts=transcripts)
        gone = attrs.evolve(
            record("u", "gone"),
            claude_session_id="now",
            previous_claude_session_ids=("before", "unlisted", "broken", "never-written"),
        )
        kept = attrs.evolve(record("u", "kept"), claude_session_id="other")
        for claude_id in ("now", "before", "other"):
            transcripts.make("u", claude_id)
        await client.save(gone)
        await client.save(kept)

        assert await client.delete(gone.key) is True
        # Files and directories of the current and previous ids are gone; missing
        # ones are fine; a failing lookup is logged and does not stop the rest.
        assert transcripts.present() == {"u", "u/other.jsonl", "u/other", "u/other/tool-output.txt"}
        assert "cannot list transcripts" in caplog.text and "a bug in the remover" in caplog.text
        assert threading.get_ident() not in transcripts.threads  # in the worker thread
        assert await client.delete(gone.key) is False


async def test_a_create_at_the_bound_evicts_the_least_recently_used_hibernated_session(
    tmp_path, nursery, caplog
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with trio.fail_after(TIMEOUT):
        transcripts = Transcripts(tmp_path / "projects")
        in_use: dict[str, frozenset[str]] = {"u": frozenset({"oldest"})}
        counts: list[int] = []
        client = await _start(
            nursery,
            open_store(tmp_path),
            remove_transcripts=transcripts,
            sessions_in_use=lambda user: in_use.get(user, frozenset()),
            on_count=counts.append,
        )
        for name, last in (("oldest", 1.0), ("older", 2.0), ("newer", 3.0)):
            r = attrs.evolve(record("u", name, last=last), claude_session_id=f"c-{name}")
            transcripts.make("u", r.claude_session_id)
            await client.create(r, 3)
        evicted_before = metrics.SESSIONS_EVICTED._value.get()

        await client.create(record("u", "fourth", last=4.0), 3)  # at the bound: room is made

        page = await client.list_for_user("u", 10)
        assert {r.session_id for r in page.records} == {"oldest", "newer", "fourth"}
        assert "u/c-older.jsonl" not in transcripts.present()  # its files went with it
        assert "u/c-oldest.jsonl" in transcripts.present()  # in use: kept
        assert metrics.SESSIONS_EVICTED._value.get() == evicted_before + 1
        assert "evicted session 'older' of user 'u'" in caplog.text
        assert counts[-1] == 3  # one in, one out

        in_use["u"] = frozenset({"oldest", "newer", "fourth"})
        with pytest.raises(TooManySessions, match="every one is live"):
            await client.create(record("u", "fifth"), 3)
        assert (await client.list_for_user("u", 10)).total == 3


async def test_a_delete_that_fails_keeps_the_transcripts(tmp_path, nursery):
    with trio.fail_after(TIMEOUT):
        transcripts = Transcripts(tmp_path / "projects")
        client = await _start(nursery, open_store(tmp_path), remove_transcripts=transcripts)
        r = attrs.evolve(record("u", "s"), claude_session_id="now")
        transcripts.make("u", "now")
        await client.save(r)
        (tmp_path / DB_FILENAME).unlink()
        with pytest.raises(StoreUnavailable, match="deleted"):
            await client.delete(r.key)
        assert "u/now.jsonl" in transcripts.present()


# --- expiry -----------------------------------------------------------------

TTL_S = 100.0  # the sweep runs every 10 s
EPOCH = 1000.0


def _wall_clock() -> float:
    return EPOCH + trio.current_time()


async def _jump_to(clock: trio.testing.MockClock, t: float) -> None:
    """Move time to ``t``; let a sweep that falls due start before the caller's next request.

    Times are exact binary fractions, so a sweep due at ``t`` is due at ``t``.
    """
    clock.jump(t - trio.current_time())
    assert trio.current_time() == t
    await trio.testing.wait_all_tasks_blocked()


def _expired(store: RecordingStore) -> list[int]:
    return [n for name, n in store.calls if name == "expire"]


async def test_expiry_sweeps_at_start_up_and_every_tenth_of_the_ttl(
    tmp_path, nursery, mock_clock, caplog
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    mock_clock.autojump_threshold = 5  # only if the test hangs: lets fail_after fire
    with trio.fail_after(TIMEOUT * 100):
        store = RecordingStore(tmp_path / DB_FILENAME)
        transcripts = Transcripts(tmp_path / "projects")
        old = attrs.evolve(record("u", "old", last=850.0), claude_session_id="old-cid")
        fresh = record("u", "fresh", last=950.0)
        recent = record("u", "recent", last=1040.0)
        store.save_many([old, fresh, recent])
        transcripts.make("u", "old-cid")

        client = await _start(
            nursery,
            store,
            ttl_s=TTL_S,
            wall_clock=_wall_clock,
            remove_transcripts=transcripts,
        )

        async def sessions() -> set[str]:
            return {r.session_id for r in (await client.list_for_user("u", 10)).records}

        # At start-up (t=0, cutoff 900): the old one goes, with its transcripts.
        assert await sessions() == {"fresh", "recent"}
        assert _expired(store) == [1]
        assert transcripts.present() == {"u"}
        assert "expired 1 sessions" in caplog.text

        await _jump_to(mock_clock, 9.75)
        await sessions()
        assert _expired(store) == [1]  # not due yet
        for t in (10, 20, 30, 40, 50):  # cutoff 910 .. 950; 950 is not older than 950
            await _jump_to(mock_clock, t)
            assert await sessions() == {"fresh", "recent"}
        assert _expired(store) == [1, 0, 0, 0, 0, 0]
        assert caplog.text.count("expired") == 1  # a sweep with nothing to expire is quiet

        await _jump_to(mock_clock, 60)  # cutoff 960
        assert await sessions() == {"recent"}
        assert _expired(store) == [1, 0, 0, 0, 0, 0, 1]


async def test_each_sweep_has_the_homes_of_users_without_sessions_removed(
    tmp_path, nursery, mock_clock
):
    mock_clock.autojump_threshold = 5
    with trio.fail_after(TIMEOUT * 100):
        store = RecordingStore(tmp_path / DB_FILENAME)
        store.save_many([record("u", "old", last=850.0), record("v", "kept", last=1040.0)])
        calls: list[tuple[frozenset[str], float]] = []

        def remove_homes(user_ids, before):
            calls.append((user_ids, before))
            return 0

        client = await _start(
            nursery, store, ttl_s=TTL_S, wall_clock=_wall_clock, remove_homes=remove_homes
        )
        await client.load(SessionKey("u", "s"))
        # After the start-up sweep (cutoff 900): u's last session expired, v has one.
        assert calls == [(frozenset({"v"}), 900.0)]
        await _jump_to(mock_clock, 10)
        await client.load(SessionKey("u", "s"))
        assert calls[-1] == (frozenset({"v"}), 910.0)


async def test_the_sweep_interval_is_at_most_an_hour(tmp_path, nursery, mock_clock):
    mock_clock.autojump_threshold = 5
    with trio.fail_after(TIMEOUT * 10_000):
        store = RecordingStore(tmp_path / DB_FILENAME)
        client = await _start(nursery, store, ttl_s=30 * 24 * 3600.0, wall_clock=_wall_clock)
        await client.load(SessionKey("u", "s"))
        assert len(_expired(store)) == 1  # at start-up
        await _jump_to(mock_clock, 3599.5)
        await client.load(SessionKey("u", "s"))
        assert len(_expired(store)) == 1
        await _jump_to(mock_clock, 3600)
        await client.load(SessionKey("u", "s"))
        assert len(_expired(store)) == 2


async def test_a_long_sweep_takes_turns_with_requests(tmp_path, nursery, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(registry_module, "EXPIRE_CHUNK", 2)
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        store.save_many([record("u", f"s{i}", last=float(i)) for i in range(5)])
        store.calls.clear()
        send, inbox = trio.open_memory_channel(8)
        reply, answer = _reply()
        send.send_nowait(LoadSession(SessionKey("u", "s4"), reply))  # waiting from the start
        await nursery.start(
            lambda **kw: serve_registry(store, inbox, ttl_s=1.0, wall_clock=lambda: 1e9, **kw)
        )
        assert await answer.receive() == record("u", "s4", last=4.0)  # before the sweep ended
        client = RegistryClient(send)
        while sum(_expired(store)) < 5:  # counted in the thread, before the actor logs
            await client.list_for_user("u", 10)
        await client.list_for_user("u", 10)  # answered after the last chunk was handled
        # The request waiting at start-up was answered between the first two chunks.
        assert store.calls[:3] == [("expire", 2), ("load", SessionKey("u", "s4")), ("expire", 2)]
        assert _expired(store) == [2, 2, 1]
        assert caplog.text.count("expired 5 sessions") == 1  # one line per sweep


async def test_a_failing_sweep_reports_health_and_the_actor_carries_on(
    tmp_path, nursery, mock_clock
):
    mock_clock.autojump_threshold = 5
    with trio.fail_after(TIMEOUT * 100):
        store = RecordingStore(tmp_path / DB_FILENAME)
        health: list[str | None] = []
        client = await _start(
            nursery, store, ttl_s=TTL_S, wall_clock=_wall_clock, on_health=health.append
        )
        await client.load(SessionKey("u", "s"))
        (tmp_path / DB_FILENAME).unlink()
        await _jump_to(mock_clock, 10)
        assert await client.load(SessionKey("u", "s")) is None
        assert len(health) == 1 and "deleted" in health[0]  # seen without any request writing


async def test_ttl_must_be_positive(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = open_store(tmp_path)
        _send, inbox = trio.open_memory_channel(0)
        with pytest.raises(ValueError, match="ttl_s"):
            await serve_registry(store, inbox, ttl_s=0)
        with pytest.raises(StoreUnavailable, match="closed"):  # it owned the store: closed
            store.load(SessionKey("u", "s"))


# --- cancellation -----------------------------------------------------------


class SlowSaveStore(BlockingStore):
    """The database is locked: a save that would not wait is refused, one that waits
    (in a worker thread) blocks until ``release`` is set (max 5 s)."""

    def save_many(self, records, *, wait=True):
        if not wait:
            raise StoreBusy(f"session store {self.path}: database is locked")
        self.entered.set()
        self.released_in_time = self.release.wait(timeout=5)
        return super().save_many(records)


async def test_a_save_in_progress_when_cancelled_is_answered_truthfully(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = SlowSaveStore(tmp_path / DB_FILENAME)
        outcome: list[object] = []
        send, inbox = trio.open_memory_channel(4)
        async with send:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_registry, store, inbox)

                async def save():
                    with trio.CancelScope(shield=True):  # the requester outlives the registry
                        try:
                            await RegistryClient(send).save(record("u", "s"))
                            outcome.append("acknowledged")
                        except StoreUnavailable as exc:
                            outcome.append(exc)

                nursery.start_soon(save)
                await _until_set(store.entered)
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.testing.wait_all_tasks_blocked()
                    store.release.set()
        assert outcome == ["acknowledged"]  # it was committed, so it says so
        reopened = open_store(tmp_path)
        try:
            assert reopened.load(SessionKey("u", "s")) == record("u", "s")
        finally:
            reopened.close()


async def test_a_busy_registry_still_stops_when_cancelled(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        send, inbox = trio.open_memory_channel(1000)
        replies = [_reply() for _ in range(1000)]
        for i, (reply, _) in enumerate(replies):
            send.send_nowait(LoadSession(SessionKey("u", f"s{i}"), reply))
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_registry, store, inbox)
            nursery.cancel_scope.cancel()
        handled = store.names().count("load")
        assert 1 <= handled < 1000
        for _, answers in replies[:handled]:
            assert answers.receive_nowait() is None  # answered, then the cancel took effect
        for _, answers in replies[handled:]:
            with pytest.raises(trio.EndOfChannel):  # refused at once, not left hanging
                answers.receive_nowait()


async def _until_set(event: threading.Event) -> None:
    while not event.is_set():
        await trio.sleep(0.001)


# --- saves on the trio thread, checkpoints in a worker thread ---------------


async def test_a_save_waits_in_a_worker_thread_while_another_connection_holds_the_lock(
    tmp_path, nursery
):
    with trio.fail_after(TIMEOUT):
        store = RecordingStore(tmp_path / DB_FILENAME)
        client = await _start(nursery, store)
        other = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # e.g. a second service on the same data dir
        saved = trio.Event()

        async def save() -> None:
            await client.save(record("u", "s"))
            saved.set()

        nursery.start_soon(save)
        ticks = 0
        with trio.move_on_after(0.2):  # the trio thread is not the one waiting
            while True:
                await trio.sleep(0)
                ticks += 1
        assert ticks > 10 and not saved.is_set()
        other.execute("ROLLBACK")
        other.close()
        await saved.wait()
        assert await client.load(SessionKey("u", "s")) == record("u", "s")
        here = threading.get_ident()
        assert len(store.threads_of["save"]) == 2 and here in store.threads_of["save"]


async def test_checkpoints_run_in_a_worker_thread_every_so_many_commits(
    tmp_path, nursery, monkeypatch
):
    monkeypatch.setattr(registry_module, "CHECKPOINT_EVERY", 3)

    class CheckpointRecorder(RecordingStore):
        def checkpoint(self):
            self._note("checkpoint", None)
            return super().checkpoint()

    with trio.fail_after(TIMEOUT):
        store = CheckpointRecorder(tmp_path / DB_FILENAME)
        (autocheckpoint,) = store._db.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert autocheckpoint == 0  # never inside a save on the trio thread
        client = await _start(nursery, store)
        for i in range(7):
            await client.save(record("u", f"s{i}"))
        assert store.names().count("checkpoint") == 2  # after the 3rd and the 6th
        assert threading.get_ident() not in store.threads_of["checkpoint"]
        wal = Path(f"{tmp_path / DB_FILENAME}-wal")
        assert wal.stat().st_size > 0
        # Everything reached the database file: a fresh reader sees it without the WAL.
        store.checkpoint()
        copy = tmp_path / "copy.db"
        copy.write_bytes((tmp_path / DB_FILENAME).read_bytes())
        (count,) = sqlite3.connect(copy).execute("SELECT count(*) FROM sessions").fetchone()
        assert count == 7
