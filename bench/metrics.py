"""What the Prometheus metrics cost on the hot path: the service with METRICS=1 against METRICS=0.

In-process first (what each hook one one-shot run passes costs, over many calls), then
the two settings in alternating rounds, each on a fresh service and the fake CLI:
``GET /health`` and ``POST /run`` latency, the service's own CPU per run, and with
METRICS=1 a scrape; the summary prints each figure against its baseline from the same
run (``bench/README.md``).

    .venv/bin/python -m bench.metrics            # about 2 minutes
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import trio

from bench.service import (
    HTTP_TIMEOUT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    bench_env,
    options,
    run_ok,
    samples,
    wait_ready,
    workdir,
)
from bench.stats import QuietLog, dist, fmt_dist, print_machine, quiet_verdict, section
from claude_code_api.http.observe import count_requests, note_route
from claude_code_api.observe import metrics
from tests.support.harness import RunningService, launch_service, proc_cpu_s


def per_call_us(call, calls: int) -> float:
    """Microseconds ``call()`` takes, the best of 5 batches of ``calls`` (least disturbed)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


async def per_await_us(make, calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            await make()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


async def hook_costs(calls: int) -> dict[str, float]:
    """Microseconds each metrics hook of one one-shot run costs (this process, METRICS on)."""
    metrics.set_enabled(True)
    usage = {"input_tokens": 4, "output_tokens": 5, "cache_read_input_tokens": 100}

    async def bare_app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def noted_app(scope, receive, send) -> None:
        note_route(scope, "/run")
        await bare_app(scope, receive, send)

    async def discard(message) -> None:
        pass

    counted = count_requests(noted_app)

    def scope() -> dict:
        return {"type": "http", "method": "POST", "path": "/run"}

    bare = await per_await_us(lambda: bare_app(scope(), None, discard), calls)
    wrapped = await per_await_us(lambda: counted(scope(), None, discard), calls)
    costs = {
        "request counter + route note (ASGI)": max(0.0, wrapped - bare),
        "run_started (queue_wait_seconds)": per_call_us(lambda: metrics.run_started(0.002), calls),
        "run_answered (duration, cost, tokens)": per_call_us(
            lambda: metrics.run_answered("api", 0.01, "ok", 0.0001, usage), calls
        ),
        # The metered agent reads trio's clock twice per start and adds one call per turn.
        "metered agent (start: 2 clock reads)": per_call_us(
            lambda: (time.perf_counter(), time.perf_counter(), metrics.agent_started(0.5)),
            calls,
        ),
    }
    return costs


class Figures:
    """Every sample of one setting, over all its rounds."""

    def __init__(self) -> None:
        self.health: list[float] = []
        self.run: list[float] = []
        self.cpu_per_run: list[float] = []  # one figure a round, seconds
        self.scrape: list[float] = []
        self.quiet = QuietLog()


async def one_round(service: RunningService, args: argparse.Namespace, into: Figures) -> None:
    async with service.client(timeout=HTTP_TIMEOUT_S) as client:
        await wait_ready(client, interval=0.02)
        with into.quiet.phase(service.pid):
            into.health += await samples(lambda: client.get("/health"), args.health_samples)

            async def ready_then_run() -> float:
                await wait_ready(client)
                started = time.perf_counter()
                await run_ok(client)
                return time.perf_counter() - started

            for _ in range(10):
                await ready_then_run()
            into.run += [await ready_then_run() for _ in range(args.samples)]
            await wait_ready(client, interval=0.02)
            before = proc_cpu_s(service.pid)[0]  # the service itself, not its agents
            for _ in range(args.cpu_runs):
                await run_ok(client)
            # The last run's worker is replaced in the background: its warm-up is part of a run.
            await wait_ready(client, interval=0.02)
            into.cpu_per_run.append((proc_cpu_s(service.pid)[0] - before) / args.cpu_runs)
            if args.metrics == "1":
                into.scrape += await samples(lambda: client.get("/metrics"), args.scrapes, warmup=3)


async def run_setting(
    where: Path, args: argparse.Namespace, setting: str, round_no: int, into: Figures
) -> None:
    env = bench_env(
        where / f"round-{round_no}-metrics-{setting}",
        {"POOL_SIZE": str(args.pool_size), "METRICS": setting},
    )
    async with launch_service(env, start_timeout_s=START_TIMEOUT_S) as service:
        args.metrics = setting
        await one_round(service, args, into)
        await service.stop(timeout_s=STOP_TIMEOUT_S)


def ratio_line(name: str, on: float, off: float, unit: str) -> str:
    ratio = on / off if off else float("nan")
    return (
        f"  {name:<34} METRICS=1 {on:9.3f} {unit}   METRICS=0 (baseline) {off:9.3f} {unit}"
        f"   ratio {ratio:5.3f} ({(ratio - 1) * 100:+.1f} %)"
    )


async def main(args: argparse.Namespace) -> None:
    figures = {"1": Figures(), "0": Figures()}
    with workdir("bench-metrics-") as where:
        print_machine(
            f"  arguments:       rounds={args.rounds} samples={args.samples}"
            f" health_samples={args.health_samples} cpu_runs={args.cpu_runs}"
            f" pool_size={args.pool_size}"
        )
        section("0. in-process cost of the hooks one one-shot run passes (METRICS on)")
        hooks = await hook_costs(args.hook_calls)
        for name, cost in hooks.items():
            print(f"  {name:<40} {cost:7.2f} µs")
        hooks_total_us = sum(hooks.values())
        print(f"  {'total per run':<40} {hooks_total_us:7.2f} µs")
        for round_no in range(args.rounds):
            order = ("1", "0") if round_no % 2 == 0 else ("0", "1")
            for metrics in order:
                section(f"round {round_no + 1}: METRICS={metrics}")
                await run_setting(where, args, metrics, round_no, figures[metrics])
                f = figures[metrics]
                print(fmt_dist("GET /health", dist(f.health[-args.health_samples :])))
                print(fmt_dist("POST /run (one-shot)", dist(f.run[-args.samples :])))
                print(f"  service CPU per run:               {f.cpu_per_run[-1] * 1000:.3f} ms")
                if f.scrape:
                    print(fmt_dist("GET /metrics (a scrape)", dist(f.scrape[-args.scrapes :])))

    on, off = figures["1"], figures["0"]
    if not args.rounds:
        return
    section("summary: METRICS=1 against its baseline METRICS=0 (same run)")
    print(fmt_dist("GET /health, METRICS=1", dist(on.health)))
    print(fmt_dist("GET /health, METRICS=0", dist(off.health)))
    print(fmt_dist("POST /run, METRICS=1", dist(on.run)))
    print(fmt_dist("POST /run, METRICS=0", dist(off.run)))
    print(ratio_line("GET /health p50", dist(on.health)["p50"], dist(off.health)["p50"], "ms"))
    print(ratio_line("POST /run p50", dist(on.run)["p50"], dist(off.run)["p50"], "ms"))
    print(ratio_line("POST /run p99", dist(on.run)["p99"], dist(off.run)["p99"], "ms"))
    print(
        ratio_line(
            "service CPU per run (median)",
            statistics.median(on.cpu_per_run) * 1000,
            statistics.median(off.cpu_per_run) * 1000,
            "ms",
        )
    )
    print(fmt_dist("GET /metrics (METRICS=1 only)", dist(on.scrape)))
    run_p50_ms = dist(off.run)["p50"]
    print(
        f"  metrics hooks per run (in-process)  {hooks_total_us:7.2f} µs = "
        f"{hooks_total_us / 10 / run_p50_ms:.2f} % of POST /run p50 with METRICS=0"
        f" ({run_p50_ms:.3f} ms)"
    )
    print(f"  {quiet_verdict(on.quiet.shares + off.quiet.shares)}")


def parse_args() -> argparse.Namespace:
    parser = options(
        argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
        rounds=(4, "rounds (each runs both settings)"),
        samples=(60, "timed POST /run a round"),
        health_samples=(500, "timed GET /health"),
        cpu_runs=(60, "POST /run for CPU per run"),
        scrapes=(30, "timed GET /metrics"),
        pool_size=(2, "POOL_SIZE"),
        hook_calls=(20000, "calls per hook timing"),
    )
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
