#!/usr/bin/env python3
"""Benchmark of the real bundled Claude Code CLI against the mock Messages API.

Prints figures; it is not a test. No credentials, no network: the CLI talks to
``claude_code_api/demo/mock_messages_api.py`` in this process, which answers every model call at
once (an echo). Agents are made exactly as the service makes them (same launcher,
sandbox decision and options: ``tests.support.harness.service_agents``).

1. **Per agent process**: warm-up (spawn to ``initialize`` answered) wall time and
   CPU, RSS when warm, and a one-shot turn's wall time — one agent at a time.
2. **Reuse vs recycle** for one user's one-shots, directly on agents: *recycle*
   (the service today: a fresh agent per request — start, turn, close) against
   *reuse* (one warm agent: ``/clear``, then the turn). CPU per request decides
   throughput on a CPU-bound machine: the bound is ``CPUs / CPU per request``.
3. **Start-up of the service**: spawn to the first ``/health`` answer, and to
   ``/health`` with a warm worker (imports included).
4. **One-shot throughput** through the service at saturation (``--clients``
   concurrent clients for ``--duration`` s, ``--pool-size`` workers) against the
   recycle bound ``POOL_SIZE / warm-up wall`` and the CPU bound.

    .venv/bin/python bench/bench_real_cli.py            # ~2 min on a quiet machine
    .venv/bin/python bench/bench_real_cli.py --help

As root it sets ``IS_SANDBOX=1`` (the CLI refuses bypassPermissions otherwise).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from bench.service import checked_turn, model_proxy  # noqa: E402
from bench.stats import QuietMeter, dist, fmt_dist, machine_lines, quiet_verdict, section  # noqa: E402
from claude_code_api.agent.protocol import AgentSpec  # noqa: E402
from claude_code_api.demo.mock_messages_api import open_mock_api  # noqa: E402
from tests.support.harness import CLK_TCK, launch_service, service_agents, service_env  # noqa: E402
from tests.support.real_cli import service_overrides  # noqa: E402

PROMPT = "What is 2+2?"


def real_cli_env(api_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    return service_env(workdir, service_overrides(api_url, workdir, **extra), record_pids=False)


def group_usage(pgid: int) -> tuple[float, int]:
    """CPU seconds (with reaped children) and RSS KiB of every process in group ``pgid``."""
    cpu, rss = 0.0, 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != pgid:
                continue
            cpu += sum(int(v) for v in stat[11:15]) / CLK_TCK  # utime stime cutime cstime
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


async def per_agent(new_agent, workdir: Path, runs: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"warm-up": [], "warm-up cpu": [], "rss": [], "turn": []}
    for n in range(runs):
        agent = new_agent(AgentSpec(f"bench-{n}", workdir / "agents" / str(n), ephemeral=True))
        started = time.perf_counter()
        await agent.start(60)
        figures["warm-up"].append(time.perf_counter() - started)
        await trio.sleep(0.5)  # settled
        cpu, rss = group_usage(agent.pid)
        figures["warm-up cpu"].append(cpu)
        figures["rss"].append(rss / 1024)

        async def ignore(event) -> None:
            pass

        started = time.perf_counter()
        await checked_turn(agent)
        figures["turn"].append(time.perf_counter() - started)
        await agent.close()
    return figures


async def recycle_vs_reuse(new_agent, workdir: Path, requests: int) -> dict[str, tuple]:
    async def ignore(event) -> None:
        pass

    # Recycle: a fresh agent per request (start, turn, close), as the pool does. Its
    # CPU is read from its process group before the close (a killed group's CPU is lost).
    cpu = 0.0
    started = time.perf_counter()
    for n in range(requests):
        agent = new_agent(AgentSpec(f"recycle-{n}", workdir / "recycle" / str(n), ephemeral=True))
        await agent.start(60)
        await checked_turn(agent)
        cpu += group_usage(agent.pid)[0]
        await agent.close()
    recycle = (time.perf_counter() - started, cpu)

    # Reuse: one warm agent for every request of one user, /clear between them.
    agent = new_agent(AgentSpec("reuse", workdir / "reuse", ephemeral=True))
    await agent.start(60)
    cpu_before = group_usage(agent.pid)[0]
    started = time.perf_counter()
    for _ in range(requests):
        await agent.run_turn("/clear", ignore)
        await checked_turn(agent)
    reuse = (time.perf_counter() - started, group_usage(agent.pid)[0] - cpu_before)
    await agent.close()
    return {"recycle": recycle, "reuse": reuse}


async def start_up(env: dict[str, str]) -> tuple[float, float]:
    started = time.perf_counter()
    first = ready = None
    async with launch_service(env, start_timeout_s=60) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            while ready is None:
                try:
                    body = (await client.get("/health")).json()
                except httpx.HTTPError:
                    await trio.sleep(0.01)
                    continue
                first = first or time.perf_counter() - started
                if body["workers"]["ready"] >= 1:
                    ready = time.perf_counter() - started
                await trio.sleep(0.01)
        await service.stop()
    return first, ready


def first_api_key(env: dict[str, str]) -> str:
    """The key of the first ``user:key`` (or bare key) in the service's ``API_KEYS``."""
    first = env["API_KEYS"].split(",")[0]
    return first.rpartition(":")[2]


async def throughput(
    env: dict[str, str], clients: int, duration: float
) -> tuple[int, collections.Counter[str], float]:
    """One user's one-shots from ``clients`` clients: (successes, failures by kind, wall s)."""
    ok = 0
    failed: collections.Counter[str] = collections.Counter()
    async with launch_service(env, start_timeout_s=60) as service:
        async with httpx.AsyncClient(
            base_url=service.url, timeout=120, headers={"x-api-key": first_api_key(env)}
        ) as client:
            while (await client.get("/health")).json()["workers"]["ready"] < 1:
                await trio.sleep(0.1)
            deadline = trio.current_time() + duration

            async def loop() -> None:
                nonlocal ok, failed
                while trio.current_time() < deadline:
                    reply = await client.post("/run", json={"prompt": PROMPT, "timeoutMs": 60000})
                    if reply.status_code == 200 and reply.json().get("success"):
                        ok += 1
                    else:
                        error = reply.json().get("error") if reply.content else None
                        failed[f"{reply.status_code} {str(error)[:60]}"] += 1

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(clients):
                    nursery.start_soon(loop)
            wall = time.perf_counter() - started
        await service.stop()
    return ok, failed, wall


async def main(args: argparse.Namespace) -> None:
    print("\n".join(machine_lines()))
    shares = []
    with tempfile.TemporaryDirectory(prefix="bench-real-cli-") as tmp:
        workdir = Path(tmp)
        env_of = partial(real_cli_env, workdir=workdir, POOL_SIZE=str(args.pool_size))
        async with open_mock_api() as api, model_proxy(env_of(api.url)) as proxy:
            env = env_of(api.url)
            _, new_agent = await trio.to_thread.run_sync(service_agents, env, proxy)
            sandboxed = new_agent.launcher.sandboxed
            print(f"  agents sandboxed: {sandboxed}")

            section("1. per agent process (one at a time)")
            meter = QuietMeter()
            figures = await per_agent(new_agent, workdir, args.runs)
            print(fmt_dist("warm-up (spawn -> initialize)", dist(figures["warm-up"])))
            print(fmt_dist("one-shot turn", dist(figures["turn"])))
            cpu = statistics.median(figures["warm-up cpu"])
            rss = statistics.median(figures["rss"])
            print(f"  warm-up CPU (process group)         median {cpu:.3f} s")
            print(f"  RSS when warm (process group)       median {rss:.0f} MiB")
            line, share = meter.report()
            print(line)
            shares.append(share)
            warm_up = statistics.median(figures["warm-up"])

            section("2. one user's one-shots: recycle (fresh agent each) vs reuse (/clear)")
            meter = QuietMeter()
            results = await recycle_vs_reuse(new_agent, workdir, args.requests)
            ncpu = os.cpu_count() or 1
            for name, (wall, cpu_s) in results.items():
                per_wall, per_cpu = wall / args.requests, cpu_s / args.requests
                print(
                    f"  {name:<8} {args.requests} requests: {per_wall * 1000:7.0f} ms and "
                    f"{per_cpu * 1000:6.0f} ms CPU each; CPU bound {ncpu / per_cpu:5.1f} req/s"
                )
            ratio = (results["recycle"][1] / results["reuse"][1]) if results["reuse"][1] else 0
            print(f"  reuse / recycle throughput (CPU bound): {ratio:.2f}x")
            line, share = meter.report()
            print(line)
            shares.append(share)

            section("3. start-up of the service (imports included)")
            meter = QuietMeter()
            firsts, readies = [], []
            for n in range(args.runs):
                first, ready = await start_up(real_cli_env(api.url, workdir / f"start-{n}"))
                firsts.append(first)
                readies.append(ready)
            print(fmt_dist("spawn -> first /health answer", dist(firsts)))
            print(fmt_dist("spawn -> /health with a warm worker", dist(readies)))
            line, share = meter.report()
            print(line)
            shares.append(share)

            section(f"4. one-shot throughput, POOL_SIZE={args.pool_size}, {args.clients} clients")
            meter = QuietMeter()
            ok, failed, wall = await throughput(env, args.clients, args.duration)
            bound = args.pool_size / warm_up
            print(
                f"  achieved   {ok / wall:6.2f} req/s ({ok} ok, {sum(failed.values())} failed"
                f" in {wall:.1f} s)"
            )
            for kind, count in failed.most_common():
                print(f"    failed: {count} x {kind}")
            # One user's requests: the service keeps their agent (AGENT_REUSE_S) and clears it.
            reuse_cpu = results["reuse"][1] / args.requests
            print(f"  reuse CPU bound {ncpu} CPUs / reuse CPU = {ncpu / reuse_cpu:.2f} req/s")
            print(f"  recycle bound POOL_SIZE / warm-up wall = {bound:.2f} req/s")
            print(f"  CPU bound   {ncpu} CPUs / warm-up CPU  = {ncpu / cpu:.2f} req/s")
            if not ok:
                raise SystemExit("no request through the service succeeded: see the failures above")
            line, share = meter.report()
            print(line)
            shares.append(share)
    print("\n" + quiet_verdict(shares))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="agents / service starts measured")
    parser.add_argument("--requests", type=int, default=10, help="requests for recycle vs reuse")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
