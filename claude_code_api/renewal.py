"""How running agents pick up new Claude credentials.

A Claude Code process reads its credentials when it starts, so after a login
(``/auth/exchange``), a refresh or a credentials file changed from outside, the
processes started before are *stale*. The rule: **a stale agent is replaced as
soon as it is idle; a busy one finishes its turn first.** No request has to
arrive for it to happen.

* :class:`CredentialsVersion` is a counter the credentials actor bumps after every
  change (it owns the writes); anyone may wait for it to move past a number.
  The supervision tree owns it, so it survives a restart of that actor.
* Session actors note the version their agent started with and, when it moves
  while they are idle or once their turn ends, close the agent and start a new
  one (:mod:`claude_code_api.actors.session`).
* One-shot workers retire their process after every job anyway, so only an
  idle (or warming) worker's agent can be stale. :func:`retired_when_stale`
  wraps the workers' agent factory: an agent's :meth:`~Agent.wait_exited`, which
  is how a worker waits while idle, also closes the agent and returns once the
  version moves past the one it started with. The worker then sees an exited
  idle agent and starts a fresh one, as it does for any idle exit.
"""

from __future__ import annotations

import logging

import trio

from .agent import CLOSE_GRACE_S, Agent, AgentFactory, AgentSpec, Charge, OnEvent, TurnResult
from .messages import Image

log = logging.getLogger(__name__)


class CredentialsVersion:
    """A number that grows by one whenever the credentials agents use change."""

    def __init__(self) -> None:
        self.number = 0
        self._moved = trio.Event()

    def bump(self) -> None:
        self.number += 1
        moved, self._moved = self._moved, trio.Event()
        moved.set()

    def newer_than(self, number: int) -> bool:
        return self.number > number

    async def wait_newer_than(self, number: int) -> None:
        """Return once the version is past ``number`` (at once if it is already)."""
        while self.number <= number:
            await self._moved.wait()


class RetiredWhenStale:
    """An :class:`Agent` that closes itself when asked to wait while its credentials are stale.

    Everything else goes straight to the wrapped agent.
    """

    def __init__(self, agent: Agent, spec: AgentSpec, version: CredentialsVersion) -> None:
        self._agent = agent
        self._spec = spec
        self._version = version
        self._started_with = version.number

    @property
    def pid(self) -> int | None:
        return self._agent.pid

    @property
    def exited(self) -> bool:
        return self._agent.exited

    @property
    def session_id(self) -> str | None:
        return self._agent.session_id

    @property
    def model(self) -> str | None:
        return self._agent.model

    async def start(self, timeout: float) -> None:
        # Noted before starting: credentials that change during the warm-up make it stale.
        self._started_with = self._version.number
        await self._agent.start(timeout)

    async def wait_exited(self) -> None:
        async with trio.open_nursery() as nursery:

            async def retire_when_stale() -> None:
                await self._version.wait_newer_than(self._started_with)
                log.info("%s: new Claude credentials; replacing its idle agent", self._spec.name)
                await self._agent.close()
                nursery.cancel_scope.cancel()

            nursery.start_soon(retire_when_stale)
            await self._agent.wait_exited()
            nursery.cancel_scope.cancel()

    async def run_turn(
        self,
        prompt: str,
        on_event: OnEvent,
        *,
        memory: str | None = None,
        images: tuple[Image, ...] = (),
        charge: Charge | None = None,
    ) -> TurnResult:
        return await self._agent.run_turn(
            prompt, on_event, memory=memory, images=images, charge=charge
        )

    async def set_model(self, model: str) -> None:
        await self._agent.set_model(model)

    async def set_permission_mode(self, mode: str) -> None:
        await self._agent.set_permission_mode(mode)

    async def reset(self, timeout: float) -> None:
        await self._agent.reset(timeout)

    async def interrupt(self, grace: float) -> bool:
        return await self._agent.interrupt(grace)

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        await self._agent.close(grace)


def retired_when_stale(new_agent: AgentFactory, version: CredentialsVersion) -> AgentFactory:
    """``new_agent``, making agents that retire while idle once the credentials change."""

    def make(spec: AgentSpec) -> Agent:
        return RetiredWhenStale(new_agent(spec), spec, version)

    return make
