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
from .stopping import StopSignal

log = logging.getLogger(__name__)

RunSession = Callable[[SessionKey, trio.MemorySendChannel, StopSignal], Awaitable[None]]


class SessionSupervisor:
    """Starts ``run_session(key, dispatcher_clone, stop)`` for each StartSession."""

    def __init__(
        self,
        inbox: trio.MemoryReceiveChannel,
        dispatcher: trio.MemorySendChannel,
        run_session: RunSession,
    ) -> None:
        self.inbox = inbox
        self.dispatcher = dispatcher
        self.run_session = run_session
        self._stops: set[StopSignal] = set()
        self._stop = StopSignal()

    def request_stop(self) -> None:
        """Stop taking new sessions and ask every session actor to stop gracefully."""
        self._stop.request_stop()
        for stop in self._stops:
            stop.request_stop()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled, or until stopped and every session actor has ended."""
        async with self.dispatcher.clone() as dispatcher, trio.open_nursery() as nursery:

            async def supervise(key: SessionKey) -> None:
                stop = StopSignal()
                self._stops.add(stop)
                reason = None
                try:
                    await self.run_session(key, dispatcher.clone(), stop)
                except Exception as exc:
                    log.exception("session %s failed", key)
                    reason = str(exc) or type(exc).__name__
                finally:
                    self._stops.discard(stop)
                await dispatcher.send(SessionStopped(key, reason))

            task_status.started()
            with self._stop.guard():
                async for message in self.inbox:
                    if isinstance(message, StartSession):
                        nursery.start_soon(supervise, message.key)
                    else:
                        log.error("session supervisor: unknown message %r", message)
