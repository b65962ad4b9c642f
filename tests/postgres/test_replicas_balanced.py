"""Three replicas behind a real load balancer (HAProxy from Debian, round robin), on one
database: every turn of many sessions is answered, every conversation goes on whichever
replica serves each turn, and a replica killed with SIGKILL mid-turn leaves its sessions to
the others within SESSION_LEASE_S and a wake-up.

Each replica (the real service, real SDK, fake CLI) has its own DATA_DIR; they share
WORKSPACES_DIR and DATABASE_URL. The fake keeps its conversation in its config dir's
transcript, which follows the session through PostgreSQL.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.postgres.test_replicas import replica_env
from tests.support.harness import RunningService, run_service

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = [
    pytest.mark.skipif(
        not Path(HAPROXY).exists(),
        reason="haproxy is not installed (scripts/test installs it as root: apt-get install haproxy)",
    ),
    pytest.mark.slow,  # ~30 s: three services and a balancer, twice (.ci/run runs it)
]
BUDGET_S = 240
LEASE_S = 3
KEYS = ["sk-user-a", "sk-user-b", "sk-user-c"]
API_KEYS = ",".join(f"user-{n}:{key}" for n, key in enumerate(KEYS))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def haproxy_config(port: int, replicas: list[RunningService]) -> str:
    servers = "\n".join(
        f"  server r{n} {replica.url.removeprefix('http://')} check"
        for n, replica in enumerate(replicas)
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
  balance roundrobin
  option httpchk GET /health
  http-check expect status 200
  default-server inter 300ms fall 2 rise 1
{servers}
"""


@asynccontextmanager
async def balancer(tmp_path: Path, replicas: list[RunningService]):
    """HAProxy in front of ``replicas``, round robin; yields its URL once it answers."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(port, replicas))
    process = await trio.lowlevel.open_process([HAPROXY, "-db", "-f", str(config)])
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            with trio.fail_after(20):
                while True:
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)
        yield url
    finally:
        process.kill()
        await process.wait()


async def say(url: str, key: str, session: str, prompt: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=90) as client:
        reply = await client.post(
            "/run", headers={"x-api-key": key}, json={"prompt": prompt, "sessionId": session}
        )
    return {"status": reply.status_code, **reply.json()}


async def replicas(stack: AsyncExitStack, tmp_path: Path, url: str, **extra: str):
    started = []
    for name in ("r0", "r1", "r2"):
        env = replica_env(tmp_path, name, url, API_KEYS=API_KEYS, **extra)
        started.append(
            await stack.enter_async_context(run_service(tmp_path / name, env=env, expect_exit=None))
        )
    return started


async def test_many_sessions_over_three_replicas_behind_haproxy(tmp_path, fresh_url):
    sessions, turns = 6, 4
    answers: dict[str, list[dict]] = {}
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            started = await replicas(stack, tmp_path, fresh_url)
            url = await stack.enter_async_context(balancer(tmp_path, started))

            async def conversation(n: int) -> None:
                key, session = KEYS[n % len(KEYS)], f"s{n}"
                answers[session] = [await say(url, key, session, f"My name is N{n}.")]
                for _ in range(turns - 1):
                    answers[session].append(await say(url, key, session, "What is my name?"))

            async with trio.open_nursery() as nursery:
                for n in range(sessions):
                    nursery.start_soon(conversation, n)
            counted = {}
            async with httpx.AsyncClient(base_url=url) as client:
                for key in KEYS:
                    status = (await client.get("/status", headers={"x-api-key": key})).json()
                    counted.update({view["id"]: view["turns"] for view in status["sessions"]})
    for n in range(sessions):
        replies = answers[f"s{n}"]
        assert [r["status"] for r in replies] == [200] * turns, replies
        assert [r["output"] for r in replies[1:]] == [f"Your name is N{n}."] * (turns - 1)
    # Every turn counted once in the shared record: no stale copy of a session wrote over it.
    assert counted == {f"s{n}": turns for n in range(sessions)}
    # Spread over the replicas: each served turns (round robin, hand-overs between them).
    assert replicas_that_ran_turns(tmp_path) == {"r0", "r1", "r2"}


def replicas_that_ran_turns(tmp_path: Path) -> set[str]:
    ran = set()
    for log in tmp_path.glob("r*/fake.log"):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        if any(record["event"] == "turn" for record in records):
            ran.add(log.parent.name)
    return ran


async def test_a_replica_killed_mid_turn_leaves_its_sessions_to_the_others(tmp_path, fresh_url):
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            started = await replicas(stack, tmp_path, fresh_url, SESSION_LEASE_S=str(LEASE_S))
            url = await stack.enter_async_context(balancer(tmp_path, started))
            first = await say(url, KEYS[0], "s", "My name is Kim.")
            assert first["status"] == 200
            # A long turn, sent to one replica directly, which is killed while it runs.
            victim = started[0]
            cut: dict = {}

            async def long_turn() -> None:
                try:
                    cut.update(await say(victim.url, KEYS[0], "s", "[[fake:sleep:30]] still here?"))
                except httpx.TransportError as exc:
                    cut["error"] = type(exc).__name__

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_turn)
                await trio.sleep(1.5)
                victim.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            after = await say(url, KEYS[0], "s", "What is my name?")
            waited_s = time.monotonic() - killed_at
    # The cut turn visibly failed (its connection dropped); nothing half-saved: the next turn
    # is served by another replica, the conversation whole, within the lease and a wake-up.
    assert "error" in cut, cut
    assert after["status"] == 200 and after["output"] == "Your name is Kim.", after
    assert waited_s < LEASE_S + 6, waited_s
