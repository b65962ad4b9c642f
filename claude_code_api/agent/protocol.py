"""The agent seam: what workers, session actors and turns need from an agent.

An *agent* is one Claude Code process. The service's code talks to it only
through :class:`Agent`, so the turn, worker and session logic runs the same
against the real one (:mod:`claude_code_api.agent.sdk`, the only module that
drives claude-agent-sdk) and against an in-memory fake on trio's MockClock
(``tests/support/fake_agent.py``), where tests can tell an *interrupt* from a *kill*
from a *replace*.

What to start is an :class:`AgentSpec`; an :data:`AgentFactory` turns a spec into
an agent that has not started yet.

Error handling: everything the process can do wrong surfaces as
:class:`AgentError` (or :class:`AgentStartError` at start-up) with a one-line
reason fit for a client to read. ``trio.Cancelled`` is never swallowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import attrs

from ..actors.supervision import ExpectedFailure
from ..messages import AgentEvent, Image, RunOptions

# Time a closing process gets to exit after stdin EOF before it is killed.
CLOSE_GRACE_S = 5.0
# What the real CLI prints when asked for bypassPermissions as root, and what we say instead.
ROOT_REFUSAL_MARK = "cannot be used with root/sudo privileges"
ROOT_REFUSAL = (
    "the Claude Code CLI refuses to run with bypassPermissions as root: run the service "
    "as a non-root user, or set IS_SANDBOX=1 if it already runs inside a sandbox or container"
)


class AgentError(Exception):
    """The agent process failed: it died, spoke garbage or broke the protocol."""


class AgentStartError(AgentError, ExpectedFailure):
    """The agent process did not start, or did not answer ``initialize`` in time.

    An operational failure (bad credentials, the CLI refusing to run as root, a
    full disk): logged as one line, never with a traceback.
    """


@attrs.frozen
class AgentSpec:
    """What one agent process is for, and where it lives.

    ``home`` is the agent's HOME: its working directory is ``workspace``, by default
    ``home/workspace`` (a session's, with ``WORKSPACES_DIR``: a directory of its own there,
    on a volume every replica mounts at the same path), and Claude Code's config dir
    (transcripts, ``.claude.json``) is ``home/.claude``.
    An ``ephemeral`` agent (a one-shot worker's) has its home removed when it
    closes and keeps no transcript; a session's home is its user's and stays.
    ``options`` are what a request asked for beyond the service's defaults: the
    process starts with them as its arguments.
    """

    name: str  # for logs: "worker-0", "session alice/s1"
    home: Path
    ephemeral: bool
    session_id: str | None = None  # a new conversation with this Claude session UUID
    resume: str | None = None  # continue the conversation with this Claude session UUID
    options: RunOptions = RunOptions()
    workspace: Path | None = None  # the working directory when not ``home/workspace``

    @property
    def cwd(self) -> Path:
        return self.workspace if self.workspace is not None else self.home / "workspace"

    @property
    def own_workspace(self) -> bool:
        """Whether the working directory lies outside the HOME (``WORKSPACES_DIR``)."""
        return self.workspace is not None and not self.workspace.is_relative_to(self.home)

    @property
    def config_dir(self) -> Path:
        return self.home / ".claude"


@attrs.frozen
class TurnResult:
    """How a turn ended, as the agent reported it (the CLI's result message)."""

    is_error: bool
    text: str  # the answer, or the error the agent reported
    subtype: str = "success"
    session_id: str | None = None
    cost_usd: float | None = None
    num_turns: int | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    # HTTP status of the failing model API call when the turn ended on one.
    api_error_status: int | None = None


@attrs.frozen
class Charge:
    """Whom a turn's model calls count against: its user, and the run (and session)."""

    user_id: str
    run_id: str
    session_id: str | None = None


OnEvent = Callable[[AgentEvent], Awaitable[None]]


class Agent(Protocol):
    """One Claude Code process.

    Use: ``await start()``, then ``run_turn()`` one at a time, and always
    ``close()`` (idempotent). After an :class:`AgentError` the agent is broken:
    close it and start another. ``run_turn`` may be cancelled mid-turn (a
    deadline, a departed client); the turn then still runs in the process:
    ``interrupt()`` it, or ``close()`` the agent.
    """

    @property
    def pid(self) -> int | None: ...

    @property
    def exited(self) -> bool:
        """The process has exited (or never started)."""
        ...

    @property
    def session_id(self) -> str | None:
        """The Claude session id the process reported last (None before any)."""
        ...

    @property
    def model(self) -> str | None:
        """The model the process uses now (as started, or as last set)."""
        ...

    async def start(self, timeout: float) -> None:
        """Start the process and complete the initialize handshake within ``timeout`` s.

        Raises :class:`AgentStartError`; leaves no process behind when it does.
        """
        ...

    async def wait_exited(self) -> None:
        """Return when the process has exited."""
        ...

    async def run_turn(
        self,
        prompt: str,
        on_event: OnEvent,
        *,
        memory: str | None = None,
        images: tuple[Image, ...] = (),
        charge: Charge | None = None,
    ) -> TurnResult:
        """Send ``prompt``, relay the turn's events to ``on_event``, return its result.

        ``memory``: the user's CLAUDE.md, handed to the agent with the prompt as
        context (for an agent that started before its user was known, so did not
        load it itself). ``images`` go with the prompt as image content blocks,
        before its text. ``charge``: whom the turn's model calls count against (the
        model proxy's ledger; from then on until the next turn's). Raises
        :class:`AgentError` if the process fails mid-turn.
        """
        ...

    async def set_model(self, model: str) -> None:
        """Use ``model`` from the next turn on (a control request; no new process).

        Idle agents only. Does nothing when it is the model already. Raises
        :class:`AgentError` if the process refuses or fails.
        """
        ...

    async def set_permission_mode(self, mode: str) -> None:
        """Use permission ``mode`` from the next turn on (a control request), as :meth:`set_model`."""
        ...

    async def reset(self, timeout: float) -> None:
        """Make an idle one-shot agent as good as new for its user's next request.

        Clears the conversation (``/clear``, as a user would) and empties the
        agent's HOME of what the last request left there (see
        :meth:`~claude_code_api.agent.sandbox.AgentLauncher.empty_home`). Only ever for
        the same user's next request: what the process itself remembers beyond
        that is not cleared. Raises :class:`AgentError` when the agent fails or
        does not finish within ``timeout`` s (close it then).
        """
        ...

    async def interrupt(self, grace: float) -> bool:
        """Interrupt the running turn and drain it to its end within ``grace`` s.

        True when the agent is idle again and can take another turn; False when
        it did not stop in time (close it then).
        """
        ...

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Stop the process: EOF, up to ``grace`` s to exit, then kill it and its tools.

        Shielded and bounded; safe in ``finally`` blocks of cancelled tasks.
        """
        ...


AgentFactory = Callable[[AgentSpec], Agent]
