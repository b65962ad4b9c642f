"""Running one job's turn on an agent: the part workers and session actors share.

:func:`run_turn` relays the turn's events to ``job.reply`` as they come and
returns the terminal event *unsent*, so its caller can do its bookkeeping (a
session saves its record) before it answers with :meth:`Job.answer`.

A turn is cut short — the agent *interrupted* and given ``INTERRUPT_GRACE_MS``
to drain the turn, and *killed* only if it does not — when:

* the job's deadline passes (``timedOut``);
* the client leaves or cancels: the job's :class:`Cancellation` is watched the
  whole time, so a client that leaves during a long, silent model call is
  noticed at once, not at the agent's next event;
* the model API answers with a status that retrying cannot fix (400, 401, 403,
  404): the reply is a 502 naming it. Retryable failures (429, 5xx, 529, no
  connection) are left to the CLI's own retries within the deadline; each is
  logged and relayed, and a reply that runs out of time carries the last one;
* the caller cancels ``turn_scope`` (a service shutdown, a deleted session);
* the user's files pass their disk quota, or fill the disk while they grow
  (``limits.disk``: :meth:`~claude_code_api.limits.disk_quota.DiskQuota.watch`): the agent
  is killed at once (its tools would write on through an interrupt's grace), then
  the disk gets room (``after_stop``: a part of the service's reserve), and the
  reply is a 507 naming the quota or the full disk. A turn that ended by itself
  having filled the disk (within a watch's interval) keeps its reply, but its agent
  is killed the same way (with what it left running) before the disk gets room.
  A user already over the quota,
  or whose agents filled the disk while it is still full, gets that 507 before the
  prompt reaches the agent.

An agent that dies or breaks the protocol mid-turn is killed (it is broken) and
the reply is a 502. The outcome says whether the agent can take another turn.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio

from ..agent.protocol import Agent, AgentError, Charge, TurnResult
from ..limits.disk_quota import DiskQuota, Watched
from ..limits.usage import UsageLedger, run_usage
from ..messages import (
    AgentEvent,
    AssistantText,
    Job,
    JobFailed,
    JobStarted,
    ReplyEvent,
    RunResult,
    TerminalEvent,
    UpstreamError,
    UpstreamRetry,
)
from ..observe import metrics

log = logging.getLogger(__name__)

# A client that stopped reading must not hold the agent: it is treated as gone after this.
REPLY_SEND_TIMEOUT_S = 10.0
# Model API statuses that no retry can fix: the turn is interrupted at the first one.
NON_RETRYABLE_STATUSES = frozenset({400, 401, 403, 404})


class CutReason(enum.StrEnum):
    TIMEOUT = "timeout"
    CLIENT_GONE = "client gone"
    CANCELLED = "cancelled"
    UPSTREAM = "upstream error"
    STOPPED = "stopped"
    DISK = "disk quota"


@attrs.frozen
class TurnOutcome:
    """How a turn went: the terminal event to answer with, and the agent's state after it."""

    terminal: TerminalEvent
    agent_usable: bool  # the agent is idle and may take another turn
    cut: CutReason | None = None  # why the turn was cut short, if it was
    upstream_error: UpstreamError | None = None
    cost_usd: float | None = None

    @property
    def ok(self) -> bool:
        return isinstance(self.terminal, RunResult) and self.terminal.success


@attrs.frozen
class TurnLimits:
    interrupt_grace_s: float
    max_output_chars: int
    disk: DiskQuota | None = None  # the users' disk quota (None: not enforced)
    # What the model proxy counted for each run, and the users' budgets (None: the
    # agents' own reports of their cost are taken, as without the proxy).
    usage: UsageLedger | None = None


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


class _UpstreamRetries:
    """The model API failures seen during one turn."""

    def __init__(self) -> None:
        self.count = 0
        self.last: UpstreamRetry | None = None

    def note(self, retry: UpstreamRetry) -> None:
        self.count += 1
        self.last = retry

    def error(self) -> UpstreamError | None:
        if self.last is None:
            return None
        return UpstreamError(self.last.status, self.last.message, self.count)


def job_context(job: Job, worker_id: str) -> dict[str, str]:
    """The context fields of a log record about ``job`` (see logs.py)."""
    context = {"runId": job.id, "userId": job.user_id, "worker": worker_id}
    if job.session_id is not None:
        context["sessionId"] = job.session_id
    return context


def upstream_failure(status: int | None, message: str) -> JobFailed:
    shown = "unreachable" if status is None else str(status)
    return JobFailed(502, f"upstream API error {shown}: {message}")


async def run_turn(
    agent: Agent,
    job: Job,
    *,
    worker_id: str,
    limits: TurnLimits,
    turn_scope: trio.CancelScope | None = None,
    taken_at: float | None = None,
    model: str | None = None,
    permission_mode: str | None = None,
    home: Path | None = None,
) -> TurnOutcome:
    """Run ``job`` on ``agent``, relaying events to ``job.reply``; see the module docstring.

    The caller owns ``job.reply`` and answers with ``outcome.terminal``. A caller
    that cancels ``turn_scope`` gets the turn interrupted and a ``success: false``
    result with the partial output. ``taken_at`` (trio time, default now) is when
    the caller took the job from the dispatcher. ``model`` and ``permission_mode``,
    when given, are set on the agent before the prompt (control requests, within
    the turn's deadline); an agent that refuses fails the turn like a dead one.
    ``home``: a one-shot agent's own HOME, counted for the job's user while it runs.
    """
    turn = _Turn(agent, job, worker_id, limits, turn_scope)
    refused = await turn.run(taken_at, model, permission_mode, home)
    if refused is not None:
        return refused
    return await turn.outcome()


class _Turn:
    """One turn of :func:`run_turn` while it runs, phase by phase: :meth:`run` (the disk
    quota's check, the prompt, the kill of an agent that filled the disk), then
    :meth:`outcome` (the terminal event, and stopping an agent whose turn was cut).

    It owns the turn's cancel scope (``turn_scope``, or its own), what the turn has
    collected (output, upstream retries) and why it was cut short, if it was: the first
    reason given wins.
    """

    def __init__(
        self,
        agent: Agent,
        job: Job,
        worker_id: str,
        limits: TurnLimits,
        turn_scope: trio.CancelScope | None,
    ) -> None:
        self.agent = agent
        self.job = job
        self.worker_id = worker_id
        self.limits = limits
        self.context = job_context(job, worker_id)
        self.scope = turn_scope if turn_scope is not None else trio.CancelScope()
        self.scope.deadline = min(self.scope.deadline, job.deadline)
        self.collected = OutputCollector(limits.max_output_chars)
        self.retries = _UpstreamRetries()
        self.cut: CutReason | None = None
        self.disk_failure: JobFailed | None = None
        self.result: TurnResult | None = None
        self.failure: AgentError | None = None
        self.began = False  # the prompt may have reached the agent
        self.filled = False  # the turn ended by itself, having filled the disk: its agent is killed

    # --- what cuts a turn short, and the agent's events -----------------------------

    def cut_short(self, reason: CutReason) -> None:
        self.cut = self.cut or reason
        self.scope.cancel()

    async def send(self, event: ReplyEvent) -> None:
        if self.cut is CutReason.CLIENT_GONE:
            return
        with trio.move_on_after(REPLY_SEND_TIMEOUT_S) as waited:
            try:
                await self.job.reply.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.cut_short(CutReason.CLIENT_GONE)
        if waited.cancelled_caught:
            self.cut_short(CutReason.CLIENT_GONE)

    async def relay(self, event: AgentEvent) -> None:
        if isinstance(event, AssistantText):
            self.collected.add(event.text)
        elif isinstance(event, UpstreamRetry):
            self.retries.note(event)
            log.warning(
                "%s: upstream API error %s (attempt %d): %s",
                self.worker_id,
                event.status or "unreachable",
                event.attempt,
                event.message,
                extra=self.context,
            )
        await self.send(event)
        if isinstance(event, UpstreamRetry) and event.status in NON_RETRYABLE_STATUSES:
            self.cut_short(CutReason.UPSTREAM)

    def stop_for_disk(self, failure: JobFailed) -> None:
        self.disk_failure = self.disk_failure or failure
        self.cut_short(CutReason.DISK)

    def cancelled_by_client(self) -> None:
        gone = self.job.cancellation.reason == CutReason.CLIENT_GONE
        self.cut_short(CutReason.CLIENT_GONE if gone else CutReason.CANCELLED)

    # --- phase 1: the turn itself ---------------------------------------------------

    async def run(
        self,
        taken_at: float | None,
        model: str | None,
        permission_mode: str | None,
        home: Path | None,
    ) -> TurnOutcome | None:
        """Run the turn (see :func:`run_turn` for the arguments): None once it ended or was
        cut, or the disk quota's refusal when the prompt must not reach the agent."""
        job, disk = self.job, self.limits.disk
        watched = Watched(job.user_id, self.stop_for_disk)
        # The client's cancellation is a callback, not a watcher task (the disk quota's
        # watch, which walks the user's files every second, has to be one).
        with job.cancellation.calling(self.cancelled_by_client), _counted(disk, job.user_id, home):
            if disk is not None and self.cut is None:
                refused = await disk.refusal(job.user_id)
                if refused is not None:
                    return TurnOutcome(refused, agent_usable=True, cut=CutReason.DISK)
                # What the user keeps before the turn (the watch's first measurement may
                # come after a fast tool has filled the disk).
                watched.start = await disk.usage(job.user_id)
            started_at = trio.current_time() if taken_at is None else taken_at
            metrics.run_started(started_at - job.submitted_at)
            await self.send(JobStarted(self.worker_id, at=started_at))
            with self.scope:
                if self.cut is None:
                    self.began = True
                    await self._prompt(watched, model, permission_mode)
                    if disk is not None and self.result is not None:
                        # (It may have filled the disk within a watch's interval.)
                        self.filled = await disk.after_turn(watched)
            if disk is not None and self.began and (self.filled or self.cut is CutReason.DISK):
                # Killed, not interrupted: its tools would write on through the interrupt's
                # grace (or in the background after the turn). Then the others get room
                # (the reserve), not this agent.
                await self.agent.close(grace=0)
                await disk.after_stop(watched)
        return None

    async def _prompt(
        self, watched: Watched, model: str | None, permission_mode: str | None
    ) -> None:
        """Set the agent's model and permission mode if asked, then run the prompt on it,
        the disk quota watching meanwhile: its result or failure is kept on ``self``."""
        job, disk = self.job, self.limits.disk
        async with trio.open_nursery() as watching:
            if disk is not None:
                watching.start_soon(disk.watch, watched)
            try:
                if model is not None:
                    await self.agent.set_model(model)
                if permission_mode is not None:
                    await self.agent.set_permission_mode(permission_mode)
                charge = Charge(job.user_id, job.id, job.session_id)
                self.result = await self.agent.run_turn(
                    job.prompt, self.relay, memory=job.memory, images=job.images, charge=charge
                )
            except AgentError as exc:
                self.failure = exc
            finally:
                watching.cancel_scope.cancel()

    # --- phase 2: how it ended ------------------------------------------------------

    async def outcome(self) -> TurnOutcome:
        """The terminal event and the agent's state: a dead agent's 502, a finished turn's
        result, or a cut turn's partial one (its agent interrupted, or killed)."""
        elapsed_ms = round((trio.current_time() - self.job.submitted_at) * 1000)
        if self.failure is not None:
            await self.agent.close(grace=0)
            _counted_usage(self.limits.usage, self.job, None)  # (the run's count is let go)
            return TurnOutcome(JobFailed(502, str(self.failure)), agent_usable=False)
        if self.result is not None:
            result, over_budget = _counted_usage(self.limits.usage, self.job, self.result)
            assert result is not None
            return self._ended(result, over_budget, elapsed_ms)
        return await self._cut_outcome(elapsed_ms)

    def _ended(self, result: TurnResult, over_budget: bool, elapsed_ms: int) -> TurnOutcome:
        """The outcome of a turn that ended by itself."""
        if over_budget:
            assert self.limits.usage is not None
            log.info(
                "%s: turn ended: the user's daily budget is spent",
                self.worker_id,
                extra=self.context,
            )
            refusal = JobFailed(
                429,
                self.limits.usage.budget_message(),
                retry_after_s=self.limits.usage.retry_after_s(),
            )
            return TurnOutcome(refusal, agent_usable=not self.filled)
        finished = _finished(result, elapsed_ms, self.retries, self.limits, self.agent.model)
        # (A session's next turn resumes in a new process.)
        return attrs.evolve(finished, agent_usable=False) if self.filled else finished

    async def _cut_outcome(self, elapsed_ms: int) -> TurnOutcome:
        """The outcome of a turn cut short; its agent is stopped first if the turn began."""
        cut = self.cut
        if cut is None:
            over = trio.current_time() >= self.job.deadline
            cut = CutReason.TIMEOUT if over else CutReason.STOPPED
        # A turn cut before it began (the client left during the hand-over) has nothing to stop.
        if cut is CutReason.DISK and self.began:
            usable = False  # (killed in run)
        else:
            usable = (
                await _stop_turn(self.agent, self.limits.interrupt_grace_s) if self.began else True
            )
        upstream = self.retries.error()
        terminal = self._cut_terminal(cut, elapsed_ms, upstream)
        # What its model calls cost until the agent stopped, as the proxy counted them: the
        # partial result reports it, and the metrics count it with the run.
        ledger = self.limits.usage
        spend = None if ledger is None else ledger.take_run(self.job.id)[0]
        if isinstance(terminal, RunResult) and spend is not None:
            terminal = attrs.evolve(terminal, cost_usd=spend.cost_usd, usage=run_usage(spend))
        log.info(
            "%s: turn cut short (%s); agent %s",
            self.worker_id,
            cut,
            "idle" if usable else "killed",
            extra=self.context,
        )
        return TurnOutcome(terminal, agent_usable=usable, cut=cut, upstream_error=upstream)

    def _cut_terminal(
        self, cut: CutReason, elapsed_ms: int, upstream: UpstreamError | None
    ) -> TerminalEvent:
        """What a cut turn answers: the upstream or disk failure that cut it, else its partial
        result."""
        last = self.retries.last
        if cut is CutReason.UPSTREAM and last is not None:
            return upstream_failure(last.status, last.message)
        if cut is CutReason.DISK and self.disk_failure is not None:
            return self.disk_failure
        return RunResult(
            success=False,
            output=self.collected.text,
            duration_ms=elapsed_ms,
            timed_out=cut is CutReason.TIMEOUT,
            output_truncated=self.collected.truncated,
            cancelled=cut in (CutReason.CLIENT_GONE, CutReason.CANCELLED),
            stopped=cut is CutReason.STOPPED,
            claude_session_id=self.agent.session_id,
            model=self.agent.model,
            upstream_error=upstream,
        )


@contextmanager
def _counted(disk: DiskQuota | None, user_id: str, home: Path | None) -> Iterator[None]:
    if disk is None:
        yield
    else:
        with disk.counting(user_id, home):
            yield


def _counted_usage(
    ledger: UsageLedger | None, job: Job, result: TurnResult | None
) -> tuple[TurnResult | None, bool]:
    """``result`` with what the model proxy counted for ``job``'s run as its cost and usage,
    and whether the proxy refused one of the run's model calls for its user's budget.

    The run's cost and tokens are the proxy's count, never the agent's own report
    (which its tools could forge). A run none of whose model calls went through the
    proxy (a local slash command; the tests' fake CLI, which calls no model) keeps what
    the agent reported: no budget relies on it (budgets count the proxy's figures only).
    """
    if ledger is None:
        return result, False
    spend, refused = ledger.take_run(job.id)
    if result is not None and spend is not None:
        result = attrs.evolve(result, cost_usd=spend.cost_usd, usage=run_usage(spend))
    return result, refused


def outcome_before_start(job: Job) -> TurnOutcome:
    """How a job ends that was cut short before its prompt reached any agent.

    For a job whose own agent was still starting when it was cancelled, ran out
    of time or the worker was stopped.
    """
    if job.cancellation.requested:
        gone = job.cancellation.reason == CutReason.CLIENT_GONE
        cut = CutReason.CLIENT_GONE if gone else CutReason.CANCELLED
    elif trio.current_time() >= job.deadline:
        cut = CutReason.TIMEOUT
    else:
        cut = CutReason.STOPPED
    terminal = RunResult(
        success=False,
        output="",
        duration_ms=round((trio.current_time() - job.submitted_at) * 1000),
        timed_out=cut is CutReason.TIMEOUT,
        cancelled=cut in (CutReason.CLIENT_GONE, CutReason.CANCELLED),
        stopped=cut is CutReason.STOPPED,
    )
    return TurnOutcome(terminal, agent_usable=True, cut=cut)


def _finished(
    result: TurnResult,
    elapsed_ms: int,
    retries: _UpstreamRetries,
    limits: TurnLimits,
    agent_model: str | None,
) -> TurnOutcome:
    output = result.text
    truncated = len(output) > limits.max_output_chars
    if truncated:
        output = output[: limits.max_output_chars]
    upstream = retries.error()
    status = result.api_error_status
    if result.is_error and status is not None:
        upstream = UpstreamError(status, " ".join(result.text.split())[:500], retries.count)
        if status in NON_RETRYABLE_STATUSES:
            terminal: TerminalEvent = upstream_failure(status, upstream.message)
            return TurnOutcome(terminal, agent_usable=True, upstream_error=upstream)
    terminal = RunResult(
        success=not result.is_error,
        output=output,
        duration_ms=elapsed_ms,
        output_truncated=truncated,
        cost_usd=result.cost_usd,
        num_turns=result.num_turns,
        usage=result.usage,
        claude_session_id=result.session_id,
        model=result.model or agent_model,
        upstream_error=upstream if result.is_error else None,
    )
    return TurnOutcome(
        terminal, agent_usable=True, upstream_error=upstream, cost_usd=result.cost_usd
    )


async def _stop_turn(agent: Agent, grace: float) -> bool:
    """Interrupt the running turn; kill the agent if it does not stop within the grace."""
    if await agent.interrupt(grace):
        return True
    await agent.close(grace=0)
    return False
