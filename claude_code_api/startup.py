"""Start-up checks: decide once how agents are launched, and say what will not work.

:func:`plan_agents` runs before the supervision tree starts, in a worker thread
(it probes bubblewrap and looks at files). It decides whether agents run in the
sandbox (``AGENT_SANDBOX``) and, for a service running as root, the OS user they
run as (``AGENT_UID``, never root); it starts one agent's launcher for real
(:meth:`AgentLauncher.probe`), falling back from the sandbox when ``auto`` and
the agent cannot start in it; and it warns about credentials that are withheld
or missing — each as one log line naming the fix, instead of a crash loop of
tracebacks or every request failing with "Not logged in".

Error handling: :class:`StartupError` (one line) when the service must not start:
``AGENT_SANDBOX=on`` without a working sandbox, no Claude Code CLI at all, or no
setpriv for a root service. Agents out of a root service's agents' reach (no
sandbox, the way to ``DATA_DIR`` or the CLI closed to ``AGENT_UID``) are the plan's
``refusal``: logged once, named by ``/health``, and every start fails with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path

import attrs

from .config import Settings
from .sandbox import (
    CREDENTIALS_FILE,
    AgentLauncher,
    AgentUser,
    SandboxMode,
    make_launcher,
    probe_sandbox,
    resolve_cli,
    service_claude_dir,
)

log = logging.getLogger(__name__)

# Where setpriv and env are looked for when the service's PATH lacks them.
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


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
    mode = SandboxMode(settings.agent_sandbox)
    user = _agent_user(settings)
    bwrap = _decide_sandbox(mode, user)
    _warn_about_credentials(settings, environ)
    launcher = make_launcher(
        cli=cli,
        data_dir=settings.data_dir,
        environ=environ,
        use_api_key=settings.use_claude_api_key,
        extra_env=frozenset(settings.agent_env),
        bwrap=bwrap,
        user=user,
    )
    probes = settings.data_dir.absolute() / "workers" / "start-up-probe"
    if launcher.sandboxed:
        # bwrap itself works (above); the agent's own start in it is checked too: the
        # CLI, the install it needs, its OS user, its HOME, as every agent will start.
        reason = launcher.probe(probes / uuid.uuid4().hex[:12])
        if reason is not None:
            if mode is SandboxMode.ON:
                raise StartupError(f"AGENT_SANDBOX=on, but in the sandbox {reason}")
            log.warning(
                "agent sandbox unusable (in it, %s): agents run unconfined (%s) and can read "
                "other users' data; set AGENT_SANDBOX=off to silence this (see README: Security)",
                reason,
                _who(user),
            )
            launcher = attrs.evolve(launcher, bwrap=None)
    refusal = None
    if not launcher.sandboxed:
        # Out of reach: no agent can ever start (a refusal). A failed probe otherwise is
        # said, and agents are tried all the same (it may pass; their failures show).
        refusal = _unreachable(launcher)
        reason = refusal or launcher.probe(probes / uuid.uuid4().hex[:12])
        if reason is not None:
            log.error("%s", reason)
    _remove_empty(probes)
    return AgentPlan(launcher, refusal)


def _is_root() -> bool:
    return os.geteuid() == 0


def _agent_user(settings: Settings) -> AgentUser | None:
    """The OS user agents become: ``AGENT_UID`` for a root service, else None (its own)."""
    if not _is_root():
        return None
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path=SYSTEM_PATH)
    if setpriv is None:
        raise StartupError(
            "running as root, agents run as AGENT_UID through setpriv, which is not "
            "installed: install util-linux (apt-get install util-linux), or run the "
            "service as a user of its own"
        )
    env = shutil.which("env") or shutil.which("env", path=SYSTEM_PATH) or "/usr/bin/env"
    return AgentUser(uid=settings.agent_uid, setpriv=setpriv, env=env)


def _who(user: AgentUser | None) -> str:
    if user is None:
        return "as the service's OS user"
    return f"as uid {user.uid} (AGENT_UID)"


def _unreachable(launcher: AgentLauncher) -> str | None:
    """Why agents, without the sandbox, cannot reach their HOMEs or the CLI; or None."""
    if launcher.user is None or not launcher.walls:
        return None
    wall = launcher.walls[0]
    info = os.stat(wall)
    return (
        f"agents cannot start: they run as uid {launcher.user.uid} (AGENT_UID), which cannot "
        f"pass {wall} (mode {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}) on the "
        "way to DATA_DIR or the Claude Code CLI; install the service and DATA_DIR where "
        "that user can reach them (not under a private home), or run agents in the sandbox "
        "(AGENT_SANDBOX=auto with bubblewrap installed)"
    )


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not there, or an agent's probe home left behind: nothing to tidy


def _decide_sandbox(mode: SandboxMode, user: AgentUser | None) -> str | None:
    """The bubblewrap to sandbox agents with, or None; raises for ``on`` without one."""
    if mode is SandboxMode.OFF:
        log.warning(
            "AGENT_SANDBOX=off: agents run unconfined, %s; they can read other users' "
            "workspaces and transcripts%s",
            _who(user),
            " and the service's files" if user is None else "",
        )
        return None
    bwrap = shutil.which("bwrap")
    reason = probe_sandbox(bwrap)
    if reason is None:
        log.info("agents run sandboxed (bubblewrap %s) %s", bwrap, _who(user))
        return bwrap
    if mode is SandboxMode.ON:
        raise StartupError(f"AGENT_SANDBOX=on, but {reason} (see README: Security)")
    log.warning(
        "agent sandbox unavailable (%s): agents run unconfined (%s) and can read other "
        "users' data; install bubblewrap or allow user namespaces, or set AGENT_SANDBOX=off "
        "to silence this (see README: Security)",
        reason,
        _who(user),
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
