#!/usr/bin/env python3
"""Benchmark of the one-shot pool: service overhead and throughput at saturation.

Prints figures; it is not a test. Everything runs on 127.0.0.1 against the fake
CLI ``tests/fake_claude.py``; no network, no Claude credentials. See
``bench/README.md`` for what each figure means and what is (not) compared.

    .venv/bin/python bench/bench_pool.py            # defaults: about 1.5 minutes on a quiet machine
    .venv/bin/python bench/bench_pool.py --help

Phases, all in one run:

1. warm-up of one agent, directly through the SDK with the service's own options
   (``agent_options(load_settings(env), cwd=...)``): ``ClaudeSDKClient(...)`` to
   ``connect()`` returning, one at a time, then POOL_SIZE at once;
2. direct SDK turns, same prompt as the service gets: on one already-warm client
   (N turns back to back; then N turns each after an idle pause), and the first
   turn of a fresh warm client (N clients);
3. the service (``python -m claude_code_api``, PORT=0) with POOL_SIZE workers:
   ``POST /run`` one at a time on a kept-alive connection, each sent only once
   ``/health`` reports every worker ready, so no warm-up is timed;
4. throughput: C concurrent clients send quick prompts for a fixed time; replies
   are counted by status; RSS and CPU time of the service (and of its reaped agent
   processes) are read from /proc before and after.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402
from claude_agent_sdk import ClaudeSDKClient, ResultMessage  # noqa: E402

from claude_code_api.agent import agent_options  # noqa: E402
from claude_code_api.config import load_settings  # noqa: E402

FAKE_CLAUDE = ROOT / "tests" / "fake_claude.py"
API_KEY = "sk-bench-key"
AUTH = {"x-api-key": API_KEY}
PROMPT = "What is 2+2?"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Bounds on every wait, so the script always stops by itself.
SERVICE_START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0


# --- small helpers ---------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return data[low] + (data[high] - data[low]) * (pos - low)


def dist(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "min": min(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms),
        "mean": statistics.fmean(ms),
    }


def fmt_dist(name: str, d: dict[str, float]) -> str:
    return (
        f"  {name:<34} n={d['n']:<4} min={d['min']:7.3f}  p50={d['p50']:7.3f}  "
        f"p90={d['p90']:7.3f}  p99={d['p99']:7.3f}  max={d['max']:8.3f}  mean={d['mean']:7.3f} ms"
    )


def proc_status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def rss_mib(pid: int) -> float:
    value = proc_status(pid, "VmRSS")  # "12345 kB"
    return int(value.split()[0]) / 1024


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(own CPU s, CPU s of its reaped children) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds every CPU of the machine spent not idle, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CpuMeter:
    """Which share of the machine's CPU this benchmark's process tree did NOT use.

    Other processes (a test suite running next to the benchmark...) compete with the
    service and the agents for the CPUs and distort every figure; this tells.
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
        warn = "  <-- the machine was not quiet: figures are distorted" if share > 5 else ""
        line = (
            f"  other processes used {others:.1f} CPU-s in {wall:.1f} s "
            f"({share:.0f} % of {ncpu} CPUs){warn}"
        )
        return line, share


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


# --- direct SDK ----------------------------------------------------------------------


class Direct:
    """The SDK with the service's own options, against the fake CLI."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.settings = load_settings(env)
        self.workdir = workdir
        self.count = 0

    def client(self) -> ClaudeSDKClient:
        self.count += 1
        cwd = self.workdir / f"direct-{self.count}"
        cwd.mkdir(parents=True)
        return ClaudeSDKClient(agent_options(self.settings, cwd=cwd, stderr=lambda _line: None))

    async def warm_one(self) -> tuple[float, ClaudeSDKClient]:
        started = time.perf_counter()
        client = self.client()
        with trio.fail_after(READY_TIMEOUT_S):
            await client.connect()
        return time.perf_counter() - started, client


async def turn(client: ClaudeSDKClient, prompt: str) -> float:
    started = time.perf_counter()
    with trio.fail_after(HTTP_TIMEOUT_S):
        await client.query(prompt)
        async for message in client.receive_response():
            if isinstance(message, ResultMessage):
                if message.is_error:
                    raise RuntimeError(f"direct turn failed: {message}")
                break
    return time.perf_counter() - started


async def close(client: ClaudeSDKClient) -> None:
    with trio.move_on_after(10):
        await client.disconnect()


async def measure_warmup(direct: Direct, runs: int, pool_size: int) -> dict:
    """Sequential warm-ups (the bound's figure), then pool_size at once (contention)."""
    times = []
    cpu_before = children_cpu_s()
    for _ in range(runs):
        elapsed, client = await direct.warm_one()
        times.append(elapsed)
        await close(client)
    # The children are reaped: their CPU (start, initialize, exit on EOF) is counted.
    cpu_per_agent = (children_cpu_s() - cpu_before) / runs

    concurrent: list[float] = []
    rounds = max(1, runs // pool_size)
    for _ in range(rounds):
        clients: list[ClaudeSDKClient] = []

        async def one(started: list[ClaudeSDKClient]) -> None:
            elapsed, client = await direct.warm_one()
            concurrent.append(elapsed)
            started.append(client)

        async with trio.open_nursery() as nursery:
            for _ in range(pool_size):
                nursery.start_soon(one, clients)
        for client in clients:
            await close(client)
    return {"seq": times, "concurrent": concurrent, "cpu_per_agent_s": cpu_per_agent}


async def measure_direct(direct: Direct, samples: int, warmup_turns: int, pause_s: float) -> dict:
    # (a) one warm client, `samples` turns back to back: the headline baseline.
    # (b) the same client, idle for `pause_s` before each turn, as the service's
    #     agent is idle between its warm-up and its job.
    _, client = await direct.warm_one()
    try:
        for _ in range(warmup_turns):
            await turn(client, PROMPT)
        reused = [await turn(client, PROMPT) for _ in range(samples)]
        paused = []
        if pause_s > 0:
            for _ in range(samples):
                await trio.sleep(pause_s)
                paused.append(await turn(client, PROMPT))
    finally:
        await close(client)
    # (b) first turn of a freshly warmed client: the service's one-shot path minus the service.
    fresh = []
    for _ in range(samples):
        _, client = await direct.warm_one()
        try:
            await trio.sleep(0.01)  # let the new process settle, as the service's would
            fresh.append(await turn(client, PROMPT))
        finally:
            await close(client)
    return {"reused": reused, "paused": paused, "fresh": fresh}


# --- the service ----------------------------------------------------------------------


class Service:
    def __init__(self, process: trio.Process, url: str, log: collections.deque[str]) -> None:
        self.process = process
        self.url = url
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid


async def start_service(env: dict[str, str], nursery: trio.Nursery) -> Service:
    log: collections.deque[str] = collections.deque(maxlen=200)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "claude_code_api"],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    found: list[str] = []
    url_found = trio.Event()

    async def read_log() -> None:
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                log.append(line)
                if not found and "listening on http://" in line:
                    found.append(line.split("listening on ", 1)[1].split()[0])
                    url_found.set()

    nursery.start_soon(read_log)
    with trio.move_on_after(SERVICE_START_TIMEOUT_S):
        while not url_found.is_set() and process.poll() is None:
            with trio.move_on_after(0.05):
                await url_found.wait()
    if not found:
        process.kill()
        await process.wait()
        raise RuntimeError("service did not start:\n" + "\n".join(log))
    return Service(process, found[0], log)


async def stop_service(service: Service) -> int:
    process = service.process
    if process.poll() is None:
        process.terminate()  # SIGTERM: graceful shutdown
    with trio.move_on_after(STOP_TIMEOUT_S):
        return await process.wait()
    process.kill()
    return await process.wait()


async def health(client: httpx.AsyncClient) -> dict:
    return (await client.get("/health")).json()


async def wait_all_ready(client: httpx.AsyncClient, interval: float = 0.005) -> float:
    """Poll /health until every worker is ready; returns the time waited."""
    started = time.perf_counter()
    with trio.fail_after(READY_TIMEOUT_S):
        while True:
            workers = (await health(client))["workers"]
            if workers["total"] > 0 and workers["ready"] == workers["total"]:
                return time.perf_counter() - started
            await trio.sleep(interval)


async def post_run(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/run", json={"prompt": PROMPT}, headers=AUTH)


async def measure_http_floor(service: Service, samples: int) -> dict:
    """Round trips that involve no agent: what the HTTP stack alone costs.

    ``GET /health`` goes through HTTP, the app and one dispatcher round trip;
    ``POST /run`` with an empty prompt through HTTP, auth and body parsing (400).
    """
    health_times, bad_times = [], []
    async with httpx.AsyncClient(base_url=service.url, timeout=HTTP_TIMEOUT_S) as client:
        await wait_all_ready(client)
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
            if response.status_code != 400:
                raise RuntimeError(f"expected 400, got {response.status_code} {response.text}")
            if i >= 10:
                bad_times.append(elapsed)
    return {"health": health_times, "bad_run": bad_times}


async def measure_service_latency(service: Service, samples: int, warmup_requests: int) -> dict:
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
    service: Service, clients: int, ramp_s: float, duration_s: float
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
                try:
                    response = await post_run(client)
                except httpx.HTTPError as exc:
                    key = f"error {type(exc).__name__}"
                else:
                    if response.status_code == 200:
                        key = "200 success" if response.json().get("success") else "200 failure"
                    else:
                        key = str(response.status_code)
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
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    run_started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    try:
        await run(args, workdir, run_started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def run(args: argparse.Namespace, workdir: Path, run_started: float) -> None:
    fake_home = workdir / "fake-home"
    fake_home.mkdir()
    if args.fake_python:
        bindir = workdir / "bin"
        bindir.mkdir()
        (bindir / "python3").symlink_to(Path(args.fake_python).absolute())
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    # The SDK merges os.environ under the agent's env: the direct calls' fake uses it.
    os.environ["FAKE_CLAUDE_HOME"] = str(fake_home)
    os.environ.pop("FAKE_CLAUDE_MODE", None)
    config = {
        "CLAUDE_EXECUTABLE": str(FAKE_CLAUDE),
        "API_KEYS": API_KEY,
        "HOST": "127.0.0.1",
        "PORT": "0",
        "POOL_SIZE": str(args.pool_size),
        # Room for every client's job, so saturation is not answered 429.
        "QUEUE_MAX": str(max(20, 2 * args.clients)),
        "DATA_DIR": str(workdir / "data"),
    }
    service_env = {**os.environ, **config, "PYTHONUNBUFFERED": "1"}

    section("machine")
    fake_python = shutil.which("python3") or "?"
    print(f"  date:            {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"  nproc:           {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})")
    print(f"  cpu:             {_cpu_model()}")
    print(f"  load average:    {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"  python:          {platform.python_version()} ({sys.executable})")
    print(f"  service code:    {Path(agent_options.__code__.co_filename).parent}")
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

    direct = Direct(config, workdir / "direct")

    section("1. agent warm-up (ClaudeSDKClient(...) -> connect() returned; service options)")
    meter = CpuMeter()
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
    quiet = [meter.report()]
    print(quiet[-1][0])

    section("2. direct SDK turn (query() + drain receive_response() to the ResultMessage)")
    meter = CpuMeter()
    direct_runs = await measure_direct(direct, args.samples, warmup_turns=10, pause_s=args.pause)
    reused, fresh = dist(direct_runs["reused"]), dist(direct_runs["fresh"])
    paused = dist(direct_runs["paused"]) if direct_runs["paused"] else None
    print(fmt_dist("one warm client, back to back", reused))
    if paused:
        print(fmt_dist(f"same, idle {args.pause * 1000:g} ms before each", paused))
    print(fmt_dist("first turn of a fresh warm client", fresh))
    quiet.append(meter.report())
    print(quiet[-1][0])

    async with trio.open_nursery() as nursery:
        service = await start_service(service_env, nursery)
        try:
            section(f"3. service: POST /run one at a time (POOL_SIZE={args.pool_size})")
            print(f"  service pid {service.pid} at {service.url}")
            meter = CpuMeter(service.pid)
            latency = await measure_service_latency(service, args.samples, warmup_requests=10)
            svc = dist(latency["latencies"])
            print(fmt_dist("POST /run round trip (httpx)", svc))
            print(fmt_dist("wait for all workers ready (excl.)", dist(latency["waits"])))
            print(f"  failures: {latency['failures']}")
            floor = await measure_http_floor(service, args.samples)
            print("  for reference, round trips with no agent in them:")
            print(fmt_dist("GET /health", dist(floor["health"])))
            print(fmt_dist("POST /run -> 400 (empty prompt)", dist(floor["bad_run"])))
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
            rss_before = rss_mib(service.pid)
            hwm_before = proc_status(service.pid, "VmHWM")
            own0, kids0 = proc_cpu_s(service.pid)
            bench0 = self_cpu_s()
            meter = CpuMeter(service.pid)
            t0 = time.perf_counter()
            tp = await measure_throughput(service, args.clients, args.ramp, args.duration)
            wall = time.perf_counter() - t0
            own1, kids1 = proc_cpu_s(service.pid)
            bench1 = self_cpu_s()
            rss_after = rss_mib(service.pid)
            hwm_after = proc_status(service.pid, "VmHWM")
            quiet.append(meter.report())
        finally:
            code = await stop_service(service)
            nursery.cancel_scope.cancel()

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
    print(fmt_dist("latency under load (window)", dist(tp["latencies"] or [math.nan])))
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
        f"(VmHWM {hwm_before} -> {hwm_after})"
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
    print(f"  service exit code after SIGTERM: {code}")

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
    worst = max(share for _, share in quiet)
    print(
        f"quiet machine: {'yes' if worst <= 5 else 'NO'} (other processes used up to "
        f"{worst:.0f} % of the CPUs during a phase)"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    trio.run(main, parse_args())
