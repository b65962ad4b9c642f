"""Where the service keeps its sessions' records: the seam and its implementations.

* :mod:`.protocol`: :class:`SessionTable`, what the registry actor needs of a store.
* :mod:`.sqlite`: :class:`SqliteSessionTable`, the one on ``DATA_DIR/sessions.sqlite3``.
* :mod:`.records` and :mod:`.errors`: the values and exceptions every implementation shares.
* :mod:`.database`, :mod:`.schema`, :mod:`.postgres`, :mod:`.transcripts`: PostgreSQL
  (``DATABASE_URL``): a connection pool used from worker threads, the versioned schema,
  :class:`~.postgres.PostgresSessionTable` (the session table every replica shares) and the
  SDK's transcript store on it. Imported only where a database is configured (psycopg is
  not loaded otherwise).

Only the registry actor (``actors/registry.py``) calls a table; everyone else goes
through its client. Imports run one way: this package imports ``messages`` and
nothing of the actors.
"""

from .errors import (
    SessionExists,
    SessionMoved,
    StoreBusy,
    StoreFull,
    StoreUnavailable,
    TooManySessions,
)
from .protocol import SessionTable
from .records import SessionPage, SessionRecord, new_session_record
from .sqlite import SqliteSessionTable, open_store

__all__ = [
    "SessionExists",
    "SessionMoved",
    "SessionPage",
    "SessionRecord",
    "SessionTable",
    "SqliteSessionTable",
    "StoreBusy",
    "StoreFull",
    "StoreUnavailable",
    "TooManySessions",
    "new_session_record",
    "open_store",
]
