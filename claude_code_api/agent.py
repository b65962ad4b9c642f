"""One Claude Code process, driven through claude-agent-sdk.

This is the only module that touches the SDK. An :class:`Agent` owns one
``ClaudeSDKClient`` and so one CLI process: it starts it with a deadline of its
own, runs one turn at a time, interrupts, and closes it — killing the process
outright when it does not go quietly.

Error handling: everything the SDK or the process can do wrong surfaces as
:class:`AgentError` (or :class:`AgentStartError` at start-up) with a one-line
reason fit for a client to read; ``trio.Cancelled`` is never swallowed.

Resource handling: :meth:`Agent.close` always leaves no process behind; it is
shielded and bounded, so it is safe in ``finally`` blocks of cancelled tasks.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLIConnectionError,
    CLIJSONDecodeError,
    ProcessError,
    ResultMessage,
    TextBlock,
    ToolUseBlock,
)

from .config import Settings
from .messages import AssistantText, ToolUse

log = logging.getLogger(__name__)

# Claude Code's own system prompt. The SDK's default (None) sends an EMPTY one.
CLAUDE_CODE_SYSTEM_PROMPT = {"type": "preset", "preset": "claude_code"}
STDERR_LINES_KEPT = 20
# Bounded time for a closing process to exit after stdin EOF before it is killed.
CLOSE_GRACE_S = 5.0


class AgentError(Exception):
    """The agent process failed: it died, spoke garbage or broke the protocol."""


class AgentStartError(AgentError):
    """The agent process did not start, or did not answer ``initialize`` in time."""


def agent_options(
    settings: Settings,
    *,
    cwd: Path,
    session_id: str | None = None,
    resume: str | None = None,
    stderr: Callable[[str], None] | None = None,
) -> ClaudeAgentOptions:
    """The SDK options every agent process of this service gets.

    Like the original service: bypassPermissions, Claude Code's default system
    prompt, the configured model, and no ``ANTHROPIC_API_KEY`` unless
    ``USE_CLAUDE_API_KEY`` is set (so the CLI uses its OAuth login).
    """
    env = {
        "CLAUDE_CODE_SKIP_BYPASS_PERMISSIONS_WARNING": "1",
        "DISABLE_INSTALLATION_CHECKS": "1",
    }
    if not settings.use_claude_api_key:
        # The SDK merges os.environ under options.env, so blank the key out.
        env["ANTHROPIC_API_KEY"] = ""
    return ClaudeAgentOptions(
        cli_path=settings.claude_executable,
        model=settings.model,
        permission_mode="bypassPermissions",
        system_prompt=CLAUDE_CODE_SYSTEM_PROMPT,
        cwd=str(cwd),
        env=env,
        session_id=session_id,
        resume=resume,
        stderr=stderr,
    )


def describe_failure(exc: BaseException, stderr_tail: str = "") -> str:
    """A one-line, client-safe reason for an SDK or process failure."""
    if isinstance(exc, ProcessError) and exc.exit_code is not None:
        reason = f"agent process exited with code {exc.exit_code}"
    elif isinstance(exc, CLIJSONDecodeError):
        reason = "agent process wrote malformed JSON"
    elif isinstance(exc, CLIConnectionError):
        reason = f"agent process connection failed: {str(exc).splitlines()[0]}"
    else:
        first_line = (str(exc).splitlines() or [""])[0]
        reason = f"agent failed: {type(exc).__name__}: {first_line}".rstrip(": ")
    if stderr_tail:
        reason += f" ({stderr_tail})"
    return reason


OnEvent = Callable[[AssistantText | ToolUse], Awaitable[None]]


class Agent:
    """Owns one ``ClaudeSDKClient`` and the CLI process behind it.

    Use: ``await start()``, then ``run_turn()`` one at a time, and always
    ``close()`` (idempotent). After an :class:`AgentError` the agent is broken:
    close it and start another.
    """

    def __init__(self, options: ClaudeAgentOptions) -> None:
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        user_stderr = options.stderr

        def keep_stderr(line: str) -> None:
            self._stderr_tail.append(line.rstrip()[:500])
            if user_stderr is not None:
                user_stderr(line)

        # Always drain stderr (an undrained pipe can block the child), keeping a bounded tail.
        options.stderr = keep_stderr
        self._client = ClaudeSDKClient(options)
        self._closed = False

    @property
    def pid(self) -> int | None:
        process = self._process()
        return None if process is None else process.pid

    @property
    def exited(self) -> bool:
        process = self._process()
        return process is None or process.returncode is not None

    async def wait_exited(self) -> None:
        """Return when the process has exited (at once if there is none)."""
        process = self._process()
        if process is not None:
            await process.wait()

    def stderr_tail(self, lines: int = 2) -> str:
        return " | ".join(list(self._stderr_tail)[-lines:])

    async def start(self, timeout: float) -> None:
        """Start the CLI and complete the SDK's initialize handshake within ``timeout`` s."""
        try:
            with trio.fail_after(timeout):
                await self._client.connect()
        except trio.TooSlowError:
            await self.close(grace=0)
            raise AgentStartError(
                f"agent process did not answer initialize within {timeout:g}s"
            ) from None
        except Exception as exc:
            await self.close(grace=0)
            raise AgentStartError(describe_failure(exc, self.stderr_tail())) from exc
        except BaseException:  # cancelled mid-start: leave no process behind
            await self.close(grace=0)
            raise

    async def run_turn(self, prompt: str, on_event: OnEvent) -> ResultMessage:
        """Send ``prompt`` and relay the turn's text and tool calls to ``on_event``.

        Returns the turn's ``ResultMessage``. Raises :class:`AgentError` if the
        process fails; exceptions raised by ``on_event`` (a client gone away)
        propagate unchanged, leaving the turn running: interrupt or close next.
        """
        try:
            await self._client.query(prompt)
            async for message in self._client.receive_response():
                if isinstance(message, ResultMessage):
                    return message
                if isinstance(message, AssistantMessage):
                    for block in message.content:
                        if isinstance(block, TextBlock):
                            await on_event(AssistantText(block.text))
                        elif isinstance(block, ToolUseBlock):
                            await on_event(ToolUse(block.name, dict(block.input)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:
            # Give the SDK's stderr reader a moment to collect the dying words.
            await trio.sleep(0.01)
            raise AgentError(describe_failure(exc, self.stderr_tail())) from exc
        raise AgentError("agent process ended the turn without a result")

    async def interrupt(self, grace: float) -> bool:
        """Interrupt the running turn and drain it to its result within ``grace`` s.

        Returns True when the agent is idle again and can take another turn;
        False when it did not stop in time (close it then).
        """
        with trio.move_on_after(grace):
            try:
                await self._client.interrupt()
                async for message in self._client.receive_response():
                    if isinstance(message, ResultMessage):
                        return True
            except Exception as exc:
                log.info("interrupt failed: %s", describe_failure(exc))
                return False
        return False

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Stop the process: EOF on stdin, up to ``grace`` s to exit, then SIGKILL.

        Shielded and bounded, so it finishes even in a cancelled task, and it
        always reaps the child (no zombie).
        """
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            process = self._process()
            if process is not None and grace > 0:
                with trio.move_on_after(grace):
                    # EOF lets a healthy CLI flush its transcript and exit 0.
                    await self._close_stdin()
                    await process.wait()
            if process is not None and process.returncode is None:
                try:
                    process.kill()
                except ProcessLookupError:
                    pass
            with trio.move_on_after(CLOSE_GRACE_S):
                try:
                    await self._client.disconnect()
                except Exception as exc:  # the process is dead; this is tidying up
                    log.debug("disconnect after close: %r", exc)
            if process is not None and process.returncode is None:
                with trio.move_on_after(CLOSE_GRACE_S):
                    await process.wait()

    # The SDK keeps the process on its transport; we reach for it only to kill
    # quickly (its own close() waits up to 10 s before SIGKILL) and to know the pid.
    def _process(self) -> Any:
        transport = getattr(self._client, "_transport", None)
        return getattr(transport, "_process", None)

    async def _close_stdin(self) -> None:
        transport = getattr(self._client, "_transport", None)
        end_input = getattr(transport, "end_input", None)
        if end_input is not None:
            try:
                await end_input()
            except Exception as exc:
                log.debug("end_input: %r", exc)
