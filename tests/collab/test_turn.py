"""How one turn runs: deadlines, departed clients, upstream errors, dying agents.

Collaboration tests of :func:`claude_code_api.actors.turn.run_turn` with the
in-memory :class:`~tests.support.fake_agent.FakeAgent` on trio's autojump clock, so the
virtual time of every interrupt and kill is asserted exactly, and an interrupt
is told apart from a kill.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from claude_code_api.actors.turn import CutReason, TurnLimits, run_turn
from claude_code_api.agent.protocol import AgentSpec, Charge
from claude_code_api.limits.usage import UsageLedger
from claude_code_api.messages import (
    TERMINAL_EVENTS,
    AssistantText,
    Job,
    JobFailed,
    JobStarted,
    RunResult,
    UpstreamError,
    UpstreamRetry,
)
from tests.support.fake_agent import Die, FakeAgents, Finish, Hang, MoveSession, Retry, Say, Wait

LIMIT = 1000
GRACE = 2.0
LIMITS = TurnLimits(interrupt_grace_s=GRACE, max_output_chars=1000)


def make_job(
    prompt: str = "hello", timeout_s: float = 60.0
) -> tuple[Job, trio.MemoryReceiveChannel]:
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id="job-1",
        user_id="u",
        prompt=prompt,
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
    )
    return job, reply_receive


async def started_agent(agents: FakeAgents):
    agent = agents(AgentSpec(name="w", home=Path("/nonexistent"), ephemeral=True))
    await agent.start(10)
    return agent


def drain(reply: trio.MemoryReceiveChannel) -> list:
    events = []
    while True:
        try:
            events.append(reply.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return events


async def test_a_finished_turn_relays_its_text_and_returns_the_unsent_result(autojump_clock):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("thinking"), Wait(3), Finish("done")])
        agent = await started_agent(agents)
        job, reply = make_job()
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.ok and outcome.agent_usable and outcome.cut is None
        assert isinstance(outcome.terminal, RunResult)
        assert outcome.terminal.output == "done"
        assert outcome.terminal.duration_ms == 3000
        # The terminal event is the caller's to send (after its bookkeeping).
        assert drain(reply) == [JobStarted("w"), AssistantText("thinking")]


async def test_a_deadline_interrupts_the_agent_and_keeps_it(autojump_clock):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("partial"), Wait(100), Finish("late")])
        agent = await started_agent(agents)
        job, _ = make_job(timeout_s=10)
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.cut is CutReason.TIMEOUT
        assert outcome.agent_usable
        assert isinstance(outcome.terminal, RunResult)
        assert outcome.terminal.timed_out and not outcome.terminal.success
        assert outcome.terminal.output == "partial"
        assert agent.log[-1] == (job.deadline + agents.interrupt_s, "interrupted")
        assert "killed" not in agent.events


async def test_an_agent_that_ignores_the_interrupt_is_killed_after_the_grace(autojump_clock):
    with trio.fail_after(LIMIT):
        agent = await started_agent(FakeAgents(script=lambda p: [Hang()]))
        job, _ = make_job(timeout_s=10)
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.cut is CutReason.TIMEOUT
        assert not outcome.agent_usable
        assert agent.log[-2:] == [
            (job.deadline + GRACE, "interrupt failed"),
            (job.deadline + GRACE, "killed"),
        ]


async def test_a_client_that_leaves_during_a_silent_call_interrupts_at_once(autojump_clock):
    # The agent says nothing for 100 s (a long model call): the departure is
    # noticed through the job's cancellation, not at the agent's next event.
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Wait(100), Finish("late")])
        agent = await started_agent(agents)
        job, reply = make_job(timeout_s=600)
        async with trio.open_nursery() as nursery:

            async def leave_after_5s() -> None:
                await trio.sleep(5)
                reply.close()
                job.cancellation.cancel(CutReason.CLIENT_GONE)

            nursery.start_soon(leave_after_5s)
            left_at = trio.current_time() + 5
            outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.cut is CutReason.CLIENT_GONE
        assert outcome.agent_usable  # interrupted, not killed: a session goes on
        assert agent.log[-1] == (left_at + agents.interrupt_s, "interrupted")
        assert isinstance(outcome.terminal, RunResult) and outcome.terminal.cancelled


async def test_a_client_that_leaves_after_a_failed_interrupt_does_not_revive_the_agent(
    autojump_clock,
):
    # Defect: after a timeout whose interrupt failed, a departed client made the
    # killed agent look usable, and the session's next turn got a 502.
    with trio.fail_after(LIMIT):
        agent = await started_agent(FakeAgents(script=lambda p: [Say("x"), Hang()]))
        job, reply = make_job(timeout_s=10)
        async with trio.open_nursery() as nursery:

            async def leave_during_the_grace() -> None:
                await trio.sleep(11)
                reply.close()
                job.cancellation.cancel(CutReason.CLIENT_GONE)

            nursery.start_soon(leave_during_the_grace)
            outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.cut is CutReason.TIMEOUT
        assert not outcome.agent_usable
        assert agent.events[-2:] == ["interrupt failed", "killed"]


async def test_a_client_gone_before_the_turn_began_leaves_the_agent_untouched(autojump_clock):
    with trio.fail_after(LIMIT):
        agent = await started_agent(FakeAgents())
        job, reply = make_job()
        job.cancellation.cancel(CutReason.CLIENT_GONE)
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.agent_usable
        assert agent.events == ["start"]


async def test_a_refused_credential_interrupts_the_turn_and_answers_502(autojump_clock):
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Retry(401, "invalid x-api-key"), Wait(100)])
        agent = await started_agent(agents)
        job, reply = make_job(timeout_s=120)
        started = trio.current_time()
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.terminal == JobFailed(502, "upstream API error 401: invalid x-api-key")
        assert outcome.cut is CutReason.UPSTREAM and outcome.agent_usable
        assert trio.current_time() == started + agents.interrupt_s  # at once, not after 120 s
        assert outcome.upstream_error == UpstreamError(401, "invalid x-api-key", 1)
        assert UpstreamRetry(401, "invalid x-api-key", attempt=1) in drain(reply)


async def test_retryable_upstream_errors_are_left_to_the_cli_and_reported_at_the_deadline(
    autojump_clock,
):
    with trio.fail_after(LIMIT):
        script = [Retry(529, "overloaded"), Wait(5), Retry(500, "internal"), Wait(100)]
        agent = await started_agent(FakeAgents(script=lambda p: script))
        job, _ = make_job(timeout_s=30)
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.cut is CutReason.TIMEOUT
        assert isinstance(outcome.terminal, RunResult) and outcome.terminal.timed_out
        assert outcome.terminal.upstream_error == UpstreamError(500, "internal", 2)


async def test_a_result_that_ends_on_a_non_retryable_status_is_a_502(autojump_clock):
    with trio.fail_after(LIMIT):
        script = [Finish("API Error: 400 prompt too long", is_error=True, api_error_status=400)]
        agent = await started_agent(FakeAgents(script=lambda p: script))
        job, _ = make_job()
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.terminal == JobFailed(
            502, "upstream API error 400: API Error: 400 prompt too long"
        )


async def test_an_agent_that_dies_mid_turn_is_a_502_and_is_not_reused(autojump_clock):
    with trio.fail_after(LIMIT):
        agent = await started_agent(FakeAgents(script=lambda p: [Say("a"), Die()]))
        job, _ = make_job()
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert outcome.terminal == JobFailed(502, "agent process exited with code 3")
        assert not outcome.agent_usable


async def test_the_caller_can_stop_a_turn_which_is_interrupted_not_timed_out(autojump_clock):
    with trio.fail_after(LIMIT):
        agent = await started_agent(FakeAgents(script=lambda p: [Say("so far"), Wait(100)]))
        job, _ = make_job()
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def stop_after_3s() -> None:
                await trio.sleep(3)
                scope.cancel()

            nursery.start_soon(stop_after_3s)
            outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS, turn_scope=scope)
        assert outcome.cut is CutReason.STOPPED and outcome.agent_usable
        assert outcome.terminal == RunResult(
            success=False, output="so far", duration_ms=3000, stopped=True
        )
        assert outcome.terminal.outcome == "stopped"


async def test_the_session_id_the_agent_moved_to_is_reported(autojump_clock):
    with trio.fail_after(LIMIT):
        script = [MoveSession("new-id"), Finish("cleared")]
        agent = await started_agent(FakeAgents(script=lambda p: script))
        job, _ = make_job("/clear")
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert isinstance(outcome.terminal, RunResult)
        assert outcome.terminal.claude_session_id == "new-id"
        assert agent.session_id == "new-id"


async def test_output_beyond_the_limit_is_cut_and_said_so(autojump_clock):
    with trio.fail_after(LIMIT):
        agent = await started_agent(FakeAgents(script=lambda p: [Finish("x" * 1500)]))
        job, _ = make_job()
        outcome = await run_turn(agent, job, worker_id="w", limits=LIMITS)
        assert isinstance(outcome.terminal, RunResult)
        assert outcome.terminal.output == "x" * 1000 and outcome.terminal.output_truncated


def test_terminal_events_are_the_two_kinds():
    assert TERMINAL_EVENTS == (RunResult, JobFailed)


async def test_a_cut_turn_reports_what_the_proxy_counted_for_its_model_calls(autojump_clock):
    """The proxy's count is the run's cost even when the turn is cut short: the partial result
    carries it, so the metrics (fed from the terminal event) count it too."""
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Say("partial"), Hang()])
        agent = await started_agent(agents)
        job, _ = make_job(timeout_s=5)
        ledger = UsageLedger()
        usage = {"input_tokens": 1000, "output_tokens": 10}
        cost = ledger.record(Charge("u", job.id), "claude-sonnet-4-5", usage)
        limits = attrs.evolve(LIMITS, usage=ledger)
        outcome = await run_turn(agent, job, worker_id="w", limits=limits)
        assert outcome.cut is CutReason.TIMEOUT
        assert isinstance(outcome.terminal, RunResult) and outcome.terminal.timed_out
        assert cost > 0 and outcome.terminal.cost_usd == cost
        assert outcome.terminal.usage is not None
        assert outcome.terminal.usage["input_tokens"] == 1000
