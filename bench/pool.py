"""One-shot pool: the service's overhead over a direct SDK turn, throughput, start-up.

Phases, against the fake CLI: 0. spawn to the first ``GET /health`` 200; 1. an agent's
warm-up, made as the service makes them (:class:`bench.service.Direct`); 2. direct turns
on such agents (the baselines); 3. ``POST /run`` one at a time, the pool ready before
each, with ``GET /health`` and hypercorn alone (``bench/bare_http.py``) for reference;
4. throughput at saturation, with CPU per job and RSS. ``--original``: ours and the
original side by side in interleaved rounds instead. ``bench/README.md`` says what each
figure means and what is (not) compared.

    .venv/bin/python -m bench.pool            # about 1.5 minutes on a quiet machine
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

import claude_code_api
from bench import bare_http
from bench.original import (
    OURS,
    OriginalBuild,
    add_side_by_side_arguments,
    header_lines,
    launch,
    prepare,
    round_orders,
    sides_of,
)
from bench.service import (
    AUTH,
    HTTP_TIMEOUT_S,
    PROMPT,
    READY_TIMEOUT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Direct,
    bench_env,
    client_of,
    launch_sides,
    options,
    print_side_by_side,
    run_mode,
    run_ok,
    run_outcome,
    samples,
    wait_ready,
)
from bench.stats import (
    QuietLog,
    SideBySide,
    TreeCpu,
    children_cpu_s,
    dist,
    fmt_dist,
    print_machine,
    section,
    self_cpu_s,
    tree_cpu,
    tree_service_rss_kib,
)
from claude_code_api.agent.protocol import Agent
from tests.support.harness import FAKE_CLAUDE, ROOT, RunningService, launch_service

Figures = dict[str, Any]


# --- direct: the service's own agent, without the service ------------------------------


async def measure_warmup(direct: Direct, runs: int, pool_size: int) -> Figures:
    """Sequential warm-ups (the bound's figure), then pool_size at once (contention)."""
    times = []
    cpu_before = children_cpu_s()
    for _ in range(runs):
        took, agent = await direct.warm()
        times.append(took)
        await direct.close(agent)
    # The children are reaped: their CPU (start, initialize, exit on EOF) is counted.
    cpu_per_agent = (children_cpu_s() - cpu_before) / runs

    concurrent: list[float] = []
    for _ in range(max(1, runs // pool_size)):
        agents: list[Agent] = []

        async def warm_one(agents: list[Agent] = agents) -> None:
            took, agent = await direct.warm()
            concurrent.append(took)
            agents.append(agent)

        async with trio.open_nursery() as nursery:
            for _ in range(pool_size):
                nursery.start_soon(warm_one)
        for agent in agents:
            await direct.close(agent)
    return {"seq": times, "concurrent": concurrent, "cpu_per_agent_s": cpu_per_agent}


async def measure_direct(direct: Direct, count: int, pause_s: float) -> Figures:
    """(a) one warm agent, ``count`` turns back to back (after 10): the headline baseline;
    (b) the same agent idle ``pause_s`` before each turn, as the service's agent is idle
    between its warm-up and its job; (c) the first turn of ``count`` fresh warm agents:
    the service's one-shot path minus the service."""
    _, agent = await direct.warm()
    try:
        reused = await samples(lambda: direct.turn(agent), count)
        paused = []
        for _ in range(count if pause_s > 0 else 0):
            await trio.sleep(pause_s)
            paused.append(await direct.turn(agent))
    finally:
        await direct.close(agent)
    fresh = []
    for _ in range(count):
        _, agent = await direct.warm()
        try:
            await trio.sleep(0.01)  # let the new process settle, as the service's would
            fresh.append(await direct.turn(agent))
        finally:
            await direct.close(agent)
    return {"reused": reused, "paused": paused, "fresh": fresh}


# --- the service ----------------------------------------------------------------------


async def measure_startup(env: dict[str, str], where: Path, runs: int) -> Figures:
    """Spawn -> the first ``GET /health`` 200, ``runs`` times, each on a fresh DATA_DIR;
    interleaved with the baseline, a bare interpreter that imports trio and exits."""
    service, interpreter = [], []
    for n in range(runs):
        started = time.perf_counter()
        await trio.run_process([sys.executable, "-c", "import trio"])
        interpreter.append(time.perf_counter() - started)
        fresh = {**env, "DATA_DIR": str(where / f"startup-{n}")}
        started = time.perf_counter()
        async with launch_service(fresh, start_timeout_s=START_TIMEOUT_S) as running:
            async with running.client(timeout=HTTP_TIMEOUT_S) as client:
                while (await client.get("/health")).status_code != 200:
                    await trio.sleep(0.002)
                service.append(time.perf_counter() - started)
            await running.stop(timeout_s=STOP_TIMEOUT_S)
    return {"service": service, "interpreter": interpreter}


async def health_and_bad_run(client: httpx.AsyncClient, count: int, bad_run_status: int) -> Figures:
    """``count`` GET /health, then ``count`` POST /run with an empty prompt (after 10 each):
    round trips that involve no agent, what the HTTP stack alone costs."""

    async def bad_run() -> None:
        response = await client.post("/run", json={"prompt": ""}, headers=AUTH)
        if response.status_code != bad_run_status:
            raise RuntimeError(f"expected {bad_run_status}, got {response.status_code}")

    return {
        "health": await samples(lambda: client.get("/health"), count),
        "bad_run": await samples(bad_run, count),
    }


async def measure_service_latency(service: RunningService, count: int) -> Figures:
    """``POST /run`` one at a time (after 10), each once every worker is ready."""
    latencies: list[float] = []
    waits: list[float] = []
    failures = 0
    async with service.client(timeout=HTTP_TIMEOUT_S) as client:
        for _ in range(10):
            waits.append(await wait_ready(client))
            await run_ok(client)
        for _ in range(count):
            waits.append(await wait_ready(client))
            started = time.perf_counter()
            outcome = await run_outcome(client)
            if outcome == "200 success":
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
    return {"latencies": latencies, "waits": waits, "failures": failures}


async def measure_throughput(
    service: RunningService, clients: int, ramp_s: float, duration_s: float
) -> Figures:
    """``clients`` clients posting for ``ramp_s`` + ``duration_s``; replies by outcome."""
    statuses: collections.Counter[str] = collections.Counter()
    in_window: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    async with client_of(service, clients + 4) as client:
        await wait_ready(client)
        window_start = time.perf_counter() + ramp_s
        window_end = window_start + duration_s

        async def user() -> None:
            while time.perf_counter() < window_end:
                started = time.perf_counter()
                key = await run_outcome(client)
                done = time.perf_counter()
                statuses[key] += 1
                if window_start <= done < window_end:
                    in_window[key] += 1
                    if key == "200 success":
                        latencies.append(done - started)
                if key == "429":
                    await trio.sleep(0.01)  # a client told to retry backs off a little

        # In-flight requests finish on their own (bounded by the quick prompt and the
        # HTTP timeout).
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(user)
        status = (await client.get("/status", headers=AUTH)).json()
    return {
        "statuses": statuses,
        "in_window": in_window,
        "duration_s": duration_s,
        "latencies": latencies,
        "status": status,
    }


# --- the run: phases 0-4 and the summary -------------------------------------------------


def use_fake_python(path: str, where: Path) -> None:
    """``path`` first on PATH as ``python3``, for the direct calls and the service alike."""
    bindir = where / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(Path(path).absolute())
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


async def phase_startup(
    args: argparse.Namespace, env: dict[str, str], where: Path, quiet: QuietLog
) -> Figures:
    section("0. start-up: spawn -> first GET /health 200 (the SDK is imported after that)")
    with quiet.phase():
        startup = await measure_startup(env, where, args.startups)
        service, interpreter = dist(startup["service"]), dist(startup["interpreter"])
        print(fmt_dist("service spawn -> /health 200", service))
        print(fmt_dist("baseline: python -c 'import trio'", interpreter))
        ratio = service["p50"] / interpreter["p50"]
        print(f"  ratio to the baseline: {ratio:.1f} (target: ≤ 1 s)")
    return {"p50": service["p50"], "ratio": ratio}


async def phase_warmup(args: argparse.Namespace, direct: Direct, quiet: QuietLog) -> Figures:
    section("1. agent warm-up (SdkAgent.start(): the service's launcher and options)")
    with quiet.phase():
        warm = await measure_warmup(direct, args.warmups, args.pool_size)
        seq = dist(warm["seq"])
        print(fmt_dist("one at a time", seq))
        print(fmt_dist(f"{args.pool_size} at once", dist(warm["concurrent"])))
        cpu_ms = warm["cpu_per_agent_s"] * 1000
        print(f"  CPU per agent (start + initialize + exit, reaped): {cpu_ms:.1f} ms")
        bound = args.pool_size / (seq["p50"] / 1000)
        print(
            f"  recycle bound = POOL_SIZE / median = {args.pool_size} / {seq['p50']:.1f} ms "
            f"= {bound:.1f} jobs/s"
        )
        print(
            f"  (CPU ceiling from the agents alone = nproc / CPU per agent = "
            f"{(os.cpu_count() or 1) / warm['cpu_per_agent_s']:.1f} jobs/s)"
        )
    return {"median": seq["p50"], "bound": bound}


async def phase_direct(args: argparse.Namespace, direct: Direct, quiet: QuietLog) -> Figures:
    section("2. direct agent turn (SdkAgent.run_turn(): query(), receive_response() to the result)")
    with quiet.phase():
        runs = await measure_direct(direct, args.samples, pause_s=args.pause)
        figures = {name: dist(values) for name, values in runs.items() if values}
        print(fmt_dist("one warm agent, back to back", figures["reused"]))
        if "paused" in figures:
            print(fmt_dist(f"same, idle {args.pause * 1000:g} ms before each", figures["paused"]))
        print(fmt_dist("first turn of a fresh warm agent", figures["fresh"]))
    return figures


async def phase_latency(
    args: argparse.Namespace,
    service: RunningService,
    env: dict[str, str],
    direct: Figures,
    quiet: QuietLog,
) -> Figures:
    section(f"3. service: POST /run one at a time (POOL_SIZE={args.pool_size})")
    print(f"  service pid {service.pid} at {service.url}")
    with quiet.phase(service.pid):
        latency = await measure_service_latency(service, args.samples)
        svc = dist(latency["latencies"])
        print(fmt_dist("POST /run round trip (httpx)", svc))
        print(fmt_dist("wait for all workers ready (excl.)", dist(latency["waits"])))
        print(f"  failures: {latency['failures']}")
        async with service.client(timeout=HTTP_TIMEOUT_S) as client:
            await wait_ready(client)
            floor = await health_and_bad_run(client, args.samples, bad_run_status=400)
        print("  for reference, round trips with no agent in them:")
        print(fmt_dist("GET /health", dist(floor["health"])))
        print(fmt_dist("POST /run -> 400 (empty prompt)", dist(floor["bad_run"])))
        async with bare_http.serving(env, START_TIMEOUT_S) as bare:
            async with bare.client(timeout=HTTP_TIMEOUT_S) as client:
                on_bare = await health_and_bad_run(client, args.samples, bad_run_status=200)
        print("  the same on hypercorn with nothing behind it (bench/bare_http.py):")
        print(fmt_dist("GET /health (bare hypercorn)", dist(on_bare["health"])))
        print(fmt_dist("POST /run (bare hypercorn)", dist(on_bare["bad_run"])))
        labels = {"reused": "one warm client", "paused": "idle-then-turn client"}
        labels["fresh"] = "fresh client 1st turn"
        for name, label in labels.items():
            if name in direct:
                print(
                    f"  overhead vs {label + ':':<24}p50={svc['p50'] - direct[name]['p50']:+.3f} ms"
                    f"  p99={svc['p99'] - direct[name]['p99']:+.3f} ms"
                )
    return {
        "svc": svc,
        "health_p50": dist(floor["health"])["p50"],
        "bare_p50": dist(on_bare["health"])["p50"],
    }


async def phase_throughput(
    args: argparse.Namespace, service: RunningService, quiet: QuietLog
) -> Figures:
    section(
        f"4. throughput at saturation ({args.clients} clients, "
        f"{args.ramp:g} s ramp + {args.duration:g} s window)"
    )
    async with service.client(timeout=HTTP_TIMEOUT_S) as client:
        await wait_ready(client)
    mem_before = service.memory_kib()
    cpu_before = (*service.cpu_s(), self_cpu_s())
    with quiet.phase(service.pid):
        started = time.perf_counter()
        tp = await measure_throughput(service, args.clients, args.ramp, args.duration)
        wall = time.perf_counter() - started
        # service, its reaped agents, this benchmark's clients
        cpu = [
            after - before
            for after, before in zip((*service.cpu_s(), self_cpu_s()), cpu_before, strict=True)
        ]
        mem_after = service.memory_kib()
        print_throughput(tp, mem_before, mem_after)
    return {
        **tp,
        "wall": wall,
        "cpu": cpu,
        "rss": (mem_before["VmRSS"] / 1024, mem_after["VmRSS"] / 1024),
    }


def print_throughput(tp: Figures, mem_before: dict[str, int], mem_after: dict[str, int]) -> None:
    total = sum(tp["statuses"].values())
    print(
        f"  replies (whole run, {total}): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(tp["statuses"].items()))
    )
    print(
        "  replies in the window: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(tp["in_window"].items()))
    )
    print(fmt_dist("latency under load (window)", dist(tp["latencies"])))
    st = tp["status"]
    jobs_per_worker = ", ".join(f"{w['id']}={w['jobs']}" for w in st["workers"])
    print(
        f"  /status: totalProcessed={st['totalProcessed']} totalErrors={st['totalErrors']} "
        f"per worker: {jobs_per_worker}"
    )
    print(
        f"  service RSS (VmRSS): before {mem_before['VmRSS'] / 1024:.1f} MiB, after "
        f"{mem_after['VmRSS'] / 1024:.1f} MiB (VmHWM {mem_before['VmHWM'] / 1024:.1f} -> "
        f"{mem_after['VmHWM'] / 1024:.1f} MiB)"
    )


def throughput_figures(tp: Figures, bound: float) -> Figures:
    """The achieved rate, the CPU per job and the machine's CPU ceiling, printed."""
    nproc = os.cpu_count() or 1
    achieved = tp["in_window"]["200 success"] / tp["duration_s"]
    print(
        f"  achieved = {tp['in_window']['200 success']} / {tp['duration_s']:g} s = "
        f"{achieved:.1f} jobs/s = {100 * achieved / bound:.1f} % of the recycle bound "
        f"({bound:.1f} jobs/s)"
    )
    jobs = max(1, sum(tp["statuses"].values()))
    svc_ms, kids_ms, bench_ms = (seconds * 1000 / jobs for seconds in tp["cpu"])
    cpu_ms = svc_ms + kids_ms + bench_ms
    print(
        f"  CPU per job: service {svc_ms:.1f} ms + agent processes {kids_ms:.1f} ms "
        f"+ this benchmark's clients {bench_ms:.1f} ms = {cpu_ms:.1f} ms"
    )
    ceiling = nproc * 1000 / cpu_ms
    print(
        f"  CPU use over the run: {100 * sum(tp['cpu']) / tp['wall'] / nproc:.0f} % of {nproc} "
        f"CPUs; CPU ceiling = nproc / CPU per job = {ceiling:.1f} jobs/s; "
        f"achieved = {100 * achieved / ceiling:.0f} % of it"
    )
    return {"achieved": achieved, "svc_ms": svc_ms, "ceiling": ceiling}


def print_summary(f: Figures, quiet: QuietLog, run_started: float) -> None:
    svc, direct, warm, tp = f["latency"]["svc"], f["direct"], f["warmup"], f["throughput"]
    reused, fresh, paused = direct["reused"], direct["fresh"], direct.get("paused")
    over50, over99 = svc["p50"] - reused["p50"], svc["p99"] - reused["p99"]
    bound, achieved = warm["bound"], tp["achieved"]
    failures = sum(f["tp"]["statuses"].values()) - f["tp"]["statuses"]["200 success"]
    section("summary")
    print(
        f"overhead: service p50={svc['p50']:.3f} ms p99={svc['p99']:.3f} ms | "
        f"direct SDK p50={reused['p50']:.3f} ms p99={reused['p99']:.3f} ms | "
        f"overhead p50={over50:.3f} ms p99={over99:.3f} ms (target ≤ 2 ms) "
        f"[{'met' if over50 <= 2 else 'MISSED'}]"
    )
    print(
        f"throughput: warm-up median={warm['median']:.1f} ms, bound={bound:.1f} jobs/s, "
        f"achieved={achieved:.1f} jobs/s ({100 * achieved / bound:.1f} %, target ≥ 90 %) "
        f"[{'met' if achieved >= 0.9 * bound else 'MISSED'}], failures={failures}"
    )
    print(
        f"  context: CPU ceiling on this machine={tp['ceiling']:.1f} jobs/s "
        f"(achieved {100 * achieved / tp['ceiling']:.0f} % of it); "
        f"overhead vs fresh agent's first turn p50={svc['p50'] - fresh['p50']:.3f} ms"
        + (f", vs idle-then-turn p50={svc['p50'] - paused['p50']:.3f} ms" if paused else "")
    )
    rss_before, rss_after = f["tp"]["rss"]
    print(
        f"memory: service RSS {rss_before:.1f} -> {rss_after:.1f} MiB; "
        f"machine: nproc={os.cpu_count()}, python {sys.version.split()[0]}; "
        f"run took {time.perf_counter() - run_started:.0f} s"
    )
    health_p50, bare_p50 = f["latency"]["health_p50"], f["latency"]["bare_p50"]
    print(
        f"GET /health p50={health_p50:.3f} ms (target ≤ 1.5 ms) "
        f"[{'met' if health_p50 <= 1.5 else 'MISSED'}], bare hypercorn {bare_p50:.3f} ms "
        f"({health_p50 / bare_p50:.2f}x); service CPU per job={tp['svc_ms']:.1f} ms "
        f"(target ≤ 4 ms) [{'met' if tp['svc_ms'] <= 4 else 'MISSED'}]"
    )
    startup = f["startup"]
    print(
        f"start-up: spawn -> /health 200 p50 {startup['p50']:.0f} ms (target ≤ 1000 ms) "
        f"[{'met' if startup['p50'] <= 1000 else 'MISSED'}]; {startup['ratio']:.1f}x a bare "
        f"`python -c 'import trio'`"
    )
    print(quiet.verdict())


async def run(args: argparse.Namespace, where: Path, run_started: float) -> None:
    if args.fake_python:
        use_fake_python(args.fake_python, where)
    # Room for every client's job, so saturation is not answered 429.
    queue_max = str(max(20, 2 * args.clients))
    env = bench_env(where, {"POOL_SIZE": str(args.pool_size), "QUEUE_MAX": queue_max})
    # The SDK merges os.environ under the agent's env: the direct calls' fake uses it.
    os.environ["FAKE_CLAUDE_HOME"] = env["FAKE_CLAUDE_HOME"]
    os.environ.pop("FAKE_CLAUDE_MODE", None)
    print_machine(
        f"  service code:    {Path(claude_code_api.__file__).parent}",
        f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via `#!/usr/bin/env python3` -> "
        f"{shutil.which('python3') or '?'}",
        f"  prompt:          {PROMPT!r} (fake's echo reply)",
        f"  arguments:       samples={args.samples} warmups={args.warmups} "
        f"pool_size={args.pool_size} clients={args.clients} ramp={args.ramp:g}s "
        f"duration={args.duration:g}s",
    )
    direct = Direct(env, where / "direct")
    quiet = QuietLog()
    f: Figures = {"startup": await phase_startup(args, env, where, quiet)}
    f["warmup"] = await phase_warmup(args, direct, quiet)
    f["direct"] = await phase_direct(args, direct, quiet)
    async with launch_service(env, start_timeout_s=START_TIMEOUT_S, log_lines=200) as service:
        try:
            f["latency"] = await phase_latency(args, service, env, f["direct"], quiet)
            f["tp"] = await phase_throughput(args, service, quiet)
        finally:
            code = await service.stop(timeout_s=STOP_TIMEOUT_S)
    f["throughput"] = throughput_figures(f["tp"], f["warmup"]["bound"])
    print(f"  service exit code after SIGTERM: {'killed' if code is None else code}")
    print_summary(f, quiet, run_started)


# --- side by side with the original (--original) ------------------------------------------


def vs_env(where: Path, pool_size: int, args: argparse.Namespace, side: str) -> dict[str, str]:
    """The same environment for either side (the original ignores what it does not know),
    and ``--vs-ours-env`` (NAME=VALUE items) for ours only."""
    overrides = {"POOL_SIZE": str(pool_size), "QUEUE_MAX": str(max(20, 2 * args.vs_clients))}
    if side == OURS:
        overrides.update(item.split("=", 1) for item in args.vs_ours_env)
    return bench_env(where, overrides)


async def vs_startup(
    side: str, build: OriginalBuild | None, env: dict[str, str], where: Path
) -> tuple[float, float]:
    """Spawn -> the first ``GET /health`` 200, and -> every worker ready (seconds)."""
    started = time.perf_counter()
    first_200: float | None = None
    async with launch(side, build, env, where, start_timeout_s=START_TIMEOUT_S) as svc:
        async with svc.client(timeout=HTTP_TIMEOUT_S) as client:
            with trio.fail_after(START_TIMEOUT_S + READY_TIMEOUT_S):
                while True:
                    response = await client.get("/health")
                    elapsed = time.perf_counter() - started
                    if response.status_code == 200 and first_200 is None:
                        first_200 = elapsed
                    workers = response.json()["workers"]
                    if first_200 is not None and 0 < workers["total"] == workers["ready"]:
                        break
                    await trio.sleep(0.002)
        await svc.stop(timeout_s=STOP_TIMEOUT_S)
    return first_200, elapsed


async def vs_health(service: RunningService, count: int) -> list[float]:
    """``GET /health`` one at a time on a kept-alive connection, the pool idle and ready."""

    async def health() -> None:
        response = await client.get("/health")
        if response.status_code != 200:
            raise RuntimeError(f"/health {response.status_code}: {response.text}")

    async with service.client(timeout=HTTP_TIMEOUT_S) as client:
        await wait_ready(client)
        return await samples(health, count)


async def vs_throughput(service: RunningService, clients: int, requests: int) -> Figures:
    """``requests`` one-shot runs shared by ``clients`` concurrent clients, from a ready
    pool; the CPU of the service's whole process tree from then until the pool is ready
    again (the replacements' warm-ups belong to these requests)."""
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    remaining = requests
    async with client_of(service, clients + 4) as client:
        await wait_ready(client)
        cpu0 = tree_cpu(service.pid)

        async def user() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                while (key := await run_outcome(client)) == "429":
                    outcomes["429 (retried)"] += 1
                    await trio.sleep(0.01)
                    started = time.perf_counter()
                outcomes[key] += 1
                if key == "200 success":
                    latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(user)
        wall = time.perf_counter() - began
        await wait_ready(client, interval=0.05)  # few polls: each costs the service CPU too
        cpu1 = tree_cpu(service.pid)
    cpu = TreeCpu(cpu1.service_s - cpu0.service_s, cpu1.agents_s - cpu0.agents_s, cpu1.processes)
    return {"outcomes": outcomes, "latencies": latencies, "wall": wall, "cpu": cpu}


async def vs_startups(
    args: argparse.Namespace,
    sides: list[str],
    original: OriginalBuild | None,
    where: Path,
    table: SideBySide,
    quiet: QuietLog,
) -> None:
    pool_size = int(args.vs_pool_sizes.split(",")[0])
    spawn = f"spawn -> first GET /health 200 (POOL_SIZE {pool_size})"
    ready = f"spawn -> every worker ready (POOL_SIZE {pool_size})"
    section(f"start-up, {args.vs_rounds} rounds, a fresh service each time")
    with quiet.phase():
        for side in sides:  # untimed: fills Python's bytecode and tsx's transform caches
            fresh = where / f"startup-{side}-untimed"
            await vs_startup(side, original, vs_env(fresh, pool_size, args, side), fresh)
        for r, order in enumerate(round_orders(args.vs_rounds, sides)):
            for side in order:
                fresh = where / f"startup-{side}-{r}"
                env = vs_env(fresh, pool_size, args, side)
                first, all_ready = await vs_startup(side, original, env, fresh)
                table.add(spawn, "ms", side, r, first * 1000)
                table.add(ready, "ms", side, r, all_ready * 1000)
                print(
                    f"  round {r + 1} {side:<8}  first 200 after {first * 1000:7.1f} ms, "
                    f"every worker ready after {all_ready * 1000:7.1f} ms"
                )


async def vs_round(
    args: argparse.Namespace,
    service: RunningService,
    pool_size: int,
    side: str,
    r: int,
    table: SideBySide,
) -> None:
    """One side's round at ``pool_size``: /health, then the one-shot load; into ``table``."""
    health_p50 = dist(await vs_health(service, args.vs_health_samples))["p50"]
    tp = await vs_throughput(service, args.vs_clients, args.vs_requests)
    ok = tp["outcomes"]["200 success"]
    cpu: TreeCpu = tp["cpu"]
    at = f"POOL_SIZE {pool_size}"
    figures = {
        (f"GET /health p50 ({at})", "ms"): health_p50,
        (
            f"one-shot throughput, {args.vs_clients} clients x {args.vs_requests} requests "
            f"({at}; higher is better)",
            "req/s",
        ): ok / tp["wall"],
        (f"service CPU per one-shot request ({at})", "ms"): cpu.service_s * 1000 / args.vs_requests,
        (f"agent CPU per one-shot request ({at})", "ms"): cpu.agents_s * 1000 / args.vs_requests,
        (f"one-shot POST /run p50 under that load ({at})", "ms"): dist(tp["latencies"])["p50"],
        (f"service RSS after the round, agents excluded ({at})", "MiB"): (
            tree_service_rss_kib(service.pid) / 1024
        ),
    }
    for (figure, unit), value in figures.items():
        table.add(figure, unit, side, r, value)
    _, rate, service_ms, agents_ms, p50, rss_mib = figures.values()
    others = {k: v for k, v in tp["outcomes"].items() if k != "200 success"}
    print(
        f"  round {r + 1} {side:<8}  /health p50 {health_p50:6.3f} ms | "
        f"{ok}/{args.vs_requests} ok in {tp['wall']:5.2f} s = {rate:6.1f} req/s, "
        f"p50 {p50:6.1f} ms | CPU per request: service {service_ms:5.2f} ms, "
        f"agents {agents_ms:6.2f} ms ({cpu.processes} live processes) | "
        f"RSS {rss_mib:5.1f} MiB" + (f" | other replies {others}" if others else "")
    )


VS_NOTES = """
  CPU counted: the whole process tree of each service, read from /proc: every live
  process's own CPU and what it reaped. service = the live processes that are not
  agents (ours: the Python service and its reaper; the original: tsx's launcher
  node and the server node); agents = the fake CLIs, live or reaped. Taken
  from a ready pool to the pool ready again, so the replacements' warm-ups count.
  RSS: VmRSS summed over the same non-agent processes (the original's: its
  launcher node too, as the image runs it).
  Notes:
  * ours runs with its defaults unless --vs-ours-env says otherwise: AGENT_REUSE_S=5,
    so one user's one-shots reuse a kept agent (cleared); the original starts a new
    agent per request and sends it a warm-up prompt ("hi": a model turn) before the
    request's own turn. --vs-ours-env AGENT_REUSE_S=0: a fresh agent per request.
  * the original's /health is 200 once a worker is warm; ours answers 200
    ("starting") before: 'every worker ready' is the like-for-like start-up figure.
  * the original's queue is fixed at 20 waiting requests (QUEUE_MAX is ours only)."""


async def run_side_by_side(args: argparse.Namespace, where: Path, run_started: float) -> None:
    pool_sizes = [int(n) for n in args.vs_pool_sizes.split(",")]
    build = prepare(args.original_repo)
    print_machine(
        f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via {sys.executable} (both sides)",
        *header_lines(build),
        f"  arguments:       rounds={args.vs_rounds} pool_sizes={pool_sizes} "
        f"clients={args.vs_clients} requests={args.vs_requests} "
        f"health_samples={args.vs_health_samples}"
        + (f"; ours only: {' '.join(args.vs_ours_env)}" if args.vs_ours_env else ""),
    )
    sides = sides_of(build)
    original = build if isinstance(build, OriginalBuild) else None
    table, quiet = SideBySide(), QuietLog()
    await vs_startups(args, sides, original, where, table, quiet)
    for pool_size in pool_sizes:
        section(
            f"POOL_SIZE={pool_size}: both services up, {args.vs_rounds} interleaved rounds "
            f"of /health x {args.vs_health_samples}, then {args.vs_requests} one-shot "
            f"requests from {args.vs_clients} clients"
        )

        def env_of(side: str, at: Path, pool_size: int = pool_size) -> dict[str, str]:
            return vs_env(at, pool_size, args, side)

        async with launch_sides(sides, original, env_of, where / f"pool{pool_size}") as services:
            with quiet.phase(trees=[s.pid for s in services.values()]):
                for r, order in enumerate(round_orders(args.vs_rounds, sides)):
                    for side in order:
                        await vs_round(args, services[side], pool_size, side, r, table)
    print_side_by_side(table, VS_NOTES, build, quiet.verdict(), run_started)


# --- command line ------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = options(
        argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
        samples=(200, "latency samples"),
        warmups=(10, "agent warm-ups timed"),
        startups=(5, "service start-ups timed"),
        pool_size=(4, "POOL_SIZE"),
        clients=(16, "concurrent clients at saturation"),
        duration=(20.0, "measured throughput window, s"),
        ramp=(2.0, "unmeasured ramp before the window, s"),
        pause=(0.1, "idle time before each turn of the paused direct baseline, s; 0: skip"),
    )
    parser.add_argument(
        "--fake-python",
        metavar="PATH",
        help="interpreter that runs the fake CLI (default: `python3` on PATH, as the tests do); "
        "put first on PATH as `python3` for the direct SDK calls and the service alike",
    )
    vs = options(
        add_side_by_side_arguments(parser),
        vs_pool_sizes=("2,4", "POOL_SIZE values, each with both services"),
        vs_clients=(8, "concurrent clients"),
        vs_requests=(100, "one-shot requests per round and side, shared by the clients"),
        vs_health_samples=(200, "GET /health timed per round and side"),
    )
    vs.add_argument(
        "--vs-ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for our service only, e.g. AGENT_REUSE_S=0 (a fresh agent per "
        "request, as the original); repeatable",
    )
    args = parser.parse_args()
    for item in args.vs_ours_env:
        if "=" not in item:
            parser.error(f"--vs-ours-env {item!r}: expected NAME=VALUE")
    return args


if __name__ == "__main__":
    trio.run(run_mode, parse_args(), "bench-pool-", run, run_side_by_side)
