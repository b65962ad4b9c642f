#!/usr/bin/env python3
"""Benchmark of multi-turn sessions: memory per hibernated session, wake-up time, one session's rate.

Prints figures; it is not a test. Everything runs on 127.0.0.1 against the fake
CLI ``tests/fake_claude.py``; no network, no Claude credentials. The service is
the real one (``python -m claude_code_api``, PORT=0) with MAX_LIVE_SESSIONS=4.

    .venv/bin/python bench/bench_sessions.py           # defaults: about 1.5-2.5 minutes
    .venv/bin/python bench/bench_sessions.py --help

Phases, all in one run:

0. agent warm-up, directly (an agent made as the service makes them:
   ``tests.harness.service_agents``): ``start()`` of a new conversation (``--session-id``), one turn, close;
   then ``start()`` resuming it (``--resume``, what a wake does), one turn, close.
1. memory of hibernated sessions, in the service's RSS (VmRSS of its pid; the
   agent processes are separate and not counted):
   a. control: a service on an EMPTY database, started and settled, vs the service
      on a database pre-populated with --records records (user ``bulk``, written
      with ``SqliteSessionTable.save(new_session_record(...))`` before start-up): what a
      record costs while it sits hibernated in SQLite;
   b. --rounds rounds of --http-sessions real sessions (user ``api``), one turn each,
      --concurrency at once: each starts a Claude Code process; with 4 live slots
      the scheduler hibernates the least-recently-used, and SESSION_IDLE_MS the
      rest. RSS after start-up + warm-up (baseline), then after each round once
      every session is hibernated; growth / sessions = bytes per hibernated session;
   c. ``GET /status`` for ``bulk`` (lists all --records records): RSS before/after.
   Every RSS is "settled": the service is poked with cheap requests (so its GC
   generations run), then sampled until three readings agree.
2. wake: --wake-samples sessions (user ``wake``) each had one turn and were
   hibernated; the next turn is timed (wake), then one more right after (live).
   a. with a free live slot (every other session hibernated first), each wake
      preceded by the same done directly (Agent resume start + turn), so both
      are timed under the same machine load;
   b. with all 4 slots held by idle sessions (the wake first hibernates the LRU one).
3. one live session: sequential turns on one sessionId for --duration seconds.

With ``--original``, it instead measures ours side by side with the original
(exitxio/claude-code-api, prepared by ``bench/original.py``), the same fake CLI,
in interleaved rounds: --vs-sessions sessions x --vs-turns turns from
--vs-clients clients (ours with MAX_LIVE_SESSIONS = --vs-sessions; the original
has a fixed 20), turn by turn across the sessions (every session's first turn,
then every session's second, ...): the first turn of a session (it starts the
session's agent) and the later ones (live), then a table of ours, the original
and the ratio.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from bench import bare_http  # noqa: E402
from bench.original import (  # noqa: E402
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
    dist,
    fmt_dist,
    machine_lines,
    quiet_verdict,
    section,
)
from claude_code_api.agent import AgentSpec  # noqa: E402
from claude_code_api.messages import SessionKey  # noqa: E402
from claude_code_api.store import new_session_record, open_store  # noqa: E402
from tests.harness import (  # noqa: E402
    FAKE_CLAUDE,
    RunningService,
    launch_service,
    proc_memory_kib,
    service_agents,
    wait_pool_ready,
)
from tests.harness import service_env as harness_env  # noqa: E402

KEYS = {"api": "sk-bench-api", "bulk": "sk-bench-bulk", "wake": "sk-bench-wake"}
AUTH = {user: {"x-api-key": key} for user, key in KEYS.items()}
API_KEYS = ",".join(f"{user}:{key}" for user, key in KEYS.items())
PROMPT = "What is 2+2?"
LIVE_STATES = {"live", "busy", "starting", "stopping", "waiting"}
# Bounds on every wait, so the script always stops by itself.
SERVICE_START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0
HIBERNATE_TIMEOUT_S = 60.0
RETRIES_429 = 200


def fmt_table(name: str, d: dict[str, float]) -> str:
    return fmt_dist(name, d, width=40, decimals=2)


def fmt_mem(m: dict[str, int]) -> str:
    return (
        f"VmRSS {m['VmRSS'] / 1024:8.2f} MiB (anon {m['RssAnon'] / 1024:7.2f}, "
        f"file {m['RssFile'] / 1024:6.2f}; HWM {m['VmHWM'] / 1024:7.2f})"
    )


# --- 0. direct agent warm-up ------------------------------------------------------


class Direct:
    """Session agents made as the service makes them (tests.harness.service_agents)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.settings, self.make_agent = service_agents(env)

    def spec(self, home: Path, *, session_id: str | None = None, resume: str | None = None):
        return AgentSpec(
            name=home.name, home=home, ephemeral=False, session_id=session_id, resume=resume
        )

    async def start_and_turn(self, spec: AgentSpec) -> tuple[float, float]:
        """Agent.start(), one turn, close: (start seconds, turn seconds)."""

        async def ignore(_event) -> None:
            pass

        agent = self.make_agent(spec)
        try:
            started = time.perf_counter()
            await agent.start(self.settings.warmup_timeout_s)
            start_s = time.perf_counter() - started
            started = time.perf_counter()
            with trio.fail_after(HTTP_TIMEOUT_S):
                result = await agent.run_turn(PROMPT, ignore)
            if result.is_error:
                raise RuntimeError(f"direct turn failed: {result}")
            return start_s, time.perf_counter() - started
        finally:
            await agent.close()


async def timed_direct_turn(agent) -> float:
    """One turn on ``agent`` (started), timed."""

    async def ignore(_event) -> None:
        pass

    started = time.perf_counter()
    with trio.fail_after(HTTP_TIMEOUT_S):
        result = await agent.run_turn(PROMPT, ignore)
    if result.is_error:
        raise RuntimeError(f"direct turn failed: {result}")
    return time.perf_counter() - started


async def measure_agent(direct: Direct, workdir: Path, runs: int) -> dict[str, list[float]]:
    """Agent.start() new / resumed, and the turn after each, as a session actor does them."""
    out: dict[str, list[float]] = {"new": [], "first_turn": [], "resume": [], "resumed_turn": []}
    for i in range(runs):
        home = workdir / f"agent-{i}"
        claude_id = str(uuid.uuid4())
        for kind, spec in (
            ("new", direct.spec(home, session_id=claude_id)),
            ("resume", direct.spec(home, resume=claude_id)),
        ):
            start_s, turn_s = await direct.start_and_turn(spec)
            out[kind].append(start_s)
            out["first_turn" if kind == "new" else "resumed_turn"].append(turn_s)
    return out


# --- the service --------------------------------------------------------------------


def client_of(service: RunningService, connections: int = 4) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return service.client(timeout=HTTP_TIMEOUT_S, limits=limits)


async def wait_ready(client: httpx.AsyncClient) -> None:
    await wait_pool_ready(client, timeout=READY_TIMEOUT_S)


async def settled_mem(
    client: httpx.AsyncClient, pid: int, *, tolerance_kib: int = 16, max_samples: int = 12
) -> tuple[dict[str, int], list[int]]:
    """RSS once it stops moving: poke the service (allocations make its GC run), then sample.

    Returns the last reading and every VmRSS read (KiB); settled = the last three
    within ``tolerance_kib``, or ``max_samples`` readings.
    """
    readings: list[dict[str, int]] = []
    for _ in range(max_samples):
        for _ in range(40):
            await client.get("/health")
        await trio.sleep(0.25)
        readings.append(proc_memory_kib(pid))
        last = [r["VmRSS"] for r in readings[-3:]]
        if len(last) == 3 and max(last) - min(last) <= tolerance_kib:
            break
    return readings[-1], [r["VmRSS"] for r in readings]


async def sessions_of(client: httpx.AsyncClient, user: str) -> list[dict]:
    """``user``'s sessions, most recent first: /status lists up to 1000 a page."""
    response = await client.get("/status", params={"limit": 1000}, headers=AUTH[user])
    response.raise_for_status()
    return response.json()["sessions"]


async def wait_all_hibernated(
    client: httpx.AsyncClient, user: str, expected: int | None = None
) -> float:
    """Poll /status until none of ``user``'s sessions is live; returns the time waited."""
    started = time.perf_counter()
    with trio.fail_after(HIBERNATE_TIMEOUT_S):
        while True:
            sessions = await sessions_of(client, user)
            live = [s for s in sessions if s["state"] in LIVE_STATES]
            if not live and (expected is None or len(sessions) >= expected):
                return time.perf_counter() - started
            await trio.sleep(0.1)


async def live_count(client: httpx.AsyncClient, user: str) -> int:
    return sum(1 for s in await sessions_of(client, user) if s["state"] in LIVE_STATES)


async def bare_post_round_trips(env: dict[str, str], samples: int) -> dict[str, float]:
    """``samples`` session-turn POSTs (after 10) to hypercorn with nothing behind it."""
    async with bare_http.serving(env) as bare:
        async with httpx.AsyncClient(base_url=bare.url, timeout=60) as client:
            times = []
            for i in range(samples + 10):
                started = time.perf_counter()
                response = await client.post(
                    "/run", json={"prompt": PROMPT, "sessionId": "one-live"}, headers=AUTH["wake"]
                )
                if i >= 10:
                    times.append(time.perf_counter() - started)
                response.raise_for_status()
    return dist(times)


async def session_turn(
    client: httpx.AsyncClient, user: str, session_id: str, prompt: str = PROMPT
) -> tuple[float, int]:
    """One turn; returns (seconds, 429s retried). Raises on anything but success."""
    retried = 0
    while True:
        started = time.perf_counter()
        response = await client.post(
            "/run", json={"prompt": prompt, "sessionId": session_id}, headers=AUTH[user]
        )
        elapsed = time.perf_counter() - started
        if response.status_code == 429 and retried < RETRIES_429:
            retried += 1
            await trio.sleep(0.02)
            continue
        body = response.json()
        if response.status_code != 200 or body.get("success") is not True:
            raise RuntimeError(f"turn {user}/{session_id}: {response.status_code} {body}")
        return elapsed, retried


async def drive_sessions(
    client: httpx.AsyncClient, user: str, ids: list[str], concurrency: int
) -> dict:
    """One turn on each session id, ``concurrency`` at once."""
    latencies: list[float] = []
    retried = 0
    send, receive = trio.open_memory_channel[str](len(ids))
    for session_id in ids:
        send.send_nowait(session_id)
    send.close()

    async def runner() -> None:
        nonlocal retried
        async for session_id in receive:
            elapsed, r = await session_turn(client, user, session_id, f"My name is {session_id}.")
            latencies.append(elapsed)
            retried += r

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(runner)
    return {"latencies": latencies, "retried": retried, "wall": time.perf_counter() - started}


# --- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--records",
        type=int,
        default=10_000,
        help="hibernated records pre-populated in SQLite (default 10000)",
    )
    parser.add_argument(
        "--http-sessions",
        type=int,
        default=200,
        help="real sessions per round, one turn each (default 200)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of those (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="concurrent clients driving sessions (default 8)"
    )
    parser.add_argument(
        "--wake-samples",
        type=int,
        default=20,
        help="sessions woken in each wake phase (default 20)",
    )
    parser.add_argument(
        "--warmups", type=int, default=20, help="direct agent warm-ups timed (default 20)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of sequential turns on one live session (default 10)",
    )
    parser.add_argument("--max-live", type=int, default=4, help="MAX_LIVE_SESSIONS (default 4)")
    vs = add_side_by_side_arguments(parser)
    vs.add_argument(
        "--vs-sessions",
        type=int,
        default=20,
        help="sessions per round and side (default 20, the original's most; also ours' "
        "MAX_LIVE_SESSIONS)",
    )
    vs.add_argument("--vs-turns", type=int, default=5, help="turns per session (default 5)")
    vs.add_argument("--vs-clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument(
        "--idle-ms",
        type=int,
        default=1500,
        help="SESSION_IDLE_MS: how soon an idle session hibernates (default 1500)",
    )
    args = parser.parse_args()
    if args.original and not 1 <= args.vs_sessions <= ORIGINAL_MAX_SESSIONS:
        parser.error(
            f"--vs-sessions: the original holds at most {ORIGINAL_MAX_SESSIONS} sessions "
            f"(the next one is a 500)"
        )
    return args


async def main(args: argparse.Namespace) -> None:
    run_started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    try:
        if args.original:
            await run_side_by_side(args, workdir, run_started)
        else:
            await run(args, workdir, run_started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- side by side with the original (--original) ------------------------------------------

# The original's session map is fixed at this many (session-manager.ts, MAX_SESSIONS).
ORIGINAL_MAX_SESSIONS = 20


def vs_env(workdir: Path, sessions: int, clients: int) -> dict[str, str]:
    """The same environment for either side (the original ignores what it does not know).

    SESSION_IDLE_MS stays at its default (30 min, as the original's idle clean-up).
    """
    overrides = {
        "API_KEYS": API_KEYS,
        "MAX_LIVE_SESSIONS": str(sessions),
        "QUEUE_MAX": str(max(20, 2 * clients)),
    }
    return harness_env(workdir, overrides, record_pids=False)


async def vs_turn(client: httpx.AsyncClient, session_id: str, prompt: str) -> tuple[float, str]:
    """One turn of user ``api``'s session; (seconds, its output). Raises unless success."""
    started = time.perf_counter()
    response = await client.post(
        "/run", json={"prompt": prompt, "sessionId": session_id}, headers=AUTH["api"]
    )
    elapsed = time.perf_counter() - started
    body = response.json()
    if response.status_code != 200 or body.get("success") is not True:
        raise RuntimeError(f"turn {session_id}: {response.status_code} {body}")
    return elapsed, str(body["output"])


async def vs_round(
    service: RunningService, ids: list[str], turns: int, clients: int
) -> dict[str, list[float] | int]:
    """``turns`` turns on every session of ``ids``, turn by turn across them, ``clients``
    at once; each answer checked (the sessions remember the name told in their first)."""
    first: list[float] = []
    live: list[float] = []
    wrong = 0
    async with client_of(service, clients + 2) as client:
        for turn in range(turns):
            send, receive = trio.open_memory_channel[str](len(ids))
            for session_id in ids:
                send.send_nowait(session_id)
            send.close()

            async def runner(turn: int = turn, receive=receive) -> None:
                nonlocal wrong
                async for session_id in receive:
                    if turn == 0:
                        prompt, expected = (
                            f"My name is {session_id}.",
                            f"Nice to meet you, {session_id}.",
                        )
                    else:
                        prompt, expected = "What is my name?", f"Your name is {session_id}."
                    elapsed, output = await vs_turn(client, session_id, prompt)
                    (first if turn == 0 else live).append(elapsed)
                    wrong += output != expected

            with trio.fail_after(HIBERNATE_TIMEOUT_S + len(ids) * HTTP_TIMEOUT_S / clients):
                async with trio.open_nursery() as nursery:
                    for _ in range(clients):
                        nursery.start_soon(runner)
    return {"first": first, "live": live, "wrong": wrong}


async def vs_close(service: RunningService, ids: list[str]) -> collections.Counter[int]:
    """``DELETE /session`` for each id; the statuses answered."""
    statuses: collections.Counter[int] = collections.Counter()
    async with client_of(service) as client:
        for session_id in ids:
            response = await client.request(
                "DELETE", "/session", json={"sessionId": session_id}, headers=AUTH["api"]
            )
            statuses[response.status_code] += 1
    return statuses


async def run_side_by_side(args: argparse.Namespace, workdir: Path, run_started: float) -> None:
    section("machine")
    print("\n".join(machine_lines()))
    print(f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via {sys.executable} (both sides)")
    build = prepare(args.original_repo)
    print("\n".join(header_lines(build)))
    print(
        f"  arguments:       rounds={args.vs_rounds} sessions={args.vs_sessions} "
        f"turns={args.vs_turns} clients={args.vs_clients}; ours: "
        f"MAX_LIVE_SESSIONS={args.vs_sessions}, POOL_SIZE=1 (both)"
    )
    sides = sides_of(build)
    original = build if isinstance(build, OriginalBuild) else None
    table = SideBySide()
    first_figure = "first turn of a session p50 (starts its agent)"
    live_figure = (
        f"live session turn p50 ({args.vs_sessions} sessions x {args.vs_turns} turns, "
        f"{args.vs_clients} clients)"
    )
    section(
        f"{args.vs_rounds} interleaved rounds: {args.vs_sessions} sessions x {args.vs_turns} "
        f"turns, {args.vs_clients} clients, then DELETE /session for each"
    )
    beyond: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        services: dict[str, RunningService] = {}
        for side in sides:
            where = workdir / side
            env = vs_env(where, args.vs_sessions, args.vs_clients)
            services[side] = await stack.enter_async_context(
                launch(side, original, env, where, start_timeout_s=SERVICE_START_TIMEOUT_S)
            )
        for service in services.values():
            async with client_of(service) as client:
                await wait_ready(client)
        meter = QuietMeter(trees=[s.pid for s in services.values()])
        for r, order in enumerate(round_orders(args.vs_rounds, sides)):
            for side in order:
                service = services[side]
                ids = [f"vs{r}-{side}-{i:02d}" for i in range(args.vs_sessions)]
                done = await vs_round(service, ids, args.vs_turns, args.vs_clients)
                first, live = dist(done["first"]), dist(done["live"])
                table.add(first_figure, "ms", side, r, first["p50"])
                table.add(live_figure, "ms", side, r, live["p50"])
                if r == args.vs_rounds - 1:
                    # One session more than the original holds, while all of these are open.
                    async with client_of(service) as client:
                        response = await client.post(
                            "/run",
                            json={"prompt": "What is 2+2?", "sessionId": f"vs-extra-{side}"},
                            headers=AUTH["api"],
                        )
                    body = response.json()
                    said = body.get("error") or f"success: {body.get('success')}"
                    beyond[side] = f"{response.status_code} ({said})"
                    ids.append(f"vs-extra-{side}")
                closed = await vs_close(service, ids)
                print(
                    f"  round {r + 1} {side:<8}  first turn p50 {first['p50']:7.2f} ms "
                    f"(p90 {first['p90']:7.2f}) | live turn p50 {live['p50']:6.2f} ms "
                    f"(p90 {live['p90']:6.2f}, n={live['n']}) | wrong answers "
                    f"{done['wrong']} | DELETE /session {dict(closed)}"
                )
        line, share = meter.report()
        print(line)
        for service in services.values():
            await service.stop(timeout_s=STOP_TIMEOUT_S)

    section("side by side: ours vs the original")
    print("\n".join(table.table()))
    if beyond:
        print(
            f"\n  session number {args.vs_sessions + 1} while {args.vs_sessions} are open (ours: "
            f"MAX_LIVE_SESSIONS={args.vs_sessions}; the original: {ORIGINAL_MAX_SESSIONS} at most): "
            + "; ".join(f"{side}: {answer}" for side, answer in beyond.items())
        )
    print(
        "  Notes:"
        "\n  * the original has no MAX_LIVE_SESSIONS: it keeps every session's process until"
        f"\n    30 min idle or DELETE /session and answers 500 past {ORIGINAL_MAX_SESSIONS} sessions;"
        "\n    ours keeps MAX_LIVE_SESSIONS processes and hibernates the least recently used."
        "\n  * ours writes each turn's session record to SQLite (committed before the answer);"
        "\n    the original keeps sessions in memory only (lost on restart)."
        "\n  * the original's session ids are global (any key holder reaches any session);"
        "\n    ours are scoped to the user. One user here, so both see the same ids."
        "\n  * a session's first turn starts its agent on both; the original also sends it a"
        '\n    warm-up prompt ("hi": a model turn) before the first real one.'
    )
    if original is None:
        print(f"  {build}")
    print(
        f"{quiet_verdict([share])}; nproc={os.cpu_count()}; "
        f"run took {time.perf_counter() - run_started:.0f} s"
    )


def service_env(args: argparse.Namespace, workdir: Path, data_dir: Path) -> dict[str, str]:
    overrides = {
        "API_KEYS": API_KEYS,
        "MAX_LIVE_SESSIONS": str(args.max_live),
        "SESSION_IDLE_MS": str(args.idle_ms),
        # Room for every client's session to wait for a live slot without a 429.
        "QUEUE_MAX": str(max(20, 2 * args.concurrency)),
        # Every session here is one user's: room for all of them (the default is 100).
        "MAX_SESSIONS_PER_USER": str(args.records + args.http_sessions * args.rounds + 100),
        "DATA_DIR": str(data_dir),
    }
    return harness_env(workdir, overrides, record_pids=False)


async def run(args: argparse.Namespace, workdir: Path, run_started: float) -> None:
    data_dir = workdir / "data"
    env = service_env(args, workdir, data_dir)
    # The SDK merges os.environ under the agent's env: the direct calls' fake uses it.
    os.environ["FAKE_CLAUDE_HOME"] = env["FAKE_CLAUDE_HOME"]
    for name in ("FAKE_CLAUDE_MODE", "FAKE_CLAUDE_MODE_FILE", "FAKE_CLAUDE_PIDDIR"):
        os.environ.pop(name, None)
    quiet: list[float] = []

    section("machine")
    print("\n".join(machine_lines()))
    print(
        f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via {shutil.which('python3') or '?'}"
    )
    print(
        f"  service:         MAX_LIVE_SESSIONS={args.max_live} SESSION_IDLE_MS={args.idle_ms} "
        f"POOL_SIZE=1 QUEUE_MAX={env['QUEUE_MAX']}"
    )
    print(
        f"  arguments:       records={args.records} http_sessions={args.http_sessions} "
        f"rounds={args.rounds} concurrency={args.concurrency} wake_samples={args.wake_samples} "
        f"warmups={args.warmups} duration={args.duration:g}s"
    )

    # --- 0 ---------------------------------------------------------------------------
    section("0. agent warm-up, direct (SdkAgent.start(): the service's launcher and options)")
    meter = QuietMeter()
    direct = Direct(env)
    agent = await measure_agent(direct, workdir / "direct", args.warmups)
    warm_new, warm_resume = dist(agent["new"]), dist(agent["resume"])
    print(fmt_table("start(), new (--session-id)", warm_new))
    print(fmt_table("first turn of it", dist(agent["first_turn"])))
    print(fmt_table("start(), resume (--resume), as a wake", warm_resume))
    print(fmt_table("first turn after resume", dist(agent["resumed_turn"])))
    line, share = meter.report()
    quiet.append(share)
    print(line)

    # --- 1a ------------------------------------------------------------------------------
    section(f"1a. {args.records} pre-populated hibernated records: service start-up RSS")
    control_dir = workdir / "control-data"
    control_env = service_env(args, workdir, control_dir)
    async with launch_service(control_env, start_timeout_s=SERVICE_START_TIMEOUT_S) as control:
        try:
            async with client_of(control) as client:
                await wait_ready(client)
                empty_mem, empty_reads = await settled_mem(client, control.pid)
        finally:
            await control.stop(timeout_s=STOP_TIMEOUT_S)
    print(f"  empty database:          {fmt_mem(empty_mem)}  reads KiB {empty_reads}")

    started = time.perf_counter()
    store = await trio.to_thread.run_sync(open_store, data_dir)
    try:

        def populate() -> int:
            now = time.time()
            for i in range(args.records):
                store.save(new_session_record(SessionKey("bulk", f"bulk-{i:06d}"), now - i))
            return store.count()

        count = await trio.to_thread.run_sync(populate)
    finally:
        store.close()
    db_bytes = sum(p.stat().st_size for p in data_dir.glob("sessions.sqlite3*"))
    print(
        f"  populated {count} records for user 'bulk' in {time.perf_counter() - started:.1f} s "
        f"(transcript_started=False); database {db_bytes / 1024:.0f} KiB"
    )

    async with launch_service(env, start_timeout_s=SERVICE_START_TIMEOUT_S) as service:
        code = None
        try:
            print(f"  service pid {service.pid} at {service.url}")
            async with client_of(service, args.concurrency + 2) as client:
                await wait_ready(client)
                start_mem, start_reads = await settled_mem(client, service.pid)
                print(
                    f"  {args.records} records:        {fmt_mem(start_mem)}  "
                    f"reads KiB {start_reads}"
                )
                records_delta = (start_mem["VmRSS"] - empty_mem["VmRSS"]) * 1024
                per_record = records_delta / max(1, args.records)
                print(
                    f"  difference: {records_delta / 1024:+.0f} KiB = {per_record:+.1f} "
                    f"bytes/record (two processes: noise of a few hundred KiB either way)"
                )

                # --- 1b --------------------------------------------------------------------
                section(
                    f"1b. {args.rounds} x {args.http_sessions} real sessions through HTTP "
                    f"({args.concurrency} at once), all hibernated after"
                )
                meter = QuietMeter(service.pid)
                for _ in range(20):
                    response = await client.post(
                        "/run", json={"prompt": PROMPT}, headers=AUTH["api"]
                    )
                    response.raise_for_status()
                    await wait_ready(client)
                warm_ids = [f"warmup-{i}" for i in range(2 * args.concurrency)]
                await drive_sessions(client, "api", warm_ids, args.concurrency)
                await drive_sessions(client, "api", warm_ids, args.concurrency)  # wake them
                await wait_all_hibernated(client, "api", len(warm_ids))
                base_mem, base_reads = await settled_mem(client, service.pid)
                print(f"  baseline (after 20 one-shot runs, {len(warm_ids)} sessions x 2 turns):")
                print(f"    {fmt_mem(base_mem)}  reads KiB {base_reads}")
                rounds = []
                prev = base_mem
                for r in range(args.rounds):
                    ids = [f"r{r}-s{i:05d}" for i in range(args.http_sessions)]
                    driven = await drive_sessions(client, "api", ids, args.concurrency)
                    waited = await wait_all_hibernated(
                        client, "api", len(warm_ids) + (r + 1) * args.http_sessions
                    )
                    after, reads = await settled_mem(client, service.pid)
                    d = dist(driven["latencies"])
                    grew = (after["VmRSS"] - prev["VmRSS"]) * 1024
                    grew_anon = (after["RssAnon"] - prev["RssAnon"]) * 1024
                    rounds.append((after, grew, grew_anon))
                    print(
                        f"  round {r + 1}: {args.http_sessions} sessions in {driven['wall']:.1f} s "
                        f"({args.http_sessions / driven['wall']:.1f} sessions/s, "
                        f"{driven['retried']} 429s retried); all hibernated {waited:.1f} s later"
                    )
                    print(fmt_table("    first turn of a new session", d))
                    print(f"    {fmt_mem(after)}  reads KiB {reads}")
                    print(
                        f"    this round: VmRSS {grew / 1024:+.0f} KiB = "
                        f"{grew / args.http_sessions:+.0f} bytes/session; RssAnon "
                        f"{grew_anon / 1024:+.0f} KiB = {grew_anon / args.http_sessions:+.0f} "
                        f"bytes/session"
                    )
                    prev = after
                sessions = await sessions_of(client, "api")
                states = collections.Counter(s["state"] for s in sessions)
                total_hib = args.rounds * args.http_sessions
                growth = (prev["VmRSS"] - base_mem["VmRSS"]) * 1024
                growth_anon = (prev["RssAnon"] - base_mem["RssAnon"]) * 1024
                per_session = growth / total_hib
                print(f"  /status for 'api' lists {len(sessions)} sessions: {dict(states)}")
                print(
                    f"  total: VmRSS {growth / 1024:+.0f} KiB over {total_hib} sessions = "
                    f"{per_session:+.0f} bytes/session ({per_session / 1024:+.2f} KiB); "
                    f"RssAnon {growth_anon / total_hib:+.0f} bytes/session"
                )
                print(f"  VmHWM (peak RSS while sessions ran) {prev['VmHWM'] / 1024:.1f} MiB")
                line, share = meter.report()
                quiet.append(share)
                print(line)

                # --- 1c --------------------------------------------------------------------
                section(f"1c. GET /status for the user with {args.records} hibernated records")
                before = prev
                status_mem = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    response = await client.get("/status", headers=AUTH["bulk"])
                    elapsed = time.perf_counter() - t0
                    right_after = service.memory_kib()
                    listed = len(response.json()["sessions"])
                    status_mem.append(right_after)
                    print(
                        f"  /status: {listed} sessions, {len(response.content) / 1024:.0f} KiB "
                        f"of JSON in {elapsed * 1000:.0f} ms; right after: {fmt_mem(right_after)}"
                    )
                after_status, reads = await settled_mem(client, service.pid)
                print(f"  settled after: {fmt_mem(after_status)}  reads KiB {reads}")
                status_delta = (after_status["VmRSS"] - before["VmRSS"]) * 1024
                print(f"  before the calls: {fmt_mem(before)}")
                growth_2_3 = (status_mem[2]["VmRSS"] - status_mem[0]["VmRSS"]) * 1024
                print(
                    f"  retained after 3 calls: {status_delta / 1024:+.0f} KiB "
                    f"(= {status_delta / max(1, args.records):+.1f} bytes/record); calls 2-3 "
                    f"added {growth_2_3 / 1024:+.0f} KiB: the allocator keeps the high-water "
                    f"mark of one listing (records + JSON), nothing stays per record"
                )

                # --- 2 ---------------------------------------------------------------------
                section(f"2. wake a hibernated session ({args.wake_samples} sessions, user 'wake')")
                meter = QuietMeter(service.pid)
                ids = [f"wake-{i:03d}" for i in range(args.wake_samples)]
                first = []
                for session_id in ids:
                    first.append((await session_turn(client, "wake", session_id))[0])
                await wait_all_hibernated(client, "wake", len(ids))
                # The same wake done directly (resume + turn), right before each, so that
                # both see the same machine load.
                direct_home = workdir / "direct-wake"
                direct_id = str(uuid.uuid4())
                await direct.start_and_turn(direct.spec(direct_home, session_id=direct_id))
                resume_spec = direct.spec(direct_home, resume=direct_id)
                wake_free, live_free, direct_start, direct_turn = [], [], [], []
                for session_id in ids:
                    await wait_all_hibernated(client, "wake")
                    start_s, turn_s = await direct.start_and_turn(resume_spec)
                    direct_start.append(start_s)
                    direct_turn.append(turn_s)
                    wake_free.append((await session_turn(client, "wake", session_id))[0])
                    live_free.append((await session_turn(client, "wake", session_id))[0])
                await wait_all_hibernated(client, "wake")
                fillers = [f"filler-{i}" for i in range(args.max_live)]
                for session_id in fillers:
                    await session_turn(client, "wake", session_id)
                wake_full, live_full, not_full = [], [], 0
                for session_id in ids:
                    full = await live_count(client, "wake") >= args.max_live
                    wake_s = (await session_turn(client, "wake", session_id))[0]
                    live_s = (await session_turn(client, "wake", session_id))[0]
                    if full:
                        wake_full.append(wake_s)
                        live_full.append(live_s)
                    else:
                        not_full += 1
                wf, lf = dist(wake_free), dist(live_free)
                print(fmt_table("first turn of a new session (reference)", dist(first)))
                print("  a. a free live slot:")
                print(fmt_table("wake turn (hibernated -> answer)", wf))
                print(fmt_table("live turn (the next one)", lf))
                ds, dt = dist(direct_start), dist(direct_turn)
                both = dist([a + b for a, b in zip(direct_start, direct_turn, strict=True)])
                print("     the same, directly, interleaved with those (same machine load):")
                print(fmt_table("direct Agent.start(), resume", ds))
                print(fmt_table("direct turn after it", dt))
                print(fmt_table("direct resume start + turn", both))
                print(
                    f"  b. all {args.max_live} slots held by idle sessions (LRU hibernated first):"
                )
                print(fmt_table("wake turn", dist(wake_full)))
                print(fmt_table("live turn", dist(live_full)))
                if not_full:
                    print(f"     ({not_full} samples left out: a slot had freed by idle timeout)")
                print(
                    f"  wake p50 {wf['p50']:.1f} ms vs direct resume start + turn p50 "
                    f"{both['p50']:.1f} ms: the service adds {wf['p50'] - both['p50']:+.1f} ms "
                    f"to a wake (phase 0, quieter: warm-up p50 {warm_resume['p50']:.1f} ms)"
                )
                line, share = meter.report()
                quiet.append(share)
                print(line)

                # --- 3 ---------------------------------------------------------------------
                section(f"3. one live session: sequential turns for {args.duration:g} s")
                meter = QuietMeter(service.pid)
                for _ in range(5):  # start it and warm the path
                    await session_turn(client, "wake", "one-live")
                # The baseline, interleaved turn by turn (same machine load): the same fake
                # agent, started as a session's is, driven directly through the SDK.
                live_agent = direct.make_agent(
                    direct.spec(workdir / "direct-live", session_id=str(uuid.uuid4()))
                )
                await live_agent.start(direct.settings.warmup_timeout_s)
                latencies: list[float] = []
                direct_live: list[float] = []
                try:
                    for _ in range(5):
                        await timed_direct_turn(live_agent)
                    t0 = time.perf_counter()
                    end = t0 + args.duration
                    while time.perf_counter() < end:
                        latencies.append((await session_turn(client, "wake", "one-live"))[0])
                        direct_live.append(await timed_direct_turn(live_agent))
                    wall = time.perf_counter() - t0
                finally:
                    await live_agent.close()
                one, base = dist(latencies), dist(direct_live)
                print(f"  {len(latencies)} turns (and as many direct ones) in {wall:.2f} s")
                print(fmt_table("turn round trip (HTTP)", one))
                print(fmt_table("direct SDK turn, same fake agent", base))
                over = one["p50"] - base["p50"]
                print(
                    f"  live turn p50 {one['p50']:.2f} ms vs direct {base['p50']:.2f} ms: "
                    f"+{over:.2f} ms (target ≤ +2 ms), ratio {one['p50'] / base['p50']:.2f}"
                )
                bare = await bare_post_round_trips(env, len(latencies))
                print(fmt_table("the same POST, bare hypercorn", bare))
                beyond = over - bare["p50"]
                print(
                    f"  of the +{over:.2f} ms, an HTTP round trip on hypercorn with nothing "
                    f"behind it (bench/bare_http.py) is {bare['p50']:.2f} ms: the service adds "
                    f"{beyond:+.2f} ms beyond the server and the client"
                )
                turns = next(
                    s["turns"] for s in await sessions_of(client, "wake") if s["id"] == "one-live"
                )
                print(f"  /status says the session has {turns} turns")
                line, share = meter.report()
                quiet.append(share)
                print(line)
                final_mem = service.memory_kib()
        finally:
            code = await service.stop(timeout_s=STOP_TIMEOUT_S)
    print(
        f"\n  service RSS at the end {final_mem['VmRSS'] / 1024:.1f} MiB; "
        f"exit code after SIGTERM: {'killed' if code is None else code}"
    )

    section("summary")
    verdict = "met" if per_session <= 5 * 1024 else "MISSED"
    print(
        f"sessions: hibernated RSS growth = {per_session:.0f} bytes/session "
        f"({per_session / 1024:.2f} KiB; target ≤ 5 KiB) [{verdict}] over {total_hib} "
        f"sessions (driven through HTTP; per round: "
        + ", ".join(f"{g / args.http_sessions:+.0f}" for _, g, _ in rounds)
        + " bytes)"
    )
    if total_hib < 200:
        print(
            f"  (only {total_hib} sessions: fixed first-use costs — allocator arenas, SQLite "
            f"pages — dominate; use 200 or more for the per-session figure)"
        )
    print(
        f"records: {args.records} pre-populated hibernated records: start-up RSS "
        f"{per_record:+.1f} bytes/record vs an empty database; {status_delta / 1024:+.0f} KiB "
        f"retained after /status listed them all"
    )
    print(
        f"wake: median {wf['p50']:.1f} ms (p90 {wf['p90']:.1f}) vs live turn median "
        f"{lf['p50']:.1f} ms; agent warm-up median {warm_new['p50']:.1f} ms "
        f"(resume {warm_resume['p50']:.1f} ms; resume + turn interleaved with the wakes "
        f"{both['p50']:.1f} ms); all slots full: wake median {dist(wake_full)['p50']:.1f} ms"
    )
    print(
        f"one live session: p50 {one['p50']:.2f} ms, p99 {one['p99']:.2f} ms | direct SDK turn "
        f"p50 {base['p50']:.2f} ms | overhead p50 +{over:.2f} ms (target ≤ +2 ms) "
        f"[{'met' if over <= 2 else 'MISSED'}]; a bare hypercorn round trip "
        f"{bare['p50']:.2f} ms of it"
    )
    print(
        f"{quiet_verdict(quiet)}; nproc={os.cpu_count()}; "
        f"run took {time.perf_counter() - run_started:.0f} s"
    )


if __name__ == "__main__":
    trio.run(main, parse_args())
