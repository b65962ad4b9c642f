"""How running agents pick up new Claude credentials.

A Claude Code process reads its credentials when it starts, so after a login
(``/auth/exchange``), a refresh or a credentials file changed from outside, the
processes started before are *stale*. The rule: **a stale agent is replaced as
soon as it is idle; a busy one finishes its turn first.** No request has to
arrive for it to happen.

* :class:`CredentialsVersion` is a counter the credentials actor bumps after every
  change (it owns the writes); anyone may wait for it to move past a number.
  The supervision tree owns it, so it survives a restart of that actor.
* An actor takes a :class:`CredentialsStamp` just before it starts an agent (so
  credentials that change during the warm-up make the agent stale). Its idle wait
  also ends on :meth:`CredentialsStamp.wait_stale`; then, still idle, it closes the
  agent and starts a fresh one. Workers and session actors do it the same way
  (:mod:`claude_code_api.actors.worker`, :mod:`claude_code_api.actors.session`);
  a turn is never cut for it, since only the idle wait watches the stamp.
"""

from __future__ import annotations

import attrs
import trio


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

    def stamp(self) -> CredentialsStamp:
        """The version now, for an agent about to start."""
        return CredentialsStamp(self, self.number)


@attrs.frozen
class CredentialsStamp:
    """The credentials version an agent started with; stale once the version moves on."""

    version: CredentialsVersion
    number: int

    def stale(self) -> bool:
        return self.version.newer_than(self.number)

    async def wait_stale(self) -> None:
        """Return once the agent's credentials are stale (at once if they are)."""
        await self.version.wait_newer_than(self.number)
