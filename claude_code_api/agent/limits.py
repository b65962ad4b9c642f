"""What one agent may take of the host: scratch space, memory, processes.

:class:`AgentLimits` is decided once at start-up (:func:`plan_limits`) and
applied by the launcher (:mod:`claude_code_api.agent.sandbox`) to every agent:

* ``AGENT_TMP_MB``: the size of every writable tmpfs in an agent's sandbox
  (``/tmp`` and ``/dev/shm``; the tmpfs that hide paths get a token size, and
  ``/dev`` itself is read-only). Without a size each would take half the host's
  RAM, and what is written there stays in RAM until the agent's sandbox ends.
* ``AGENT_MEMORY_MB`` and ``AGENT_MAX_PROCS``: a cgroup per agent where the OS
  lets the service make one (:mod:`claude_code_api.agent.cgroups`).
* Without cgroups, ``AGENT_MAX_PROCS`` falls back to ``RLIMIT_NPROC``, set
  inside the sandbox just before the CLI runs, where it bounds that one agent:
  the kernel counts ``RLIMIT_NPROC`` per user *namespace* (since Linux 5.14) and
  uid, and an unprivileged bubblewrap gives each agent a user namespace of its
  own (a uid of its own bounds it the same). Where agents share the service's
  uid in its namespace (no sandbox) the limit would count every agent and the
  service together, and root is exempt from it: there it is not set, and
  start-up says the processes are unbounded.

Error handling: nothing here raises at start-up; each limit that cannot be had
is one warning naming what stays unbounded.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import attrs

from .cgroups import AgentCgroup, CgroupTree, find_cgroups

log = logging.getLogger(__name__)

MIB = 1 << 20
# AGENT_TMP_MB's default: a sixteenth of RAM, at most 1 GiB (see default_tmp_mb).
DEFAULT_TMP_MAX_MB = 1024
DEFAULT_TMP_RAM_SHARE = 16
# The tmpfs that hide a path (DATA_DIR, the service's Claude dir, /run/user) hold nothing.
HIDDEN_TMPFS_BYTES = 1 * MIB


def default_tmp_mb() -> int:
    """``AGENT_TMP_MB`` when unset: RAM/16, at most 1024, at least 64.

    Each agent has two such tmpfs, and a pool and live sessions run many agents
    at once: with RAM/16, eight agents filling both still leave the host half its
    RAM. 1 GiB is room enough for a build's or a test run's scratch files.
    """
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return DEFAULT_TMP_MAX_MB
    return max(64, min(DEFAULT_TMP_MAX_MB, ram // MIB // DEFAULT_TMP_RAM_SHARE))


@attrs.frozen
class AgentLimits:
    """The limits every agent of this service runs under; see the module docstring.

    ``cgroups``: where agents' cgroups are made (None: none can be). ``nproc``:
    set ``RLIMIT_NPROC`` to ``max_procs`` inside the sandbox (no pids cgroup, and
    the limit bounds each agent alone there). ``prlimit``: the executable that does.
    """

    tmp_mb: int = attrs.field(factory=default_tmp_mb)
    memory_mb: int = 2048
    max_procs: int = 512
    cgroups: CgroupTree | None = None
    nproc: bool = False
    prlimit: str | None = attrs.field(factory=lambda: shutil.which("prlimit"))

    def scratch_mounts(self) -> list[str]:
        """bubblewrap's options for the agent's writable tmpfs (after ``--dev /dev``).

        ``/dev`` (a tmpfs bwrap fills with device nodes) read-only; ``/dev/shm`` and
        ``/tmp`` sized, writable by any uid the agent runs as (sticky, as on a host).
        """
        size = str(self.tmp_mb * MIB)
        args = ["--remount-ro", "/dev"]
        args += ["--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
        args += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
        return args

    def cgroup(self, name: str) -> AgentCgroup | None:
        """The cgroup of the agent whose launcher is called ``name`` (None: no cgroups)."""
        return None if self.cgroups is None else self.cgroups.agent(name)

    def create_cgroup(self, cgroup: AgentCgroup) -> None:
        """Make ``cgroup`` with this service's limits. Blocking; OSError when it cannot."""
        cgroup.create(memory_bytes=self.memory_mb * MIB, max_procs=self.max_procs)

    def inner_command(self) -> list[str]:
        """What runs in the sandbox before the CLI (``prlimit``), when RLIMIT_NPROC is used."""
        if not self.nproc or self.prlimit is None:
            return []
        return [self.prlimit, f"--nproc={self.max_procs}:{self.max_procs}", "--"]

    def memory_exceeded(self) -> str:
        """What an agent killed for passing its memory limit is told (a 502's message)."""
        return f"agent exceeded AGENT_MEMORY_MB={self.memory_mb} and was killed"

    def procs_reached(self) -> str:
        """Added to an agent's failure when it had reached its process bound."""
        return f"it had reached AGENT_MAX_PROCS={self.max_procs}"


def plan_limits(
    *,
    tmp_mb: int | None,
    memory_mb: int,
    max_procs: int,
    data_dir: Path,
    bwrap: str | None,
    euid: int | None = None,
    agent_uid: int | None = None,
    remove_leftovers: bool = True,
    warn: Callable[[str], None] | None = None,
) -> AgentLimits:
    """Decide how agents are limited here; log once what stays unbounded. Blocking.

    Removes the agent cgroups a killed predecessor (same DATA_DIR) left, unless told not
    to (``claude-code-api check``, which may run beside a live service: they are its).
    ``warn``: where the warning goes that says what stays unbounded (default: the log).
    ``agent_uid``: the OS user a root service's agents run as (AGENT_UID), if any.
    """
    found = find_cgroups(data_dir)
    tmp = tmp_mb if tmp_mb is not None else default_tmp_mb()
    if isinstance(found, CgroupTree):
        left = found.remove_leftovers() if remove_leftovers else 0
        if left:
            log.info("removed %d agent cgroups a previous run left", left)
        log.info(
            "agents limited by %s: AGENT_MEMORY_MB=%d, AGENT_MAX_PROCS=%d, AGENT_TMP_MB=%d",
            found.describe(),
            memory_mb,
            max_procs,
            tmp,
        )
        return AgentLimits(tmp, memory_mb, max_procs, cgroups=found)
    euid = os.geteuid() if euid is None else euid
    nproc_reason = _nproc_unusable(bwrap, euid, agent_uid)
    prlimit = shutil.which("prlimit")
    if nproc_reason is None and prlimit is None:
        nproc_reason = "prlimit (util-linux) is not installed"
    processes = (
        f"processes bounded by RLIMIT_NPROC={max_procs} per agent"
        if nproc_reason is None
        else f"processes unbounded ({nproc_reason})"
    )
    (warn or log.warning)(
        f"no cgroups for agents ({found}): AGENT_MEMORY_MB is not enforced, an agent's memory "
        f"is bounded only for its /tmp and /dev/shm (AGENT_TMP_MB={tmp} each); {processes} "
        "(see README: Security model)"
    )
    return AgentLimits(tmp, memory_mb, max_procs, nproc=nproc_reason is None, prlimit=prlimit)


def _nproc_unusable(bwrap: str | None, euid: int, agent_uid: int | None = None) -> str | None:
    """Why RLIMIT_NPROC would not bound each agent alone here; None when it would."""
    if agent_uid is not None:
        # (Started by root, bubblewrap makes no user namespace: the count is the uid's.)
        return f"agents share one uid, {agent_uid} (AGENT_UID), and RLIMIT_NPROC counts per uid"
    if bwrap is None:
        return "no sandbox: agents share the service's uid, and RLIMIT_NPROC counts per uid"
    if euid == 0:
        return "agents run as root, whom RLIMIT_NPROC does not bind"
    try:
        setuid = bool(os.stat(bwrap).st_mode & stat.S_ISUID)
    except OSError:
        setuid = False
    if setuid:
        return "a setuid bubblewrap gives agents no user namespace of their own"
    return None
