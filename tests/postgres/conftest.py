"""Fixtures for the tests on real PostgreSQL (see :mod:`tests.postgres.support`).

Where no server answers, every test here is skipped with one line saying why; with
``REQUIRE_POSTGRES=1`` (``.ci/run`` sets it) they fail instead, so CI cannot pass
without having run them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import psycopg
import pytest
import trio

from claude_code_api.store.database import Database, open_database
from tests.postgres.support import ADMIN_URL, TIMEOUT, Databases, TcpLink, require_server


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    """Makes this run's databases, and drops them at its end."""
    require_server()
    made = Databases()
    yield made
    made.drop_all()


@pytest.fixture(scope="session")
def shared_url(databases: Databases) -> str:
    """One database for this run's tests that clear the tables they use first."""
    return databases.create()


@pytest.fixture
def fresh_url(databases: Databases) -> str:
    """A new empty database (no schema) for this test alone."""
    return databases.create()


@pytest.fixture
async def database(shared_url: str) -> AsyncIterator[Database]:
    """The shared database, its schema up to date and its transcripts cleared."""
    stack = AsyncExitStack()
    try:
        with trio.fail_after(TIMEOUT):
            opened = await stack.enter_async_context(open_database(shared_url))
            await opened.run(clear_transcripts)
        yield opened
    finally:
        with trio.fail_after(TIMEOUT):
            await stack.aclose()


def clear_transcripts(connection: psycopg.Connection) -> None:
    connection.execute("TRUNCATE transcript_entries, transcript_sessions")


@pytest.fixture
async def link(nursery: trio.Nursery) -> TcpLink:
    """A link to the server that the test can cut (see :class:`TcpLink`)."""
    parts = urlsplit(ADMIN_URL)
    forwarder = TcpLink(parts.hostname or "127.0.0.1", parts.port or 5432)
    await nursery.start(forwarder.serve)
    return forwarder
