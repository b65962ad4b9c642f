"""The session table on PostgreSQL (``DATABASE_URL``): one ``sessions`` table every replica shares.

:class:`PostgresSessionTable` implements :class:`~.protocol.SessionTable` on a
:class:`~.database.Database` (psycopg 3's blocking API and its pool, called from the
registry's worker threads); :func:`open_postgres_table` opens the service's, with a pool
of its own, and brings the schema up to date (:mod:`.schema`, migration 2).

Keys: PostgreSQL's ``text`` cannot hold NUL, nor a lone surrogate (it is not UTF-8),
which a Python ``str`` can. Such ids are *escaped*, not refused: every ``str`` round-trips.
:func:`encode_text` writes ``\\x00`` as ``\\x01\\x01``, ``\\x01`` as ``\\x01\\x02`` and a
lone surrogate as ``\\x01\\x03`` and three hex digits; every other character is stored as
it is, so ids of printable text (all the HTTP edge lets through) read as themselves in
``psql``. The columns collate as ``"C"`` (code point order, as Python and SQLite sort),
and the escape keeps that order, except that a lone surrogate sorts before ``\\x02``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..messages import RunOptions, SessionKey
from .database import Database, DatabaseUnavailable, make_pool
from .errors import (
    SessionExists,
    SessionMoved,
    StoreBusy,
    StoreFull,
    StoreUnavailable,
    TooManySessions,
)
from .leases import key_digest
from .records import COLUMNS, SessionPage, SessionRecord
from .schema import SchemaTooNew, migrate

T = TypeVar("T")

_COLUMNS = COLUMNS
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM sessions"
_INSERT = f"INSERT INTO sessions ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * 10)})"
_UPSERT = f"{_INSERT} ON CONFLICT (user_id, session_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _COLUMNS[2:]
)
_WHERE_KEY = "WHERE user_id = %s AND session_id = %s"

# --- keys: what text cannot hold, escaped --------------------------------------------

_UNSTORABLE = re.compile("[\x00\x01\ud800-\udfff]")
_ESCAPE = re.compile("\x01(\x01|\x02|\x03[0-9a-f]{3})")


def _escape_one(found: re.Match[str]) -> str:
    char = found.group()
    if char <= "\x01":
        return "\x01" + chr(ord(char) + 1)
    return f"\x01\x03{ord(char) - 0xD800:03x}"


def _unescape_one(found: re.Match[str]) -> str:
    code = found.group(1)
    if len(code) == 1:
        return chr(ord(code) - 1)
    return chr(0xD800 + int(code[1:], 16))


def encode_text(text: str) -> str:
    """``text`` as PostgreSQL's ``text`` can hold it (see the module docstring)."""
    return _UNSTORABLE.sub(_escape_one, text)


def decode_text(stored: str) -> str:
    """The ``str`` :func:`encode_text` made ``stored`` from."""
    return _ESCAPE.sub(_unescape_one, stored) if "\x01" in stored else stored


def _key(key: SessionKey) -> tuple[str, str]:
    return (encode_text(key.user_id), encode_text(key.session_id))


def _row(record: SessionRecord) -> tuple[Any, ...]:
    return (
        *_key(record.key),
        encode_text(record.claude_session_id),
        float(record.created_at),
        float(record.last_activity),
        int(record.turns),
        float(record.total_cost_usd),
        bool(record.transcript_started),
        # json.dumps escapes NUL and lone surrogates itself (ensure_ascii).
        json.dumps(list(record.previous_claude_session_ids)),
        json.dumps(record.options.to_json()),
    )


def _record(row: tuple[Any, ...]) -> SessionRecord:
    user_id, session_id, claude_id, created, last, turns, cost, started, previous, options = row
    return SessionRecord(
        user_id=decode_text(user_id),
        session_id=decode_text(session_id),
        claude_session_id=decode_text(claude_id),
        created_at=float(created),
        last_activity=float(last),
        turns=int(turns),
        total_cost_usd=float(cost),
        transcript_started=bool(started),
        previous_claude_session_ids=tuple(json.loads(previous)),
        options=RunOptions.from_json(json.loads(options)),
    )


def describe(url: str) -> str:
    """``url``'s database without its password: ``postgresql://user@host:port/dbname``."""
    params = conninfo_to_dict(url)
    host = str(params.get("host", ""))
    host = f"[{host}]" if ":" in host else quote(host, safe="")
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"


# --- the units of work: one transaction each ---------------------------------------


def _lock_user(connection: psycopg.Connection, user_id: str) -> None:
    """Hold the user's lock until the transaction ends: one create per user at a time,
    on every replica (a one-number advisory lock, as the transcripts' per session)."""
    connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
        (json.dumps(["sessions-of-user", user_id]),),
    )


def _least_recent_unused(
    connection: psycopg.Connection, user_id: str, count: int, in_use: Collection[str]
) -> list[SessionRecord]:
    """Up to ``count`` of the user's records not in ``in_use`` nor live on any replica (a
    lease held), least recently active first."""
    rows = connection.execute(
        f"{_SELECT} WHERE user_id = %s AND NOT (session_id = ANY(%s))"
        " ORDER BY last_activity, session_id",
        (encode_text(user_id), [encode_text(s) for s in in_use]),
    ).fetchall()
    records = [_record(row) for row in rows]
    live = _leased_elsewhere(connection, records, None)
    return [record for record in records if record.key not in live][:count]


def _create(
    connection: psycopg.Connection,
    record: SessionRecord,
    max_per_user: int,
    in_use: Collection[str] | None,
) -> list[SessionRecord]:
    """:meth:`PostgresSessionTable.create`'s transaction: the count and the evictions are
    decided under the user's lock, so creators on two replicas take turns."""
    _lock_user(connection, record.user_id)
    key = _key(record.key)
    if connection.execute(f"SELECT 1 FROM sessions {_WHERE_KEY}", key).fetchone():
        raise SessionExists(record.key)
    row = connection.execute("SELECT count(*) FROM sessions WHERE user_id = %s", key[:1])
    (n,) = row.fetchone() or (0,)
    evicted: list[SessionRecord] = []
    excess = n - max_per_user + 1
    if excess > 0:
        if in_use is not None:
            evicted = _least_recent_unused(connection, record.user_id, excess, in_use)
        if len(evicted) < excess:
            raise TooManySessions(record.user_id, max_per_user, all_live=in_use is not None)
        connection.execute(
            "DELETE FROM sessions WHERE user_id = %s AND session_id = ANY(%s)",
            (key[0], [encode_text(r.session_id) for r in evicted]),
        )
    # A save (which takes no lock) may have inserted the key meanwhile: refused, all undone.
    if connection.execute(f"{_INSERT} ON CONFLICT DO NOTHING", _row(record)).rowcount != 1:
        raise SessionExists(record.key)
    return evicted


def _list_for_user(
    connection: psycopg.Connection, user_id: str, limit: int, offset: int
) -> SessionPage:
    # One snapshot for the count and the page (READ COMMITTED would take one per statement).
    connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    user = encode_text(user_id)
    row = connection.execute("SELECT count(*) FROM sessions WHERE user_id = %s", (user,))
    (total,) = row.fetchone() or (0,)
    rows = connection.execute(
        f"{_SELECT} WHERE user_id = %s ORDER BY last_activity DESC, session_id LIMIT %s OFFSET %s",
        (user, limit, offset),
    ).fetchall()
    return SessionPage(tuple(_record(r) for r in rows), int(total))


def _save_many(
    connection: psycopg.Connection, records: Sequence[SessionRecord], owner: str | None
) -> frozenset[SessionKey]:
    """Save ``records``, unless another replica than ``owner`` holds the lease of any of
    them: then nothing is saved and those keys are returned (``owner`` None: no check)."""
    if owner is not None and (moved := _leased_elsewhere(connection, records, owner)):
        return moved
    # In key order (stable: a key given twice keeps its last), so two replicas' batches
    # lock their rows in one order and cannot deadlock.
    rows = sorted((_row(r) for r in records), key=lambda row: row[:2])
    with connection.cursor() as cursor:
        cursor.executemany(_UPSERT, rows)
    return frozenset()


def _leased_elsewhere(
    connection: psycopg.Connection, records: Sequence[SessionRecord], owner: str | None
) -> frozenset[SessionKey]:
    """The keys among ``records`` whose lease another owner than ``owner`` (None: anyone)
    holds and has not let expire.

    FOR SHARE: a replica taking one of these leases over waits for this transaction, so
    a save checked here cannot land after another replica's first turn of the session."""
    digests = {key_digest(record.key): record.key for record in records}
    rows = connection.execute(
        """
        SELECT key_digest FROM session_leases
        WHERE key_digest = ANY(%s) AND owner IS NOT NULL AND owner IS DISTINCT FROM %s
          AND expires_at > clock_timestamp()
        FOR SHARE
        """,
        (list(digests), owner),
    ).fetchall()
    return frozenset(digests[bytes(row[0])] for row in rows)


def _delete_inactive(
    connection: psycopg.Connection, before: float, limit: int
) -> list[SessionRecord]:
    # SKIP LOCKED: a sweep on another replica takes the next rows, not the same ones, so
    # "fewer than limit" still means none are left (but those the other is deleting).
    rows = connection.execute(
        f"""
        WITH doomed AS (
            SELECT user_id, session_id FROM sessions WHERE last_activity < %s
            ORDER BY last_activity, user_id, session_id LIMIT %s FOR UPDATE SKIP LOCKED
        )
        DELETE FROM sessions s USING doomed d
        WHERE s.user_id = d.user_id AND s.session_id = d.session_id
        RETURNING {", ".join(f"s.{c}" for c in _COLUMNS)}
        """,
        (before, limit),
    ).fetchall()
    records = [_record(row) for row in rows]
    return sorted(records, key=lambda r: (r.last_activity, r.user_id, r.session_id))


class PostgresSessionTable:
    """The :class:`~.protocol.SessionTable` on PostgreSQL's ``sessions`` table.

    Given the :class:`Database` and its URL (for :attr:`location`); owns nothing but its
    closed flag and ``on_close`` (what closes the pool, when the table was given one of
    its own: :func:`open_postgres_table`). Every call borrows a
    pooled connection for one transaction, so consecutive calls may come from any
    thread. Durability: a write that returns is committed on the server.

    Several replicas share the table: :meth:`create` takes an advisory lock on the user
    before it counts, so two creators can never both pass ``max_per_user``; the expiry
    sweeps of two replicas skip each other's rows. ``save_many(wait=False)`` always
    raises :class:`StoreBusy`: a write needs the network, so it is done in a thread.

    Error handling: the database not answering, a lost connection, an SQL error, a call
    after :meth:`close`: :class:`StoreUnavailable` saying ``session store <location>:
    <cause>`` (:class:`StoreFull` when the server is out of disk), where the location
    and cause never hold the password. Keys are escaped, never refused (module docstring).
    """

    def __init__(
        self, database: Database, url: str, on_close: Callable[[], None] | None = None
    ) -> None:
        self._database = database
        self._location = describe(url)  # ``url`` itself is kept nowhere
        self._password = str(conninfo_to_dict(url).get("password") or "")
        self._on_close = on_close
        self._closed = False
        # With session leases: this replica's owner id; a save of a session whose lease
        # another replica holds is refused (SessionMoved). None: no such check.
        self.fence_owner: str | None = None

    @property
    def location(self) -> str:
        return self._location

    def load(self, key: SessionKey) -> SessionRecord | None:
        row = self._run(lambda c: c.execute(f"{_SELECT} {_WHERE_KEY}", _key(key)).fetchone())
        return None if row is None else _record(row)

    def list_for_user(self, user_id: str, limit: int, offset: int = 0) -> SessionPage:
        return self._run(lambda c: _list_for_user(c, user_id, limit, offset))

    def user_ids(self) -> frozenset[str]:
        rows = self._run(lambda c: c.execute("SELECT DISTINCT user_id FROM sessions").fetchall())
        return frozenset(decode_text(row[0]) for row in rows)

    def count(self) -> int:
        row = self._run(lambda c: c.execute("SELECT count(*) FROM sessions").fetchone())
        return 0 if row is None else int(row[0])

    def save_many(self, records: Sequence[SessionRecord], *, wait: bool = True) -> None:
        if not wait:
            self._check_open()
            raise StoreBusy(self._message("a write waits for the network: done in a thread"))
        if not records:
            return
        moved = self._run(lambda c: _save_many(c, records, self.fence_owner))
        if moved:
            names = ", ".join(f"{key.user_id}/{key.session_id}" for key in sorted(moved))
            raise SessionMoved(
                self._message(f"{names}: live on another replica (its lease is held there)"),
                moved,
            )

    def create(
        self,
        record: SessionRecord,
        max_per_user: int,
        in_use: Collection[str] | None = None,
    ) -> list[SessionRecord]:
        return self._run(lambda c: _create(c, record, max_per_user, in_use))

    def delete(self, key: SessionKey) -> SessionRecord | None:
        statement = f"DELETE FROM sessions {_WHERE_KEY} RETURNING {', '.join(_COLUMNS)}"
        row = self._run(lambda c: c.execute(statement, _key(key)).fetchone())
        return None if row is None else _record(row)

    def delete_inactive(self, before: float, limit: int) -> list[SessionRecord]:
        return self._run(lambda c: _delete_inactive(c, before, limit))

    def checkpoint(self) -> None:
        """Nothing to do: the server writes its log and checkpoints by itself."""
        self._check_open()

    def close(self) -> None:
        """Refuse further calls and close the pool if it is the table's own. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()

    # --- helpers ------------------------------------------------------------

    def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """``work`` in one transaction; failures of the database as :class:`StoreUnavailable`."""
        self._check_open()
        try:
            return self._database.call(work)
        except DatabaseUnavailable as exc:
            if isinstance(exc.__cause__, psycopg.errors.DiskFull):
                raise StoreFull(
                    self._message(f"the database server is out of disk: {exc}")
                ) from exc
            raise StoreUnavailable(self._message(f"the database does not answer: {exc}")) from exc
        except psycopg.Error as exc:
            raise StoreUnavailable(self._message(f"{type(exc).__name__}: {exc}")) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(self._message("the store is closed"))

    def _message(self, cause: str) -> str:
        text = " ".join(f"session store {self._location}: {cause}".split())
        return text.replace(self._password, "***") if self._password else text


def open_postgres_table(url: str) -> PostgresSessionTable:
    """The service's session table in the database at ``url``, on a pool of its own (closed
    by :meth:`~PostgresSessionTable.close`), its schema brought up to date.

    Blocks (run it in a worker thread). Error handling: :class:`StoreUnavailable` naming
    the database (without its password) when it does not answer within
    :data:`~.database.CONNECT_TIMEOUT_S`, or its schema is newer than this service's;
    the pool is closed then.
    """
    pool = make_pool(url)
    table = PostgresSessionTable(Database(pool), url, pool.close)
    try:
        pool.open()
        table._run(migrate)
    except SchemaTooNew as exc:
        table.close()
        raise StoreUnavailable(table._message(str(exc))) from exc
    except BaseException:
        table.close()
        raise
    return table
