"""Benchmark of multi-turn sessions: memory per hibernated session, wake-up time, one session's rate.

Prints figures; it is not a test. Everything runs on 127.0.0.1 against the fake
CLI ``tests/fake_claude.py``; no network, no Claude credentials. The service is
the real one (``python -m claude_code_api``, PORT=0) with MAX_LIVE_SESSIONS=4.

    .venv/bin/python -m bench.sessions           # defaults: about 1.5-2.5 minutes
    .venv/bin/python -m bench.sessions --help

Phases, all in one run:

0. agent warm-up, directly (an agent made as the service makes them:
   ``tests.support.harness.service_agents``): ``start()`` of a new conversation (``--session-id``), one turn, close;
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
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import bare_http
from bench.original import (
    OriginalBuild,
    add_side_by_side_arguments,
    header_lines,
    prepare,
    round_orders,
    sides_of,
)
from bench.service import (
    HTTP_TIMEOUT_S,
    PROMPT,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Direct,
    client_of,
    launch_sides,
    options,
    print_side_by_side,
    run_mode,
    samples,
    wait_ready,
)
from bench.stats import QuietLog, SideBySide, dist, fmt_dist, print_machine, section
from claude_code_api.agent.protocol import Agent
from claude_code_api.messages import SessionKey
from claude_code_api.store import new_session_record, open_store
from tests.support.harness import FAKE_CLAUDE, ROOT, RunningService, launch_service, proc_memory_kib
from tests.support.harness import service_env as harness_env

KEYS = {"api": "sk-bench-api", "bulk": "sk-bench-bulk", "wake": "sk-bench-wake"}
AUTH = {user: {"x-api-key": key} for user, key in KEYS.items()}
API_KEYS = ",".join(f"{user}:{key}" for user, key in KEYS.items())
LIVE_STATES = {"live", "busy", "starting", "stopping", "waiting"}
HIBERNATE_TIMEOUT_S = 60.0
RETRIES_429 = 200
Figures = dict[str, Any]


def fmt_table(name: str, d: dict[str, float]) -> str:
    return fmt_dist(name, d, width=40, decimals=2)


def fmt_mem(m: dict[str, int]) -> str:
    return (
        f"VmRSS {m['VmRSS'] / 1024:8.2f} MiB (anon {m['RssAnon'] / 1024:7.2f}, "
        f"file {m['RssFile'] / 1024:6.2f}; HWM {m['VmHWM'] / 1024:7.2f})"
    )


# --- direct: session agents without the service ---------------------------------------


async def start_and_turn(direct: Direct, **spec: Any) -> tuple[float, float]:
    """A session agent's ``start()``, one turn, close: (start seconds, turn seconds)."""
    start_s, agent = await direct.warm(ephemeral=False, **spec)
    try:
        return start_s, await direct.turn(agent)
    finally:
        await agent.close()


async def measure_agent(direct: Direct, where: Path, runs: int) -> dict[str, list[float]]:
    """Agent.start() new / resumed, and the turn after each, as a session actor does them."""
    out: dict[str, list[float]] = {"new": [], "first_turn": [], "resume": [], "resumed_turn": []}
    for i in range(runs):
        home, claude_id = where / f"agent-{i}", str(uuid.uuid4())
        start_s, turn_s = await start_and_turn(direct, home=home, session_id=claude_id)
        out["new"].append(start_s)
        out["first_turn"].append(turn_s)
        start_s, turn_s = await start_and_turn(direct, home=home, resume=claude_id)
        out["resume"].append(start_s)
        out["resumed_turn"].append(turn_s)
    return out


# --- the service --------------------------------------------------------------------


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


async def sessions_of(client: httpx.AsyncClient, user: str) -> list[dict[str, Any]]:
    """``user``'s sessions, most recent first: /status lists up to 1000 a page."""
    response = await client.get("/status", params={"limit": 1000}, headers=AUTH[user])
    response.raise_for_status()
    return list(response.json()["sessions"])


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


async def session_turn(
    client: httpx.AsyncClient, user: str, session_id: str, prompt: str = PROMPT
) -> tuple[float, int]:
    """One turn; returns (seconds, 429s retried). Raises on anything but success."""
    for retried in range(RETRIES_429 + 1):
        started = time.perf_counter()
        response = await client.post(
            "/run", json={"prompt": prompt, "sessionId": session_id}, headers=AUTH[user]
        )
        elapsed = time.perf_counter() - started
        if response.status_code != 429 or retried == RETRIES_429:
            break
        await trio.sleep(0.02)
    body = response.json()
    if response.status_code != 200 or body.get("success") is not True:
        raise RuntimeError(f"turn {user}/{session_id}: {response.status_code} {body}")
    return elapsed, retried


async def turn_s(client: httpx.AsyncClient, user: str, session_id: str) -> float:
    return (await session_turn(client, user, session_id))[0]


async def drive_sessions(
    client: httpx.AsyncClient, user: str, ids: list[str], concurrency: int
) -> Figures:
    """One turn on each session id, ``concurrency`` at once."""
    latencies: list[float] = []
    retried = 0
    todo = iter(ids)

    async def runner() -> None:
        nonlocal retried
        for session_id in todo:
            elapsed, r = await session_turn(client, user, session_id, f"My name is {session_id}.")
            latencies.append(elapsed)
            retried += r

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(runner)
    return {"latencies": latencies, "retried": retried, "wall": time.perf_counter() - started}


# --- the run: phases 0-3 and the summary --------------------------------------------------


def service_env(args: argparse.Namespace, where: Path, data_dir: Path) -> dict[str, str]:
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
    return harness_env(where, overrides, record_pids=False)


async def phase_agent(
    args: argparse.Namespace, direct: Direct, where: Path, quiet: QuietLog
) -> Figures:
    section("0. agent warm-up, direct (SdkAgent.start(): the service's launcher and options)")
    with quiet.phase():
        agent = await measure_agent(direct, where / "direct", args.warmups)
        warm_new, warm_resume = dist(agent["new"]), dist(agent["resume"])
        print(fmt_table("start(), new (--session-id)", warm_new))
        print(fmt_table("first turn of it", dist(agent["first_turn"])))
        print(fmt_table("start(), resume (--resume), as a wake", warm_resume))
        print(fmt_table("first turn after resume", dist(agent["resumed_turn"])))
    return {"new": warm_new, "resume": warm_resume}


async def empty_database_mem(args: argparse.Namespace, where: Path) -> dict[str, int]:
    """The settled RSS of a service on an empty database (1a's control)."""
    section(f"1a. {args.records} pre-populated hibernated records: service start-up RSS")
    control_env = service_env(args, where, where / "control-data")
    async with launch_service(control_env, start_timeout_s=START_TIMEOUT_S) as control:
        try:
            async with client_of(control) as client:
                await wait_ready(client)
                empty_mem, empty_reads = await settled_mem(client, control.pid)
        finally:
            await control.stop(timeout_s=STOP_TIMEOUT_S)
    print(f"  empty database:          {fmt_mem(empty_mem)}  reads KiB {empty_reads}")
    return empty_mem


async def populate(records: int, data_dir: Path) -> None:
    """``records`` hibernated records of user ``bulk`` in the store, before start-up."""
    started = time.perf_counter()
    store = await trio.to_thread.run_sync(open_store, data_dir)
    try:

        def save_all() -> int:
            now = time.time()
            for i in range(records):
                store.save(new_session_record(SessionKey("bulk", f"bulk-{i:06d}"), now - i))
            return int(store.count())

        count = await trio.to_thread.run_sync(save_all)
    finally:
        store.close()
    db_bytes = sum(p.stat().st_size for p in data_dir.glob("sessions.sqlite3*"))
    print(
        f"  populated {count} records for user 'bulk' in {time.perf_counter() - started:.1f} s "
        f"(transcript_started=False); database {db_bytes / 1024:.0f} KiB"
    )


async def phase_records(
    args: argparse.Namespace, client: httpx.AsyncClient, pid: int, empty_mem: dict[str, int]
) -> float:
    """1a's figure: the start-up RSS per pre-populated record, against an empty database."""
    start_mem, start_reads = await settled_mem(client, pid)
    print(f"  {args.records} records:        {fmt_mem(start_mem)}  reads KiB {start_reads}")
    records_delta = (start_mem["VmRSS"] - empty_mem["VmRSS"]) * 1024
    per_record = records_delta / max(1, args.records)
    print(
        f"  difference: {records_delta / 1024:+.0f} KiB = {per_record:+.1f} "
        f"bytes/record (two processes: noise of a few hundred KiB either way)"
    )
    return per_record


async def hibernated_baseline(
    args: argparse.Namespace, client: httpx.AsyncClient, pid: int
) -> tuple[dict[str, int], int]:
    """20 one-shot runs and 2 x concurrency sessions of two turns, all hibernated: the
    RSS 1b's rounds grow from, and the number of sessions listed so far."""
    for _ in range(20):
        response = await client.post("/run", json={"prompt": PROMPT}, headers=AUTH["api"])
        response.raise_for_status()
        await wait_ready(client)
    warm_ids = [f"warmup-{i}" for i in range(2 * args.concurrency)]
    await drive_sessions(client, "api", warm_ids, args.concurrency)
    await drive_sessions(client, "api", warm_ids, args.concurrency)  # wake them
    await wait_all_hibernated(client, "api", len(warm_ids))
    base_mem, base_reads = await settled_mem(client, pid)
    print(f"  baseline (after 20 one-shot runs, {len(warm_ids)} sessions x 2 turns):")
    print(f"    {fmt_mem(base_mem)}  reads KiB {base_reads}")
    return base_mem, len(warm_ids)


async def phase_hibernated(
    args: argparse.Namespace, client: httpx.AsyncClient, pid: int, quiet: QuietLog
) -> Figures:
    section(
        f"1b. {args.rounds} x {args.http_sessions} real sessions through HTTP "
        f"({args.concurrency} at once), all hibernated after"
    )
    with quiet.phase(pid):
        base_mem, listed = await hibernated_baseline(args, client, pid)
        rounds, prev = [], base_mem
        for r in range(args.rounds):
            ids = [f"r{r}-s{i:05d}" for i in range(args.http_sessions)]
            driven = await drive_sessions(client, "api", ids, args.concurrency)
            listed += args.http_sessions
            waited = await wait_all_hibernated(client, "api", listed)
            after, reads = await settled_mem(client, pid)
            grew = (after["VmRSS"] - prev["VmRSS"]) * 1024
            grew_anon = (after["RssAnon"] - prev["RssAnon"]) * 1024
            rounds.append(grew)
            print(
                f"  round {r + 1}: {args.http_sessions} sessions in {driven['wall']:.1f} s "
                f"({args.http_sessions / driven['wall']:.1f} sessions/s, "
                f"{driven['retried']} 429s retried); all hibernated {waited:.1f} s later"
            )
            print(fmt_table("    first turn of a new session", dist(driven["latencies"])))
            print(f"    {fmt_mem(after)}  reads KiB {reads}")
            print(
                f"    this round: VmRSS {grew / 1024:+.0f} KiB = "
                f"{grew / args.http_sessions:+.0f} bytes/session; RssAnon "
                f"{grew_anon / 1024:+.0f} KiB = {grew_anon / args.http_sessions:+.0f} "
                f"bytes/session"
            )
            prev = after
        states = collections.Counter(s["state"] for s in await sessions_of(client, "api"))
        total = args.rounds * args.http_sessions
        growth = (prev["VmRSS"] - base_mem["VmRSS"]) * 1024
        growth_anon = (prev["RssAnon"] - base_mem["RssAnon"]) * 1024
        per_session = growth / total
        print(f"  /status for 'api' lists {sum(states.values())} sessions: {dict(states)}")
        print(
            f"  total: VmRSS {growth / 1024:+.0f} KiB over {total} sessions = "
            f"{per_session:+.0f} bytes/session ({per_session / 1024:+.2f} KiB); "
            f"RssAnon {growth_anon / total:+.0f} bytes/session"
        )
        print(f"  VmHWM (peak RSS while sessions ran) {prev['VmHWM'] / 1024:.1f} MiB")
    return {"mem": prev, "rounds": rounds, "per_session": per_session, "total": total}


async def phase_status(
    args: argparse.Namespace,
    service: RunningService,
    client: httpx.AsyncClient,
    before: dict[str, int],
) -> float:
    section(f"1c. GET /status for the user with {args.records} hibernated records")
    status_mem = []
    for _ in range(3):
        started = time.perf_counter()
        response = await client.get("/status", headers=AUTH["bulk"])
        elapsed = time.perf_counter() - started
        right_after = service.memory_kib()
        status_mem.append(right_after)
        print(
            f"  /status: {len(response.json()['sessions'])} sessions, "
            f"{len(response.content) / 1024:.0f} KiB of JSON in {elapsed * 1000:.0f} ms; "
            f"right after: {fmt_mem(right_after)}"
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
    return status_delta


async def wakes_with_a_free_slot(
    client: httpx.AsyncClient, ids: list[str], direct: Direct, where: Path
) -> dict[str, list[float]]:
    """Each of ``ids`` (hibernated) woken with every other session hibernated, right after
    the same done directly (resume + turn), so both see the same machine load."""
    home, claude_id = where / "direct-wake", str(uuid.uuid4())
    await start_and_turn(direct, home=home, session_id=claude_id)
    out: dict[str, list[float]] = {"wake": [], "live": [], "start": [], "turn": []}
    for session_id in ids:
        await wait_all_hibernated(client, "wake")
        start_s, direct_turn = await start_and_turn(direct, home=home, resume=claude_id)
        out["start"].append(start_s)
        out["turn"].append(direct_turn)
        out["wake"].append(await turn_s(client, "wake", session_id))
        out["live"].append(await turn_s(client, "wake", session_id))
    return out


async def wakes_with_full_slots(
    client: httpx.AsyncClient, ids: list[str], max_live: int
) -> tuple[list[float], list[float], int]:
    """Each of ``ids`` woken while ``max_live`` idle sessions hold every slot: (wakes,
    the live turns after them, samples left out because a slot had freed)."""
    await wait_all_hibernated(client, "wake")
    for session_id in [f"filler-{i}" for i in range(max_live)]:
        await session_turn(client, "wake", session_id)
    wakes, lives, not_full = [], [], 0
    for session_id in ids:
        full = await live_count(client, "wake") >= max_live
        wake, live = (
            await turn_s(client, "wake", session_id),
            await turn_s(client, "wake", session_id),
        )
        if full:
            wakes.append(wake)
            lives.append(live)
        else:
            not_full += 1
    return wakes, lives, not_full


async def phase_wake(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    pid: int,
    direct: Direct,
    where: Path,
    warm: Figures,
    quiet: QuietLog,
) -> Figures:
    section(f"2. wake a hibernated session ({args.wake_samples} sessions, user 'wake')")
    with quiet.phase(pid):
        ids = [f"wake-{i:03d}" for i in range(args.wake_samples)]
        first = [await turn_s(client, "wake", session_id) for session_id in ids]
        await wait_all_hibernated(client, "wake", len(ids))
        free = await wakes_with_a_free_slot(client, ids, direct, where)
        wake_full, live_full, not_full = await wakes_with_full_slots(client, ids, args.max_live)
        wf, lf = dist(free["wake"]), dist(free["live"])
        print(fmt_table("first turn of a new session (reference)", dist(first)))
        print("  a. a free live slot:")
        print(fmt_table("wake turn (hibernated -> answer)", wf))
        print(fmt_table("live turn (the next one)", lf))
        both = dist([a + b for a, b in zip(free["start"], free["turn"], strict=True)])
        print("     the same, directly, interleaved with those (same machine load):")
        print(fmt_table("direct Agent.start(), resume", dist(free["start"])))
        print(fmt_table("direct turn after it", dist(free["turn"])))
        print(fmt_table("direct resume start + turn", both))
        print(f"  b. all {args.max_live} slots held by idle sessions (LRU hibernated first):")
        print(fmt_table("wake turn", dist(wake_full)))
        print(fmt_table("live turn", dist(live_full)))
        if not_full:
            print(f"     ({not_full} samples left out: a slot had freed by idle timeout)")
        print(
            f"  wake p50 {wf['p50']:.1f} ms vs direct resume start + turn p50 "
            f"{both['p50']:.1f} ms: the service adds {wf['p50'] - both['p50']:+.1f} ms "
            f"to a wake (phase 0, quieter: warm-up p50 {warm['resume']['p50']:.1f} ms)"
        )
    return {"wake": wf, "live": lf, "both": both, "full": dist(wake_full)}


async def interleaved_live_turns(
    args: argparse.Namespace, client: httpx.AsyncClient, agent: Agent
) -> tuple[list[float], list[float], float]:
    """Turns on session ``one-live`` for ``--duration``, each followed by one on ``agent``
    (the same fake agent driven directly: the baseline, under the same machine load)."""
    for _ in range(5):  # start it and warm the path
        await session_turn(client, "wake", "one-live")
    for _ in range(5):
        await Direct.turn(agent)
    latencies: list[float] = []
    direct_live: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() < started + args.duration:
        latencies.append(await turn_s(client, "wake", "one-live"))
        direct_live.append(await Direct.turn(agent))
    return latencies, direct_live, time.perf_counter() - started


async def phase_live(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    pid: int,
    direct: Direct,
    env: dict[str, str],
    where: Path,
    quiet: QuietLog,
) -> Figures:
    section(f"3. one live session: sequential turns for {args.duration:g} s")
    with quiet.phase(pid):
        _, agent = await direct.warm(
            home=where / "direct-live", ephemeral=False, session_id=str(uuid.uuid4())
        )
        try:
            latencies, direct_live, wall = await interleaved_live_turns(args, client, agent)
        finally:
            await agent.close()
        one, base = dist(latencies), dist(direct_live)
        print(f"  {len(latencies)} turns (and as many direct ones) in {wall:.2f} s")
        print(fmt_table("turn round trip (HTTP)", one))
        print(fmt_table("direct SDK turn, same fake agent", base))
        over = one["p50"] - base["p50"]
        print(
            f"  live turn p50 {one['p50']:.2f} ms vs direct {base['p50']:.2f} ms: "
            f"+{over:.2f} ms (target ≤ +2 ms), ratio {one['p50'] / base['p50']:.2f}"
        )
        async with (
            bare_http.serving(env) as server,
            server.client(timeout=HTTP_TIMEOUT_S) as bare_client,
        ):
            body = {"prompt": PROMPT, "sessionId": "one-live"}
            bare = dist(
                await samples(
                    lambda: bare_client.post("/run", json=body, headers=AUTH["wake"]),
                    len(latencies),
                )
            )
        print(fmt_table("the same POST, bare hypercorn", bare))
        print(
            f"  of the +{over:.2f} ms, an HTTP round trip on hypercorn with nothing "
            f"behind it (bench/bare_http.py) is {bare['p50']:.2f} ms: the service adds "
            f"{over - bare['p50']:+.2f} ms beyond the server and the client"
        )
        listed = await sessions_of(client, "wake")
        turns = next(s["turns"] for s in listed if s["id"] == "one-live")
        print(f"  /status says the session has {turns} turns")
    return {"one": one, "base": base, "over": over, "bare": bare}


def print_summary(
    args: argparse.Namespace, f: Figures, quiet: QuietLog, run_started: float
) -> None:
    section("summary")
    hib, wake, live = f["hibernated"], f["wake"], f["live"]
    per_session, total = hib["per_session"], hib["total"]
    print(
        f"sessions: hibernated RSS growth = {per_session:.0f} bytes/session "
        f"({per_session / 1024:.2f} KiB; target ≤ 5 KiB) "
        f"[{'met' if per_session <= 5 * 1024 else 'MISSED'}] over {total} "
        f"sessions (driven through HTTP; per round: "
        + ", ".join(f"{g / args.http_sessions:+.0f}" for g in hib["rounds"])
        + " bytes)"
    )
    if total < 200:
        print(
            f"  (only {total} sessions: fixed first-use costs — allocator arenas, SQLite "
            f"pages — dominate; use 200 or more for the per-session figure)"
        )
    print(
        f"records: {args.records} pre-populated hibernated records: start-up RSS "
        f"{f['per_record']:+.1f} bytes/record vs an empty database; "
        f"{f['status_delta'] / 1024:+.0f} KiB retained after /status listed them all"
    )
    wf, lf = wake["wake"], wake["live"]
    print(
        f"wake: median {wf['p50']:.1f} ms (p90 {wf['p90']:.1f}) vs live turn median "
        f"{lf['p50']:.1f} ms; agent warm-up median {f['warm']['new']['p50']:.1f} ms "
        f"(resume {f['warm']['resume']['p50']:.1f} ms; resume + turn interleaved with the wakes "
        f"{wake['both']['p50']:.1f} ms); all slots full: wake median {wake['full']['p50']:.1f} ms"
    )
    one, base, over = live["one"], live["base"], live["over"]
    print(
        f"one live session: p50 {one['p50']:.2f} ms, p99 {one['p99']:.2f} ms | direct SDK turn "
        f"p50 {base['p50']:.2f} ms | overhead p50 +{over:.2f} ms (target ≤ +2 ms) "
        f"[{'met' if over <= 2 else 'MISSED'}]; a bare hypercorn round trip "
        f"{live['bare']['p50']:.2f} ms of it"
    )
    print(
        f"{quiet.verdict()}; nproc={os.cpu_count()}; "
        f"run took {time.perf_counter() - run_started:.0f} s"
    )


async def run(args: argparse.Namespace, where: Path, run_started: float) -> None:
    data_dir = where / "data"
    env = service_env(args, where, data_dir)
    # The SDK merges os.environ under the agent's env: the direct calls' fake uses it.
    os.environ["FAKE_CLAUDE_HOME"] = env["FAKE_CLAUDE_HOME"]
    for name in ("FAKE_CLAUDE_MODE", "FAKE_CLAUDE_MODE_FILE", "FAKE_CLAUDE_PIDDIR"):
        os.environ.pop(name, None)
    print_machine(
        f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via {shutil.which('python3') or '?'}",
        f"  service:         MAX_LIVE_SESSIONS={args.max_live} SESSION_IDLE_MS={args.idle_ms} "
        f"POOL_SIZE=1 QUEUE_MAX={env['QUEUE_MAX']}",
        f"  arguments:       records={args.records} http_sessions={args.http_sessions} "
        f"rounds={args.rounds} concurrency={args.concurrency} wake_samples={args.wake_samples} "
        f"warmups={args.warmups} duration={args.duration:g}s",
    )
    quiet = QuietLog()
    direct = Direct(env, where / "direct")
    f: Figures = {"warm": await phase_agent(args, direct, where, quiet)}
    empty_mem = await empty_database_mem(args, where)
    await populate(args.records, data_dir)
    async with launch_service(env, start_timeout_s=START_TIMEOUT_S) as service:
        try:
            print(f"  service pid {service.pid} at {service.url}")
            async with client_of(service, args.concurrency + 2) as client:
                await wait_ready(client)
                f["per_record"] = await phase_records(args, client, service.pid, empty_mem)
                f["hibernated"] = await phase_hibernated(args, client, service.pid, quiet)
                f["status_delta"] = await phase_status(
                    args, service, client, f["hibernated"]["mem"]
                )
                f["wake"] = await phase_wake(
                    args, client, service.pid, direct, where, f["warm"], quiet
                )
                f["live"] = await phase_live(args, client, service.pid, direct, env, where, quiet)
                final_mem = service.memory_kib()
        finally:
            code = await service.stop(timeout_s=STOP_TIMEOUT_S)
    print(
        f"\n  service RSS at the end {final_mem['VmRSS'] / 1024:.1f} MiB; "
        f"exit code after SIGTERM: {'killed' if code is None else code}"
    )
    print_summary(args, f, quiet, run_started)


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


async def vs_round(service: RunningService, ids: list[str], turns: int, clients: int) -> Figures:
    """``turns`` turns on every session of ``ids``, turn by turn across them, ``clients``
    at once; each answer checked (the sessions remember the name told in their first)."""
    first: list[float] = []
    live: list[float] = []
    wrong = 0
    async with client_of(service, clients + 2) as client:
        for turn in range(turns):
            todo = iter(ids)

            async def runner(turn: int = turn, todo: Any = todo) -> None:
                nonlocal wrong
                for session_id in todo:
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


async def vs_beyond(service: RunningService, side: str) -> str:
    """One session more than the original holds, while all of the round's are open."""
    async with client_of(service) as client:
        response = await client.post(
            "/run",
            json={"prompt": PROMPT, "sessionId": f"vs-extra-{side}"},
            headers=AUTH["api"],
        )
    body = response.json()
    said = body.get("error") or f"success: {body.get('success')}"
    return f"{response.status_code} ({said})"


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


async def vs_rounds(
    args: argparse.Namespace, services: dict[str, RunningService], table: SideBySide
) -> dict[str, str]:
    """The interleaved rounds into ``table``; what each side answered beyond its sessions."""
    first_figure = "first turn of a session p50 (starts its agent)"
    live_figure = (
        f"live session turn p50 ({args.vs_sessions} sessions x {args.vs_turns} turns, "
        f"{args.vs_clients} clients)"
    )
    beyond: dict[str, str] = {}
    for r, order in enumerate(round_orders(args.vs_rounds, list(services))):
        for side in order:
            service = services[side]
            ids = [f"vs{r}-{side}-{i:02d}" for i in range(args.vs_sessions)]
            done = await vs_round(service, ids, args.vs_turns, args.vs_clients)
            first, live = dist(done["first"]), dist(done["live"])
            table.add(first_figure, "ms", side, r, first["p50"])
            table.add(live_figure, "ms", side, r, live["p50"])
            if r == args.vs_rounds - 1:
                beyond[side] = await vs_beyond(service, side)
                ids.append(f"vs-extra-{side}")
            closed = await vs_close(service, ids)
            print(
                f"  round {r + 1} {side:<8}  first turn p50 {first['p50']:7.2f} ms "
                f"(p90 {first['p90']:7.2f}) | live turn p50 {live['p50']:6.2f} ms "
                f"(p90 {live['p90']:6.2f}, n={live['n']}) | wrong answers "
                f"{done['wrong']} | DELETE /session {dict(closed)}"
            )
    return beyond


VS_NOTES = f"""  Notes:
  * the original has no MAX_LIVE_SESSIONS: it keeps every session's process until
    30 min idle or DELETE /session and answers 500 past {ORIGINAL_MAX_SESSIONS} sessions;
    ours keeps MAX_LIVE_SESSIONS processes and hibernates the least recently used.
  * ours writes each turn's session record to SQLite (committed before the answer);
    the original keeps sessions in memory only (lost on restart).
  * the original's session ids are global (any key holder reaches any session);
    ours are scoped to the user. One user here, so both see the same ids.
  * a session's first turn starts its agent on both; the original also sends it a
    warm-up prompt ("hi": a model turn) before the first real one."""


async def run_side_by_side(args: argparse.Namespace, where: Path, run_started: float) -> None:
    build = prepare(args.original_repo)
    print_machine(
        f"  fake CLI:        {FAKE_CLAUDE.relative_to(ROOT)} via {sys.executable} (both sides)",
        *header_lines(build),
        f"  arguments:       rounds={args.vs_rounds} sessions={args.vs_sessions} "
        f"turns={args.vs_turns} clients={args.vs_clients}; ours: "
        f"MAX_LIVE_SESSIONS={args.vs_sessions}, POOL_SIZE=1 (both)",
    )
    original = build if isinstance(build, OriginalBuild) else None
    table, quiet = SideBySide(), QuietLog()
    section(
        f"{args.vs_rounds} interleaved rounds: {args.vs_sessions} sessions x {args.vs_turns} "
        f"turns, {args.vs_clients} clients, then DELETE /session for each"
    )

    def env_of(side: str, at: Path) -> dict[str, str]:
        return vs_env(at, args.vs_sessions, args.vs_clients)

    async with launch_sides(sides_of(build), original, env_of, where) as services:
        for service in services.values():
            async with client_of(service) as client:
                await wait_ready(client)
        with quiet.phase(trees=[s.pid for s in services.values()]):
            beyond = await vs_rounds(args, services, table)
    notes = VS_NOTES
    if beyond:
        notes = (
            f"\n  session number {args.vs_sessions + 1} while {args.vs_sessions} are open (ours: "
            f"MAX_LIVE_SESSIONS={args.vs_sessions}; the original: {ORIGINAL_MAX_SESSIONS} at most): "
            + "; ".join(f"{side}: {answer}" for side, answer in beyond.items())
            + "\n"
            + VS_NOTES
        )
    print_side_by_side(table, notes, build, quiet.verdict(), run_started)


# --- command line ---------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = options(
        argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
        records=(10_000, "hibernated records pre-populated in SQLite"),
        http_sessions=(200, "real sessions per round, one turn each"),
        rounds=(2, "rounds of those"),
        concurrency=(8, "concurrent clients driving sessions"),
        wake_samples=(20, "sessions woken in each wake phase"),
        warmups=(20, "direct agent warm-ups timed"),
        duration=(10.0, "seconds of sequential turns on one live session"),
        max_live=(4, "MAX_LIVE_SESSIONS"),
        idle_ms=(1500, "SESSION_IDLE_MS: how soon an idle session hibernates"),
    )
    options(
        add_side_by_side_arguments(parser),
        vs_sessions=(
            20,
            "sessions per round and side (the original's most; also ours' MAX_LIVE_SESSIONS)",
        ),
        vs_turns=(5, "turns per session"),
        vs_clients=(4, "concurrent clients"),
    )
    args = parser.parse_args()
    if args.original and not 1 <= args.vs_sessions <= ORIGINAL_MAX_SESSIONS:
        parser.error(
            f"--vs-sessions: the original holds at most {ORIGINAL_MAX_SESSIONS} sessions "
            f"(the next one is a 500)"
        )
    return args


if __name__ == "__main__":
    trio.run(run_mode, parse_args(), "bench-sessions-", run, run_side_by_side)
