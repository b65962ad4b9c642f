"""``GET`` and ``PUT /user-claude``: each user's own CLAUDE.md.

A Quart blueprint; the app hands it how to tell who is calling and how to
read a JSON body, so it authenticates and reads bodies exactly as every other
route does. Each caller reads and writes only their own file (the user id comes
from their credentials, never from the body). Storage is
:mod:`claude_code_api.store.user_memory`: saves run in worker threads (they sync the
disk); reads, on every one-shot request, on the trio thread (see :func:`load_memory`).

After a save the dispatcher is told (:class:`UserMemoryChanged`), so the
user's live sessions restart at their next turn boundary to load it; one-shot
requests read the file at submission, so the next one has it.

With ``DATABASE_URL`` the CLAUDE.md is every replica's (:class:`SharedUserMemory`,
:mod:`claude_code_api.actors.shared_memory`): a save goes to the database first (which
tells the other replicas), a read brings the HOME's file up to date from it first.

Error handling: a body that is not ``{"content": string}`` is a 400 naming the
field, content over 100 KiB a 413; a CLAUDE.md that cannot be read or saved (a
full disk, something else put in its place by the user's own agent) a 503 that
says why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio
from quart import Blueprint, Response, jsonify

from ..messages import DispatcherMessage, UserMemoryChanged
from ..store.user_memory import MAX_SAVED_BYTES, read_user_memory, save_user_memory
from .requests import parse_user_claude_request

log = logging.getLogger(__name__)

# How long a save waits to tell the dispatcher (which never blocks for long).
NOTIFY_TIMEOUT_S = 1.0


class SharedUserMemory(Protocol):
    """Users' CLAUDE.md in the database, the HOMEs' files following it (``DATABASE_URL``)."""

    async def load(self, user_id: str) -> str:
        """The content, the HOME's file brought up to date; ``OSError``: it cannot be read."""
        ...

    async def save(self, user_id: str, content: str) -> None:
        """Saved for every replica; the database not answering raises
        :class:`~claude_code_api.store.database.DatabaseUnavailable`."""
        ...


class MemoryUnavailable(Exception):
    """The caller's CLAUDE.md cannot be read or saved; answered 503 with ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def load_memory(data_dir: Path, user_id: str, shared: SharedUserMemory | None = None) -> str:
    """``user_id``'s CLAUDE.md ("" when none), read on the trio thread.

    Every one-shot request reads it, so not in a worker thread: a few system
    calls on a small file in the page cache (tens of µs) cost less than the two
    thread switches. DATA_DIR is a local filesystem (SQLite's WAL needs one too).
    With ``shared``, its copy (a worker thread, one query). Raises
    :class:`MemoryUnavailable` when it cannot be read.
    """
    try:
        if shared is not None:
            return await shared.load(user_id)
        return read_user_memory(data_dir, user_id)
    except OSError as exc:
        log.error("user %s: cannot read CLAUDE.md: %s", user_id, exc)
        raise MemoryUnavailable(f"cannot read your CLAUDE.md: {exc}") from exc


def user_claude_routes(
    *,
    data_dir: Path,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    caller: Callable[[], str],
    json_body: Callable[[], Awaitable[bytes]],
    shared: SharedUserMemory | None = None,
) -> Blueprint:
    """The ``/user-claude`` routes, for ``app.register_blueprint``."""
    routes = Blueprint("user_claude", __name__)

    @routes.get("/user-claude")
    async def get_user_claude() -> Response:
        user_id = caller()
        return jsonify({"content": await load_memory(data_dir, user_id, shared)})

    @routes.put("/user-claude")
    async def put_user_claude() -> Response:
        user_id = caller()
        content = parse_user_claude_request(await json_body(), max_bytes=MAX_SAVED_BYTES)
        try:
            if shared is not None:
                await _save_shared(shared, user_id, content)
            else:
                await trio.to_thread.run_sync(save_user_memory, data_dir, user_id, content)
        except OSError as exc:
            log.error("user %s: cannot save CLAUDE.md: %s", user_id, exc)
            raise MemoryUnavailable(f"cannot save your CLAUDE.md: {exc}") from exc
        # Saved: the sessions must hear of it even if the client has gone meanwhile.
        with trio.CancelScope(shield=True), trio.move_on_after(NOTIFY_TIMEOUT_S):
            await dispatcher.send(UserMemoryChanged(user_id))
        log.info("user %s: CLAUDE.md saved (%d characters)", user_id, len(content))
        return jsonify({"saved": True})

    @routes.app_errorhandler(MemoryUnavailable)
    async def memory_unavailable(exc: MemoryUnavailable) -> Response:
        response = jsonify({"error": exc.message})
        response.status_code = 503
        return response

    return routes


async def _save_shared(shared: SharedUserMemory, user_id: str, content: str) -> None:
    # Imported only here: without DATABASE_URL the service never loads psycopg.
    from ..store.database import DatabaseUnavailable

    try:
        await shared.save(user_id, content)
    except DatabaseUnavailable as exc:
        log.error("user %s: cannot save CLAUDE.md: %s", user_id, exc)
        raise MemoryUnavailable(f"cannot save your CLAUDE.md: {exc}") from exc
