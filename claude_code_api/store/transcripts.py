"""Session transcripts in PostgreSQL: the SDK's ``SessionStore`` on :class:`Database`.

Given as ``ClaudeAgentOptions.session_store``, :class:`PostgresTranscriptStore`
receives a copy of every line the CLI writes to a session's local JSONL transcript
(``append``), and gives the whole transcript back before a resume (``load``), so
that a session can resume on a replica that never had its local file. It
implements the protocol's optional methods too (``list_sessions``,
``list_session_summaries``, ``delete``, ``list_subkeys``), and passes the SDK's
``run_session_store_conformance``.

The SDK calls it from its own anyio tasks (under trio: trio tasks); each method
runs its transaction in a worker thread through ``anyio.to_thread``.

Ordering and idempotency: appends to one session (main transcript and subagents'
alike) are serialised by a transaction-scoped advisory lock on the session, so
entries are stored, and loaded, in commit order. An entry's ``uuid`` is its
idempotency key within its transcript: a batch the SDK sends again (a retried
append that had landed) adds nothing. Entries without one are always added.

Error handling: every method raises
:class:`~claude_code_api.store.database.DatabaseUnavailable` when the database does
not answer (the SDK retries a failed append, then reports a ``MirrorErrorMessage``;
a failed ``load`` fails the resume). Nothing is half-written: one call, one
transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar, cast

import anyio.to_thread
import psycopg
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

from .database import Database

T = TypeVar("T")

# The subpath column's value for a session's main transcript (the SDK never uses "").
MAIN = ""


def _subpath(key: SessionKey) -> str:
    return key.get("subpath") or MAIN


def _lock_session(connection: psycopg.Connection, project_key: str, session_id: str) -> None:
    """Hold the session's lock until the transaction ends: one writer at a time."""
    connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
        (json.dumps([project_key, session_id]),),
    )


def _uuid(entry: SessionStoreEntry) -> str | None:
    uuid = entry.get("uuid")
    return uuid if isinstance(uuid, str) else None


def _new_entries(
    connection: psycopg.Connection, key: SessionKey, entries: list[SessionStoreEntry]
) -> list[SessionStoreEntry]:
    """``entries`` without those whose uuid the transcript (or the batch before them) holds."""
    uuids = [uuid for uuid in map(_uuid, entries) if uuid is not None]
    if not uuids:
        return entries
    rows = connection.execute(
        "SELECT uuid FROM transcript_entries"
        " WHERE project_key = %s AND session_id = %s AND subpath = %s AND uuid = ANY(%s)",
        (key["project_key"], key["session_id"], _subpath(key), uuids),
    ).fetchall()
    seen = {row[0] for row in rows}
    fresh = []
    for entry in entries:
        uuid = _uuid(entry)
        if uuid is None or uuid not in seen:
            fresh.append(entry)
        if uuid is not None:
            seen.add(uuid)
    return fresh


def _insert(
    connection: psycopg.Connection, key: SessionKey, entries: list[SessionStoreEntry]
) -> None:
    """Add ``entries`` to the transcript in their order (COPY keeps it; ids ascend)."""
    columns = (key["project_key"], key["session_id"], _subpath(key))
    with (
        connection.cursor() as cursor,
        cursor.copy(
            "COPY transcript_entries (project_key, session_id, subpath, uuid, entry) FROM STDIN"
        ) as copy,
    ):
        for entry in entries:
            copy.write_row((*columns, _uuid(entry), json.dumps(entry)))


def _fold_summary(
    connection: psycopg.Connection, key: SessionKey, entries: list[SessionStoreEntry]
) -> None:
    """Fold ``entries`` into the main transcript's summary and stamp its write time
    (later than the previous one, so each append is seen as newer)."""
    row = connection.execute(
        "SELECT mtime_ms, summary FROM transcript_sessions"
        " WHERE project_key = %s AND session_id = %s",
        (key["project_key"], key["session_id"]),
    ).fetchone()
    previous: SessionSummaryEntry | None = None
    if row is not None:
        previous = {"session_id": key["session_id"], "mtime": row[0], "data": json.loads(row[1])}
    summary = fold_session_summary(previous, key, entries)
    connection.execute(
        """
        INSERT INTO transcript_sessions AS s (project_key, session_id, mtime_ms, summary)
        VALUES (%(project)s, %(session)s, (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                %(summary)s)
        ON CONFLICT (project_key, session_id) DO UPDATE
        SET mtime_ms = greatest(s.mtime_ms + 1, excluded.mtime_ms), summary = excluded.summary
        """,
        {
            "project": key["project_key"],
            "session": key["session_id"],
            "summary": json.dumps(summary["data"]),
        },
    )


def _append(
    connection: psycopg.Connection, key: SessionKey, entries: list[SessionStoreEntry]
) -> None:
    _lock_session(connection, key["project_key"], key["session_id"])
    fresh = _new_entries(connection, key, entries)
    if not fresh:
        return
    _insert(connection, key, fresh)
    # Subagents' transcripts are no part of the session's summary (nor of list_sessions).
    if _subpath(key) == MAIN:
        _fold_summary(connection, key, fresh)


def _load(connection: psycopg.Connection, key: SessionKey) -> list[SessionStoreEntry] | None:
    rows = connection.execute(
        "SELECT entry FROM transcript_entries"
        " WHERE project_key = %s AND session_id = %s AND subpath = %s ORDER BY id",
        (key["project_key"], key["session_id"], _subpath(key)),
    ).fetchall()
    if not rows:
        return None
    return [cast(SessionStoreEntry, json.loads(row[0])) for row in rows]


def _delete(connection: psycopg.Connection, key: SessionKey) -> None:
    """Delete one transcript; the main one takes its subagents' and its summary along."""
    _lock_session(connection, key["project_key"], key["session_id"])
    session = (key["project_key"], key["session_id"])
    if _subpath(key) != MAIN:
        connection.execute(
            "DELETE FROM transcript_entries"
            " WHERE project_key = %s AND session_id = %s AND subpath = %s",
            (*session, _subpath(key)),
        )
        return
    connection.execute(
        "DELETE FROM transcript_entries WHERE project_key = %s AND session_id = %s", session
    )
    connection.execute(
        "DELETE FROM transcript_sessions WHERE project_key = %s AND session_id = %s", session
    )


def delete_transcript(database: Database, key: SessionKey) -> None:
    """:meth:`PostgresTranscriptStore.delete` in the calling (worker) thread: blocks.

    Error handling: :class:`~claude_code_api.store.database.DatabaseUnavailable`."""
    database.call(lambda connection: _delete(connection, key))


class PostgresTranscriptStore(SessionStore):
    """The SDK's ``SessionStore`` on PostgreSQL: sessions' transcripts, shared by replicas.

    Holds no state of its own beyond the :class:`Database` it is given (whose owner
    closes it). Keys are the SDK's: ``project_key`` (the service passes the user's
    id), ``session_id`` (the Claude session's UUID), and ``subpath`` for a subagent's
    transcript.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        # anyio, not trio: the SDK calls from its anyio tasks (trio tasks under trio).
        return await anyio.to_thread.run_sync(self._database.call, work)

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Add ``entries`` to the transcript ``key``, in order, skipping uuids it holds."""
        if entries:
            await self._run(lambda connection: _append(connection, key, entries))

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """The transcript's entries in commit order; None when it has none."""
        return await self._run(lambda connection: _load(connection, key))

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """The project's sessions (main transcripts) and when each was last appended to."""

        def work(connection: psycopg.Connection) -> list[SessionStoreListEntry]:
            rows = connection.execute(
                "SELECT session_id, mtime_ms FROM transcript_sessions WHERE project_key = %s",
                (project_key,),
            ).fetchall()
            return [{"session_id": row[0], "mtime": row[1]} for row in rows]

        return await self._run(work)

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The SDK's summary of each of the project's sessions, as its appends folded it."""

        def work(connection: psycopg.Connection) -> list[SessionSummaryEntry]:
            rows = connection.execute(
                "SELECT session_id, mtime_ms, summary FROM transcript_sessions"
                " WHERE project_key = %s",
                (project_key,),
            ).fetchall()
            return [{"session_id": r[0], "mtime": r[1], "data": json.loads(r[2])} for r in rows]

        return await self._run(work)

    async def delete(self, key: SessionKey) -> None:
        """Delete the transcript ``key``; a main transcript takes its subagents' along."""
        await self._run(lambda connection: _delete(connection, key))

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """The subpaths (subagents' transcripts) the session has."""

        def work(connection: psycopg.Connection) -> list[str]:
            rows = connection.execute(
                "SELECT DISTINCT subpath FROM transcript_entries"
                " WHERE project_key = %s AND session_id = %s AND subpath <> %s ORDER BY subpath",
                (key["project_key"], key["session_id"], MAIN),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._run(work)
