"""Users' CLAUDE.md shared by every replica (``DATABASE_URL``): :class:`SharedMemory`.

The table is the truth (:mod:`claude_code_api.store.shared_memory`); each user's HOME on
this replica is a copy, brought up to date before it is used:

* :meth:`SharedMemory.load`: before a one-shot reads the file for its prompt, and for
  ``GET /user-claude``: one query in a worker thread (none while the database is known
  down, for :data:`DOWN_S`); when the database fails, the local file is used and the
  failure logged (once per outage), so a one-shot never fails for it. When it rewrote the
  file of a user it had seen before, that user's live sessions here are restarted (at their
  next turn boundary), as after a save: a change whose wake-up this replica missed.
* :meth:`SharedMemory.before_session`: before a session's agent starts (the Claude Code
  CLI reads the file then), the same, never failing the start.
* :meth:`SharedMemory.save`: ``PUT /user-claude``, the table first (with the wake-up in
  its transaction), then the file here. The database failing fails the save (503).

:meth:`SharedMemory.serve` (the supervision tree's ``memory`` child) listens for other
replicas' saves (:class:`~claude_code_api.store.wakeups.MemoryChanged`) and turns each
into this dispatcher's :class:`~claude_code_api.messages.UserMemoryChanged` for a user
whose file this replica has brought home (no one else has a session here). After the
listener reconnects (wake-ups were lost meanwhile), it compares those users' generations
with the table's and restarts the sessions of those who changed.

Saves and loads of one user are serialised here (a lock per user): a slow load never
writes an older generation over a newer one.

Channels: it sends on the dispatcher's inbox (the wiring's send end, as HTTP does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from ..messages import DispatcherMessage, UserMemoryChanged
from ..store.database import Database, DatabaseUnavailable
from ..store.shared_memory import AtHome, bring_home, generations, save
from ..store.user_memory import read_user_memory
from ..store.wakeups import (
    MEMORY_CHANNELS,
    MemoryChanged,
    Resumed,
    Wakeup,
    serve_wakeups,
    user_digest,
)

log = logging.getLogger(__name__)

# After the database failed a load, loads use the local file without asking it for this long.
DOWN_S = 5.0
# Between two attempts to listen while the database is away at start-up.
RETRY_S = 1.0
# How long telling the dispatcher may take (it never blocks for long).
TELL_TIMEOUT_S = 1.0


class SharedMemory:
    """This replica's side of users' CLAUDE.md in the database, as replica ``owner``
    (module docstring). ``database`` opens the pool (blocking); ``url`` is the same
    database, for the listener; ``data_dir`` holds the users' HOMEs."""

    def __init__(
        self,
        database: Callable[[], Database],
        url: str,
        owner: str,
        data_dir: Path,
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
    ) -> None:
        self._database = database
        self.url = url
        self.owner = owner
        self.data_dir = data_dir
        self.dispatcher = dispatcher
        # Users whose HOME this replica brought up to date, and the generation it holds
        # (None: unknown); by their digest too, as the wake-ups name them.
        self._generations: dict[str, int | None] = {}
        self._by_digest: dict[str, str] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._down_until = -math.inf
        self._down = False

    async def load(self, user_id: str) -> str:
        """``user_id``'s CLAUDE.md ("" when none), their HOME's file brought up to date.

        Error handling: the local file unreadable raises ``OSError`` (as without the
        database); the database failing falls back to the local file (logged)."""
        at_home = await self._bring_home(user_id)
        if at_home.rewritten:
            await self._tell(user_id)
        return at_home.content

    async def before_session(self, user_id: str) -> None:
        """Bring ``user_id``'s HOME file up to date before their session's agent starts;
        never fails (what fails is logged: the agent reads what the file holds)."""
        try:
            await self._bring_home(user_id)
        except OSError as exc:
            log.error("user %s: cannot read CLAUDE.md: %s", user_id, exc)

    async def save(self, user_id: str, content: str) -> None:
        """Save ``user_id``'s CLAUDE.md ("" removes it) for every replica.

        Error handling: :class:`DatabaseUnavailable` (not saved); ``UnicodeEncodeError``."""
        async with self._lock(user_id):
            work = partial(save, self._database, self.data_dir, user_id, content, self.owner)
            self._remember(user_id, await trio.to_thread.run_sync(work))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Turn other replicas' saves into this dispatcher's :class:`UserMemoryChanged`.

        Started at once (no user's file was brought home yet: nothing to miss), so the
        database down at start-up holds up nothing: it keeps trying to listen."""
        task_status.started()
        failing = False
        while True:
            send, receive = trio.open_memory_channel[Wakeup](math.inf)
            listen = partial(serve_wakeups, self.url, self.owner, send, channels=MEMORY_CHANNELS)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(listen)
                    nursery.start_soon(self._on_wakeups, receive)
                    failing = False
                    await self._recheck()  # (what was brought home before it listened)
            except ExceptionGroup as group:  # (not except*: Debian 12's 3.11.2 wraps what passes)
                unavailable, rest = group.split(DatabaseUnavailable)
                if unavailable is None or rest is not None:
                    raise
                if not failing:
                    log.warning(
                        "CLAUDE.md: not listening for saves yet (%s)", unavailable.exceptions[0]
                    )
                failing = True
            await trio.sleep(RETRY_S)

    async def _on_wakeups(self, wakeups: trio.MemoryReceiveChannel[Wakeup]) -> None:
        async with wakeups:
            async for wakeup in wakeups:
                match wakeup:
                    case MemoryChanged(user=digest, origin=origin) if origin != self.owner:
                        user_id = self._by_digest.get(digest)
                        if user_id is not None:
                            await self._tell(user_id)
                    case Resumed():
                        await self._recheck()

    async def _recheck(self) -> None:
        """Wake-ups were lost: restart the sessions of users whose CLAUDE.md changed."""
        users = list(self._generations)
        if not users:
            return
        try:
            database = await trio.to_thread.run_sync(self._database)
            now = await database.run(partial(generations, user_ids=users))
        except DatabaseUnavailable as exc:
            log.warning("CLAUDE.md: not re-checked after a lost connection (%s)", exc)
            return
        for user_id in users:
            if user_id in now and now[user_id] != self._generations.get(user_id):
                await self._tell(user_id)

    async def _bring_home(self, user_id: str) -> AtHome:
        async with self._lock(user_id):
            seen = user_id in self._generations
            known = self._generations.get(user_id)
            if trio.current_time() < self._down_until:
                content = await trio.to_thread.run_sync(read_user_memory, self.data_dir, user_id)
                self._remember(user_id, known)
                return AtHome(content, known)
            work = partial(bring_home, self._database, self.data_dir, user_id, known)
            try:
                at_home = await trio.to_thread.run_sync(work)
            except DatabaseUnavailable as exc:
                self._down_until = trio.current_time() + DOWN_S
                if not self._down:
                    self._down = True
                    log.warning("CLAUDE.md: the database failed (%s); using this replica's", exc)
                content = await trio.to_thread.run_sync(read_user_memory, self.data_dir, user_id)
                self._remember(user_id, known)
                return AtHome(content, known)
            if self._down:
                self._down = False
                log.info("CLAUDE.md: the database answers again")
            self._remember(user_id, at_home.generation)
            # (A first sight of the user: none of their sessions started here without it.)
            return at_home if seen else AtHome(at_home.content, at_home.generation)

    def _remember(self, user_id: str, generation: int | None) -> None:
        self._generations[user_id] = generation
        self._by_digest[user_digest(user_id)] = user_id

    def _lock(self, user_id: str) -> trio.Lock:
        return self._locks.setdefault(user_id, trio.Lock())

    async def _tell(self, user_id: str) -> None:
        """Restart ``user_id``'s live sessions here at their next turn boundary."""
        with trio.CancelScope(shield=True), trio.move_on_after(TELL_TIMEOUT_S):
            await self.dispatcher.send(UserMemoryChanged(user_id))
