"""Start-up checks: decide once how agents are launched, and say what will not work.

:func:`plan_agents` runs before the supervision tree starts, in a worker thread
(it probes bubblewrap and looks at files). It decides whether agents run in the
sandbox (``AGENT_SANDBOX``), foresees the real CLI refusing to run as root, and
warns about credentials that are withheld or missing — each as one log line
naming the fix, instead of a crash loop of tracebacks or every request failing
with "Not logged in".

Each check is a function returning a :class:`Finding` (ok, warn or fail, and one line
saying what was found or what to do): the service logs them, and ``claude-code-api
check`` prints them, with two more the service does not make at start-up (the CLI runs;
the model API answers: :func:`probe_cli`, :func:`probe_model_api`).

Error handling: :class:`StartupError` (one line) when the service must not start:
``AGENT_SANDBOX=on`` without a working sandbox, or no Claude Code CLI at all.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

import attrs

from .agent import ROOT_REFUSAL
from .config import Settings
from .credentials import CredentialsFile
from .disk_quota import MIB, file_size_limit
from .sandbox import (
    CREDENTIALS_FILE,
    AgentLauncher,
    SandboxMode,
    is_passed,
    make_launcher,
    probe_sandbox,
    resolve_cli,
    service_claude_dir,
)

if TYPE_CHECKING:
    import httpx  # imported when used: the service itself needs it only for OAuth calls

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start as configured; the message says why and what to do."""


@attrs.frozen
class AgentPlan:
    """How this service launches agents. ``refusal``: every agent start fails with it."""

    launcher: AgentLauncher
    refusal: str | None = None


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, but not as one would want (the service still starts)
    FAIL = "FAIL"  # agents will not work (or the service will not start)


@attrs.frozen
class Finding:
    """One check's outcome: what was checked, and what was found or what to do (one line)."""

    subject: str
    status: Status
    text: str


_LOG_LEVELS = {Status.OK: logging.INFO, Status.WARN: logging.WARNING, Status.FAIL: logging.ERROR}


def plan_agents(settings: Settings, environ: Mapping[str, str]) -> AgentPlan:
    """Decide how agents are launched; log what will not work. Blocking."""
    try:
        cli = resolve_cli(settings.claude_executable)
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from None
    bwrap, sandbox = sandbox_finding(SandboxMode(settings.agent_sandbox))
    if sandbox.status is Status.FAIL:
        raise StartupError(sandbox.text)
    _log(sandbox)
    refusal = root_refusal(settings, environ)
    if refusal is not None:
        log.error("%s", refusal)
    for finding in credential_findings(settings, environ):
        if finding.status is not Status.OK:
            log.warning("%s", finding.text)  # the service starts: its login may come later
    launcher = make_launcher(
        cli=cli,
        data_dir=settings.data_dir,
        environ=environ,
        use_api_key=settings.use_claude_api_key,
        extra_env=frozenset(settings.agent_env),
        bwrap=bwrap,
    )
    # A single file an agent writes stops at the disk quota (disk_quota.py).
    launcher = attrs.evolve(
        launcher,
        max_file_size=partial(
            file_size_limit,
            settings.data_dir,
            settings.user_disk_max_mb * MIB,
            settings.disk_reserve_mb * MIB,
        ),
    )
    if launcher.prlimit is None:
        log.warning(
            "prlimit (util-linux) is not installed: a single file an agent writes is not"
            " bounded between two measurements of its user's disk quota"
        )
    return AgentPlan(launcher, refusal)


def _log(finding: Finding) -> None:
    log.log(_LOG_LEVELS[finding.status], "%s", finding.text)


def _is_root() -> bool:
    return os.geteuid() == 0


def root_refusal(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """Why every agent start will fail as root, foreseen; None when it will not."""
    # The CLI accepts exactly "1" (this very machine exports IS_SANDBOX=yes, which it refuses).
    if _is_root() and environ.get("IS_SANDBOX") != "1" and settings.claude_executable is None:
        # Foreseen: the bundled CLI refuses bypassPermissions as root (a custom
        # CLAUDE_EXECUTABLE may accept it, and is tried).
        return ROOT_REFUSAL
    return None


def sandbox_finding(mode: SandboxMode) -> tuple[str | None, Finding]:
    """The bubblewrap to sandbox agents with (or None), and what to say about it.

    FAIL only for ``on`` without a working sandbox (the service must not start).
    """
    if mode is SandboxMode.OFF:
        return None, Finding(
            "sandbox",
            Status.WARN,
            "AGENT_SANDBOX=off: agents run unconfined, as the service's OS user; they can read "
            "other users' workspaces and transcripts and the service's files",
        )
    bwrap = shutil.which("bwrap")
    reason = probe_sandbox(bwrap)
    if reason is None:
        return bwrap, Finding("sandbox", Status.OK, f"agents run sandboxed (bubblewrap {bwrap})")
    if mode is SandboxMode.ON:
        text = f"AGENT_SANDBOX=on, but {reason} (see README: Security)"
        return None, Finding("sandbox", Status.FAIL, text)
    return None, Finding(
        "sandbox",
        Status.WARN,
        f"agent sandbox unavailable ({reason}): agents run unconfined and can read other "
        "users' data; install bubblewrap or allow user namespaces, or set AGENT_SANDBOX=off "
        "to silence this (see README: Security)",
    )


def credential_findings(settings: Settings, environ: Mapping[str, str]) -> list[Finding]:
    """What agents will log in with (ok), or that they have nothing (FAIL); a withheld key (warn)."""
    findings = []
    api_key = bool(environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN"))
    if api_key and not settings.use_claude_api_key:
        findings.append(
            Finding(
                "credentials",
                Status.WARN,
                "ANTHROPIC_API_KEY is set but withheld from agents (USE_CLAUDE_API_KEY is off): "
                "they use the Claude login instead; set USE_CLAUDE_API_KEY=1 to use the key",
            )
        )
    if api_key and settings.use_claude_api_key:
        text = "agents use the API key (ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN)"
        return [*findings, Finding("credentials", Status.OK, text)]
    if environ.get("CLAUDE_CODE_OAUTH_TOKEN"):
        text = "agents use the Claude login in CLAUDE_CODE_OAUTH_TOKEN"
        return [*findings, Finding("credentials", Status.OK, text)]
    path = service_claude_dir(environ) / CREDENTIALS_FILE
    try:
        login = CredentialsFile(path).login() if path.is_file() else None
    except OSError as exc:
        problem = f"{path} cannot be read ({exc.strerror or exc})"
    else:
        problem = f"{path} holds no Claude login" if path.is_file() else f"{path} does not exist"
        if login is not None and login.refresh_token is None and _expired(login.expires_at_ms):
            problem = f"the Claude login in {path} has expired (and has no refresh token)"
        elif login is not None:
            text = f"agents use the Claude login in {path}"
            return [*findings, Finding("credentials", Status.OK, text)]
    text = (
        f"no Claude credentials: {problem} and no API key is passed to agents; every request "
        "will fail with 'Not logged in'. Log in with `claude-code-api login` (or POST "
        "/auth/login), or set ANTHROPIC_API_KEY and USE_CLAUDE_API_KEY=1"
    )
    return [*findings, Finding("credentials", Status.FAIL, text)]


def _expired(expires_at_ms: int | None) -> bool:
    return expires_at_ms is not None and expires_at_ms <= time.time() * 1000


# --- what only `claude-code-api check` does (the service does not wait for these) ---------

CLI_PROBE_TIMEOUT_S = 30.0
MODEL_API_TIMEOUT_S = 5.0
DEFAULT_MODEL_API = "https://api.anthropic.com"


def probe_cli(settings: Settings) -> Finding:
    """Whether the CLI agents run exists and runs (``--version``). Blocking (up to 30 s)."""
    try:
        cli = resolve_cli(settings.claude_executable)
    except FileNotFoundError as exc:
        return Finding("executable", Status.FAIL, str(exc))
    try:
        done = subprocess.run(
            [str(cli), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        text = f"{cli} does not run: {exc}; reinstall claude-agent-sdk or fix CLAUDE_EXECUTABLE"
        return Finding("executable", Status.FAIL, text)
    if done.returncode != 0:
        detail = " ".join(done.stderr.split())[:300] or f"exit code {done.returncode}"
        text = (
            f"{cli} --version failed: {detail}; reinstall claude-agent-sdk or fix CLAUDE_EXECUTABLE"
        )
        return Finding("executable", Status.FAIL, text)
    version = done.stdout.strip().splitlines()[0] if done.stdout.strip() else "no version printed"
    return Finding("executable", Status.OK, f"{cli} runs ({version})")


def probe_model_api(settings: Settings, environ: Mapping[str, str]) -> Finding:
    """Whether the model API agents will call answers, within 5 s. Blocking.

    Its address is ``ANTHROPIC_BASE_URL`` when agents get it (``USE_CLAUDE_API_KEY`` or
    ``AGENT_ENV``), else Anthropic's. With the API key agents use, the request shows the
    key too (401/403: refused); otherwise any HTTP answer means reachable.
    """

    def passed(name: str) -> str:
        if not is_passed(
            name, use_api_key=settings.use_claude_api_key, extra=frozenset(settings.agent_env)
        ):
            return ""
        return environ.get(name, "").strip()

    base = (passed("ANTHROPIC_BASE_URL") or DEFAULT_MODEL_API).rstrip("/")
    headers = {"anthropic-version": "2023-06-01"}
    if key := passed("ANTHROPIC_API_KEY"):
        headers["x-api-key"] = key
    elif token := passed("ANTHROPIC_AUTH_TOKEN"):
        headers["authorization"] = f"Bearer {token}"
    with_key = len(headers) > 1
    url = f"{base}/v1/models?limit=1" if with_key else f"{base}/"
    response = http_probe("GET" if with_key else "HEAD", url, headers)
    if isinstance(response, str):
        text = (
            f"cannot reach the model API at {base} ({response}): agents cannot answer; check "
            "the network, the proxy (HTTPS_PROXY) or ANTHROPIC_BASE_URL"
        )
        return Finding("model API", Status.FAIL, text)
    if with_key and response.status_code in (401, 403):
        text = (
            f"the model API at {base} refuses the API key (HTTP {response.status_code}): "
            "check ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)"
        )
        return Finding("model API", Status.FAIL, text)
    return Finding("model API", Status.OK, f"{base} answers (HTTP {response.status_code})")


def http_probe(
    method: str, url: str, headers: Mapping[str, str] | None = None
) -> httpx.Response | str:
    """One HTTP request with a 5 s timeout: the response, or why there was none. Blocking.

    Proxies are taken from the environment (``HTTPS_PROXY``…), as the CLI takes them.
    """
    import httpx

    try:
        with httpx.Client(timeout=MODEL_API_TIMEOUT_S) as client:
            return client.request(method, url, headers=headers)
    except (httpx.HTTPError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc or 'no detail'}"


def check_all(settings: Settings, environ: Mapping[str, str]) -> list[Finding]:
    """Every check, in the order an operator fixes them. Blocking (seconds)."""
    _bwrap, sandbox = sandbox_finding(SandboxMode(settings.agent_sandbox))
    findings = [probe_cli(settings), sandbox]
    refusal = root_refusal(settings, environ)
    if refusal is not None:
        findings.append(Finding("root", Status.FAIL, refusal))
    findings += credential_findings(settings, environ)
    findings.append(probe_model_api(settings, environ))
    return findings
