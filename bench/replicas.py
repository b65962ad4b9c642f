"""Benchmark of several replicas on PostgreSQL (issue 22's figures).

Prints figures; it is not a test. Everything runs on 127.0.0.1: the real service
(``python -m claude_code_api``), the fake CLI ``tests/fake_claude.py`` (and, for one
figure, the real bundled CLI against the mock Messages API), the machine's PostgreSQL at
127.0.0.1:5432 (``POSTGRES_TEST_URL`` for another admin URL) in a database made for this
run and dropped at its end, and HAProxy (``/usr/sbin/haproxy``) in front of the replicas.
Replicas are started as in ``tests/postgres/test_replicas_balanced.py``: each its own
DATA_DIR; one WORKSPACES_DIR and one DATABASE_URL; the fake keeps its conversation in its
config dir's transcript (FAKE_CLAUDE_HOME empty), which follows the session through
PostgreSQL, so "What is my name?" is answered right only if the conversation went on.

    .venv/bin/python -m bench.replicas            # ~3-4 min on a 2-CPU machine
    .venv/bin/python -m bench.replicas --help

Phases:

1. **A session turn, PostgreSQL over SQLite**: two services up at once, one with
   ``DATABASE_URL`` and one without, the same fake CLI; new sessions' first turns (one
   side then the other), then live turns on one session each, in interleaved blocks (the
   order alternating): p50 and p99 of each, and the CPU per turn of each service's process
   tree (agents included) and of the database's server processes serving it.
2. **A hand-over**: two replicas, one session whose turns alternate between them; every
   turn on the other replica is a hand-over (the holder hibernates the session and
   releases its lease, the asker takes it and resumes the conversation from PostgreSQL),
   each followed by a turn on the same replica (live) as the baseline. With the fake CLI,
   then with the real bundled CLI against the mock Messages API (``--real-handovers 0``
   skips it; skipped when the bundled CLI is missing).
3. **Throughput with 1, 2 and 3 replicas** behind HAProxy (round robin, as the tests):
   ``--clients`` clients (one user each) for ``--duration`` s of one-shots, then of
   session turns (a session per client, every reply checked). Round robin sends a
   session's consecutive turns to different replicas, so almost every turn is a hand-over
   (and a user's one-shots rarely find the agent kept for them, ``AGENT_REUSE_S``); both
   loads are also run with HAProxy hashing on the caller's key
   (``deploy/haproxy/haproxy.cfg``'s way: a user stays on one replica).
4. **A replica killed**: ``--kill-sessions`` sessions made live on one of the three
   replicas, which gets SIGKILL; each session's next turn is sent through HAProxy at once
   (retried while HAProxy answers 502/503, before its checks take the dead replica out):
   the time from the SIGKILL to each answer (the lease expires within ``SESSION_LEASE_S``,
   renewed every third of it, then a wake-up).

The machine check (``bench/stats.py``) counts the replicas' process trees, HAProxy and the
database's server processes connected to this run's database as ours.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.service import START_TIMEOUT_S, STOP_TIMEOUT_S, options, workdir
from bench.stats import QuietLog, dist, fmt_dist, print_machine, section, tree_cpu
from tests.support.harness import (
    CLK_TCK,
    RunningService,
    launch_service,
    service_env,
    wait_healthy,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ADMIN_URL = os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
USERS = [f"u{n}" for n in range(16)]
KEYS = {user: f"sk-bench-{user}" for user in USERS}
API_KEYS = ",".join(f"{user}:{key}" for user, key in KEYS.items())
# The real CLI's services have tests/support/real_cli.py's users.
KEYS["alice"] = "sk-alice-key"
HTTP_TIMEOUT_S = 120.0
Figures = dict[str, Any]


def auth(user: str) -> dict[str, str]:
    return {"x-api-key": KEYS[user]}


# --- the database ------------------------------------------------------------------------


class Database:
    """This run's database on the server at :data:`ADMIN_URL`: made, dropped at the end."""

    def __init__(self) -> None:
        import psycopg  # only here: the rest of the package runs without it

        self.psycopg = psycopg
        self.name = f"cca_bench_{secrets.token_hex(6)}"
        self.url = ""

    def admin(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self.psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as connection:
            cursor = connection.execute(statement.encode(), params)
            return cursor.fetchall() if cursor.description else []

    def server(self) -> str:
        return str(self.admin("SELECT version()")[0][0]).split(" on ")[0]

    def create(self) -> str:
        from urllib.parse import urlsplit

        self.admin(f'CREATE DATABASE "{self.name}"')
        self.url = urlsplit(ADMIN_URL)._replace(path=f"/{self.name}").geturl()
        return self.url

    def drop(self) -> None:
        if self.url:
            self.admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.url = ""

    def backends(self) -> list[int]:
        """The server processes connected to this run's database (the admin's excluded)."""
        rows = self.admin(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.name,),
        )
        return [int(row[0]) for row in rows]


class Backends:
    """CPU seconds of the database's server processes serving this run (see
    :meth:`Database.backends`), each (pid, start time) counted at its largest reading;
    a sampler for :class:`bench.stats.QuietMeter`. A connection that closes between two
    readings loses its last stretch (the services keep theirs in a pool)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.seen: dict[tuple[int, str], float] = {}

    def total(self) -> float:
        for pid in self.database.backends():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            own = (int(fields[11]) + int(fields[12])) / CLK_TCK
            key = (pid, fields[19])
            self.seen[key] = max(own, self.seen.get(key, 0.0))
        return sum(self.seen.values())

    def of(self, pids: set[int]) -> float:
        """Like :meth:`total`, for the backends whose pid is in ``pids`` only."""
        self.total()
        return sum(cpu for (pid, _), cpu in self.seen.items() if pid in pids)


# --- replicas and the balancer -----------------------------------------------------------


def replica_env(where: Path, name: str, url: str | None, **extra: str) -> dict[str, str]:
    """Replica ``name``'s environment: its DATA_DIR ``where/name``, the shared
    WORKSPACES_DIR ``where/workspaces`` and database ``url`` (None: SQLite), the fake
    keeping its conversation in its transcript."""
    overrides = {
        "API_KEYS": API_KEYS,
        "WORKSPACES_DIR": str(where / "workspaces"),
        "FAKE_CLAUDE_HOME": "",
        "FAKE_CLAUDE_MODE": "",
        "FAKE_CLAUDE_LOG": str(where / name / "fake.log"),
        "MAX_SESSIONS_PER_USER": "10000",
        "MAX_LIVE_SESSIONS": "64",
        "QUEUE_MAX": "100",
        **({"DATABASE_URL": url} if url else {}),
        **extra,
    }
    return service_env(where / name, overrides, record_pids=False)


@asynccontextmanager
async def replicas(
    where: Path, names: Sequence[str], url: str | None, **extra: str
) -> AsyncIterator[list[RunningService]]:
    """The replicas ``names``, started one after the other; stopped (SIGTERM) together."""
    async with AsyncExitStack() as stack:
        started = []
        for name in names:
            env = replica_env(where, name, url, **extra)
            started.append(
                await stack.enter_async_context(
                    launch_service(env, start_timeout_s=START_TIMEOUT_S, log_lines=300)
                )
            )
        for service in started:
            await wait_healthy(service, ready=1, timeout=60)
        try:
            yield started
        finally:
            async with trio.open_nursery() as nursery:
                for service in started:
                    if service.process.poll() is None:
                        nursery.start_soon(stop_quietly, service)


async def stop_quietly(service: RunningService) -> None:
    with trio.move_on_after(STOP_TIMEOUT_S + 5):
        await service.stop(timeout_s=STOP_TIMEOUT_S)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def haproxy_config(port: int, backends: Sequence[RunningService], balance: str) -> str:
    """tests/postgres/test_replicas_balanced.py's configuration; ``balance`` "roundrobin",
    or "hash": on the caller's key, consistent, as deploy/haproxy/haproxy.cfg."""
    servers = "\n".join(
        f"  server r{n} {replica.url.removeprefix('http://')} check"
        for n, replica in enumerate(backends)
    )
    rule = (
        "balance roundrobin"
        if balance == "roundrobin"
        else "balance hdr(x-api-key)\n  hash-type consistent"
    )
    return f"""
global
  maxconn 512
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
frontend replicas
  bind 127.0.0.1:{port}
  default_backend replicas
backend replicas
  {rule}
  option httpchk GET /health
  http-check expect status 200
  default-server inter 300ms fall 2 rise 1
{servers}
"""


class Balancer:
    def __init__(self, url: str, process: trio.Process) -> None:
        self.url = url
        self.process = process


@asynccontextmanager
async def balancer(
    where: Path, backends: Sequence[RunningService], balance: str = "roundrobin"
) -> AsyncIterator[Balancer]:
    """HAProxy in front of ``backends``; yields once every backend is in service."""
    port = free_port()
    config = where / f"haproxy-{port}.cfg"
    config.write_text(haproxy_config(port, backends, balance))
    process = await trio.lowlevel.open_process(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            with trio.fail_after(30):
                # Every server up: as many 200s in a row as there are servers (round robin
                # on /health, which carries no key), after the checks' first round.
                await trio.sleep(0.5)
                good = 0
                while good < 2 * len(backends):
                    try:
                        ok = (await client.get("/health")).status_code == 200
                    except httpx.TransportError:
                        ok = False
                    good = good + 1 if ok else 0
                    if not ok:
                        await trio.sleep(0.1)
        yield Balancer(url, process)
    finally:
        process.kill()
        await process.wait()


# --- turns -------------------------------------------------------------------------------


def client(url: str, connections: int = 4) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S, limits=limits)


async def turn(
    http: httpx.AsyncClient, user: str, prompt: str, session: str | None = None
) -> tuple[float, dict[str, Any]]:
    """One ``POST /run`` that must succeed: (seconds, its body). RuntimeError otherwise."""
    body: dict[str, Any] = {"prompt": prompt}
    if session is not None:
        body["sessionId"] = session
    started = time.perf_counter()
    response = await http.post("/run", json=body, headers=auth(user))
    took = time.perf_counter() - started
    reply = response.json() if response.headers.get("content-type", "").endswith("json") else {}
    if response.status_code != 200 or reply.get("success") is not True:
        raise RuntimeError(f"{user}/{session}: {response.status_code} {response.text[:300]}")
    return took, reply


async def remembered(http: httpx.AsyncClient, user: str, session: str, name: str) -> float:
    """One "What is my name?" turn answered with ``name``: its seconds. RuntimeError if
    the conversation did not go on (the transcript did not follow the session)."""
    took, reply = await turn(http, user, "What is my name?", session)
    if reply.get("output") != f"Your name is {name}.":
        raise RuntimeError(f"{user}/{session}: the conversation broke: {reply.get('output')!r}")
    return took


def service_cpu_s(services: Sequence[RunningService]) -> float:
    """CPU seconds of the services' process trees (their agents included)."""
    total = 0.0
    for service in services:
        try:
            total += tree_cpu(service.pid).total_s
        except OSError:
            pass
    return total


def fmt(name: str, values_s: list[float]) -> str:
    return fmt_dist(name, dist(values_s), width=44, decimals=2)


# --- phase 1: a session turn on PostgreSQL against SQLite --------------------------------


async def phase_turn_cost(
    args: argparse.Namespace, where: Path, database: Database, quiet: QuietLog
) -> Figures:
    section("1. a session turn: PostgreSQL on loopback vs SQLite (one service each, both up)")
    pg_backends = Backends(database)
    async with AsyncExitStack() as stack:
        sqlite = (await stack.enter_async_context(replicas(where / "p1", ["sqlite"], None)))[0]
        pg = (await stack.enter_async_context(replicas(where / "p1", ["pg"], database.url)))[0]
        sides = {"sqlite": sqlite, "pg": pg}
        https = {
            side: await stack.enter_async_context(client(service.url))
            for side, service in sides.items()
        }
        first: dict[str, list[float]] = {"sqlite": [], "pg": []}
        live: dict[str, list[float]] = {"sqlite": [], "pg": []}
        cpu: dict[str, float] = {"sqlite": 0.0, "pg": 0.0}
        db_cpu = 0.0
        with quiet.phase(trees=[s.pid for s in sides.values()], samplers=[pg_backends]):
            # The pg service's own backends: those that appear once it runs (the admin's
            # connections come and go; the bench's own are excluded by pid).
            for n in range(args.first_turns):
                for side in ("sqlite", "pg") if n % 2 == 0 else ("pg", "sqlite"):
                    took, _ = await turn(https[side], "u0", f"My name is F{n}.", f"first-{n}")
                    first[side].append(took)
            for side in sides:
                await turn(https[side], "u1", "My name is Live.", "live")
                for _ in range(10):  # warm-up
                    await remembered(https[side], "u1", "live", "Live")
            block = max(1, args.turns // args.rounds)
            for round_no in range(args.rounds):
                order = ("sqlite", "pg") if round_no % 2 == 0 else ("pg", "sqlite")
                for side in order:
                    cpu_before = service_cpu_s([sides[side]])
                    db_before = pg_backends.total() if side == "pg" else 0.0
                    for _ in range(block):
                        live[side].append(await remembered(https[side], "u1", "live", "Live"))
                    cpu[side] += service_cpu_s([sides[side]]) - cpu_before
                    if side == "pg":
                        db_cpu += pg_backends.total() - db_before
    for side, label in (("sqlite", "SQLite"), ("pg", "PostgreSQL")):
        print(fmt(f"first turn of a new session, {label}", first[side]))
    for side, label in (("sqlite", "SQLite"), ("pg", "PostgreSQL")):
        print(fmt(f"live session turn, {label}", live[side]))
    turns = {side: len(values) for side, values in live.items()}
    per_turn = {side: 1000 * cpu[side] / turns[side] for side in cpu}
    db_per_turn = 1000 * db_cpu / turns["pg"]
    print(
        f"  CPU per live turn: SQLite service {per_turn['sqlite']:.2f} ms; PostgreSQL service "
        f"{per_turn['pg']:.2f} ms + database server {db_per_turn:.2f} ms "
        f"(process trees, agents included; {args.rounds} interleaved blocks of {block})"
    )
    return {
        "first": {side: dist(v) for side, v in first.items()},
        "live": {side: dist(v) for side, v in live.items()},
        "cpu": per_turn,
        "db_cpu": db_per_turn,
    }


# --- phase 2: hand-overs -----------------------------------------------------------------


async def alternate(
    https: Sequence[httpx.AsyncClient],
    holder: list[int],
    user: str,
    session: str,
    count: int,
    check: Callable[[dict[str, Any]], None],
    prompt: str = "What is my name?",
) -> tuple[list[float], list[float]]:
    """``count`` times: a turn on the replica that does not hold the session (a hand-over),
    then one more there (live); each reply passed to ``check``. ``holder[0]``: the index
    of the replica holding the session, kept up to date. (hand-over seconds, live seconds)."""
    handovers: list[float] = []
    lives: list[float] = []
    for _ in range(count):
        holder[0] = 1 - holder[0]
        http = https[holder[0]]
        took, reply = await turn(http, user, prompt, session)
        check(reply)
        handovers.append(took)
        took, reply = await turn(http, user, prompt, session)
        check(reply)
        lives.append(took)
    return handovers, lives


async def phase_handover(
    args: argparse.Namespace, where: Path, database: Database, quiet: QuietLog
) -> Figures:
    section("2a. a hand-over, fake CLI: a session's next turn on the other replica")

    def name_kept(reply: dict[str, Any]) -> None:
        if reply.get("output") != "Your name is Hand.":
            raise RuntimeError(f"the conversation broke: {reply.get('output')!r}")

    backends = Backends(database)
    async with AsyncExitStack() as stack:
        pair = await stack.enter_async_context(replicas(where / "p2", ["a", "b"], database.url))
        https = [await stack.enter_async_context(client(s.url)) for s in pair]
        with quiet.phase(trees=[s.pid for s in pair], samplers=[backends]):
            await turn(https[0], "u2", "My name is Hand.", "hand")
            holder = [0]
            await alternate(https, holder, "u2", "hand", 3, name_kept)  # warm-up
            handovers, lives = await alternate(
                https, holder, "u2", "hand", args.handovers, name_kept
            )
    print(fmt("hand-over turn (the other replica)", handovers))
    print(fmt("live turn (the same replica, right after)", lives))
    figures: Figures = {"fake": (dist(handovers), dist(lives))}
    if args.real_handovers > 0:
        figures["real"] = await phase_real_handover(args, where, database, quiet)
    return figures


async def phase_real_handover(
    args: argparse.Namespace, where: Path, database: Database, quiet: QuietLog
) -> tuple[dict[str, float], dict[str, float]] | str:
    section("2b. a hand-over, the real bundled CLI against the mock Messages API")
    from claude_code_api.demo.mock_messages_api import open_mock_api
    from tests.support.real_cli import BUNDLED_CLI, HAVE_BUNDLED_CLI, service_overrides

    if not HAVE_BUNDLED_CLI:
        reason = f"skipped: no bundled CLI at {BUNDLED_CLI}"
        print(f"  {reason}")
        return reason
    backends = Backends(database)
    async with open_mock_api() as api, AsyncExitStack() as stack:
        pair = []
        for name in ("a", "b"):
            at = where / "p2-real" / name
            overrides = service_overrides(
                api.url,
                at,
                DATABASE_URL=database.url,
                WORKSPACES_DIR=str(where / "p2-real" / "workspaces"),
                MAX_LIVE_SESSIONS="4",
            )
            env = service_env(at, overrides, record_pids=False)
            pair.append(
                await stack.enter_async_context(
                    launch_service(env, start_timeout_s=60, log_lines=300)
                )
            )
        for service in pair:
            await wait_healthy(service, ready=1, timeout=120)
        https = [await stack.enter_async_context(client(s.url)) for s in pair]

        def whole(reply: dict[str, Any]) -> None:
            # The model was sent the whole conversation: the first turn's words too.
            if "My name is Alice." not in api.model_calls[-1].all_text():
                raise RuntimeError("the real CLI's conversation broke on a hand-over")
            if reply.get("output") != "echo: What is my name?":
                raise RuntimeError(f"unexpected reply {reply.get('output')!r}")

        with quiet.phase(trees=[s.pid for s in pair], samplers=[backends]):
            await turn(https[0], "alice", "My name is Alice.", "real")
            holder = [0]
            await alternate(https, holder, "alice", "real", 1, whole)  # warm-up
            handovers, lives = await alternate(
                https, holder, "alice", "real", args.real_handovers, whole
            )
        for service in pair:
            await stop_quietly(service)
    print(fmt("hand-over turn (the other replica)", handovers))
    print(fmt("live turn (the same replica, right after)", lives))
    return dist(handovers), dist(lives)


# --- phase 3: throughput with 1, 2, 3 replicas; phase 4: one killed ------------------------


def fake_turns(where: Path, names: Sequence[str]) -> dict[str, int]:
    """Turns each replica's fake CLIs logged so far."""
    counts = {}
    for name in names:
        log = where / name / "fake.log"
        lines = log.read_text().splitlines() if log.exists() else []
        counts[name] = sum(1 for line in lines if json.loads(line)["event"] == "turn")
    return counts


async def saturate(
    url: str,
    clients: int,
    duration: float,
    work: Callable[[httpx.AsyncClient, int], Awaitable[None]],
) -> tuple[int, float, list[float]]:
    """``clients`` loops of ``work(http, n)`` for ``duration`` s: (done, wall s, latencies)."""
    latencies: list[float] = []
    done = 0
    async with client(url, connections=clients) as http:
        deadline = time.perf_counter() + duration

        async def loop(n: int) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await work(http, n)
                latencies.append(time.perf_counter() - started)
                done += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(loop, n)
        wall = time.perf_counter() - started
    return done, wall, latencies


KINDS = [
    ("one-shots", "roundrobin"),
    ("one-shots", "hash"),
    ("session turns", "roundrobin"),
    ("session turns", "hash"),
]
Work = Callable[[httpx.AsyncClient, int], Awaitable[None]]


def session_work(users: list[str], tag: str) -> Work:
    """Client ``n``'s next turn in its session (made beforehand), its answer checked."""

    async def work(http: httpx.AsyncClient, n: int) -> None:
        await remembered(http, users[n], f"t{tag}-{n}", f"N{n}")

    return work


def one_shot_work(users: list[str]) -> Work:
    """Client ``n``'s next one-shot."""

    async def work(http: httpx.AsyncClient, n: int) -> None:
        await turn(http, users[n], "What is 2+2?")

    return work


async def phase_scale(
    args: argparse.Namespace, where: Path, database: Database, quiet: QuietLog
) -> Figures:
    names = ["r0", "r1", "r2"]
    counts = [int(n) for n in args.replicas.split(",")]
    figures: Figures = {"rows": []}
    backends = Backends(database)
    at = where / "p3"
    extra = {
        "SESSION_LEASE_S": f"{args.lease_s:g}",
        "POOL_SIZE": str(args.pool_size),
    }
    async with AsyncExitStack() as stack:
        started = await stack.enter_async_context(replicas(at, names, database.url, **extra))
        for count in counts:
            used = started[:count]
            row: Figures = {"replicas": count}
            for kind, balance in KINDS:
                section(f"3. {kind}, {count} replica(s), HAProxy {balance}")
                async with balancer(at, used, balance) as lb:
                    trees = [s.pid for s in started] + [lb.process.pid]
                    users = USERS[: args.clients]
                    tag = f"{count}-{balance}"
                    if kind == "session turns":
                        async with client(lb.url, connections=args.clients) as http:
                            async with trio.open_nursery() as nursery:
                                for n, user in enumerate(users):
                                    nursery.start_soon(
                                        turn, http, user, f"My name is N{n}.", f"t{tag}-{n}"
                                    )
                        work = session_work(users, tag)
                    else:
                        work = one_shot_work(users)

                    before = fake_turns(at, names)
                    cpu_before = service_cpu_s(started) + backends.total()
                    with quiet.phase(trees=trees, samplers=[backends]):
                        done, wall, latencies = await saturate(
                            lb.url, args.clients, args.duration, work
                        )
                    cpu = service_cpu_s(started) + backends.total() - cpu_before
                    after = fake_turns(at, names)
                rate = done / wall
                spread = " / ".join(str(after[r] - before[r]) for r in names[:count])
                print(
                    f"  {done} in {wall:.1f} s: {rate:.1f} /s; CPU {1000 * cpu / max(done, 1):.1f}"
                    f" ms each (replicas, agents, database); turns per replica {spread}"
                )
                print(fmt("latency", latencies))
                row[f"{kind} {balance}"] = (rate, dist(latencies)["p50"], spread)
            figures["rows"].append(row)
        figures["kill"] = await phase_kill(args, at, started, backends, quiet)
    return figures


async def phase_kill(
    args: argparse.Namespace,
    at: Path,
    started: list[RunningService],
    backends: Backends,
    quiet: QuietLog,
) -> Figures:
    section(
        f"4. a replica killed (SIGKILL) with {args.kill_sessions} live sessions; "
        f"SESSION_LEASE_S={args.lease_s:g}"
    )
    victim = started[-1]
    async with balancer(at, started, "roundrobin") as lb:
        users = USERS[: args.kill_sessions]
        async with client(victim.url, connections=len(users)) as http:
            async with trio.open_nursery() as nursery:
                for n, user in enumerate(users):
                    nursery.start_soon(turn, http, user, f"My name is K{n}.", f"kill-{n}")
        # Killed right after its sessions' turns: their leases were just taken, so they
        # run for about all of SESSION_LEASE_S (the worst case; a renewal every third).
        waited: list[float] = []
        retried = 0
        with quiet.phase(
            trees=[s.pid for s in started[:-1]] + [lb.process.pid], samplers=[backends]
        ):
            victim.process.send_signal(signal.SIGKILL)
            killed_at = time.perf_counter()
            async with client(lb.url, connections=len(users)) as http:

                async def next_turn(n: int, user: str) -> None:
                    nonlocal retried
                    while True:
                        try:
                            await remembered(http, user, f"kill-{n}", f"K{n}")
                            break
                        except (httpx.TransportError, RuntimeError) as exc:
                            if " 50" not in str(exc) and not isinstance(exc, httpx.TransportError):
                                raise
                            retried += 1
                            await trio.sleep(0.1)
                    waited.append(time.perf_counter() - killed_at)

                with trio.fail_after(2 * args.lease_s + 30):
                    async with trio.open_nursery() as nursery:
                        for n, user in enumerate(users):
                            nursery.start_soon(next_turn, n, user)
        await victim.process.wait()
    print(fmt("SIGKILL -> the session's next turn answered", waited))
    print(f"  ({retried} requests answered 502/503 or refused while HAProxy's checks caught up)")
    return dist(waited)


# --- the run -----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    run_started = time.perf_counter()
    if not Path(HAPROXY).exists():
        sys.exit(f"no HAProxy at {HAPROXY} (apt-get install haproxy)")
    database = Database()
    try:
        server = database.server()
    except Exception as exc:  # noqa: BLE001 - one line saying why, then out
        sys.exit(f"no PostgreSQL answers at {ADMIN_URL}: {str(exc).strip().splitlines()[0]}")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    haproxy = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, check=False)
    print_machine(
        f"  commit:          {commit or '?'}",
        f"  database:        {server}, {ADMIN_URL.rsplit('@', 1)[-1]} (a new database per run)",
        f"  balancer:        {haproxy.stdout.splitlines()[0] if haproxy.stdout else HAPROXY}",
        f"  arguments:       {' '.join(f'{k}={v}' for k, v in sorted(vars(args).items()))}",
    )
    quiet = QuietLog()
    figures: Figures = {}
    database.create()
    try:
        with workdir("bench-replicas-") as where:
            if "cost" in args.phases:
                figures["cost"] = await phase_turn_cost(args, where, database, quiet)
            if "handover" in args.phases:
                figures["handover"] = await phase_handover(args, where, database, quiet)
            if "scale" in args.phases:
                figures["scale"] = await phase_scale(args, where, database, quiet)
    finally:
        database.drop()
    summary(figures, args, quiet, run_started)


def summary(figures: Figures, args: argparse.Namespace, quiet: QuietLog, started: float) -> None:
    section("summary (Markdown)")
    print("| figure | measured |\n|---|---|")
    if cost := figures.get("cost"):
        for what in ("live", "first"):
            s, p = cost[what]["sqlite"], cost[what]["pg"]
            label = "live session turn" if what == "live" else "a new session's first turn"
            print(
                f"| {label} p50 / p99, SQLite → PostgreSQL | {s['p50']:.2f} / {s['p99']:.2f} ms →"
                f" {p['p50']:.2f} / {p['p99']:.2f} ms ({p['p50'] - s['p50']:+.2f} / "
                f"{p['p99'] - s['p99']:+.2f} ms) |"
            )
        print(
            f"| CPU per live turn, SQLite → PostgreSQL | {cost['cpu']['sqlite']:.2f} ms → "
            f"{cost['cpu']['pg']:.2f} ms service + {cost['db_cpu']:.2f} ms database server |"
        )
    if handover := figures.get("handover"):
        h, live = handover["fake"]
        print(
            f"| hand-over p50 (p99), fake CLI; live turn after it | {h['p50']:.1f} "
            f"({h['p99']:.1f}) ms; {live['p50']:.1f} ms (n={h['n']}) |"
        )
        real = handover.get("real")
        if isinstance(real, tuple):
            h, live = real
            print(
                f"| hand-over p50 (max), real CLI; live turn after it | {h['p50']:.0f} "
                f"({h['max']:.0f}) ms; {live['p50']:.0f} ms (n={h['n']}) |"
            )
        elif real:
            print(f"| hand-over, real CLI | {real} |")
    if scale := figures.get("scale"):
        for kind, balance in KINDS:
            key = f"{kind} {balance}"
            cells = []
            for row in scale["rows"]:
                rate, p50, _ = row[key]
                cells.append(f"{row['replicas']}: {rate:.1f}/s (p50 {p50:.0f} ms)")
            label = key.replace("roundrobin", "round robin").replace("hash", "hash on the key")
            print(f"| throughput, {label}, {args.clients} clients | {'; '.join(cells)} |")
        k = scale["kill"]
        print(
            f"| SIGKILL → its sessions' next turns answered (SESSION_LEASE_S={args.lease_s:g}, "
            f"{k['n']} sessions) | min {k['min'] / 1000:.1f} s, p50 {k['p50'] / 1000:.1f} s, "
            f"max {k['max'] / 1000:.1f} s |"
        )
    print(
        f"\n{quiet.verdict()}; nproc={os.cpu_count()}; run took "
        f"{time.perf_counter() - started:.0f} s"
    )


def parse_args() -> argparse.Namespace:
    parser = options(
        argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
        turns=(200, "phase 1: live turns timed per side"),
        rounds=(10, "phase 1: interleaved blocks the live turns are split in"),
        first_turns=(20, "phase 1: new sessions per side"),
        handovers=(30, "phase 2: hand-overs timed with the fake CLI"),
        real_handovers=(4, "phase 2: hand-overs timed with the real CLI; 0: skip"),
        replicas=("1,2,3", "phase 3: replica counts behind HAProxy"),
        clients=(8, "phase 3: concurrent clients, one user and one session each"),
        duration=(6.0, "phase 3: seconds per throughput window"),
        pool_size=(2, "phase 3: POOL_SIZE per replica"),
        kill_sessions=(6, "phase 4: sessions live on the killed replica"),
        lease_s=(15.0, "phases 3-4: SESSION_LEASE_S (the default is 15)"),
        phases=("cost,handover,scale", "which phases (scale includes the kill)"),
    )
    args = parser.parse_args()
    if args.clients > len(USERS) or args.kill_sessions > len(USERS):
        parser.error(f"at most {len(USERS)} clients and kill sessions (one user each)")
    return args


if __name__ == "__main__":
    trio.run(run, parse_args())
