"""The schema: created at start-up, upgraded in order, once, with several replicas at once."""

from __future__ import annotations

import psycopg
import pytest
import trio

from claude_code_api.store import schema
from claude_code_api.store.database import open_database
from claude_code_api.store.schema import LATEST_VERSION, MIGRATIONS, Migration, SchemaTooNew
from tests.postgres.support import TIMEOUT


def versions(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT version, name FROM schema_version ORDER BY version")
        return [(int(version), str(name)) for version, name in rows.fetchall()]


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        return {str(row[0]) for row in rows}


EXPECTED = [(migration.version, migration.name) for migration in MIGRATIONS]


def test_migrations_are_numbered_in_order() -> None:
    assert [migration.version for migration in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))


async def test_an_empty_database_gets_the_whole_schema_once(fresh_url: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_database(fresh_url):
            pass
        async with open_database(fresh_url):
            pass
    assert versions(fresh_url) == EXPECTED
    assert {"schema_version", "transcript_sessions", "transcript_entries"} <= tables(fresh_url)


async def test_replicas_starting_at_once_migrate_once(fresh_url: str) -> None:
    async def start_replica() -> None:
        async with open_database(fresh_url):
            await trio.sleep(0)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(start_replica)
    assert versions(fresh_url) == EXPECTED


async def test_a_newer_schema_is_refused(fresh_url: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_database(fresh_url):
            pass
        with psycopg.connect(fresh_url) as connection:
            connection.execute("INSERT INTO schema_version (version, name) VALUES (99, 'future')")
        with pytest.raises(SchemaTooNew, match="version 99; this service knows up to"):
            async with open_database(fresh_url):
                pass  # pragma: no cover


async def test_a_failed_migration_changes_nothing(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Migration(LATEST_VERSION + 1, "broken", ("CREATE TABLE fine (n int)", "NOT SQL"))
    monkeypatch.setattr(schema, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(schema, "LATEST_VERSION", broken.version)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(psycopg.errors.SyntaxError):
            async with open_database(fresh_url):
                pass  # pragma: no cover
    # One transaction: not even the migrations before the broken one stay.
    assert tables(fresh_url) == set()
