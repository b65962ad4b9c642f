"""Hypercorn serving the app, as a supervised child in the service's trio run."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

log = logging.getLogger(__name__)


class HttpServer:
    """Owns the listening socket; ``request_stop`` closes it and lets open requests finish."""

    def __init__(self, app: QuartTrio, host: str, port: int, graceful_timeout: float) -> None:
        self.app = app
        self.config = Config()
        self.config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        self.config.accesslog = None
        self.config.graceful_timeout = graceful_timeout
        self._stop = trio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``request_stop``; ``started`` with the bound addresses."""
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    self.app, self.config, shutdown_trigger=self._stop.wait, task_status=task_status
                )
            )
            for bind in binds:
                log.info("listening on %s", bind)
            task_status.started(binds)
