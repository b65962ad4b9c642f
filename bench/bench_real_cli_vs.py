#!/usr/bin/env python3
"""One user's one-shots and every one-shot another user's, with the real CLI, ours side by
side with the original; and what the sandbox costs.

Prints figures; it is not a test. The real bundled Claude Code CLI for both services (the
original is given its path in ``CLAUDE_EXECUTABLE``), against ``claude_code_api/demo/mock_messages_api.py``
in this process (every model call answered at once: what is left is the services' and the
CLI's own cost). ``POOL_SIZE=2``; ours with its defaults otherwise (``AGENT_REUSE_S=5``,
``AGENT_REUSE_MAX`` = ``POOL_SIZE``, ``AGENT_SANDBOX=auto``). Interleaved rounds, a fresh
service per side and round (``bench/original.py``; the original is skipped with a line
saying why when it cannot be prepared):

1. **in-run baseline**: a turn sent straight through the SDK to a warm agent made as the
   service makes them (no HTTP, no queue, no agent start);
2. **one user's requests** (one key) and **every request another user's** (a key each, of
   64): one-shot latency one at a time (p50, p99), each sent as the previous one is answered
   (back to back) and each sent once the pool is ready again (the service idle between
   requests, as issue 24 describes a new user's request), one-shots per second from 4 clients, and
   the CPU per one-shot of the service's whole process tree (agents and their warm-ups
   included: each phase ends once the pool is ready again);
3. **sessions** (one user), on a settled service (the pool ready, the agents kept by phase 2
   retired): a session's first turn (starts its agent) and its later turns;
4. **the sandbox** (ours only): an agent's start (wall, CPU of its process group) and a turn
   on a warm agent with ``AGENT_SANDBOX=auto`` against ``off``.

    .venv/bin/python bench/bench_real_cli_vs.py            # ~5 min on a loaded 2-CPU machine
    .venv/bin/python bench/bench_real_cli_vs.py --help     # --rounds --requests --clients ...

As root it sets ``IS_SANDBOX=1`` (the CLI refuses bypassPermissions otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from bench.bench_real_cli import group_usage, real_cli_env  # noqa: E402
from bench.original import (  # noqa: E402
    ORIGINAL,
    OURS,
    OriginalBuild,
    header_lines,
    launch,
    prepare,
    round_orders,
    sides_of,
)
from bench.service import checked_turn, model_proxy  # noqa: E402
from bench.stats import (  # noqa: E402
    QuietMeter,
    SideBySide,
    TreeCpuSampler,
    machine_lines,
    percentile,
    quiet_verdict,
    section,
)
from claude_code_api.agent.protocol import AgentSpec  # noqa: E402
from claude_code_api.demo.mock_messages_api import open_mock_api  # noqa: E402
from tests.support.harness import service_agents  # noqa: E402

PROMPT = "What is 2+2?"
USERS = 64
KEEPALIVE_S = 1.0
SETTLE_S = 6.0  # past AGENT_REUSE_S (5 s): the agents kept for the last users are retired
KEYS = [f"sk-bench-user-{n:02d}" for n in range(USERS)]
API_KEYS = ",".join(f"user-{n:02d}:{key}" for n, key in enumerate(KEYS))


def bundled_cli() -> str:
    import claude_agent_sdk

    return str(Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude")


async def ignore(_event: object) -> None:
    pass


async def one_shot(client: httpx.AsyncClient, key: str) -> float:
    started = time.perf_counter()
    reply = await client.post("/run", json={"prompt": PROMPT}, headers={"x-api-key": key})
    elapsed = time.perf_counter() - started
    if reply.status_code != 200 or not reply.json().get("success"):
        raise RuntimeError(f"one-shot failed: {reply.status_code} {reply.text[:200]}")
    return elapsed


async def pool_ready(client: httpx.AsyncClient, timeout: float = 120) -> None:
    """Until ``/health`` shows every worker for anyone ready (both services' shape)."""
    with trio.fail_after(timeout):
        while True:
            workers = (await client.get("/health")).json()["workers"]
            if workers["total"] > 0 and workers["ready"] == workers["total"]:
                return
            await trio.sleep(0.05)


async def one_shots(
    client: httpx.AsyncClient,
    cpu: TreeCpuSampler,
    keys: list[str],
    clients: int,
    *,
    paced: bool = False,
) -> tuple[list[float], float, float]:
    """``len(keys)`` one-shots (the n-th with ``keys[n]``) from ``clients`` clients, from a
    ready pool until it is ready again: (latencies, wall s, CPU s of the service's tree).

    ``paced``: each one-shot is sent once the pool is ready again (the service idle between
    requests, issue 24's shape); else each follows the previous answer at once (back to back:
    on 2 CPUs, the warm-ups of the replacements then share the CPU with the next requests)."""
    todo = iter(keys)
    latencies: list[float] = []

    async def client_loop() -> None:
        for key in todo:
            if paced:
                await pool_ready(client)
            latencies.append(await one_shot(client, key))

    cpu_before = cpu.total()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client_loop)
    wall = time.perf_counter() - started
    await pool_ready(client)  # the replacements' warm-ups count
    return latencies, wall, cpu.total() - cpu_before


async def sessions(client: httpx.AsyncClient, key: str, count: int, turns: int, tag: str):
    firsts, laters = [], []
    headers = {"x-api-key": key}
    for n in range(count):
        session_id = f"bench-{tag}-{n}"
        for turn in range(turns):
            started = time.perf_counter()
            reply = await client.post(
                "/run", json={"prompt": PROMPT, "sessionId": session_id}, headers=headers
            )
            elapsed = time.perf_counter() - started
            if reply.status_code != 200 or not reply.json().get("success"):
                raise RuntimeError(f"session turn failed: {reply.status_code} {reply.text[:200]}")
            (firsts if turn == 0 else laters).append(elapsed)
        await client.request("DELETE", "/session", json={"sessionId": session_id}, headers=headers)
    return firsts, laters


async def measure(
    side: str,
    build: OriginalBuild | None,
    env: dict[str, str],
    workdir: Path,
    args: argparse.Namespace,
    tables: dict[str, SideBySide],
    round_no: int,
    shares: list[float],
) -> None:
    async with launch(side, build, env, workdir, start_timeout_s=120) as service:
        cpu = TreeCpuSampler(service.pid)
        meter = QuietMeter(samplers=[cpu])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cpu.run)
            await measure_service(service.url, side, cpu, args, tables, round_no)
            nursery.cancel_scope.cancel()
        # Before the stop: this process reaps the service then, and counts its tree's CPU
        # among its children's, which the sampler counted already.
        line, share = meter.report()
        await service.stop()
        print(f"  round {round_no + 1}, {side}:{line}")
        shares.append(share)


async def measure_service(
    url: str,
    side: str,
    cpu: TreeCpuSampler,
    args: argparse.Namespace,
    tables: dict[str, SideBySide],
    round_no: int,
) -> None:
    # Idle connections are dropped before the services' own keep-alive timeouts (5 s, both)
    # close them: a request sent on one the server is closing fails, whichever service.
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await pool_ready(client)
        await one_shot(client, KEYS[-1])  # untimed: first-request costs on both sides
        await pool_ready(client)
        unused = iter(KEYS[: USERS - 1])
        for shape, table in tables.items():
            if shape == "sessions":
                continue

            def keys(count: int, shape: str = shape) -> list[str]:
                if shape == "one user":
                    return [KEYS[0]] * count
                return [next(unused) for _ in range(count)]

            lat, _, used = await one_shots(client, cpu, keys(args.requests), 1)
            table.add("one-shot p50, sequential", "s", side, round_no, percentile(lat, 50))
            table.add("one-shot p99, sequential", "s", side, round_no, percentile(lat, 99))
            table.add("CPU per one-shot, sequential", "s", side, round_no, used / len(lat))
            lat, _, _ = await one_shots(client, cpu, keys(args.requests), 1, paced=True)
            table.add(
                "one-shot p50, pool ready before each", "s", side, round_no, percentile(lat, 50)
            )
            table.add(
                "one-shot p99, pool ready before each", "s", side, round_no, percentile(lat, 99)
            )
            count = args.clients * args.per_client
            lat, wall, used = await one_shots(client, cpu, keys(count), args.clients)
            rate = f"one-shots/s, {args.clients} clients"
            table.add(rate, "/s", side, round_no, count / wall)
            table.add(
                f"CPU per one-shot, {args.clients} clients", "s", side, round_no, used / count
            )
        # Sessions on a settled service, as the other phases start: the pool ready and the
        # agents kept for the last users retired (AGENT_REUSE_S=5), so that neither the
        # replacements' warm-ups nor the retirements of the phases before run in their turns.
        await pool_ready(client)
        await trio.sleep(SETTLE_S)
        firsts, laters = await sessions(
            client, KEYS[0], args.sessions, args.turns, f"{side}-{round_no}"
        )
        table = tables["sessions"]
        table.add("a session's first turn p50", "s", side, round_no, statistics.median(firsts))
        table.add("later session turns p50", "s", side, round_no, statistics.median(laters))


async def warm_agent_turns(env: dict[str, str], workdir: Path, turns: int) -> list[float]:
    """The in-run baseline: turns straight on a warm agent, as the service makes them."""
    async with model_proxy(env) as proxy:
        _, new_agent = await trio.to_thread.run_sync(service_agents, env, proxy)
        agent = new_agent(AgentSpec("baseline", workdir / "baseline", ephemeral=True))
        await agent.start(60)
        try:
            await checked_turn(agent)  # untimed
            times = []
            for _ in range(turns):
                started = time.perf_counter()
                await checked_turn(agent)
                times.append(time.perf_counter() - started)
            return times
        finally:
            await agent.close()


async def sandbox_cost(api_url: str, workdir: Path, args: argparse.Namespace) -> list[str]:
    """Agent starts and warm turns with AGENT_SANDBOX=auto and off, interleaved."""
    figures: dict[str, dict[str, list[float]]] = {}
    factories = {}
    async with AsyncExitStack() as stack:
        for mode in ("auto", "off"):
            env = real_cli_env(api_url, workdir / f"sandbox-{mode}", AGENT_SANDBOX=mode)
            proxy = await stack.enter_async_context(model_proxy(env))
            _, factories[mode] = await trio.to_thread.run_sync(service_agents, env, proxy)
            figures[mode] = {"start": [], "start cpu": [], "turn": [], "rss": []}
        await sandbox_rounds(factories, figures, workdir, args)
    return sandbox_table(factories, figures)


async def sandbox_rounds(factories, figures, workdir: Path, args: argparse.Namespace) -> None:
    """Agents started and given turns in each sandbox mode, interleaved."""
    for n in range(args.sandbox_starts):
        for mode in ("auto", "off") if n % 2 == 0 else ("off", "auto"):
            home = workdir / f"sandbox-{mode}" / "agents" / str(n)
            agent = factories[mode](AgentSpec(f"sandbox-{n}", home, ephemeral=True))
            started = time.perf_counter()
            await agent.start(60)
            figures[mode]["start"].append(time.perf_counter() - started)
            cpu, rss = group_usage(agent.pid)
            figures[mode]["start cpu"].append(cpu)
            figures[mode]["rss"].append(rss / 1024)
            for _ in range(args.sandbox_turns):
                started = time.perf_counter()
                await checked_turn(agent)
                figures[mode]["turn"].append(time.perf_counter() - started)
            await agent.close()


def sandbox_table(factories, figures) -> list[str]:
    sandboxed = {mode: factory.launcher.sandboxed for mode, factory in factories.items()}
    lines = [
        f"| AGENT_SANDBOX | sandboxed | agent start p50 | start CPU p50 | RSS warm"
        f" | turn on a warm agent p50 (n={len(figures['auto']['turn'])}) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("auto", "off"):
        f = figures[mode]
        lines.append(
            f"| {mode} | {sandboxed[mode]} | {statistics.median(f['start']):.3f} s"
            f" | {statistics.median(f['start cpu']):.3f} s | {statistics.median(f['rss']):.0f} MiB"
            f" | {statistics.median(f['turn']):.3f} s |"
        )
    auto, off = figures["auto"], figures["off"]
    lines.append(
        f"| auto − off | | {statistics.median(auto['start']) - statistics.median(off['start']):+.3f} s"
        f" | {statistics.median(auto['start cpu']) - statistics.median(off['start cpu']):+.3f} s"
        f" | {statistics.median(auto['rss']) - statistics.median(off['rss']):+.0f} MiB"
        f" | {statistics.median(auto['turn']) - statistics.median(off['turn']):+.3f} s |"
    )
    return lines


async def main(args: argparse.Namespace) -> None:
    print("\n".join(machine_lines()))
    build = await trio.to_thread.run_sync(prepare)
    version = (Path(bundled_cli()).parent / "claude.version").read_text().split()[0]
    print("\n".join(header_lines(build, f"the SDK's bundled CLI {version} (ours too)")))
    sides = sides_of(build)
    original = build if isinstance(build, OriginalBuild) else None
    tables = {name: SideBySide() for name in ("one user", "every user", "sessions")}
    shares: list[float] = []
    baseline: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-real-cli-vs-") as tmp:
        workdir = Path(tmp)
        async with open_mock_api() as api:
            section(
                f"1-3. {args.rounds} interleaved rounds: POOL_SIZE=2 {args.ours_env or ''},"
                f" {args.requests} one-shots"
                f" one at a time and {args.clients} x {args.per_client} from {args.clients}"
                f" clients per load shape, {args.sessions} sessions x {args.turns} turns"
            )
            for round_no, order in enumerate(round_orders(args.rounds, sides)):
                env = real_cli_env(api.url, workdir / f"baseline-{round_no}")
                baseline += await warm_agent_turns(env, workdir / f"r{round_no}", args.turns)
                for side in order:
                    side_dir = workdir / f"r{round_no}-{side}"
                    extra = {"POOL_SIZE": "2", "API_KEYS": API_KEYS}
                    if side == ORIGINAL:
                        extra["CLAUDE_EXECUTABLE"] = bundled_cli()
                    else:
                        extra.update(args.ours_env)
                    env = real_cli_env(api.url, side_dir, **extra)
                    await measure(side, original, env, side_dir, args, tables, round_no, shares)
            section("4. the sandbox's cost (ours, agents made as the service makes them)")
            meter = QuietMeter()
            sandbox = await sandbox_cost(api.url, workdir, args)
            line, share = meter.report()
            shares.append(share)
    if OURS not in sides:
        return
    base = statistics.median(baseline)
    print(
        f"\nin-run baseline: a turn sent straight to a warm agent (the SDK, no service),"
        f" p50 {base:.3f} s (n={len(baseline)})"
    )
    for name, title in (
        ("one user", "one user's requests (all one key)"),
        ("every user", f"every one-shot from another user ({USERS} keys)"),
        ("sessions", "sessions (one user)"),
    ):
        print(f"\n{title}")
        print("\n".join(tables[name].table()))
    print("\nthe sandbox (AGENT_SANDBOX=auto against off)")
    print("\n".join(sandbox))
    print(line)
    print("\n" + quiet_verdict(shares))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--requests", type=int, default=12, help="sequential one-shots a shape")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=6, help="one-shots each client sends")
    parser.add_argument("--sessions", type=int, default=3)
    # 3 x 12: 33 later turns a round (at ~0.05 s each, cheap), where 3 x 4 gave 9 and a
    # round's p50 of them moved with any one turn.
    parser.add_argument("--turns", type=int, default=12, help="turns per session (and baseline)")
    parser.add_argument("--sandbox-starts", type=int, default=4, help="agents a sandbox mode")
    parser.add_argument("--sandbox-turns", type=int, default=3, help="turns on each of them")
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for our service in phases 1-3 (e.g. AGENT_SANDBOX=off); repeatable",
    )
    args = parser.parse_args()
    args.ours_env = dict(item.split("=", 1) for item in args.ours_env)
    if 2 * args.requests + args.clients * args.per_client > USERS - 1:
        parser.error(f"every-user requests must stay within {USERS - 1} users")
    return args


if __name__ == "__main__":
    trio.run(main, parse_args())
