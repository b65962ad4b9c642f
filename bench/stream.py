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
     (``tests.support.harness.service_agents``), ``run_turn`` in this process; the time the
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
import time
from pathlib import Path

import httpx
import trio

from bench.service import AUTH, Direct, bench_env, client_of, options, wait_ready, workdir
from bench.stats import (
    QuietLog,
    dist,
    fmt_dist,
    machine_busy_s,
    print_machine,
    section,
    self_cpu_s,
)
from claude_code_api.messages import AssistantText
from tests.support import sse
from tests.support.harness import RunningService, launch_service, proc_cpu_s, wait_pool_ready

HTTP_TIMEOUT_S = 120.0
STAMP = "[[fake:stamp:1:0]]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]),
        samples=(100, "timed first-text samples"),
        warmups=(5, "untimed samples first"),
        streams=(100, "concurrent streams"),
        events=(20, "text events per stream"),
        gap=(0.05, "seconds between them"),
        rounds=(3, "rounds of streams and of JSON"),
        option_samples=(20, "phase 2, per variant"),
        phases=("1,2,3", "which phases to run, comma-separated"),
    )
    return parser.parse_args(argv)


def stamp_of(text: str) -> float:
    assert text.startswith("stamp "), text
    return float(text.removeprefix("stamp "))


# --- 1. time to the first text ------------------------------------------------------------


async def direct_first_text(args: argparse.Namespace, where: Path) -> list[float]:
    """The baseline: each turn on a fresh warm agent, idle 100 ms first, as the service's
    agents are; the time its ``AssistantText`` reaches ``on_event`` after the fake wrote it."""
    direct = Direct(bench_env(where / "direct"), where / "homes")
    latencies = []
    for number in range(args.warmups + args.samples):
        _, agent = await direct.warm()
        arrived: list[float] = []

        async def on_event(event: object, arrived: list[float] = arrived) -> None:
            if isinstance(event, AssistantText) and not arrived:
                arrived.append(time.monotonic() - stamp_of(event.text))

        try:
            await trio.sleep(0.1)
            await agent.run_turn(STAMP, on_event)
        finally:
            await agent.close()
        if number >= args.warmups:
            latencies.append(arrived[0])
    return latencies


async def service_first_text(
    args: argparse.Namespace, client: httpx.AsyncClient
) -> tuple[list[float], list[float]]:
    """(agent's text → client, request sent → first text) for each sample."""
    added, total = [], []
    for number in range(args.warmups + args.samples):
        await wait_ready(client, interval=0.02)
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


async def throughput_round(
    service: RunningService, kind: str, prompt: str, n: int, lateness: list[float]
) -> tuple[float, list[int], list[float]]:
    """``n`` runs at once of ``kind`` (stream or json): (wall, texts per run, the CPU
    seconds of the service, of this benchmark's clients and of the whole machine)."""
    cpu_before = (proc_cpu_s(service.pid)[0], self_cpu_s(), machine_busy_s())
    counts: list[int] = []
    # Fresh connections each round: the service closes idle ones after 5 s.
    async with client_of(service, n + 8, timeout=HTTP_TIMEOUT_S) as client:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(run_one, client, kind, prompt, counts, lateness)
        wall = time.monotonic() - started
    cpu_after = (proc_cpu_s(service.pid)[0], self_cpu_s(), machine_busy_s())
    return wall, counts, [a - b for a, b in zip(cpu_after, cpu_before, strict=True)]


async def throughput(args: argparse.Namespace, where: Path, quiet: QuietLog) -> None:
    section(f"3. Throughput: {args.streams} concurrent streams, POOL_SIZE={args.streams}")
    n = args.streams
    prompt = f"[[fake:stamp:{args.events}:{args.gap}]]"
    env = bench_env(
        where / "throughput",
        {"POOL_SIZE": str(n), "QUEUE_MAX": str(2 * n), "WARMUP_TIMEOUT_MS": "120000"},
    )
    async with launch_service(env, start_timeout_s=60, log_lines=200) as service:
        async with service.client() as control:
            waited = await wait_pool_ready(control, timeout=300, interval=0.2)
            print(f"  {n} agents warm after {waited:.1f} s")
            print(
                f"  each run: {args.events} texts {args.gap} s apart "
                f"(ideal {(args.events - 1) * args.gap:.2f} s)"
            )
            walls: dict[str, list[float]] = {"stream": [], "json": []}
            lateness: list[float] = []
            for round_number in range(args.rounds):
                for kind in ("stream", "json"):
                    await wait_pool_ready(control, timeout=300, interval=0.2)
                    with quiet.phase(service.pid):
                        wall, counts, cpu = await throughput_round(
                            service, kind, prompt, n, lateness
                        )
                        walls[kind].append(wall)
                        texts = sum(counts)
                        assert texts == n * args.events, (kind, texts)
                        print(
                            f"  round {round_number + 1} {kind:>6}: {n} runs in {wall:6.3f} s"
                            f" ({texts / wall:6.1f} texts/s); CPU s: service {cpu[0]:.2f},"
                            f" clients {cpu[1]:.2f}, all {cpu[2]:.2f}"
                            f" ({100 * cpu[2] / wall / (os.cpu_count() or 1):.0f} % of the CPUs)"
                        )
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
        print(f"  service RSS {memory['VmRSS'] / 1024:.1f} MiB (peak {memory['VmHWM'] / 1024:.1f})")


# --- 2. options and the pool -----------------------------------------------------------------


async def options_latency(client: httpx.AsyncClient, samples: int) -> dict[str, list[float]]:
    variants = {
        "no option": {},
        "model (set_model on the warm agent)": {"model": "bench-model"},
        "systemPrompt (a process of its own)": {"systemPrompt": "Be brief."},
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for number in range(samples + 2):
        for name, option in variants.items():
            await wait_ready(client, interval=0.02)
            started = time.monotonic()
            reply = await client.post(
                "/run", headers=AUTH, json={"prompt": "[[fake:whoami]]", **option}
            )
            elapsed = time.monotonic() - started
            assert reply.status_code == 200, reply.text
            who = json.loads(reply.json()["output"].removeprefix("whoami: "))
            assert who["model"] == option.get("model", who["model"])
            if number >= 2:
                timings[name].append(elapsed)
    return timings


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet = QuietLog()
    print_machine()
    with workdir("bench-stream-") as where:
        phases = set(args.phases.split(","))
        if phases & {"1", "2"}:
            await first_text_and_options(args, where, quiet, phases)
        if "3" in phases:
            await throughput(args, where, quiet)
    section("summary")
    print(f"  {quiet.verdict()}")


async def first_text(
    args: argparse.Namespace, client: httpx.AsyncClient, direct: list[float]
) -> None:
    """Phase 1's service figures, and what the service adds to the direct baseline."""
    added, total = await service_first_text(args, client)
    print(fmt_dist("service: SSE text event (httpx)", dist(added)))
    print(fmt_dist("(request sent → first text)", dist(total)))
    d_direct, d_service = dist(direct), dist(added)
    for q in ("p50", "p99"):
        extra = d_service[q] - d_direct[q]
        ratio = d_service[q] / d_direct[q]
        print(
            f"  added {q}: {extra:.3f} ms (service {d_service[q]:.3f} / baseline"
            f" {d_direct[q]:.3f} ms = {ratio:.2f}x); target ≤ 2 ms:"
            f" {'met' if extra <= 2 else 'missed'}"
        )


async def first_text_and_options(
    args: argparse.Namespace, where: Path, quiet: QuietLog, phases: set[str]
) -> None:
    direct: list[float] = []
    if "1" in phases:
        section("1. Time to the first text event: the agent's own output → the reader")
        with quiet.phase():
            direct = await direct_first_text(args, where)
            print(fmt_dist("baseline: SDK on_event (direct)", dist(direct)))
    env = bench_env(where / "service", {"POOL_SIZE": "1", "ALLOWED_MODELS": "bench-model"})
    async with launch_service(env, log_lines=200) as service:
        async with service.client(timeout=HTTP_TIMEOUT_S) as client:
            if "1" in phases:
                with quiet.phase(service.pid):
                    await first_text(args, client, direct)
            if "2" in phases:
                section("2. One-shot latency by option (worker warm before each)")
                with quiet.phase(service.pid):
                    timings = await options_latency(client, args.option_samples)
                    for name, values in timings.items():
                        print(fmt_dist(name, dist(values), width=38))


if __name__ == "__main__":
    trio.run(main)
