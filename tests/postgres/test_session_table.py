"""PostgresSessionTable beyond the store contract (tests/contract runs that on it too): the
escaped keys, the password kept out of messages, the database going away and coming back,
a schema too new. The service on DATABASE_URL is tests/postgres/test_session_table_service.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import trio

from claude_code_api.messages import SessionKey
from claude_code_api.store import SessionRecord, StoreBusy, StoreUnavailable
from claude_code_api.store.postgres import (
    PostgresSessionTable,
    decode_text,
    describe,
    encode_text,
    open_postgres_table,
)
from claude_code_api.store.schema import LATEST_VERSION
from tests.postgres.support import TIMEOUT, TcpLink

PASSWORD = "s3cret-pw"
ODD = ["", "\x00", "\x01", "\x01\x01", "a\x00b\x01c", "\ud800", "x\udfff\x00", "\x02", "ü😀"]


def record(user: str = "u", session: str = "s", last: float = 1.0) -> SessionRecord:
    return SessionRecord(user, session, "cid", created_at=0.0, last_activity=last)


@pytest.fixture
def table(fresh_url: str) -> Iterator[PostgresSessionTable]:
    opened = open_postgres_table(fresh_url)
    try:
        yield opened
    finally:
        opened.close()


def test_escaping_round_trips_every_string_and_keeps_code_point_order() -> None:
    assert [decode_text(encode_text(text)) for text in ODD] == ODD
    assert all("\x00" not in encode_text(text) for text in ODD)
    assert encode_text("plain-id_1.2:3") == "plain-id_1.2:3"  # stored as it is
    rng = random.Random(22)
    alphabet = "\x00\x01\x02ab\x7f\xff\u0100😀"
    texts = ["".join(rng.choices(alphabet, k=rng.randrange(6))) for _ in range(2000)]
    assert sorted(texts, key=encode_text) == sorted(texts)
    assert all(decode_text(encode_text(text)) == text for text in texts)


async def test_odd_keys_round_trip_and_sort_by_code_point(table: PostgresSessionTable) -> None:
    with trio.fail_after(TIMEOUT):
        for user in ODD:
            for i, session in enumerate(ODD):
                table.save_many([record(user, session, last=1.0 if i % 2 else 2.0)])
        assert table.user_ids() == set(ODD)
        for user in ODD:
            page = table.list_for_user(user, 100)
            expected = sorted(ODD, key=lambda s: (-(1.0 if ODD.index(s) % 2 else 2.0), s))
            # Lone surrogates sort before "\x02" (the escape's one exception).
            plain = [s for s in expected if not any("\ud800" <= c <= "\udfff" for c in s)]
            assert [r.session_id for r in page.records if r.session_id in plain] == plain
            assert table.load(SessionKey(user, "\ud800")) == record(user, "\ud800", last=1.0)
        assert table.count() == len(ODD) ** 2


async def test_a_save_that_may_not_wait_is_always_busy(table: PostgresSessionTable) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(StoreBusy, match="thread"):
            table.save_many([record()], wait=False)
        assert table.count() == 0


def test_the_location_names_the_database_without_its_password() -> None:
    assert (
        describe(f"postgresql://app:{PASSWORD}@db.internal:6432/service?sslmode=require")
        == "postgresql://app@db.internal:6432/service"
    )
    assert describe("postgres://app@[::1]/service") == "postgresql://app@[::1]/service"


async def test_a_database_that_does_not_answer_is_named_without_its_password() -> None:
    # Nothing listens on port 1: refused at once.
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:1/service"
    with trio.fail_after(TIMEOUT):
        with pytest.raises(StoreUnavailable) as caught:
            await trio.to_thread.run_sync(open_postgres_table, url)
    message = str(caught.value)
    assert message.startswith("session store postgresql://app@127.0.0.1:1/service: ")
    assert "does not answer" in message and "\n" not in message
    assert PASSWORD not in message


async def test_the_database_going_away_is_unavailable_then_it_recovers(
    fresh_url: str, link: TcpLink
) -> None:
    name = urlsplit(fresh_url).path.lstrip("/")
    table = await trio.to_thread.run_sync(open_postgres_table, link.url(name))
    try:
        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(table.create, record("u", "a"), 10)
            link.cut()
            with pytest.raises(StoreUnavailable, match="does not answer"):
                await trio.to_thread.run_sync(table.create, record("u", "b"), 10)
            link.restore()
            # The pool reconnects by itself: retried for a while on a loaded machine.
            while True:
                try:
                    await trio.to_thread.run_sync(table.create, record("u", "b"), 10)
                    break
                except StoreUnavailable:
                    await trio.sleep(0.2)
            assert await trio.to_thread.run_sync(table.count) == 2
    finally:
        await trio.to_thread.run_sync(table.close)


async def test_a_schema_newer_than_the_service_refuses_to_open(fresh_url: str) -> None:
    with psycopg.connect(fresh_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_version (version integer, name text)")
        connection.execute(
            "INSERT INTO schema_version VALUES (%s, 'future')", (LATEST_VERSION + 1,)
        )
    with trio.fail_after(TIMEOUT):
        with pytest.raises(StoreUnavailable, match="run a newer service"):
            await trio.to_thread.run_sync(open_postgres_table, fresh_url)
