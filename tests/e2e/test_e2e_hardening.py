"""Defects found by attacking the running service, each reproduced end to end.

The real service in a subprocess with the fake CLI; each test names the defect
it pins (issue 8).
"""

from __future__ import annotations

import trio

from tests.support.harness import AUTH, run_service, wait_health_status, wait_healthy


async def run(client, prompt: str, **fields) -> dict:
    response = await client.post("/run", json={"prompt": prompt, **fields}, headers=AUTH)
    return {"status": response.status_code, **response.json()}


async def test_a_stdout_line_over_one_mebibyte_does_not_fail_the_turn(tmp_path):
    # The SDK's default line limit is 1 MiB; a reply of MAX_OUTPUT_CHARS must fit.
    with trio.fail_after(60):
        async with run_service(tmp_path) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await run(client, "[[fake:big:1500000]]")
    assert reply["status"] == 200, reply.get("error")
    assert reply["success"] is True
    assert len(reply["output"]) == 1_000_000 and reply["outputTruncated"] is True


async def test_a_workspace_that_cannot_be_created_is_named_and_answered_at_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "workers").write_text("not a directory")  # every worker's home fails
    env = {"RESTART_BACKOFF_MAX_MS": "500"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            health = await wait_health_status(service, "degraded")
            async with service.client() as client:
                started = trio.current_time()
                reply = await run(client, "hello", timeoutMs=60_000)
                took = trio.current_time() - started
    assert "cannot prepare the agent's directory" in health["reason"]
    assert reply["status"] == 503 and "cannot prepare the agent's directory" in reply["error"]
    assert took < 2


async def test_a_session_store_deleted_while_running_fails_the_turn_and_shows_in_health(
    tmp_path,
):
    with trio.fail_after(60):
        async with run_service(tmp_path) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                assert (await run(client, "one", sessionId="s1"))["status"] == 200
                (service.data_dir / "sessions.sqlite3").unlink()
                reply = await run(client, "two", sessionId="s1")
                health = await client.get("/health")
    assert reply["status"] == 503
    assert "session store unavailable" in reply["error"] and "restart" in reply["error"]
    assert health.status_code == 503
    assert "session store unavailable" in health.json()["reason"]


async def test_one_user_cannot_hold_more_sessions_than_allowed(tmp_path):
    env = {"MAX_SESSIONS_PER_USER": "2"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                first = await run(client, "hi", sessionId="s1")
                second = await run(client, "hi", sessionId="s2")
                third = await run(client, "hi", sessionId="s3")
                again = await run(client, "hi again", sessionId="s1")  # existing: fine
                page = (await client.get("/status?limit=1", headers=AUTH)).json()
                rest = (await client.get("/status?limit=1&offset=1", headers=AUTH)).json()
                bad = await client.get("/status?limit=0", headers=AUTH)
    assert [first["status"], second["status"], again["status"]] == [200, 200, 200]
    assert third["status"] == 429 and "already has 2 sessions" in third["error"]
    assert page["sessionsTotal"] == 2 and len(page["sessions"]) == 1
    assert {page["sessions"][0]["id"], rest["sessions"][0]["id"]} == {"s1", "s2"}
    assert bad.status_code == 400 and "limit" in bad.json()["error"]
