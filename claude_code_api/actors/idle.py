"""The idle wait of an actor that holds an agent: the next command, or a reason to stop waiting.

Workers and session actors wait the same way between jobs: for the dispatcher's next
command, unless their idle agent exits, its credentials go stale
(:mod:`claude_code_api.auth.renewal`), a deadline passes or a stop is requested first.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ..messages import Job, JobFailed
from .stopping import StopSignal

SHUTTING_DOWN = JobFailed(503, "service is shutting down")

Command = TypeVar("Command")


async def next_command(
    inbox: trio.MemoryReceiveChannel[Command],
    stop: StopSignal,
    *ends: Callable[[], Awaitable[object]],
    until: float = math.inf,
) -> Command | None:
    """The next command on ``inbox``; None when any of ``ends`` returns first, at ``until``,
    when ``inbox`` is closed, or when a stop is requested.

    A command sent at the very moment the wait ended is still returned (it must not be
    lost), except on a stop: then a :class:`Job` is answered 503 and None returned.
    Each end runs in a task of its own for this wait only: waiting for an agent's exit
    must not outlive the idle time.
    """
    command: Command | None = None
    async with trio.open_nursery() as nursery:

        async def end_wait(end: Callable[[], Awaitable[object]]) -> None:
            await end()
            nursery.cancel_scope.cancel()

        for end in ends:
            nursery.start_soon(end_wait, end)
        with stop.guard(), trio.move_on_at(until):
            try:
                command = await inbox.receive()
            except trio.EndOfChannel:
                pass
        nursery.cancel_scope.cancel()
    if command is None:
        try:
            command = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None
    if stop.requested:
        if isinstance(command, Job):
            command.answer(SHUTTING_DOWN)
        return None
    return command
