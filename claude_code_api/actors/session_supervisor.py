"""Session supervisor: starts session actors on demand, as temporary children.

Like Elixir's ``Task.Supervisor``: a session actor is never restarted by its
supervisor — the dispatcher decides whether a session needs an actor again. The
supervisor only starts one per :class:`StartSession` and reports every end,
normal or not, to the dispatcher as :class:`SessionStopped`. When it (re)starts
it first tells the dispatcher :class:`SessionsReset`: actors of a previous
incarnation were cancelled without reporting, and their live slots must not leak.
The dispatcher then asks again for the sessions it was starting, so a start
already waiting in the channel may come twice: a session that has an actor
gets no second one.

Channels: it reads the session-starts channel, which the supervision tree owns
(the dispatcher holds the send end); it sends on its own clone of the
dispatcher's inbox, closed when it ends, and gives each actor a clone of its own.

Error handling: an actor's exception is caught here and reported with the
failure that answers the turns waiting for that session (the actor's own
:class:`SessionFailed`, else a 502); it never reaches the shared nursery, so one
session's crash touches no other session and not the worker pool.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable

import trio

from ..messages import (
    ActorId,
    DispatcherMessage,
    JobFailed,
    RunOptions,
    SessionKey,
    SessionsReset,
    SessionStopped,
    StartSession,
)
from .session import SessionFailed
from .stopping import StopSignal

log = logging.getLogger(__name__)

RunSession = Callable[
    [SessionKey, trio.MemorySendChannel[DispatcherMessage], StopSignal, ActorId, RunOptions],
    Awaitable[None],
]


class SessionSupervisor:
    """Starts ``run_session(key, dispatcher_clone, stop, actor, options)`` for each
    :class:`StartSession`.

    One object per incarnation: the tree builds a fresh one at every (re)start.
    """

    def __init__(
        self,
        starts: trio.MemoryReceiveChannel[StartSession],
        dispatcher: trio.MemorySendChannel[DispatcherMessage],
        run_session: RunSession,
    ) -> None:
        self.starts = starts
        self.dispatcher = dispatcher
        self.run_session = run_session
        self._stops: set[StopSignal] = set()
        self._running: set[SessionKey] = set()
        self._numbers = itertools.count(1)
        self._stop = StopSignal()

    def request_stop(self) -> None:
        """Stop taking new sessions and ask every session actor to stop gracefully."""
        self._stop.request_stop()
        for stop in self._stops:
            stop.request_stop()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled, or until stopped and every session actor has ended."""
        async with self.dispatcher.clone() as dispatcher, trio.open_nursery() as nursery:

            async def supervise(key: SessionKey, actor: ActorId, options: RunOptions) -> None:
                stop = StopSignal()
                self._stops.add(stop)
                failure = None
                try:
                    await self.run_session(key, dispatcher.clone(), stop, actor, options)
                except SessionFailed as exc:
                    log.warning("session %s ended: %s", key, exc.failure.error)
                    failure = exc.failure
                except Exception as exc:
                    log.exception("session %s failed", key)
                    failure = JobFailed(502, f"session failed: {exc or type(exc).__name__}")
                finally:
                    self._stops.discard(stop)
                    self._running.discard(key)
                await dispatcher.send(SessionStopped(key, failure, actor))

            await dispatcher.send(SessionsReset())
            task_status.started()
            with self._stop.guard():
                async for message in self.starts:
                    if message.key in self._running:
                        # A start sent before the dispatcher saw our SessionsReset, and sent
                        # again after it: one actor per session.
                        continue
                    self._running.add(message.key)
                    nursery.start_soon(supervise, message.key, next(self._numbers), message.options)
