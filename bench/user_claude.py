"""One-shot latency for a user with a CLAUDE.md against one without.

A one-shot agent is warmed before its user is known and a user's CLAUDE.md is handed to
it with the prompt, so a user with one should pay no extra process start. 1. ``POST
/run`` one at a time for ``plain``, ``small`` and ``max`` (100 KiB) in turn, the worker
ready before each (the untimed rounds check that each user's CLAUDE.md, and no other's,
reached the agent); 2. for scale, an agent's cold start (``bench/README.md``).

    .venv/bin/python -m bench.user_claude          # about a minute
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

import httpx
import trio

from bench.service import PROMPT, Direct, bench_env, options, wait_ready, workdir
from bench.stats import QuietLog, dist, fmt_dist, print_machine, section
from claude_code_api.store.user_memory import MAX_SAVED_BYTES
from tests.support.harness import launch_service

USERS = ("plain", "small", "max")
KEYS = {user: f"sk-bench-{user}" for user in USERS}
AUTH = {user: {"x-api-key": key} for user, key in KEYS.items()}
HTTP_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]),
        samples=(100, "timed requests per user"),
        warmups=(5, "untimed requests per user first"),
        small_bytes=(2048, "the small CLAUDE.md"),
        cold_starts=(10, "direct agent starts timed"),
    )
    return parser.parse_args(argv)


def claude_md(user: str, size: int) -> str:
    head = f"# {user}'s rules\nMARK-{user.upper()}-{uuid.uuid4().hex[:8]}\n"
    return head + "Answer briefly and in English.\n" * ((size - len(head)) // 31 + 1)


async def one_round(
    client: httpx.AsyncClient, marks: dict[str, str], timed: bool
) -> dict[str, float]:
    """One request per user, each once the worker is ready. Untimed rounds check what
    reached the agent; timed ones send the same prompt for everyone (the fake's memory
    echo would be 100 KiB). Returns each user's time, and the waits for the worker."""
    took: dict[str, float] = {}
    for user in USERS:
        took[f"wait {user}"] = await wait_ready(client, interval=0.02)
        prompt = PROMPT if timed else "[[fake:memory]]"
        started = time.perf_counter()
        reply = await client.post("/run", json={"prompt": prompt}, headers=AUTH[user])
        took[user] = time.perf_counter() - started
        body = reply.json()
        assert reply.status_code == 200 and body["success"], body
        if not timed:
            seen = {u for u, mark in marks.items() if mark in body["output"]}
            assert seen == ({user} if user in marks else set()), (user, seen)
    return took


async def service_latency(args: argparse.Namespace, where: Path, quiet: QuietLog) -> None:
    section("1. POST /run (one-shot), one at a time, worker warm before each request")
    env = bench_env(
        where,
        {
            "API_KEYS": ",".join(f"{u}:{k}" for u, k in KEYS.items()),
            "QUEUE_MAX": "10",
            # A fresh agent for every request. With reuse on, the ready agent is kept for
            # the previous user, so each request (the users alternate) would wait for a
            # cold start: the figure would be the warm-up, not the CLAUDE.md's cost.
            "AGENT_REUSE_S": "0",
        },
    )
    contents = {
        "small": claude_md("small", args.small_bytes)[: args.small_bytes],
        "max": claude_md("max", MAX_SAVED_BYTES)[:MAX_SAVED_BYTES],
    }
    marks = {user: content.splitlines()[1] for user, content in contents.items()}
    rounds: list[dict[str, float]] = []
    async with launch_service(env, log_lines=200) as service:
        async with service.client(timeout=HTTP_TIMEOUT_S) as client:
            for user, content in contents.items():
                saved = await client.put(
                    "/user-claude", json={"content": content}, headers=AUTH[user]
                )
                assert saved.json() == {"saved": True}, saved.text
            with quiet.phase(service.pid):
                for number in range(args.warmups + args.samples):
                    rounds.append(await one_round(client, marks, timed=number >= args.warmups))
        await service.stop()
    timed_rounds = rounds[args.warmups :]
    sizes = {"plain": "no CLAUDE.md", "small": f"{args.small_bytes} B", "max": "100 KiB"}
    for user in USERS:
        print(fmt_dist(f"{user} ({sizes[user]})", dist([r[user] for r in timed_rounds])))
    waited = [r[f"wait {user}"] for r in rounds for user in USERS]
    print(fmt_dist("(untimed) wait for the worker", dist(waited)))
    plain = dist([r["plain"] for r in timed_rounds])["p50"]
    for user in ("small", "max"):
        extra = dist([r[user] for r in timed_rounds])["p50"] - plain
        print(f"  p50 extra for {user:<5}: {extra:+.3f} ms")


async def cold_start(args: argparse.Namespace, where: Path, quiet: QuietLog) -> None:
    section("2. for scale: one agent's cold start, directly (start() until warm)")
    env = bench_env(where / "direct")
    direct = await trio.to_thread.run_sync(Direct, env, where / "direct" / "bench-homes")
    starts: list[float] = []
    with quiet.phase():
        for _ in range(args.cold_starts):
            took, agent = await direct.warm()
            starts.append(took)
            await direct.close(agent)
        print(fmt_dist("agent start (fake CLI)", dist(starts)))


async def main(args: argparse.Namespace) -> None:
    print_machine()
    quiet = QuietLog()
    with workdir("bench-user-claude-") as where:
        await service_latency(args, where, quiet)
        await cold_start(args, where, quiet)
    section("summary")
    print(f"  {quiet.verdict()}")


if __name__ == "__main__":
    trio.run(main, parse_args(None))
