"""The HTTP side of a job: submit it to the dispatcher and follow its reply.

:func:`open_job` owns the receive end of the job's reply channel for the life of
one HTTP request. If the request ends before the job's terminal event (the
client disconnected, or the backstop fired), it withdraws the job from the
queue and sets the job's cancellation, which a running turn watches: the agent
is interrupted at once, even in the middle of a silent model call.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from ..messages import (
    DEFAULT_OPTIONS,
    TERMINAL_EVENTS,
    CancelRun,
    CloseSession,
    DispatcherMessage,
    Image,
    Job,
    JobFailed,
    JobStarted,
    PoolSnapshot,
    ReplyEvent,
    RunOptions,
    RunResult,
    SessionDeleted,
    SessionKey,
    StatusRequest,
    Submit,
    Withdraw,
)

# Cancellation.reason when the request ends before its answer (the client left).
CLIENT_GONE = "client gone"
# Events a slow reader may fall behind by before the agent waits for it.
REPLY_BUFFER = 64
# How long past its deadline a request waits for the job's own timeout reply.
BACKSTOP_S = 30.0


@asynccontextmanager
async def open_job(
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    *,
    user_id: str,
    prompt: str,
    timeout_s: float,
    session_id: str | None = None,
    memory: str | None = None,
    options: RunOptions = DEFAULT_OPTIONS,
    images: tuple[Image, ...] = (),
) -> AsyncIterator[tuple[Job, trio.MemoryReceiveChannel[ReplyEvent]]]:
    """Submit a job; yield it and the channel its :data:`ReplyEvent` s arrive on.

    ``memory``: the user's CLAUDE.md, for a one-shot job (see :attr:`Job.memory`).
    The first event is the dispatcher's answer: :class:`Queued`, or a refusal.
    """
    reply_send, reply_receive = trio.open_memory_channel[ReplyEvent](REPLY_BUFFER)
    now = trio.current_time()
    job = Job(
        id=uuid.uuid4().hex,
        user_id=user_id,
        prompt=prompt,
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
        session_id=session_id,
        memory=memory,
        options=options,
        images=images,
    )
    async with reply_receive:
        try:
            await dispatcher.send(Submit(job))
            yield job, reply_receive
        finally:
            # The request is over. If the job is still running, its agent is
            # interrupted at once (the client left); harmless once it has answered.
            job.cancellation.cancel(CLIENT_GONE)
            # Needed when the client left mid-queue. A job whose reply is closed has been
            # answered (or withdrawn): nobody holds it any more, so no message is due.
            if reply_receive.statistics().open_send_channels:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await dispatcher.send(Withdraw(job.id))


async def run_job(
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    *,
    user_id: str,
    prompt: str,
    timeout_s: float,
    session_id: str | None = None,
    memory: str | None = None,
) -> RunResult | JobFailed:
    """Submit a job and wait for its terminal event."""
    async with open_job(
        dispatcher,
        user_id=user_id,
        prompt=prompt,
        timeout_s=timeout_s,
        session_id=session_id,
        memory=memory,
    ) as (job, events):
        return (await follow_job(job, events)).terminal


@attrs.frozen
class Finished:
    """How a job ended for its request: the terminal event, and when it started.

    ``started_at``: when (trio time) a worker or session actor took it (None: never).
    """

    terminal: RunResult | JobFailed
    started_at: float | None = None

    def queued_ms(self, job: Job) -> int:
        """How long ``job`` waited for an agent (all of its time, if it never got one)."""
        until = self.started_at
        if until is None:
            duration = getattr(self.terminal, "duration_ms", None)
            return duration if duration is not None else 0
        return max(0, round((until - job.submitted_at) * 1000))


NO_ANSWER = JobFailed(502, "the agent stopped without answering")
OUTLIVED = JobFailed(504, "the job outlived its deadline without an answer")


async def follow_job(job: Job, events: trio.MemoryReceiveChannel[ReplyEvent]) -> Finished:
    """Read ``job``'s events up to its terminal one (bounded by its deadline and a backstop)."""
    started_at = None
    with trio.move_on_at(job.deadline + BACKSTOP_S):
        async for event in events:
            if isinstance(event, JobStarted):
                started_at = event.at
            elif isinstance(event, TERMINAL_EVENTS):
                return Finished(event, started_at)
        return Finished(NO_ANSWER, started_at)
    return Finished(OUTLIVED, started_at)


async def pool_snapshot(
    dispatcher: trio.MemorySendChannel[DispatcherMessage], user_id: str | None = None
) -> PoolSnapshot:
    """The dispatcher's view; with ``user_id``, that user's runs too."""
    reply_send, reply_receive = trio.open_memory_channel[PoolSnapshot](1)
    async with reply_receive:
        await dispatcher.send(StatusRequest(reply_send, user_id))
        return await reply_receive.receive()


async def cancel_run(
    dispatcher: trio.MemorySendChannel[DispatcherMessage], user_id: str, run_id: str
) -> bool:
    """Cancel ``user_id``'s queued or running run ``run_id``; False if there is no such run."""
    ack_send, ack_receive = trio.open_memory_channel[bool](1)
    async with ack_receive:
        await dispatcher.send(CancelRun(user_id, run_id, ack_send))
        try:
            return await ack_receive.receive()
        except trio.EndOfChannel:  # the dispatcher restarted meanwhile
            return False


class SessionStoreUnavailable(Exception):
    pass


async def close_session(
    dispatcher: trio.MemorySendChannel[DispatcherMessage], key: SessionKey
) -> bool:
    """End a session's actor (interrupting a running turn) and delete its record.

    Returns False if no such session existed. Raises :class:`SessionStoreUnavailable`
    if the registry could not delete it.
    """
    ack_send, ack_receive = trio.open_memory_channel[bool](1)
    deleted_send, deleted_receive = trio.open_memory_channel[SessionDeleted](1)
    async with ack_receive, deleted_receive:
        await dispatcher.send(CloseSession(key, ack_send, deleted_send))
        known = await ack_receive.receive()
        deleted = await deleted_receive.receive()
    if not isinstance(deleted, bool):
        raise SessionStoreUnavailable(str(getattr(deleted, "error", deleted)))
    return known or deleted
