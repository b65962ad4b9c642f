"""The supervision tree of the service, in one screen.

    root                 one_for_one, escalates (the service exits 1)
    ├── dispatcher       permanent  owns the job queue; the inbox every actor writes to
    ├── workers          permanent  one_for_one; backs off exponentially in a crash loop
    │   ├── worker-0     permanent  one pre-warmed Claude Code process
    │   └── worker-N-1
    └── http             permanent  hypercorn + Quart-Trio; talks only to the dispatcher

Children start in that order and stop in reverse. Channel ownership: this module
owns the dispatcher inbox's send end (``inbox``); the HTTP app shares it; each
worker start gets its own clone and closes it. Shutdown (:meth:`Service.shutdown`):
the dispatcher refuses new jobs, running ones get ``SHUTDOWN_GRACE_S`` to finish,
then the tree stops in reverse: HTTP, workers (killing their agents), dispatcher.
"""

from __future__ import annotations

import logging

import trio

from .actors.dispatcher import Dispatcher
from .actors.worker import serve_worker
from .config import Settings
from .http.app import create_app
from .http.server import HttpServer
from .messages import Drain
from .supervision import Backoff, ChildSpec, Restart, Supervisor

log = logging.getLogger(__name__)

# OTP-style restart intensity: more than 3 restarts in 5 s is a crash loop.
INTENSITY, PERIOD_S = 3, 5.0
CRASH_LOOP_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=30.0)


class Service:
    """The whole service: build the tree, run it, shut it down gracefully."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inbox, inbox_receive = trio.open_memory_channel(0)
        dispatcher = Dispatcher(
            inbox_receive, pool_size=settings.pool_size, queue_max=settings.queue_max
        )
        self.workers = Supervisor(
            "workers",
            [self._worker_spec(f"worker-{n}") for n in range(settings.pool_size)],
            intensity=INTENSITY,
            period=PERIOD_S,
            backoff=CRASH_LOOP_BACKOFF,
        )
        self.http = HttpServer(
            create_app(settings, self.inbox), settings.host, settings.port, graceful_timeout=5.0
        )
        self.root = Supervisor(
            "root",
            [
                ChildSpec("dispatcher", dispatcher.serve),
                ChildSpec("workers", self.workers.run, request_stop=self.workers.request_stop),
                ChildSpec("http", self.http.serve, request_stop=self.http.request_stop),
            ],
            intensity=INTENSITY,
            period=PERIOD_S,
        )

    def _worker_spec(self, worker_id: str) -> ChildSpec:
        workspaces = self.settings.data_dir / "workers" / worker_id

        async def start(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            await serve_worker(
                worker_id, self.settings, self.inbox.clone(), workspaces, task_status=task_status
            )

        return ChildSpec(worker_id, start, restart=Restart.PERMANENT)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the tree until it is stopped (returns) or escalates (raises)."""
        async with self.inbox:
            await self.root.run(task_status=task_status)

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
