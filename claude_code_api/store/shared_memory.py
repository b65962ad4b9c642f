"""Users' CLAUDE.md in PostgreSQL (``DATABASE_URL``): the copy every replica's HOMEs follow.

The table ``user_memories`` (migration 6, :mod:`.schema`) holds each user's CLAUDE.md as
last saved on any replica, with a ``generation`` that grows with every save. A replica's
agents still read the file in the user's HOME (:mod:`.user_memory`): before it uses that
file, a replica brings it up to date from the table (:func:`bring_home`), rewriting it only
when the generation it last wrote there is not the table's — one query, and no content
sent back, when nothing changed. A removal keeps the row with no content; a user with no
row never saved one since the service has used the database, and the HOME keeps its own.

Every save sends :class:`~.wakeups.MemoryChanged` in its transaction (:func:`save`), so
every other replica restarts that user's live sessions at their next turn boundary.

Every function here blocks (database and disk): run it in a worker thread.

Error handling: the database not answering is :class:`~.database.DatabaseUnavailable`; the
HOME's file not readable or writable is :class:`~.user_memory.UserMemoryError` (an
``OSError``), as without the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import attrs
import psycopg

from .database import Database
from .user_memory import read_user_memory, save_user_memory
from .wakeups import MemoryChanged, notify_in, user_digest

log = logging.getLogger(__name__)


def save_row(connection: psycopg.Connection, user_id: str, content: str, origin: str) -> int:
    """Store ``content`` ("" removes it) as ``user_id``'s CLAUDE.md and tell every replica,
    as replica ``origin``; the new generation.

    Error handling: ``UnicodeEncodeError`` for text that is not valid Unicode."""
    row = connection.execute(
        """
        INSERT INTO user_memories (user_id, content, generation) VALUES (%s, %s, 1)
        ON CONFLICT (user_id) DO UPDATE
            SET content = excluded.content, updated_at = now(),
                generation = user_memories.generation + 1
        RETURNING generation
        """,
        (user_id, content.encode("utf-8")),
    ).fetchone()
    assert row is not None
    generation = int(row[0])
    notify_in(connection, MemoryChanged(user_digest(user_id), generation, origin))
    return generation


def fetch_row(
    connection: psycopg.Connection, user_id: str, known: int | None
) -> tuple[int, str | None] | None:
    """``user_id``'s generation and CLAUDE.md, the content None if the generation is
    ``known``; None if they have no row."""
    row = connection.execute(
        """
        SELECT generation, CASE WHEN generation = %s THEN NULL ELSE content END
        FROM user_memories WHERE user_id = %s
        """,
        (known, user_id),
    ).fetchone()
    if row is None:
        return None
    content = None if row[1] is None else bytes(row[1]).decode("utf-8", errors="replace")
    return int(row[0]), content


def generations(connection: psycopg.Connection, user_ids: list[str]) -> dict[str, int]:
    """The generations of those of ``user_ids`` who have a row."""
    rows = connection.execute(
        "SELECT user_id, generation FROM user_memories WHERE user_id = ANY(%s)", (user_ids,)
    ).fetchall()
    return {str(user_id): int(generation) for user_id, generation in rows}


@attrs.frozen
class AtHome:
    """What :func:`bring_home` found: the content, the generation the HOME's file holds now
    (None: unknown), and whether it rewrote the file."""

    content: str
    generation: int | None
    rewritten: bool = False


def bring_home(
    database: Callable[[], Database], data_dir: Path, user_id: str, known: int | None
) -> AtHome:
    """Bring ``user_id``'s CLAUDE.md in their HOME up to date from the table, ``known`` being
    the generation this replica last wrote there (None: unknown); what it holds now.

    Error handling: :class:`~.database.DatabaseUnavailable` (the file untouched); the file
    unreadable: :class:`~.user_memory.UserMemoryError`. A file the table's content could
    not be written to is logged, and that content returned (the next call tries again).
    """
    found = database().call(partial(fetch_row, user_id=user_id, known=known))
    if found is None:  # never saved through the database: the HOME's own
        return AtHome(read_user_memory(data_dir, user_id), known)
    generation, content = found
    if content is None:
        return AtHome(read_user_memory(data_dir, user_id), generation)
    try:
        save_user_memory(data_dir, user_id, content)
    except OSError as exc:
        log.error("user %s: CLAUDE.md (generation %d) not written: %s", user_id, generation, exc)
        return AtHome(content, known)
    return AtHome(content, generation, rewritten=True)


def save(
    database: Callable[[], Database], data_dir: Path, user_id: str, content: str, origin: str
) -> int | None:
    """Save ``user_id``'s CLAUDE.md in the table, then in their HOME here; the generation
    the HOME's file holds now (None: the file could not be written, logged).

    Error handling: :class:`~.database.DatabaseUnavailable` (nothing saved, or, if the
    connection was lost at the commit, perhaps saved); ``UnicodeEncodeError``."""
    generation = database().call(partial(save_row, user_id=user_id, content=content, origin=origin))
    try:
        save_user_memory(data_dir, user_id, content)
    except OSError as exc:
        log.error("user %s: CLAUDE.md saved, but not written here: %s", user_id, exc)
        return None
    return generation
