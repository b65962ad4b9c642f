"""Session actor: one live multi-turn conversation.

It owns one :class:`Agent` (a Claude Code process) running in the user's
workspace with the session's own Claude session UUID: ``--session-id`` while the
conversation is new, ``--resume`` once its transcript exists — so after a crash,
a hibernation or a service restart the conversation continues from Claude Code's
own transcript. It runs one turn at a time, as the dispatcher hands them over,
and saves the record (turns, cost, last activity) to the registry after each.

Channels: it owns the receive end of its inbox (offered to the dispatcher in
:class:`SessionStarted`), sends on its own clone of the dispatcher's inbox, and
owns ``job.reply`` while running a job.

Error handling: a turn whose agent dies is answered 502 and the process is
started again (with ``--resume``) before the next turn. A timed-out turn is
interrupted and drained before the next starts, so the next turn answers its own
prompt. An agent that cannot start raises: the session supervisor reports it
and the dispatcher fails the turns that were waiting for it.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from ..agent import Agent, AgentStartError, agent_options
from ..config import Settings
from ..messages import (
    CloseSessionNow,
    Hibernate,
    Job,
    SessionIdle,
    SessionKey,
    SessionStarted,
)
from .registry import RegistryClient, SessionRecord, new_session_record, user_workspace
from .stopping import StopSignal
from .turn import TurnOutcome, run_turn_for_job

log = logging.getLogger(__name__)

# Room for the one job the dispatcher hands over plus a Hibernate or a close.
SESSION_INBOX_SIZE = 4
NO_TRANSCRIPT = "No conversation found"
TRANSCRIPT_EXISTS = "already in use"


async def serve_session(
    key: SessionKey,
    settings: Settings,
    dispatcher: trio.MemorySendChannel,
    registry: RegistryClient,
    stop: StopSignal,
) -> None:
    """Run the session ``key`` until hibernated, closed or stopped; see the module docstring.

    A stop request (service shutdown) interrupts a running turn, which is still
    answered, and keeps the record: the conversation resumes after the restart.
    """
    record = await registry.load(key)
    if record is None:
        record = new_session_record(key, time.time())
        await registry.save(record)
    workspace = user_workspace(settings.data_dir, key.user_id)
    workspace.mkdir(parents=True, exist_ok=True)
    inbox_send, inbox = trio.open_memory_channel[object](SESSION_INBOX_SIZE)
    agent: Agent | None = None
    finished_ok: bool | None = None
    async with dispatcher, inbox:
        await dispatcher.send(SessionStarted(key, inbox_send))
        try:
            while not stop.requested:
                if agent is None:
                    with stop.guard():
                        agent = await _start_agent(record, settings, workspace)
                    if agent is None:
                        return
                await dispatcher.send(SessionIdle(key, finished_ok))
                message = None
                with stop.guard():
                    message = await inbox.receive()
                if message is None or isinstance(message, Hibernate | CloseSessionNow):
                    return
                if not record.transcript_started:
                    # From now on the CLI may have a transcript: later starts must resume.
                    record = attrs.evolve(record, transcript_started=True)
                    await registry.save(record)
                outcome, closed = await _run_turn(agent, message, inbox, key, settings, stop)
                record = attrs.evolve(
                    record,
                    turns=record.turns + 1,
                    last_activity=time.time(),
                    total_cost_usd=record.total_cost_usd + (outcome.cost_usd or 0.0),
                )
                await registry.save(record)
                if closed:
                    return
                if not outcome.agent_usable:
                    await agent.close(grace=0)
                    agent = None
                finished_ok = outcome.ok
        finally:
            if agent is not None:
                # EOF first: the CLI flushes its transcript before it exits.
                await agent.close()


async def _run_turn(
    agent: Agent,
    job: Job,
    inbox: trio.MemoryReceiveChannel,
    key: SessionKey,
    settings: Settings,
    stop: StopSignal,
) -> tuple[TurnOutcome, bool]:
    """Run one turn while listening for a close; returns the outcome and whether closed."""
    turn_scope = trio.CancelScope()
    closed = False

    async def stop_on_close() -> None:
        nonlocal closed
        message = await inbox.receive()
        if isinstance(message, CloseSessionNow):
            closed = True
            turn_scope.cancel()
        else:
            log.error("session %s: unexpected %r during a turn", key, message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_close)
        with stop.guard(turn_scope):
            outcome = await run_turn_for_job(
                agent, job, f"session:{key.session_id}", settings, turn_scope=turn_scope
            )
        nursery.cancel_scope.cancel()
    return outcome, closed


async def _start_agent(record: SessionRecord, settings: Settings, workspace) -> Agent:
    """Start the session's agent: resume its transcript if it has one, else begin it.

    Our record can be wrong about the transcript (a crash between saving the
    record and the CLI writing, or the reverse); the CLI says which in its error,
    so try the other way once.
    """
    resume = record.transcript_started
    for attempt in range(2):
        agent = Agent(
            agent_options(
                settings,
                cwd=workspace,
                session_id=None if resume else record.claude_session_id,
                resume=record.claude_session_id if resume else None,
            )
        )
        try:
            await agent.start(settings.warmup_timeout_s)
            return agent
        except AgentStartError as exc:
            wrong_guess = NO_TRANSCRIPT in str(exc) if resume else TRANSCRIPT_EXISTS in str(exc)
            if attempt or not wrong_guess:
                raise
            log.info("session %s: %s; retrying with resume=%s", record.key, exc, not resume)
            resume = not resume
    raise AssertionError("unreachable")
