"""The real agent: one Claude Code process driven through claude-agent-sdk.

This is the only module that drives the SDK (with
:mod:`claude_code_api.agent.sdk_workarounds`, which reads what the SDK drops from a
message, on the pinned SDK version only). :class:`SdkAgent` implements
:class:`~claude_code_api.agent.protocol.Agent`: it owns one ``ClaudeSDKClient`` and so one
CLI process, started through the launcher :mod:`claude_code_api.agent.sandbox` writes
for it (own process group, the sandbox, an allowlisted environment). A pool
agent's start ends with its warm-up turn (:mod:`claude_code_api.agent.warm_up`).

Error handling: everything the SDK or the process can do wrong surfaces as
:class:`AgentError` / :class:`AgentStartError` with a one-line reason fit for a
client to read; the CLI refusing to run as root is recognised and named with
its fix. ``trio.Cancelled`` is never swallowed.

Resource handling: :meth:`SdkAgent.close` always leaves no process behind — the
CLI and every tool it started (its process group, or its sandbox's pid
namespace) are killed if they do not exit on EOF — and removes the launcher
(and an ephemeral agent's home). It is shielded and bounded.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import attrs
import trio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLIConnectionError,
    CLIJSONDecodeError,
    Message,
    ProcessError,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from ..actors.reaper import ReaperClient
from ..messages import (
    DEFAULT_OPTIONS,
    DEFAULT_PERMISSION_MODE,
    AssistantText,
    Image,
    ToolResult,
    ToolUse,
    UpstreamRetry,
)
from ..proxy.model import Grant, ModelProxy
from ..store.user_memory import memory_reminder
from .cgroups import AgentCgroup
from .protocol import (
    CLOSE_GRACE_S,
    ROOT_REFUSAL,
    ROOT_REFUSAL_MARK,
    AgentError,
    AgentSpec,
    AgentStartError,
    Charge,
    OnEvent,
    TurnResult,
)
from .sandbox import AgentLauncher
from .sdk_workarounds import cost_since_last_result, receive_messages_with_raw
from .warm_up import PROMPT as WARM_UP_PROMPT

log = logging.getLogger(__name__)

# Claude Code's own system prompt. The SDK's default (None) sends an EMPTY one.
CLAUDE_CODE_SYSTEM_PROMPT: Any = {"type": "preset", "preset": "claude_code"}
STDERR_LINES_KEPT = 20
# Starting through a launcher written a moment before may meet ETXTBSY (SdkAgent._connect).
LAUNCH_ATTEMPTS = 5
LAUNCH_RETRY_S = 0.01
# Claude Code's own command that starts a new, empty conversation (no model call).
CLEAR_COMMAND = "/clear"
# The SDK's default stdout line limit is 1 MiB; a reply of MAX_OUTPUT_CHARS characters,
# JSON-escaped (up to 6 bytes a character), must fit in one line.
MIN_BUFFER_BYTES = 1024 * 1024


# Tools that let an agent reach other agents or start turns nobody asked for: a
# service reads the next result as the answer to its next prompt.
DISALLOWED_TOOLS = [
    "SendMessage",
    "ListAgents",
    "ScheduleWakeup",
    "CronCreate",
    "CronDelete",
    "CronList",
]


def stdout_buffer_bytes(max_output_chars: int) -> int:
    return max(MIN_BUFFER_BYTES, 6 * max_output_chars + 64 * 1024)


def describe_failure(exc: BaseException, stderr_tail: str = "") -> str:
    """A one-line, client-safe reason for an SDK or process failure."""
    if ROOT_REFUSAL_MARK in stderr_tail or ROOT_REFUSAL_MARK in str(exc):
        return ROOT_REFUSAL
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


def upstream_retry(data: dict[str, Any]) -> UpstreamRetry:
    """An ``api_retry`` system message as an event (the CLI will retry the model call)."""
    status = data.get("error_status")
    if not isinstance(status, int):
        status = None
    error = data.get("error")
    if isinstance(error, dict):
        error = error.get("message") or error.get("type")
    message = " ".join(str(error or "model API call failed").split())[:500]
    attempt = data.get("attempt")
    max_retries = data.get("max_retries")
    return UpstreamRetry(
        status=status,
        message=message,
        attempt=attempt if isinstance(attempt, int) else 0,
        max_retries=max_retries if isinstance(max_retries, int) else None,
    )


@attrs.frozen
class AgentOptions:
    """The settings every agent of this service shares."""

    model: str
    max_output_chars: int
    # AGENT_WARM_UP_TURN: a pool agent runs its warm-up turn before it is offered (warm_up.py).
    warm_up_turn: bool = False


class SdkAgent:
    """One Claude Code process; see the module docstring and :class:`~claude_code_api.agent.protocol.Agent`."""

    def __init__(
        self,
        spec: AgentSpec,
        launcher: AgentLauncher,
        options: AgentOptions,
        reaper: ReaperClient | None = None,
        refusal: str | None = None,
        model_proxy: ModelProxy | None = None,
    ) -> None:
        self.spec = spec
        self._launcher = launcher
        # The model proxy this agent reaches the model API through, its grant there (from
        # its start until it closes) and the variables naming both (model_proxy.model_env).
        self._model_proxy = model_proxy if launcher.proxied else None
        self._grant: Grant | None = None
        self._model_env: dict[str, str] = {}
        self._options = options
        self._reaper = reaper
        self._refusal = refusal  # known before trying: the start fails with it
        self._id = uuid.uuid4().hex[:12]
        self._launcher_path: Any = None
        self._cgroup: AgentCgroup | None = None  # its memory and process limits (agent_limits)
        self._client: ClaudeSDKClient | None = None
        self._pgid: int | None = None
        self._session_id: str | None = spec.resume or spec.session_id
        self._model = spec.options.model or options.model
        self._permission_mode = spec.options.permission_mode or DEFAULT_PERMISSION_MODE
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._closed = False
        # A prompt may have been sent and its result not read yet: there is a turn to interrupt.
        self._turn_open = False
        self._messages: AsyncGenerator[tuple[Message, dict[str, Any]], None] | None = None
        # The conversation's running cost as the CLI reported it last (see _own_cost); a
        # resumed conversation's is not known before its first result.
        self._reported_total: float | None = None if spec.resume else 0.0

    @property
    def pid(self) -> int | None:
        process = self._process()
        return None if process is None else process.pid

    @property
    def exited(self) -> bool:
        process = self._process()
        return process is None or process.returncode is not None

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def model(self) -> str | None:
        return self._model

    async def wait_exited(self) -> None:
        process = self._process()
        if process is not None:
            await process.wait()

    def stderr_tail(self, lines: int = 2) -> str:
        return " | ".join(list(self._stderr_tail)[-lines:])

    def _keep_stderr(self, line: str) -> None:
        # Always drained (an undrained pipe can block the child), keeping a bounded tail.
        self._stderr_tail.append(line.rstrip()[:500])

    def _sdk_options(self) -> ClaudeAgentOptions:
        spec = self.spec
        requested = spec.options
        extra_args: dict[str, str | None] = {}
        if spec.ephemeral:  # a one-shot's conversation is never resumed: keep no transcript
            extra_args["no-session-persistence"] = None
        system_prompt: Any = CLAUDE_CODE_SYSTEM_PROMPT
        if requested.system_prompt is not None:
            system_prompt = {**CLAUDE_CODE_SYSTEM_PROMPT, "append": requested.system_prompt}
        return ClaudeAgentOptions(
            cli_path=self._launcher_path,
            model=self._model,
            permission_mode=cast(Any, self._permission_mode),
            system_prompt=system_prompt,
            cwd=str(spec.cwd),
            env={**self._launcher.environment(spec), **self._model_env},
            session_id=spec.session_id,
            resume=spec.resume,
            allowed_tools=list(requested.allowed_tools or ()),
            # A request adds to the service's own list; it can never lift it.
            disallowed_tools=DISALLOWED_TOOLS
            + [t for t in requested.disallowed_tools or () if t not in DISALLOWED_TOOLS],
            max_turns=requested.max_turns,
            max_budget_usd=requested.max_budget_usd,
            extra_args=extra_args,
            max_buffer_size=stdout_buffer_bytes(self._options.max_output_chars),
            stderr=self._keep_stderr,
        )

    async def start(self, timeout: float) -> None:
        if self._refusal is not None:
            self._closed = True
            raise AgentStartError(self._refusal)
        if self._model_proxy is not None:
            token, self._grant = self._model_proxy.grants.register(f"{self.spec.name} ({self._id})")
            in_netns = self._launcher.own_network is not None  # (then bridged in)
            self._model_env = self._model_proxy.env(token, in_netns=in_netns)
        try:
            with trio.fail_after(timeout):
                try:
                    self._launcher_path = await trio.to_thread.run_sync(
                        self._launcher.prepare, self.spec, self._id
                    )
                    self._cgroup = self._launcher.cgroup(self._launcher_path)
                except OSError as exc:
                    raise AgentStartError(
                        f"cannot prepare the agent's directory {self.spec.home}: "
                        f"{exc.strerror or exc}"
                    ) from exc
                await self._connect()
                self._track_group()
                await self._warm_up()
        except trio.TooSlowError:
            await self.close(grace=0)
            raise AgentStartError(
                f"agent process did not answer initialize within {timeout:g}s"
            ) from None
        except AgentStartError:
            await self.close(grace=0)
            raise
        except Exception as exc:
            await trio.sleep(0.01)  # let the stderr reader collect the dying words
            reason = self._describe_failure(exc)
            await self.close(grace=0)
            raise AgentStartError(reason) from exc
        except BaseException:  # cancelled mid-start: leave no process behind
            await self.close(grace=0)
            raise

    async def _connect(self) -> None:
        """Start the CLI through its launcher and wait for ``initialize``'s answer.

        The launcher was just written: while another thread forks (another agent
        starting), the child holds a copy of its write descriptor until it execs,
        and executing the launcher then fails with ETXTBSY ("Text file busy"). That
        lasts microseconds: retried, a few times, after a pause.
        """
        for attempt in range(LAUNCH_ATTEMPTS):
            self._client = ClaudeSDKClient(self._sdk_options())
            try:
                await self._client.connect()
                return
            except Exception as exc:
                if attempt + 1 == LAUNCH_ATTEMPTS or not _text_file_busy(exc):
                    raise
            client, self._client = self._client, None
            with trio.move_on_after(CLOSE_GRACE_S):
                await client.disconnect()
            log.info("%s: launcher busy (ETXTBSY); starting again", self.spec.name)
            await trio.sleep(LAUNCH_RETRY_S * (attempt + 1))

    async def _warm_up(self) -> None:
        """Run the warm-up turn (warm_up.py), on a pool agent only; its exchange stays.

        Only an ephemeral agent with the service's own options (a pool worker's, made
        before anyone asks for it), and only through the model proxy, which answers the
        turn itself while the grant says ``warming``. A turn that fails raises
        AgentError: the agent does not start.
        """
        grant = self._grant
        spec = self.spec
        if grant is None or not self._options.warm_up_turn:
            return
        if not spec.ephemeral or spec.options != DEFAULT_OPTIONS:
            return
        grant.warming = True
        try:
            result = await self.run_turn(WARM_UP_PROMPT, _ignore)
            if result.is_error:
                raise AgentError(f"agent failed its warm-up turn: {result.text}")
        finally:
            grant.warming = False

    def _track_group(self) -> None:
        """Remember the agent's process group (the launcher made one) and tell the reaper."""
        pid = self.pid
        if pid is None:
            return
        try:
            if os.getpgid(pid) != pid:
                return  # no setsid here: only the process itself can be killed
        except ProcessLookupError:
            return
        self._pgid = pid
        if self._reaper is not None:
            self._reaper.track(pid)

    def _note_session_id(self, session_id: object) -> None:
        if isinstance(session_id, str) and session_id:
            self._session_id = session_id

    async def run_turn(
        self,
        prompt: str,
        on_event: OnEvent,
        *,
        memory: str | None = None,
        images: tuple[Image, ...] = (),
        charge: Charge | None = None,
    ) -> TurnResult:
        client = self._connected()
        model: str | None = None
        if charge is not None and self._grant is not None:
            self._grant.charge = charge
        try:
            self._turn_open = True
            if memory or images:
                context = memory_reminder(memory) if memory else None
                await client.query(_user_message(prompt, context, images))
            else:
                await client.query(prompt)
            while True:
                message, data = await self._next_message(client)
                self._check_memory()
                if isinstance(message, ResultMessage):
                    self._turn_open = False
                    self._note_session_id(message.session_id)
                    return _turn_result(message, model, self._own_cost(message, data))
                if isinstance(message, AssistantMessage):
                    self._note_session_id(message.session_id)
                    model = message.model or model
                    for block in message.content:
                        if isinstance(block, TextBlock):
                            await on_event(AssistantText(block.text))
                        elif isinstance(block, ToolUseBlock):
                            await on_event(ToolUse(block.name, dict(block.input)))
                elif isinstance(message, UserMessage) and isinstance(message.content, list):
                    for block in message.content:
                        if isinstance(block, ToolResultBlock):
                            await on_event(ToolResult(ok=not block.is_error))
                elif isinstance(message, SystemMessage):
                    self._note_session_id(message.data.get("session_id"))
                    if message.subtype == "api_retry":
                        await on_event(upstream_retry(message.data))
        except Exception as exc:
            await trio.sleep(0.01)  # let the stderr reader collect the dying words
            raise AgentError(self._describe_failure(exc)) from exc

    def _check_memory(self) -> None:
        """Kill the agent if the OOM killer struck in its cgroup; AgentError naming the limit.

        cgroup v2 kills the whole agent itself (``memory.oom.group``); v1 kills one
        process (a tool, or the CLI), and the agent may then go on: after every message
        (a tool's result among them), it is killed here.
        """
        if self._cgroup is not None and self._cgroup.oom_killed():
            self._kill(self._process())
            raise AgentError(self._launcher.limits.memory_exceeded())

    def _describe_failure(self, exc: BaseException) -> str:
        """:func:`describe_failure`, naming the limit the agent ran into, if one."""
        if self._cgroup is not None and self._cgroup.oom_killed():
            return self._launcher.limits.memory_exceeded()
        reason = describe_failure(exc, self.stderr_tail())
        if self._cgroup is not None and self._cgroup.procs_refused():
            # (A CLI that cannot start a thread aborts: "exited with code 134".)
            reason += f" ({self._launcher.limits.procs_reached()})"
        return reason

    async def _next_message(self, client: ClaudeSDKClient) -> tuple[Message, dict[str, Any]]:
        """The agent's next message and the CLI's JSON of it, from one iterator kept across turns.

        Why not ``receive_response()`` per turn: each turn would leave three nested
        async generators suspended after the ``ResultMessage``, and trio closes each
        abandoned one in a task it starts for it. Raises :class:`AgentError` when the
        messages end (the process is gone); any exception, a cancel included, ends
        the iterator, and the next call starts another.
        """
        if self._messages is None:
            self._messages = receive_messages_with_raw(client)
        try:
            return await anext(self._messages)
        except StopAsyncIteration:
            self._messages = None
            raise AgentError("agent process ended the turn without a result") from None
        except BaseException:
            self._messages = None
            raise

    async def set_model(self, model: str) -> None:
        if model == self._model:
            return
        try:
            await self._connected().set_model(model)
        except AgentError:
            raise
        except Exception as exc:
            raise AgentError(f"agent refused model {model!r}: {describe_failure(exc)}") from exc
        self._model = model

    async def set_permission_mode(self, mode: str) -> None:
        if mode == self._permission_mode:
            return
        try:
            await self._connected().set_permission_mode(cast(Any, mode))
        except AgentError:
            raise
        except Exception as exc:
            raise AgentError(
                f"agent refused permission mode {mode!r}: {describe_failure(exc)}"
            ) from exc
        self._permission_mode = mode

    async def reset(self, timeout: float) -> None:
        with trio.move_on_after(timeout) as waited:
            cleared = await self.run_turn(CLEAR_COMMAND, _ignore)
            if cleared.is_error:
                raise AgentError(f"agent could not clear its conversation: {cleared.text}")
            try:
                await trio.to_thread.run_sync(self._launcher.empty_home, self.spec)
            except OSError as exc:
                raise AgentError(f"cannot empty the agent's home: {exc}") from exc
        if waited.cancelled_caught:
            raise AgentError(f"agent did not clear its conversation within {timeout:g}s")

    async def interrupt(self, grace: float) -> bool:
        client = self._client
        if client is None or self._closed:
            return False
        if not self._turn_open:
            return True  # nothing running: the prompt never reached the process
        with trio.move_on_after(grace):
            try:
                await client.interrupt()
                while True:
                    message, data = await self._next_message(client)
                    if isinstance(message, ResultMessage):
                        self._turn_open = False
                        self._note_session_id(message.session_id)
                        self._own_cost(message, data)  # the next turn's is its own only
                        return True
            except Exception as exc:
                log.info("%s: interrupt failed: %s", self.spec.name, describe_failure(exc))
                return False
        return False

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        if self._closed and self._client is None:
            return
        self._closed = True
        client, self._client = self._client, None
        if self.spec.ephemeral:
            # A one-shot agent keeps nothing to flush (no transcript, its HOME goes): its
            # graceful exit would only cost ~0.02 s of CPU (bench/README.md).
            grace = 0
        with trio.CancelScope(shield=True):
            process = self._process(client)
            if process is not None and grace > 0 and process.returncode is None:
                with trio.move_on_after(grace):
                    # EOF lets a healthy CLI flush its transcript and exit 0.
                    await self._close_stdin(client)
                    await process.wait()
            self._kill(process)
            if client is not None:
                with trio.move_on_after(CLOSE_GRACE_S):
                    try:
                        await client.disconnect()
                    except Exception as exc:  # the process is dead; this is tidying up
                        log.debug("disconnect after close: %r", exc)
            messages, self._messages = self._messages, None
            if messages is not None:  # closed here, not left to the GC
                with trio.move_on_after(CLOSE_GRACE_S):
                    try:
                        await messages.aclose()
                    except Exception as exc:
                        log.debug("closing the message stream after close: %r", exc)
            if process is not None and process.returncode is None:
                with trio.move_on_after(CLOSE_GRACE_S):
                    await process.wait()
            # Tools that outlived the CLI in its group (e.g. `sleep 1000 &` from Bash).
            self._kill(None)
            if self._pgid is not None and self._reaper is not None:
                self._reaper.forget(self._pgid)
            # Nothing of the agent runs any more: its token is worth nothing from now on.
            if self._grant is not None and self._model_proxy is not None:
                self._model_proxy.grants.revoke(self._grant)
            await trio.to_thread.run_sync(self._launcher.cleanup, self.spec, self._launcher_path)

    def _kill(self, process: Any) -> None:
        """SIGKILL the agent's process group (or the process, without a group of its own)."""
        if self._pgid is not None:
            try:
                os.killpg(self._pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        elif process is not None and process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass

    def _own_cost(self, message: ResultMessage, data: dict[str, Any]) -> float | None:
        """What the turn that ``message`` ends cost, in US dollars.

        ``total_cost_usd`` is the conversation's running total: it grows turn after
        turn, a process resuming the conversation starts from the total its
        transcript holds, and ``/clear`` starts it again at 0. The turn's own cost
        is the CLI's ``model_usage_since_last_result`` (which the SDK drops: see
        :mod:`~claude_code_api.agent.sdk_workarounds`); without it, the growth of the
        total since the previous result of this process.
        """
        total = message.total_cost_usd
        previous, self._reported_total = self._reported_total, total
        own = cost_since_last_result(data)
        if own is not None or total is None or previous is None:
            return own
        return total - previous if total >= previous else total

    def _connected(self) -> ClaudeSDKClient:
        if self._client is None:
            raise AgentError("agent process is not running")
        return self._client

    # The SDK keeps the process on its transport; we reach for it only to kill
    # quickly (its own close() waits up to 10 s before SIGKILL), to know the pid
    # and to close stdin. tests/contract/test_sdk_contract.py fails if the SDK changes them.
    def _process(self, client: ClaudeSDKClient | None = None) -> Any:
        transport = getattr(client or self._client, "_transport", None)
        return getattr(transport, "_process", None)

    async def _close_stdin(self, client: ClaudeSDKClient | None) -> None:
        transport = getattr(client, "_transport", None)
        end_input = getattr(transport, "end_input", None)
        if end_input is not None:
            try:
                await end_input()
            except Exception as exc:
                log.debug("end_input: %r", exc)


async def _ignore(_event: object) -> None:
    pass


async def _user_message(
    prompt: str, context: str | None, images: tuple[Image, ...]
) -> AsyncIterator[dict[str, Any]]:
    """One user message: a ``context`` text block, the images, then the prompt's text.

    As the CLI itself sends the CLAUDE.md files it loaded: a block of its own
    before the prompt (which it reads from the last block, so a slash command
    stays one). Images come before the text, as the Messages API advises.
    """
    content: list[dict[str, Any]] = []
    if context is not None:
        content.append({"type": "text", "text": context})
    content.extend(image.block() for image in images)
    if prompt or not images:  # (an image alone is a prompt too: the model API refuses "")
        content.append({"type": "text", "text": prompt})
    yield {
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": None,
    }


def _text_file_busy(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is an ETXTBSY from executing a file."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ETXTBSY:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _turn_result(message: ResultMessage, model: str | None, cost_usd: float | None) -> TurnResult:
    if message.result:
        text = message.result
    elif message.errors:
        text = "\n".join(message.errors)
    else:
        text = "" if not message.is_error else f"agent error: {message.subtype}"
    if model is None and message.model_usage:
        model = next(iter(message.model_usage))
    return TurnResult(
        is_error=message.is_error,
        text=text,
        subtype=message.subtype,
        session_id=message.session_id,
        cost_usd=cost_usd,
        num_turns=message.num_turns,
        usage=message.usage,
        model=model,
        api_error_status=message.api_error_status,
    )


@attrs.frozen
class SdkAgentFactory:
    """Makes the service's agents (an :data:`~claude_code_api.agent.protocol.AgentFactory`)."""

    launcher: AgentLauncher
    options: AgentOptions
    reaper: ReaperClient | None = None
    refusal: str | None = None
    model_proxy: ModelProxy | None = None

    def __call__(self, spec: AgentSpec) -> SdkAgent:
        return SdkAgent(
            spec, self.launcher, self.options, self.reaper, self.refusal, self.model_proxy
        )
