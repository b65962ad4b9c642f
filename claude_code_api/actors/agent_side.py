"""The ``agents`` supervisor: decides how agents launch, then runs what makes them.

The decision (sandbox probe, start-up checks, the SDK's slow import) runs in a thread before
anything agent-side starts, so HTTP and the dispatcher already answer meanwhile. A
:class:`~claude_code_api.agent.startup.StartupError` raised there fails the service's start.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..agent.protocol import AgentFactory
from .supervision import ChildSpec, Supervisor


class AgentSide:
    """One incarnation of the ``agents`` supervisor (an actor: serve, request_stop)."""

    def __init__(
        self,
        decide: Callable[[], AgentFactory],
        children: Callable[[AgentFactory], list[ChildSpec]],
        intensity: int,
        period: float,
    ) -> None:
        self._decide = decide  # blocking: run in a thread
        self._children = children
        self._intensity, self._period = intensity, period
        self._supervisor: Supervisor | None = None
        self._stop_requested = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        new_agent = await trio.to_thread.run_sync(self._decide)
        self._supervisor = Supervisor(
            "agents", self._children(new_agent), intensity=self._intensity, period=self._period
        )
        if self._stop_requested:
            self._supervisor.request_stop()
        await self._supervisor.run(task_status=task_status)

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._supervisor is not None:
            self._supervisor.request_stop()
