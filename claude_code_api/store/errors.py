"""What a session table raises: failures of the storage, and the two refusals.

Two families, kept apart on purpose:

* :class:`StoreUnavailable` (and its kinds :class:`StoreBusy`, :class:`StoreFull`):
  the storage cannot be opened, read or written. The service answers 503 and
  ``/health`` says why.
* :class:`TooManySessions` and :class:`SessionExists`: the storage works and
  said no. They are not :class:`StoreUnavailable` subclasses, so a caller that
  maps StoreUnavailable to 503 cannot swallow a 429 by accident.
"""

from __future__ import annotations

from ..messages import SessionKey


class StoreUnavailable(Exception):
    """The session table cannot be opened, read or written.

    The message is one line naming the store (:attr:`SessionTable.location`)
    and the cause (and, where there is one, the fix). The service answers it as 503.
    """


class StoreBusy(StoreUnavailable):
    """A write that was not to wait found the storage held by another writer (a lock)."""


class StoreFull(StoreUnavailable):
    """A write failed because the storage is out of space (a full disk)."""


class SessionMoved(StoreUnavailable):
    """A save refused: another replica holds the lease of each of ``keys`` (the fence).

    Says nothing of the storage, which works: the replica that saves lost those sessions
    (its lease ran out and another replica took them), so their turns here must not be
    acknowledged. Nothing of the refused write was saved.
    """

    def __init__(self, message: str, keys: frozenset[SessionKey]) -> None:
        super().__init__(message)
        self.keys = keys


class TooManySessions(Exception):
    """A create was refused: the user already has ``limit`` sessions, none of which could go.

    A refusal, not a storage failure (the service answers it as 429), so it is
    deliberately not a :class:`StoreUnavailable`.
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
    """A create was refused: a record with that key already exists (left unchanged).

    Creating is for new sessions only. Seeing this means the caller raced
    another creator of the same key (one session actor per key should make that
    impossible), so it is a bug to report, not a condition to handle.
    """

    def __init__(self, key: SessionKey):
        super().__init__(f"session {key.session_id!r} of user {key.user_id!r} already exists")
        self.key = key
