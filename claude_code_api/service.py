"""The whole service: wire it, run its supervision tree, shut it down gracefully.

Shutdown (:meth:`Service.shutdown`): the dispatcher refuses new jobs, running ones get
``SHUTDOWN_GRACE_S`` to finish, then the tree stops in reverse: workers (side by side) and
sessions interrupt what still runs (those requests are answered with their partial output)
and close their agents; then the dispatcher, HTTP, the registry (which writes what is queued
and closes its session table) and last the reaper; :meth:`.wiring.Wiring.close` then closes the
channels and the shared state's database pool. The tree is :mod:`.supervisor`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import trio

from .actors.supervision import Supervisor
from .agent.protocol import AgentFactory
from .config.settings import Settings
from .messages import Drain
from .observe import metrics
from .proxy.model import keep_memory_private
from .supervisor import root
from .wiring import make_agent_factory, wire

log = logging.getLogger(__name__)


class Service:
    """Owns the wiring (its channels, closed when the tree has ended) and the root supervisor."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        metrics.set_enabled(settings.metrics)
        metrics.set_per_user(settings.metrics_per_user)
        self.settings = settings
        self.wiring = wire(settings, os.environ if environ is None else environ)
        self.root: Supervisor | None = None
        self._stopping = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the tree until it is stopped (returns) or escalates (raises).

        Raises :class:`~claude_code_api.agent.startup.StartupError` during start-up
        when agents cannot be launched as configured.
        """
        if not keep_memory_private():
            log.warning(
                "cannot make the service non-dumpable: agents of its own OS user may "
                "read its environment (the model API's key) in /proc"
            )
        try:
            self.root = root(self.wiring)
            if self._stopping:  # a signal arrived before the tree existed
                self.root.request_stop()
            await self.root.run(task_status=task_status)
        finally:
            self.wiring.close()
            with trio.CancelScope(shield=True):
                await self.wiring.model_proxy.aclose()

    def _agent_factory(self) -> AgentFactory:
        """How agents launch (blocking; the start-up checks' tests call it)."""
        return make_agent_factory(self.wiring)

    async def shutdown(self, grace: float) -> None:
        """Refuse new work, give running jobs ``grace`` seconds, then stop the tree."""
        log.info("shutting down: running jobs get %gs to finish", grace)
        # Answered by HTTP itself from now on: the actors behind it are about to stop.
        self.wiring.http.refuse_new_requests()
        done_send, done_receive = trio.open_memory_channel[None](1)
        with trio.move_on_after(grace):
            async with done_receive:
                await self.wiring.inbox.send.send(Drain(done_send))
                try:
                    await done_receive.receive()
                except trio.EndOfChannel:
                    pass
        self._stopping = True
        if self.root is not None:
            self.root.request_stop()
