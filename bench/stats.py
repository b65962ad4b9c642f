"""The statistics every benchmark and the soak share: percentiles, summaries, a quiet machine.

Latencies are collected in seconds and summarised in milliseconds. A
:class:`QuietMeter` tells how much CPU processes *outside* the measurement used
meanwhile: on a 2-CPU box a test suite running next to a benchmark doubles its
latencies and halves its throughput, so every phase prints it and the summary
says whether the machine was quiet.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from tests.support.harness import CLK_TCK, proc_cpu_s, proc_memory_kib

# Above this share of all CPUs used by other processes, a phase's figures are distorted.
QUIET_SHARE_PERCENT = 5.0


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return data[low] + (data[high] - data[low]) * (pos - low)


def dist(values_s: list[float]) -> dict[str, float]:
    """n, min, p50, p90, p99, max and mean of ``values_s`` (seconds), in milliseconds."""
    ms = [v * 1000 for v in values_s] or [math.nan]
    return {
        "n": len(values_s),
        "min": min(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms),
        "mean": statistics.fmean(ms),
    }


def fmt_dist(name: str, d: dict[str, float], *, width: int = 34, decimals: int = 3) -> str:
    """One line: ``name`` and the distribution ``d`` from :func:`dist`."""
    f = f"7.{decimals}f"
    return (
        f"  {name:<{width}} n={d['n']:<4} min={d['min']:{f}}  p50={d['p50']:{f}}  "
        f"p90={d['p90']:{f}}  p99={d['p99']:{f}}  max={d['max']:{f}}  mean={d['mean']:{f}} ms"
    )


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


def machine_lines() -> list[str]:
    """Date, CPUs, load average and Python: the head of every benchmark's report."""
    return [
        f"  date:            {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"  nproc:           {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})",
        f"  cpu:             {_cpu_model()}",
        f"  load average:    {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
        f"  python:          {platform.python_version()} ({sys.executable})",
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (e.g. agents started directly)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds every CPU of the machine spent not idle, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# A process whose command line holds this is an agent (the fake CLI), not the service.
AGENT_MARK = b"fake_claude"


class TreeCpu(NamedTuple):
    """CPU seconds of a process tree, split into the service and its agents."""

    service_s: float  # every live process of the tree that is not an agent
    agents_s: float  # live agents, and everything any process of the tree reaped
    processes: int  # live processes counted

    @property
    def total_s(self) -> float:
        return self.service_s + self.agents_s


def _stat_fields(pid: int) -> list[str]:
    # Fields from field 3 (state) on: ppid=1, utime=11, stime=12, cutime=13, cstime=14.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _is_agent(pid: int) -> bool:
    return AGENT_MARK in Path(f"/proc/{pid}/cmdline").read_bytes()


def tree_cpu(root: int) -> TreeCpu:
    """CPU of ``root`` and all its live descendants, whatever they are (a launcher, a
    node server and its esbuild helpers, a Python service and its reaper, agents).

    Each live process counts its own CPU and that of the children it reaped, so a
    tick is counted once: in the process while it lives, in its parent's once
    reaped. Live processes whose command line holds :data:`AGENT_MARK` count as
    agents, the others as the service; what was reaped counts as agents (the only
    children the services reap in a benchmark). A process that exits between the
    scan and its read, or whose parent dies before reaping it, is missed. Raises
    OSError if ``root`` itself is gone.
    """
    service = agents = 0.0
    counted = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
            agent = _is_agent(pid)
        except OSError:
            if pid == root:
                raise
            continue
        own, reaped = (int(fields[11]) + int(fields[12])), (int(fields[13]) + int(fields[14]))
        if agent:
            agents += own / CLK_TCK
        else:
            service += own / CLK_TCK
        agents += reaped / CLK_TCK
        counted += 1
    return TreeCpu(service, agents, counted)


class TreeCpuSampler:
    """CPU seconds of a process tree, counting processes that die without being reaped
    by another of the tree (:func:`tree_cpu` loses them: a sandboxed agent killed with
    its PID namespace is reaped by no one it could be credited to).

    :meth:`run` samples every live process of the tree each ``interval`` s and keeps
    each one's (pid and start time) own CPU; :meth:`total` is their sum, reaped
    children's figures ignored, so a tick is counted once. What a process uses in its
    last ``interval`` before it dies, or in a life shorter than that, is missed.
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.seen: dict[tuple[int, str], float] = {}

    def total(self) -> float:
        """Sample now; the CPU seconds of every process of the tree seen so far."""
        for pid in process_tree(self.root):
            try:
                fields = _stat_fields(pid)
            except OSError:
                continue
            own = (int(fields[11]) + int(fields[12])) / CLK_TCK
            key = (pid, fields[19])  # field 22, starttime: a reused pid is another process
            self.seen[key] = max(own, self.seen.get(key, 0.0))
        return sum(self.seen.values())

    async def run(self) -> None:
        """Sample until cancelled."""
        import trio

        while True:
            self.total()
            await trio.sleep(self.interval)


def tree_service_rss_kib(root: int) -> int:
    """VmRSS of the live processes of ``root``'s tree that are not agents, in KiB
    (a sum: pages shared between them count once per process)."""
    total = 0
    for pid in process_tree(root):
        try:
            if _is_agent(pid):
                continue
            total += proc_memory_kib(pid).get("VmRSS", 0)
        except OSError:
            continue
    return total


class QuietMeter:
    """The share of the machine's CPU that processes outside the measurement used.

    Ours are this process, its reaped children and, given its pid, the service with
    its reaped agents; given ``trees``, every process of those trees (services
    compared side by side, with their live agents); given ``samplers``, every process
    they saw (sandboxed agents too, which ``trees`` loses when they are killed);
    everything else busy on the machine meanwhile counts as others.
    """

    def __init__(
        self,
        service_pid: int | None = None,
        *,
        trees: Sequence[int] = (),
        samplers: Sequence[TreeCpuSampler] = (),
    ) -> None:
        self.service_pid = service_pid
        self.trees = tuple(trees)
        self.samplers = tuple(samplers)  # trees whose killed processes count too
        self.start = self._sample()

    def _ours(self) -> float:
        ours = self_cpu_s() + children_cpu_s()
        if self.service_pid is not None:
            try:
                ours += sum(proc_cpu_s(self.service_pid))
            except OSError:
                pass
        for root in self.trees:
            try:
                ours += tree_cpu(root).total_s
            except OSError:
                pass
        for sampler in self.samplers:
            ours += sampler.total()
        return ours

    def _sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), machine_busy_s(), self._ours()

    def report(self) -> tuple[str, float]:
        """(a line to print, the share of all CPUs other processes used, in %)."""
        t0, busy0, ours0 = self.start
        t1, busy1, ours1 = self._sample()
        wall = max(t1 - t0, 1e-9)
        others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        ncpu = os.cpu_count() or 1
        share = 100 * others / wall / ncpu
        warn = (
            "  <-- the machine was not quiet: figures are distorted"
            if share > QUIET_SHARE_PERCENT
            else ""
        )
        line = (
            f"  other processes used {others:.1f} CPU-s in {wall:.1f} s "
            f"({share:.0f} % of {ncpu} CPUs){warn}"
        )
        return line, share


def quiet_verdict(shares: Iterable[float]) -> str:
    """The summary line: was the machine quiet during every phase?"""
    worst = max(shares, default=0.0)
    return (
        f"quiet machine: {'yes' if worst <= QUIET_SHARE_PERCENT else 'NO'} (other processes "
        f"used up to {worst:.0f} % of the CPUs during a phase)"
    )


class SideBySide:
    """Figures of our service and the original, measured in interleaved rounds.

    Each figure keeps one value per round for each side (None: not measured, e.g.
    the original cannot do it). The table shows, per figure, the median of the
    rounds for each side and the ratio ours / original: the median of the rounds'
    ratios (each round measures both sides under the same machine load), with
    their range.
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}
        self.units: dict[str, str] = {}
        self.notes: dict[str, str] = {}

    def add(self, figure: str, unit: str, side: str, round_no: int, value: float) -> None:
        self.units[figure] = unit
        sides = self.values.setdefault(figure, {"ours": [], "original": []})
        values = sides[side]
        while len(values) < round_no:
            values.append(math.nan)
        values.append(value)

    def note(self, figure: str, text: str) -> None:
        """Say why a figure has no value on one side (shown instead of a number)."""
        self.notes[figure] = text
        self.values.setdefault(figure, {"ours": [], "original": []})

    def table(self) -> list[str]:
        lines = [
            "| figure | ours | original | ratio ours/original (median of rounds; range) |",
            "|---|---|---|---|",
        ]
        for figure, sides in self.values.items():
            unit = self.units.get(figure, "")
            cells = []
            for side in ("ours", "original"):
                known = [v for v in sides[side] if not math.isnan(v)]
                cells.append(
                    f"{statistics.median(known):.{_decimals(known)}f} {unit}" if known else "—"
                )
            ratios = [
                a / b
                for a, b in zip(sides["ours"], sides["original"], strict=False)
                if not (math.isnan(a) or math.isnan(b)) and b != 0
            ]
            if ratios:
                ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}, n={len(ratios)})"
            else:
                ratio = self.notes.get(figure, "—")
            lines.append(f"| {figure} | {cells[0]} | {cells[1]} | {ratio} |")
        return lines


def _decimals(values: list[float]) -> int:
    """Enough decimals for the values' size: 3 below 10, 2 below 100, else 1."""
    size = abs(statistics.median(values))
    return 3 if size < 10 else 2 if size < 100 else 1


class QuietLog:
    """The quiet-machine share of every phase of a run, and the verdict over them all."""

    def __init__(self) -> None:
        self.shares: list[float] = []

    def report(self, meter: QuietMeter) -> str:
        """``meter``'s line to print; its share is kept for :meth:`verdict`."""
        line, share = meter.report()
        self.shares.append(share)
        return line

    @contextmanager
    def phase(self, service_pid: int | None = None, **meter: Any) -> Iterator[QuietMeter]:
        """Meter the block (see :class:`QuietMeter`); print its line at the end."""
        quiet = QuietMeter(service_pid, **meter)
        yield quiet
        print(self.report(quiet))

    def verdict(self) -> str:
        return quiet_verdict(self.shares)


def print_machine(*lines: str) -> None:
    """The head of every benchmark's report: the machine, then ``lines``."""
    section("machine")
    print("\n".join([*machine_lines(), *lines]))
