"""Session supervisor: starts session actors on demand, as temporary children.

Like Elixir's ``Task.Supervisor``: a session actor is never restarted by its
supervisor — the dispatcher decides whether a session needs an actor again. The
supervisor only starts one per :class:`StartSession` and reports every end,
normal or not, to the dispatcher as :class:`SessionStopped`.

Channels: it reads an inbox the supervision tree owns (so a restarted
supervisor reads the same one; the dispatcher holds the send end), and owns a
clone of the dispatcher's inbox for its reports; each actor gets its own clone.

Error handling: an actor's exception is caught here, logged and reported; it
never reaches the shared nursery, so one session's crash touches no other
session and not the worker pool.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..messages import SessionKey, SessionStopped, StartSession

log = logging.getLogger(__name__)

RunSession = Callable[[SessionKey, trio.MemorySendChannel], Awaitable[None]]


async def serve_session_supervisor(
    inbox: trio.MemoryReceiveChannel,
    dispatcher: trio.MemorySendChannel,
    run_session: RunSession,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``run_session(key, dispatcher_clone)`` for each StartSession, until cancelled."""

    async def supervise(key: SessionKey) -> None:
        reason = None
        try:
            await run_session(key, dispatcher.clone())
        except Exception as exc:
            log.exception("session %s failed", key)
            reason = str(exc) or type(exc).__name__
        await dispatcher.send(SessionStopped(key, reason))

    async with dispatcher, trio.open_nursery() as nursery:
        task_status.started()
        async for message in inbox:
            if isinstance(message, StartSession):
                nursery.start_soon(supervise, message.key)
            else:
                log.error("session supervisor: unknown message %r", message)
