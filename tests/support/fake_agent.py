"""An in-memory agent for collaboration tests on trio's MockClock.

:class:`FakeAgent` implements :class:`claude_code_api.agent.protocol.Agent` with no
process at all: each turn follows a script of steps, time passes with
``trio.sleep`` (virtual under ``autojump_clock``), and every call that matters
is written to :attr:`FakeAgent.log`, so a test can tell an *interrupt* from a
*kill* from a *replace* and say at what virtual time each happened.

The fake keeps the real agent's semantics that the service relies on: a turn
cancelled from outside (a deadline, a departed client) goes on "in the process"
until it is interrupted; an interrupt drains it unless the script hangs; a
process can exit while idle (:meth:`FakeAgent.exit_now`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import trio

from claude_code_api.agent.protocol import (
    AgentError,
    AgentSpec,
    AgentStartError,
    Charge,
    OnEvent,
    TurnResult,
)
from claude_code_api.messages import AssistantText, Image, ToolResult, ToolUse, UpstreamRetry

# --- script steps -------------------------------------------------------------


@attrs.frozen
class Say:
    text: str


@attrs.frozen
class Wait:
    """A silent stretch (a model call): interruptible."""

    seconds: float


@attrs.frozen
class Tool:
    name: str = "Bash"
    ok: bool = True


@attrs.frozen
class Retry:
    """The model API failed with ``status`` and the CLI retries (an ``api_retry`` message)."""

    status: int | None
    message: str = "upstream failure"


@attrs.frozen
class Hang:
    """Never finish, and ignore interrupts (only a kill ends it)."""


@attrs.frozen
class Die:
    """The process exits mid-turn."""

    reason: str = "agent process exited with code 3"


@attrs.frozen
class MoveSession:
    """The CLI moves the conversation to a new session id (as ``/clear`` does)."""

    session_id: str


@attrs.frozen
class Finish:
    text: str
    is_error: bool = False
    api_error_status: int | None = None
    cost_usd: float = 0.001


Step = Say | Wait | Tool | Retry | Hang | Die | MoveSession | Finish
Script = Callable[[str], Sequence[Step]]


def echo(prompt: str) -> Sequence[Step]:
    """What the fake CLI answers (tests/fake_claude.py): the text as it is written, then the
    result (tests/contract/test_agent_contract.py holds both fakes to it)."""
    return [Say(f"echo: {prompt}"), Finish(f"echo: {prompt}")]


# --- the agent ----------------------------------------------------------------


class FakeAgent:
    """See the module docstring. Made by :class:`FakeAgents`."""

    def __init__(self, spec: AgentSpec, factory: FakeAgents, number: int) -> None:
        self.spec = spec
        self.factory = factory
        self.number = number
        self.log: list[tuple[float, str]] = []
        self._exited = trio.Event()
        self._started = False
        self._closed = False
        self._session_id = spec.resume or spec.session_id
        self._turn: list[Step] | None = None  # the rest of the turn "in the process"
        self._interrupted = trio.Event()
        # The ``memory`` (a user's CLAUDE.md) each turn was handed, in order.
        self.memories: list[str | None] = []
        self.images: list[tuple[Image, ...]] = []  # each turn's
        # As started (spec.options), then as set by control requests (None: the default).
        self._model = spec.options.model
        self.permission_mode = spec.options.permission_mode

    def note(self, what: str) -> None:
        self.log.append((trio.current_time(), what))

    @property
    def events(self) -> list[str]:
        return [what for _, what in self.log]

    @property
    def pid(self) -> int | None:
        return 10_000 + self.number if self._started else None

    @property
    def exited(self) -> bool:
        return self._exited.is_set() or not self._started

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def model(self) -> str | None:
        return self._model

    async def set_model(self, model: str) -> None:
        if model != self._model:
            self._check_alive()
            self.note(f"set_model {model}")
            self._model = model

    async def set_permission_mode(self, mode: str) -> None:
        if mode != self.permission_mode:
            self._check_alive()
            self.note(f"set_permission_mode {mode}")
            self.permission_mode = mode

    def _check_alive(self) -> None:
        if self.exited or self._closed:
            raise AgentError("agent process is not running")

    def exit_now(self) -> None:
        """The process exits by itself (killed from outside, crashed while idle)."""
        self.note("exited")
        self._exited.set()

    async def start(self, timeout: float) -> None:
        self.note("start")
        failure = self.factory.start_failure
        if failure is not None:
            self._exited.set()
            raise AgentStartError(failure)
        with trio.move_on_after(timeout) as waited:
            await trio.sleep(self.factory.start_s)
        if waited.cancelled_caught:
            self._exited.set()
            raise AgentStartError(f"agent process did not answer initialize within {timeout:g}s")
        self._started = True

    async def wait_exited(self) -> None:
        await self._exited.wait()

    async def run_turn(
        self,
        prompt: str,
        on_event: OnEvent,
        *,
        memory: str | None = None,
        images: tuple[Image, ...] = (),
        charge: Charge | None = None,
    ) -> TurnResult:
        if self.exited or self._closed:
            raise AgentError("agent process is not running")
        self.note(f"turn {prompt}")
        self.memories.append(memory)
        self.images.append(images)
        self._turn = list(self.factory.script(prompt))
        self._interrupted = trio.Event()
        while self._turn:
            step = self._turn[0]
            if isinstance(step, Say):
                await on_event(AssistantText(step.text))
            elif isinstance(step, Tool):
                await on_event(ToolUse(step.name, {}))
                await on_event(ToolResult(step.ok))
            elif isinstance(step, Retry):
                await on_event(UpstreamRetry(step.status, step.message, attempt=1))
            elif isinstance(step, Wait):
                with trio.move_on_after(step.seconds):
                    await self._interrupted.wait()
            elif isinstance(step, Hang):
                await trio.sleep(math.inf)
            elif isinstance(step, MoveSession):
                self._session_id = step.session_id
            elif isinstance(step, Die):
                self._turn = None
                self.exit_now()
                raise AgentError(step.reason)
            elif isinstance(step, Finish):
                self._turn = None
                return TurnResult(
                    is_error=step.is_error,
                    text=step.text,
                    session_id=self._session_id,
                    cost_usd=step.cost_usd,
                    num_turns=1,
                    model=self._model or "fake",
                    api_error_status=step.api_error_status,
                )
            self._turn.pop(0)
        self._turn = None
        raise AgentError("agent process ended the turn without a result")

    async def reset(self, timeout: float) -> None:
        """``/clear`` and an emptied HOME: a new conversation id, after ``reset_s``."""
        self._check_alive()
        failure = self.factory.reset_failure
        with trio.move_on_after(timeout):
            await trio.sleep(self.factory.reset_s)
            if failure is not None:
                self.note("reset failed")
                raise AgentError(failure)
            self._session_id = f"cleared-{len(self.log)}"
            self.note("reset")
            return
        self.note("reset timed out")
        raise AgentError(f"agent did not clear its conversation within {timeout:g}s")

    async def interrupt(self, grace: float) -> bool:
        if self._turn is None:
            return True
        self._interrupted.set()
        if any(isinstance(step, Hang) for step in self._turn):
            await trio.sleep(grace)
            self.note("interrupt failed")
            return False
        await trio.sleep(min(self.factory.interrupt_s, grace))
        self._turn = None
        self.note("interrupted")
        return True

    async def close(self, grace: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._exited.is_set() or not self._started:
                self.note("closed (already exited)")
            elif grace > 0 and self._turn is None:
                await trio.sleep(self.factory.close_s)
                self.note("closed")
            else:
                self.note("killed")
            self._exited.set()


@attrs.define(eq=False)
class FakeAgents:
    """The agent factory: makes :class:`FakeAgent` s and keeps them, in order.

    ``script(prompt)`` gives each turn's steps; ``start_failure`` makes every
    start fail with that reason; ``start_s``, ``interrupt_s`` and ``close_s`` are
    virtual times a start, a successful interrupt and a graceful close take;
    ``reset_failure`` makes every reset fail, ``reset_s`` is the time one takes.
    """

    script: Script = echo
    start_failure: str | None = None
    reset_failure: str | None = None
    start_s: float = 1.0
    interrupt_s: float = 0.1
    close_s: float = 0.1
    reset_s: float = 0.01
    made: list[FakeAgent] = attrs.Factory(list)

    def __call__(self, spec: AgentSpec) -> FakeAgent:
        agent = FakeAgent(spec, self, len(self.made))
        self.made.append(agent)
        return agent
