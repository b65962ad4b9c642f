"""An :class:`~claude_code_api.agent.sdk.SdkAgent`'s turns on the real SDK and the fake CLI.

Made as the service makes them (``tests.support.harness.service_agents``). What is
checked here is the agent's use of the SDK across many turns on one process: no
work left behind per turn, and an interrupted turn leaves the next one clean.
"""

from __future__ import annotations

import threading
import uuid

import attrs
import trio

from claude_code_api.agent.protocol import AgentSpec
from tests.support.harness import service_agents, service_env

TIMEOUT_S = 30


class TaskSpawns(trio.abc.Instrument):
    """Counts the system tasks trio starts to close abandoned async generators."""

    def __init__(self) -> None:
        self.finalizers = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith("close asyncgen"):
            self.finalizers += 1


async def ignore(_event) -> None:
    pass


async def test_turns_on_one_agent_leave_no_abandoned_generators_to_close(tmp_path):
    settings, make_agent = service_agents(service_env(tmp_path))
    home = tmp_path / "home"
    agent = make_agent(
        AgentSpec(name="turns", home=home, ephemeral=False, session_id=str(uuid.uuid4()))
    )
    spawns = TaskSpawns()
    with trio.fail_after(TIMEOUT_S):
        try:
            await agent.start(settings.warmup_timeout_s)
            await agent.run_turn("first", ignore)
            trio.lowlevel.add_instrument(spawns)
            try:
                for n in range(5):
                    result = await agent.run_turn(f"turn {n}", ignore)
                    assert not result.is_error
                    await trio.sleep(0.01)  # room for any finalizer to start
            finally:
                trio.lowlevel.remove_instrument(spawns)
        finally:
            await agent.close()
    # receive_response() per turn left three generators for trio to close, each turn.
    assert spawns.finalizers == 0


async def test_a_turn_after_an_interrupted_one_gets_its_own_answer(tmp_path):
    settings, make_agent = service_agents(service_env(tmp_path))
    agent = make_agent(
        AgentSpec(name="interrupted", home=tmp_path / "home", ephemeral=False, session_id=None)
    )
    with trio.fail_after(TIMEOUT_S):
        try:
            await agent.start(settings.warmup_timeout_s)
            with trio.move_on_after(0.5):
                await agent.run_turn("[[fake:slow:100:0.1]] slow one", ignore)
            assert await agent.interrupt(5.0)
            result = await agent.run_turn("the next one", ignore)
            assert not result.is_error and "the next one" in result.text
        finally:
            await agent.close()


class BusyLauncher:
    """The service's launcher, whose freshly written file stays open for writing a moment,
    as in a child forked meanwhile by another thread (until it execs)."""

    def __init__(self, launcher, busy_s: float) -> None:
        self._launcher = launcher
        self._busy_s = busy_s

    def prepare(self, spec, agent_id):
        path = self._launcher.prepare(spec, agent_id)
        holder = open(path, "ab")  # noqa: SIM115 - closed by the timer
        threading.Timer(self._busy_s, holder.close).start()
        return path

    def __getattr__(self, name):
        return getattr(self._launcher, name)


async def test_a_launcher_busy_for_a_moment_is_started_again(tmp_path):
    settings, make_agent = service_agents(service_env(tmp_path))
    busy = attrs.evolve(make_agent, launcher=BusyLauncher(make_agent.launcher, 0.015))
    agent = busy(AgentSpec(name="busy", home=tmp_path / "home", ephemeral=False))
    with trio.fail_after(TIMEOUT_S):
        try:
            await agent.start(settings.warmup_timeout_s)
            result = await agent.run_turn("hello", ignore)
            assert not result.is_error
        finally:
            await agent.close()
