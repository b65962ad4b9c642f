"""The agent contract: what every implementation of the :class:`Agent` protocol must do.

Run against the in-memory :class:`~tests.support.fake_agent.FakeAgent` (what the
collaboration tests drive on MockClock) and the real
:class:`~claude_code_api.agent.sdk.SdkAgent` on the fake CLI, made as the service makes
them. The collaboration tests are only worth what the fake agent's likeness is: each case
here holds for both, so a behaviour the actors rely on cannot drift between them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from claude_code_api.agent.protocol import Agent, AgentError, AgentSpec
from claude_code_api.messages import AgentEvent, AssistantText
from tests.support.fake_agent import FakeAgents
from tests.support.harness import service_agents, service_env

TIMEOUT_S = 30
START_TIMEOUT_S = 20.0

MakeAgent = Callable[[AgentSpec], Agent]


@asynccontextmanager
async def fake_agents(tmp_path: Path) -> AsyncIterator[MakeAgent]:
    yield FakeAgents(start_s=0.01)


@asynccontextmanager
async def sdk_agents(tmp_path: Path) -> AsyncIterator[MakeAgent]:
    env = dict(service_env(tmp_path), AGENT_WARM_UP_TURN="0")
    _, make = await trio.to_thread.run_sync(service_agents, env)
    yield make


@pytest.fixture(params=[fake_agents, sdk_agents], ids=["fake-agent", "sdk-agent"])
def implementation(request):
    return request.param


def spec(tmp_path: Path, *, session: bool = False) -> AgentSpec:
    if session:
        return AgentSpec(
            name="contract", home=tmp_path / "home", ephemeral=False, session_id=str(uuid.uuid4())
        )
    return AgentSpec(name="contract", home=tmp_path / "home", ephemeral=True)


@asynccontextmanager
async def started(implementation, tmp_path: Path, **kind: bool) -> AsyncIterator[Agent]:
    async with implementation(tmp_path) as make:
        agent = make(spec(tmp_path, **kind))
        try:
            await agent.start(START_TIMEOUT_S)
            yield agent
        finally:
            await agent.close(grace=0)


class Events:
    def __init__(self) -> None:
        self.seen: list[AgentEvent] = []

    async def __call__(self, event: AgentEvent) -> None:
        self.seen.append(event)


async def test_a_started_agent_answers_a_turn_and_relays_what_it_writes(implementation, tmp_path):
    with trio.fail_after(TIMEOUT_S):
        async with started(implementation, tmp_path) as agent:
            assert agent.pid is not None and not agent.exited
            events = Events()
            result = await agent.run_turn("hello there", events)
            assert not result.is_error
            assert result.text == "echo: hello there"
            assert any(isinstance(e, AssistantText) for e in events.seen)
            again = await agent.run_turn("and again", events)  # one process, many turns
            assert again.text == "echo: and again"


async def test_a_session_agent_keeps_the_conversation_id_it_was_given(implementation, tmp_path):
    with trio.fail_after(TIMEOUT_S):
        async with started(implementation, tmp_path, session=True) as agent:
            result = await agent.run_turn("first", Events())
            assert result.session_id == agent.session_id
            assert agent.session_id is not None


async def test_a_closed_agent_has_exited_and_refuses_turns(implementation, tmp_path):
    with trio.fail_after(TIMEOUT_S):
        async with implementation(tmp_path) as make:
            agent = make(spec(tmp_path))
            await agent.start(START_TIMEOUT_S)
            await agent.close()
            assert agent.exited
            await agent.wait_exited()  # returns at once
            await agent.close()  # twice is harmless
            with pytest.raises(AgentError):
                await agent.run_turn("too late", Events())


async def test_an_idle_agent_interrupts_at_once_and_stays_usable(implementation, tmp_path):
    with trio.fail_after(TIMEOUT_S):
        async with started(implementation, tmp_path) as agent:
            assert await agent.interrupt(grace=2.0) is True
            assert (await agent.run_turn("still here", Events())).text == "echo: still here"


async def test_a_model_set_on_a_live_agent_is_the_one_it_reports(implementation, tmp_path):
    with trio.fail_after(TIMEOUT_S):
        async with started(implementation, tmp_path) as agent:
            await agent.set_model("claude-contract-model")
            assert agent.model == "claude-contract-model"
