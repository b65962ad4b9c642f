"""The records a session table keeps and hands back: plain frozen values, no storage."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import attrs

from ..messages import RunOptions, SessionKey


def _id_tuple(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(ids)


# A record's columns in every table that holds them (store/sqlite.py, store/postgres.py), in
# the order of SessionRecord's fields: the key, then what a save replaces.
COLUMNS = (
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
