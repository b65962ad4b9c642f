"""Start-up checks: decide once how agents are launched, and say what will not work.

:func:`plan_agents` runs before the supervision tree starts, in a worker thread
(it probes bubblewrap and looks at files). It decides whether agents run in the
sandbox (``AGENT_SANDBOX``), under which limits (:mod:`.agent_limits`: cgroups, or a
warning naming what stays unbounded) and, for a service running as root, the OS user
they run as (``AGENT_UID``, never root); it starts one agent's launcher for real
(:meth:`AgentLauncher.probe`), falling back from the sandbox when ``auto`` and
the agent cannot start in it; and it warns about credentials that are withheld
or missing — each as one log line naming the fix, instead of a crash loop of
tracebacks or every request failing with "Not logged in".

Each check gives a :class:`Finding` (ok, warn or fail, and one line saying what was
found or what to do): the service logs them, and ``claude-code-api check`` prints
them (:func:`check_all`), with two more the service does not make at start-up (the
CLI runs; the model API answers: :func:`probe_cli`, :func:`probe_model_api`).

Error handling: :class:`StartupError` (one line) when the service must not start:
``AGENT_SANDBOX=on`` without a working sandbox, no Claude Code CLI at all, or no
setpriv for a root service. Agents out of a root service's agents' reach (no
sandbox, the way to ``DATA_DIR`` or the CLI closed to ``AGENT_UID``) are the plan's
``refusal``: logged once, named by ``/health``, and every start fails with it.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..auth.credentials import CredentialsFile
from ..config.settings import Settings
from ..limits.disk_quota import MIB, file_size_limit
from .limits import plan_limits
from .sandbox import (
    CREDENTIALS_FILE,
    EGRESS_PROXY_SOCKET,
    MODEL_PROXY_SOCKET,
    SANDBOX_EGRESS_PORT,
    SANDBOX_MODEL_PORT,
    AgentLauncher,
    AgentNetwork,
    AgentUser,
    Bridge,
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

# Where setpriv and env are looked for when the service's PATH lacks them.
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


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
    plan, findings = plan_with_findings(settings, environ)
    for finding in findings:
        if finding.subject == "credentials" and finding.status is Status.FAIL:
            log.warning("%s", finding.text)  # the service starts: its login may come later
        elif finding.subject != "credentials" or finding.status is not Status.OK:
            _log(finding)
    return plan


def plan_with_findings(
    settings: Settings, environ: Mapping[str, str], *, serving: bool = True
) -> tuple[AgentPlan, list[Finding]]:
    """:func:`plan_agents`, returning what it found instead of logging it. Blocking.

    ``serving``: for the service that will run these agents; not for ``check``, which
    must leave alone what a live service with the same ``DATA_DIR`` has (its agents'
    cgroups). Raises :class:`StartupError` where the service must not start.
    """
    try:
        cli = resolve_cli(settings.claude_executable)
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from None
    mode = SandboxMode(settings.agent_sandbox)
    user = _agent_user(settings)
    bwrap, sandbox = sandbox_finding(mode, user)
    if sandbox.status is Status.FAIL:
        raise StartupError(sandbox.text)
    findings = [sandbox, *credential_findings(settings, environ)]
    launcher = _launcher(settings, environ, cli, bwrap, user, findings, serving=serving)
    if launcher.sandboxed:
        network, finding = network_plan(mode, settings, launcher.env)
        if finding.status is Status.FAIL:
            raise StartupError(finding.text)
        findings.append(finding)
        launcher = attrs.evolve(launcher, network=network)
    probes = settings.data_dir.absolute() / "workers" / "start-up-probe"
    if launcher.sandboxed:
        launcher, findings = _probe_sandboxed(launcher, mode, probes, findings)
    refusal = None
    if not launcher.sandboxed:
        launcher, refusal, found = _probe_unsandboxed(launcher, settings.data_dir, probes)
        findings += found
    if not any(f.subject == "agent start" for f in findings):
        where = "sandboxed, " if launcher.sandboxed else ""
        if launcher.own_network is not None:
            where = "sandboxed, in a network namespace of its own, "
        text = f"an agent starts ({where}{_who(user)})"
        findings.append(Finding("agent start", Status.OK, text))
    _remove_empty(probes)
    return AgentPlan(launcher, refusal), findings


def _launcher(
    settings: Settings,
    environ: Mapping[str, str],
    cli: Path,
    bwrap: str | None,
    user: AgentUser | None,
    findings: list[Finding],
    *,
    serving: bool,
) -> AgentLauncher:
    """The agents' launcher as configured, under their limits, before any probe; what
    stays unbounded is added to ``findings`` as warnings."""
    limits = plan_limits(
        tmp_mb=settings.agent_tmp_mb,
        memory_mb=settings.agent_memory_mb,
        max_procs=settings.agent_max_procs,
        data_dir=settings.data_dir,
        bwrap=bwrap,
        agent_uid=user.uid if user is not None else None,
        remove_leftovers=serving,
        warn=lambda text: findings.append(Finding("limits", Status.WARN, text)),
    )
    launcher = make_launcher(
        cli=cli,
        data_dir=settings.data_dir,
        environ=environ,
        use_api_key=settings.use_claude_api_key,
        extra_env=frozenset(settings.agent_env),
        bwrap=bwrap,
        user=user,
        limits=limits,
        proxied=True,
        workspaces_dir=settings.workspaces_dir,
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
        text = (
            "prlimit (util-linux) is not installed: a single file an agent writes is not"
            " bounded between two measurements of its user's disk quota"
        )
        findings.append(Finding("disk quota", Status.WARN, text))
    return launcher


def _probe_sandboxed(
    launcher: AgentLauncher, mode: SandboxMode, probes: Path, findings: list[Finding]
) -> tuple[AgentLauncher, list[Finding]]:
    """Start one sandboxed agent for real: the launcher agents get, and the findings.

    bwrap itself works (checked before); this checks the agent's own start in it: the
    CLI, the install it needs, its OS user, its HOME, as every agent will start. If only
    its network namespace fails, agents keep the rest of the sandbox; if the sandbox
    fails, they run without it (``auto``). Raises :class:`StartupError` for ``on``.
    """
    reason = launcher.probe(probes / uuid.uuid4().hex[:12])
    if reason is not None and launcher.own_network is not None:
        # Is it the network namespace (its bridges)? Then agents keep the rest.
        without = attrs.evolve(launcher, network=None)
        if without.probe(probes / uuid.uuid4().hex[:12]) is None:
            unusable = f"agents' network namespace unusable ({reason})"
            if mode is SandboxMode.ON:
                raise StartupError(f"AGENT_SANDBOX=on, but {unusable}")
            text = (
                f"{unusable}: agents run sandboxed but share the host's network, its "
                "loopback included (see README: Security)"
            )
            findings = [f for f in findings if f.subject != "network"]
            findings.append(Finding("network", Status.WARN, text))
            launcher, reason = without, None
    if reason is not None:
        if mode is SandboxMode.ON:
            raise StartupError(f"AGENT_SANDBOX=on, but in the sandbox {reason}")
        text = (
            f"agent sandbox unusable (in it, {reason}): agents run unconfined "
            f"({_who(launcher.user)}) and can read other users' data; set AGENT_SANDBOX=off "
            "to silence this (see README: Security)"
        )
        findings = [f for f in findings if f.subject != "network"]  # (none of its own)
        findings.append(Finding("agent start", Status.WARN, text))
        launcher = attrs.evolve(launcher, bwrap=None)
    return launcher, findings


def _probe_unsandboxed(
    launcher: AgentLauncher, data_dir: Path, probes: Path
) -> tuple[AgentLauncher, str | None, list[Finding]]:
    """Without the sandbox: the launcher (its way to DATA_DIR opened), the plan's refusal
    when agents are out of reach, and the findings (what was opened; a failed start).

    Out of reach: no agent can ever start (a refusal). A failed probe otherwise is said,
    and agents are tried all the same (it may pass; their failures show).
    """
    launcher, findings = _open_the_way(launcher, data_dir)
    refusal = _unreachable(launcher)
    reason = refusal or launcher.probe(probes / uuid.uuid4().hex[:12])
    if reason is not None:
        findings.append(Finding("agent start", Status.FAIL, reason))
    return launcher, refusal, findings


# What a sandboxed agent's tools reach the Internet through (the egress proxy, bridged in).
EGRESS_PROXY_URL = f"http://127.0.0.1:{SANDBOX_EGRESS_PORT}"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
NO_PROXY = "127.0.0.1,localhost"
# The longest path a Unix socket may be reached by (sun_path: 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def network_plan(
    mode: SandboxMode, settings: Settings, agent_env: Mapping[str, str]
) -> tuple[AgentNetwork | None, Finding]:
    """The sandboxed agents' network namespace and bridges, or why they share the host's.

    ``agent_env``: what agents are passed of the service's environment. Their model
    API is the model proxy's, bridged in (``model_proxy.ModelProxy.env``).

    The bridges need socat: without it, ``on`` refuses to start (FAIL) and ``auto`` runs
    agents in the host's network with a warning.
    """
    socat = find_socat()
    if socat is None:
        missing = (
            "socat is not installed: sandboxed agents need it to bridge their own network "
            "namespace to the service's model and egress proxies (apt-get install socat)"
        )
        if mode is SandboxMode.ON:
            return None, Finding("network", Status.FAIL, f"AGENT_SANDBOX=on, but {missing}")
        text = (
            f"{missing}; until it is, agents share the host's network: its loopback (what "
            "other agents and the service serve on 127.0.0.1) included (see README: Security)"
        )
        return None, Finding("network", Status.WARN, text)
    run = settings.data_dir.absolute() / "run"
    longest = max(
        (os.path.realpath(run / name) for name in (MODEL_PROXY_SOCKET, EGRESS_PROXY_SOCKET)),
        key=len,
    )
    if len(longest.encode()) > MAX_SOCKET_PATH:
        too_long = (
            f"the path of the agents' bridge sockets, {longest}, is longer than a Unix socket's "
            f"can be ({MAX_SOCKET_PATH} bytes): give DATA_DIR a shorter path"
        )
        if mode is SandboxMode.ON:
            return None, Finding("network", Status.FAIL, f"AGENT_SANDBOX=on, but {too_long}")
        text = f"{too_long}; until then, agents share the host's network (see README: Security)"
        return None, Finding("network", Status.WARN, text)
    env = {name: EGRESS_PROXY_URL for name in PROXY_VARIABLES}
    env.update({"NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY, "ALL_PROXY": "", "all_proxy": ""})
    network = AgentNetwork(
        socat,
        (
            Bridge(SANDBOX_MODEL_PORT, run / MODEL_PROXY_SOCKET),
            Bridge(SANDBOX_EGRESS_PORT, run / EGRESS_PROXY_SOCKET),
        ),
        env,
    )
    allowed = ",".join(settings.agent_egress) or "nowhere (the model API through the model proxy)"
    text = f"each agent has a network namespace of its own; egress: {allowed} (AGENT_EGRESS)"
    return network, Finding("network", Status.OK, text)


def find_socat() -> str | None:
    """socat, for the bridges: on the service's PATH, else the system's."""
    return shutil.which("socat") or shutil.which("socat", path=SYSTEM_PATH)


def _log(finding: Finding) -> None:
    log.log(_LOG_LEVELS[finding.status], "%s", finding.text)


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


def _open_the_way(launcher: AgentLauncher, data_dir: Path) -> tuple[AgentLauncher, list[Finding]]:
    """Without the sandbox, give a root service's agents' user search permission on the
    directories on the way to DATA_DIR and the CLI it cannot pass (``/root``, 0700), by
    an ACL entry (:meth:`AgentUser.open_walls`); what was done, as findings. Blocking.

    Where the filesystem keeps no ACLs, nothing changes: :func:`_unreachable` then says
    why agents cannot start.
    """
    user = launcher.user
    if user is None or not launcher.walls:
        return launcher, []
    try:
        opened = user.open_walls([data_dir.absolute()], inside=True)
        opened += user.open_walls(launcher.shown, inside=False)
    except OSError as exc:
        log.info("cannot open the way to DATA_DIR and the CLI for uid %d: %s", user.uid, exc)
        return launcher, []
    findings = [
        Finding(
            "agent user",
            Status.WARN,
            f"gave uid {user.uid} (AGENT_UID) search permission on {wall} (an ACL entry: "
            "passing through, no listing) so that agents without the sandbox reach DATA_DIR "
            f"and the CLI; `setfacl -x u:{user.uid} {wall}` takes it back",
        )
        for wall in dict.fromkeys(opened)
    ]
    return attrs.evolve(launcher, walls=()), findings


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


def sandbox_finding(mode: SandboxMode, user: AgentUser | None = None) -> tuple[str | None, Finding]:
    """The bubblewrap to sandbox agents with (or None), and what to say about it.

    FAIL only for ``on`` without a working sandbox (the service must not start).
    """
    if mode is SandboxMode.OFF:
        return None, Finding(
            "sandbox",
            Status.WARN,
            f"AGENT_SANDBOX=off: agents run unconfined, {_who(user)}; they can read other "
            "users' workspaces and transcripts"
            + (" and the service's files" if user is None else ""),
        )
    bwrap = shutil.which("bwrap")
    reason = probe_sandbox(bwrap)
    if reason is None:
        text = f"agents run sandboxed (bubblewrap {bwrap}) {_who(user)}"
        return bwrap, Finding("sandbox", Status.OK, text)
    if mode is SandboxMode.ON:
        text = f"AGENT_SANDBOX=on, but {reason} (see README: Security)"
        return None, Finding("sandbox", Status.FAIL, text)
    return None, Finding(
        "sandbox",
        Status.WARN,
        f"agent sandbox unavailable ({reason}): agents run unconfined ({_who(user)}) and can "
        "read other users' data; install bubblewrap or allow user namespaces, or set AGENT_SANDBOX=off "
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
        f"no Claude credentials: {problem} and no API key is set; every request will fail"
        " (the model proxy has nothing to call the model with). Log in with `claude-code-api login` (or POST "
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
    """Every check, in the order an operator fixes them. Blocking (seconds).

    The agent start-up checks are the service's own (:func:`plan_with_findings`: the
    sandbox, the agents' OS user, one agent's launcher run for real, credentials).
    """
    findings = [probe_cli(settings)]
    try:
        _plan, planned = plan_with_findings(settings, environ, serving=False)
    except StartupError as exc:
        planned = [Finding("agent start", Status.FAIL, f"the service would not start: {exc}")]
    findings += planned
    findings.append(probe_model_api(settings, environ))
    return findings
