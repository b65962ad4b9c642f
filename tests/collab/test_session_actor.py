"""The session actor with a fake agent, a fake registry and a fake dispatcher (autojump clock).

The test plays the dispatcher (it reads ``SessionStarted`` / ``SessionIdle`` and
hands turns to the actor's inbox) and the registry (an in-memory store answering
the registry's messages, which can be told to fail), so it can check what is
saved and when, which agent runs, and whether it was interrupted, killed or
replaced.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from claude_code_api.actors.registry import (
    CreateSession,
    DeleteSession,
    ListSessions,
    LoadSession,
    SaveSession,
)
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.actors.session import SessionConfig, SessionFailed, serve_session
from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.turn import CutReason, TurnLimits
from claude_code_api.config.ceiling import Held, OptionCeiling
from claude_code_api.messages import (
    Hibernate,
    Job,
    JobFailed,
    JobStarted,
    RunOptions,
    RunResult,
    SessionIdle,
    SessionKey,
    SessionStarted,
)
from claude_code_api.store import SessionRecord, TooManySessions, new_session_record
from claude_code_api.store import StoreUnavailable as RegistryError
from tests.support.fake_agent import FakeAgents, Finish, MoveSession, Say, Wait

LIMIT = 1000
KEY = SessionKey("alice", "s1")
CONFIG = SessionConfig(warmup_timeout_s=30, turn=TurnLimits(2.0, 1000), max_sessions_per_user=2)


@attrs.define(eq=False)
class FakeRegistry:
    """An in-memory registry actor; ``failing`` makes every write fail with that reason."""

    records: dict[SessionKey, SessionRecord] = attrs.Factory(dict)
    failing: str | None = None
    saves: list[tuple[float, SessionRecord]] = attrs.Factory(list)

    async def serve(self, inbox: trio.MemoryReceiveChannel) -> None:
        async for message in inbox:
            match message:
                case LoadSession(key, reply):
                    reply.send_nowait(self.records.get(key))
                case SaveSession(record, reply):
                    reply.send_nowait(self._write(record))
                case CreateSession(record, limit, reply):
                    mine = [k for k in self.records if k.user_id == record.user_id]
                    if len(mine) >= limit:
                        reply.send_nowait(TooManySessions(record.user_id, limit))
                    else:
                        reply.send_nowait(self._write(record))
                case DeleteSession(key, reply):
                    reply.send_nowait(self.records.pop(key, None) is not None)
                case ListSessions():
                    raise AssertionError("not used here")

    def _write(self, record: SessionRecord) -> RegistryError | None:
        if self.failing is not None:
            return RegistryError(self.failing)
        self.records[record.key] = record
        self.saves.append((trio.current_time(), record))
        return None


@attrs.define(eq=False)
class Harness:
    messages: trio.MemoryReceiveChannel
    agents: FakeAgents
    registry: FakeRegistry
    stop: StopSignal
    failure: list[BaseException]
    inbox: trio.MemorySendChannel | None = None

    async def idle(self) -> SessionIdle:
        message = await self.messages.receive()
        if isinstance(message, SessionStarted):
            self.inbox = message.inbox
            message = await self.messages.receive()
        assert isinstance(message, SessionIdle), message
        return message

    async def turn(self, prompt: str, timeout_s: float = 60) -> tuple[Job, list]:
        """Hand a turn over and collect its reply events up to the terminal one."""
        job = session_job(prompt, timeout_s)
        assert self.inbox is not None
        self.inbox.send_nowait(job[0])
        events = []
        async for event in job[1]:
            events.append(event)
        return job[0], events


async def warm_agents(agents: FakeAgents, count: int) -> None:
    """Until ``count`` agents were made and the last one is warm."""
    while len(agents.made) < count or agents.made[-1].exited:
        await trio.sleep(0.01)


def session_job(prompt: str, timeout_s: float) -> tuple[Job, trio.MemoryReceiveChannel]:
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=f"job-{prompt}",
        user_id=KEY.user_id,
        prompt=prompt,
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
        session_id=KEY.session_id,
    )
    return job, reply_receive


async def start_session(
    nursery: trio.Nursery,
    agents: FakeAgents,
    registry: FakeRegistry,
    credentials=None,
    config: SessionConfig = CONFIG,
) -> Harness:
    registry_send, registry_receive = trio.open_memory_channel(16)
    nursery.start_soon(registry.serve, registry_receive)
    send, receive = trio.open_memory_channel(0)
    harness = Harness(receive, agents, registry, StopSignal(), [])

    async def run() -> None:
        try:
            await serve_session(
                KEY,
                config,
                send,
                RegistryClient(registry_send),
                agents,
                Path("/home/alice"),
                harness.stop,
                credentials=credentials,
            )
        except SessionFailed as exc:
            harness.failure.append(exc)

    nursery.start_soon(run)
    return harness


async def test_a_turn_is_answered_only_once_its_record_is_saved(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("hi"), Wait(2), Finish(f"re: {p}")])
        session = await start_session(nursery, agents, FakeRegistry())
        await session.idle()
        job, events = await session.turn("one")
        assert isinstance(events[-1], RunResult) and events[-1].output == "re: one"
        saved_at, record = session.registry.saves[-1]
        assert record.turns == 1 and record.transcript_started
        assert saved_at <= trio.current_time()
        # The agent was started for a new conversation with the record's id.
        (agent,) = agents.made
        assert agent.spec.session_id == record.claude_session_id and agent.spec.resume is None
        assert agent.spec.home == Path("/home/alice") and not agent.spec.ephemeral


async def test_a_save_that_fails_answers_503_not_the_result(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        registry = FakeRegistry()
        session = await start_session(nursery, FakeAgents(), registry)
        await session.idle()
        registry.failing = "disk full"
        _, events = await session.turn("one")
        assert events[-1] == JobFailed(503, "session store unavailable: disk full")
        registry.failing = None
        await session.idle()
        _, events = await session.turn("two")
        assert isinstance(events[-1], RunResult) and events[-1].output == "echo: two"


async def test_an_idle_agent_killed_from_outside_is_replaced_resuming_the_conversation(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        session = await start_session(nursery, agents, FakeRegistry())
        await session.idle()
        await session.turn("one")
        await session.idle()
        agents.made[0].exit_now()
        await warm_agents(agents, 2)  # replaced, without announcing idle again
        with pytest.raises(trio.WouldBlock):
            session.messages.receive_nowait()
        first, second = agents.made
        assert second.spec.resume == first.spec.session_id
        _, events = await session.turn("two")
        assert isinstance(events[-1], RunResult) and events[-1].output == "echo: two"


async def test_an_agent_that_keeps_exiting_while_idle_ends_the_session(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        session = await start_session(nursery, agents, FakeRegistry())
        await session.idle()
        for n in range(3):
            await warm_agents(agents, n + 1)
            agents.made[-1].exit_now()
        await trio.testing.wait_all_tasks_blocked()
        (failure,) = session.failure
        assert isinstance(failure, SessionFailed) and failure.failure.status == 502


async def test_clear_moves_the_record_to_the_new_conversation(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(
            script=lambda p: (
                [MoveSession("cleared-id"), Finish("")] if p == "/clear" else [Finish("ok")]
            )
        )
        registry = FakeRegistry()
        session = await start_session(nursery, agents, registry)
        await session.idle()
        await session.turn("hello")
        old = registry.records[KEY].claude_session_id
        await session.idle()
        await session.turn("/clear")
        record = registry.records[KEY]
        assert record.claude_session_id == "cleared-id"
        assert record.previous_claude_session_ids == (old,)
        # After a hibernation, the next agent resumes the cleared conversation.
        await session.idle()
        session.inbox.send_nowait(Hibernate())
        await trio.testing.wait_all_tasks_blocked()
        session2 = await start_session(nursery, agents, registry)
        await session2.idle()
        assert agents.made[-1].spec.resume == "cleared-id"


async def test_a_departed_client_interrupts_the_turn_and_the_session_goes_on(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(
            script=lambda p: [Wait(100), Finish("late")] if p == "slow" else [Finish("ok")]
        )
        session = await start_session(nursery, agents, FakeRegistry())
        await session.idle()
        job, reply = session_job("slow", 600)
        session.inbox.send_nowait(job)
        assert await reply.receive() == JobStarted("session:s1")
        # The prompt reaches the agent (else a client gone is answered without it).
        await trio.testing.wait_all_tasks_blocked()
        reply.close()
        job.cancellation.cancel(CutReason.CLIENT_GONE)
        idle = await session.idle()
        assert idle.finished_ok is False
        (agent,) = agents.made
        assert agent.events[-1] == "interrupted"
        _, events = await session.turn("next")
        assert isinstance(events[-1], RunResult) and events[-1].output == "ok"
        assert len(agents.made) == 1  # the same process: interrupted, not killed


async def test_a_user_over_the_session_limit_is_refused_with_429(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        registry = FakeRegistry()
        for n in range(CONFIG.max_sessions_per_user):
            other = SessionRecord("alice", f"other-{n}", f"id-{n}", 0.0, 0.0)
            registry.records[other.key] = other
        session = await start_session(nursery, FakeAgents(), registry)
        await trio.testing.wait_all_tasks_blocked()
        (failure,) = session.failure
        assert failure.failure.status == 429
        assert KEY not in registry.records


@pytest.mark.parametrize("when", ["idle", "turn"])
async def test_a_stop_keeps_the_record_and_answers_a_running_turn(autojump_clock, nursery, when):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("so far"), Wait(100)])
        registry = FakeRegistry()
        session = await start_session(nursery, agents, registry)
        await session.idle()
        if when == "idle":
            session.stop.request_stop()
            await trio.sleep(1)  # the graceful close
            assert agents.made[0].events[-1] == "closed"
        else:
            job, reply = session_job("long", 600)
            session.inbox.send_nowait(job)
            await reply.receive()
            await reply.receive()
            session.stop.request_stop()
            terminal = await reply.receive()
            assert isinstance(terminal, RunResult) and terminal.output == "so far"
        assert KEY in registry.records


async def test_a_turn_handed_over_as_the_idle_agent_exits_runs_on_the_replacement(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        agents = FakeAgents()
        session = await start_session(nursery, agents, FakeRegistry())
        await session.idle()
        job, reply = session_job("hello", 600)
        agents.made[0].exit_now()
        session.inbox.send_nowait(job)  # in the same instant, before the actor notices
        events = [event async for event in reply]
        assert isinstance(events[-1], RunResult) and events[-1].output == "echo: hello"
        assert len(agents.made) == 2
        # Idle once more, after the turn: not in between (the dispatcher would hand over
        # a second turn while the first one waited).
        idle = await session.idle()
        assert idle.finished_ok is True
        with pytest.raises(trio.WouldBlock):
            session.messages.receive_nowait()


# --- ceilings: a session's saved options under the ceilings in force (issue 20 §5) ------------

STRICT = OptionCeiling(
    allowed_models=("claude-sonnet-4-6",),
    allowed_permission_modes=("default", "acceptEdits"),
    max_turns=5,
    max_budget_usd=1.0,
    default_model="claude-sonnet-4-6",
)
GENEROUS_OPTIONS = RunOptions(
    model="claude-opus-4-1",
    max_turns=500,
    max_budget_usd=100.0,
    permission_mode="plan",
    system_prompt="be brief",
)
LOWERED = {
    "model": "claude-sonnet-4-6",
    "maxTurns": 5,
    "maxBudgetUsd": 1.0,
    "permissionMode": "bypassPermissions",
}


def test_the_ceiling_lowers_numbers_and_falls_back_to_the_default_model_and_mode():
    held = STRICT.hold(GENEROUS_OPTIONS)
    assert held.options == RunOptions(max_turns=5, max_budget_usd=1.0, system_prompt="be brief")
    assert held.changed == LOWERED
    within = RunOptions(model="claude-sonnet-4-6", max_turns=3, permission_mode="default")
    assert STRICT.hold(within) == Held(within) and STRICT.hold(within).changed == {}
    assert STRICT.hold(RunOptions()).changed == {}
    # bypassPermissions asked for by name (once allowed) is the default mode: nothing changes.
    bypass = STRICT.hold(RunOptions(permission_mode="bypassPermissions"))
    assert bypass.options == RunOptions() and bypass.changed == {}


async def test_an_old_sessions_agents_start_under_the_ceilings_in_force(autojump_clock, nursery):
    """Saved under generous settings, run under strict ones: every agent it starts (the
    first, and the one replacing an agent that died) gets the held options, every result
    says what was lowered, and the record keeps what was asked."""
    with trio.fail_after(LIMIT):
        registry = FakeRegistry()
        old = attrs.evolve(
            new_session_record(KEY, 0.0), options=GENEROUS_OPTIONS, transcript_started=True
        )
        registry.records[KEY] = old
        agents = FakeAgents()
        config = attrs.evolve(CONFIG, ceiling=STRICT)
        session = await start_session(nursery, agents, registry, config=config)
        await session.idle()
        _, events = await session.turn("one")
        assert events[-1].lowered_options == LOWERED
        held = RunOptions(max_turns=5, max_budget_usd=1.0, system_prompt="be brief")
        assert agents.made[0].spec.options == held
        assert agents.made[0].spec.resume == old.claude_session_id
        await session.idle()
        agents.made[0].exit_now()
        await warm_agents(agents, 2)
        assert agents.made[1].spec.options == held
        _, events = await session.turn("two")
        assert events[-1].output == "echo: two" and events[-1].lowered_options == LOWERED
        assert registry.records[KEY].options == GENEROUS_OPTIONS


async def test_without_a_ceiling_or_within_it_a_result_names_nothing_lowered(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        session = await start_session(nursery, FakeAgents(), FakeRegistry())
        await session.idle()
        _, events = await session.turn("one")
        assert events[-1].lowered_options is None


class FakeTranscripts:
    """The shared transcript store's seam: records the calls; fails while ``failing``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, Path, str]] = []
        self.failing: str | None = None

    async def materialise(self, config_dir: Path, cwd: Path, claude_session_id: str) -> bool:
        return self._call("materialise", config_dir, cwd, claude_session_id)

    async def mirror(self, config_dir: Path, cwd: Path, claude_session_id: str) -> None:
        self._call("mirror", config_dir, cwd, claude_session_id)

    def _call(self, what: str, config_dir: Path, cwd: Path, claude_id: str) -> bool:
        if self.failing is not None:
            raise RegistryError(self.failing)
        self.calls.append((what, config_dir, cwd, claude_id))
        return True


async def test_a_turn_whose_transcript_is_not_stored_answers_503(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        transcripts = FakeTranscripts()
        config = attrs.evolve(CONFIG, transcripts=transcripts)
        registry = FakeRegistry()
        session = await start_session(nursery, FakeAgents(), registry, config=config)
        await session.idle()
        transcripts.failing = "connection refused"
        _, events = await session.turn("one")
        assert events[-1] == JobFailed(503, "session store unavailable: connection refused")
        assert registry.records[KEY].turns == 0  # (the transcript first: the record waits)
        transcripts.failing = None
        await session.idle()
        _, events = await session.turn("two")
        assert isinstance(events[-1], RunResult) and events[-1].output == "echo: two"
        record = registry.records[KEY]
        home = Path("/home/alice")
        mirrored = ("mirror", home / ".claude", home / "workspace", record.claude_session_id)
        assert transcripts.calls == [mirrored]


async def test_a_resumed_agent_starts_from_the_stored_transcript(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        transcripts = FakeTranscripts()
        config = attrs.evolve(CONFIG, transcripts=transcripts)
        agents, registry = FakeAgents(), FakeRegistry()
        session = await start_session(nursery, agents, registry, config=config)
        await session.idle()
        await session.turn("one")
        assert [call[0] for call in transcripts.calls] == ["mirror"]  # (a new one: nothing)
        await session.idle()
        agents.made[0].exit_now()
        await warm_agents(agents, 2)
        claude_id = registry.records[KEY].claude_session_id
        assert transcripts.calls[-1][0::3] == ("materialise", claude_id)
        assert agents.made[1].spec.resume == claude_id
