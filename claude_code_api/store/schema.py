"""The PostgreSQL schema, versioned: created and upgraded at start-up by :func:`migrate`.

The schema is the list :data:`MIGRATIONS`, applied in order; the table
``schema_version`` records each one applied (its number, name and when). A
migration, once released, is never edited: a change to the schema is a new
migration at the end of the list.

Several replicas may start at once against one database: :func:`migrate` runs in
one transaction under a transaction-scoped advisory lock, so one replica applies
the missing migrations while the others wait, then find nothing left to do. A
migration that fails rolls the whole transaction back: the schema stays at the
version it had.

Error handling: :class:`SchemaTooNew` when the database records a version this
service does not know (a newer service upgraded it): it refuses to start rather
than write to tables it does not understand. Errors in the SQL propagate as
psycopg raises them.
"""

from __future__ import annotations

from typing import LiteralString

import attrs
import psycopg

# pg_advisory_xact_lock's two-number form (its own key space, apart from the one-number
# locks other modules take per row): "ccap" (claude-code-api), and 1 for the schema.
SCHEMA_LOCK = (0x63636170, 1)


@attrs.frozen
class Migration:
    """One step of the schema: its number (1, 2, … in order), a name, and its statements."""

    version: int
    name: str
    statements: tuple[LiteralString, ...]


TRANSCRIPTS = Migration(
    1,
    "transcripts",
    (
        # One row per main transcript (a session of the SDK's SessionStore): its storage
        # write time and the SDK's summary of it (fold_session_summary's opaque state).
        """
        CREATE TABLE transcript_sessions (
            project_key text NOT NULL,
            session_id text NOT NULL,
            mtime_ms bigint NOT NULL,
            summary text NOT NULL,
            PRIMARY KEY (project_key, session_id)
        )
        """,
        # Every transcript line, main ('' subpath) and subagents', in commit order (id).
        # The entry is kept as the JSON text it was given: JSONB refuses "\u0000", which
        # a tool's output may hold. uuid, when the entry has one, is its idempotency key.
        """
        CREATE TABLE transcript_entries (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            project_key text NOT NULL,
            session_id text NOT NULL,
            subpath text NOT NULL,
            uuid text,
            entry text NOT NULL
        )
        """,
        """
        CREATE INDEX transcript_entries_by_key
            ON transcript_entries (project_key, session_id, subpath, id)
        """,
        """
        CREATE UNIQUE INDEX transcript_entries_by_uuid
            ON transcript_entries (project_key, session_id, subpath, uuid)
            WHERE uuid IS NOT NULL
        """,
    ),
)

SESSIONS = Migration(
    2,
    "sessions",
    (
        # The session registry's records (store/postgres.py), one row per session. Ids are
        # escaped text (no NUL can be in text) and collate as "C": code point order, as
        # SQLite and Python sort. Times are unix seconds; the two JSON columns are text as
        # SQLite keeps them (JSONB refuses "\u0000").
        """
        CREATE TABLE sessions (
            user_id text COLLATE "C" NOT NULL,
            session_id text COLLATE "C" NOT NULL,
            claude_session_id text NOT NULL,
            created_at double precision NOT NULL,
            last_activity double precision NOT NULL,
            turns bigint NOT NULL DEFAULT 0,
            total_cost_usd double precision NOT NULL DEFAULT 0,
            transcript_started boolean NOT NULL DEFAULT false,
            previous_claude_session_ids text NOT NULL DEFAULT '[]',
            options text NOT NULL DEFAULT '{}',
            PRIMARY KEY (user_id, session_id)
        )
        """,
        # A user's page (latest first, ties by session id) and the per-user count.
        "CREATE INDEX sessions_by_user_activity ON sessions (user_id, last_activity DESC, session_id)",
        # The expiry sweep, across all users.
        "CREATE INDEX sessions_by_last_activity ON sessions (last_activity)",
    ),
)

SESSION_LEASES = Migration(
    3,
    "session_leases",
    (
        # One row per session key ever leased (store/leases.py), kept after a release so that
        # a key's fence never goes back. key_digest is the SHA-256 of lease_key, the key as
        # JSON text ([user_id, session_id], ASCII): a primary key of fixed size, whatever the
        # ids' length. owner NULL: released. Expiry by the database's clock alone.
        """
        CREATE TABLE session_leases (
            key_digest bytea PRIMARY KEY,
            lease_key text NOT NULL,
            owner text,
            fence bigint NOT NULL,
            expires_at timestamptz NOT NULL
        )
        """,
        # renew and release_all: one owner's leases.
        "CREATE INDEX session_leases_by_owner ON session_leases (owner) WHERE owner IS NOT NULL",
    ),
)

CLAUDE_LOGIN = Migration(
    4,
    "claude_login",
    (
        # /auth/login's pending logins (store/claude_login.py): state -> PKCE verifier, taken
        # once by /auth/exchange on any replica, forgotten once expired.
        """
        CREATE TABLE oauth_pending_logins (
            state text PRIMARY KEY,
            verifier text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            expires_at timestamptz NOT NULL
        )
        """,
        # The one Claude login of every replica (at most one row): its tokens (secrets, as
        # in the credentials file), a generation that grows with every write, and the claim
        # on its refresh (claimed_by: a replica's credentials actor, until claimed_until).
        """
        CREATE TABLE claude_login (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            access_token text NOT NULL,
            refresh_token text,
            expires_at_ms bigint,
            scopes text,
            lifetime_s double precision,
            generation bigint NOT NULL,
            claimed_by text,
            claimed_until timestamptz
        )
        """,
    ),
)

RUNS = Migration(
    5,
    "runs",
    (
        # One row per live replica (store/runs.py): its owner id (leases.new_owner) and until
        # when it vouches for its runs, by the database's clock. Renewed every third of
        # SESSION_LEASE_S; a replica gone for a minute past its expiry is deleted, its runs
        # with it (the cascade below).
        """
        CREATE TABLE replicas (
            owner text PRIMARY KEY,
            expires_at timestamptz NOT NULL
        )
        """,
        # The queued and running runs of every replica, as its dispatcher last showed them
        # (one-shots and session turns); a run answered is deleted. Ids as the session
        # table keeps them; times are unix seconds (wall clock), as /status shows them.
        """
        CREATE TABLE runs (
            run_id text COLLATE "C" PRIMARY KEY,
            user_id text COLLATE "C" NOT NULL,
            session_id text COLLATE "C",
            owner text NOT NULL REFERENCES replicas (owner) ON DELETE CASCADE,
            state text NOT NULL CHECK (state IN ('queued', 'running')),
            queued_at double precision NOT NULL,
            started_at double precision
        )
        """,
        # /status: a user's runs; the cascade and a replica's resync: one owner's.
        "CREATE INDEX runs_by_user ON runs (user_id, queued_at)",
        "CREATE INDEX runs_by_owner ON runs (owner)",
    ),
)

USER_MEMORIES = Migration(
    6,
    "user_memories",
    (
        # Each user's CLAUDE.md as last saved (PUT /user-claude on any replica): every
        # replica copies it into the user's HOME before it uses it (store/shared_memory.py).
        # The content is its UTF-8 bytes (text refuses "\u0000", which JSON allows).
        # A removal keeps the row, content '': no row means never saved here, and a
        # replica then keeps what its own HOME holds. generation counts the saves (1, 2, …):
        # a replica rewrites its copy only when it changed.
        """
        CREATE TABLE user_memories (
            user_id text COLLATE "C" PRIMARY KEY,
            content bytea NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            generation bigint NOT NULL
        )
        """,
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    TRANSCRIPTS,
    SESSIONS,
    SESSION_LEASES,
    CLAUDE_LOGIN,
    RUNS,
    USER_MEMORIES,
)
LATEST_VERSION = MIGRATIONS[-1].version


class SchemaTooNew(Exception):
    """The database's schema is of a version newer than this service knows."""


def migrate(connection: psycopg.Connection) -> int:
    """Apply the migrations the database lacks, in the caller's transaction; return the
    schema's version (:data:`LATEST_VERSION`). Waits while another replica migrates.

    Error handling: :class:`SchemaTooNew`; a failing statement raises and, with the
    caller's rollback, leaves the schema as it was.
    """
    connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", SCHEMA_LOCK)
    connection.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_version (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    row = connection.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    current = 0 if row is None else int(row[0])
    if current > LATEST_VERSION:
        raise SchemaTooNew(
            f"the database's schema is version {current}; this service knows up to"
            f" {LATEST_VERSION}: run a newer service"
        )
    for migration in MIGRATIONS[current:]:
        for statement in migration.statements:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
    return LATEST_VERSION
