"""Start-up checks: decide once how agents are launched, and say what will not work.

:func:`plan_agents` runs before the supervision tree starts, in a worker thread
(it probes bubblewrap and cgroups, and looks at files). It decides whether agents
run in the sandbox (``AGENT_SANDBOX``) and under which limits
(:mod:`.agent_limits`: cgroups, or a warning naming what stays unbounded),
foresees the real CLI refusing to run as root, and warns about credentials that
are withheld or missing — each as one log line naming the fix, instead of a
crash loop of tracebacks or every request failing with "Not logged in".

Error handling: :class:`StartupError` (one line) when the service must not start:
``AGENT_SANDBOX=on`` without a working sandbox, or no Claude Code CLI at all.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping

import attrs

from .agent import ROOT_REFUSAL
from .agent_limits import plan_limits
from .config import Settings
from .sandbox import (
    CREDENTIALS_FILE,
    AgentLauncher,
    SandboxMode,
    make_launcher,
    probe_sandbox,
    resolve_cli,
    service_claude_dir,
)

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start as configured; the message says why and what to do."""


@attrs.frozen
class AgentPlan:
    """How this service launches agents. ``refusal``: every agent start fails with it."""

    launcher: AgentLauncher
    refusal: str | None = None


def plan_agents(settings: Settings, environ: Mapping[str, str]) -> AgentPlan:
    """Decide how agents are launched; log what will not work. Blocking."""
    try:
        cli = resolve_cli(settings.claude_executable)
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from None
    bwrap = _decide_sandbox(SandboxMode(settings.agent_sandbox))
    refusal = None
    # The CLI accepts exactly "1" (this very machine exports IS_SANDBOX=yes, which it refuses).
    if _is_root() and environ.get("IS_SANDBOX") != "1" and settings.claude_executable is None:
        # Foreseen: the bundled CLI refuses bypassPermissions as root (a custom
        # CLAUDE_EXECUTABLE may accept it, and is tried).
        refusal = ROOT_REFUSAL
        log.error("%s", ROOT_REFUSAL)
    _warn_about_credentials(settings, environ)
    limits = plan_limits(
        tmp_mb=settings.agent_tmp_mb,
        memory_mb=settings.agent_memory_mb,
        max_procs=settings.agent_max_procs,
        data_dir=settings.data_dir,
        bwrap=bwrap,
    )
    launcher = make_launcher(
        cli=cli,
        data_dir=settings.data_dir,
        environ=environ,
        use_api_key=settings.use_claude_api_key,
        extra_env=frozenset(settings.agent_env),
        bwrap=bwrap,
        limits=limits,
    )
    return AgentPlan(launcher, refusal)


def _is_root() -> bool:
    return os.geteuid() == 0


def _decide_sandbox(mode: SandboxMode) -> str | None:
    """The bubblewrap to sandbox agents with, or None; raises for ``on`` without one."""
    if mode is SandboxMode.OFF:
        log.warning(
            "AGENT_SANDBOX=off: agents run unconfined, as the service's OS user; they can read "
            "other users' workspaces and transcripts and the service's files"
        )
        return None
    bwrap = shutil.which("bwrap")
    reason = probe_sandbox(bwrap)
    if reason is None:
        log.info("agents run sandboxed (bubblewrap %s)", bwrap)
        return bwrap
    if mode is SandboxMode.ON:
        raise StartupError(f"AGENT_SANDBOX=on, but {reason} (see README: Security)")
    log.warning(
        "agent sandbox unavailable (%s): agents run unconfined and can read other users' "
        "data; install bubblewrap or allow user namespaces, or set AGENT_SANDBOX=off to "
        "silence this (see README: Security)",
        reason,
    )
    return None


def _warn_about_credentials(settings: Settings, environ: Mapping[str, str]) -> None:
    api_key = bool(environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN"))
    if api_key and not settings.use_claude_api_key:
        log.warning(
            "ANTHROPIC_API_KEY is set but withheld from agents (USE_CLAUDE_API_KEY is off): "
            "they use the Claude login instead; set USE_CLAUDE_API_KEY=1 to use the key"
        )
    if api_key and settings.use_claude_api_key:
        return
    if environ.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return
    credentials = service_claude_dir(environ) / CREDENTIALS_FILE
    if not credentials.is_file():
        log.warning(
            "no Claude credentials: %s does not exist and no API key is passed to agents; "
            "every request will fail with 'Not logged in'. Log in with `claude login` (or "
            "POST /auth/login), or set ANTHROPIC_API_KEY and USE_CLAUDE_API_KEY=1",
            credentials,
        )
