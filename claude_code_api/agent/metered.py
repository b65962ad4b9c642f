"""Agents that count their own warm-ups and failures (:mod:`claude_code_api.observe.metrics`).

:func:`metered` wraps an :data:`~claude_code_api.agent.protocol.AgentFactory`: its agents
behave exactly as the wrapped ones and, on the side, observe
``warmup_seconds`` for every successful start and count ``agent_failures_total``:

* ``warmup`` — :meth:`start` raised :class:`AgentStartError`;
* ``exit`` — the process died: a turn failed with it gone, or it exited while
  idle (:meth:`wait_exited` returned without anyone having closed it);
* ``protocol`` — a turn failed while the process still ran (malformed output,
  an unexpected message).

Each agent counts at most one failure. An agent closed on purpose (retired
after its job, killed after a timeout, replaced for new credentials) is no
failure. The service wraps the factory once, under everything else that wraps
it, so every worker's and session's agent is counted.
"""

from __future__ import annotations

import trio

from ..messages import Image
from ..observe import metrics
from .protocol import (
    CLOSE_GRACE_S,
    Agent,
    AgentError,
    AgentFactory,
    AgentSpec,
    AgentStartError,
    Charge,
    OnEvent,
    TurnResult,
)


class MeteredAgent:
    """An :class:`~claude_code_api.agent.protocol.Agent` that reports to :mod:`.metrics`; see the module."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._closing = False
        self._failed = False

    @property
    def pid(self) -> int | None:
        return self._agent.pid

    @property
    def exited(self) -> bool:
        return self._agent.exited

    @property
    def session_id(self) -> str | None:
        return self._agent.session_id

    async def start(self, timeout: float) -> None:
        began = trio.current_time()
        try:
            await self._agent.start(timeout)
        except AgentStartError:
            self._fail("warmup")
            raise
        metrics.agent_started(trio.current_time() - began)

    async def wait_exited(self) -> None:
        await self._agent.wait_exited()
        if not self._closing:
            self._fail("exit")

    async def run_turn(
        self,
        prompt: str,
        on_event: OnEvent,
        *,
        memory: str | None = None,
        images: tuple[Image, ...] = (),
        charge: Charge | None = None,
    ) -> TurnResult:
        try:
            return await self._agent.run_turn(
                prompt, on_event, memory=memory, images=images, charge=charge
            )
        except AgentError:
            self._fail("exit" if self._agent.exited else "protocol")
            raise

    @property
    def model(self) -> str | None:
        return self._agent.model

    async def set_model(self, model: str) -> None:
        try:
            await self._agent.set_model(model)
        except AgentError:
            self._fail("exit" if self._agent.exited else "protocol")
            raise

    async def set_permission_mode(self, mode: str) -> None:
        try:
            await self._agent.set_permission_mode(mode)
        except AgentError:
            self._fail("exit" if self._agent.exited else "protocol")
            raise

    async def reset(self, timeout: float) -> None:
        try:
            await self._agent.reset(timeout)
        except AgentError:
            self._fail("exit" if self._agent.exited else "protocol")
            raise

    async def interrupt(self, grace: float) -> bool:
        return await self._agent.interrupt(grace)

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        self._closing = True
        await self._agent.close(grace)

    def _fail(self, reason: str) -> None:
        if not self._failed:
            self._failed = True
            metrics.agent_failed(reason)


def metered(new_agent: AgentFactory) -> AgentFactory:
    """``new_agent``, making agents that count their warm-ups and failures."""

    def make(spec: AgentSpec) -> Agent:
        return MeteredAgent(new_agent(spec))

    return make
