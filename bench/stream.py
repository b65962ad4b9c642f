"""Benchmark: streamed replies (SSE) — latency added to the agent's first text, and throughput.

Prints figures; it is not a test. Everything runs on 127.0.0.1 against the fake
CLI ``tests/fake_claude.py``; no network, no Claude credentials. The service is
the real one (``python -m claude_code_api``, PORT=0), started with the tests'
launcher.

    .venv/bin/python -m bench.stream          # defaults: about two minutes
    .venv/bin/python -m bench.stream --help

Phases:

1. **Time to the first text.** The fake's ``[[fake:stamp:1:0]]`` writes one text,
   ``stamp <time.monotonic()>``, taken just before it writes the line
   (``CLOCK_MONOTONIC``: one clock for every process of the machine). So the
   latency from the agent's own output to the reader is measured directly:
   * *baseline*: the SDK alone — an agent made exactly as the service makes them
     (``tests.harness.service_agents``), ``run_turn`` in this process; the time the
     ``AssistantText`` reaches ``on_event``. Each turn on a fresh warm agent, idle
     100 ms first, as the service's agents are.
   * *service*: ``POST /run`` with ``"stream": true`` over HTTP (httpx, one kept-alive
     connection, one request at a time, the worker warm before each); the time the
     ``text`` event's last line reaches the client.
   **added** = service − baseline (p50 and p99), target ≤ 2 ms.
3. **Throughput, N concurrent streams** (default 100, ``POOL_SIZE`` = N so all of
   them run at once): each asks ``[[fake:slow:E:D]]`` (E texts, D s apart). Streams
   and JSON requests (the baseline: the same work, one reply at the end) in turns,
   ``--rounds`` each. Printed: wall time for all N, text events per second delivered,
   each stream's lateness (its last text event after the agent wrote it — from
   stamps), and the stream/JSON ratio.
2. **Options and the pool**: one-shot ``POST /run`` latency (worker warm before
   each) with no option, with a ``model`` (a control request on the warm agent) and
   with a ``systemPrompt`` (a process of its own for the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


import httpx
import trio

from bench.stats import (
    QuietMeter,
    dist,
    fmt_dist,
    machine_busy_s,
    machine_lines,
    quiet_verdict,
    section,
    self_cpu_s,
)
from claude_code_api.agent import AgentSpec
from claude_code_api.messages import AssistantText
from tests import sse
from tests.harness import (
    AUTH,
    launch_service,
    proc_cpu_s,
    service_agents,
    service_env,
    wait_pool_ready,
)

HTTP_TIMEOUT_S = 120.0
STAMP = "[[fake:stamp:1:0]]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="timed first-text samples")
    parser.add_argument("--warmups", type=int, default=5, help="untimed samples first")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams")
    parser.add_argument("--events", type=int, default=20, help="text events per stream")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between them")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of streams and of JSON")
    parser.add_argument("--option-samples", type=int, default=20, help="phase 2, per variant")
    parser.add_argument(
        "--phases", default="1,2,3", help="which phases to run, comma-separated (default: all)"
    )
    return parser.parse_args(argv)


def stamp_of(text: str) -> float:
    assert text.startswith("stamp "), text
    return float(text.removeprefix("stamp "))


# --- 1. time to the first text ------------------------------------------------------------


async def direct_first_text(args: argparse.Namespace, workdir: Path) -> list[float]:
    env = service_env(workdir / "direct", record_pids=False)
    _settings, new_agent = service_agents(env)
    latencies = []
    for number in range(args.warmups + args.samples):
        agent = new_agent(
            AgentSpec(name=f"bench-{number}", home=workdir / "homes" / str(number), ephemeral=True)
        )
        await agent.start(30)
        try:
            await trio.sleep(0.1)
            arrived: list[tuple[float, str]] = []

            async def on_event(event: object, arrived: list = arrived) -> None:
                if isinstance(event, AssistantText) and not arrived:
                    arrived.append((time.monotonic(), event.text))

            await agent.run_turn(STAMP, on_event)
        finally:
            await agent.close()
        at, text = arrived[0]
        if number >= args.warmups:
            latencies.append(at - stamp_of(text))
    return latencies


async def service_first_text(
    args: argparse.Namespace, client: httpx.AsyncClient
) -> tuple[list[float], list[float]]:
    """(agent's text → client, request sent → first text) for each sample."""
    added, total = [], []
    for number in range(args.warmups + args.samples):
        await wait_pool_ready(client, timeout=30)
        sent = time.monotonic()
        body = {"prompt": STAMP, "stream": True}
        async with client.stream("POST", "/run", headers=AUTH, json=body) as response:
            first = None
            async for event in sse.events(response):
                if event.name == "text" and first is None:
                    first = event
        assert first is not None
        if number >= args.warmups:
            added.append(first.at - stamp_of(first.data["text"]))
            total.append(first.at - sent)
    return added, total


# --- 3. throughput ------------------------------------------------------------------------


async def one_stream(client: httpx.AsyncClient, prompt: str, lateness: list[float]) -> int:
    texts = 0
    async with client.stream(
        "POST", "/run", headers=AUTH, json={"prompt": prompt, "stream": True}
    ) as response:
        assert response.status_code == 200, response.status_code
        async for event in sse.events(response):
            if event.name == "text":
                texts += 1
                lateness.append(event.at - stamp_of(event.data["text"]))
            elif event.name == "error":
                raise AssertionError(event.data)
    return texts


async def run_one(
    client: httpx.AsyncClient, kind: str, prompt: str, counts: list[int], lateness: list[float]
) -> None:
    if kind == "stream":
        counts.append(await one_stream(client, prompt, lateness))
    else:
        counts.append(await one_json(client, prompt))


async def one_json(client: httpx.AsyncClient, prompt: str) -> int:
    reply = await client.post("/run", headers=AUTH, json={"prompt": prompt})
    assert reply.status_code == 200 and reply.json()["success"], reply.text
    return reply.json()["output"].count("stamp ")


async def throughput(args: argparse.Namespace, workdir: Path, shares: list[float]) -> None:
    section(f"3. Throughput: {args.streams} concurrent streams, POOL_SIZE={args.streams}")
    n = args.streams
    prompt = f"[[fake:stamp:{args.events}:{args.gap}]]"
    ideal = (args.events - 1) * args.gap
    env = service_env(
        workdir / "throughput",
        {"POOL_SIZE": str(n), "QUEUE_MAX": str(2 * n), "WARMUP_TIMEOUT_MS": "120000"},
        record_pids=False,
    )
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with launch_service(env, start_timeout_s=60, log_lines=200) as service:
        async with service.client() as control:
            waited = await wait_pool_ready(control, timeout=300, interval=0.2)
            print(f"  {n} agents warm after {waited:.1f} s")
            print(f"  each run: {args.events} texts {args.gap} s apart (ideal {ideal:.2f} s)")
            walls: dict[str, list[float]] = {"stream": [], "json": []}
            lateness: list[float] = []
            for round_number in range(args.rounds):
                for kind in ("stream", "json"):
                    await wait_pool_ready(control, timeout=300, interval=0.2)
                    meter = QuietMeter(service.pid)
                    service_cpu = proc_cpu_s(service.pid)[0]
                    client_cpu = self_cpu_s()
                    machine_cpu = machine_busy_s()
                    counts: list[int] = []
                    # Fresh connections each round: the service closes idle ones after 5 s.
                    async with service.client(timeout=HTTP_TIMEOUT_S, limits=limits) as client:
                        started = time.monotonic()
                        async with trio.open_nursery() as nursery:
                            for _ in range(n):
                                nursery.start_soon(run_one, client, kind, prompt, counts, lateness)
                        wall = time.monotonic() - started
                    service_cpu = proc_cpu_s(service.pid)[0] - service_cpu
                    client_cpu = self_cpu_s() - client_cpu
                    machine_cpu = machine_busy_s() - machine_cpu
                    line, share = meter.report()
                    shares.append(share)
                    walls[kind].append(wall)
                    texts = sum(counts)
                    assert texts == n * args.events, (kind, texts)
                    print(
                        f"  round {round_number + 1} {kind:>6}: {n} runs in {wall:6.3f} s"
                        f" ({texts / wall:6.1f} texts/s); CPU s: service {service_cpu:.2f},"
                        f" clients {client_cpu:.2f}, all {machine_cpu:.2f}"
                        f" ({100 * machine_cpu / wall / (os.cpu_count() or 1):.0f} % of the CPUs)"
                    )
                    print(line)
            stream_wall = statistics.median(walls["stream"])
            json_wall = statistics.median(walls["json"])
            total = n * args.events
            print(f"  median wall: streams {stream_wall:.3f} s, JSON {json_wall:.3f} s")
            print(
                f"  text events delivered: {total / stream_wall:.1f}/s streamed"
                f" (JSON: the same {total} texts in {n} replies)"
            )
            print(f"  ratio streams / JSON (wall): {stream_wall / json_wall:.3f}")
            print(fmt_dist("text lateness (agent → client)", dist(lateness)))
            memory = service.memory_kib()
            print(
                f"  service RSS {memory['VmRSS'] / 1024:.1f} MiB (peak {memory['VmHWM'] / 1024:.1f})"
            )


# --- 2. options and the pool -----------------------------------------------------------------


async def options_latency(client: httpx.AsyncClient, samples: int) -> dict[str, list[float]]:
    variants = {
        "no option": {},
        "model (set_model on the warm agent)": {"model": "bench-model"},
        "systemPrompt (a process of its own)": {"systemPrompt": "Be brief."},
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for number in range(samples + 2):
        for name, options in variants.items():
            await wait_pool_ready(client, timeout=30)
            started = time.monotonic()
            reply = await client.post(
                "/run", headers=AUTH, json={"prompt": "[[fake:whoami]]", **options}
            )
            elapsed = time.monotonic() - started
            assert reply.status_code == 200, reply.text
            who = json.loads(reply.json()["output"].removeprefix("whoami: "))
            assert who["model"] == options.get("model", who["model"])
            if number >= 2:
                timings[name].append(elapsed)
    return timings


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shares: list[float] = []
    section("machine")
    for line in machine_lines():
        print(line)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        workdir = Path(tmp)
        phases = set(args.phases.split(","))
        if phases & {"1", "2"}:
            await first_text_and_options(args, workdir, shares, phases)
        if "3" in phases:
            await throughput(args, workdir, shares)

    section("summary")
    print(f"  {quiet_verdict(shares)}")


async def first_text_and_options(
    args: argparse.Namespace, workdir: Path, shares: list[float], phases: set[str]
) -> None:
    direct: list[float] = []
    if "1" in phases:
        section("1. Time to the first text event: the agent's own output → the reader")
        meter = QuietMeter()
        direct = await direct_first_text(args, workdir)
        line, share = meter.report()
        shares.append(share)
        print(fmt_dist("baseline: SDK on_event (direct)", dist(direct)))
        print(line)
    env = service_env(
        workdir / "service", {"POOL_SIZE": "1", "ALLOWED_MODELS": "bench-model"}, record_pids=False
    )
    async with launch_service(env, log_lines=200) as service:
        async with service.client(timeout=HTTP_TIMEOUT_S) as client:
            if "1" in phases:
                meter = QuietMeter(service.pid)
                added, total = await service_first_text(args, client)
                line, share = meter.report()
                shares.append(share)
                print(fmt_dist("service: SSE text event (httpx)", dist(added)))
                print(fmt_dist("(request sent → first text)", dist(total)))
                print(line)
                d_direct, d_service = dist(direct), dist(added)
                for q in ("p50", "p99"):
                    extra = d_service[q] - d_direct[q]
                    ratio = d_service[q] / d_direct[q]
                    print(
                        f"  added {q}: {extra:.3f} ms (service {d_service[q]:.3f} / baseline"
                        f" {d_direct[q]:.3f} ms = {ratio:.2f}x); target ≤ 2 ms:"
                        f" {'met' if extra <= 2 else 'missed'}"
                    )
            if "2" in phases:
                section("2. One-shot latency by option (worker warm before each)")
                meter = QuietMeter(service.pid)
                timings = await options_latency(client, args.option_samples)
                line, share = meter.report()
                shares.append(share)
                for name, values in timings.items():
                    print(fmt_dist(name, dist(values), width=38))
                print(line)


if __name__ == "__main__":
    trio.run(main)
