"""Every replica's queued and running runs, in PostgreSQL: for ``/status`` and ``DELETE /runs``.

Two tables (:mod:`.schema`, migration ``runs``):

* ``replicas``: one row per live replica, its owner id (:func:`.leases.new_owner`, the one
  its session leases are held under) and until when it vouches for its runs (the
  database's clock alone). :meth:`RunTable.sync` renews it.
* ``runs``: each replica's runs as its dispatcher last showed them (id, user, session or
  none, state, when queued and started). A run answered is deleted.

Liveness: a row of ``runs`` counts only while its owner's ``replicas`` row has not expired,
so a replica that died (kill -9) leaves rows that every reader ignores from its expiry on
(``SESSION_LEASE_S`` at most, as its sessions' leases), and that :meth:`RunTable.sync`
deletes for good (``ON DELETE CASCADE``) :data:`FORGET_AFTER_S` later. A heartbeat row per
replica rather than an expiry per run: one short write per third of a lease whatever the
number of runs, and the rows of runs are written only when runs change.

Writes are diffs: :meth:`RunTable.sync` gets what the replica last wrote and what it has
now, and writes the difference in one transaction; when the replica does not know what
the table holds for it (its first write, after a failed one, or after its ``replicas`` row
was deleted while it was away) it replaces all its rows. So a lost write is repaired by the
next one, never left as stale rows of a live replica.

Resource handling: :class:`RunTable` owns nothing but its :class:`~.database.Database`
reference; each method is one transaction on a pooled connection, made in the calling
worker thread (``trio.to_thread``), never on trio's.

Error handling: the database not answering is :class:`~.database.DatabaseUnavailable`;
other database errors are defects and propagate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import psycopg

from ..messages import RunState, RunView
from .database import Database
from .postgres import decode_text, encode_text

# A replica whose row expired this long ago is deleted, with its runs.
FORGET_AFTER_S = 60.0

_TTL = "%(ttl)s * interval '1 second'"
_RENEW = f"UPDATE replicas SET expires_at = now() + {_TTL} WHERE owner = %(owner)s"
_JOIN = f"INSERT INTO replicas (owner, expires_at) VALUES (%(owner)s, now() + {_TTL})"
_FORGET = "DELETE FROM replicas WHERE expires_at < now() - %s * interval '1 second'"
_INSERT = """
    INSERT INTO runs (run_id, user_id, session_id, owner, state, queued_at, started_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
"""
_UPDATE = "UPDATE runs SET state = %s, started_at = %s WHERE run_id = %s AND owner = %s"
_DELETE = "DELETE FROM runs WHERE run_id = ANY(%s) AND owner = %s"
_DELETE_ALL = "DELETE FROM runs WHERE owner = %s"
_LIVE = "JOIN replicas p ON p.owner = r.owner AND p.expires_at > now()"
_OF_USER = f"""
    SELECT r.run_id, r.state, r.session_id, r.queued_at, r.started_at FROM runs r {_LIVE}
    WHERE r.user_id = %s AND r.owner <> %s ORDER BY r.queued_at
"""
_OWNER_OF = f"""
    SELECT r.owner FROM runs r {_LIVE}
    WHERE r.run_id = %s AND r.user_id = %s AND r.owner <> %s
"""


@attrs.frozen
class RunRow:
    """What the table keeps of a run. :func:`changed` ignores ``queued_at``: it is written
    once, when the run is first written (a dispatcher's snapshots convert it from trio
    time, a few microseconds apart each time)."""

    user_id: str
    session_id: str | None
    state: RunState
    queued_at: float
    started_at: float | None = None

    @classmethod
    def of(cls, view: RunView) -> RunRow:
        return cls(view.user_id, view.session_id, view.state, view.queued_at, view.started_at)


Runs = Mapping[str, RunRow]  # by run id


def changed(before: RunRow, now: RunRow) -> bool:
    return (before.state, before.started_at) != (now.state, now.started_at)


class RunTable:
    """The ``replicas`` and ``runs`` tables; every method blocks, one transaction each:
    call them from worker threads, never from a trio task."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @property
    def database(self) -> Database:
        return self._database

    def sync(
        self, owner: str, ttl_s: float, written: Runs | None, now: Runs, *, forget: bool = False
    ) -> None:
        """Renew ``owner``'s row for ``ttl_s`` seconds and make its runs ``now``, given
        that they were ``written`` (None: unknown, all are replaced). With ``forget``,
        replicas expired for :data:`FORGET_AFTER_S` are deleted, their runs with them."""

        def work(connection: psycopg.Connection) -> None:
            params = {"owner": owner, "ttl": ttl_s}
            known = written
            if connection.execute(_RENEW, params).rowcount == 0:
                connection.execute(_JOIN, params)
                known = None  # deleted while away: its runs went with it
            if known is None:
                connection.execute(_DELETE_ALL, (owner,))
                known = {}
            gone = [encode_text(run_id) for run_id in known.keys() - now.keys()]
            if gone:
                connection.execute(_DELETE, (gone, owner))
            with connection.cursor() as cursor:
                new = [
                    _row(run_id, row, owner) for run_id, row in now.items() if run_id not in known
                ]
                if new:
                    cursor.executemany(_INSERT, new)
                moved = [
                    (row.state.value, row.started_at, encode_text(run_id), owner)
                    for run_id, row in now.items()
                    if run_id in known and changed(known[run_id], row)
                ]
                if moved:
                    cursor.executemany(_UPDATE, moved)
            if forget:
                connection.execute(_FORGET, (FORGET_AFTER_S,))

        self._database.call(work)

    def leave(self, owner: str) -> None:
        """``owner`` stops (its service shutting down): its row and its runs are deleted."""
        self._database.call(lambda c: c.execute("DELETE FROM replicas WHERE owner = %s", (owner,)))

    def runs_of(self, user_id: str, but: str) -> tuple[RunView, ...]:
        """``user_id``'s runs on live replicas other than ``but``, the oldest first."""

        def work(connection: psycopg.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(_OF_USER, (encode_text(user_id), but)).fetchall()

        return tuple(
            RunView(
                decode_text(run_id),
                user_id,
                RunState(state),
                None if session_id is None else decode_text(session_id),
                float(queued_at),
                None if started_at is None else float(started_at),
            )
            for run_id, state, session_id, queued_at, started_at in self._database.call(work)
        )

    def owner_of(self, user_id: str, run_id: str, but: str) -> str | None:
        """The live replica other than ``but`` running ``user_id``'s run ``run_id``; None:
        no such run (unknown, answered, another user's, or its replica is gone)."""

        def work(connection: psycopg.Connection) -> tuple[Any, ...] | None:
            params = (encode_text(run_id), encode_text(user_id), but)
            return connection.execute(_OWNER_OF, params).fetchone()

        found = self._database.call(work)
        return None if found is None else str(found[0])


def _row(run_id: str, row: RunRow, owner: str) -> tuple[Any, ...]:
    session = None if row.session_id is None else encode_text(row.session_id)
    return (
        encode_text(run_id),
        encode_text(row.user_id),
        session,
        owner,
        row.state.value,
        row.queued_at,
        row.started_at,
    )
