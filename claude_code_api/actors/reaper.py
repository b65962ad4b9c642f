"""Reaper actor: agents die with the service, however the service dies.

An agent whose service was killed (``kill -9``, an OOM kill) would live on under
init — a hung turn's CLI forever, and after a restart a session could have two
processes. The parent-death signal cannot help: trio spawns children from a
worker thread, and the signal fires when that *thread* ends. So the service
runs one tiny watchdog process (:mod:`claude_code_api.agent.reaper_process`) with a pipe
on its stdin and tells it the process group of every agent it starts and
closes; when the pipe closes, the watchdog kills every group still listed.

Channels: the inbox (``MemorySendChannel[ReaperMessage]``) belongs to the tree;
agents reach it through a :class:`ReaperClient`, which never blocks.

Error handling: if the watchdog process dies, it is started again and told the
groups again; the actor itself only ends when cancelled or its inbox closes.
Closing the inbox (a graceful stop) closes the pipe: the watchdog then finds no
group left to kill and exits.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import attrs
import trio

from ..agent import reaper_process as agent_reaper

log = logging.getLogger(__name__)

# Agent starts and closes that may be waiting for the watchdog; never reached in practice.
REAPER_INBOX_SIZE = 4096


@attrs.frozen
class TrackAgent:
    pgid: int


@attrs.frozen
class ForgetAgent:
    pgid: int


ReaperMessage = TrackAgent | ForgetAgent


class ReaperClient:
    """The agents' side: ``track`` a started agent's process group, ``forget`` a closed one."""

    def __init__(self, inbox: trio.MemorySendChannel[ReaperMessage]) -> None:
        self._inbox = inbox

    def track(self, pgid: int) -> None:
        self._send(TrackAgent(pgid))

    def forget(self, pgid: int) -> None:
        self._send(ForgetAgent(pgid))

    def _send(self, message: ReaperMessage) -> None:
        try:
            self._inbox.send_nowait(message)
        except trio.WouldBlock:
            log.error("reaper: inbox full; %r not recorded", message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # shutting down: the agent is being closed anyway


async def _open_watchdog() -> trio.Process:
    script = Path(agent_reaper.__file__)
    # No environment: once it execs, the watchdog is dumpable again (the service is not:
    # model.keep_memory_private), and its /proc/<pid>/environ is readable by every process of
    # its uid, unsandboxed agents included. The service's would hand them the model API's key.
    return await trio.lowlevel.open_process(
        [sys.executable, "-I", "-S", str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={},
    )


async def serve_reaper(
    inbox: trio.MemoryReceiveChannel[ReaperMessage],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the watchdog running and told; see the module docstring."""
    groups: set[int] = set()
    process = await _open_watchdog()
    task_status.started()
    try:
        async for message in inbox:
            if isinstance(message, TrackAgent):
                groups.add(message.pgid)
                line = f"+ {message.pgid}\n"
            else:
                groups.discard(message.pgid)
                line = f"- {message.pgid}\n"
            try:
                assert process.stdin is not None
                await process.stdin.send_all(line.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("reaper: the watchdog exited (%s); starting it again", process.poll())
                with trio.CancelScope(shield=True):
                    await process.wait()
                process = await _open_watchdog()
                assert process.stdin is not None
                await process.stdin.send_all("".join(f"+ {g}\n" for g in groups).encode())
    finally:
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(5):
                await process.wait()
