"""Database access under trio: transactions, errors, and reconnecting by itself."""

from __future__ import annotations

import psycopg
import pytest
import trio

from claude_code_api.store import database as database_module
from claude_code_api.store.database import Database, DatabaseUnavailable, open_database
from tests.postgres.support import TIMEOUT, Databases, TcpLink, terminate_backends


def backend_pid(connection: psycopg.Connection) -> int:
    row = connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


async def test_work_is_one_transaction(database: Database) -> None:
    def write_then_fail(connection: psycopg.Connection) -> None:
        connection.execute("CREATE TABLE scratch (n int)")
        connection.execute("INSERT INTO scratch VALUES (1)")
        raise LookupError("work failed")

    def scratch_exists(connection: psycopg.Connection) -> bool:
        row = connection.execute("SELECT to_regclass('scratch') IS NOT NULL").fetchone()
        return bool(row and row[0])

    with trio.fail_after(TIMEOUT):
        # What the work raises propagates as it is, and nothing it did stays.
        with pytest.raises(LookupError, match="work failed"):
            await database.run(write_then_fail)
        assert not await database.run(scratch_exists)


async def test_no_server_is_database_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database_module, "CONNECT_TIMEOUT_S", 1.0)
    with trio.socket.socket() as unused:  # a port nobody listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        started = trio.current_time()
        with pytest.raises(DatabaseUnavailable):
            async with open_database(f"postgresql://postgres@127.0.0.1:{port}/test"):
                pass  # pragma: no cover
        # Within the connect timeout (and the pool's last back-off), not minutes.
        assert trio.current_time() - started < 10


async def test_terminated_connections_are_replaced(shared_url: str, database: Database) -> None:
    with trio.fail_after(TIMEOUT):
        before = await database.run(backend_pid)
        assert await trio.to_thread.run_sync(terminate_backends, shared_url) >= 1
        # The pool lends no connection the server dropped: the next work just runs.
        after = await database.run(backend_pid)
        assert after != before


async def test_connection_lost_mid_work_is_unavailable_then_recovers(database: Database) -> None:
    def terminate_own_backend(connection: psycopg.Connection) -> None:
        connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with trio.fail_after(TIMEOUT):
        with pytest.raises(DatabaseUnavailable, match="terminat"):
            await database.run(terminate_own_backend)
        assert await database.run(backend_pid) > 0


async def first_success(database: Database) -> float:
    """Run work until it succeeds; how long that took."""
    started = trio.current_time()
    while True:
        try:
            await database.run(backend_pid)
        except DatabaseUnavailable:
            await trio.sleep(0.1)
        else:
            return trio.current_time() - started


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_reconnects_by_itself_when_the_database_returns(
    databases: Databases, link: TcpLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(database_module, "RECONNECT_TIMEOUT_S", 2.0)
    name = databases.create().rpartition("/")[2]
    with trio.fail_after(TIMEOUT):
        async with open_database(link.url(name)) as database:
            assert await database.run(backend_pid) > 0
            link.cut()
            # Away longer than the pool keeps trying: it gives up once, at least.
            with trio.move_on_after(8):
                while True:
                    with pytest.raises(DatabaseUnavailable):
                        await database.run(backend_pid)
            link.restore()
            # The same Database, never reopened: it works again within a connect timeout
            # and the first reconnect back-off, not after a back-off grown during the outage.
            assert await first_success(database) < 1.0 + 2.0
