"""The seam between the session registry actor and where session records live.

:class:`SessionTable` is what the registry actor (``actors/registry.py``) needs
of a store: records by key, a user's sessions a page at a time with their count,
inserts bounded per user, deletes, expiry. :class:`~.sqlite.SqliteSessionTable`
implements it on one SQLite file, :class:`~.postgres.PostgresSessionTable` on
PostgreSQL (``DATABASE_URL``) through psycopg from worker threads. ``tests/contract/test_store_contract.py``
is the suite every implementation passes.

(Named "table", not "store", because the Agent SDK's ``SessionStore`` protocol is
the one for transcripts; a session table holds the service's own records.)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from ..messages import SessionKey
from .records import SessionPage, SessionRecord


class SessionTable(Protocol):
    """Durable session records, called synchronously, one call at a time.

    Threads: the registry actor never overlaps two calls, but runs them on
    worker threads (consecutive calls may land on different ones), so an
    implementation must not tie its connection to a thread. The one call made
    on the trio thread is ``save_many(..., wait=False)``, which must not block:
    it raises :class:`~.errors.StoreBusy` rather than wait for anything (a lock,
    the network), and the actor repeats it with ``wait=True`` in a worker
    thread. An implementation that cannot write without blocking raises
    StoreBusy for every ``wait=False`` call.

    Durability: a write that returns is committed; it survives a crash of the
    service process. Every write is one transaction: all of it, or none.

    Error handling: a failure of the storage, at open or in any method, is a
    :class:`~.errors.StoreUnavailable` naming :attr:`location` and the cause
    (:class:`~.errors.StoreFull` when it is out of space, after which the actor
    makes room, calls :meth:`checkpoint` and tries once more). A method called
    after :meth:`close` raises StoreUnavailable. ``create`` also refuses with
    :class:`~.errors.TooManySessions` and :class:`~.errors.SessionExists`,
    which are not failures. Anything else escaping a method is a bug, which the
    actor logs and answers as StoreUnavailable.
    """

    @property
    def location(self) -> str:
        """Where the records are, for messages: a file's path, a database without its password."""
        ...

    def load(self, key: SessionKey) -> SessionRecord | None:
        """The record of ``key``, or None if there is none."""
        ...

    def list_for_user(self, user_id: str, limit: int, offset: int = 0) -> SessionPage:
        """Up to ``limit`` of the user's records after the first ``offset``, and their total.

        Order: latest ``last_activity`` first, ties by ``session_id``; the page and
        the total are read from one snapshot.
        """
        ...

    def user_ids(self) -> frozenset[str]:
        """Every user who has a record."""
        ...

    def count(self) -> int:
        """How many records, all users together."""
        ...

    def save_many(self, records: Sequence[SessionRecord], *, wait: bool = True) -> None:
        """Insert or replace the record of each ``record.key``, in one transaction.

        Never refused for the per-user bound (new sessions go through
        :meth:`create`). ``wait=False``: see the class docstring.
        """
        ...

    def create(
        self,
        record: SessionRecord,
        max_per_user: int,
        in_use: Collection[str] | None = None,
    ) -> list[SessionRecord]:
        """Insert a new record, keeping its user at ``max_per_user`` at most; one transaction.

        When the user already has ``max_per_user`` records, the least recently
        active of those whose session id is not in ``in_use`` (ties by session
        id) are deleted to make room and returned (their transcripts are the
        caller's to remove). ``in_use`` None: nothing may be evicted.

        Raises :class:`~.errors.SessionExists` if the key has a record (left
        unchanged), :class:`~.errors.TooManySessions` (``all_live`` when
        ``in_use`` was given) if too few can be evicted; nothing changes then.
        """
        ...

    def delete(self, key: SessionKey) -> SessionRecord | None:
        """Forget a session; the record it had, or None if there was none."""
        ...

    def delete_inactive(self, before: float, limit: int) -> list[SessionRecord]:
        """Delete up to ``limit`` records last active before ``before``, oldest first; returns them.

        Fewer than ``limit`` means none are left.
        """
        ...

    def checkpoint(self) -> None:
        """Housekeeping the actor runs in a worker thread every so many writes.

        SQLite copies its write-ahead log into the database here; a store that
        needs nothing of the kind does nothing.
        """
        ...

    def close(self) -> None:
        """Flush and release the storage. Idempotent."""
        ...
