"""End to end (real server, real SDK, fake CLI): ``MAX_RUNNING_PER_USER`` (issue 20 §4).

The issue's case: with ``MAX_LIVE_SESSIONS=2``, two 20 s session turns of alice's kept
bob's first session turn waiting until it timed out. Now the default bound (one less
than the larger of ``POOL_SIZE`` and ``MAX_LIVE_SESSIONS``: 1 here) lets bob's turn start
at once, and alice's one-shot and session turn count together. Alice's long turns are
cancelled once the test has seen what it needs, so it takes seconds, not 20.
"""

from __future__ import annotations

import httpx
import trio

from tests.support.harness import run_service, wait_until

ALICE = {"x-api-key": "key-alice", "Content-Type": "application/json"}
BOB = {"x-api-key": "key-bob", "Content-Type": "application/json"}
ENV = {"API_KEYS": "alice:key-alice,bob:key-bob", "MAX_LIVE_SESSIONS": "2"}
LONG = "[[fake:sleep:20]] long"


async def runs(client: httpx.AsyncClient, headers: dict[str, str]) -> list[dict]:
    status = await client.get("/status", headers=headers)
    assert status.status_code == 200, status.text
    return status.json()["runs"]


async def states(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str | None, str]:
    """The caller's runs as {sessionId (None: a one-shot): state}."""
    return {run.get("sessionId"): run["state"] for run in await runs(client, headers)}


async def test_one_users_long_session_turns_do_not_keep_anothers_first_turn_waiting(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env=ENV) as service:
            async with service.client() as client, trio.open_nursery() as nursery:
                replies: dict[str, httpx.Response] = {}

                async def post(name: str, headers: dict[str, str], body: dict) -> None:
                    replies[name] = await client.post("/run", headers=headers, json=body)

                for session in ("s1", "s2"):
                    nursery.start_soon(post, session, ALICE, {"prompt": LONG, "sessionId": session})

                async def one_running_one_queued() -> bool:
                    return sorted((await states(client, ALICE)).values()) == [
                        "queued",
                        "running",
                    ]

                await wait_until(one_running_one_queued, timeout=15)
                started = trio.current_time()
                bob = await client.post(
                    "/run", headers=BOB, json={"prompt": "hello", "sessionId": "b1"}
                )
                took = trio.current_time() - started
                assert bob.status_code == 200 and bob.json()["output"] == "echo: hello"
                assert took < 10, f"bob's first turn took {took:.1f} s"
                # Alice's second turn is still waiting for her first to end.
                assert sorted((await states(client, ALICE)).values()) == ["queued", "running"]
                for session in ("s1", "s2"):
                    closed = await client.request(
                        "DELETE", "/session", headers=ALICE, json={"sessionId": session}
                    )
                    assert closed.status_code == 200
        assert replies["s1"].status_code == replies["s2"].status_code == 200


async def test_a_users_one_shot_and_session_turn_count_together(tmp_path):
    """POOL_SIZE=2, MAX_LIVE_SESSIONS=2 (bound 1): alice's running one-shot keeps her
    session turn queued, with a live slot free, while bob's session turn runs at once;
    cancelling her one-shot lets her turn start."""
    with trio.fail_after(60):
        env = {**ENV, "POOL_SIZE": "2"}
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client, trio.open_nursery() as nursery:
                replies: dict[str, httpx.Response] = {}

                async def post(name: str, headers: dict[str, str], body: dict) -> None:
                    replies[name] = await client.post("/run", headers=headers, json=body)

                nursery.start_soon(post, "one-shot", ALICE, {"prompt": LONG})

                async def one_shot_running() -> bool:
                    return await states(client, ALICE) == {None: "running"}

                await wait_until(one_shot_running, timeout=15)
                nursery.start_soon(post, "turn", ALICE, {"prompt": "hi", "sessionId": "s1"})

                async def turn_queued() -> bool:
                    return await states(client, ALICE) == {None: "running", "s1": "queued"}

                await wait_until(turn_queued, timeout=10)
                bob = await client.post(
                    "/run", headers=BOB, json={"prompt": "hello", "sessionId": "b1"}
                )
                assert bob.status_code == 200 and bob.json()["output"] == "echo: hello"
                assert await states(client, ALICE) == {None: "running", "s1": "queued"}
                (one_shot,) = [r for r in await runs(client, ALICE) if "sessionId" not in r]
                cancelled = await client.delete(f"/runs/{one_shot['runId']}", headers=ALICE)
                assert cancelled.status_code == 200
        assert replies["one-shot"].json()["cancelled"] is True
        assert replies["turn"].status_code == 200
        assert replies["turn"].json()["output"] == "echo: hi"
