"""The requester's side of the session registry: one awaitable method per request.

:class:`RegistryClient` wraps a send channel to the registry's inbox (which its
caller owns) and, for every request, opens a reply channel typed with that
request's answer (see the messages in :mod:`.registry`).
"""

from __future__ import annotations

from typing import TypeVar

import trio

from ..messages import SessionKey
from ..store import SessionPage, SessionRecord, StoreUnavailable
from .registry import (
    CreateAnswer,
    CreateSession,
    DeleteAnswer,
    DeleteSession,
    ListAnswer,
    ListSessions,
    LoadAnswer,
    LoadSession,
    RegistryMessage,
    SaveAnswer,
    SaveSession,
)

T = TypeVar("T")


class RegistryClient:
    """Request/reply helpers over a send channel to the registry's inbox (the caller owns the channel).

    Every method waits for the registry's answer.

    Error handling: a :class:`StoreUnavailable` answered by the registry is raised
    here. So is a registry that is gone (its inbox is closed, or it closed the
    reply without answering: it was stopped before handling the request); those
    messages name the registry, not a path. A request cancelled here may still
    be carried out by the registry (a save may still be committed).
    """

    def __init__(self, inbox: trio.MemorySendChannel[RegistryMessage]):
        self.inbox = inbox

    async def load(self, key: SessionKey) -> SessionRecord | None:
        reply, answers = trio.open_memory_channel[LoadAnswer](1)
        return await self._request(LoadSession(key, reply), answers)

    async def save(self, record: SessionRecord) -> None:
        """Insert or update ``record``; returns once it is durable, raises :class:`StoreUnavailable` if not.

        Never refused for the per-user bound: insert new sessions with :meth:`create`.
        """
        reply, answers = trio.open_memory_channel[SaveAnswer](1)
        await self._request(SaveSession(record, reply), answers)

    async def create(self, record: SessionRecord, max_per_user: int) -> None:
        """Insert a new session, its user keeping at most ``max_per_user``; returns once durable.

        At the bound, the user's least recently active sessions that are not in
        use are evicted to make room (see :func:`.registry.serve_registry`). The
        check, the evictions and the insert are one transaction. Raises
        :class:`~claude_code_api.store.TooManySessions` when the user's sessions
        at the bound are all in use, :class:`~claude_code_api.store.SessionExists`
        if the key already has a record (left unchanged), :class:`StoreUnavailable`
        if the write failed.
        """
        if max_per_user < 0:
            raise ValueError(f"max_per_user must be >= 0, not {max_per_user}")
        reply, answers = trio.open_memory_channel[CreateAnswer](1)
        await self._request(CreateSession(record, max_per_user, reply), answers)

    async def delete(self, key: SessionKey) -> bool:
        """Delete the record, then its transcripts; False if there was no record."""
        reply, answers = trio.open_memory_channel[DeleteAnswer](1)
        return await self._request(DeleteSession(key, reply), answers)

    async def list_for_user(self, user_id: str, limit: int, offset: int = 0) -> SessionPage:
        """Up to ``limit`` of the user's sessions after the first ``offset``, most recent first,
        and how many they have in all."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, not {limit} and {offset}")
        reply, answers = trio.open_memory_channel[ListAnswer](1)
        return await self._request(ListSessions(user_id, limit, offset, reply), answers)

    async def _request(
        self, message: RegistryMessage, answers: trio.MemoryReceiveChannel[T | Exception]
    ) -> T:
        """Send ``message``, wait for the one answer on ``answers``: return it, or raise it."""
        async with answers:
            try:
                await self.inbox.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                message.reply.close()
                raise StoreUnavailable(
                    "session registry is not running (its inbox is closed)"
                ) from exc
            try:
                answer = await answers.receive()
            except trio.EndOfChannel:
                raise StoreUnavailable(
                    "session registry closed the request without answering"
                ) from None
        if isinstance(answer, Exception):
            raise answer
        return answer
