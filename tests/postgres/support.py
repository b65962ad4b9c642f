"""Real PostgreSQL for tests: a server to find, databases to make, a link to cut.

The server is the machine's (127.0.0.1:5432, user postgres, trust auth; another
with ``POSTGRES_TEST_URL``, an admin URL). Each test run makes its own databases
(random names, dropped at the end of the run, connections and all).

:class:`TcpLink` sits between the service and the server, so a test can take the
database away (every connection cut, new ones refused) and bring it back, as a
restart or a network failure would, without touching the shared server.

Error handling: :func:`server_problem` says in one line why no server answers;
the fixture skips with it, or fails when ``REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psycopg
import pytest
import trio

ADMIN_URL = os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Every I/O test's deadline: generous for a loaded 2-CPU machine.
TIMEOUT = 30


def server_problem() -> str | None:
    """None when the server answers at :data:`ADMIN_URL`, else why not (one line)."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL answers at {ADMIN_URL}: {str(exc).strip().splitlines()[0]}"
    return None


def require_server() -> None:
    """Skip the calling test (pytest.skip) with :func:`server_problem`'s line when no server
    answers, or fail it instead with ``REQUIRE_POSTGRES=1`` (CI)."""
    problem = server_problem()
    if problem is None:
        return
    if os.environ.get("REQUIRE_POSTGRES") == "1":
        pytest.fail(f"REQUIRE_POSTGRES=1, but {problem}", pytrace=False)
    pytest.skip(problem)


def database_url(name: str, base: str = ADMIN_URL) -> str:
    """``base`` naming the database ``name`` instead."""
    return urlsplit(base)._replace(path=f"/{name}").geturl()


def admin_execute(statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on the server as the admin, outside a transaction."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        cursor = connection.execute(statement.encode(), params)
        return cursor.fetchall() if cursor.description else []


class Databases:
    """The databases one test run made; :meth:`drop_all` at its end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        """A new empty database; its URL."""
        name = f"cca_test_{secrets.token_hex(6)}"
        admin_execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return database_url(name)

    def drop_all(self) -> None:
        # Side by side: each DROP DATABASE waits for a checkpoint, which they can share.
        with ThreadPoolExecutor() as executor:
            drops = [
                executor.submit(admin_execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                for name in self.names
            ]
        self.names.clear()
        for drop in drops:
            drop.result()


def terminate_backends(url: str) -> int:
    """Terminate every server process connected to ``url``'s database; how many."""
    name = urlsplit(url).path.lstrip("/")
    rows = admin_execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    return int(rows[0][0])  # type: ignore[call-overload]


class TcpLink:
    """A TCP forwarder from a loopback port to the PostgreSQL server, that can be cut.

    :meth:`serve` runs it (``await nursery.start(link.serve)``); :meth:`cut` closes every
    connection through it and refuses new ones (accepted, then closed at once) until
    :meth:`restore`. The port stays the same throughout.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.up = True
        self._connections: set[trio.CancelScope] = set()

    def url(self, name: str) -> str:
        """The URL of the database ``name`` through this link."""
        base = urlsplit(ADMIN_URL)._replace(netloc=f"postgres@127.0.0.1:{self.port}")
        return base._replace(path=f"/{name}").geturl()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        async with listener, trio.open_nursery() as nursery:
            while True:
                client = await listener.accept()
                if self.up:
                    nursery.start_soon(self._forward, client)
                else:
                    await client.aclose()

    async def _forward(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with client, await trio.open_tcp_stream(*self.target) as server:
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(_pump, client, server)
                        pumps.start_soon(_pump, server, client)
            finally:
                self._connections.discard(scope)

    def cut(self) -> None:
        self.up = False
        for scope in self._connections:
            scope.cancel()

    def restore(self) -> None:
        self.up = True


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        async for data in source:
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
