"""Running one job's turn on an agent: the part workers and session actors share.

:func:`run_turn_for_job` owns ``job.reply`` for the whole turn and always ends it
with exactly one terminal event, then closes it. It enforces the job's deadline
with a cancel scope: when it passes, the agent is interrupted and given
``INTERRUPT_GRACE_MS`` to drain the turn, else killed. When the client goes away
(the reply channel breaks) the agent is interrupted the same way, so work for a
departed client stops.
"""

from __future__ import annotations

import attrs
import trio
from claude_agent_sdk import ResultMessage

from ..agent import Agent, AgentError
from ..config import Settings
from ..messages import AssistantText, Job, JobFailed, JobStarted, ReplyEvent, RunResult, ToolUse

# A client that stopped reading must not hold the agent: the reply is dropped after this.
REPLY_SEND_TIMEOUT_S = 10.0


@attrs.frozen
class TurnOutcome:
    ok: bool  # the client got a successful result
    agent_usable: bool  # the agent is idle and may take another turn
    cost_usd: float | None = None


class _ClientGone(Exception):
    pass


class OutputCollector:
    """The agent's text so far, capped at ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def add(self, text: str) -> None:
        room = self.limit - self.size
        if len(text) > room:
            text, self.truncated = text[: max(room, 0)], True
        if text:
            self.parts.append(text)
            self.size += len(text)

    @property
    def text(self) -> str:
        return "\n\n".join(self.parts)


def cap_output(text: str, limit: int) -> tuple[str, bool]:
    if len(text) > limit:
        return text[:limit], True
    return text, False


def result_output(result: ResultMessage) -> str:
    """The text a client sees for a finished turn, success or agent error."""
    if result.result:
        return result.result
    if result.errors:
        return "\n".join(result.errors)
    return "" if not result.is_error else f"agent error: {result.subtype}"


async def run_turn_for_job(
    agent: Agent,
    job: Job,
    worker_id: str,
    settings: Settings,
    *,
    turn_scope: trio.CancelScope | None = None,
) -> TurnOutcome:
    """Run ``job`` on ``agent`` and answer it on ``job.reply``; see the module docstring.

    ``turn_scope`` lets the caller stop the turn early (a closed session): cancel it
    and the turn is interrupted like a timeout, answered ``success: false``
    without ``timedOut``. Its deadline is set to the job's.
    """
    turn_scope = turn_scope or trio.CancelScope()
    turn_scope.deadline = job.deadline
    collected = OutputCollector(settings.max_output_chars)

    def elapsed_ms() -> int:
        return round((trio.current_time() - job.submitted_at) * 1000)

    async def send(event: ReplyEvent) -> None:
        with trio.move_on_after(REPLY_SEND_TIMEOUT_S) as scope:
            try:
                await job.reply.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _ClientGone from None
        if scope.cancelled_caught:
            raise _ClientGone

    async def relay(event: AssistantText | ToolUse) -> None:
        if isinstance(event, AssistantText):
            collected.add(event.text)
        await send(event)

    turn_running = False
    async with job.reply:
        try:
            await send(JobStarted(worker_id))
            result = None
            with turn_scope:
                turn_running = True
                result = await agent.run_turn(job.prompt, relay)
                turn_running = False
            if result is None:  # the deadline passed mid-turn, or the caller stopped it
                timed_out = trio.current_time() >= job.deadline
                usable = await _stop_turn(agent, settings)
                turn_running = False
                await send(
                    RunResult(
                        success=False,
                        output=collected.text,
                        duration_ms=elapsed_ms(),
                        timed_out=timed_out,
                        output_truncated=collected.truncated,
                    )
                )
                return TurnOutcome(ok=False, agent_usable=usable)
            output, truncated = cap_output(result_output(result), settings.max_output_chars)
            await send(
                RunResult(
                    success=not result.is_error,
                    output=output,
                    duration_ms=elapsed_ms(),
                    output_truncated=truncated,
                    cost_usd=result.total_cost_usd,
                    num_turns=result.num_turns,
                    usage=result.usage,
                    claude_session_id=result.session_id,
                )
            )
            return TurnOutcome(
                ok=not result.is_error, agent_usable=True, cost_usd=result.total_cost_usd
            )
        except AgentError as exc:
            await agent.close(grace=0)
            try:
                await send(JobFailed(502, str(exc)))
            except _ClientGone:
                pass
            return TurnOutcome(ok=False, agent_usable=False)
        except _ClientGone:
            usable = await _stop_turn(agent, settings) if turn_running else True
            return TurnOutcome(ok=False, agent_usable=usable)


async def _stop_turn(agent: Agent, settings: Settings) -> bool:
    """Interrupt the running turn; kill the agent if it does not stop within the grace."""
    if await agent.interrupt(settings.interrupt_grace_s):
        return True
    await agent.close(grace=0)
    return False
