"""PostgreSQL under trio: a pool of psycopg 3 connections, used from worker threads.

asyncpg and psycopg's async API run on asyncio only, so the service uses psycopg's
blocking API and its connection pool (psycopg_pool) and calls them from worker
threads: :meth:`Database.run` from trio tasks (``trio.to_thread``), and
:meth:`Database.call` inside a thread the caller started, e.g. the SDK's anyio tasks
through ``anyio.to_thread`` (see :mod:`claude_code_api.store.transcripts`). Only
this package imports psycopg, and only when ``DATABASE_URL`` is set.

Resource handling: :func:`open_database` owns the pool: it opens it, brings the
schema up to date (:mod:`claude_code_api.store.schema`) and closes it on the way
out. Every unit of work borrows one connection for one transaction and gives it
back. The pool checks a connection before lending it, so connections the server
dropped (a restart, ``pg_terminate_backend``) are replaced, not lent; while the
server is away it keeps trying to reconnect in the background, so the service
recovers by itself when the database returns.

Error handling: the database not answering (no connection within
:data:`CONNECT_TIMEOUT_S`, a connection lost mid-transaction) is
:class:`DatabaseUnavailable`, whose text says why (the HTTP edge answers 503
"session store unavailable: ..." with it). Any other database error is a defect
in our SQL and propagates as psycopg raised it. A worker thread is never
abandoned: a cancelled caller waits for its transaction to end, which the
timeouts bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import psycopg
import trio
from psycopg_pool import ConnectionPool

from .schema import migrate

T = TypeVar("T")

# How long a unit of work waits for a connection (the pool's, then libpq's connect
# timeout): a request that needs the database fails within seconds, not minutes.
CONNECT_TIMEOUT_S = 5.0
# How long the pool keeps trying to replace a lost connection (backing off 1, 2, 4 s…)
# before it gives up; the next request then starts trying afresh, at once. Kept short, so
# that after an outage of any length the service connects within seconds of the
# database's return, not after a back-off grown to minutes.
RECONNECT_TIMEOUT_S = 10.0
# Connections kept open; more are opened on demand up to POOL_MAX_SIZE.
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10
# The pool's own name, in psycopg's log lines.
POOL_NAME = "claude-code-api"


class DatabaseUnavailable(Exception):
    """The database did not answer: unreachable, restarting, or the connection was lost.

    Its text says why, as psycopg said it (without the password). The work may or may
    not have been committed when a connection was lost mid-commit; everything else
    was rolled back."""


class Database:
    """The service's PostgreSQL: runs units of work, each one transaction on a
    pooled connection. Made by :func:`open_database`, which owns the pool."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def call(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction, in the calling (worker) thread.

        Committed when ``work`` returns, rolled back when it raises. Blocks: never
        call it from a trio or anyio task, only from a thread (:meth:`run` does).

        Error handling: the database not answering raises :class:`DatabaseUnavailable`;
        what ``work`` raises otherwise propagates unchanged.
        """
        try:
            with self._pool.connection() as connection:
                return work(connection)
        except psycopg.OperationalError as exc:
            # psycopg_pool's PoolTimeout is an OperationalError too: no connection in time.
            raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc

    def close_pool(self) -> None:
        """Close the pool (for an owner that opened it itself). Blocks."""
        self._pool.close()

    async def run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """:meth:`call` in a trio worker thread. Cancelling the caller waits for the
        transaction to end (bounded by :data:`CONNECT_TIMEOUT_S` and the work itself)."""
        return await trio.to_thread.run_sync(self.call, work)


def make_pool(url: str) -> ConnectionPool:
    """A closed pool for ``url`` with the service's limits and connection checks."""
    return ConnectionPool(
        url,
        open=False,
        min_size=POOL_MIN_SIZE,
        max_size=POOL_MAX_SIZE,
        name=POOL_NAME,
        timeout=CONNECT_TIMEOUT_S,
        reconnect_timeout=RECONNECT_TIMEOUT_S,
        # A short round trip before lending: a connection the server dropped is replaced.
        check=ConnectionPool.check_connection,
        kwargs={"connect_timeout": max(1, round(CONNECT_TIMEOUT_S))},
    )


@asynccontextmanager
async def open_database(url: str) -> AsyncIterator[Database]:
    """The database at ``url`` with its schema up to date, until the block ends.

    Error handling: :class:`DatabaseUnavailable` when it does not answer within
    :data:`CONNECT_TIMEOUT_S`; :class:`~claude_code_api.store.schema.SchemaTooNew`
    when a newer service already upgraded it. Either way the pool is closed.
    """
    pool = make_pool(url)
    database = Database(pool)
    try:
        # The pool's background threads start here; the first connection is made on demand.
        await trio.to_thread.run_sync(pool.open)
        await database.run(migrate)
        yield database
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.close)
