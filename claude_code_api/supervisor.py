"""The supervision tree of the service, in one screen.

    root                 one_for_one, escalates (the service exits 1)
    ├── registry         permanent  owns the SQLite session records (opened first: a bad
    │                               database stops start-up with a clear error)
    ├── dispatcher       permanent  owns the job queue and session scheduling
    ├── http             permanent  hypercorn + Quart-Trio
    ├── sessions         permanent  starts session actors on demand
    │   └── (user, id)   temporary  one live conversation: one Claude Code process
    └── workers          permanent  one_for_one; backs off exponentially in a crash loop
        ├── worker-0     permanent  one pre-warmed Claude Code process
        └── worker-N-1

Children start in that order and stop in reverse. Channels: both ends of the
three singleton inboxes are owned here, so a restarted actor reads the same
inbox: ``inbox`` (the dispatcher's; the HTTP app shares the send end, every
actor start gets a clone), ``registry_inbox`` (the registry's; HTTP and the
dispatcher share it, session actors use it through a :class:`RegistryClient`),
``session_starts`` (dispatcher -> session supervisor). Shutdown (:meth:`Service.shutdown`): the
dispatcher refuses new jobs, running ones get ``SHUTDOWN_GRACE_S`` to finish, then
the tree stops in reverse: workers and sessions interrupt what still runs (those
requests are answered with their partial output) and close their agents; then
HTTP, the dispatcher, and last the registry, which closes the database.
"""

from __future__ import annotations

import logging

import trio

from .actors.dispatcher import Dispatcher, SessionLimits
from .actors.registry import RegistryClient, open_store, serve_registry
from .actors.session import serve_session
from .actors.session_supervisor import SessionSupervisor
from .actors.stopping import StopSignal
from .actors.worker import serve_worker
from .agent import CLOSE_GRACE_S
from .config import Settings
from .http.app import create_app
from .http.server import HttpServer
from .messages import Drain
from .supervision import Backoff, ChildSpec, Restart, Supervisor

log = logging.getLogger(__name__)

# OTP-style restart intensity: more than 3 restarts in 5 s is a crash loop; the
# pool then backs off 1 s, 2 s, 4 s ... up to RESTART_BACKOFF_MAX_MS between restarts.
INTENSITY, PERIOD_S = 3, 5.0
# Requests to the registry that may wait while it writes; the dispatcher never waits.
REGISTRY_INBOX_SIZE = 1024


class Service:
    """The whole service: build the tree, run it, shut it down gracefully."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inbox, inbox_receive = trio.open_memory_channel(0)
        self.registry_inbox, registry_receive = trio.open_memory_channel(REGISTRY_INBOX_SIZE)
        self.session_starts, session_starts_receive = trio.open_memory_channel(
            settings.max_live_sessions
        )
        self._channels = (
            self.inbox,
            inbox_receive,
            self.registry_inbox,
            registry_receive,
            self.session_starts,
            session_starts_receive,
        )
        dispatcher = Dispatcher(
            inbox_receive,
            pool_size=settings.pool_size,
            queue_max=settings.queue_max,
            session_starter=self.session_starts,
            registry=self.registry_inbox,
            session_limits=SessionLimits(
                max_live=settings.max_live_sessions,
                per_session_max=settings.session_queue_max,
                idle_s=settings.session_idle_s,
            ),
        )
        registry = RegistryClient(self.registry_inbox)

        async def run_session(key, dispatcher_clone, stop) -> None:
            await serve_session(key, settings, dispatcher_clone, registry, stop)

        async def start_registry(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            # Opened in a thread: a slow disk must not block the loop, even at start-up.
            store = await trio.to_thread.run_sync(open_store, settings.data_dir)
            await serve_registry(store, registry_receive, task_status=task_status)

        sessions = SessionSupervisor(session_starts_receive, self.inbox, run_session)

        self.workers = Supervisor(
            "workers",
            [self._worker_spec(f"worker-{n}") for n in range(settings.pool_size)],
            intensity=INTENSITY,
            period=PERIOD_S,
            backoff=Backoff(
                initial=min(1.0, settings.restart_backoff_max_s),
                factor=2.0,
                cap=settings.restart_backoff_max_s,
            ),
        )
        self.http = HttpServer(
            create_app(settings, self.inbox, registry),
            settings.host,
            settings.port,
            graceful_timeout=5.0,
        )
        self.root = Supervisor(
            "root",
            [
                # Stopped last, by closing its inbox: it writes what is queued, then ends.
                ChildSpec("registry", start_registry, request_stop=self.registry_inbox.close),
                ChildSpec("dispatcher", dispatcher.serve),
                ChildSpec("http", self.http.serve, request_stop=self.http.request_stop),
                # Stopped before HTTP, so the turns they interrupt are answered.
                ChildSpec(
                    "sessions",
                    sessions.serve,
                    request_stop=sessions.request_stop,
                    shutdown_grace=self._turn_stop_grace(),
                ),
                ChildSpec(
                    "workers",
                    self.workers.run,
                    request_stop=self.workers.request_stop,
                    shutdown_grace=self._turn_stop_grace() * settings.pool_size,
                ),
            ],
            intensity=INTENSITY,
            period=PERIOD_S,
        )

    def _turn_stop_grace(self) -> float:
        """How long an actor may take to interrupt, answer and close its turn."""
        return self.settings.interrupt_grace_s + CLOSE_GRACE_S + 1.0

    def _worker_spec(self, worker_id: str) -> ChildSpec:
        workspaces = self.settings.data_dir / "workers" / worker_id
        stop = StopSignal()

        async def start(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            await serve_worker(
                worker_id,
                self.settings,
                self.inbox.clone(),
                workspaces,
                stop,
                task_status=task_status,
            )

        return ChildSpec(
            worker_id,
            start,
            restart=Restart.PERMANENT,
            request_stop=stop.request_stop,
            shutdown_grace=self._turn_stop_grace(),
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the tree until it is stopped (returns) or escalates (raises)."""
        try:
            await self.root.run(task_status=task_status)
        finally:
            for channel in self._channels:
                channel.close()

    async def shutdown(self, grace: float) -> None:
        """Refuse new work, give running jobs ``grace`` seconds, then stop the tree."""
        log.info("shutting down: running jobs get %gs to finish", grace)
        done_send, done_receive = trio.open_memory_channel[None](1)
        with trio.move_on_after(grace):
            async with done_receive:
                await self.inbox.send(Drain(done_send))
                try:
                    await done_receive.receive()
                except trio.EndOfChannel:
                    pass
        self.root.request_stop()
