"""Session registry actor: the durable store of multi-turn sessions.

A session is addressed by ``(user_id, session_id)`` (:class:`SessionKey`) and
remembers the Claude CLI session it maps to (``claude_session_id``, which we
choose and pass as ``--session-id`` on the first turn and ``--resume`` after),
when it was used and what it cost. Records live in one SQLite file,
``<data_dir>/sessions.sqlite3``, so they survive service restarts.

Three layers, each owning one thing:

* :class:`SessionStore` owns the ``sqlite3`` connection. Synchronous; only the
  registry actor calls it, from a worker thread, one call at a time.
* :func:`serve_registry` is the actor. It owns the store and the receive end of
  its inbox, and runs every store call in ``trio.to_thread.run_sync`` so sqlite
  never blocks the trio loop. Messages are handled strictly in arrival order.
* :class:`RegistryClient` is the requester's side: request/reply helpers over a
  send channel to the inbox, which its caller owns.

The inbox carries :class:`LoadSession`, :class:`SaveSession`,
:class:`DeleteSession` and :class:`ListSessions`. The requests with a ``reply``
hand the registry the send end of a fresh channel (buffer 1); the registry
sends exactly one value on it (the answer, or the :class:`RegistryError`) and
closes it. The requester owns the receive end.

Error handling: anything wrong with the database file (not a database, corrupt,
unreadable, a directory, written by a newer version of this service) fails
:class:`SessionStore` construction with :class:`RegistryError`, so the service
refuses to start rather than run without its sessions. The file is never
replaced, repaired or deleted: that is an operator's decision. Once running, a
failed store call is logged and answered with the :class:`RegistryError`; it
never ends the actor.

Resource handling: the actor closes the store when it ends, whether its inbox
was closed or it was cancelled, inside a shielded scope, so the WAL is
checkpointed into the database file on shutdown. Saves still waiting in the
inbox when the actor is *cancelled* are lost; close the inbox instead to let it
finish them first.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio

from ..messages import SessionKey

log = logging.getLogger(__name__)

DB_FILENAME = "sessions.sqlite3"

SCHEMA_VERSION = 1
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
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM sessions"
_UPSERT = (
    f"INSERT INTO sessions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    " ON CONFLICT (user_id, session_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[2:])
)

# How long a write waits for another connection's lock (e.g. a second service
# instance pointed at the same data dir) before failing with "database is locked".
BUSY_TIMEOUT_S = 5.0


# --- records ----------------------------------------------------------------


@attrs.frozen
class SessionRecord:
    """Everything the service remembers about one session between turns."""

    user_id: str
    session_id: str
    claude_session_id: str  # the UUID we chose; the CLI's --session-id / --resume
    created_at: float  # unix seconds
    last_activity: float  # unix seconds
    turns: int = 0
    total_cost_usd: float = 0.0
    transcript_started: bool = False  # a turn was sent to the CLI, so its transcript may exist

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.user_id, self.session_id)


def new_session_record(key: SessionKey, now: float) -> SessionRecord:
    """A session that has not run a turn yet, with a fresh CLI session id."""
    return SessionRecord(
        user_id=key.user_id,
        session_id=key.session_id,
        claude_session_id=str(uuid.uuid4()),
        created_at=now,
        last_activity=now,
    )


class RegistryError(Exception):
    """The session database cannot be opened, read or written.

    The message is one line naming the database path and the cause.
    """


# --- the store --------------------------------------------------------------


class SessionStore:
    """Synchronous sqlite3 store; every method is called from a worker thread, one at a time.

    It owns one ``sqlite3`` connection to ``path`` (opened with
    ``check_same_thread=False``: trio's thread cache may run consecutive calls
    on different threads; the registry actor guarantees they never overlap).
    The database runs in WAL mode with ``synchronous=FULL``: each :meth:`save`
    is durable once it returns.

    Opening creates the parent directories and the database if missing, then
    checks the file with reads only (``user_version``, ``PRAGMA quick_check``,
    the table's columns) before it writes anything (journal mode, migrations),
    so a file it refuses is left byte-for-byte as it was.

    Error handling: every failure, at open or in a method, is a
    :class:`RegistryError` naming the path and the cause. The store refuses a
    file that is not a regular file, not an SQLite database, corrupt, written
    by a newer schema version, or an SQLite database that is not ours (version 0
    yet holding tables). It never replaces or deletes an existing file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.path.is_file():
                raise RegistryError(self._message("not a regular file"))
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
        except BaseException as exc:
            self._close_quietly()
            if isinstance(exc, RegistryError):
                raise
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self._error(exc) from exc
            raise

    # --- public -----------------------------------------------------------

    def load(self, key: SessionKey) -> SessionRecord | None:
        with self._translate():
            row = self._db.execute(
                f"{_SELECT} WHERE user_id = ? AND session_id = ?", (key.user_id, key.session_id)
            ).fetchone()
        return None if row is None else _record(row)

    def save(self, record: SessionRecord) -> None:
        """Insert or replace the record for ``record.key``; committed when this returns."""
        with self._translate():
            self._db.execute(_UPSERT, _row(record))

    def delete(self, key: SessionKey) -> bool:
        """Forget a session; True if it existed."""
        with self._translate():
            cursor = self._db.execute(
                "DELETE FROM sessions WHERE user_id = ? AND session_id = ?",
                (key.user_id, key.session_id),
            )
        return cursor.rowcount > 0

    def list_for_user(self, user_id: str) -> list[SessionRecord]:
        """The user's sessions, most recently active first."""
        with self._translate():
            rows = self._db.execute(
                f"{_SELECT} WHERE user_id = ? ORDER BY last_activity DESC, session_id",
                (user_id,),
            ).fetchall()
        return [_record(row) for row in rows]

    def count(self) -> int:
        """How many sessions, all users together."""
        with self._translate():
            (n,) = self._db.execute("SELECT count(*) FROM sessions").fetchone()
        return n

    def close(self) -> None:
        """Checkpoint the WAL into the file and close. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with self._translate():
                conn.close()

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
        self._db.execute("PRAGMA synchronous = FULL")

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated.
            version = self._user_version()
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                log.info("session store %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _check_columns(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        missing = [c for c in _COLUMNS if c not in columns]
        if missing:
            raise RegistryError(
                self._message(f"table 'sessions' lacks columns {', '.join(missing)}")
            )

    def _user_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return version

    # --- helpers ----------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(self._message("the store is closed"))
        return self._conn

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
        return RegistryError(self._message(f"{type(exc).__name__}: {exc}"))

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def _row(record: SessionRecord) -> tuple:
    return (
        record.user_id,
        record.session_id,
        record.claude_session_id,
        float(record.created_at),
        float(record.last_activity),
        int(record.turns),
        float(record.total_cost_usd),
        int(bool(record.transcript_started)),
    )


def _record(row: tuple) -> SessionRecord:
    user_id, session_id, claude_id, created, last, turns, cost, started = row
    return SessionRecord(
        user_id=user_id,
        session_id=session_id,
        claude_session_id=claude_id,
        created_at=float(created),
        last_activity=float(last),
        turns=int(turns),
        total_cost_usd=float(cost),
        transcript_started=bool(started),
    )


def open_store(data_dir: Path) -> SessionStore:
    """The service's store, at ``data_dir / "sessions.sqlite3"``. Raises :class:`RegistryError`."""
    return SessionStore(Path(data_dir) / DB_FILENAME)


# --- messages ---------------------------------------------------------------


@attrs.frozen
class LoadSession:
    """Answered on ``reply`` with the :class:`SessionRecord`, None, or a :class:`RegistryError`."""

    key: SessionKey
    reply: trio.MemorySendChannel = attrs.field(repr=False)


@attrs.frozen
class SaveSession:
    """Upsert ``record``. No answer; a failure is logged by the registry."""

    record: SessionRecord


@attrs.frozen
class DeleteSession:
    """Answered on ``reply`` with True (it existed), False, or a :class:`RegistryError`."""

    key: SessionKey
    reply: trio.MemorySendChannel = attrs.field(repr=False)


@attrs.frozen
class ListSessions:
    """Answered on ``reply`` with the user's records (latest first) or a :class:`RegistryError`."""

    user_id: str
    reply: trio.MemorySendChannel = attrs.field(repr=False)


RegistryMessage = LoadSession | SaveSession | DeleteSession | ListSessions


# --- the actor --------------------------------------------------------------


async def serve_registry(
    store: SessionStore,
    inbox: trio.MemoryReceiveChannel,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer registry messages from ``inbox`` until it is closed or this is cancelled.

    Owns ``store`` and closes it on the way out, shielded, so shutdown always
    flushes it. The inbox belongs to the supervision tree: to stop gracefully,
    close its send end; queued saves are written, then the actor returns.

    Each store call runs in ``trio.to_thread.run_sync``, one at a time and in
    arrival order. A call that has begun is never abandoned (cancellation waits
    for it), so the store is never used by two threads at once, not even by the
    final close.

    Error handling: a failing call is logged; requesters with a ``reply`` get
    the :class:`RegistryError` as the answer. An unexpected exception (a bug)
    is logged with its traceback and answered as a :class:`RegistryError` too.
    No message ends the actor; only ``Cancelled`` passes through.
    """
    task_status.started()
    try:
        async for message in inbox:
            await _handle(store, message)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(store.close)
            except Exception:
                log.exception("session registry: closing the store failed")


async def _handle(store: SessionStore, message: RegistryMessage) -> None:
    match message:
        case LoadSession(key, reply):
            await _call_and_reply(reply, store, "load", key)
        case DeleteSession(key, reply):
            await _call_and_reply(reply, store, "delete", key)
        case ListSessions(user_id, reply):
            await _call_and_reply(reply, store, "list_for_user", user_id)
        case SaveSession(record):
            await _call(store, "save", record)
        case _:
            log.error("session registry: unknown message %r", message)


async def _call(store: SessionStore, method: str, *args):
    """Run one store call in a worker thread; a failure comes back as a RegistryError value."""
    try:
        return await trio.to_thread.run_sync(getattr(store, method), *args)
    except RegistryError as exc:
        log.error("session registry: %s failed: %s", method, exc)
        return exc
    except Exception as exc:
        log.exception("session registry: %s raised unexpectedly", method)
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        return RegistryError(f"session store {store.path}: {method}: {cause}")


async def _call_and_reply(reply: trio.MemorySendChannel, store: SessionStore, method: str, *args):
    with reply:  # ours from the moment it arrived: closed even if we are cancelled
        answer = await _call(store, method, *args)
        try:
            reply.send_nowait(answer)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the requester went away


# --- the requester's side ---------------------------------------------------


class RegistryClient:
    """Request/reply helpers over a send channel to the registry's inbox (the caller owns the channel).

    Error handling: a :class:`RegistryError` answered by the registry is raised
    here. So is a registry that is gone (its inbox is closed, or it closed the
    reply without answering); those messages name the registry, not a path.
    """

    def __init__(self, inbox: trio.MemorySendChannel):
        self.inbox = inbox

    async def load(self, key: SessionKey) -> SessionRecord | None:
        return await self._request(lambda reply: LoadSession(key, reply))

    async def save(self, record: SessionRecord) -> None:
        """Fire and forget: returns once the registry has the message, not once it is written."""
        await self._send(SaveSession(record))

    async def delete(self, key: SessionKey) -> bool:
        return await self._request(lambda reply: DeleteSession(key, reply))

    async def list_for_user(self, user_id: str) -> list[SessionRecord]:
        return await self._request(lambda reply: ListSessions(user_id, reply))

    async def _request(self, make):
        reply, answers = trio.open_memory_channel(1)
        async with answers:
            await self._send(make(reply))
            try:
                answer = await answers.receive()
            except trio.EndOfChannel:
                raise RegistryError(
                    "session registry closed the request without answering"
                ) from None
        if isinstance(answer, RegistryError):
            raise answer
        return answer

    async def _send(self, message: RegistryMessage) -> None:
        try:
            await self.inbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise RegistryError("session registry is not running (its inbox is closed)") from exc


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
