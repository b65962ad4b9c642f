"""What one user's agent can take from the others: disk, tmpfs, processes, latency.

Prints figures; it is not a test. The service runs as operators run it
(``AGENT_SANDBOX=auto``; as root its agents run as ``AGENT_UID``, each in its own
cgroups) with the real bundled Claude Code CLI against the mock Messages API
(``claude_code_api/demo/mock_messages_api.py``, in this process). The mock answers a
prompt it knows with a Bash tool call, so the CLI runs that command inside the
agent's sandbox, as a prompt-injected model would make it do; the command's output
comes back in the next model call. One service, five users, one run:

0. **bob, quiet**: ``--samples`` one-shots and session turns (his session made first).
1. **disk**: carol's agent runs ``dd`` of 200 MiB into her workspace, with
   ``USER_DISK_MAX_MB`` (64) and, as root, ``DATA_DIR`` on a small tmpfs (256 MiB,
   mounted here and unmounted at the end): the largest file it could write. Then dave's
   agent writes 8 MiB files in a bounded loop: what one user kept before the turn was
   stopped, and the filesystem's free space after.
2. **tmpfs**: the sizes of ``/tmp`` and ``/dev/shm`` inside erin's sandbox (``statvfs``).
3. **processes**: erin's agent runs a bounded fork bomb (at most 128 ``sleep 20``, in a
   Python loop: a refused fork ends it) under ``AGENT_MAX_PROCS`` (64). Counted by the
   kernel (the agent's pids cgroup: ``pids.peak``, processes *and* threads, polled from
   outside) and inside (the processes its pid namespace shows).
4. **bob under load**: alice's agent runs the same fork bomb, then rewrites a 32 MiB
   file as fast as it can until bob is done (bounded), then fills the disk with 8 MiB
   files until it is stopped; meanwhile bob's one-shots and session turns are timed
   again. Then alice's session is closed and bob is timed with her files left.
5. **after**: alice's files are removed from outside (as an operator would, no
   restart) and bob is timed once more.

Every request, wait and loop is bounded; a run takes ~10–30 s (300 s at most). At the
end the service is stopped, and any process of the run still alive (the bomb's
sleeps carry a marker) is killed and counted.

    .venv/bin/python -m bench.isolation
    .venv/bin/python -m bench.isolation --help   # --samples --disk-mb --data-mb ...
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.stats import QuietLog, dist, fmt_dist, machine_lines, section
from claude_code_api.agent.cgroups import (
    AGENTS_DIRECTORY,
    SERVICE_LEAF,
    parse_cgroup_mounts,
    parse_own_cgroups,
    service_prefix,
)
from claude_code_api.agent.limits import default_tmp_mb
from claude_code_api.demo.mock_messages_api import (
    RecordedRequest,
    Step,
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from claude_code_api.store.user_paths import user_workspace
from tests.support.harness import RunningService, launch_service, service_env
from tests.support.real_cli import service_overrides

MIB = 1024 * 1024
USERS = ("alice", "bob", "carol", "dave", "erin")
KEYS = {user: f"sk-{user}-key" for user in USERS}
# The bomb's sleeps carry this argument: what is left of them at the end is ours to kill.
SLEEP_ARG = f"20.{os.getpid() % 100000:05d}1"
BOMB_TRIES = 128
CHURN_MAX_S = 60  # alice rewrites her file at most this long, whether bob is done or not
FILL_FILES = 64  # at most 64 x 8 MiB files, in dave's and alice's fills

# Python, not a shell loop: bash retries a refused fork for ~15 s each time. A file
# ``bombed`` in the workspace says the bomb is up (no fork needed to write it), with the
# sleeps started and the processes seen: read from the host, as the CLI may die of its bomb.
BOMB = f"""
import os, subprocess, time
started = []
for _ in range({BOMB_TRIES}):
    try:
        started.append(subprocess.Popen(["sleep", "{SLEEP_ARG}"]))
    except OSError as exc:
        print("fork refused:", exc)
        break
seen = sum(name.isdigit() for name in os.listdir("/proc"))
print("bomb: started", len(started), "sleeps; processes in the sandbox:", seen, flush=True)
open("bombed", "w").write(f"{{len(started)}} {{seen}}")
"""
FILL = f"""
chunk = b"\\0" * (1 << 20)
total = 0
try:
    for i in range({FILL_FILES}):
        with open(f"fill-{{i}}", "wb") as f:
            for _ in range(8):
                f.write(chunk)
                total += 1
except OSError as exc:
    print("fill stopped:", exc)
print("fill: wrote", total, "MiB", flush=True)
"""
CHURN = f"""
chunk = b"\\0" * (1 << 20)
deadline = time.monotonic() + {CHURN_MAX_S}
rewrites = 0
while not os.path.exists("stop") and time.monotonic() < deadline:
    with open("churn", "wb") as f:
        for _ in range(32):
            f.write(chunk)
    os.remove("churn")
    rewrites += 1
print("churn: rewrote 32 MiB", rewrites, "times", flush=True)
"""


def heredoc(marker: str, script: str) -> str:
    """A Bash command that prints ``@@marker`` and runs ``script`` with python3, in the cwd."""
    return f"echo @@{marker}; python3 - <<'PYEOF'\n{script}\nPYEOF\necho exited $?"


COMMANDS = {
    "dd-fill": (
        "echo @@dd-fill; dd if=/dev/zero of=fill bs=1M count=200 2>&1 | tail -2;"
        " echo dd exited ${PIPESTATUS[0]}; echo size $(stat -c %s fill)"
    ),
    "many-files": heredoc("many-files", FILL),
    "tmpfs": heredoc(
        "tmpfs",
        "import os\n"
        "for p in ('/tmp', '/dev/shm', '.'):\n"
        "    v = os.statvfs(p)\n"
        "    print('size', p, v.f_blocks * v.f_frsize >> 20)",
    ),
    "bomb": heredoc("bomb", BOMB),
    "load": heredoc("load", BOMB + CHURN + FILL),
}


class Mock:
    """The mock's answers: a known prompt runs its command; the tool's output is kept."""

    def __init__(self) -> None:
        self.outputs: dict[str, str] = {}

    def answer(self, request: RecordedRequest) -> Step:
        last = request.messages[-1] if request.messages else {}
        content = last.get("content")
        if last.get("role") == "user" and isinstance(content, list):
            results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
            if results:
                text = tool_result_text(results[0]).split("<system-reminder>")[0]
                found = re.search(r"@@(\S+)", text)
                if found:
                    self.outputs[found.group(1)] = text
                return TextReply("done")
        prompt = request.last_user_text()
        if prompt in COMMANDS:
            return ToolUseReply("Bash", {"command": COMMANDS[prompt]})
        return TextReply(f"echo: {prompt}")


class PidsWatch:
    """Polls every agent cgroup of this service: the most pids each held (``pids.peak``).

    cgroups are removed when their agent closes, so they are read while they live.
    """

    def __init__(self, base: Path | None, prefix: str) -> None:
        self.base = base
        self.prefix = prefix + "-"
        self.peaks: dict[str, int] = {}

    @classmethod
    def of(cls, service: RunningService) -> PidsWatch:
        bases = agent_cgroup_bases(service.pid)
        return cls(bases.get("pids"), service_prefix(service.data_dir))

    def poll(self) -> None:
        if self.base is None:
            return
        try:
            entries = [e for e in os.scandir(self.base) if e.name.startswith(self.prefix)]
        except OSError:
            return
        for entry in entries:
            name = entry.name[len(self.prefix) :]
            for file in ("pids.peak", "pids.current"):
                try:
                    value = int(Path(entry.path, file).read_text())
                except (OSError, ValueError):
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), value)
                break

    def peak_of(self, marker: str) -> int | None:
        found = [v for name, v in self.peaks.items() if marker in name]
        return max(found) if found else None

    async def run(self) -> None:
        while True:
            self.poll()
            await trio.sleep(0.05)


def agent_cgroup_bases(service_pid: int) -> dict[str, Path]:
    """Where the service makes its agents' cgroups, by controller (v2: the same for both)."""
    bases: dict[str, Path] = {}
    try:
        own = parse_own_cgroups(Path(f"/proc/{service_pid}/cgroup").read_text())
        mounts = parse_cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return bases
    for controller in ("memory", "pids"):
        key = controller if controller in mounts and controller in own else ""
        if key in mounts and key in own:
            cgroup = mounts[key] / own[key].lstrip("/")
            if cgroup.name == SERVICE_LEAF:  # v2: the service moved itself to a leaf
                cgroup = cgroup.parent
            bases[controller] = cgroup / AGENTS_DIRECTORY
    return bases


def remove_leftover_cgroups(bases: dict[str, Path], prefix: str) -> tuple[list[str], int]:
    """This run's agent cgroups still there (the service stopped): their names, and how
    many processes were in them. Kills those processes and removes the cgroups."""
    names: set[str] = set()
    killed = 0
    for base in set(bases.values()):
        try:
            found = [Path(e.path) for e in os.scandir(base) if e.name.startswith(prefix + "-")]
        except OSError:
            continue
        for directory in found:
            names.add(directory.name)
            for _ in range(20):
                try:
                    pids = [int(p) for p in (directory / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    pids = []
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            try:
                directory.rmdir()
            except OSError as exc:
                print(f"  could not remove {directory}: {exc}")
    return sorted(names), killed


def mount_tmpfs(path: Path, mib: int) -> bool:
    """Mount a ``mib`` MiB tmpfs on ``path`` (as root); whether it was."""
    if os.geteuid() != 0:
        return False
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
        check=True,
        timeout=10,
    )
    return True


def leftover_sleeps() -> list[int]:
    """Live processes of the bomb of this run (``sleep SLEEP_ARG``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", SLEEP_ARG.encode()]:
            found.append(int(entry))
    return found


def free_mib(path: Path) -> float:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize / MIB


def tree_mib(path: Path) -> float:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total / MIB


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{dist(values)['p50']:.0f} ms"


class Run:
    """The service, its client and the mock, with what the phases measured."""

    def __init__(self, service: RunningService, client: httpx.AsyncClient, mock: Mock) -> None:
        self.service = service
        self.client = client
        self.mock = mock
        self.figures: dict[str, Any] = {}

    async def post(self, user: str, prompt: str, **fields: Any) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        reply = await self.client.post(
            "/run", json={"prompt": prompt, **fields}, headers={"x-api-key": KEYS[user]}
        )
        return reply, time.perf_counter() - started

    async def close_session(self, user: str, session: str) -> None:
        await self.client.request(
            "DELETE", "/session", json={"sessionId": session}, headers={"x-api-key": KEYS[user]}
        )

    def workspace(self, user: str) -> Path:
        return user_workspace(self.service.data_dir, user) / "workspace"

    async def bob(self, samples: int) -> tuple[list[float], list[float], list[str]]:
        """bob's one-shots and turns in his session: latencies (s) and failures."""
        one_shots: list[float] = []
        turns: list[float] = []
        failed: list[str] = []
        for n in range(samples):
            for kind, fields, into in (
                ("one-shot", {}, one_shots),
                ("session turn", {"sessionId": "bob"}, turns),
            ):
                reply, took = await self.post("bob", f"hello {n}", **fields)
                if reply.status_code == 200 and reply.json().get("success"):
                    into.append(took)
                else:
                    failed.append(f"{kind}: {reply.status_code} {reply.text[:160]}")
        return one_shots, turns, failed


def bomb_counts(run: Run, user: str) -> tuple[int, int] | None:
    """(sleeps started, processes seen) as the bomb wrote them in ``user``'s workspace."""
    try:
        started, seen = (run.workspace(user) / "bombed").read_text().split()
        return int(started), int(seen)
    except (OSError, ValueError):
        return None


def print_bob(label: str, one_shots: list[float], turns: list[float], failed: list[str]) -> None:
    print(fmt_dist(f"bob one-shot ({label})", dist(one_shots), decimals=0))
    print(fmt_dist(f"bob session turn ({label})", dist(turns), decimals=0))
    for line in failed:
        print(f"  FAILED {line}")


async def phase_quiet(
    run: Run, args: argparse.Namespace, watch: PidsWatch, quiet: QuietLog
) -> None:
    """bob's one-shots and session turns on a quiet service."""
    f = run.figures
    section(f"0. bob on a quiet service ({args.samples} one-shots and session turns)")
    with quiet.phase(trees=[run.service.pid]):
        for fields in ({}, {"sessionId": "bob"}):  # untimed: his agents warm, his session made
            await run.post("bob", "warm up", **fields)
        f["quiet"] = await run.bob(args.samples)
        print_bob("quiet", *f["quiet"])


async def phase_disk(run: Run, args: argparse.Namespace, watch: PidsWatch, quiet: QuietLog) -> None:
    """carol's 200 MiB dd, then dave's 8 MiB files in a loop, against USER_DISK_MAX_MB."""
    f = run.figures
    section(f"1. disk: USER_DISK_MAX_MB={args.disk_mb}, DATA_DIR {f['data_dir']}")
    with quiet.phase(trees=[run.service.pid]):
        reply, took = await run.post("carol", "dd-fill", sessionId="fill")
        output = run.mock.outputs.get("dd-fill", "")
        fill = run.workspace("carol") / "fill"
        size = fill.stat().st_size / MIB if fill.exists() else None
        f["dd"] = (size, reply.status_code, output)
        print(
            f"  carol: dd of 200 MiB into her workspace: HTTP {reply.status_code} in {took:.1f} s"
        )
        print("    " + "\n    ".join(output.strip().splitlines()[1:]))
        print(f"  the file on the host: {size if size is None else f'{size:.1f} MiB'}")
        print(f"  DATA_DIR free after: {free_mib(run.service.data_dir):.0f} MiB")
        await run.close_session("carol", "fill")
        if fill.exists():
            fill.unlink()  # (her quota's room back, for the next phases)

        reply, took = await run.post("dave", "many-files", sessionId="fill")
        output = run.mock.outputs.get("many-files", "")
        kept = tree_mib(user_workspace(run.service.data_dir, "dave"))
        free = free_mib(run.service.data_dir)
        error = reply.json().get("error", "") if reply.content else ""
        health = (await run.client.get("/health")).status_code
        f["many"] = (kept, reply.status_code, took, free, health, output, error)
        print(f"  dave: 8 MiB files in a loop: HTTP {reply.status_code} after {took:.1f} s")
        print("    " + "\n    ".join(output.strip().splitlines()[1:]))
        if error:
            print(f"    error: {error[:200]}")
        print(f"  dave keeps {kept:.0f} MiB; DATA_DIR free after: {free:.0f} MiB; /health {health}")
        await run.close_session("dave", "fill")
        for path in run.workspace("dave").glob("fill-*"):
            path.unlink()


async def phase_tmpfs(
    run: Run, args: argparse.Namespace, watch: PidsWatch, quiet: QuietLog
) -> None:
    """The sizes of /tmp and /dev/shm inside the sandbox (statvfs)."""
    f = run.figures
    section("2. tmpfs sizes inside the sandbox")
    reply, _ = await run.post("erin", "tmpfs", sessionId="procs")
    output = run.mock.outputs.get("tmpfs", "")
    sizes = dict(re.findall(r"^size (\S+) (\d+)$", output, re.MULTILINE))
    f["tmpfs"] = sizes
    for path, mib in sizes.items():
        print(f"  {path:<10} {mib} MiB")
    if not sizes:
        print(f"  not measured: HTTP {reply.status_code} {reply.text[:200]}")


async def phase_bomb(run: Run, args: argparse.Namespace, watch: PidsWatch, quiet: QuietLog) -> None:
    """erin's fork bomb against AGENT_MAX_PROCS, counted by her agent's pids cgroup."""
    f = run.figures
    section(f"3. fork bomb: {BOMB_TRIES} sleeps at most, AGENT_MAX_PROCS={args.max_procs}")
    with quiet.phase(trees=[run.service.pid]):
        reply, took = await run.post("erin", "bomb", sessionId="procs")
        await trio.sleep(0.3)  # a last poll of its cgroup
        output = run.mock.outputs.get("bomb", "")
        f["bomb"] = (watch.peak_of("session_erin"), bomb_counts(run, "erin"), reply.status_code)
        print(f"  erin: HTTP {reply.status_code} in {took:.1f} s")
        print("    " + "\n    ".join(output.strip().splitlines()[1:]))
        if reply.status_code != 200:
            print(f"    {reply.text[:200]}")
        print(f"  pids.peak of her agent's cgroup (processes and threads): {f['bomb'][0]}")
        print(f"  sleeps started, processes seen in her sandbox (its file): {f['bomb'][1]}")
        await run.close_session("erin", "procs")


async def phase_neighbour(
    run: Run, args: argparse.Namespace, watch: PidsWatch, quiet: QuietLog
) -> None:
    """bob while alice's agent holds a fork bomb and rewrites a file, then after she filled the disk."""
    f = run.figures
    section("4. bob while alice's agent runs the fork bomb and fills the disk")
    with quiet.phase(trees=[run.service.pid]):
        alice: list[Any] = []
        bombed = run.workspace("alice") / "bombed"

        async def alice_loads() -> None:
            alice.append(await run.post("alice", "load", sessionId="load"))

        async with trio.open_nursery() as inner:
            inner.start_soon(alice_loads)
            with trio.move_on_after(60):
                while not bombed.exists() and not alice:
                    await trio.sleep(0.05)
            began = time.monotonic()
            f["loaded"] = await run.bob(args.samples)
            f["loaded s"] = time.monotonic() - began
            f["overlap"] = bombed.exists() and not alice  # her bomb and rewrite ran throughout
            if bombed.parent.is_dir():
                (bombed.parent / "stop").write_text("")  # alice: now fill the disk
        reply, took = alice[0]
        output = run.mock.outputs.get("load", "")
        free = free_mib(run.service.data_dir)
        kept = tree_mib(user_workspace(run.service.data_dir, "alice"))
        error = reply.json().get("error", "") if reply.content else ""
        f["alice"] = (reply.status_code, took, kept, free, watch.peak_of("session_alice"))
        f["alice bomb"] = bomb_counts(run, "alice")
        print_bob("bomb + rewrite", *f["loaded"])
        print(
            f"  bob's {2 * args.samples} requests took {f['loaded s']:.1f} s, all while alice's"
            f" bomb held and her agent rewrote its file: {f['overlap']}"
        )
        print(f"  alice: HTTP {reply.status_code} after {took:.1f} s")
        print("    " + "\n    ".join(output.strip().splitlines()[1:]))
        if error:
            print(f"    error: {error[:200]}")
        print(
            f"  alice's agent: pids.peak {f['alice'][4]}, sleeps started and processes seen"
            f" {f['alice bomb']}; she keeps {kept:.0f} MiB;"
            f" DATA_DIR free {free:.0f} MiB"
        )
        await run.close_session("alice", "load")
        f["full"] = await run.bob(args.samples)
        print_bob("alice's files left", *f["full"])
        f["full health"] = (await run.client.get("/health")).status_code
        print(
            f"  (alice's session closed, her workspace kept) /health {f['full health']};"
            f" DATA_DIR free {free_mib(run.service.data_dir):.0f} MiB"
        )


async def phase_after(
    run: Run, args: argparse.Namespace, watch: PidsWatch, quiet: QuietLog
) -> None:
    """bob once alice's files are removed, as an operator would, without a restart."""
    f = run.figures
    section("5. bob after alice's files are removed (as an operator would), no restart")
    with quiet.phase(trees=[run.service.pid]):
        for path in run.workspace("alice").glob("fill-*"):
            path.unlink()
        f["after"] = await run.bob(args.samples)
        print_bob("after", *f["after"])
        f["health"] = (await run.client.get("/health")).status_code
        print(f"  /health {f['health']}; DATA_DIR free {free_mib(run.service.data_dir):.0f} MiB")


async def phases(run: Run, args: argparse.Namespace, quiet: QuietLog) -> None:
    """Every phase in order, the agents' pids cgroups watched meanwhile."""
    watch = PidsWatch.of(run.service)
    run.figures["pids base"] = watch.base
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        for phase in (
            phase_quiet,
            phase_disk,
            phase_tmpfs,
            phase_bomb,
            phase_neighbour,
            phase_after,
        ):
            await phase(run, args, watch, quiet)
        nursery.cancel_scope.cancel()


def table(f: dict[str, Any], args: argparse.Namespace) -> list[str]:
    dd_size, dd_status, dd_output = f["dd"]
    dd_error = re.search(r"dd: (.*)", dd_output)
    kept, many_status, many_s, many_free, many_health, _, _ = f["many"]
    bomb_peak, seen, bomb_status = f["bomb"]
    a_status, a_took, a_kept, a_free, a_peak = f["alice"]
    quiet, loaded, full, after = f["quiet"], f["loaded"], f["full"], f["after"]
    dd_text = "–" if dd_size is None else f"{dd_size:.1f} MiB"
    if dd_error:
        dd_text += f" (dd: {dd_error.group(1).strip()})"
    rows = [
        ("figure", "measured"),
        ("---", "---"),
        (
            f"largest file one agent wrote (`USER_DISK_MAX_MB={args.disk_mb}`)",
            f"{dd_text}, HTTP {dd_status}",
        ),
        (
            "most one user kept, 8 MiB files in a loop, before the turn was stopped",
            f"{kept:.0f} MiB, HTTP {many_status} after {many_s:.1f} s; DATA_DIR free after"
            f" {many_free:.0f} MiB of {f['data_dir']}; `/health` {many_health}",
        ),
        (
            "`/tmp`, `/dev/shm` inside the sandbox (`statvfs`)",
            " / ".join(f"{f['tmpfs'].get(p, '–')} MiB" for p in ("/tmp", "/dev/shm"))
            + f" (`AGENT_TMP_MB` default here: {default_tmp_mb()} MiB)",
        ),
        (
            f"fork bomb, `AGENT_MAX_PROCS={args.max_procs}`: the agent's `pids.peak`"
            " (processes + threads)",
            f"{bomb_peak}, HTTP {bomb_status}",
        ),
        (
            "… sleeps started / processes its pid namespace showed",
            "–" if seen is None else f"{seen[0]} / {seen[1]}",
        ),
        (
            f"bob one-shot p50 (n={args.samples}): quiet / alice's bomb + rewrite /"
            " alice's files left / after",
            " / ".join(fmt_ms(phase[0]) for phase in (quiet, loaded, full, after)),
        ),
        (
            f"bob session turn p50 (n={args.samples}): the same four",
            " / ".join(fmt_ms(phase[1]) for phase in (quiet, loaded, full, after)),
        ),
        (
            f"bob's failed requests (of {2 * args.samples}): the same four",
            " / ".join(str(len(phase[2])) for phase in (quiet, loaded, full, after)),
        ),
        (
            "alice's loading turn (bomb, rewrite until bob is done, fill)",
            f"HTTP {a_status} after {a_took:.1f} s; pids.peak {a_peak}; she keeps"
            f" {a_kept:.0f} MiB; DATA_DIR free {a_free:.0f} MiB; `/health` then"
            f" {f['full health']}, {f['health']} once her files are removed",
        ),
    ]
    return [f"| {a} | {b} |" for a, b in rows]


async def serve(
    service: RunningService,
    mock: Mock,
    args: argparse.Namespace,
    quiet: QuietLog,
    figures: dict[str, Any],
) -> None:
    """Once both workers are ready, every phase."""
    async with httpx.AsyncClient(base_url=service.url, timeout=90) as client:
        with trio.fail_after(90):
            while True:
                try:
                    if (await client.get("/health")).json()["workers"]["ready"] >= 2:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                await trio.sleep(0.1)
        for line in service.log_text().splitlines():
            if "cgroup" in line.lower() or "sandbox" in line.lower():
                print(f"  service log:     {line.strip()[:150]}")
        run = Run(service, client, mock)
        run.figures = figures
        await phases(run, args, quiet)


async def main(args: argparse.Namespace) -> int:
    print("\n".join(machine_lines()))
    quiet = QuietLog()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        workdir = Path(tmp)
        mock = Mock()
        mounted = False
        data_dir = workdir / "data"
        bases: dict[str, Path] = {}
        try:
            with trio.fail_after(args.budget):
                async with open_mock_api(default=mock.answer) as api:
                    overrides = service_overrides(
                        api.url,
                        workdir,
                        API_KEYS=",".join(f"{u}:{k}" for u, k in KEYS.items()),
                        POOL_SIZE="2",
                        AGENT_SANDBOX="auto",
                        AGENT_MAX_PROCS=str(args.max_procs),
                        USER_DISK_MAX_MB=str(args.disk_mb),
                        DISK_RESERVE_MB="256",  # (the default: a quarter of the tmpfs)
                    )
                    env = service_env(workdir, overrides, record_pids=False)
                    mounted = mount_tmpfs(data_dir, args.data_mb)
                    figures["data_dir"] = (
                        f"a {args.data_mb} MiB tmpfs" if mounted else "(not root: no tmpfs)"
                    )
                    print(f"  DATA_DIR:        {data_dir} ({figures['data_dir']})")
                    async with launch_service(env, start_timeout_s=60) as service:
                        bases = agent_cgroup_bases(service.pid)
                        try:
                            await serve(service, mock, args, quiet, figures)
                            await service.stop()
                        finally:
                            if args.log:
                                Path(args.log).write_text(service.log_text())
        finally:
            sleeps = leftover_sleeps()
            for pid in sleeps:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            figures["leftover sleeps"] = len(sleeps)
            figures["leftover cgroups"] = remove_leftover_cgroups(bases, service_prefix(data_dir))
            if mounted:
                subprocess.run(["umount", "-l", str(data_dir)], check=False, timeout=10)

    section("summary")
    print("\n".join(machine_lines()[:4]))
    print("\n".join(table(figures, args)))
    cgroups, in_them = figures.get("leftover cgroups", ([], 0))
    print(
        f"\n  left after the service stopped: {figures['leftover sleeps']} of the bomb's"
        f" sleeps, {len(cgroups)} agent cgroups ({in_them} processes in them):"
        f" {', '.join(cgroups) or 'none'} (killed and removed now)"
    )
    print(quiet.verdict())
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=5, help="bob's one-shots (and turns)")
    parser.add_argument("--disk-mb", type=int, default=64, help="USER_DISK_MAX_MB")
    parser.add_argument("--data-mb", type=int, default=256, help="DATA_DIR's tmpfs (as root)")
    parser.add_argument("--max-procs", type=int, default=64, help="AGENT_MAX_PROCS")
    parser.add_argument("--log", help="write the service's log to this file")
    parser.add_argument("--budget", type=float, default=300, help="the whole run, seconds")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
