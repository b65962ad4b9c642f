"""Per-agent control groups: a memory limit and a process bound for each agent.

What it owns: in each cgroup hierarchy it uses, a directory for agents
(:data:`AGENTS_DIRECTORY`, under the service's own cgroup, shared by the services
started from it and left in place), and in it one cgroup per agent, named after
this service's DATA_DIR (:func:`service_prefix`: two services on one host, or the
test suite's many, never touch each other's) and the agent's launcher. An agent's cgroup gets ``memory`` (RAM
and swap, its tmpfs pages included) and ``pids`` (processes *and* threads)
limits; the agent's launcher writes its own pid into it before it execs anything
(:meth:`AgentCgroup.join_script`), so no process of the agent ever runs outside it.

Two layouts are supported, decided once at start-up by :func:`find_cgroups`:

* **v2** (the unified hierarchy, the norm in Docker/k8s and on systemd hosts): the
  service's own cgroup must offer the ``memory`` and ``pids`` controllers (root,
  or a subtree delegated to the service's user). cgroup v2 lets a cgroup hand
  controllers to its children only when it holds no process itself, so the
  processes of the service's cgroup are first moved into a leaf beside the
  agents' directory (:data:`SERVICE_LEAF`), as a container's init does. An agent's
  cgroup sets ``memory.oom.group``: the kernel kills the whole agent at once.
* **v1** (hybrid hosts, where ``memory`` and ``pids`` are v1 hierarchies): one
  directory in each, under the service's own cgroup there.

An agent that passes its memory limit is killed by the kernel's OOM killer in
its cgroup only (v1 kills one process, so the caller kills the rest:
:meth:`AgentCgroup.oom_killed` tells it, ``sdk_agent`` watches it); a fork bomb
meets ``EAGAIN`` at ``pids.max``. Neither reaches the service or other agents.

Resource handling: :meth:`AgentCgroup.remove` kills whatever still runs in the
cgroup and removes it (when the agent closes); :meth:`CgroupTree.remove_leftovers`
removes what a killed service left (at the next start).

Error handling: :func:`find_cgroups` never raises: it returns the reason cgroups
cannot be had (read-only cgroupfs, controllers not delegated, not root), and the
service runs without them (start-up warns once). After that, creating an agent's
cgroup raises OSError (the agent does not start: it would run unbounded), and
:meth:`AgentCgroup.remove` logs what it could not remove, never raises. All of
it is blocking file I/O on cgroupfs: call it from a worker thread, except the
one-file reads :meth:`AgentCgroup.oom_killed` does.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
import shlex
import signal
import time
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
AGENTS_DIRECTORY = "claude-code-api-agents"
# v2: where the processes of the service's own cgroup go, so that it may delegate.
SERVICE_LEAF = "claude-code-api-service"
# Killing what runs in a cgroup: rounds of SIGKILL (a fork may land between two reads).
KILL_ROUNDS = 50
# Removing a cgroup whose last processes are still exiting: tries, and the pause between.
REMOVE_TRIES = 40
REMOVE_PAUSE_S = 0.025


class Version(enum.StrEnum):
    V1 = "v1"
    V2 = "v2"


def parse_own_cgroups(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as ``{controller: path}``; the v2 entry under ``""``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not number or not path:
            continue
        if number == "0" and controllers == "":
            found[""] = path
        for controller in controllers.split(","):
            if controller:
                found[controller] = path
    return found


def parse_cgroup_mounts(text: str) -> dict[str, Path]:
    """``/proc/self/mountinfo``'s cgroup mounts as ``{controller: mount point}``; v2 under ``""``.

    Only mounts of a hierarchy's root (``/`` as the mount's root) are used: a bind of
    a sub-cgroup would need its offset added to every path.
    """
    found: dict[str, Path] = {}
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 10:
            continue
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        fstype, super_options = fields[separator + 1], fields[separator + 3]
        if root != "/":
            continue
        point = Path(mount_point.replace("\\040", " "))
        if fstype == "cgroup2":
            found.setdefault("", point)
        elif fstype == "cgroup":
            for option in super_options.split(","):
                if option in CONTROLLERS:
                    found.setdefault(option, point)
    return found


def service_prefix(data_dir: Path) -> str:
    """What this service's agents' cgroups are named with: the same for the same DATA_DIR."""
    return hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:12]


@attrs.frozen
class AgentCgroup:
    """One agent's cgroup: a directory per hierarchy (v2: one; v1: memory's, pids')."""

    version: Version
    memory: Path
    pids: Path

    @property
    def directories(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((self.memory, self.pids)))

    def join_script(self) -> str:
        """Shell lines that move the running shell (the launcher, before it execs) in."""
        return "".join(
            f"printf '%s\\n' \"$$\" > {shlex.quote(str(directory / 'cgroup.procs'))} || exit 126\n"
            for directory in self.directories
        )

    def create(self, *, memory_bytes: int, max_procs: int) -> None:
        """Make the cgroup and set its limits; OSError if it cannot be (the agent must not start)."""
        for directory in self.directories:
            directory.mkdir(exist_ok=True)
        if self.version is Version.V2:
            _write(self.memory / "memory.max", memory_bytes)
            _write_if_present(self.memory / "memory.swap.max", 0)
            _write(self.memory / "memory.oom.group", 1)
        else:
            _write(self.memory / "memory.limit_in_bytes", memory_bytes)
            # RAM and swap together, no more than RAM alone (absent without swap accounting).
            _write_if_present(self.memory / "memory.memsw.limit_in_bytes", memory_bytes)
        _write(self.pids / "pids.max", max_procs)

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup (0 if it is gone)."""
        name = "memory.events" if self.version is Version.V2 else "memory.oom_control"
        try:
            text = (self.memory / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def oom_killed(self) -> bool:
        """Whether the agent passed its memory limit (some process of it was OOM-killed)."""
        return self.oom_kills() > 0

    def procs_refused(self) -> int:
        """How many forks (or new threads) ``pids.max`` refused in this cgroup (0 if it is gone)."""
        try:
            text = (self.pids / "pids.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "max" and value.strip().isdigit():
                return int(value)
        return 0

    def peak_procs(self) -> int | None:
        """The most processes and threads the agent held at once, where the kernel keeps it."""
        try:
            return int((self.pids / "pids.peak").read_text())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, until none is left (bounded). Blocking."""
        if self.version is Version.V2 and (self.pids / "cgroup.kill").exists():
            try:
                _write(self.pids / "cgroup.kill", 1)
                return
            except OSError as exc:
                log.debug("cgroup.kill in %s: %s", self.pids, exc)
        for _ in range(KILL_ROUNDS):
            pids = _procs(self.pids)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self) -> None:
        """Kill what runs in the cgroup and remove it; logs what it cannot. Never raises."""
        try:
            self.kill()
        except OSError as exc:
            log.warning("cannot kill the processes of cgroup %s: %s", self.pids, exc)
        for directory in self.directories:
            _remove_directory(directory)


@attrs.frozen
class CgroupTree:
    """Where this service makes its agents' cgroups (``memory_base``/``pids_base``: the same in v2).

    ``prefix`` starts the name of each of them (:func:`service_prefix`).
    """

    version: Version
    memory_base: Path
    pids_base: Path
    prefix: str

    def describe(self) -> str:
        if self.version is Version.V2:
            return f"cgroup v2 ({self.memory_base})"
        return f"cgroup v1 ({self.memory_base}, {self.pids_base})"

    def agent(self, name: str) -> AgentCgroup:
        """The cgroup of the agent called ``name`` (a plain file name; nothing made yet)."""
        name = f"{self.prefix}-{name}"
        return AgentCgroup(self.version, self.memory_base / name, self.pids_base / name)

    def remove_leftovers(self) -> int:
        """Remove every agent cgroup a previous run of this service left; how many. Blocking."""
        names: set[str] = set()
        mark = f"{self.prefix}-"
        for base in dict.fromkeys((self.memory_base, self.pids_base)):
            try:
                names.update(
                    entry.name[len(mark) :]
                    for entry in os.scandir(base)
                    if entry.is_dir() and entry.name.startswith(mark)
                )
            except OSError:
                continue
        for name in sorted(names):
            self.agent(name).remove()
        return len(names)


def find_cgroups(
    data_dir: Path, *, proc_self: Path = Path("/proc/self"), pid: int | None = None
) -> CgroupTree | str:
    """This service's agents' cgroups, made ready; or why there can be none. Never raises.

    ``proc_self`` and ``pid`` (the process whose cgroup is delegated, the service's
    own by default) are for tests. Blocking.
    """
    try:
        own = parse_own_cgroups((proc_self / "cgroup").read_text())
        mounts = parse_cgroup_mounts((proc_self / "mountinfo").read_text())
    except OSError as exc:
        return f"cannot read this process's cgroups: {exc}"
    prefix = service_prefix(data_dir)
    reasons: list[str] = []
    if "" in mounts and "" in own:
        found = _prepare_v2(mounts[""], own[""], prefix, os.getpid() if pid is None else pid)
        if isinstance(found, CgroupTree):
            return found
        reasons.append(found)
    if all(c in mounts and c in own for c in CONTROLLERS):
        found = _prepare_v1(mounts, own, prefix)
        if isinstance(found, CgroupTree):
            return found
        reasons.append(found)
    return "; ".join(reasons) or "no cgroup hierarchy with the memory and pids controllers"


def _prepare_v2(mount: Path, own: str, prefix: str, pid: int) -> CgroupTree | str:
    """Delegate ``memory`` and ``pids`` below the service's v2 cgroup: the agents' directory."""
    cgroup = mount / own.lstrip("/")
    try:
        offered = (cgroup / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return f"cgroup v2: cannot read {cgroup / 'cgroup.controllers'}: {exc.strerror}"
    missing = [c for c in CONTROLLERS if c not in offered]
    if missing:
        return f"cgroup v2: {cgroup} offers no {' or '.join(missing)} controller"
    try:
        enabled = (cgroup / "cgroup.subtree_control").read_text().split()
        if not all(c in enabled for c in CONTROLLERS):
            # Only a cgroup without processes may hand controllers down: ours go to a leaf.
            leaf = cgroup / SERVICE_LEAF
            leaf.mkdir(exist_ok=True)
            moved = _procs(cgroup) or [pid]
            for process in moved:
                try:
                    _write(leaf / "cgroup.procs", process)
                except ProcessLookupError:
                    pass
            _write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        base = cgroup / AGENTS_DIRECTORY
        base.mkdir(exist_ok=True)
        _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
    except OSError as exc:
        return f"cgroup v2: cannot delegate memory and pids below {cgroup}: {_reason(exc)}"
    return _checked(CgroupTree(Version.V2, base, base, prefix))


def _prepare_v1(mounts: dict[str, Path], own: dict[str, str], prefix: str) -> CgroupTree | str:
    bases = {c: mounts[c] / own[c].lstrip("/") / AGENTS_DIRECTORY for c in CONTROLLERS}
    try:
        for base in bases.values():
            base.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cgroup v1: cannot create {exc.filename}: {_reason(exc)}"
    return _checked(CgroupTree(Version.V1, bases["memory"], bases["pids"], prefix))


def _checked(tree: CgroupTree) -> CgroupTree | str:
    """``tree`` if an agent's cgroup can be made there and limited; else why not."""
    probe = tree.agent("start-up-probe")
    try:
        probe.create(memory_bytes=1 << 30, max_procs=64)
    except OSError as exc:
        probe.remove()
        return f"{tree.describe()}: cannot limit an agent's cgroup: {_reason(exc)}"
    probe.remove()
    return tree


def _reason(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _procs(directory: Path) -> list[int]:
    try:
        text = (directory / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split() if line.isdigit()]


def _write(path: Path, value: object) -> None:
    # One write(2) of the whole value: cgroupfs takes a value per write.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    except OSError as exc:
        exc.filename = str(path)
        raise
    finally:
        os.close(fd)


def _write_if_present(path: Path, value: object) -> None:
    if path.exists():
        _write(path, value)


def _remove_directory(directory: Path) -> None:
    for _ in range(REMOVE_TRIES):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove cgroup %s: %s", directory, exc.strerror)
                return
        time.sleep(REMOVE_PAUSE_S)  # its last processes are still exiting
    log.warning("cannot remove cgroup %s: processes still in it", directory)
