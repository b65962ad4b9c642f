"""Session leases on PostgreSQL: a session is live on at most one replica at a time.

A lease is a row of ``session_leases`` (:mod:`.schema`, migration ``session_leases``): the
session's key, its *owner* (the replica holding it, :func:`new_owner`), its *fence* and its
expiry. The fence grows by one each time the owner changes (released or expired and taken
by another, or re-taken after a release) and never goes back for a key: rows stay after a
release. A write made on behalf of a session checks, in its own transaction, that the lease
is still the writer's with the fence it was given (:func:`holds`), so a replica that lost
its lease without noticing cannot overwrite its successor's work.

Expiry is judged by the database's clock alone (``now()``), never a replica's: replicas
only say for how long (``ttl_s``).

Keys: a :class:`~claude_code_api.messages.SessionKey` is stored as :func:`key_text`, the
JSON text of ``[user_id, session_id]`` (ASCII: NUL and lone surrogates are escaped, so any
``str`` fits), under its SHA-256, :func:`key_digest`, the primary key: fixed size whatever
the ids' length. The digest is also how the wake-ups name a key (:mod:`.wakeups`).

Resource handling: :class:`LeaseTable` owns nothing but its :class:`~.database.Database`
reference; each call is one transaction on a pooled connection, made in the calling
worker thread (``trio.to_thread``). :meth:`LeaseTable.release` and
:meth:`LeaseTable.release_all` announce each key they free (:class:`.wakeups.Released`)
in the same transaction: a replica woken by it finds the lease free.

Error handling: the database not answering is :class:`~.database.DatabaseUnavailable`
(a lease whose renewal failed so may be lost: its holder must stop writing when it
expires); other database errors are defects and propagate.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from collections.abc import Collection
from datetime import datetime

import attrs
import psycopg

from ..messages import SessionKey
from .database import Database
from .wakeups import Released, notify_in


@attrs.frozen
class Lease:
    """``owner`` holds ``key``'s lease under ``fence``: what a fenced write presents."""

    key: SessionKey
    owner: str
    fence: int


@attrs.frozen
class Held:
    """``key``'s lease is another's: ``owner``'s until ``expires_at`` (the database's
    clock), ``remaining_s`` from the moment :meth:`LeaseTable.acquire` looked."""

    key: SessionKey
    owner: str
    expires_at: datetime
    remaining_s: float


def new_owner() -> str:
    """A fresh owner id for this replica's run: host, process and a random part, so
    that a restarted replica never inherits its predecessor's leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def key_text(key: SessionKey) -> str:
    """``key`` as the table keeps it: ``["user_id", "session_id"]``, ASCII JSON."""
    return json.dumps([key.user_id, key.session_id])


def key_digest(key: SessionKey) -> bytes:
    """``key``'s name in the table and in wake-ups: SHA-256 of :func:`key_text`."""
    return hashlib.sha256(key_text(key).encode("ascii")).digest()


_TTL = "%(ttl)s * interval '1 second'"

# The expired lease is taken over in this same statement. ON CONFLICT DO UPDATE locks the
# conflicting row even when its WHERE refuses, so the SELECT after it sees the holder as is.
_ACQUIRE = f"""
    INSERT INTO session_leases AS l (key_digest, lease_key, owner, fence, expires_at)
    VALUES (%(digest)s, %(text)s, %(owner)s, 1, now() + {_TTL})
    ON CONFLICT (key_digest) DO UPDATE SET
        owner = excluded.owner,
        fence = CASE WHEN l.owner = excluded.owner THEN l.fence ELSE l.fence + 1 END,
        expires_at = excluded.expires_at
    WHERE l.owner IS NULL OR l.owner = excluded.owner OR l.expires_at <= now()
    RETURNING l.fence
"""
_HOLDER = """
    SELECT owner, expires_at, greatest(extract(epoch FROM expires_at - now()), 0)::float8
    FROM session_leases WHERE key_digest = %s
"""
_RENEW = f"""
    UPDATE session_leases SET expires_at = now() + {_TTL}
    WHERE key_digest = ANY(%(digests)s) AND owner = %(owner)s AND expires_at > now()
    RETURNING key_digest
"""
_RELEASE = """
    UPDATE session_leases SET owner = NULL, expires_at = now()
    WHERE key_digest = %s AND owner = %s AND fence = %s
    RETURNING key_digest
"""
_RELEASE_ALL = """
    UPDATE session_leases SET owner = NULL, expires_at = now()
    WHERE owner = %s
    RETURNING key_digest
"""
# FOR SHARE: a takeover (an UPDATE of the row) waits for the checking transaction to end,
# so the fenced write commits before any successor can hold the lease. clock_timestamp(),
# not now(): the checking transaction may have started a while ago.
_HOLDS = """
    SELECT 1 FROM session_leases
    WHERE key_digest = %s AND owner = %s AND fence = %s AND expires_at > clock_timestamp()
    FOR SHARE
"""


def holds(connection: psycopg.Connection, lease: Lease) -> bool:
    """True if ``lease`` is still its owner's, with its fence, and not expired; for a
    fenced write, in that write's transaction (``connection``'s). When True, the lease
    row stays share-locked until that transaction ends: no one takes it over meanwhile.

    Error handling: as ``connection.execute``.
    """
    row = connection.execute(_HOLDS, (key_digest(lease.key), lease.owner, lease.fence))
    return row.fetchone() is not None


class LeaseTable:
    """The ``session_leases`` table; every method blocks, one transaction each: call them
    from worker threads (``trio.to_thread.run_sync``), never from a trio task.

    Error handling: every method raises :class:`~.database.DatabaseUnavailable` when the
    database does not answer; the lease is then as it was, or as the unacknowledged
    change left it (a renewal may have been made; a release may have been committed).
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    def acquire(self, key: SessionKey, owner: str, ttl_s: float) -> Lease | Held:
        """``key``'s lease for ``owner`` for ``ttl_s`` seconds: a :class:`Lease` if it was
        free, expired or already ``owner``'s (then with its fence, extended), else
        :class:`Held` by whom and until when."""

        def work(connection: psycopg.Connection) -> Lease | Held:
            digest = key_digest(key)
            params = {"digest": digest, "text": key_text(key), "owner": owner, "ttl": ttl_s}
            taken = connection.execute(_ACQUIRE, params).fetchone()
            if taken is not None:
                return Lease(key, owner, int(taken[0]))
            holder = connection.execute(_HOLDER, (digest,)).fetchone()
            assert holder is not None  # the conflicting row, locked by the INSERT
            return Held(key, str(holder[0]), holder[1], float(holder[2]))

        return self._database.call(work)

    def renew(self, owner: str, keys: Collection[SessionKey], ttl_s: float) -> set[SessionKey]:
        """Extend ``owner``'s leases of ``keys`` to ``ttl_s`` seconds from now, in one
        statement; return the keys it no longer holds (released, expired or taken over:
        expired counts as lost even if no one took it, as :func:`holds` would say)."""
        by_digest = {key_digest(key): key for key in keys}
        if not by_digest:
            return set()

        def work(connection: psycopg.Connection) -> set[bytes]:
            params = {"digests": list(by_digest), "owner": owner, "ttl": ttl_s}
            return {bytes(row[0]) for row in connection.execute(_RENEW, params).fetchall()}

        renewed = self._database.call(work)
        return {key for digest, key in by_digest.items() if digest not in renewed}

    def release(self, lease: Lease) -> bool:
        """Free ``lease`` if it is still its owner's with its fence (even expired, if no one
        took it), and announce it; True if it was freed here."""

        def work(connection: psycopg.Connection) -> bool:
            params = (key_digest(lease.key), lease.owner, lease.fence)
            freed = connection.execute(_RELEASE, params).fetchall()
            _announce(connection, freed)
            return bool(freed)

        return self._database.call(work)

    def release_all(self, owner: str) -> int:
        """Free every lease ``owner`` still has (at its shutdown), announcing each; how many."""

        def work(connection: psycopg.Connection) -> int:
            freed = connection.execute(_RELEASE_ALL, (owner,)).fetchall()
            _announce(connection, freed)
            return len(freed)

        return self._database.call(work)

    def check(self, lease: Lease) -> bool:
        """:func:`holds` in a transaction of its own (True: still held when it looked)."""
        return self._database.call(lambda connection: holds(connection, lease))


def _announce(connection: psycopg.Connection, freed: list[tuple[bytes]]) -> None:
    # NOTIFY is transactional: delivered when the release commits, never without it.
    for (digest,) in freed:
        notify_in(connection, Released(bytes(digest).hex()))
