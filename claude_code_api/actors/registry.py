"""Session registry actor: the durable store of multi-turn sessions.

A session is addressed by ``(user_id, session_id)`` (:class:`SessionKey`) and
remembers the Claude CLI session it maps to (``claude_session_id``, which we
choose and pass as ``--session-id`` on the first turn and ``--resume`` after;
the ids the conversation had before a ``/clear`` are kept in
``previous_claude_session_ids``), when it was used and what it cost. Records
live in one SQLite file, ``<data_dir>/sessions.sqlite3``, so they survive
service restarts.

Three layers, each owning one thing:

* :class:`SessionStore` owns the ``sqlite3`` connection. Synchronous; only the
  registry actor calls it, from a worker thread, one call at a time.
* :func:`serve_registry` is the actor. It owns the store and the receive end of
  its inbox, and runs every store call in ``trio.to_thread.run_sync`` so sqlite
  never blocks the trio loop. Messages are handled strictly in arrival order;
  saves that are queued together are committed together (group commit). It also
  removes the Claude transcripts of deleted sessions and, given a TTL, expires
  sessions nobody has used for that long (and has the HOMEs of users with no
  session left emptied). A new session that would take its user past the bound
  evicts that user's least recently used session that is not in use.
* :class:`RegistryClient` is the requester's side: request/reply helpers over a
  send channel to the inbox, which its caller owns.

Every request carries the send end of a fresh reply channel (buffer 1); the
registry sends exactly one value on it (the answer, or the exception to raise)
and closes it. The requester owns the receive end. A save is answered once it is
durable (see :class:`SessionStore` for what durable means here).

Error handling: anything wrong with the database file at start-up (not a
database, corrupt, unreadable, a directory, written by a newer version of this
service) fails :class:`SessionStore` construction with :class:`RegistryError`,
so the service refuses to start rather than run without its sessions. The database
file is never replaced, repaired or deleted: that is an operator's decision. Once
running, a failed store call is logged and answered with the
:class:`RegistryError`, which names the cause and the fix; it never ends the
actor. Writes that fail because of the storage itself (the database file was
deleted or replaced under the running service, the disk is full, I/O errors)
are also reported through ``on_health`` so ``/health`` can show them.
:class:`TooManySessions` and :class:`SessionExists` are refusals, not storage
failures: they are not :class:`RegistryError` subclasses, so a caller that maps
RegistryError to 503 cannot swallow a 429 by accident.

Resource handling: the actor closes the store when it ends, whether its inbox
was closed or it was cancelled, inside a shielded scope, so the WAL is
checkpointed into the database file on shutdown. To stop gracefully close the
inbox's send end: what is queued is handled, then the actor returns. When the
actor is *cancelled*, the request in progress is still answered truthfully
(its thread is never abandoned, so a committed save is acknowledged), and every
request still queued in the inbox has its reply closed unanswered, so its
requester fails at once with a :class:`RegistryError` instead of waiting.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import metrics
from ..messages import RunOptions, SessionKey

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

_COLUMNS = (
    "user_id",
    "session_id",
    "claude_session_id",
    "created_at",
    "last_activity",
    "turns",
    "total_cost_usd",
    "transcript_started",
    "previous_claude_session_ids",
    "options",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM sessions"
_INSERT = f"INSERT INTO sessions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_UPSERT = f"{_INSERT} ON CONFLICT (user_id, session_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _COLUMNS[2:]
)
_WHERE_KEY = "WHERE user_id = ? AND session_id = ?"

# How long a write waits for another connection's lock (e.g. a second service
# instance pointed at the same data dir) before failing with "database is locked".
BUSY_TIMEOUT_S = 5.0
# Saves committed in one transaction at most: bounds the wait of the first one.
MAX_SAVE_BATCH = 256
# Write transactions between two checkpoints of the WAL into the database. A
# checkpoint syncs the disk (milliseconds, more on network volumes): it runs in a
# worker thread, never inside a save on the trio thread (SQLite's automatic one would).
CHECKPOINT_EVERY = 500
_SQLITE_BUSY = 5  # sqlite3.SQLITE_BUSY: another connection holds the write lock
# Expired sessions deleted per store call: a long sweep takes turns with requests.
EXPIRE_CHUNK = 200
# The expiry sweep runs every ttl / 10, but at least this often.
MAX_SWEEP_INTERVAL_S = 3600.0

_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, spelled out for Pythons whose module lacks it


# --- records ----------------------------------------------------------------


def _id_tuple(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(ids)


@attrs.frozen
class SessionRecord:
    """Everything the service remembers about one session between turns."""

    user_id: str
    session_id: str
    claude_session_id: str  # the UUID of the CLI conversation now: --session-id / --resume
    created_at: float  # unix seconds
    last_activity: float  # unix seconds
    turns: int = 0
    total_cost_usd: float = 0.0
    transcript_started: bool = False  # a turn was sent to the CLI, so its transcript may exist
    # The CLI moves a conversation to a new session id on /clear; the ids it had
    # before, oldest first. Kept so their transcripts are removed with the session.
    previous_claude_session_ids: tuple[str, ...] = attrs.field(default=(), converter=_id_tuple)
    # What its first turn asked for (model, system prompt, tools...), kept for its life;
    # a later turn may change the model.
    options: RunOptions = RunOptions()

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.user_id, self.session_id)

    @property
    def all_claude_session_ids(self) -> tuple[str, ...]:
        """The current CLI session id and every previous one."""
        return (self.claude_session_id, *self.previous_claude_session_ids)


def new_session_record(key: SessionKey, now: float) -> SessionRecord:
    """A session that has not run a turn yet, with a fresh CLI session id."""
    return SessionRecord(
        user_id=key.user_id,
        session_id=key.session_id,
        claude_session_id=str(uuid.uuid4()),
        created_at=now,
        last_activity=now,
    )


@attrs.frozen
class SessionPage:
    """One page of a user's sessions (most recently active first) and how many they have."""

    records: tuple[SessionRecord, ...]
    total: int


class RegistryError(Exception):
    """The session database cannot be opened, read or written.

    The message is one line naming the database path and the cause (and, where
    there is one, the fix). The service answers it as 503.
    """


class StoreBusy(RegistryError):
    """A write that was not to wait found the database locked by another connection."""


class StoreFull(RegistryError):
    """A write failed because the disk is full (``SQLITE_FULL``, ``ENOSPC``)."""


def _is_busy(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_BUSY


class TooManySessions(Exception):
    """:meth:`RegistryClient.create` refused: the user already has ``limit`` sessions.

    A refusal, not a storage failure (the service answers it as 429), so it is
    deliberately not a :class:`RegistryError`.
    """

    def __init__(self, user_id: str, limit: int, *, all_live: bool = False):
        sessions = "session" if limit == 1 else "sessions"
        if all_live:
            message = (
                f"user {user_id!r} already has {limit} {sessions}, the most allowed, and every"
                " one is live (running or with turns waiting), so none can be dropped to make"
                " room; try again when one has finished its turn"
            )
        else:
            message = f"user {user_id!r} already has {limit} {sessions}, the most allowed"
        super().__init__(message)
        self.user_id = user_id
        self.limit = limit
        self.all_live = all_live


class SessionExists(Exception):
    """:meth:`RegistryClient.create` refused: a record with that key already exists.

    Creating is for new sessions only; the existing record is left unchanged.
    Seeing this means the caller raced another creator of the same key (one
    session actor per key should make that impossible), so it is a bug to
    report, not a condition to handle.
    """

    def __init__(self, key: SessionKey):
        super().__init__(f"session {key.session_id!r} of user {key.user_id!r} already exists")
        self.key = key


# --- the store --------------------------------------------------------------


class SessionStore:
    """Synchronous sqlite3 store, called by the registry actor one call at a time.

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
    or cloud volumes), paid on every turn; the group commit of
    :func:`serve_registry` amortizes it but does not remove it.

    Checkpoints: SQLite's automatic checkpoint is off; :meth:`checkpoint` (the
    registry's, in a worker thread, every :data:`CHECKPOINT_EVERY` write
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
    :class:`RegistryError` naming the path and the cause. The store refuses a
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
        self.commits_since_checkpoint = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.path.is_file():
                raise RegistryError(self._message("not a regular file"))
            if not self.path.exists() and self._wal_path.exists():
                raise RegistryError(
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
            if isinstance(exc, RegistryError):
                raise
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self._error(exc) from exc
            raise

    # --- public: reads ------------------------------------------------------

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
        except RegistryError as exc:
            if isinstance(exc.__cause__, sqlite3.Error) and _is_busy(exc.__cause__):
                raise StoreBusy(str(exc)) from exc
            raise
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT_S * 1000)}")

    def checkpoint(self) -> None:
        """Copy the WAL into the database and sync it (``PRAGMA wal_checkpoint``).

        Failed or not, the next one is due :data:`CHECKPOINT_EVERY` commits later.
        """
        self.commits_since_checkpoint = 0
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
            raise RegistryError(
                self._message(
                    f"schema version {version} is not one this service knows "
                    f"(it knows up to {SCHEMA_VERSION}); was it written by a newer release?"
                )
            )
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise RegistryError(
                self._message(f"database is corrupt (quick_check: {'; '.join(problems[:3])})")
            )
        if version == 0:
            (tables,) = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if tables:
                raise RegistryError(
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
            raise RegistryError(
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
            raise RegistryError(self._message("the store is closed"))
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction on the file we opened: checked, then committed or rolled back."""
        with self._translate():
            self._check_still_ours()
            with self._transaction("BEGIN IMMEDIATE"):
                yield
        self.commits_since_checkpoint += 1

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
            raise RegistryError(
                self._message(
                    "the database file was deleted while the service was running, so writes"
                    " would be lost; restart the service (it starts a new, empty database)"
                )
            )
        if identity != self._identity:
            raise RegistryError(
                self._message(
                    "the database file was replaced while the service was running, so writes"
                    " would go to the old file and be lost; restart the service to use the new one"
                )
            )

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """sqlite3 and OS errors leave the store as :class:`RegistryError`."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc

    def _message(self, cause: str) -> str:
        return " ".join(f"session store {self.path}: {cause}".split())

    def _error(self, exc: BaseException) -> RegistryError:
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
        return RegistryError(self._message(f"{type(exc).__name__}: {exc}"))

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


def open_store(data_dir: Path) -> SessionStore:
    """The service's store, at ``data_dir / "sessions.sqlite3"``. Raises :class:`RegistryError`."""
    return SessionStore(Path(data_dir) / DB_FILENAME)


# --- messages ---------------------------------------------------------------

# Each request's reply carries its answer or the exception the client raises.


@attrs.frozen
class LoadSession:
    """Answered with the :class:`SessionRecord`, None, or a :class:`RegistryError`."""

    key: SessionKey
    reply: trio.MemorySendChannel[SessionRecord | None | RegistryError] = attrs.field(repr=False)


@attrs.frozen
class SaveSession:
    """Upsert ``record``; answered with None once it is durable, or a :class:`RegistryError`."""

    record: SessionRecord
    reply: trio.MemorySendChannel[None | RegistryError] = attrs.field(repr=False)


@attrs.frozen
class CreateSession:
    """Insert a new ``record`` if its user has fewer than ``max_per_user``.

    Answered with None once it is durable, :class:`TooManySessions`,
    :class:`SessionExists`, or a :class:`RegistryError`.
    """

    record: SessionRecord
    max_per_user: int
    reply: trio.MemorySendChannel[None | TooManySessions | SessionExists | RegistryError] = (
        attrs.field(repr=False)
    )


@attrs.frozen
class DeleteSession:
    """Answered with True (it existed; it is deleted, then its transcripts), False, or a
    :class:`RegistryError`."""

    key: SessionKey
    reply: trio.MemorySendChannel[bool | RegistryError] = attrs.field(repr=False)


@attrs.frozen
class ListSessions:
    """Answered with a :class:`SessionPage` of the user's sessions or a :class:`RegistryError`."""

    user_id: str
    limit: int
    offset: int
    reply: trio.MemorySendChannel[SessionPage | RegistryError] = attrs.field(repr=False)


RegistryMessage = LoadSession | SaveSession | CreateSession | DeleteSession | ListSessions

HealthCallback = Callable[[str | None], None]
CountCallback = Callable[[int], None]
# user_id -> the ids of that user's sessions that are live or have turns waiting (the
# dispatcher's view), None when no dispatcher runs; read on the trio thread.
InUseCallback = Callable[[str], "Collection[str] | None"]
# (user ids that have a session, cutoff in wall-clock seconds): removes the files of every
# other user's HOME unchanged since the cutoff; how many it emptied.
HomesRemover = Callable[[frozenset[str], float], int]
# (user_id, claude_session_id): removes that CLI session's transcripts; OSError if it cannot.
TranscriptRemover = Callable[[str, str], None]
# Called when a write finds the disk full: makes room (disk_quota.DiskQuota.make_room);
# whether it gave any space back.
RoomMaker = Callable[[], Awaitable[bool]]


# --- the actor --------------------------------------------------------------


async def serve_registry(
    store: SessionStore,
    inbox: trio.MemoryReceiveChannel[RegistryMessage],
    *,
    remove_transcripts: TranscriptRemover | None = None,
    ttl_s: float | None = None,
    on_health: HealthCallback | None = None,
    on_count: CountCallback | None = None,
    sessions_in_use: InUseCallback | None = None,
    remove_homes: HomesRemover | None = None,
    make_room: RoomMaker | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer registry messages from ``inbox`` until it is closed or this is cancelled.

    Owns ``store`` and closes it on the way out, shielded, so shutdown always
    flushes it. The inbox belongs to the supervision tree: to stop gracefully,
    close its send end; queued requests are answered, then the actor returns.

    Store calls run one at a time and in arrival order: saves on the trio thread
    (a WAL append: see :class:`SessionStore`; in a worker thread only when
    another connection holds the database's lock), everything else in
    ``trio.to_thread.run_sync``, and a checkpoint every ``CHECKPOINT_EVERY``
    writes, in a worker thread too. Group commit: when a save is taken from the
    inbox, the saves queued right behind it (up to ``MAX_SAVE_BATCH``, up to the
    first message that is not a save) are taken without waiting and committed
    in the same transaction; then each is answered. All of them succeed or all
    fail. Saves queue up while a previous call runs in a thread, so the busier
    the registry, the larger its batches.

    ``remove_transcripts(user_id, claude_session_id)`` removes the files and
    directories holding the Claude transcripts of one CLI session. When a
    record is deleted (a delete request, or expiry) it is called for the
    record's current and previous CLI session ids, in the worker thread, after
    the record's deletion is committed. What it fails to remove is logged and
    left (the record is gone either way). None: no transcripts are removed.

    ``ttl_s``: sessions whose ``last_activity`` is more than ``ttl_s`` seconds
    before ``wall_clock()`` are deleted with their transcripts, by a sweep that
    runs once at start-up and then every ``min(ttl_s / 10, 1 h)`` (trio time),
    in chunks of ``EXPIRE_CHUNK`` that take turns with requests. Each sweep that
    expired something logs one line with the count. None: sessions never expire.

    ``on_health(reason)`` reports the storage's health on the trio thread (it
    must not block): called with the error message when a write (save, create,
    delete, sweep) fails on a :class:`RegistryError`, and with None when a write
    succeeds after that -- only when the state changes, and never before the
    first failure (a store that opened is healthy). Reads do not change it: a
    deleted database file still reads.

    ``sessions_in_use(user_id)`` names that user's sessions that are live or
    have turns waiting (read on the trio thread as a create is handled). A create
    that would take its user past ``max_per_user`` evicts the least recently
    active of the others: each is deleted in the create's transaction, its
    transcripts removed as a delete's are, logged and counted
    (``sessions_evicted_total``). Only when too few can be evicted is the create
    refused (:class:`TooManySessions`, saying they are all live). None (or a
    callback answering None: no dispatcher runs): nothing is evicted.

    ``remove_homes(user_ids, cutoff)``: at the end of each expiry sweep, in a
    worker thread, given the users who still have a session and the sweep's
    cutoff: it removes the files of every other user's HOME that has not changed
    since (their workspace goes ``ttl_s`` after their last session did).

    ``make_room()``: a write that fails because the disk is full (:class:`StoreFull`)
    awaits it (the service stops the agents filling the disk and releases a part of
    its reserve: disk_quota.py), then checkpoints the WAL (so commits reuse its space)
    and tries the write once more.

    ``on_count(n)`` is told how many records the store holds (all users together),
    on the trio thread: counted once at start-up, then kept by the writes that
    add or remove one (a create, a delete, the expiry sweep), so a reader (the
    metrics' ``sessions`` gauge) never waits for the database.

    Error handling: a failing call is logged and answered with the
    :class:`RegistryError`. An unexpected exception (a bug) is logged with its
    traceback and answered as a :class:`RegistryError` too. A transcript that
    cannot be removed and a failing ``on_health`` are logged. No message ends
    the actor; only ``Cancelled`` passes through.
    """
    registry: _Registry | None = None
    try:
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive or None, not {ttl_s!r}")
        registry = _Registry(store, inbox, remove_transcripts, ttl_s, on_health, wall_clock)
        registry.on_count = on_count
        registry.sessions_in_use = sessions_in_use
        registry.remove_homes = remove_homes
        registry.make_room = make_room
        await registry.count_records()
        task_status.started()
        await registry.run()
    finally:
        if registry is not None:
            registry.refuse_queued()
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(store.close)
            except Exception:
                log.exception("session registry: closing the store failed")


@attrs.define(eq=False)
class _Outcome:
    """What a store call came back with: a value, or the exception to answer with."""

    value: Any = None
    error: Exception | None = None

    @property
    def answer(self) -> Any:
        return self.value if self.error is None else self.error


class _Registry:
    """The actor's state: the store, the inbox, one message read ahead, health and the sweep."""

    def __init__(
        self,
        store: SessionStore,
        inbox: trio.MemoryReceiveChannel[RegistryMessage],
        remove_transcripts: TranscriptRemover | None,
        ttl_s: float | None,
        on_health: HealthCallback | None,
        wall_clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.remove_transcripts = remove_transcripts
        self.ttl_s = ttl_s
        self.on_health = on_health
        self.wall_clock = wall_clock
        self.health: str | None = None
        # A message taken from the inbox while gathering a batch, not handled yet.
        self.held: RegistryMessage | None = None
        self.sweep_interval = math.inf if ttl_s is None else min(ttl_s / 10, MAX_SWEEP_INTERVAL_S)
        self.next_sweep = math.inf if ttl_s is None else trio.current_time()
        self.sweep_cutoff: float | None = None  # set while a sweep is under way
        self.swept = 0
        self.on_count: CountCallback | None = None
        self.sessions_in_use: InUseCallback | None = None
        self.remove_homes: HomesRemover | None = None
        self.make_room: RoomMaker | None = None
        self.records: int | None = None  # how many the store holds (None: not counted)

    async def run(self) -> None:
        while True:
            if trio.current_time() >= self.next_sweep:
                await self._sweep_chunk()
            try:
                message = self._take_queued()
            except trio.EndOfChannel:
                return
            if message is None:
                if trio.current_time() >= self.next_sweep:
                    continue  # a sweep is under way: its next chunk
                with trio.move_on_at(self.next_sweep):
                    try:
                        message = await self.inbox.receive()
                    except trio.EndOfChannel:
                        return
                if message is None:
                    continue  # time to sweep
            await self._handle(message)

    def _take_queued(self) -> RegistryMessage | None:
        """The held message, else one already in the inbox, else None. EndOfChannel when done."""
        if self.held is not None:
            message, self.held = self.held, None
            return message
        try:
            return self.inbox.receive_nowait()
        except trio.WouldBlock:
            return None

    def refuse_queued(self) -> None:
        """Close the reply of every request not handled, so requesters fail now, not never."""
        pending = [self.held] if self.held is not None else []
        self.held = None
        while True:
            try:
                pending.append(self.inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        for message in pending:
            reply = getattr(message, "reply", None)
            if isinstance(reply, trio.MemorySendChannel):
                reply.close()

    async def count_records(self) -> None:
        outcome = await self._call("count", self.store.count)
        if outcome.error is None:
            self.records = 0
            self._count_change(outcome.value, publish=True)

    def _count_change(self, change: int, *, publish: bool = False) -> None:
        if self.records is None or not (change or publish):
            return
        self.records += change
        if self.on_count is not None:
            try:
                self.on_count(self.records)
            except Exception:
                log.exception("session registry: on_count failed")

    # --- requests -----------------------------------------------------------

    async def _handle(self, message: RegistryMessage) -> None:
        match message:
            case SaveSession():
                await self._save(self._gather_saves(message))
            case LoadSession(key, reply):
                with reply:
                    _answer(reply, (await self._call("load", self.store.load, key)).answer)
            case ListSessions(user_id, limit, offset, reply):
                with reply:
                    outcome = await self._call(
                        "list", self.store.list_for_user, user_id, limit, offset
                    )
                    _answer(reply, outcome.answer)
            case CreateSession(record, max_per_user, reply):
                with reply:
                    await self._create(record, max_per_user, reply)
            case DeleteSession(key, reply):
                with reply:
                    outcome = await self._write("delete", self._delete_in_thread, key)
                    self._count_change(-1 if outcome.value is True else 0)
                    _answer(reply, outcome.answer)
            case _:
                log.error("session registry: unknown message %r", message)

    def _gather_saves(self, first: SaveSession) -> list[SaveSession]:
        """``first`` and the saves queued right behind it, taken without waiting."""
        batch = [first]
        while len(batch) < MAX_SAVE_BATCH:
            try:
                message = self.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if not isinstance(message, SaveSession):
                self.held = message  # handled next, so the order is kept
                break
            batch.append(message)
        return batch

    async def _save(self, batch: list[SaveSession]) -> None:
        with ExitStack() as replies:  # every reply is closed, whatever happens
            for message in batch:
                replies.enter_context(message.reply)
            records = [message.record for message in batch]
            # It runs without a checkpoint: a cancelled actor must not begin it.
            await trio.lowlevel.checkpoint_if_cancelled()
            # On the trio thread: a commit is a write() into the page cache (SessionStore),
            # cheaper than the two thread switches of a worker thread. Only if another
            # connection holds the lock does it wait for it, in a worker thread.
            outcome = self._call_here("save", self._save_now, records)
            if isinstance(outcome.error, StoreBusy):
                outcome = await self._write("save", self.store.save_many, records)
            else:
                outcome = await self._write("save", self.store.save_many, records, first=outcome)
            for message in batch:
                # Each requester raises its own exception object.
                error = outcome.error
                _answer(message.reply, None if error is None else RegistryError(str(error)))
        if self.store.commits_since_checkpoint >= CHECKPOINT_EVERY:
            await self._write("checkpoint", self.store.checkpoint)

    async def _create(
        self,
        record: SessionRecord,
        max_per_user: int,
        reply: trio.MemorySendChannel[Any],
    ) -> None:
        # Read on the trio thread, now: a session that goes live after this loads its
        # record after this create (one request at a time), so it finds it gone if it
        # was evicted, as a deleted one, and starts a new conversation.
        in_use = None if self.sessions_in_use is None else self.sessions_in_use(record.user_id)
        outcome = await self._write("create", self._create_in_thread, record, max_per_user, in_use)
        if outcome.error is None:
            evicted: list[SessionRecord] = outcome.value
            self._count_change(1 - len(evicted))
            for old in evicted:
                log.info(
                    "session registry: evicted session %r of user %r (least recently used"
                    " of %d, last active %s) to make room for %r",
                    old.session_id,
                    old.user_id,
                    max_per_user,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old.last_activity)),
                    record.session_id,
                )
                metrics.session_evicted()
        _answer(reply, None if outcome.error is None else outcome.error)

    def _create_in_thread(
        self, record: SessionRecord, max_per_user: int, in_use: Collection[str] | None
    ) -> list[SessionRecord]:
        evicted = self.store.create(record, max_per_user, in_use)
        self._remove_transcripts(evicted)
        return evicted

    def _save_now(self, records: list[SessionRecord]) -> None:
        self.store.save_many(records, wait=False)

    def _delete_in_thread(self, key: SessionKey) -> bool:
        record = self.store.delete(key)
        if record is None:
            return False
        self._remove_transcripts([record])
        return True

    # --- expiry -------------------------------------------------------------

    async def _sweep_chunk(self) -> None:
        assert self.ttl_s is not None
        if self.sweep_cutoff is None:
            self.sweep_cutoff, self.swept = self.wall_clock() - self.ttl_s, 0
        outcome = await self._write("expire", self._expire_in_thread, self.sweep_cutoff)
        if outcome.error is None:
            self.swept += outcome.value
            self._count_change(-outcome.value)
            if outcome.value == EXPIRE_CHUNK:
                return  # more to do after the requests that are waiting
        if self.swept:
            log.info(
                "session registry: expired %d sessions inactive for over %g s",
                self.swept,
                self.ttl_s,
            )
        if self.remove_homes is not None and outcome.error is None:
            homes = await self._call("homes", self._remove_homes_in_thread, self.sweep_cutoff)
            if homes.value:
                log.info(
                    "session registry: removed the files of %d users with no session left"
                    " for over %g s",
                    homes.value,
                    self.ttl_s,
                )
        self.sweep_cutoff = None
        self.next_sweep = trio.current_time() + self.sweep_interval

    def _remove_homes_in_thread(self, before: float) -> int:
        assert self.remove_homes is not None
        return self.remove_homes(self.store.user_ids(), before)

    def _expire_in_thread(self, before: float) -> int:
        records = self.store.delete_inactive(before, EXPIRE_CHUNK)
        self._remove_transcripts(records)
        return len(records)

    def _remove_transcripts(self, records: Iterable[SessionRecord]) -> None:
        """In the worker thread: remove the transcripts of ``records``; log what fails."""
        if self.remove_transcripts is None:
            return
        for record in records:
            for claude_id in record.all_claude_session_ids:
                try:
                    self.remove_transcripts(record.user_id, claude_id)
                except OSError as exc:
                    log.error(
                        "session registry: could not remove transcripts %r of %s: %s",
                        claude_id,
                        record.key,
                        exc,
                    )
                except Exception:
                    log.exception("session registry: removing transcripts %r failed", claude_id)

    # --- store calls --------------------------------------------------------

    async def _write(
        self, what: str, function: Callable[..., Any], *args: Any, first: _Outcome | None = None
    ) -> _Outcome:
        """A store call that writes: its storage failure or success changes the health.

        On a full disk, once room is made (``make_room``), it is tried once more.
        ``first``: the outcome of the call already made (on the trio thread)."""
        outcome = first if first is not None else await self._call(what, function, *args)
        if isinstance(outcome.error, StoreFull) and what != "checkpoint":
            if self.make_room is not None:
                try:
                    await self.make_room()
                except Exception:
                    log.exception("session registry: making room on the disk failed")
            # After a checkpoint the next commits reuse the WAL's space (it is never
            # truncated): measured, a full disk then still takes ~150 new sessions.
            await self._call("checkpoint", self.store.checkpoint)
            outcome = await self._call(what, function, *args)
            if outcome.error is None:
                log.info("session registry: %s succeeded once room was made", what)
        return self._note_write(outcome)

    def _note_write(self, outcome: _Outcome) -> _Outcome:
        if isinstance(outcome.error, StoreBusy):
            pass  # says nothing of the storage: the write is retried, waiting for the lock
        elif isinstance(outcome.error, RegistryError):
            self._set_health(str(outcome.error))
        elif outcome.error is None or isinstance(outcome.error, TooManySessions | SessionExists):
            self._set_health(None)
        return outcome

    async def _call(self, what: str, function: Callable[..., Any], *args: Any) -> _Outcome:
        """Run one store call in a worker thread; every failure comes back as an answer.

        A call that has begun is never abandoned: if the actor is cancelled
        meanwhile, trio waits for the thread and returns its result (Cancelled
        comes at the next checkpoint), so a committed write is answered as such.
        """
        try:
            return _Outcome(value=await trio.to_thread.run_sync(function, *args))
        except Exception as exc:
            return self._failed(what, exc)

    def _call_here(self, what: str, function: Callable[..., Any], *args: Any) -> _Outcome:
        """Run one short store call on the trio thread; as :meth:`_call` otherwise."""
        try:
            return _Outcome(value=function(*args))
        except Exception as exc:
            return self._failed(what, exc)

    def _failed(self, what: str, exc: Exception) -> _Outcome:
        if isinstance(exc, StoreBusy | TooManySessions | SessionExists):
            return _Outcome(error=exc)
        if isinstance(exc, RegistryError):
            log.error("session registry: %s failed: %s", what, exc)
            return _Outcome(error=exc)
        log.error("session registry: %s raised unexpectedly", what, exc_info=exc)
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        return _Outcome(error=RegistryError(f"session store {self.store.path}: {what}: {cause}"))

    def _set_health(self, reason: str | None) -> None:
        if reason == self.health:
            return
        self.health = reason
        if reason is None:
            log.info("session registry: writes succeed again")
        if self.on_health is not None:
            try:
                self.on_health(reason)
            except Exception:
                log.exception("session registry: on_health failed")


def _answer(reply: trio.MemorySendChannel[Any], answer: Any) -> None:
    try:
        reply.send_nowait(answer)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the requester went away


# --- the requester's side ---------------------------------------------------


class RegistryClient:
    """Request/reply helpers over a send channel to the registry's inbox (the caller owns the channel).

    Every method waits for the registry's answer.

    Error handling: a :class:`RegistryError` answered by the registry is raised
    here. So is a registry that is gone (its inbox is closed, or it closed the
    reply without answering: it was stopped before handling the request); those
    messages name the registry, not a path. A request cancelled here may still
    be carried out by the registry (a save may still be committed).
    """

    def __init__(self, inbox: trio.MemorySendChannel[RegistryMessage]):
        self.inbox = inbox

    async def load(self, key: SessionKey) -> SessionRecord | None:
        record: SessionRecord | None = await self._request(lambda reply: LoadSession(key, reply))
        return record

    async def save(self, record: SessionRecord) -> None:
        """Insert or update ``record``; returns once it is durable, raises :class:`RegistryError` if not.

        Never refused for the per-user bound: insert new sessions with :meth:`create`.
        """
        await self._request(lambda reply: SaveSession(record, reply))

    async def create(self, record: SessionRecord, max_per_user: int) -> None:
        """Insert a new session, its user keeping at most ``max_per_user``; returns once durable.

        At the bound, the user's least recently active sessions that are not in
        use are evicted to make room (see :func:`serve_registry`). The check, the
        evictions and the insert are one transaction. Raises
        :class:`TooManySessions` when the user's sessions at the bound are all in
        use, :class:`SessionExists` if the key already has a record (left
        unchanged), :class:`RegistryError` if the write failed.
        """
        if max_per_user < 0:
            raise ValueError(f"max_per_user must be >= 0, not {max_per_user}")
        await self._request(lambda reply: CreateSession(record, max_per_user, reply))

    async def delete(self, key: SessionKey) -> bool:
        """Delete the record, then its transcripts; False if there was no record."""
        existed: bool = await self._request(lambda reply: DeleteSession(key, reply))
        return existed

    async def list_for_user(self, user_id: str, limit: int, offset: int = 0) -> SessionPage:
        """Up to ``limit`` of the user's sessions after the first ``offset``, most recent first,
        and how many they have in all."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, not {limit} and {offset}")
        page: SessionPage = await self._request(
            lambda reply: ListSessions(user_id, limit, offset, reply)
        )
        return page

    async def _request(self, make: Callable[[trio.MemorySendChannel[Any]], RegistryMessage]) -> Any:
        reply, answers = trio.open_memory_channel[Any](1)
        async with answers:
            try:
                await self.inbox.send(make(reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reply.close()
                raise RegistryError(
                    "session registry is not running (its inbox is closed)"
                ) from exc
            try:
                answer = await answers.receive()
            except trio.EndOfChannel:
                raise RegistryError(
                    "session registry closed the request without answering"
                ) from None
        if isinstance(answer, Exception):
            raise answer
        return answer


# --- per-user workspaces ----------------------------------------------------

_UNSAFE = re.compile(r"[^a-z0-9_-]+")
SLUG_MAX = 32
DIGEST_HEX = 32


def user_workspace(data_dir: Path, user_id: str) -> Path:
    """The directory a user's sessions run in: ``data_dir / "users" / <name>``. Not created here.

    ``<name>`` is ``<slug>-<digest>``: ``digest`` is the first 32 hex digits
    (128 bits) of the SHA-256 of the exact user id (UTF-8, lone surrogates
    included), and ``slug`` a readable hint for operators: the id lowercased,
    every run of characters outside ``[a-z0-9_-]`` replaced by ``_``, leading
    ``-``/``_`` stripped (so it never looks like a command-line option), cut
    to 32 characters. An id with nothing readable gets just ``<digest>``.

    Why this shape and not the id itself or a slug alone:

    * Distinct ids never share a directory: the name ends in a fixed-width
      digest, so equal names mean equal digests, i.e. a SHA-256 collision. The
      slug is lossy on purpose ("Alice", "alice" and "al ice" all read
      ``alice``/``al_ice``) and cannot collide anything by itself; case-
      insensitive filesystems cannot merge two users either, the digest is lowercase hex.
    * No id escapes ``data_dir/users``: the name is one path component of
      ``[a-z0-9_-]`` only, never empty, ``.`` or ``..``, no ``/`` or NUL, at
      most 65 characters, whatever the id (``../``, absolute paths, unicode,
      megabytes long).
    """
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_HEX]
    slug = _UNSAFE.sub("_", user_id.lower()).lstrip("-_")[:SLUG_MAX]
    name = f"{slug}-{digest}" if slug else digest
    return Path(data_dir) / "users" / name
