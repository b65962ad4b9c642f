"""The session table contract: what every :class:`SessionTable` implementation passes.

Each test gets ``open_table``, which opens a table on one empty storage of its
own; calling it again opens another connection to the same storage (a restarted
service, or a second replica). The implementations are the params of the
``open_table`` fixture: to add one, write a context manager like
:func:`_sqlite` that makes an empty storage, yields the opener and cleans up,
and name it in :data:`BACKENDS`. PostgreSQL's run on this run's database of the
machine's server (``tests/postgres``): without one they are skipped with one line,
and fail instead with ``REQUIRE_POSTGRES=1``.

Error handling is part of the contract: failures are :class:`StoreUnavailable`,
refusals are :class:`TooManySessions` / :class:`SessionExists`, which are not.
The last test runs the registry actor over each implementation, so the seam is
exercised as the service uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import attrs
import psycopg
import pytest
import trio

from claude_code_api.actors.registry import serve_registry
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.messages import RunOptions, SessionKey
from claude_code_api.store import (
    SessionExists,
    SessionPage,
    SessionRecord,
    SessionTable,
    StoreBusy,
    StoreUnavailable,
    TooManySessions,
    open_store,
)
from tests.postgres.support import Databases, require_server

TIMEOUT = 10

Opener = Callable[[], SessionTable]


@contextmanager
def _sqlite(request: pytest.FixtureRequest) -> Iterator[Opener]:
    """An empty data directory; the service's own opener."""
    data_dir = request.getfixturevalue("tmp_path") / "nested" / "data"  # parents are created
    yield lambda: open_store(data_dir)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """This run's database for the suite (tests.postgres.support): skipped in one line
    without a server, failed instead with REQUIRE_POSTGRES=1; dropped at the end."""
    require_server()
    made = Databases()
    try:
        yield made.create()
    finally:
        made.drop_all()


@contextmanager
def _postgres(request: pytest.FixtureRequest) -> Iterator[Opener]:
    """This run's database emptied (every table, whatever the migrations made); the
    service's own opener, which makes the schema again."""
    # Imported here: psycopg is needed only when PostgreSQL is tested.
    from claude_code_api.store.postgres import open_postgres_table

    url = request.getfixturevalue("postgres_url")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE")
        connection.execute("CREATE SCHEMA public")
    yield lambda: open_postgres_table(url)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[Opener]]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(BACKENDS))
def open_table(request: pytest.FixtureRequest) -> Iterator[Opener]:
    with BACKENDS[request.param](request) as opener:
        yield opener


@pytest.fixture
def table(open_table: Opener) -> Iterator[SessionTable]:
    opened = open_table()
    try:
        yield opened
    finally:
        opened.close()


def record(user="alice", session="s1", *, last=100.0, turns=0, cost=0.0, started=False):
    return SessionRecord(
        user_id=user,
        session_id=session,
        claude_session_id=f"cid-{user}-{session}",
        created_at=50.0,
        last_activity=last,
        turns=turns,
        total_cost_usd=cost,
        transcript_started=started,
    )


def listed(table: SessionTable, user_id: str) -> list[SessionRecord]:
    return list(table.list_for_user(user_id, 1000).records)


# --- reads and writes -------------------------------------------------------


async def test_save_load_delete_list_round_trip(table):
    with trio.fail_after(TIMEOUT):
        a1 = record("alice", "s1", last=10.0, turns=3, cost=0.25, started=True)
        a2 = record("alice", "s2", last=30.0)
        a3 = record("alice", "s3", last=20.0)
        b1 = record("bob", "s1", last=40.0)
        for r in (a1, a2, a3, b1):
            table.save_many([r])

        assert table.load(a1.key) == a1
        assert table.load(b1.key) == b1
        assert table.load(SessionKey("alice", "nope")) is None
        assert table.load(SessionKey("carol", "s1")) is None
        assert listed(table, "alice") == [a2, a3, a1]  # latest activity first
        assert listed(table, "carol") == []
        assert table.count() == 4
        assert table.user_ids() == {"alice", "bob"}

        assert table.delete(a2.key) == a2  # the record it had
        assert table.delete(a2.key) is None
        assert table.load(a2.key) is None
        assert table.load(b1.key) == b1  # same session id, other user: untouched
        assert listed(table, "alice") == [a3, a1]
        assert table.count() == 3
        table.delete(b1.key)
        assert table.user_ids() == {"alice"}


async def test_save_is_an_upsert(table):
    with trio.fail_after(TIMEOUT):
        first = record(turns=0, last=1.0)
        table.save_many([first])
        later = attrs.evolve(
            first, last_activity=99.5, turns=4, total_cost_usd=1.5, transcript_started=True
        )
        table.save_many([later])
        assert table.load(first.key) == later
        assert table.count() == 1
        assert listed(table, first.user_id) == [later]


async def test_every_field_round_trips(table):
    with trio.fail_after(TIMEOUT):
        full = attrs.evolve(
            record(last=1234.5678, turns=7, cost=0.123456789, started=True),
            previous_claude_session_ids=["old-1", "old-2"],
            options=RunOptions(model="claude-x", system_prompt="Be brief.", max_turns=3),
        )
        table.save_many([full])
        assert table.load(full.key) == full
        assert table.load(full.key).previous_claude_session_ids == ("old-1", "old-2")
        table.save_many([attrs.evolve(full, previous_claude_session_ids=())])
        assert table.load(full.key).previous_claude_session_ids == ()


async def test_unicode_and_odd_keys_round_trip(table):
    with trio.fail_after(TIMEOUT):
        odd = record("ünï'\"; DROP TABLE sessions; --", "../\x00\U0001f600", last=1.0)
        table.save_many([odd])
        assert table.load(odd.key) == odd
        assert listed(table, odd.user_id) == [odd]
        assert table.count() == 1


async def test_records_survive_closing_and_reopening(open_table):
    with trio.fail_after(TIMEOUT):
        records = [record("u", f"s{i}", last=float(i), turns=i) for i in range(5)]
        table = open_table()
        table.save_many(records)
        table.delete(records[0].key)
        table.close()
        table.close()  # idempotent

        table = open_table()  # the "restarted service"
        try:
            assert table.count() == 4
            assert table.load(records[3].key) == records[3]
            assert table.load(records[0].key) is None
            assert listed(table, "u") == records[:0:-1]
        finally:
            table.close()


async def test_a_second_table_on_the_same_storage_sees_committed_writes(table, open_table):
    with trio.fail_after(TIMEOUT):
        other = open_table()  # another process, or another replica
        try:
            table.save_many([record("u", "a")])
            assert other.load(SessionKey("u", "a")) == record("u", "a")
            other.create(record("u", "b"), 10)
            assert table.list_for_user("u", 10).total == 2
        finally:
            other.close()


async def test_calls_may_come_from_any_thread_one_at_a_time(table):
    with trio.fail_after(TIMEOUT):
        threads: set[int] = set()

        def save(r: SessionRecord) -> None:
            threads.add(threading.get_ident())
            table.save_many([r])

        for i in range(4):
            await trio.to_thread.run_sync(save, record("u", f"s{i}"))
        assert await trio.to_thread.run_sync(table.count) == 4
        assert threading.get_ident() not in threads  # none on the trio thread


async def test_a_save_that_may_not_wait_is_done_or_busy(table):
    """``wait=False`` either commits or raises StoreBusy (the actor then waits in a thread)."""
    with trio.fail_after(TIMEOUT):
        try:
            table.save_many([record("u", "a")], wait=False)
        except StoreBusy:
            assert table.load(SessionKey("u", "a")) is None  # busy: nothing written
            table.save_many([record("u", "a")])
        assert table.load(SessionKey("u", "a")) == record("u", "a")


async def test_checkpoint_changes_no_record(table):
    with trio.fail_after(TIMEOUT):
        table.save_many([record("u", "a"), record("u", "b")])
        table.checkpoint()
        table.checkpoint()
        assert listed(table, "u") == [record("u", "a"), record("u", "b")]


async def test_a_closed_table_raises_store_unavailable_naming_where(table):
    with trio.fail_after(TIMEOUT):
        assert table.location
        table.close()
        for call in (
            lambda: table.load(SessionKey("a", "b")),
            lambda: table.save_many([record()]),
            lambda: table.create(record(), 10),
            lambda: table.list_for_user("a", 10),
        ):
            with pytest.raises(StoreUnavailable, match="closed") as caught:
                call()
            assert table.location in str(caught.value)
            assert "\n" not in str(caught.value)


# --- pages -------------------------------------------------------------------


async def test_list_for_user_pages_latest_first(table):
    with trio.fail_after(TIMEOUT):
        mine = [record("u", f"s{i:02d}", last=float(i % 7)) for i in range(30)]
        table.save_many([*mine, record("other", "s00", last=99.0)])
        expected = sorted(mine, key=lambda r: (-r.last_activity, r.session_id))
        pages = [table.list_for_user("u", 8, offset) for offset in range(0, 40, 8)]
        assert [p.total for p in pages] == [30] * 5
        assert [len(p.records) for p in pages] == [8, 8, 8, 6, 0]
        assert [r for p in pages for r in p.records] == expected
        assert table.list_for_user("u", 0, 0) == SessionPage((), 30)
        assert table.list_for_user("nobody", 10, 0) == SessionPage((), 0)


# --- the per-user bound ------------------------------------------------------


async def test_create_bounds_sessions_per_user(table):
    with trio.fail_after(TIMEOUT):
        table.create(record("u", "a"), 2)
        table.create(record("other", "a"), 2)  # counted per user
        with pytest.raises(SessionExists):
            table.create(attrs.evolve(record("u", "a"), turns=5), 2)
        assert table.load(SessionKey("u", "a")) == record("u", "a")  # unchanged
        table.create(record("u", "b"), 2)
        with pytest.raises(TooManySessions, match="already has 2 sessions") as caught:
            table.create(record("u", "c"), 2)
        assert (caught.value.user_id, caught.value.limit) == ("u", 2)
        assert not isinstance(caught.value, StoreUnavailable)  # a refusal: 429, not 503
        assert table.load(SessionKey("u", "c")) is None
        table.delete(SessionKey("u", "a"))
        table.create(record("u", "c"), 2)  # room again
        # Saving an existing session never counts against the bound.
        table.save_many([attrs.evolve(record("u", "b"), turns=1)])
        assert table.count() == 3
        with pytest.raises(TooManySessions, match="already has 1 session, the most"):
            table.create(record("other", "b"), 1)


async def test_create_at_the_bound_evicts_the_least_recently_used_not_in_use(table):
    with trio.fail_after(TIMEOUT):
        for name, last in (("old", 1.0), ("live", 0.5), ("mid", 2.0), ("new", 3.0)):
            table.create(record("u", name, last=last), 4)
        table.create(record("other", "x", last=0.1), 4)  # another user's: never a candidate
        # "live" is the least recently used, but in use: "old" goes.
        assert table.create(record("u", "n1", last=4.0), 4, {"live"}) == [
            record("u", "old", last=1.0)
        ]
        assert {r.session_id for r in listed(table, "u")} == {"live", "mid", "new", "n1"}
        # A lowered bound: as many go as needed to keep it.
        evicted = table.create(record("u", "n2", last=5.0), 3, {"live", "n1"})
        assert [r.session_id for r in evicted] == ["mid", "new"]
        assert {r.session_id for r in listed(table, "u")} == {"live", "n1", "n2"}
        # Everything in use: refused, saying so, and nothing deleted.
        with pytest.raises(TooManySessions, match="every one is live") as caught:
            table.create(record("u", "n3"), 3, {"live", "n1", "n2"})
        assert caught.value.all_live
        assert table.count() == 4
        # No view of what is in use (None): nothing may go.
        with pytest.raises(TooManySessions, match="already has 3 sessions, the most allowed$"):
            table.create(record("u", "n3"), 3)
        assert table.load(record("other", "x").key) is not None


async def test_evictions_tie_on_activity_by_session_id(table):
    with trio.fail_after(TIMEOUT):
        for name in ("c", "a", "b"):
            table.create(record("u", name, last=1.0), 3)
        assert [r.session_id for r in table.create(record("u", "d", last=2.0), 2, set())] == [
            "a",
            "b",
        ]


async def test_two_replicas_creating_for_one_user_at_once_never_pass_the_bound(open_table):
    """Two tables on one storage (two replicas), each creating in its own thread in step."""
    rounds, bound = 30, 3
    tables = [open_table(), open_table()]
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    totals: list[int] = []
    made: list[str] = []

    def create_in_step(table: SessionTable, name: str, in_use: set[str] | None) -> None:
        try:
            for i in range(rounds):
                barrier.wait()
                try:
                    table.create(record(name[0], f"{name}{i}", last=float(i)), bound, in_use)
                    made.append(f"{name}{i}")
                except TooManySessions:
                    pass
                barrier.wait()
                if name.endswith("a"):
                    totals.append(table.list_for_user(name[0], 1).total)
        except BaseException:
            barrier.abort()  # the other thread fails at once instead of at its timeout
            raise

    try:
        with trio.fail_after(TIMEOUT * 3):
            # Evicting ("u"): each create takes the least recent out, so always `bound` left.
            # Refused at the bound ("v", in_use None): exactly `bound` creates get through.
            for user, in_use in (("u", set()), ("v", None)):
                async with trio.open_nursery() as both:
                    for side, table in zip("ab", tables, strict=True):
                        both.start_soon(
                            trio.to_thread.run_sync, create_in_step, table, user + side, in_use
                        )
        assert max(totals) == bound, totals
        assert tables[0].list_for_user("u", 10).total == bound
        assert len([name for name in made if name.startswith("v")]) == bound
        assert tables[1].list_for_user("v", 10).total == bound
    finally:
        for table in tables:
            table.close()


# --- expiry -----------------------------------------------------------------


async def test_delete_inactive_takes_the_oldest_first(table):
    with trio.fail_after(TIMEOUT):
        records = [record(f"u{i % 3}", f"s{i}", last=float(i)) for i in range(10)]
        table.save_many(records)
        assert table.delete_inactive(5.0, 3) == records[:3]
        assert table.delete_inactive(5.0, 3) == records[3:5]  # 5.0 itself is not before
        assert table.delete_inactive(5.0, 3) == []
        assert table.count() == 5
        assert table.user_ids() == {"u0", "u1", "u2"}


# --- through the registry actor ---------------------------------------------


async def test_the_registry_actor_serves_it(open_table, nursery):
    with trio.fail_after(TIMEOUT):
        send, inbox = trio.open_memory_channel(16)
        counts: list[int] = []
        await nursery.start(
            lambda task_status: serve_registry(
                open_table(), inbox, on_count=counts.append, task_status=task_status
            )
        )
        async with send:
            client = RegistryClient(send)
            await client.create(record("u", "a", last=1.0), 2)
            await client.create(record("u", "b", last=2.0), 2)
            with pytest.raises(TooManySessions):
                await client.create(record("u", "c"), 2)
            with pytest.raises(SessionExists):
                await client.create(record("u", "a"), 2)
            await client.save(record("u", "a", last=3.0, turns=1))
            assert await client.load(SessionKey("u", "a")) == record("u", "a", last=3.0, turns=1)
            page = await client.list_for_user("u", 1)
            assert page == SessionPage((record("u", "a", last=3.0, turns=1),), 2)
            assert await client.delete(SessionKey("u", "b")) is True
            assert await client.delete(SessionKey("u", "b")) is False
        assert counts == [0, 1, 2, 1]
