"""Runs across two replicas of the real service (real SDK, fake CLI) on one database: each
lists the other's runs in ``/status`` and cancels them with ``DELETE /runs/{runId}``."""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from tests.postgres.test_replicas import replica, replica_env
from tests.support.harness import RunningService, run_service

ALICE = {"x-api-key": "key-alice"}
BOB = {"x-api-key": "key-bob"}
USERS = {"API_KEYS": "alice:key-alice,bob:key-bob"}
BUDGET_S = 90


async def runs_on(service: RunningService, who: dict[str, str]) -> list[dict]:
    async with service.client() as client:
        return (await client.get("/status", headers=who)).json()["runs"]


async def listed(service: RunningService, who: dict[str, str], count: int = 1) -> list[dict]:
    """``who``'s runs on ``service`` once there are ``count`` (the other replica writes
    them within about one write)."""
    while len(views := await runs_on(service, who)) != count:
        await trio.sleep(0.05)
    return views


async def post(service: RunningService, replies: dict[str, httpx.Response], name: str, body: dict):
    async with service.client(timeout=60) as client:
        replies[name] = await client.post("/run", headers=ALICE, json=body)


async def post_to_die(service: RunningService, body: dict) -> None:
    """Post a run to a replica that will be killed: its connection fails."""
    try:
        await post(service, {}, "", body)
    except httpx.RemoteProtocolError:
        pass


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_run_on_one_replica_is_listed_and_cancelled_by_the_other(tmp_path, fresh_url):
    replies: dict[str, httpx.Response] = {}
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            a = await replica(stack, tmp_path, "a", fresh_url, **USERS)
            b = await replica(stack, tmp_path, "b", fresh_url, **USERS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, a, replies, "run", {"prompt": "[[fake:sleep:5]] x"})
                [view] = await listed(b, ALICE)
                while view["state"] != "running":
                    [view] = await listed(b, ALICE)
                run_id = view["runId"]
                assert [v["runId"] for v in await runs_on(a, ALICE)] == [run_id]
                assert "sessionId" not in view and view["startedAt"] >= view["queuedAt"]
                assert await runs_on(b, BOB) == []  # only one's own runs
                async with b.client() as client:
                    stranger = await client.delete(f"/runs/{run_id}", headers=BOB)
                    unknown = await client.delete("/runs/no-such-run", headers=ALICE)
                    cancelled = await client.delete(f"/runs/{run_id}", headers=ALICE)
            assert stranger.status_code == 404
            assert (unknown.status_code, unknown.json()) == (
                404,
                {"error": "Run 'no-such-run' not found"},
            )
            assert (cancelled.status_code, cancelled.json()) == (200, {"cancelled": True})
            body = replies["run"].json()
            assert replies["run"].status_code == 200, body
            assert body["cancelled"] is True and body["runId"] == run_id
            # Answered: gone from both replicas' lists, and no longer cancellable.
            await listed(b, ALICE, 0)
            assert await runs_on(a, ALICE) == []
            async with b.client() as client:
                assert (await client.delete(f"/runs/{run_id}", headers=ALICE)).status_code == 404


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_session_turn_on_one_replica_is_listed_busy_and_cancelled_by_the_other(
    tmp_path, fresh_url
):
    replies: dict[str, httpx.Response] = {}
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            a = await replica(stack, tmp_path, "a", fresh_url, **USERS)
            b = await replica(stack, tmp_path, "b", fresh_url, **USERS)
            turn = {"prompt": "[[fake:sleep:5]] x", "sessionId": "s"}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, a, replies, "turn", turn)
                [view] = await listed(b, ALICE)
                while view["state"] != "running":
                    [view] = await listed(b, ALICE)
                assert view["sessionId"] == "s"
                async with b.client() as client:
                    status = (await client.get("/status", headers=ALICE)).json()
                    cancelled = await client.delete(f"/runs/{view['runId']}", headers=ALICE)
            assert [(s["id"], s["state"]) for s in status["sessions"]] == [("s", "busy")]
            assert (cancelled.status_code, cancelled.json()) == (200, {"cancelled": True})
            assert replies["turn"].json()["cancelled"] is True


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_killed_replicas_runs_are_no_longer_listed_once_its_row_expires(
    tmp_path: Path, fresh_url: str
):
    with trio.fail_after(BUDGET_S):
        env = replica_env(tmp_path, "b", fresh_url, SESSION_LEASE_S="3", **USERS)
        async with run_service(tmp_path / "b", env=env) as b:
            env = replica_env(tmp_path, "a", fresh_url, SESSION_LEASE_S="3", **USERS)
            async with run_service(
                tmp_path / "a", env=env, stop_signal=None, expect_exit=None
            ) as a:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(post_to_die, a, {"prompt": "[[fake:sleep:30]]"})
                    [view] = await listed(b, ALICE)
                    a.process.send_signal(signal.SIGKILL)
                    await a.process.wait()
            killed_at = trio.current_time()
            await listed(b, ALICE, 0)
            # Within its row's time to live (3 s) from its last renewal, and a poll.
            assert trio.current_time() - killed_at < 3 + 1
            async with b.client() as client:
                gone = await client.delete(f"/runs/{view['runId']}", headers=ALICE)
            assert gone.status_code == 404
