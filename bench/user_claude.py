"""Benchmark: one-shot latency for a user with a CLAUDE.md vs one without.

Prints figures; it is not a test. Everything runs on 127.0.0.1 against the fake
CLI ``tests/fake_claude.py``; no network, no Claude credentials. The service is
the real one (``python -m claude_code_api``, PORT=0, POOL_SIZE=1, AGENT_REUSE_S=0).

    .venv/bin/python -m bench.user_claude          # defaults: about a minute
    .venv/bin/python -m bench.user_claude --help

A one-shot agent is warmed before its user is known; a user's CLAUDE.md is handed
to it with the prompt, so a user with one should pay no extra process start.
Phases:

1. ``POST /run`` one at a time on one kept-alive connection, alternating between
   ``plain`` (no CLAUDE.md), ``small`` (a CLAUDE.md of --small-bytes) and ``max``
   (100 KiB, the largest a PUT accepts), each request sent only once ``/health``
   reports the worker ready, so no warm-up is timed — unless the request itself
   needs one. The untimed first rounds send ``[[fake:memory]]`` and check that
   each reply carries that user's CLAUDE.md and no other's; the timed rounds send
   the same short prompt for every user.
2. For scale, what a cold start would add: an agent made as the service makes
   them (``tests.harness.service_agents``) started directly, ``start()`` to warm.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path


import trio

from bench.stats import (
    QuietMeter,
    dist,
    fmt_dist,
    machine_lines,
    quiet_verdict,
    section,
)
from claude_code_api.agent import AgentSpec
from claude_code_api.user_memory import MAX_SAVED_BYTES
from tests.harness import (
    launch_service,
    service_agents,
    service_env,
    wait_pool_ready,
)

USERS = ("plain", "small", "max")
KEYS = {user: f"sk-bench-{user}" for user in USERS}
AUTH = {user: {"x-api-key": key} for user, key in KEYS.items()}
HTTP_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="timed requests per user")
    parser.add_argument("--warmups", type=int, default=5, help="untimed requests per user first")
    parser.add_argument("--small-bytes", type=int, default=2048, help="the small CLAUDE.md")
    parser.add_argument("--cold-starts", type=int, default=10, help="direct agent starts timed")
    return parser.parse_args(argv)


def claude_md(user: str, size: int) -> str:
    head = f"# {user}'s rules\nMARK-{user.upper()}-{uuid.uuid4().hex[:8]}\n"
    return head + "Answer briefly and in English.\n" * ((size - len(head)) // 31 + 1)


async def service_latency(args: argparse.Namespace, workdir: Path, shares: list[float]) -> None:
    section("1. POST /run (one-shot), one at a time, worker warm before each request")
    env = service_env(
        workdir,
        {
            "API_KEYS": ",".join(f"{u}:{k}" for u, k in KEYS.items()),
            "QUEUE_MAX": "10",
            # A fresh agent for every request. With reuse on, the ready agent is kept for
            # the previous user, so each request (the users alternate) would wait for a
            # cold start: the figure would be the warm-up, not the CLAUDE.md's cost.
            "AGENT_REUSE_S": "0",
        },
        record_pids=False,
    )
    contents = {
        "small": claude_md("small", args.small_bytes)[: args.small_bytes],
        "max": claude_md("max", MAX_SAVED_BYTES)[:MAX_SAVED_BYTES],
    }
    async with launch_service(env, log_lines=200) as service:
        async with service.client(timeout=HTTP_TIMEOUT_S) as client:
            for user, content in contents.items():
                saved = await client.put(
                    "/user-claude", json={"content": content}, headers=AUTH[user]
                )
                assert saved.json() == {"saved": True}, saved.text
            marks = {user: content.splitlines()[1] for user, content in contents.items()}
            latencies: dict[str, list[float]] = {user: [] for user in USERS}
            waited: list[float] = []
            meter = QuietMeter(service.pid)
            for round_ in range(args.warmups + args.samples):
                for user in USERS:
                    waited.append(await wait_pool_ready(client))
                    # Untimed rounds check what reached the agent; timed ones send the
                    # same prompt for everyone (the fake's memory echo would be 100 KiB).
                    timed = round_ >= args.warmups
                    prompt = "What is 2+2?" if timed else "[[fake:memory]]"
                    started = time.perf_counter()
                    reply = await client.post("/run", json={"prompt": prompt}, headers=AUTH[user])
                    took = time.perf_counter() - started
                    body = reply.json()
                    assert reply.status_code == 200 and body["success"], body
                    if timed:
                        latencies[user].append(took)
                    else:
                        seen = {u for u, mark in marks.items() if mark in body["output"]}
                        assert seen == ({user} if user in marks else set()), (user, seen)
            line, share = meter.report()
            shares.append(share)
        await service.stop()
    sizes = {"plain": "no CLAUDE.md", "small": f"{args.small_bytes} B", "max": "100 KiB"}
    for user in USERS:
        print(fmt_dist(f"{user} ({sizes[user]})", dist(latencies[user])))
    print(fmt_dist("(untimed) wait for the worker", dist(waited)))
    plain = dist(latencies["plain"])["p50"]
    for user in ("small", "max"):
        extra = dist(latencies[user])["p50"] - plain
        print(f"  p50 extra for {user:<5}: {extra:+.3f} ms")
    print(line)


async def cold_start(args: argparse.Namespace, workdir: Path, shares: list[float]) -> None:
    section("2. for scale: one agent's cold start, directly (start() until warm)")
    env = service_env(workdir / "direct", record_pids=False)
    _settings, new_agent = await trio.to_thread.run_sync(service_agents, env)
    homes = Path(env["DATA_DIR"]) / "bench-homes"
    starts: list[float] = []
    meter = QuietMeter()
    for n in range(args.cold_starts):
        agent = new_agent(AgentSpec(name=f"cold-{n}", home=homes / str(n), ephemeral=True))
        started = time.perf_counter()
        try:
            await agent.start(30)
            starts.append(time.perf_counter() - started)
        finally:
            await agent.close()
    line, share = meter.report()
    shares.append(share)
    print(fmt_dist("agent start (fake CLI)", dist(starts)))
    print(line)


async def main(args: argparse.Namespace) -> None:
    section("machine")
    for line in machine_lines():
        print(line)
    shares: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-user-claude-") as tmp:
        await service_latency(args, Path(tmp), shares)
        await cold_start(args, Path(tmp), shares)
    section("summary")
    print(f"  {quiet_verdict(shares)}")


if __name__ == "__main__":
    trio.run(main, parse_args(None))
