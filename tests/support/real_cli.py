"""Run the real bundled Claude Code CLI, through claude-agent-sdk, against the mock API.

The CLI (``claude_agent_sdk/_bundled/claude``) is pointed at
:mod:`claude_code_api.demo.mock_messages_api` with an environment that keeps it offline and
away from the real home: a fresh ``CLAUDE_CONFIG_DIR`` and ``HOME`` per test,
no telemetry, no auto-update, no non-essential traffic. The environment the
test runner itself has (``IS_SANDBOX``, ``ANTHROPIC_*``, ...) is overridden
explicitly, because the SDK merges ``os.environ`` under ``options.env``.

Typical use in a pytest-trio test::

    @requires_real_cli
    async def test_something(tmp_path):
        with trio.fail_after(30):
            async with open_mock_api() as api:
                options = real_cli_options(api, CliDirs.create(tmp_path))
                async with open_real_cli(options) as client:
                    messages = await run_turn(client, "hello")

Error handling: a missing bundled CLI skips (``requires_real_cli``) instead of
failing; :func:`open_real_cli` always disconnects, and kills the CLI if it
does not exit within its own deadline.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import claude_agent_sdk
import pytest
import trio
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

from claude_code_api.demo.mock_messages_api import MockMessagesApi

BUNDLED_CLI = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
HAVE_BUNDLED_CLI = BUNDLED_CLI.is_file() and os.access(BUNDLED_CLI, os.X_OK)
RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

requires_real_cli = pytest.mark.skipif(
    not HAVE_BUNDLED_CLI, reason=f"the bundled Claude Code CLI is not installed at {BUNDLED_CLI}"
)

# Claude Code's own system prompt; the SDK's default (None) sends an empty one.
CLAUDE_CODE_SYSTEM_PROMPT = {"type": "preset", "preset": "claude_code"}
MOCK_API_KEY = "sk-ant-mock-key"
# The CLI's own deadline for exiting after stdin EOF, before the SDK kills it.
DISCONNECT_TIMEOUT_S = 10.0


@attrs.frozen
class CliDirs:
    """The directories one CLI may write to: config dir, HOME, cwd and temp dir.

    ``tmp_dir`` is ``CLAUDE_CODE_TMPDIR``: the CLI's ``claude-<uid>/`` scratch
    tree and, when ``XDG_RUNTIME_DIR`` is unset, its messaging socket
    ``cc-socks/<pid>.sock`` go there instead of /tmp (a socket path over 103
    bytes falls back to ``/tmp/cc-socks-<uid>/``).
    """

    config_dir: Path
    home: Path
    workspace: Path
    tmp_dir: Path

    @classmethod
    def create(cls, root: Path) -> CliDirs:
        dirs = cls(root / "claude-config", root / "home", root / "workspace", root / "tmp")
        for path in (dirs.config_dir, dirs.home, dirs.workspace, dirs.tmp_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return dirs

    def transcripts(self) -> list[Path]:
        """Every ``*.jsonl`` transcript under ``CLAUDE_CONFIG_DIR/projects``."""
        return sorted((self.config_dir / "projects").glob("*/*.jsonl"))


def cli_env(api_url: str, dirs: CliDirs, *, is_sandbox: bool | None = None) -> dict[str, str]:
    """The environment for a real CLI talking to the mock at ``api_url``.

    ``is_sandbox`` defaults to "when running as root": as root the CLI refuses
    ``bypassPermissions`` unless ``IS_SANDBOX=1``. An empty value stands for
    unset (the SDK cannot remove an inherited variable, only override it).
    """
    if is_sandbox is None:
        is_sandbox = RUNNING_AS_ROOT
    return {
        "ANTHROPIC_BASE_URL": api_url,
        "ANTHROPIC_API_KEY": MOCK_API_KEY,
        "ANTHROPIC_AUTH_TOKEN": "",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "IS_SANDBOX": "1" if is_sandbox else "",
        "CLAUDE_CONFIG_DIR": str(dirs.config_dir),
        "CLAUDE_CODE_TMPDIR": str(dirs.tmp_dir),
        "HOME": str(dirs.home),
        "XDG_CONFIG_HOME": str(dirs.home / ".config"),
        "XDG_CACHE_HOME": str(dirs.home / ".cache"),
        "XDG_DATA_HOME": str(dirs.home / ".local" / "share"),
        "XDG_STATE_HOME": str(dirs.home / ".local" / "state"),
    }


def real_cli_options(
    api: MockMessagesApi, dirs: CliDirs, *, env: dict[str, str] | None = None, **overrides: Any
) -> ClaudeAgentOptions:
    """SDK options for the bundled CLI against ``api``, working in ``dirs.workspace``.

    Defaults: bypassPermissions and Claude Code's own system prompt, as the
    service uses them. ``env`` entries are added to :func:`cli_env`'s;
    ``overrides`` are passed to ``ClaudeAgentOptions``.
    """
    options: dict[str, Any] = {
        "cli_path": str(BUNDLED_CLI),
        "cwd": str(dirs.workspace),
        "permission_mode": "bypassPermissions",
        "system_prompt": CLAUDE_CODE_SYSTEM_PROMPT,
        "env": {**cli_env(api.url, dirs), **(env or {})},
    }
    options.update(overrides)
    return ClaudeAgentOptions(**options)


@asynccontextmanager
async def open_real_cli(options: ClaudeAgentOptions) -> AsyncIterator[ClaudeSDKClient]:
    """A connected ``ClaudeSDKClient`` (initialize answered); disconnected on exit.

    Resource handling: ``disconnect()`` closes stdin and waits for the CLI,
    killing it when it overruns; it runs shielded under its own deadline so a
    cancelled or failed test still leaves no process behind.
    """
    client = ClaudeSDKClient(options)
    try:
        await client.connect()
        yield client
    finally:
        with trio.move_on_after(DISCONNECT_TIMEOUT_S) as cleanup:
            cleanup.shield = True
            await client.disconnect()


async def run_turn(client: ClaudeSDKClient, prompt: str) -> list[Any]:
    """Send ``prompt`` and return every message up to and including its ``ResultMessage``."""
    await client.query(prompt)
    messages = []
    async for message in client.receive_messages():
        messages.append(message)
        if isinstance(message, ResultMessage):
            return messages
    raise AssertionError(f"the CLI ended without a result; got {messages!r}")


def service_overrides(api_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    """What runs the *service* (tests/support/harness.py) with the bundled CLI against the mock API.

    Its own HOME and Claude config dir under ``workdir``; agents get the mock's URL and
    key (``USE_CLAUDE_API_KEY=1``), sandboxed where the OS allows; as root,
    ``IS_SANDBOX=1``. Two users: alice (``sk-alice-key``) and bob (``sk-bob-key``).
    """
    service_home = workdir / "service-home"
    service_home.mkdir(parents=True, exist_ok=True)
    return {
        "CLAUDE_EXECUTABLE": "",  # the SDK's bundled CLI
        "API_KEYS": "alice:sk-alice-key,bob:sk-bob-key",
        "NEXTAUTH_SECRET": "the-nextauth-secret",
        "USE_CLAUDE_API_KEY": "1",
        "ANTHROPIC_API_KEY": MOCK_API_KEY,
        "ANTHROPIC_BASE_URL": api_url,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "IS_SANDBOX": "1",
        "HOME": str(service_home),
        "CLAUDE_CONFIG_DIR": str(service_home / ".claude"),
        "AGENT_SANDBOX": "auto",
        "WARMUP_TIMEOUT_MS": "60000",
        "AGENT_WARM_UP_TURN": "on",  # the service's default (the fake's tests turn it off)
        **extra,
    }
