"""The session table on one SQLite file: ``<data_dir>/sessions.sqlite3``.

:class:`SqliteSessionTable` implements :class:`~.protocol.SessionTable` with the
standard library's ``sqlite3``; :func:`open_store` opens the service's. The
schema is versioned (``PRAGMA user_version``) and migrated forward at open by
:data:`MIGRATIONS`. Durability, checkpoints and what a bad file gets are in
the class docstring.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..messages import RunOptions, SessionKey
from .errors import SessionExists, StoreBusy, StoreFull, StoreUnavailable, TooManySessions
from .records import COLUMNS, SessionPage, SessionRecord

log = logging.getLogger(__name__)

DB_FILENAME = "sessions.sqlite3"

SCHEMA_VERSION = 3
"""What ``PRAGMA user_version`` says once the database is fully migrated."""

# MIGRATIONS[n] takes a database from version n to n + 1. Version 0 is an empty
# file. Append, never edit: a released step has already run on someone's disk.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE sessions (
            user_id            TEXT    NOT NULL,
            session_id         TEXT    NOT NULL,
            claude_session_id  TEXT    NOT NULL,
            created_at         REAL    NOT NULL,
            last_activity      REAL    NOT NULL,
            turns              INTEGER NOT NULL DEFAULT 0,
            total_cost_usd     REAL    NOT NULL DEFAULT 0,
            transcript_started INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, session_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX sessions_by_activity ON sessions (user_id, last_activity DESC)",
    ),
    (
        # A JSON array of strings, oldest first.
        "ALTER TABLE sessions ADD COLUMN previous_claude_session_ids TEXT NOT NULL DEFAULT '[]'",
        # For the expiry sweep, which looks across all users.
        "CREATE INDEX sessions_by_last_activity ON sessions (last_activity)",
    ),
    (
        # The options of the session's first turn (RunOptions.to_json): a JSON object.
        "ALTER TABLE sessions ADD COLUMN options TEXT NOT NULL DEFAULT '{}'",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_COLUMNS = COLUMNS
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM sessions"
_INSERT = f"INSERT INTO sessions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_UPSERT = f"{_INSERT} ON CONFLICT (user_id, session_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _COLUMNS[2:]
)
_WHERE_KEY = "WHERE user_id = ? AND session_id = ?"

# How long a write waits for another connection's lock (e.g. a second service
# instance pointed at the same data dir) before failing with "database is locked".
BUSY_TIMEOUT_S = 5.0
_SQLITE_BUSY = 5  # sqlite3.SQLITE_BUSY: another connection holds the write lock
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, spelled out for Pythons whose module lacks it


def _is_busy(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_BUSY


class SqliteSessionTable:
    """The :class:`~.protocol.SessionTable` on one SQLite file, through ``sqlite3``.

    It owns one ``sqlite3`` connection to ``path`` (opened with
    ``check_same_thread=False``: trio's thread cache may run consecutive calls
    on different threads, and saves run on the trio thread; the registry actor
    guarantees calls never overlap).

    Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A
    write method that returns has appended its transaction, commit record
    included, to the ``-wal`` file with ``write()``; SQLite syncs the WAL to the
    disk only when it checkpoints it into the database file (every ~1000 pages,
    and on close), not at every commit. So a committed write survives a crash
    of the service process itself -- ``kill -9``, the OOM killer, a segfault, a
    container stop that kills it -- because what ``write()`` handed to the
    kernel is in the kernel's page cache, which the kernel writes out whatever
    happens to the process, and the next start reads the WAL back. That is the
    requirement: a turn acknowledged to a client survives a crash of the
    service. What it does not survive is a crash of the machine (power loss, a
    kernel panic, a VM reset) within the few seconds before the kernel writes
    the page cache back: the last commits may then be lost, but the database is
    never corrupted (each WAL frame is checksummed and recovery stops at the
    last whole commit). ``synchronous=FULL`` would fsync the WAL at every
    commit to cover that too, at the price of a disk flush per commit (a
    fraction of a millisecond on a local SSD, several milliseconds on network
    or cloud volumes), paid on every turn; the group commit of the
    registry actor amortizes it but does not remove it.

    Checkpoints: SQLite's automatic checkpoint is off; :meth:`checkpoint` (the
    registry's, in a worker thread, every ``CHECKPOINT_EVERY`` write
    transactions) copies the WAL into the database and syncs it. So a commit
    is only a ``write()`` into the page cache, ~50 µs, short enough for the trio
    thread (:meth:`save_many` with ``wait=False``).

    Storage checks: every write first checks that ``path`` is still the file
    the store opened (same device and inode), because SQLite keeps writing to
    an open file that was deleted or replaced, and those writes would vanish at
    the next start. A full disk (``SQLITE_FULL``) is reported as such. Closing
    after such a swap removes the stale ``-wal`` that SQLite would otherwise
    replay onto the new file; a ``-wal`` found without its database at open
    (a service that crashed after the swap) is refused.

    Opening creates the parent directories and the database if missing, then
    checks the file with reads only (``user_version``, ``PRAGMA quick_check``,
    the table's columns) before it writes anything (journal mode, migrations),
    so a file it refuses is left byte-for-byte as it was.

    Error handling: every failure, at open or in a method, is a
    :class:`StoreUnavailable` naming the path and the cause. The store refuses a
    file that is not a regular file, not an SQLite database, corrupt, written
    by a newer schema version, or an SQLite database that is not ours (version 0
    yet holding tables), or a ``-wal`` without its database. It never replaces
    or deletes a database file (only, on close, the stale ``-wal``/``-shm`` it
    created for a file that is gone). A write that fails is rolled back whole.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._side_files: dict[Path, tuple[int, int]] = {}  # -wal and -shm: ours to clean up
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.path.is_file():
                raise StoreUnavailable(self._message("not a regular file"))
            if not self.path.exists() and self._wal_path.exists():
                raise StoreUnavailable(
                    self._message(
                        f"{self._wal_path.name} exists without the database (was the database"
                        " deleted while a service had it open?); restore the database, or"
                        " delete the -wal and -shm files to start with an empty one"
                    )
                )
            self._conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,
            )
            self._check()
            self._configure()
            self._migrate()
            self._check_columns()
            self._identity = _identity(self.path)
            for side in (self._wal_path, Path(f"{self.path}-shm")):
                if (identity := _identity(side)) is not None:
                    self._side_files[side] = identity
        except BaseException as exc:
            self._close_quietly()
            if isinstance(exc, StoreUnavailable):
                raise
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self._error(exc) from exc
            raise

    # --- public: reads ------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.path)

    def load(self, key: SessionKey) -> SessionRecord | None:
        with self._translate():
            row = self._db.execute(f"{_SELECT} {_WHERE_KEY}", _key(key)).fetchone()
        return None if row is None else _record(row)

    def list_for_user(self, user_id: str, limit: int, offset: int = 0) -> SessionPage:
        """Up to ``limit`` of the user's sessions after the first ``offset``, latest activity first.

        Both queries walk the ``(user_id, last_activity DESC)`` index, whose
        entries end in the primary key, so the order (ties by session id) needs
        no sort.
        """
        with self._translate(), self._transaction("BEGIN"):  # one snapshot for both
            (total,) = self._db.execute(
                "SELECT count(*) FROM sessions WHERE user_id = ?", (user_id,)
            ).fetchone()
            rows = self._db.execute(
                f"{_SELECT} WHERE user_id = ? ORDER BY last_activity DESC, session_id"
                " LIMIT ? OFFSET ?",
                (user_id, limit, offset),
            ).fetchall()
        return SessionPage(tuple(_record(row) for row in rows), total)

    def user_ids(self) -> frozenset[str]:
        """Every user who has a session."""
        with self._translate():
            rows = self._db.execute("SELECT DISTINCT user_id FROM sessions").fetchall()
        return frozenset(row[0] for row in rows)

    def count(self) -> int:
        """How many sessions, all users together."""
        with self._translate():
            (n,) = self._db.execute("SELECT count(*) FROM sessions").fetchone()
        return int(n)

    # --- public: writes -----------------------------------------------------

    def save(self, record: SessionRecord) -> None:
        """Insert or replace the record for ``record.key``; committed when this returns."""
        self.save_many([record])

    def save_many(self, records: Sequence[SessionRecord], *, wait: bool = True) -> None:
        """Upsert every record in one transaction: all are committed, or none.

        ``wait=False``: if another connection holds the write lock, raise
        :class:`StoreBusy` at once instead of waiting for it (up to ``BUSY_TIMEOUT_S``).
        """
        if wait:
            with self._write():
                self._db.executemany(_UPSERT, [_row(r) for r in records])
            return
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            with self._write():
                self._db.executemany(_UPSERT, [_row(r) for r in records])
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, sqlite3.Error) and _is_busy(exc.__cause__):
                raise StoreBusy(str(exc)) from exc
            raise
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT_S * 1000)}")

    def checkpoint(self) -> None:
        """Copy the WAL into the database and sync it (``PRAGMA wal_checkpoint``)."""
        with self._translate():
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def create(
        self,
        record: SessionRecord,
        max_per_user: int,
        in_use: Collection[str] | None = None,
    ) -> list[SessionRecord]:
        """Insert a new record, keeping its user at most ``max_per_user``; one transaction.

        When the user already has ``max_per_user`` records, the least recently
        active of those whose session id is not in ``in_use`` (the sessions
        that are live or have turns waiting) are deleted to make room, and
        returned (their transcripts are the caller's to remove). ``in_use`` None:
        nothing may be evicted.

        Raises :class:`SessionExists` if the key has a record (left unchanged),
        :class:`TooManySessions` if the user is at the bound and too few of their
        sessions can be evicted (nothing is deleted then).
        """
        with self._write():
            db = self._db
            if db.execute(f"SELECT 1 FROM sessions {_WHERE_KEY}", _key(record.key)).fetchone():
                raise SessionExists(record.key)
            (n,) = db.execute(
                "SELECT count(*) FROM sessions WHERE user_id = ?", (record.user_id,)
            ).fetchone()
            evicted: list[SessionRecord] = []
            excess = n - max_per_user + 1
            if excess > 0:
                if in_use is not None:
                    evicted = self._least_recent_unused(record.user_id, excess, in_use)
                if len(evicted) < excess:
                    raise TooManySessions(record.user_id, max_per_user, all_live=in_use is not None)
                db.executemany(f"DELETE FROM sessions {_WHERE_KEY}", [_key(r.key) for r in evicted])
            db.execute(_INSERT, _row(record))
        return evicted

    def _least_recent_unused(
        self, user_id: str, count: int, in_use: Collection[str]
    ) -> list[SessionRecord]:
        """Up to ``count`` of the user's records not in ``in_use``, least recently active first."""
        found: list[SessionRecord] = []
        rows = self._db.execute(
            f"{_SELECT} WHERE user_id = ? ORDER BY last_activity, session_id", (user_id,)
        )
        for row in rows:  # walks the (user_id, last_activity) index
            if row[1] not in in_use:
                found.append(_record(row))
                if len(found) == count:
                    break
        return found

    def delete(self, key: SessionKey) -> SessionRecord | None:
        """Forget a session; returns the record it had, or None if there was none."""
        with self._write():
            row = self._db.execute(f"{_SELECT} {_WHERE_KEY}", _key(key)).fetchone()
            if row is not None:
                self._db.execute(f"DELETE FROM sessions {_WHERE_KEY}", _key(key))
        return None if row is None else _record(row)

    def delete_inactive(self, before: float, limit: int) -> list[SessionRecord]:
        """Delete up to ``limit`` sessions last active before ``before``, the oldest first.

        Returns the deleted records. Fewer than ``limit`` means none are left.
        """
        with self._write():
            rows = self._db.execute(
                f"{_SELECT} WHERE last_activity < ? ORDER BY last_activity LIMIT ?",
                (before, limit),
            ).fetchall()
            records = [_record(row) for row in rows]
            self._db.executemany(
                f"DELETE FROM sessions {_WHERE_KEY}", [_key(r.key) for r in records]
            )
        return records

    def close(self) -> None:
        """Checkpoint the WAL into the file and close. Idempotent.

        If the database file was deleted or replaced meanwhile, SQLite does not
        checkpoint and leaves the ``-wal`` (and ``-shm``) behind, and the next
        open would replay that stale WAL onto the new file, resurrecting or
        corrupting it; so they are removed, if they are still the ones we had.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with self._translate():
            moved = _identity(self.path) != self._identity
            conn.close()
            if moved:
                for side, identity in self._side_files.items():
                    if _identity(side) == identity:
                        side.unlink()
                log.warning(
                    "session store %s: the database file was deleted or replaced while open;"
                    " removed its stale -wal so it cannot be replayed onto another file",
                    self.path,
                )

    # --- opening ----------------------------------------------------------

    def _check(self) -> None:
        """Reads only: refuse a file we must not write to."""
        version = self._user_version()
        if version > SCHEMA_VERSION or version < 0:
            raise StoreUnavailable(
                self._message(
                    f"schema version {version} is not one this service knows "
                    f"(it knows up to {SCHEMA_VERSION}); was it written by a newer release?"
                )
            )
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreUnavailable(
                self._message(f"database is corrupt (quick_check: {'; '.join(problems[:3])})")
            )
        if version == 0:
            (tables,) = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if tables:
                raise StoreUnavailable(
                    self._message("an SQLite database that is not a session store (version 0)")
                )

    def _configure(self) -> None:
        (mode,) = self._db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode.lower() != "wal":
            log.warning("session store %s: journal mode is %s, not wal", self.path, mode)
        # Durable against a crash of the service, not of the machine: see the class docstring.
        self._db.execute("PRAGMA synchronous = NORMAL")
        # Checkpoints are the registry's to run, off the trio thread (class docstring).
        self._db.execute("PRAGMA wal_autocheckpoint = 0")

    def _migrate(self) -> None:
        # Read again under the write lock: another process may have migrated.
        with self._transaction("BEGIN IMMEDIATE"):
            version = self._user_version()
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    self._db.execute(statement)
            if version != SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                log.info("session store %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)

    def _check_columns(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        missing = [c for c in _COLUMNS if c not in columns]
        if missing:
            raise StoreUnavailable(
                self._message(f"table 'sessions' lacks columns {', '.join(missing)}")
            )

    def _user_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    # --- helpers ----------------------------------------------------------

    @property
    def _wal_path(self) -> Path:
        return Path(f"{self.path}-wal")

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(self._message("the store is closed"))
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction on the file we opened: checked, then committed or rolled back."""
        with self._translate():
            self._check_still_ours()
            with self._transaction("BEGIN IMMEDIATE"):
                yield

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        db = self._db
        db.execute(begin)
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (e.g. after SQLITE_FULL).
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.error("session store %s: rollback failed: %s", self.path, exc)
            raise

    def _check_still_ours(self) -> None:
        """Refuse to write if ``path`` is no longer the file we opened.

        SQLite keeps writing to an open file after it is deleted or replaced
        (it does not notice in WAL mode): every such write would "succeed" and
        be gone at the next start. One ``stat`` per write transaction.
        """
        identity = _identity(self.path)
        if identity is None:
            raise StoreUnavailable(
                self._message(
                    "the database file was deleted while the service was running, so writes"
                    " would be lost; restart the service (it starts a new, empty database)"
                )
            )
        if identity != self._identity:
            raise StoreUnavailable(
                self._message(
                    "the database file was replaced while the service was running, so writes"
                    " would go to the old file and be lost; restart the service to use the new one"
                )
            )

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """sqlite3 and OS errors leave the store as :class:`StoreUnavailable`."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc

    def _message(self, cause: str) -> str:
        return " ".join(f"session store {self.path}: {cause}".split())

    def _error(self, exc: BaseException) -> StoreUnavailable:
        full = (
            isinstance(exc, sqlite3.Error)
            and (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_FULL
        ) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
        if full:
            return StoreFull(
                self._message(
                    f"the disk is full ({exc}); writes fail until space is freed"
                    " on the data directory's filesystem"
                )
            )
        return StoreUnavailable(self._message(f"{type(exc).__name__}: {exc}"))

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file at ``path``, or None if there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _key(key: SessionKey) -> tuple[str, str]:
    return (key.user_id, key.session_id)


def _row(record: SessionRecord) -> tuple[Any, ...]:
    return (
        record.user_id,
        record.session_id,
        record.claude_session_id,
        float(record.created_at),
        float(record.last_activity),
        int(record.turns),
        float(record.total_cost_usd),
        int(bool(record.transcript_started)),
        json.dumps(list(record.previous_claude_session_ids)),
        json.dumps(record.options.to_json()),
    )


def _record(row: tuple[Any, ...]) -> SessionRecord:
    user_id, session_id, claude_id, created, last, turns, cost, started, previous, options = row
    return SessionRecord(
        user_id=user_id,
        session_id=session_id,
        claude_session_id=claude_id,
        created_at=float(created),
        last_activity=float(last),
        turns=int(turns),
        total_cost_usd=float(cost),
        transcript_started=bool(started),
        previous_claude_session_ids=tuple(json.loads(previous)),
        options=RunOptions.from_json(json.loads(options)),
    )


def open_store(data_dir: Path) -> SqliteSessionTable:
    """The service's session table, at ``data_dir / "sessions.sqlite3"``.

    Blocks (run it in a worker thread); raises :class:`StoreUnavailable`.
    """
    return SqliteSessionTable(Path(data_dir) / DB_FILENAME)
