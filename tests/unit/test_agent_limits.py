"""Per-agent limits: cgroup discovery (v1 and v2), an agent's cgroup, the launcher's lines.

The cgroup v2 delegation runs on a fake cgroupfs (a directory tree with the
control files); what the real kernel does is checked where the host lets this
process make cgroups (v1 on hybrid hosts, v2 elsewhere), with /bin/sh as the agent.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from claude_code_api.agent import limits as agent_limits
from claude_code_api.agent.cgroups import (
    AGENTS_DIRECTORY,
    SERVICE_LEAF,
    CgroupTree,
    Version,
    find_cgroups,
    parse_cgroup_mounts,
    parse_own_cgroups,
    service_prefix,
)
from claude_code_api.agent.limits import AgentLimits, plan_limits
from claude_code_api.agent.protocol import AgentSpec
from claude_code_api.agent.sandbox import make_launcher

HYBRID_CGROUP = """9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu:/
0::/
"""
HYBRID_MOUNTS = """\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
32 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 25 0:29 /sub /mnt/bound rw,relatime - cgroup cgroup rw,cpu
"""


def test_the_own_cgroups_and_their_mounts_are_read_on_a_hybrid_host():
    own = parse_own_cgroups(HYBRID_CGROUP)
    assert own["memory"] == "/process_api/abc" and own["pids"] == "/" and own[""] == "/"
    mounts = parse_cgroup_mounts(HYBRID_MOUNTS)
    assert mounts == {
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
        "": Path("/sys/fs/cgroup/unified"),
    }


def fake_v2(tmp_path: Path, processes: list[int]) -> tuple[Path, Path]:
    """A cgroup v2 mount holding the service's cgroup ``/svc`` (with ``processes``).

    Control files are plain files; the directories the service makes are made here
    beforehand with theirs (cgroupfs makes them itself).
    """
    mount = tmp_path / "cgroup"
    own = mount / "svc"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in processes))
    leaf = own / SERVICE_LEAF
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")
    base = own / AGENTS_DIRECTORY
    base.mkdir()
    (base / "cgroup.subtree_control").write_text("")
    proc_self = tmp_path / "proc-self"
    proc_self.mkdir()
    (proc_self / "cgroup").write_text("0::/svc\n")
    (proc_self / "mountinfo").write_text(
        f"40 25 0:30 / {mount} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    return own, proc_self


def test_on_cgroup_v2_the_services_processes_go_to_a_leaf_and_memory_and_pids_are_delegated(
    tmp_path,
):
    """cgroup v2 hands controllers down only from a cgroup that holds no process."""
    own, proc_self = fake_v2(tmp_path, [101, 102])
    data_dir = tmp_path / "data"
    probe = own / AGENTS_DIRECTORY / f"{service_prefix(data_dir)}-start-up-probe"
    probe.mkdir()
    for name in ("memory.max", "memory.oom.group", "pids.max", "cgroup.procs"):
        (probe / name).write_text("")
    found = find_cgroups(data_dir, proc_self=proc_self, pid=101)
    assert isinstance(found, CgroupTree), found
    assert found.version is Version.V2
    assert found.memory_base == found.pids_base == own / AGENTS_DIRECTORY
    # One write per process (cgroupfs takes one pid a write); the fake keeps the last.
    assert (own / SERVICE_LEAF / "cgroup.procs").read_text() == "102\n"
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids\n"
    assert (own / AGENTS_DIRECTORY / "cgroup.subtree_control").read_text() == "+memory +pids\n"
    assert (probe / "memory.oom.group").read_text() == "1\n"  # the whole agent is killed
    assert (probe / "pids.max").read_text() == "64\n"


def test_without_the_controllers_there_are_no_cgroups_and_the_reason_is_given(tmp_path):
    own, proc_self = fake_v2(tmp_path, [101])
    (own / "cgroup.controllers").write_text("cpu io\n")
    found = find_cgroups(tmp_path / "data", proc_self=proc_self, pid=101)
    assert found == f"cgroup v2: {own} offers no memory or pids controller"


def test_without_cgroups_start_up_warns_once_naming_what_is_unbounded(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(agent_limits, "find_cgroups", lambda data_dir: "read-only cgroupfs")
    with caplog.at_level(logging.WARNING):
        limits = plan_limits(
            tmp_mb=64, memory_mb=512, max_procs=100, data_dir=tmp_path, bwrap=None, euid=1000
        )
    assert limits.cgroups is None and not limits.nproc and limits.tmp_mb == 64
    [warning] = caplog.records
    assert "read-only cgroupfs" in warning.message
    assert "AGENT_MEMORY_MB is not enforced" in warning.message
    assert "processes unbounded" in warning.message


@pytest.mark.parametrize("bwrap", ["/usr/bin/bwrap", None], ids=["sandbox", "no-sandbox"])
def test_without_cgroups_a_root_services_agents_share_agent_uid_and_are_not_bound(
    tmp_path, monkeypatch, caplog, bwrap
):
    """As root, agents run as AGENT_UID (bubblewrap, started by root, makes no user
    namespace): RLIMIT_NPROC would count them all together. The warning says so, not
    that they run as root (found by a fresh container run of README as root)."""
    monkeypatch.setattr(agent_limits, "find_cgroups", lambda data_dir: "none")
    with caplog.at_level(logging.WARNING):
        limits = plan_limits(
            tmp_mb=64,
            memory_mb=512,
            max_procs=100,
            data_dir=tmp_path,
            bwrap=bwrap,
            euid=0,
            agent_uid=65536,
        )
    assert not limits.nproc
    [warning] = caplog.records
    assert "processes unbounded (agents share one uid, 65536 (AGENT_UID)" in warning.message
    assert "as root" not in warning.message


def test_without_cgroups_a_non_root_sandbox_bounds_processes_with_rlimit_nproc(
    tmp_path, monkeypatch
):
    """Unprivileged bwrap gives each agent a user namespace, where RLIMIT_NPROC counts alone.

    Set inside the sandbox, just before the CLI: the namespace is made with the
    service's limit, so the service's own count is never held to the agent's bound.
    """
    monkeypatch.setattr(agent_limits, "find_cgroups", lambda data_dir: "none")
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    limits = plan_limits(
        tmp_mb=64, memory_mb=512, max_procs=100, data_dir=tmp_path, bwrap=bwrap, euid=1000
    )
    as_root = plan_limits(
        tmp_mb=64, memory_mb=512, max_procs=100, data_dir=tmp_path, bwrap=bwrap, euid=0
    )
    assert not as_root.nproc  # root is not bound by RLIMIT_NPROC
    if limits.prlimit is None:
        pytest.skip("prlimit is not installed")
    assert limits.nproc
    launcher = make_launcher(
        cli=Path("/bin/sh"),
        data_dir=tmp_path / "data",
        environ={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=bwrap,
        limits=limits,
    )
    spec = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    text = launcher.script(spec, credentials=None)
    assert f'-- {limits.prlimit} --nproc=100:100 -- /bin/sh "$@"' in text
    assert "--size 67108864 --tmpfs /dev/shm" in text and "--size 67108864 --tmpfs /tmp" in text


_REAL = find_cgroups(Path(tempfile.gettempdir()))
needs_cgroups = pytest.mark.skipif(
    isinstance(_REAL, str), reason=f"no cgroups for agents here: {_REAL}"
)


@needs_cgroups
def test_an_agent_runs_in_its_own_cgroup_under_its_limits_and_it_is_removed_after(tmp_path):
    """The launcher joins the agent's cgroup before it execs; cleanup removes the cgroup."""
    data_dir = tmp_path / "data"
    limits = plan_limits(
        tmp_mb=64, memory_mb=128, max_procs=32, data_dir=data_dir, bwrap=None, euid=0
    )
    assert limits.cgroups is not None
    launcher = make_launcher(
        cli=Path("/bin/sh"),
        data_dir=data_dir,
        environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=None,
        limits=limits,
    )
    spec = AgentSpec(name="alice", home=data_dir / "users" / "alice", ephemeral=True)
    path = launcher.prepare(spec, "t1")
    cgroup = launcher.cgroup(path)
    assert cgroup is not None
    # (dash gives up at the first refused fork: the loop comes last.)
    command = (
        "python3 -c \"b = b'x' * (256 << 20)\"; echo exit=$?; for i in $(seq 64); do sleep 5 & done"
    )
    try:
        done = subprocess.run(
            [str(path), "-c", command], capture_output=True, text=True, timeout=60, check=False
        )
        assert "exit=137" in done.stdout, done  # SIGKILLed by the OOM killer
        assert cgroup.oom_killed()
        assert cgroup.procs_refused() > 0  # forks past 32 were refused
        peak = cgroup.peak_procs()
        assert peak is None or peak <= 32
    finally:
        launcher.cleanup(spec, path)  # (the sleeps still run: killed with it)
    assert not any(directory.exists() for directory in cgroup.directories)


@needs_cgroups
def test_an_agent_that_cannot_start_for_a_full_disk_leaves_no_cgroup(tmp_path, monkeypatch):
    """The cgroup is made before the launcher is written: a failed write removes it."""
    data_dir = tmp_path / "data"
    limits = plan_limits(
        tmp_mb=64, memory_mb=128, max_procs=32, data_dir=data_dir, bwrap=None, euid=0
    )
    assert limits.cgroups is not None
    launcher = make_launcher(
        cli=Path("/bin/sh"),
        data_dir=data_dir,
        environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=None,
        limits=limits,
    )
    spec = AgentSpec(name="alice", home=data_dir / "users" / "alice", ephemeral=False)
    cgroup = launcher.cgroup(launcher.launcher_path(spec, "t1"))
    assert cgroup is not None
    real_write_text = Path.write_text

    def full(path, text, *args, **kwargs):
        if path.suffix == ".sh":
            real_write_text(path, text[:10])  # (half written)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        launcher.prepare(spec, "t1")
    assert not any(directory.exists() for directory in cgroup.directories)
    assert not launcher.launcher_path(spec, "t1").exists()


@needs_cgroups
def test_a_cgroup_a_killed_service_left_is_removed_at_the_next_start(tmp_path):
    data_dir = tmp_path / "data"
    limits = plan_limits(
        tmp_mb=64, memory_mb=256, max_procs=32, data_dir=data_dir, bwrap=None, euid=0
    )
    assert limits.cgroups is not None
    left = limits.cgroups.agent("worker-0-abc")
    limits.create_cgroup(left)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (left.pids / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        other = plan_limits(  # another service (another DATA_DIR) keeps its own
            tmp_mb=64, memory_mb=256, max_procs=32, data_dir=tmp_path / "b", bwrap=None, euid=0
        )
        assert left.pids.exists()
        assert other.cgroups is not None and other.cgroups.prefix != limits.cgroups.prefix
        plan_limits(tmp_mb=64, memory_mb=256, max_procs=32, data_dir=data_dir, bwrap=None, euid=0)
        assert sleeper.wait(timeout=10) == -9
        assert not any(directory.exists() for directory in left.directories)
    finally:
        sleeper.kill()
        left.remove()


def test_the_default_tmp_size_is_a_sixteenth_of_ram_at_most_a_gib():
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    assert AgentLimits().tmp_mb == max(64, min(1024, ram_mb // 16))
