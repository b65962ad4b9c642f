"""How an agent process is launched: its environment, its sandbox, its launcher script.

Every agent (a Claude Code process) is started through a small generated shell
script, its *launcher*, which the SDK runs as the CLI (``cli_path``). The
launcher

* puts the agent in a process group of its own (``setsid``), so that closing
  the agent can kill the tools it started too, and the reaper can kill it all
  if the service dies;
* with the sandbox on, runs it inside bubblewrap: a new pid namespace (the
  service's processes and their environments are invisible), no capabilities
  (started as root, it could otherwise remount or unmount all that follows), the
  whole file system and the kernel's settings (``/proc/sys``) read-only,
  ``DATA_DIR``, the service's Claude config dir and the container engines'
  sockets hidden, and only the agent's own HOME writable (its workspace, its
  Claude config dir with its transcripts). An agent serving user A can then
  neither read nor write user B's workspace, transcripts or CLAUDE.md, nor the
  session database — with Bash or with Claude Code's file tools, because the OS
  enforces it.

The environment is an allowlist, never the service's: see :func:`agent_environment`.
The sandbox decision (``AGENT_SANDBOX=auto|on|off``) is made once at start-up by
:func:`probe_sandbox`. Files are written by :meth:`AgentLauncher.prepare`, which
does blocking I/O: call it from a worker thread.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from . import acl
from .cgroups import AgentCgroup
from .limits import HIDDEN_TMPFS_BYTES, AgentLimits
from .protocol import AgentSpec

log = logging.getLogger(__name__)


class SandboxMode(enum.StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


# Passed to agents as they are (when set in the service's environment).
PASSED_VARIABLES = frozenset(
    {
        "PATH",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NODE_EXTRA_CA_CERTS",
        "IS_SANDBOX",
        "DISABLE_TELEMETRY",
        "DISABLE_AUTOUPDATER",
        "DISABLE_ERROR_REPORTING",
        "DISABLE_COST_WARNINGS",
        # Claude Code's own tuning knobs (no secrets): timeouts and output bounds.
        "API_TIMEOUT_MS",
        "BASH_DEFAULT_TIMEOUT_MS",
        "BASH_MAX_TIMEOUT_MS",
        "BASH_MAX_OUTPUT_LENGTH",
        "MAX_THINKING_TOKENS",
        "MAX_MCP_OUTPUT_TOKENS",
        "MCP_TIMEOUT",
        "MCP_TOOL_TIMEOUT",
    }
)
# Locale settings and Claude Code's own settings (CLAUDE_CODE_OAUTH_TOKEN is its credential).
PASSED_PREFIXES = ("LC_", "CLAUDE_CODE_")
# The model API's settings and key: only with USE_CLAUDE_API_KEY.
API_PREFIX = "ANTHROPIC_"
# Set by the service for every agent.
FIXED_VARIABLES = {
    "CLAUDE_CODE_SKIP_BYPASS_PERMISSIONS_WARNING": "1",
    "DISABLE_INSTALLATION_CHECKS": "1",
    "DISABLE_AUTOUPDATER": "1",
}
# Set per agent (see agent_environment), never taken from the service.
PER_AGENT_VARIABLES = frozenset(
    {"HOME", "CLAUDE_CONFIG_DIR", "CLAUDE_CODE_TMPDIR", "TMPDIR", "XDG_RUNTIME_DIR", "PWD"}
)
# Where the CLI finds the model API and its credential: with the model proxy, set per agent
# (its address and the agent's own token: model_proxy.model_env), never the service's.
MODEL_VARIABLES = frozenset(
    {"ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"}
)

# Sockets that would hand an agent the host: read-only mounts do not stop connect(2), and
# through a container engine's API (or systemd's, for root) an agent starts what it likes
# outside the sandbox, DATA_DIR mounted.
HIDDEN_SOCKETS = (
    Path("/var/run/docker.sock"),
    Path("/run/docker.sock"),
    Path("/run/podman/podman.sock"),
    Path("/run/containerd/containerd.sock"),
    Path("/run/crio/crio.sock"),
    Path("/run/snapd.socket"),
    Path("/run/dbus/system_bus_socket"),
    Path("/run/systemd/private"),
)
# Every user's runtime dir (XDG_RUNTIME_DIR): rootless Docker's and Podman's sockets (the
# service's own user's among them), its session bus, its ssh and gpg agents.
HIDDEN_RUNTIME_DIRS = (Path("/run/user"),)
CREDENTIALS_FILE = ".credentials.json"
# The user's CLAUDE.md in a session HOME's config dir, which the service writes (user_memory).
USER_MEMORY_FILE = "CLAUDE.md"
# The name a root service's agents' OS user (AGENT_UID) goes by in their sandbox.
AGENT_ACCOUNT = "claude-agent"
ACCOUNT_FILES = ("passwd", "group")
# The Claude login in it (credentials.OAUTH_KEY; that module imports this one).
LOGIN_KEY = "claudeAiOauth"
# What of the login a sandboxed agent is not shown. The service refreshes the login itself
# and replaces its agents when it changes; with the refresh token an agent's tool could
# keep the login for good, and by refreshing it (refresh tokens rotate) log the service
# out for every user.
WITHHELD_LOGIN_FIELDS = frozenset({"refreshToken"})
# What a request may leave in a one-shot agent's Claude config dir that Claude Code reads
# as instructions, settings or conversations (emptied before the agent is reused).
CONFIG_ENTRIES_EMPTIED = (
    "CLAUDE.md",
    "CLAUDE.local.md",
    "settings.json",
    "settings.local.json",
    "agents",
    "commands",
    "skills",
    "hooks",
    "projects",
    "todos",
)


def is_passed(
    name: str, *, use_api_key: bool, extra: frozenset[str], proxied: bool = False
) -> bool:
    """Whether the service's variable ``name`` reaches agents.

    ``proxied``: agents reach the model API through the model proxy; its variables
    (:data:`MODEL_VARIABLES`) are then set for each agent, never passed on, whatever
    ``AGENT_ENV`` says.
    """
    if name in PER_AGENT_VARIABLES or (proxied and name in MODEL_VARIABLES):
        return False
    if name in extra or name in PASSED_VARIABLES:
        return True
    if name.startswith(API_PREFIX):
        return use_api_key
    return name.startswith(PASSED_PREFIXES)


def agent_environment(
    environ: Mapping[str, str],
    *,
    use_api_key: bool,
    extra: frozenset[str] = frozenset(),
    proxied: bool = False,
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Split the service's environment into what agents get and what they must not see.

    Returns ``(passed, withheld)``: the variables passed on (plus the fixed ones),
    and the names of every other variable but the per-agent ones (which the
    launcher sets for each agent). The SDK merges the service's whole
    environment under the options' ``env``, so the withheld names are set to ""
    there, and removed altogether inside the sandbox.
    """
    passed = {
        name: value
        for name, value in environ.items()
        if is_passed(name, use_api_key=use_api_key, extra=extra, proxied=proxied)
    }
    passed.update(FIXED_VARIABLES)
    # (The model's variables are set for each agent: bubblewrap must not unset them.)
    per_agent = PER_AGENT_VARIABLES | (MODEL_VARIABLES if proxied else frozenset())
    withheld = tuple(
        sorted(name for name in environ if name not in passed and name not in per_agent)
    )
    return passed, withheld


def service_claude_dir(environ: Mapping[str, str]) -> Path:
    """The service's own Claude config dir: where ``claude login`` put its credentials."""
    configured = environ.get("CLAUDE_CONFIG_DIR", "").strip()
    if configured:
        return Path(configured).expanduser().absolute()
    return Path(environ.get("HOME") or Path.home()).absolute() / ".claude"


def bundled_cli() -> Path | None:
    """The Claude Code CLI inside the claude-agent-sdk wheel (what the SDK runs by default)."""
    import claude_agent_sdk

    path = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    return path if path.is_file() else None


def resolve_cli(executable: str | None) -> Path:
    """The CLI the launcher execs: ``CLAUDE_EXECUTABLE``, else the bundled one, else PATH."""
    if executable:
        return Path(executable).absolute()
    found = bundled_cli() or (Path(w) if (w := shutil.which("claude")) else None)
    if found is None:
        raise FileNotFoundError(
            "no Claude Code CLI: the claude-agent-sdk wheel bundles none for this platform "
            "and `claude` is not on PATH; set CLAUDE_EXECUTABLE"
        )
    return found


# --- the agents' OS user ----------------------------------------------------


@attrs.frozen
class AgentUser:
    """The unprivileged OS user a root service's agents run as (``AGENT_UID``).

    One uid (and a group of the same number) for every agent, not one per agent:
    a user's session agents share that user's HOME and find there what the last of
    them left, so a uid per agent would mean a change of owner of the whole HOME at
    every start, and, without the sandbox, a recycled uid handing one user's files
    and left-over processes to the next. With the sandbox, agents see nothing of
    each other's anyway; the uid keeps them from root's files and powers.
    """

    uid: int
    setpriv: str
    env: str = "/usr/bin/env"
    # What the launcher keeps for setpriv in the sandbox (see bwrap_arguments).
    CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")

    @property
    def gid(self) -> int:
        return self.uid

    def command(self, cwd: Path) -> list[str]:
        """The argv up to the program: become the user, with no capability left, in ``cwd``.

        (The change of directory comes after: the agent's directories are its own, mode
        0700, and bubblewrap, with no capability left, cannot enter them.)
        """
        return [
            self.setpriv,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",  # (a setuid program, sudo say, gives nothing)
            "--",
            self.env,
            f"--chdir={cwd}",
        ]

    def can_pass(self, directory: Path) -> bool:
        """Whether this user may go through ``directory`` (search permission). Blocking."""
        info = os.stat(directory)
        if info.st_uid == self.uid:
            return bool(info.st_mode & stat.S_IXUSR)
        if acl.user_may_search(directory, self.uid):  # (given by open_walls)
            return True
        if info.st_gid == self.gid:
            return bool(info.st_mode & stat.S_IXGRP)
        return bool(info.st_mode & stat.S_IXOTH)

    def open_walls(self, paths: Sequence[Path], *, inside: bool) -> list[Path]:
        """Give this user search permission, by an ACL entry, on every wall on the way to
        ``paths`` (:meth:`walls`); the directories it was given on. Blocking.

        For agents without the sandbox, which reach DATA_DIR and the CLI by their real
        paths: a clone under ``/root`` (0700) is otherwise out of their reach. Passing
        through is all it gives (``--x``: no listing), to this user only. Raises OSError
        where a directory cannot take the ACL (a filesystem without ACLs).
        """
        opened: list[Path] = []
        for _ in range(64):  # (each round opens the highest wall left; a path is not deeper)
            walls = self.walls(paths, inside=inside)
            if not walls:
                return opened
            for wall in walls:
                acl.grant_search(wall, self.uid)
                opened.append(wall)
        raise OSError(f"walls keep appearing on the way to {', '.join(map(str, paths))}")

    def walls(self, paths: Sequence[Path], *, inside: bool) -> tuple[Path, ...]:
        """The highest directories on the way to ``paths`` this user cannot pass. Blocking.

        ``inside``: ``paths`` themselves must be passable too (a directory the agent
        enters), else only their ancestors. Links are resolved first.
        """
        found: list[Path] = []
        for path in paths:
            real = Path(os.path.realpath(path))
            way = [*reversed(real.parents), real] if inside else list(reversed(real.parents))
            for directory in way:
                if any(directory.is_relative_to(wall) for wall in found):
                    break
                try:
                    passable = self.can_pass(directory)
                except FileNotFoundError:
                    break  # made later, by the service (DATA_DIR's insides)
                if not passable:
                    found.append(directory)
                    break
        return tuple(dict.fromkeys(found))


def write_accounts(directory: Path, user: AgentUser) -> None:
    """Write the ``passwd`` and ``group`` a sandboxed agent is shown into ``directory``.

    The host's, plus an entry naming ``user`` (:data:`AGENT_ACCOUNT`) when it has none:
    tools look their user up (``whoami``, ``ssh``, Python's ``pwd``) and fail on a uid
    without a name. Written once (at the first agent's start); blocking.
    """
    for name, entry in (
        (
            "passwd",
            f"{AGENT_ACCOUNT}:x:{user.uid}:{user.gid}:Claude Code agent:/nonexistent:/bin/sh",
        ),
        ("group", f"{AGENT_ACCOUNT}:x:{user.gid}:"),
    ):
        path = directory / name
        if path.exists():
            continue
        try:
            host = Path("/etc", name).read_text()
        except OSError:
            host = ""
        number = str(user.uid if name == "passwd" else user.gid)
        known = any(line.split(":")[2:3] == [number] for line in host.splitlines())
        if host and not host.endswith("\n"):
            host += "\n"
        temporary = path.with_name(f".{name}.{os.getpid()}.tmp")
        temporary.write_text(host if known else host + entry + "\n")
        temporary.chmod(0o644)
        temporary.replace(path)


def install_paths(cli: Path, path: str | None) -> tuple[Path, ...]:
    """What of the install an agent runs: the CLI, and for a script its interpreter.

    The bundled CLI is one self-contained executable. A ``CLAUDE_EXECUTABLE`` script
    (``#!/usr/bin/env python3``, looked up on the agents' ``path``) needs its
    interpreter's installation (``<prefix>/bin/python3``: the prefix), and a
    virtualenv's interpreter its venv too. Blocking.
    """
    shown = [Path(os.path.realpath(cli))]
    try:
        with open(cli, "rb") as file:
            first = file.readline(512)
    except OSError:
        return tuple(shown)
    if not first.startswith(b"#!"):
        return tuple(shown)
    words = first[2:].decode(errors="replace").split()
    if words and Path(words[0]).name == "env" and len(words) > 1:
        words = [shutil.which(words[1], path=path) or words[1], *words[2:]]
    if not words:
        return tuple(shown)
    interpreter = Path(words[0])
    venv = interpreter.parent.parent
    if (venv / "pyvenv.cfg").is_file():
        shown.append(Path(os.path.realpath(venv)))
    prefix = Path(os.path.realpath(interpreter)).parent.parent
    if prefix != Path("/"):
        shown.append(prefix)
    return tuple(dict.fromkeys(shown))


# --- the agents' network ----------------------------------------------------

# Inside a sandboxed agent's network namespace: the ports its bridges listen on
# (model_proxy.py serves the model socket; egress.py the egress one).
SANDBOX_MODEL_PORT = 8480
SANDBOX_EGRESS_PORT = 3128
# The Unix sockets in DATA_DIR/run the bridges forward to.
MODEL_PROXY_SOCKET = "model-proxy.sock"
EGRESS_PROXY_SOCKET = "egress-proxy.sock"
# How long the bridges get to listen before the CLI starts (else the agent fails to start).
BRIDGE_READY_S = 5


@attrs.frozen
class Bridge:
    """One port of a sandboxed agent's loopback (127.0.0.1) forwarded to a Unix socket.

    ``socket``: the service's socket (outside), bound at the same path into the sandbox,
    where ``socat`` (run as the agent's user) connects to it for each connection.
    """

    port: int
    socket: Path


@attrs.frozen
class AgentNetwork:
    """A sandboxed agent's network: a namespace of its own, its loopback alone.

    Nothing of the host's network is reachable from it: not the host's loopback (what
    other agents, the service or anything else serve on 127.0.0.1), not the service's
    port, not the Internet. ``bridges`` are the way out, each a port of the agent's
    loopback forwarded to a socket of the service (the model proxy, the egress proxy);
    ``env`` is what the agent's environment gets for them (``HTTPS_PROXY``...).
    """

    socat: str
    bridges: tuple[Bridge, ...]
    env: Mapping[str, str] = attrs.field(factory=dict)

    def bwrap_arguments(self) -> list[str]:
        """bwrap's options: the namespace (``lo`` up, nothing else), the sockets bound in."""
        args = ["--unshare-net"]
        for bridge in self.bridges:
            path = os.path.realpath(bridge.socket)
            # (-try: a service not listening yet, `claude-code-api check`'s probe; the
            # bridge then finds no socket, and the agent's connection is refused.)
            args += _way_to(path) + ["--bind-try", path, path]
        return args

    def wrap(self, program: Sequence[str]) -> list[str]:
        """``program`` run once the bridges listen: a shell starts them, waits, runs it.

        The bridges run as the agent's user, in its sandbox; they are the agent's
        processes (its pid namespace, process group and cgroup). The shell waits for
        ``program`` and then ends them: the sandbox ends when its last process does.
        Ready means listening (``/proc/net/tcp``, the namespace's own); an agent whose
        bridge ends or does not listen within :data:`BRIDGE_READY_S` fails to start, saying
        so.
        """
        lines = ["bridges="]
        for n, bridge in enumerate(self.bridges):
            listen = f"TCP-LISTEN:{bridge.port},bind=127.0.0.1,fork,reuseaddr,nodelay"
            target = f"UNIX-CONNECT:{os.path.realpath(bridge.socket)}"
            socat = shlex.join([self.socat, "-lf/dev/null", listen, target])
            lines.append(f'{socat} </dev/null >/dev/null 2>&1 & b{n}=$!; bridges="$bridges $!"')
        # (With the shell's builtins only: a fork per poll costs more than the wait.)
        lines.append(
            "listening() { while read -r _ local _ state _; do "
            '[ "$local" = "0100007F:$1" ] && [ "$state" = 0A ] && return 0; '
            "done </proc/net/tcp; return 1; }"
        )
        lines.append("n=0")
        for n, bridge in enumerate(self.bridges):
            lines.append(
                f"until listening {bridge.port:04X}; do n=$((n+1)); kill -0 $b{n} 2>/dev/null && "
                f"[ $n -le {BRIDGE_READY_S * 500} ] || {{ echo \"the agent's network bridge "
                f'(socat) does not listen on port {bridge.port}" >&2; kill $bridges 2>/dev/null; '
                "exit 1; }; sleep 0.002; done"
            )
        lines.append('"$@"; status=$?; kill $bridges 2>/dev/null; exit $status')
        return ["/bin/sh", "-c", "\n".join(lines), "bridge", *program]


# --- the sandbox ------------------------------------------------------------


def bwrap_arguments(
    spec: AgentSpec,
    *,
    hidden: list[Path],
    credentials: Path | None,
    unset: tuple[str, ...],
    limits: AgentLimits,
    shown: Sequence[Path] = (),
    walls: Sequence[Path] = (),
    user: AgentUser | None = None,
    accounts: Path | None = None,
    network: AgentNetwork | None = None,
) -> list[str]:
    """bubblewrap's options for one agent (everything between ``bwrap`` and ``--``).

    Paths bwrap mounts on are given with their links resolved: bwrap refuses a mount point
    reached through a link (``/var/run`` -> ``/run``, a ``DATA_DIR`` on a linked volume).
    ``shown``: what of the install the agent runs (:func:`install_paths`), bound back
    read-only wherever it is (under ``/tmp``, which the sandbox replaces, or a wall).
    ``walls``: directories on the way to HOME or the install that ``user`` cannot pass
    (``/root``, mode 0700): replaced by empty ones, through which bwrap makes the way.
    ``user``: the OS user the agent becomes (a service running as root), with
    :meth:`AgentUser.command` after ``--``. ``accounts``: a directory holding the
    ``passwd`` and ``group`` the agent is shown, which name its user (:func:`write_accounts`).
    ``limits``: the sizes of its writable tmpfs (agent_limits). ``network``: a network
    namespace of its own and its bridges' sockets (None: the host's network).
    """
    # (HOME's own path is the service's; inside it, the agent's links are never followed.)
    home = os.path.realpath(spec.home)
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # /tmp and /dev/shm sized (AGENT_TMP_MB), /dev read-only: see agent_limits.
    args += limits.scratch_mounts()
    # The kernel's settings, read-only: root needs no capability to write most of them
    # (kernel.core_pattern and kernel.modprobe name programs the kernel runs as root,
    # outside the sandbox), and bwrap covers them only when it sees them writable.
    args += ["--ro-bind", "/proc/sys", "/proc/sys"]
    args += ["--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger"]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    # Started by root, bwrap leaves the sandbox every capability: with CAP_SYS_ADMIN
    # an agent remounts the read-only binds writable and unmounts what hides DATA_DIR.
    args += ["--cap-drop", "ALL"]
    if user is not None:
        # Only what setpriv needs to become the agent's user and empty the bounding set;
        # the change of uid then clears them all before the CLI runs.
        args += [arg for cap in AgentUser.CAPS for arg in ("--cap-add", cap)]
    for wall in walls:
        args += ["--size", str(HIDDEN_TMPFS_BYTES), "--tmpfs", os.path.realpath(wall)]
    for install in dict.fromkeys(os.path.realpath(path) for path in shown):
        args += _way_to(install) + ["--ro-bind", install, install]
    # (After the install: hidden directories stay hidden even when it lies inside one.)
    for path in dict.fromkeys(Path(os.path.realpath(path)) for path in hidden):
        if path.is_dir():
            args += ["--size", str(HIDDEN_TMPFS_BYTES), "--tmpfs", str(path)]
        elif path.exists():
            args += ["--ro-bind", "/dev/null", str(path)]
    args += _way_to(home) + ["--bind", home, home]
    if spec.own_workspace:  # (WORKSPACES_DIR, hidden: only the user's own shown)
        workspace = os.path.realpath(spec.cwd)
        args += _way_to(workspace) + ["--bind", workspace, workspace]
    if network is not None:  # (after DATA_DIR is hidden: the sockets are in it)
        args += network.bwrap_arguments()
    if credentials is not None:
        config = Path(home, spec.config_dir.relative_to(spec.home), CREDENTIALS_FILE)
        args += ["--ro-bind", str(credentials), str(config)]
    if accounts is not None:
        for name in ACCOUNT_FILES:
            args += ["--ro-bind", str(accounts / name), f"/etc/{name}"]
    for name in unset:
        args += ["--unsetenv", name]
    # Absolute: bwrap changes directory inside the new root, where a relative DATA_DIR (its
    # default, "data") means nothing. An agent with a user of its own starts in "/" (see
    # AgentUser.command: bwrap, its capabilities gone, cannot enter the agent's 0700 HOME).
    if spec.own_workspace:
        cwd = os.path.realpath(spec.cwd)
    else:
        cwd = str(Path(home, spec.cwd.relative_to(spec.home)))
    args += ["--chdir", "/" if user is not None else cwd]
    return args


def _way_to(path: str) -> list[str]:
    """bwrap's options making the directories above ``path`` where they are missing (0755).

    bwrap would make them itself for a mount on ``path``, but as private as what is
    mounted: an agent running as a user of its own could not pass them.
    """
    parents = reversed(Path(path).parents[:-1])  # (not "/")
    return [arg for parent in parents for arg in ("--dir", str(parent))]


def probe_sandbox(bwrap: str | None) -> str | None:
    """Check that bubblewrap can build the agents' sandbox here; the reason it cannot, or None.

    Blocking (runs bwrap once, ~10 ms): call it at start-up, before the event loop.
    """
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    command = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    command += ["--ro-bind", "/proc/sys", "/proc/sys"]
    command += AgentLimits(tmp_mb=1).scratch_mounts()  # (bwrap >= 0.7 has --size)
    command += ["--unshare-pid", "--unshare-ipc", "--cap-drop", "ALL"]
    command += ["--", "true"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap cannot run: {exc}"
    if done.returncode != 0:
        detail = " ".join(done.stderr.split())[:300] or f"exit code {done.returncode}"
        return f"bubblewrap cannot create a sandbox here: {detail}"
    return None


# --- the launcher -----------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
# Start-up probe: the CLI's --version, through the launcher (sandbox, OS user).
PROBE_TIMEOUT_S = 30


@attrs.frozen
class AgentLauncher:
    """Everything the service decided once about launching agents; writes their launchers.

    ``bwrap`` is the bubblewrap executable when agents run sandboxed, else None.
    ``hidden``: paths agents must not see (with the sandbox). ``credentials``:
    None with the model proxy (``proxied``: the service's launcher; agents then get no
    login at all, and one an earlier version left in a HOME is removed). Else the
    service's Claude credentials file, shown read-only to every agent (the
    CLI needs it to log in) when it exists: with the sandbox, a copy of its
    login without the refresh token (:func:`login_for_agents`), beside the
    launcher; without, the file itself through a symlink.

    ``user``: the OS user agents become (a service running as root; None: they run
    as the service's). Their HOMEs are made theirs; the copy of the login is theirs
    to read, and without the sandbox it is written in their config dir (they cannot
    follow a link into the service's). ``shown`` and ``walls``: see
    :func:`bwrap_arguments`.
    """

    cli: Path
    run_dir: Path
    env: dict[str, str]
    withheld: tuple[str, ...]
    bwrap: str | None
    hidden: tuple[Path, ...]
    credentials: Path | None
    setsid: str | None = attrs.field(factory=lambda: shutil.which("setsid"))
    # RLIMIT_FSIZE in bytes for an agent starting now (the disk quota: disk_quota.py),
    # set through util-linux's prlimit; None: no limit.
    max_file_size: Callable[[], int] | None = None
    prlimit: str | None = attrs.field(factory=lambda: shutil.which("prlimit"))
    user: AgentUser | None = None
    shown: tuple[Path, ...] = ()
    walls: tuple[Path, ...] = ()
    limits: AgentLimits = attrs.field(factory=AgentLimits)
    # Agents reach the model API through the model proxy (model_proxy.py): the model's
    # variables are blank here, and each agent gets the proxy's address and its token.
    proxied: bool = False
    # A network namespace per agent, with the sandbox only (None: the host's network).
    network: AgentNetwork | None = None

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None

    @property
    def own_network(self) -> AgentNetwork | None:
        """The agents' network namespace, if they get one (the sandbox is on)."""
        return self.network if self.sandboxed else None

    def environment(self, spec: AgentSpec) -> dict[str, str]:
        """The ``env`` option for ``spec``'s process (withheld names blanked)."""
        env = {name: "" for name in self.withheld}
        env.update(self.env)
        if self.proxied:  # (model_proxy.model_env fills them in for an agent that calls)
            env.update({name: "" for name in MODEL_VARIABLES})
        env["HOME"] = str(spec.home)
        env["CLAUDE_CONFIG_DIR"] = str(spec.config_dir)
        # The CLI's scratch files and its messaging socket (through which another CLI
        # of the same OS user could start a turn in this one) stay in the agent's home.
        env["CLAUDE_CODE_TMPDIR"] = str(spec.home / "tmp")
        if self.sandboxed:
            # /tmp is the agent's own already. The messaging socket goes to
            # $XDG_RUNTIME_DIR/cc-socks/ when set: there its path names no user, and
            # every bound socket's path is in /proc/net/unix (the host's network).
            env["XDG_RUNTIME_DIR"] = "/tmp"
        else:
            env["TMPDIR"] = str(spec.home / "tmp")
            env["XDG_RUNTIME_DIR"] = ""  # (the service's own, withheld as before)
        if self.user is not None:  # (not the service's: root)
            env["USER"] = env["LOGNAME"] = AGENT_ACCOUNT
        if (network := self.own_network) is not None:
            env.update(network.env)
        return env

    def launcher_path(self, spec: AgentSpec, agent_id: str) -> Path:
        return self.run_dir / f"{_SAFE_NAME.sub('_', spec.name)}-{agent_id}.sh"

    def prepare(self, spec: AgentSpec, agent_id: str, program: Sequence[str] = ()) -> Path:
        """Create the agent's directories and write its launcher; returns the launcher.

        ``program``: what the launcher runs instead of the CLI (the start-up probe).
        Blocking: run it in a worker thread. Raises OSError when a directory or
        the launcher cannot be written (a full disk, a bad ``DATA_DIR``).
        """
        group = None if self.user is None else self.user.gid
        if self.user is None:
            for directory in (spec.cwd, spec.config_dir, spec.home / "tmp"):
                directory.mkdir(parents=True, exist_ok=True)
        spec.home.parent.mkdir(parents=True, exist_ok=True)
        _keep_private(spec.home.parent, group=group)
        if spec.own_workspace:
            spec.cwd.parent.mkdir(parents=True, exist_ok=True)
            _keep_private(spec.cwd.parent, group=group)
        credentials = self.credentials if self.credentials and self.credentials.is_file() else None
        if self.user is not None:
            _make_home(spec, self.user, None if self.sandboxed else credentials)
            if spec.own_workspace:
                _make_workspace(spec.cwd, self.user)
        else:
            self._link_credentials(spec, credentials)
        if self.proxied:
            # A login an earlier version left in a user's HOME (a copy, or a link to the
            # service's file): with the proxy, no agent holds one.
            _remove_login(spec)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.user is not None and self.sandboxed:
            write_accounts(self.run_dir, self.user)
        path = self.launcher_path(spec, agent_id)
        cgroup = self.cgroup(path)
        try:
            if self.sandboxed and credentials is not None:
                credentials = self._copy_login(credentials, credentials_copy_path(path), self.user)
            if cgroup is not None:
                self.limits.create_cgroup(cgroup)
            max_file_size = self.max_file_size() if self.max_file_size is not None else None
            text = self.script(
                spec, credentials, program, cgroup=cgroup, max_file_size=max_file_size
            )
            path.write_text(text)
            path.chmod(0o700)
        except BaseException:
            # (a full disk: the launcher half written) Nothing of it may outlive the failure:
            # the caller has no launcher to clean up after.
            self.cleanup(attrs.evolve(spec, ephemeral=False), path)
            raise
        return path

    def cgroup(self, launcher: Path) -> AgentCgroup | None:
        """The cgroup of the agent started by ``launcher`` (None: agents get none here)."""
        return self.limits.cgroup(launcher.stem)

    def script(
        self,
        spec: AgentSpec,
        credentials: Path | None,
        program: Sequence[str] = (),
        *,
        cgroup: AgentCgroup | None = None,
        max_file_size: int | None = None,
    ) -> str:
        """The launcher's text: a POSIX shell script that execs the CLI with the given argv.

        ``program``: what to run instead of the CLI (the start-up probe).
        With ``cgroup``, the script first moves itself into it (agent_limits), while it
        still runs as the service's user: the agent's own user could not.
        ``max_file_size``: the agent's RLIMIT_FSIZE (soft and hard, so it cannot raise
        it), which every process it starts inherits.
        """
        command: list[str] = []
        if max_file_size is not None and self.prlimit is not None:
            command += [self.prlimit, f"--fsize={max_file_size}:{max_file_size}", "--"]
        if self.setsid:
            command.append(self.setsid)
        if self.bwrap is not None:
            hidden = [*self.hidden, *HIDDEN_RUNTIME_DIRS, *HIDDEN_SOCKETS]
            command += [self.bwrap]
            command += bwrap_arguments(
                spec,
                hidden=hidden,
                credentials=credentials,
                unset=self.withheld,
                shown=self.shown,
                walls=self.walls,
                user=self.user,
                accounts=self.run_dir if self.user is not None else None,
                limits=self.limits,
                network=self.own_network,
            )
            command += ["--"]
            command += self.limits.inner_command()  # RLIMIT_NPROC, without a pids cgroup
        if self.user is not None:
            # Absolute: it changes directory after bwrap's "/" (or the SDK's cwd), where a
            # relative DATA_DIR (its default, "data") means nothing.
            command += self.user.command(Path(os.path.realpath(spec.cwd)))
        program = program or [str(self.cli)]
        if (network := self.own_network) is not None:
            program = network.wrap(program)
        command += program
        join = cgroup.join_script() if cgroup is not None else ""
        return (
            "#!/bin/sh\n"
            f"# claude-code-api agent launcher for {spec.name}; removed when the agent closes.\n"
            f"{join}"
            f'exec {shlex.join(command)} "$@"\n'
        )

    def probe(self, home: Path) -> str | None:
        """Start what an agent would start, as it would, in ``home``; why it fails, or None.

        The launcher (sandbox, OS user, environment) runs a shell that checks the
        agent can write its config dir, then execs the CLI with ``--version``.
        Blocking (~0.1 s): call it at start-up.
        """
        spec = AgentSpec(name="start-up probe", home=home, ephemeral=True)
        check = 'test -w "$0" || { echo "cannot write $0" >&2; exit 1; }; exec "$1" --version'
        if self.own_network is not None:  # (its bridges listen: see AgentNetwork.wrap)
            check = (
                '[ "$(grep -c : /proc/net/dev)" = 1 ] || '
                '{ echo "the agent has network interfaces other than its loopback" >&2; exit 1; }; '
                + check
            )
        program = ["/bin/sh", "-c", check, str(spec.config_dir), str(self.cli)]
        path: Path | None = None
        try:
            try:
                path = self.prepare(spec, "probe", program)
            except OSError as exc:  # (as SdkAgent.start says it)
                return f"cannot prepare the agent's directory {home}: {exc.strerror or exc}"
            done = subprocess.run(
                [str(path)],
                env={**os.environ, **self.environment(spec)},
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot start an agent: {exc}"
        finally:
            self.cleanup(spec, path)
        if done.returncode != 0:
            detail = " ".join(done.stderr.split())[-300:] or f"exit code {done.returncode}"
            return f"an agent cannot start: {detail}"
        return None

    @staticmethod
    def _copy_login(credentials: Path, copy: Path, user: AgentUser | None) -> Path:
        """Write what an agent is shown of ``credentials`` to ``copy`` (mode 0600); returns it.

        Owned by ``user`` when given: the agent's, to read, and nobody else's.
        """
        data = login_for_agents(credentials.read_bytes())
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if user is not None:
                os.fchown(fd, user.uid, user.gid)
            os.write(fd, data)
        finally:
            os.close(fd)
        return copy

    def _link_credentials(self, spec: AgentSpec, credentials: Path | None) -> None:
        """Without the sandbox, the agent's config dir gets a symlink to the service's credentials.

        (With it, bubblewrap binds the file read-only in its place.) A symlink,
        not a copy: a refreshed login reaches every agent.
        """
        link = spec.config_dir / CREDENTIALS_FILE
        if self.sandboxed or credentials is None:
            return
        if link.is_symlink() and os.readlink(link) == str(credentials):
            return
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(credentials)

    def empty_home(self, spec: AgentSpec) -> None:
        """Remove every file a request left in ``spec``'s HOME, for the same user's next one.

        For a one-shot agent kept for its user's next request (``Agent.reset``):
        the workspace and the scratch directory are emptied in place (the process
        keeps its working directory), everything else in the HOME is removed, but
        in Claude Code's config dir only what it would read as instructions or
        settings (:data:`CONFIG_ENTRIES_EMPTIED`): the rest there is the CLI's own
        bookkeeping. Blocking.

        Everything is removed through directory descriptors opened without following
        symbolic links, never by path: a process the request left running may swap a
        directory for a link to another user's home while this runs, and must not
        make the service (which can write there) delete anything outside this HOME.

        Raises OSError when something cannot be removed, or a directory the
        process relies on is gone or replaced (the agent is then not reused).
        """
        emptied = (spec.cwd.name, "tmp")
        config = spec.config_dir.name
        home_fd = _open_directory(spec.home)
        try:
            for name in os.listdir(home_fd):
                if name not in (*emptied, config):
                    _remove_at(home_fd, name)
            for directory in (*emptied, config):
                directory_fd = _open_directory(directory, dir_fd=home_fd)
                try:
                    names = CONFIG_ENTRIES_EMPTIED if directory == config else None
                    for name in names or os.listdir(directory_fd):
                        _remove_at(directory_fd, name)
                finally:
                    os.close(directory_fd)
        finally:
            os.close(home_fd)

    def cleanup(self, spec: AgentSpec, launcher: Path | None) -> None:
        """Remove what :meth:`prepare` made that must not outlive the agent. Blocking."""
        if launcher is not None:
            launcher.unlink(missing_ok=True)
            credentials_copy_path(launcher).unlink(missing_ok=True)
            if (cgroup := self.cgroup(launcher)) is not None:
                cgroup.remove()  # (kills what is left in it first)
        if spec.ephemeral:
            remove_tree(spec.home)


def credentials_copy_path(launcher: Path) -> Path:
    """Where the copy of the login a sandboxed agent is shown lives: beside its launcher."""
    return launcher.with_name(f"{launcher.stem}{CREDENTIALS_FILE}")


def login_for_agents(data: bytes) -> bytes:
    """The credentials file ``data`` as an agent is shown it: its login, no refresh token.

    Only the Claude login is kept (the CLI may keep other tokens in the file, an MCP
    server's for one), without :data:`WITHHELD_LOGIN_FIELDS`. A file that holds no
    login (not JSON, not an object) is shown as an empty object: the CLI could not
    use it either.
    """
    try:
        document = json.loads(data)
    except ValueError:  # (UnicodeDecodeError included)
        document = None
    login = document.get(LOGIN_KEY) if isinstance(document, dict) else None
    if not isinstance(login, dict):
        return b"{}\n"
    shown = {key: value for key, value in login.items() if key not in WITHHELD_LOGIN_FIELDS}
    return (json.dumps({LOGIN_KEY: shown}) + "\n").encode()


# Directories of Claude Code's config dir that hold one entry per conversation, named by its
# id: its shell environment, and the copies of files it edited (its checkpoints).
PER_SESSION_DIRECTORIES = ("session-env", "file-history")


def remove_conversation_files(home: Path, claude_session_id: str) -> None:
    """Remove what Claude Code keeps for one conversation in ``home``'s config dir. Blocking.

    Its transcript (``projects/<cwd slug>/<id>.jsonl``) and what sits beside it
    (``projects/<cwd slug>/<id>/``: tool results, subagents), in every slug, and
    ``session-env/<id>`` and ``file-history/<id>`` (:data:`PER_SESSION_DIRECTORIES`). As
    :meth:`AgentLauncher.empty_home`, through directory descriptors opened without
    following links: the user's agents can write in ``home`` and may have made
    ``projects`` or a slug a link to somewhere else, where nothing is removed.
    The id came from the agent too: one that is not a plain file name (``/``,
    ``.``, ``..``) is refused. A missing ``home``, config dir or ``projects`` is fine.

    Raises OSError when something cannot be removed (after trying everything
    else), when the id is refused, or when a directory on the way is a link
    (nothing under it is removed).
    """
    if not _is_plain_name(claude_session_id):
        raise OSError(f"{claude_session_id!r} is not a session id: nothing removed")
    names = (f"{claude_session_id}.jsonl", claude_session_id)
    config = AgentSpec(name="", home=home, ephemeral=False).config_dir
    failures: list[str] = []
    opened: list[int] = []
    try:
        try:
            # HOME is ours (made by the service); from its config dir on, the agents'.
            opened.append(_open_directory(home))
            for name in (config.name, "projects"):
                opened.append(_open_directory(name, dir_fd=opened[-1]))
        except FileNotFoundError:
            return
        except NotADirectoryError as exc:  # (O_NOFOLLOW refuses a link as one)
            raise OSError(f"{exc.filename} in {home} is not a directory: nothing removed") from exc
        projects_fd = opened[-1]
        for per_session in PER_SESSION_DIRECTORIES:
            try:
                directory_fd = _open_directory(per_session, dir_fd=opened[1])
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                _remove_at(directory_fd, claude_session_id)
            except OSError as exc:
                failures.append(f"{per_session}/{claude_session_id}: {exc.strerror or exc}")
            finally:
                os.close(directory_fd)
        for slug in os.listdir(projects_fd):
            try:
                slug_fd = _open_directory(slug, dir_fd=projects_fd)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone, a file, or a link: nothing of ours under it
            except OSError as exc:  # unreadable: the other slugs all the same
                failures.append(f"{slug!r}: {exc.strerror}")  # (names are the agents': quoted)
                continue
            try:
                for name in names:
                    try:
                        _remove_at(slug_fd, name)
                    except OSError as exc:
                        failures.append(f"{slug + '/' + name!r}: {exc.strerror or exc}")
            finally:
                os.close(slug_fd)
    finally:
        for fd in opened:
            os.close(fd)
    if failures:
        raise OSError("; ".join(failures))


def empty_user_home(home: Path, keep: str = "CLAUDE.md") -> None:
    """Remove everything in a user's HOME but their ``.claude/<keep>`` (their CLAUDE.md). Blocking.

    For a user with no session left (no agent runs there): the workspace, the
    transcripts and whatever their tools left go; their CLAUDE.md stays, and the
    HOME itself when it holds one. As :func:`remove_conversation_files`, through
    directory descriptors that never follow a link. Raises OSError when something
    cannot be removed.
    """
    config = AgentSpec(name="", home=home, ephemeral=False).config_dir.name
    try:
        home_fd = _open_directory(home)
    except FileNotFoundError:
        return
    kept = False
    try:
        for name in os.listdir(home_fd):
            if name != config:
                _remove_at(home_fd, name)
                continue
            try:
                config_fd = _open_directory(name, dir_fd=home_fd)
            except NotADirectoryError:
                _remove_at(home_fd, name)
                continue
            try:
                for entry in os.listdir(config_fd):
                    if entry == keep and stat.S_ISREG(
                        os.stat(entry, dir_fd=config_fd, follow_symlinks=False).st_mode
                    ):
                        kept = True
                    else:
                        _remove_at(config_fd, entry)
            finally:
                os.close(config_fd)
            if not kept:
                os.rmdir(name, dir_fd=home_fd)
    finally:
        os.close(home_fd)
    if not kept:
        os.rmdir(home)


def _make_home(spec: AgentSpec, user: AgentUser, credentials: Path | None) -> None:
    """Make ``spec``'s HOME and its directories ``user``'s; write its login copy. Blocking.

    The HOME's parent is the service's, so the HOME's own path is stable; inside it
    everything is reached through directory descriptors that never follow a link (the
    agents own it and may have left links there). A HOME that is not ``user``'s yet (a
    new one, one an earlier version made as root, another ``AGENT_UID``) is given to it
    whole; what the service itself writes there (the user's CLAUDE.md, made by root
    mode 0600, and the directories above it) is given again at every start.
    ``credentials``: written (what :func:`login_for_agents` shows) as
    ``.claude/.credentials.json``, the agent's own, mode 0600.
    """
    try:
        os.mkdir(spec.home, 0o700)
    except FileExistsError:
        pass
    home_fd = _open_directory(spec.home)
    try:
        if os.fstat(home_fd).st_uid != user.uid:
            _give_tree(home_fd, user)
        inside = () if spec.own_workspace else (spec.cwd.name,)
        for name in (*inside, spec.config_dir.name, "tmp"):
            try:
                os.mkdir(name, 0o700, dir_fd=home_fd)
            except FileExistsError:
                pass
            os.chown(name, user.uid, user.gid, dir_fd=home_fd, follow_symlinks=False)
        config_fd = _open_directory(spec.config_dir.name, dir_fd=home_fd)
        try:
            try:
                os.chown(
                    USER_MEMORY_FILE, user.uid, user.gid, dir_fd=config_fd, follow_symlinks=False
                )
            except FileNotFoundError:
                pass
            if credentials is not None:
                data = login_for_agents(credentials.read_bytes())
                _remove_at(config_fd, CREDENTIALS_FILE)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(CREDENTIALS_FILE, flags, 0o600, dir_fd=config_fd)
                try:
                    os.fchown(fd, user.uid, user.gid)
                    os.write(fd, data)
                finally:
                    os.close(fd)
        finally:
            os.close(config_fd)
    finally:
        os.close(home_fd)


def _make_workspace(workspace: Path, user: AgentUser) -> None:
    """Make a workspace outside the HOME (``WORKSPACES_DIR/<name>``, its parent the
    service's) ``user``'s, mode 0700 when new. Blocking. Not followed if it is a link."""
    try:
        os.mkdir(workspace, 0o700)
    except FileExistsError:
        pass
    fd = _open_directory(workspace)
    try:
        if os.fstat(fd).st_uid != user.uid:
            _give_tree(fd, user)
    finally:
        os.close(fd)


def _remove_login(spec: AgentSpec) -> None:
    """Remove ``spec``'s ``.claude/.credentials.json`` (a file or a link), never following a link."""
    try:
        home_fd = _open_directory(spec.home)
    except FileNotFoundError:
        return
    try:
        config_fd = _open_directory(spec.config_dir.name, dir_fd=home_fd)
    except (FileNotFoundError, NotADirectoryError):
        return
    finally:
        os.close(home_fd)
    try:
        _remove_at(config_fd, CREDENTIALS_FILE)
    finally:
        os.close(config_fd)


def _give_tree(top_fd: int, user: AgentUser) -> None:
    """Make everything in the directory ``top_fd`` (itself included) ``user``'s. Blocking.

    os.fwalk walks by descriptors and never follows a link; links themselves change owner.
    """
    os.fchown(top_fd, user.uid, user.gid)
    for _, directories, files, fd in os.fwalk(".", dir_fd=top_fd, follow_symlinks=False):
        for name in (*directories, *files):
            try:
                os.chown(name, user.uid, user.gid, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                pass


def _keep_private(directory: Path, group: int | None = None) -> None:
    """Make ``directory`` (where agents' HOMEs are) mode 0700 if it is looser. Blocking.

    ``group``: the agents' OS group, which needs to pass (without the sandbox, agents
    reach their HOMEs through it): it gets the directory's group, mode 0710.

    An agent owns its HOME: it may make a file setuid there (to the service's user, or
    root) and open its HOME's mode to everyone; another account on the host that can
    get to it runs the file as that user. The HOMEs' parent is out of the agents' reach
    (hidden, or theirs to read only), so the barrier holds. A directory the service does
    not own (an operator's) is left as it is, with a warning.
    """
    # (Followed if it is a link: an operator's volume for the HOMEs is protected the same.)
    info = os.stat(directory)
    mode = stat.S_IMODE(info.st_mode)
    if group is None:
        if not mode & 0o077:
            return
        wanted = 0o700
    else:
        if mode == 0o710 and info.st_gid == group:
            return
        wanted = 0o710
    try:
        if group is not None and info.st_gid != group:
            os.chown(directory, -1, group)
        os.chmod(directory, wanted)
    except OSError:  # not the service's (PermissionError), a read-only mount...
        log.warning(
            "%s is mode %o and not the service's to change: make it %o%s",
            directory,
            mode,
            wanted,
            "" if group is None else f", group {group}",
        )


def _is_plain_name(name: str) -> bool:
    """A file name of one path component: no separator, not ``.`` or ``..``, no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def remove_tree(path: Path) -> None:
    """Remove the directory tree ``path`` whatever it holds; never raises. Blocking.

    shutil.rmtree recurses, so a tree deeper than Python's recursion limit (one
    Bash command makes one) raises RecursionError even when told to ignore
    errors: ``rm -rf`` removes such a tree instead.
    """
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(["rm", "-rf", "--", str(path)], check=False)


def _open_directory(path: Path | str, *, dir_fd: int | None = None) -> int:
    """A descriptor of the directory ``path`` (in ``dir_fd``); OSError if it is a link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in the directory ``dir_fd``: a tree, a file, or a link itself.

    shutil.rmtree with ``dir_fd`` walks by descriptors and refuses a directory that
    became a link; a file that became a directory fails unlink. Missing is fine.
    """
    try:
        is_directory = stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        if is_directory:
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except RecursionError as exc:  # deeper than shutil.rmtree can go: not reused
        raise OSError(f"{name}: directory tree too deep to empty") from exc


def make_launcher(
    *,
    cli: Path,
    data_dir: Path,
    environ: Mapping[str, str],
    use_api_key: bool,
    extra_env: frozenset[str],
    bwrap: str | None,
    user: AgentUser | None = None,
    limits: AgentLimits | None = None,
    proxied: bool = False,
    workspaces_dir: Path | None = None,
) -> AgentLauncher:
    """Build the launcher for this service: the environment split and what to hide.

    ``proxied``: agents reach the model API through the model proxy. ``workspaces_dir``
    (``WORKSPACES_DIR``): hidden like ``data_dir``, each session agent shown its own
    workspace there. Blocking (looks at the install and the directories on the way to it).
    """
    env, withheld = agent_environment(
        environ, use_api_key=use_api_key, extra=extra_env, proxied=proxied
    )
    claude_dir = service_claude_dir(environ)
    home = Path(environ.get("HOME") or Path.home()).absolute()
    own = [data_dir.absolute()] + ([] if workspaces_dir is None else [workspaces_dir.absolute()])
    hidden = (*own, claude_dir, home / ".claude.json")
    shown = install_paths(cli, env.get("PATH"))
    walls: tuple[Path, ...] = ()
    if user is not None:
        walls = user.walls(own, inside=True) + user.walls(shown, inside=False)
    return AgentLauncher(
        cli=cli,
        run_dir=data_dir.absolute() / "run",
        env=env,
        withheld=withheld,
        bwrap=bwrap,
        hidden=hidden,
        # With the model proxy, agents never get the login: the proxy puts it on.
        credentials=None if proxied else claude_dir / CREDENTIALS_FILE,
        user=user,
        shown=shown,
        walls=tuple(dict.fromkeys(walls)),
        limits=limits or AgentLimits(),
        proxied=proxied,
    )
