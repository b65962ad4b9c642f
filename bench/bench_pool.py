#!/usr/bin/env python3
"""Benchmark of the one-shot pool: service overhead and throughput at saturation.

Prints figures; it is not a test. Everything runs on 127.0.0.1 against the fake
CLI ``tests/fake_claude.py``; no network, no Claude credentials. See
``bench/README.md`` for what each figure means and what is (not) compared.

    .venv/bin/python bench/bench_pool.py            # defaults: about 1.5 minutes on a quiet machine
    .venv/bin/python bench/bench_pool.py --help

Phases, all in one run:

1. warm-up of one agent, directly, made as the service makes them (its launcher,
   options and agent class: ``tests.harness.service_agents``): ``SdkAgent.start()``
   (``ClaudeSDKClient(...)`` to ``connect()`` returning), one at a time, then
   POOL_SIZE at once;
2. direct turns (``SdkAgent.run_turn``: ``query()`` and ``receive_response()`` to
   the result), same prompt as the service gets: on one already-warm agent (N
   turns back to back; then N turns each after an idle pause), and the first turn
   of a fresh warm agent (N agents);
3. the service (``python -m claude_code_api``, PORT=0) with POOL_SIZE workers:
   ``POST /run`` one at a time on a kept-alive connection, each sent only once
   ``/health`` reports every worker ready, so no warm-up is timed;
4. throughput: C concurrent clients send quick prompts for a fixed time; replies
   are counted by status; RSS and CPU time of the service (and of its reaped agent
   processes) are read from /proc before and after.

With ``--original``, it instead measures ours side by side with the original
(exitxio/claude-code-api, prepared by ``bench/original.py``), the same fake CLI,
in interleaved rounds: spawn -> first ``/health`` 200 and -> every worker ready,
``GET /health`` p50, one-shot throughput (``--vs-clients`` clients sharing
``--vs-requests`` requests) and CPU per one-shot request, for each of
``--vs-pool-sizes``; then a table of ours, the original and the ratio.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

import claude_code_api  # noqa: E402
from bench import bare_http  # noqa: E402
from bench.original import (  # noqa: E402
    OURS,
    OriginalBuild,
    add_side_by_side_arguments,
    header_lines,
    launch,
    prepare,
    round_orders,
    sides_of,
)
from bench.stats import (  # noqa: E402
    QuietMeter,
    SideBySide,
    TreeCpu,
    children_cpu_s,
    dist,
    fmt_dist,
    machine_lines,
    quiet_verdict,
    section,
    self_cpu_s,
    tree_cpu,
    tree_service_rss_kib,
)
from claude_code_api.agent import Agent, AgentSpec  # noqa: E402
from tests.harness import (  # noqa: E402
    FAKE_CLAUDE,
    RunningService,
    launch_service,
    service_agents,
    service_env,
    wait_pool_ready,
)

API_KEY = "sk-bench-key"
AUTH = {"x-api-key": API_KEY}
PROMPT = "What is 2+2?"
# Bounds on every wait, so the script always stops by itself.
SERVICE_START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0


# --- direct: the service's own agent, without the service ------------------------------


class Direct:
    """Agents made as the service makes them, against the fake CLI."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.settings, self.make_agent = service_agents(env)
        self.workdir = workdir
        self.count = 0

    def agent(self) -> Agent:
        self.count += 1
        # Ephemeral, as a one-shot worker's agent: its home goes when it closes.
        home = self.workdir / f"direct-{self.count}"
        return self.make_agent(AgentSpec(name=home.name, home=home, ephemeral=True))

    async def warm_one(self) -> tuple[float, Agent]:
        started = time.perf_counter()
        agent = self.agent()
        await agent.start(READY_TIMEOUT_S)
        return time.perf_counter() - started, agent


async def _ignore(_event: object) -> None:
    pass


async def turn(agent: Agent, prompt: str) -> float:
    started = time.perf_counter()
    with trio.fail_after(HTTP_TIMEOUT_S):
        result = await agent.run_turn(prompt, _ignore)
    if result.is_error:
        raise RuntimeError(f"direct turn failed: {result}")
    return time.perf_counter() - started


async def close(agent: Agent) -> None:
    with trio.move_on_after(10):
        await agent.close()


async def measure_warmup(direct: Direct, runs: int, pool_size: int) -> dict:
    """Sequential warm-ups (the bound's figure), then pool_size at once (contention)."""
    times = []
    cpu_before = children_cpu_s()
    for _ in range(runs):
        elapsed, agent = await direct.warm_one()
        times.append(elapsed)
        await close(agent)
    # The children are reaped: their CPU (start, initialize, exit on EOF) is counted.
    cpu_per_agent = (children_cpu_s() - cpu_before) / runs

    concurrent: list[float] = []
    for _ in range(max(1, runs // pool_size)):
        agents: list[Agent] = []
        async with trio.open_nursery() as nursery:
            for _ in range(pool_size):
                nursery.start_soon(_warm_into, direct, concurrent, agents)
        for agent in agents:
            await close(agent)
    return {"seq": times, "concurrent": concurrent, "cpu_per_agent_s": cpu_per_agent}


async def _warm_into(direct: Direct, times: list[float], agents: list[Agent]) -> None:
    """One warm-up among several at once: its time to ``times``, its agent to ``agents``."""
    elapsed, agent = await direct.warm_one()
    times.append(elapsed)
    agents.append(agent)


async def measure_direct(direct: Direct, samples: int, warmup_turns: int, pause_s: float) -> dict:
    # (a) one warm agent, `samples` turns back to back: the headline baseline.
    # (b) the same agent, idle for `pause_s` before each turn, as the service's
    #     agent is idle between its warm-up and its job.
    _, agent = await direct.warm_one()
    try:
        for _ in range(warmup_turns):
            await turn(agent, PROMPT)
        reused = [await turn(agent, PROMPT) for _ in range(samples)]
        paused = []
        if pause_s > 0:
            for _ in range(samples):
                await trio.sleep(pause_s)
                paused.append(await turn(agent, PROMPT))
    finally:
        await close(agent)
    # (c) first turn of a freshly warmed agent: the service's one-shot path minus the service.
    fresh = []
    for _ in range(samples):
        _, agent = await direct.warm_one()
        try:
            await trio.sleep(0.01)  # let the new process settle, as the service's would
            fresh.append(await turn(agent, PROMPT))
        finally:
            await close(agent)
    return {"reused": reused, "paused": paused, "fresh": fresh}


# --- the service ----------------------------------------------------------------------


async def measure_startup(env: dict[str, str], workdir: Path, runs: int) -> dict:
    """Spawn -> the first ``GET /health`` 200, ``runs`` times, each on a fresh DATA_DIR;
    interleaved with the baseline, a bare interpreter that imports trio and exits."""
    service, interpreter = [], []
    for n in range(runs):
        started = time.perf_counter()
        await trio.run_process([sys.executable, "-c", "import trio"])
        interpreter.append(time.perf_counter() - started)
        fresh = {**env, "DATA_DIR": str(workdir / f"startup-{n}")}
        started = time.perf_counter()
        async with launch_service(fresh, start_timeout_s=SERVICE_START_TIMEOUT_S) as running:
            async with httpx.AsyncClient(base_url=running.url, timeout=HTTP_TIMEOUT_S) as c:
                while (await c.get("/health")).status_code != 200:
                    await trio.sleep(0.002)
                service.append(time.perf_counter() - started)
            await running.stop(timeout_s=STOP_TIMEOUT_S)
    return {"service": service, "interpreter": interpreter}


async def health(client: httpx.AsyncClient) -> dict:
    return (await client.get("/health")).json()


async def wait_all_ready(client: httpx.AsyncClient) -> float:
    """Poll /health often until every worker is ready; returns the time waited."""
    return await wait_pool_ready(client, timeout=READY_TIMEOUT_S, interval=0.005)


async def post_run(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/run", json={"prompt": PROMPT}, headers=AUTH)


async def run_outcome(client: httpx.AsyncClient) -> str:
    """One ``POST /run``, named: "200 success", "200 failure", the status, or "error <type>"."""
    try:
        response = await post_run(client)
    except httpx.HTTPError as exc:
        return f"error {type(exc).__name__}"
    if response.status_code == 200:
        return "200 success" if response.json().get("success") is True else "200 failure"
    return str(response.status_code)


async def measure_http_floor(service: RunningService, samples: int) -> dict:
    """Round trips that involve no agent: what the HTTP stack alone costs.

    ``GET /health`` goes through HTTP, the app and the pool's published state;
    ``POST /run`` with an empty prompt through HTTP, auth and body parsing (400).
    """
    async with httpx.AsyncClient(base_url=service.url, timeout=HTTP_TIMEOUT_S) as client:
        await wait_all_ready(client)
        return await _time_health_and_bad_run(client, samples, bad_run_status=400)


async def measure_bare_http(env: dict[str, str], samples: int) -> dict:
    """The same round trips on hypercorn with nothing behind it (bench/bare_http.py)."""
    async with bare_http.serving(env, SERVICE_START_TIMEOUT_S) as bare:
        async with httpx.AsyncClient(base_url=bare.url, timeout=HTTP_TIMEOUT_S) as client:
            return await _time_health_and_bad_run(client, samples, bad_run_status=200)


async def _time_health_and_bad_run(
    client: httpx.AsyncClient, samples: int, *, bad_run_status: int
) -> dict:
    """``samples`` GET /health, then ``samples`` POST /run with an empty prompt (after 10 each)."""
    health_times, bad_times = [], []
    for i in range(samples + 10):
        started = time.perf_counter()
        await health(client)
        elapsed = time.perf_counter() - started
        if i >= 10:
            health_times.append(elapsed)
    for i in range(samples + 10):
        started = time.perf_counter()
        response = await client.post("/run", json={"prompt": ""}, headers=AUTH)
        elapsed = time.perf_counter() - started
        if response.status_code != bad_run_status:
            raise RuntimeError(f"expected {bad_run_status}, got {response.status_code}")
        if i >= 10:
            bad_times.append(elapsed)
    return {"health": health_times, "bad_run": bad_times}


async def measure_service_latency(
    service: RunningService, samples: int, warmup_requests: int
) -> dict:
    latencies, waits, failures = [], [], 0
    async with httpx.AsyncClient(base_url=service.url, timeout=HTTP_TIMEOUT_S) as client:
        for i in range(warmup_requests + samples):
            waits.append(await wait_all_ready(client))
            started = time.perf_counter()
            response = await post_run(client)
            elapsed = time.perf_counter() - started
            ok = response.status_code == 200 and response.json().get("success") is True
            if i >= warmup_requests:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures += 1
            elif not ok:
                raise RuntimeError(
                    f"warm-up request failed: {response.status_code} {response.text}"
                )
    return {"latencies": latencies, "waits": waits, "failures": failures}


async def measure_throughput(
    service: RunningService, clients: int, ramp_s: float, duration_s: float
) -> dict:
    statuses: collections.Counter[str] = collections.Counter()
    in_window = collections.Counter()
    window_start = window_end = 0.0
    stop = trio.Event()
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=service.url, timeout=HTTP_TIMEOUT_S, limits=limits
    ) as client:
        await wait_all_ready(client)

        async def user() -> None:
            while not stop.is_set():
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

        begin = time.perf_counter()
        window_start = begin + ramp_s
        window_end = window_start + duration_s
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(user)
            await trio.sleep_until(trio.current_time() + ramp_s + duration_s)
            stop.set()
            # In-flight requests finish on their own (bounded by the quick prompt);
            # the HTTP timeout bounds them anyway.
        status = (await client.get("/status", headers=AUTH)).json()
    return {
        "statuses": statuses,
        "in_window": in_window,
        "duration_s": duration_s,
        "latencies": latencies,
        "status": status,
    }


# --- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="latency samples (default 200)")
    parser.add_argument("--warmups", type=int, default=10, help="agent warm-ups timed (default 10)")
    parser.add_argument(
        "--startups", type=int, default=5, help="service start-ups timed (default 5)"
    )
    parser.add_argument("--pool-size", type=int, default=4, help="POOL_SIZE (default 4)")
    parser.add_argument(
        "--clients", type=int, default=16, help="concurrent clients at saturation (default 16)"
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="measured throughput window, s (default 20)"
    )
    parser.add_argument(
        "--ramp", type=float, default=2.0, help="unmeasured ramp before the window, s (default 2)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.1,
        help="idle time before each turn of the paused direct baseline, s (default 0.1; 0: skip)",
    )
    parser.add_argument(
        "--fake-python",
        metavar="PATH",
        help="interpreter that runs the fake CLI (default: `python3` on PATH, as the tests do); "
        "put first on PATH as `python3` for the direct SDK calls and the service alike",
    )
    vs = add_side_by_side_arguments(parser)
    vs.add_argument(
        "--vs-pool-sizes",
        default="2,4",
        help="POOL_SIZE values, each with both services (default 2,4)",
    )
    vs.add_argument("--vs-clients", type=int, default=8, help="concurrent clients (default 8)")
    vs.add_argument(
        "--vs-requests",
        type=int,
        default=100,
        help="one-shot requests per round and side, shared by the clients (default 100)",
    )
    vs.add_argument(
        "--vs-ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for our service only, e.g. AGENT_REUSE_S=0 (a fresh agent per "
        "request, as the original); repeatable",
    )
    vs.add_argument(
        "--vs-health-samples",
        type=int,
        default=200,
        help="GET /health timed per round and side (default 200)",
    )
    args = parser.parse_args()
    for item in args.vs_ours_env:
        if "=" not in item:
            parser.error(f"--vs-ours-env {item!r}: expected NAME=VALUE")
    return args


async def main(args: argparse.Namespace) -> None:
    run_started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    try:
        if args.original:
            await run_side_by_side(args, workdir, run_started)
        else:
            await run(args, workdir, run_started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- side by side with the original (--original) ------------------------------------------


def vs_env(
    workdir: Path, pool_size: int, clients: int, side: str, ours_env: list[str]
) -> dict[str, str]:
    """The same environment for either side (the original ignores what it does not know),
    and ``ours_env`` (NAME=VALUE items) for ours only."""
    overrides = {
        "API_KEYS": API_KEY,
        "POOL_SIZE": str(pool_size),
        "QUEUE_MAX": str(max(20, 2 * clients)),
    }
    if side == OURS:
        overrides.update(item.split("=", 1) for item in ours_env)
    return service_env(workdir, overrides, record_pids=False)


async def vs_startup(
    side: str, build: OriginalBuild | None, env: dict[str, str], workdir: Path
) -> tuple[float, float]:
    """Spawn -> the first ``GET /health`` 200, and -> every worker ready (seconds)."""
    started = time.perf_counter()
    async with launch(side, build, env, workdir, start_timeout_s=SERVICE_START_TIMEOUT_S) as svc:
        first_200: float | None = None
        async with httpx.AsyncClient(base_url=svc.url, timeout=HTTP_TIMEOUT_S) as client:
            with trio.fail_after(SERVICE_START_TIMEOUT_S + READY_TIMEOUT_S):
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


async def vs_health(service: RunningService, samples: int) -> list[float]:
    """``GET /health`` one at a time on a kept-alive connection, the pool idle and ready."""
    times = []
    async with httpx.AsyncClient(base_url=service.url, timeout=HTTP_TIMEOUT_S) as client:
        await wait_all_ready(client)
        for i in range(samples + 10):
            started = time.perf_counter()
            response = await client.get("/health")
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"/health {response.status_code}: {response.text}")
            if i >= 10:
                times.append(elapsed)
    return times


async def vs_throughput(service: RunningService, clients: int, requests: int) -> dict:
    """``requests`` one-shot runs shared by ``clients`` concurrent clients, from a ready
    pool; the CPU of the service's whole process tree from then until the pool is ready
    again (the replacements' warm-ups belong to these requests)."""
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    remaining = requests
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=service.url, timeout=HTTP_TIMEOUT_S, limits=limits
    ) as client:
        await wait_all_ready(client)
        cpu0 = tree_cpu(service.pid)

        async def user() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                while True:
                    started = time.perf_counter()
                    key = await run_outcome(client)
                    if key != "429":
                        break
                    outcomes["429 (retried)"] += 1
                    await trio.sleep(0.01)
                outcomes[key] += 1
                if key == "200 success":
                    latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(user)
        wall = time.perf_counter() - began
        # Few polls: each /health costs the service CPU too.
        await wait_pool_ready(client, timeout=READY_TIMEOUT_S, interval=0.05)
        cpu1 = tree_cpu(service.pid)
    cpu = TreeCpu(cpu1.service_s - cpu0.service_s, cpu1.agents_s - cpu0.agents_s, cpu1.processes)
    return {"outcomes": outcomes, "latencies": latencies, "wall": wall, "cpu": cpu}


async def run_side_by_side(args: argparse.Namespace, workdir: Path, run_started: float) -> None:
    pool_sizes = [int(n) for n in args.vs_pool_sizes.split(",")]
    section("machine")
    print("\n".join(machine_lines()))
    print(f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via {sys.executable} (both sides)")
    build = prepare(args.original_repo)
    print("\n".join(header_lines(build)))
    print(
        f"  arguments:       rounds={args.vs_rounds} pool_sizes={pool_sizes} "
        f"clients={args.vs_clients} requests={args.vs_requests} "
        f"health_samples={args.vs_health_samples}"
        + (f"; ours only: {' '.join(args.vs_ours_env)}" if args.vs_ours_env else "")
    )
    sides = sides_of(build)
    original = build if isinstance(build, OriginalBuild) else None
    orders = round_orders(args.vs_rounds, sides)
    table = SideBySide()
    quiet: list[float] = []
    spawn = f"spawn -> first GET /health 200 (POOL_SIZE {pool_sizes[0]})"
    ready = f"spawn -> every worker ready (POOL_SIZE {pool_sizes[0]})"

    section(f"start-up, {args.vs_rounds} rounds, a fresh service each time")
    meter = QuietMeter()
    for side in sides:  # untimed: fills Python's bytecode and tsx's transform caches
        fresh = workdir / f"startup-{side}-untimed"
        await vs_startup(
            side,
            original,
            vs_env(fresh, pool_sizes[0], args.vs_clients, side, args.vs_ours_env),
            fresh,
        )
    for r, order in enumerate(orders):
        for side in order:
            fresh = workdir / f"startup-{side}-{r}"
            env = vs_env(fresh, pool_sizes[0], args.vs_clients, side, args.vs_ours_env)
            first, all_ready = await vs_startup(side, original, env, fresh)
            table.add(spawn, "ms", side, r, first * 1000)
            table.add(ready, "ms", side, r, all_ready * 1000)
            print(
                f"  round {r + 1} {side:<8}  first 200 after {first * 1000:7.1f} ms, "
                f"every worker ready after {all_ready * 1000:7.1f} ms"
            )
    line, share = meter.report()
    quiet.append(share)
    print(line)

    for pool_size in pool_sizes:
        section(
            f"POOL_SIZE={pool_size}: both services up, {args.vs_rounds} interleaved rounds "
            f"of /health x {args.vs_health_samples}, then {args.vs_requests} one-shot "
            f"requests from {args.vs_clients} clients"
        )
        async with contextlib.AsyncExitStack() as stack:
            services: dict[str, RunningService] = {}
            for side in sides:
                where = workdir / f"pool{pool_size}-{side}"
                env = vs_env(where, pool_size, args.vs_clients, side, args.vs_ours_env)
                services[side] = await stack.enter_async_context(
                    launch(side, original, env, where, start_timeout_s=SERVICE_START_TIMEOUT_S)
                )
            meter = QuietMeter(trees=[s.pid for s in services.values()])
            for r, order in enumerate(orders):
                for side in order:
                    service = services[side]
                    health_p50 = dist(await vs_health(service, args.vs_health_samples))["p50"]
                    tp = await vs_throughput(service, args.vs_clients, args.vs_requests)
                    ok = tp["outcomes"]["200 success"]
                    rate = ok / tp["wall"]
                    cpu: TreeCpu = tp["cpu"]
                    service_ms = cpu.service_s * 1000 / args.vs_requests
                    agents_ms = cpu.agents_s * 1000 / args.vs_requests
                    p50 = dist(tp["latencies"])["p50"]
                    rss_mib = tree_service_rss_kib(service.pid) / 1024
                    table.add(f"GET /health p50 (POOL_SIZE {pool_size})", "ms", side, r, health_p50)
                    table.add(
                        f"one-shot throughput, {args.vs_clients} clients x {args.vs_requests} "
                        f"requests (POOL_SIZE {pool_size}; higher is better)",
                        "req/s",
                        side,
                        r,
                        rate,
                    )
                    table.add(
                        f"service CPU per one-shot request (POOL_SIZE {pool_size})",
                        "ms",
                        side,
                        r,
                        service_ms,
                    )
                    table.add(
                        f"agent CPU per one-shot request (POOL_SIZE {pool_size})",
                        "ms",
                        side,
                        r,
                        agents_ms,
                    )
                    table.add(
                        f"one-shot POST /run p50 under that load (POOL_SIZE {pool_size})",
                        "ms",
                        side,
                        r,
                        p50,
                    )
                    table.add(
                        f"service RSS after the round, agents excluded (POOL_SIZE {pool_size})",
                        "MiB",
                        side,
                        r,
                        rss_mib,
                    )
                    others = {k: v for k, v in tp["outcomes"].items() if k != "200 success"}
                    print(
                        f"  round {r + 1} {side:<8}  /health p50 {health_p50:6.3f} ms | "
                        f"{ok}/{args.vs_requests} ok in {tp['wall']:5.2f} s = {rate:6.1f} req/s, "
                        f"p50 {p50:6.1f} ms | CPU per request: service {service_ms:5.2f} ms, "
                        f"agents {agents_ms:6.2f} ms ({cpu.processes} live processes) | "
                        f"RSS {rss_mib:5.1f} MiB" + (f" | other replies {others}" if others else "")
                    )
            line, share = meter.report()
            quiet.append(share)
            print(line)
            for service in services.values():
                await service.stop(timeout_s=STOP_TIMEOUT_S)

    section("side by side: ours vs the original")
    print("\n".join(table.table()))
    print(
        "\n  CPU counted: the whole process tree of each service, read from /proc: every live"
        "\n  process's own CPU and what it reaped. service = the live processes that are not"
        "\n  agents (ours: the Python service and its reaper; the original: tsx's launcher"
        "\n  node and the server node); agents = the fake CLIs, live or reaped. Taken"
        "\n  from a ready pool to the pool ready again, so the replacements' warm-ups count."
        "\n  RSS: VmRSS summed over the same non-agent processes (the original's: its"
        "\n  launcher node too, as the image runs it)."
        "\n  Notes:"
        "\n  * ours runs with its defaults unless --vs-ours-env says otherwise: AGENT_REUSE_S=5,"
        "\n    so one user's one-shots reuse a kept agent (cleared); the original starts a new"
        '\n    agent per request and sends it a warm-up prompt ("hi": a model turn) before the'
        "\n    request's own turn. --vs-ours-env AGENT_REUSE_S=0: a fresh agent per request."
        "\n  * the original's /health is 200 once a worker is warm; ours answers 200"
        "\n    (\"starting\") before: 'every worker ready' is the like-for-like start-up figure."
        "\n  * the original's queue is fixed at 20 waiting requests (QUEUE_MAX is ours only)."
    )
    if original is None:
        print(f"  {build}")
    print(
        f"{quiet_verdict(quiet)}; nproc={os.cpu_count()}; "
        f"run took {time.perf_counter() - run_started:.0f} s"
    )


async def run(args: argparse.Namespace, workdir: Path, run_started: float) -> None:
    if args.fake_python:
        bindir = workdir / "bin"
        bindir.mkdir()
        (bindir / "python3").symlink_to(Path(args.fake_python).absolute())
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    # No pid files: the fakes start as they would in production, without the extra write.
    env = service_env(
        workdir,
        {
            "API_KEYS": API_KEY,
            "POOL_SIZE": str(args.pool_size),
            # Room for every client's job, so saturation is not answered 429.
            "QUEUE_MAX": str(max(20, 2 * args.clients)),
        },
        record_pids=False,
    )
    # The SDK merges os.environ under the agent's env: the direct calls' fake uses it.
    os.environ["FAKE_CLAUDE_HOME"] = env["FAKE_CLAUDE_HOME"]
    os.environ.pop("FAKE_CLAUDE_MODE", None)

    section("machine")
    fake_python = shutil.which("python3") or "?"
    print("\n".join(machine_lines()))
    print(f"  service code:    {Path(claude_code_api.__file__).parent}")
    print(
        f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via `#!/usr/bin/env python3` -> "
        f"{fake_python}"
    )
    print(f"  prompt:          {PROMPT!r} (fake's echo reply)")
    print(
        f"  arguments:       samples={args.samples} warmups={args.warmups} "
        f"pool_size={args.pool_size} clients={args.clients} ramp={args.ramp:g}s "
        f"duration={args.duration:g}s"
    )

    direct = Direct(env, workdir / "direct")

    section("0. start-up: spawn -> first GET /health 200 (the SDK is imported after that)")
    meter = QuietMeter()
    startup = await measure_startup(env, workdir, args.startups)
    print(fmt_dist("service spawn -> /health 200", dist(startup["service"])))
    print(fmt_dist("baseline: python -c 'import trio'", dist(startup["interpreter"])))
    startup_p50 = dist(startup["service"])["p50"]
    startup_ratio = startup_p50 / dist(startup["interpreter"])["p50"]
    print(f"  ratio to the baseline: {startup_ratio:.1f} (target: ≤ 1 s)")
    startup_quiet = meter.report()
    print(startup_quiet[0])

    section("1. agent warm-up (SdkAgent.start(): the service's launcher and options)")
    meter = QuietMeter()
    warm = await measure_warmup(direct, args.warmups, args.pool_size)
    seq, conc = dist(warm["seq"]), dist(warm["concurrent"])
    print(fmt_dist("one at a time", seq))
    print(fmt_dist(f"{args.pool_size} at once", conc))
    print(
        f"  CPU per agent (start + initialize + exit, reaped): "
        f"{warm['cpu_per_agent_s'] * 1000:.1f} ms"
    )
    warmup_median_s = seq["p50"] / 1000
    bound = args.pool_size / warmup_median_s
    cpu_bound_fake_only = os.cpu_count() / warm["cpu_per_agent_s"]
    print(
        f"  recycle bound = POOL_SIZE / median = {args.pool_size} / {seq['p50']:.1f} ms "
        f"= {bound:.1f} jobs/s"
    )
    print(
        f"  (CPU ceiling from the agents alone = nproc / CPU per agent = "
        f"{cpu_bound_fake_only:.1f} jobs/s)"
    )
    quiet = [startup_quiet, meter.report()]
    print(quiet[-1][0])

    section("2. direct agent turn (SdkAgent.run_turn(): query(), receive_response() to the result)")
    meter = QuietMeter()
    direct_runs = await measure_direct(direct, args.samples, warmup_turns=10, pause_s=args.pause)
    reused, fresh = dist(direct_runs["reused"]), dist(direct_runs["fresh"])
    paused = dist(direct_runs["paused"]) if direct_runs["paused"] else None
    print(fmt_dist("one warm agent, back to back", reused))
    if paused:
        print(fmt_dist(f"same, idle {args.pause * 1000:g} ms before each", paused))
    print(fmt_dist("first turn of a fresh warm agent", fresh))
    quiet.append(meter.report())
    print(quiet[-1][0])

    async with launch_service(
        env, start_timeout_s=SERVICE_START_TIMEOUT_S, log_lines=200
    ) as service:
        try:
            section(f"3. service: POST /run one at a time (POOL_SIZE={args.pool_size})")
            print(f"  service pid {service.pid} at {service.url}")
            meter = QuietMeter(service.pid)
            latency = await measure_service_latency(service, args.samples, warmup_requests=10)
            svc = dist(latency["latencies"])
            print(fmt_dist("POST /run round trip (httpx)", svc))
            print(fmt_dist("wait for all workers ready (excl.)", dist(latency["waits"])))
            print(f"  failures: {latency['failures']}")
            floor = await measure_http_floor(service, args.samples)
            print("  for reference, round trips with no agent in them:")
            print(fmt_dist("GET /health", dist(floor["health"])))
            print(fmt_dist("POST /run -> 400 (empty prompt)", dist(floor["bad_run"])))
            bare = await measure_bare_http(env, args.samples)
            print("  the same on hypercorn with nothing behind it (bench/bare_http.py):")
            print(fmt_dist("GET /health (bare hypercorn)", dist(bare["health"])))
            print(fmt_dist("POST /run (bare hypercorn)", dist(bare["bad_run"])))
            over50 = svc["p50"] - reused["p50"]
            over99 = svc["p99"] - reused["p99"]
            print(
                f"  overhead vs one warm client:        p50={over50:+.3f} ms  p99={over99:+.3f} ms"
            )
            if paused:
                print(
                    f"  overhead vs idle-then-turn client:  p50={svc['p50'] - paused['p50']:+.3f} ms"
                    f"  p99={svc['p99'] - paused['p99']:+.3f} ms"
                )
            print(
                f"  overhead vs fresh client 1st turn:  p50={svc['p50'] - fresh['p50']:+.3f} ms"
                f"  p99={svc['p99'] - fresh['p99']:+.3f} ms"
            )
            quiet.append(meter.report())
            print(quiet[-1][0])

            section(
                f"4. throughput at saturation ({args.clients} clients, "
                f"{args.ramp:g} s ramp + {args.duration:g} s window)"
            )
            async with httpx.AsyncClient(base_url=service.url, timeout=HTTP_TIMEOUT_S) as c:
                await wait_all_ready(c)
            mem_before = service.memory_kib()
            own0, kids0 = service.cpu_s()
            bench0 = self_cpu_s()
            meter = QuietMeter(service.pid)
            t0 = time.perf_counter()
            tp = await measure_throughput(service, args.clients, args.ramp, args.duration)
            wall = time.perf_counter() - t0
            own1, kids1 = service.cpu_s()
            bench1 = self_cpu_s()
            mem_after = service.memory_kib()
            quiet.append(meter.report())
        finally:
            code = await service.stop(timeout_s=STOP_TIMEOUT_S)
    rss_before, rss_after = mem_before["VmRSS"] / 1024, mem_after["VmRSS"] / 1024

    total = sum(tp["statuses"].values())
    ok_window = tp["in_window"]["200 success"]
    achieved = ok_window / tp["duration_s"]
    failures = total - tp["statuses"]["200 success"]
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
        f"  achieved = {ok_window} / {tp['duration_s']:g} s = {achieved:.1f} jobs/s "
        f"= {100 * achieved / bound:.1f} % of the recycle bound ({bound:.1f} jobs/s)"
    )
    print(
        f"  service RSS (VmRSS): before {rss_before:.1f} MiB, after {rss_after:.1f} MiB "
        f"(VmHWM {mem_before['VmHWM'] / 1024:.1f} -> {mem_after['VmHWM'] / 1024:.1f} MiB)"
    )
    jobs_done = max(1, total)
    svc_ms = (own1 - own0) * 1000 / jobs_done
    kids_ms = (kids1 - kids0) * 1000 / jobs_done
    bench_ms = (bench1 - bench0) * 1000 / jobs_done
    cpu_ms = svc_ms + kids_ms + bench_ms
    busy = ((own1 - own0) + (kids1 - kids0) + (bench1 - bench0)) / wall / os.cpu_count()
    print(
        f"  CPU per job: service {svc_ms:.1f} ms + agent processes {kids_ms:.1f} ms "
        f"+ this benchmark's clients {bench_ms:.1f} ms = {cpu_ms:.1f} ms"
    )
    cpu_ceiling = os.cpu_count() * 1000 / cpu_ms
    print(
        f"  CPU use over the run: {100 * busy:.0f} % of {os.cpu_count()} CPUs; "
        f"CPU ceiling = nproc / CPU per job = {cpu_ceiling:.1f} jobs/s; "
        f"achieved = {100 * achieved / cpu_ceiling:.0f} % of it"
    )
    print(quiet[-1][0])
    print(f"  service exit code after SIGTERM: {'killed' if code is None else code}")

    elapsed = time.perf_counter() - run_started
    section("summary")
    print(
        f"overhead: service p50={svc['p50']:.3f} ms p99={svc['p99']:.3f} ms | "
        f"direct SDK p50={reused['p50']:.3f} ms p99={reused['p99']:.3f} ms | "
        f"overhead p50={over50:.3f} ms p99={over99:.3f} ms (target ≤ 2 ms) "
        f"[{'met' if over50 <= 2 else 'MISSED'}]"
    )
    print(
        f"throughput: warm-up median={seq['p50']:.1f} ms, bound={bound:.1f} jobs/s, "
        f"achieved={achieved:.1f} jobs/s ({100 * achieved / bound:.1f} %, target ≥ 90 %) "
        f"[{'met' if achieved >= 0.9 * bound else 'MISSED'}], failures={failures}"
    )
    print(
        f"  context: CPU ceiling on this machine={cpu_ceiling:.1f} jobs/s "
        f"(achieved {100 * achieved / cpu_ceiling:.0f} % of it); "
        f"overhead vs fresh agent's first turn p50={svc['p50'] - fresh['p50']:.3f} ms"
        + (f", vs idle-then-turn p50={svc['p50'] - paused['p50']:.3f} ms" if paused else "")
    )
    print(
        f"memory: service RSS {rss_before:.1f} -> {rss_after:.1f} MiB; "
        f"machine: nproc={os.cpu_count()}, python {platform.python_version()}; "
        f"run took {elapsed:.0f} s"
    )
    health_p50 = dist(floor["health"])["p50"]
    bare_p50 = dist(bare["health"])["p50"]
    print(
        f"GET /health p50={health_p50:.3f} ms (target ≤ 1.5 ms) "
        f"[{'met' if health_p50 <= 1.5 else 'MISSED'}], bare hypercorn {bare_p50:.3f} ms "
        f"({health_p50 / bare_p50:.2f}x); service CPU per job={svc_ms:.1f} ms "
        f"(target ≤ 4 ms) [{'met' if svc_ms <= 4 else 'MISSED'}]"
    )
    print(
        f"start-up: spawn -> /health 200 p50 {startup_p50:.0f} ms (target ≤ 1000 ms) "
        f"[{'met' if startup_p50 <= 1000 else 'MISSED'}]; {startup_ratio:.1f}x a bare "
        f"`python -c 'import trio'`"
    )
    print(quiet_verdict(share for _, share in quiet))


if __name__ == "__main__":
    trio.run(main, parse_args())
