"""The Claude login in PostgreSQL: one login for every replica (:class:`PostgresLogin`).

Implements :class:`~claude_code_api.auth.shared_login.SharedLogin` on two tables
(migration 5, :mod:`.schema`):

* ``oauth_pending_logins``: state -> PKCE verifier of each ``/auth/login``, with its
  expiry, taken (deleted) once by ``/auth/exchange`` on whichever replica it reaches;
* ``claude_login``: at most one row, the login's tokens (secrets, as the credentials file
  holds them), a ``generation`` that grows with every write, and the refresh claim.

The refresh claim is a lease on the row: an ``UPDATE`` that sets ``claimed_by`` only where
the row still has the refresh token the claimer would use and no other replica's claim is
live. Two replicas due at once both try it; the row lock orders them, and the second,
re-checking after the first committed, finds the claim taken (:class:`Busy`), or, once the
first has stored its result, the token rotated (:class:`Rotated`): it adopts the stored
login instead of refreshing with a refresh token already used. The claim is held no longer
than the refresh's timeout and a margin (a replica dying mid-refresh blocks the others
that long at most).

Every write of the login sends ``NOTIFY`` on :data:`LOGIN_CHANNEL` (payload: the new
generation) in its transaction; :meth:`PostgresLogin.serve_changes` listens on a
connection of its own.

Error handling: the database not answering is
:class:`~claude_code_api.auth.shared_login.SharedLoginUnavailable`; other database errors
(our SQL's defects) propagate. No log line holds a token, verifier or state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import psycopg
import trio

from ..auth.shared_login import (
    Busy,
    Claim,
    Claimed,
    Rotated,
    SharedLoginUnavailable,
    StoredLogin,
)
from .database import Database, DatabaseUnavailable
from .wakeups import CONNECT_PARAMETERS, HEARTBEAT_S, POLL_S, RETRY_S

log = logging.getLogger(__name__)
T = TypeVar("T")

LOGIN_CHANNEL = "cca_login"
_COLUMNS = "access_token, refresh_token, expires_at_ms, scopes, lifetime_s, generation"


def _stored(row: tuple[Any, ...] | None) -> StoredLogin | None:
    if row is None:
        return None
    access, refresh, expires_at_ms, scopes, lifetime_s, generation = row
    return StoredLogin(
        access,
        refresh,
        None if expires_at_ms is None else int(expires_at_ms),
        None if scopes is None else tuple(json.loads(scopes)),
        lifetime_s,
        int(generation),
    )


def _scopes(scopes: tuple[str, ...] | None) -> str | None:
    return None if scopes is None else json.dumps(list(scopes))


def _notify(connection: psycopg.Connection, generation: int) -> None:
    connection.execute("SELECT pg_notify(%s, %s)", (LOGIN_CHANNEL, str(generation)))


# --- units of work (one transaction each) -----------------------------------------------------


def add_pending(
    connection: psycopg.Connection, state: str, verifier: str, ttl_s: float, max_size: int
) -> None:
    connection.execute("DELETE FROM oauth_pending_logins WHERE expires_at <= now()")
    connection.execute(
        "INSERT INTO oauth_pending_logins (state, verifier, expires_at)"
        " VALUES (%s, %s, now() + make_interval(secs => %s))",
        (state, verifier, ttl_s),
    )
    # Past max_size the oldest are forgotten: repeated logins cost bounded room.
    connection.execute(
        "DELETE FROM oauth_pending_logins WHERE state NOT IN"
        " (SELECT state FROM oauth_pending_logins ORDER BY created_at DESC LIMIT %s)",
        (max_size,),
    )


def take_pending(connection: psycopg.Connection, state: str) -> str | None:
    row = connection.execute(
        "DELETE FROM oauth_pending_logins WHERE state = %s RETURNING verifier, expires_at > now()",
        (state,),
    ).fetchone()
    if row is None or not row[1]:
        return None
    return str(row[0])


def load(connection: psycopg.Connection) -> StoredLogin | None:
    return _stored(connection.execute(f"SELECT {_COLUMNS} FROM claude_login").fetchone())


def save_login(
    connection: psycopg.Connection,
    access_token: str,
    refresh_token: str | None,
    expires_at_ms: int | None,
    scopes: tuple[str, ...] | None,
    lifetime_s: float | None,
) -> StoredLogin:
    row = connection.execute(
        "INSERT INTO claude_login"
        " (access_token, refresh_token, expires_at_ms, scopes, lifetime_s, generation)"
        " VALUES (%s, %s, %s, %s, %s, 1)"
        " ON CONFLICT (id) DO UPDATE SET access_token = excluded.access_token,"
        " refresh_token = excluded.refresh_token, expires_at_ms = excluded.expires_at_ms,"
        " scopes = excluded.scopes, lifetime_s = excluded.lifetime_s,"
        " generation = claude_login.generation + 1, claimed_by = NULL, claimed_until = NULL"
        f" RETURNING {_COLUMNS}",
        (access_token, refresh_token, expires_at_ms, _scopes(scopes), lifetime_s),
    ).fetchone()
    stored = _stored(row)
    assert stored is not None
    _notify(connection, stored.generation)
    return stored


def seed(
    connection: psycopg.Connection,
    access_token: str,
    refresh_token: str | None,
    expires_at_ms: int | None,
) -> StoredLogin:
    connection.execute(
        "INSERT INTO claude_login (access_token, refresh_token, expires_at_ms, generation)"
        " VALUES (%s, %s, %s, 1) ON CONFLICT (id) DO NOTHING",
        (access_token, refresh_token, expires_at_ms),
    )
    stored = load(connection)
    assert stored is not None
    return stored


def claim_refresh(
    connection: psycopg.Connection, owner: str, refresh_token: str, hold_s: float
) -> Claim:
    claimed = connection.execute(
        "UPDATE claude_login SET claimed_by = %s,"
        " claimed_until = now() + make_interval(secs => %s)"
        " WHERE refresh_token = %s"
        " AND (claimed_by IS NULL OR claimed_by = %s OR claimed_until <= now())"
        " RETURNING generation",
        (owner, hold_s, refresh_token, owner),
    ).fetchone()
    if claimed is not None:
        return Claimed()
    stored = load(connection)
    if stored is None or stored.refresh_token != refresh_token:
        return Rotated(stored)
    return Busy()


def finish_refresh(
    connection: psycopg.Connection,
    used: str,
    access_token: str,
    refresh_token: str | None,
    expires_at_ms: int,
    scopes: tuple[str, ...] | None,
    lifetime_s: float,
) -> StoredLogin | None:
    # Whoever stores first the tokens refreshing ``used`` wins (the endpoint granted them
    # once): not only the claim's holder, whose claim may have run out meanwhile.
    row = connection.execute(
        "UPDATE claude_login SET access_token = %s,"
        # Refresh tokens rotate; an endpoint that sends none keeps the old one valid.
        " refresh_token = coalesce(%s, refresh_token), expires_at_ms = %s,"
        " scopes = coalesce(%s, scopes), lifetime_s = %s, generation = generation + 1,"
        " claimed_by = NULL, claimed_until = NULL"
        f" WHERE refresh_token = %s RETURNING {_COLUMNS}",
        (access_token, refresh_token, expires_at_ms, _scopes(scopes), lifetime_s, used),
    ).fetchone()
    stored = _stored(row)
    if stored is not None:
        _notify(connection, stored.generation)
    return stored


def hold_claim(
    connection: psycopg.Connection, owner: str, refresh_token: str, hold_s: float
) -> None:
    connection.execute(
        "UPDATE claude_login SET claimed_until = now() + make_interval(secs => %s)"
        " WHERE claimed_by = %s AND refresh_token = %s",
        (hold_s, owner, refresh_token),
    )


# --- the shared login -------------------------------------------------------------------------


class PostgresLogin:
    """:class:`~claude_code_api.auth.shared_login.SharedLogin` on the database that
    ``database()`` gives (the service's pool, opened at first use) and ``url`` (for the
    listening connection). See the module docstring."""

    def __init__(self, database: Callable[[], Database], url: str) -> None:
        self._database = database
        self._url = url

    def _call(self, work: Callable[[psycopg.Connection], T]) -> T:
        try:
            return self._database().call(work)
        except DatabaseUnavailable as exc:
            raise SharedLoginUnavailable(str(exc)) from exc

    async def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self._call, work)

    async def add_pending(self, state: str, verifier: str, ttl_s: float, max_size: int) -> None:
        await self._run(
            partial(add_pending, state=state, verifier=verifier, ttl_s=ttl_s, max_size=max_size)
        )

    async def take_pending(self, state: str) -> str | None:
        return await self._run(partial(take_pending, state=state))

    async def load(self) -> StoredLogin | None:
        return await self._run(load)

    async def save_login(
        self,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int | None,
        scopes: tuple[str, ...] | None,
        lifetime_s: float | None,
    ) -> StoredLogin:
        work = partial(
            save_login,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at_ms=expires_at_ms,
            scopes=scopes,
            lifetime_s=lifetime_s,
        )
        return await self._run(work)

    async def seed(
        self, access_token: str, refresh_token: str | None, expires_at_ms: int | None
    ) -> StoredLogin:
        work = partial(
            seed,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at_ms=expires_at_ms,
        )
        return await self._run(work)

    async def claim_refresh(self, owner: str, refresh_token: str, hold_s: float) -> Claim:
        work = partial(claim_refresh, owner=owner, refresh_token=refresh_token, hold_s=hold_s)
        return await self._run(work)

    async def finish_refresh(
        self,
        used: str,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int,
        scopes: tuple[str, ...] | None,
        lifetime_s: float,
    ) -> StoredLogin | None:
        work = partial(
            finish_refresh,
            used=used,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at_ms=expires_at_ms,
            scopes=scopes,
            lifetime_s=lifetime_s,
        )
        return await self._run(work)

    async def hold_claim(self, owner: str, refresh_token: str, hold_s: float) -> None:
        work = partial(hold_claim, owner=owner, refresh_token=refresh_token, hold_s=hold_s)
        await self._run(work)

    async def serve_changes(
        self,
        changes: trio.MemorySendChannel[None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on :data:`LOGIN_CHANNEL`; send to ``changes`` on each notification and after
        each reconnection (what was sent meanwhile is lost). Started at once: while the
        database is away it retries every :data:`~.wakeups.RETRY_S`, logging once."""
        task_status.started()
        down = False

        def listening() -> None:
            nonlocal down
            if down:
                down = False
                log.info("login changes: listening again")

        async with changes:
            while True:
                try:
                    await trio.to_thread.run_sync(_listen, self._url, changes, listening)
                except trio.BrokenResourceError:
                    return
                except psycopg.OperationalError as exc:
                    if not down:
                        down = True
                        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                        log.warning("login changes: lost the database (%s); reconnecting", reason)
                await trio.sleep(RETRY_S)


def _listen(url: str, changes: trio.MemorySendChannel[None], listening: Callable[[], None]) -> None:
    """In a worker thread: LISTEN, send one change (re-check after a (re)connection), then one
    per notification until the connection fails or the calling task is cancelled."""
    with psycopg.connect(
        url, autocommit=True, **{**CONNECT_PARAMETERS, "application_name": "claude-code-api login"}
    ) as connection:
        connection.execute(f"LISTEN {LOGIN_CHANNEL}")
        trio.from_thread.run_sync(listening)
        trio.from_thread.run(changes.send, None)
        next_beat = time.monotonic() + HEARTBEAT_S
        while True:
            trio.from_thread.check_cancelled()
            if any(True for _ in connection.notifies(timeout=POLL_S)):
                trio.from_thread.run(changes.send, None)
            if time.monotonic() >= next_beat:
                connection.execute("SELECT 1")
                next_beat = time.monotonic() + HEARTBEAT_S
