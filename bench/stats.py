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
from collections.abc import Iterable
from pathlib import Path

from tests.harness import CLK_TCK, proc_cpu_s

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


class QuietMeter:
    """The share of the machine's CPU that processes outside the measurement used.

    Ours are this process, its reaped children and, given its pid, the service with
    its reaped agents; everything else busy on the machine meanwhile counts as others.
    """

    def __init__(self, service_pid: int | None = None) -> None:
        self.service_pid = service_pid
        self.start = self._sample()

    def _ours(self) -> float:
        ours = self_cpu_s() + children_cpu_s()
        if self.service_pid is not None:
            try:
                ours += sum(proc_cpu_s(self.service_pid))
            except OSError:
                pass
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
