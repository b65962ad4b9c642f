"""End to end on DATABASE_URL: the real service (real SDK, fake CLI) keeps its session
records in PostgreSQL, not in DATA_DIR/sessions.sqlite3, and finds them after a restart."""

from __future__ import annotations

import psycopg
import trio

from tests.support.harness import AUTH, run_service, wait_no_live_fakes

JSON = {**AUTH, "Content-Type": "application/json"}


async def say(client, session: str, prompt: str):
    return await client.post("/run", headers=JSON, json={"prompt": prompt, "sessionId": session})


async def test_a_session_on_database_url_is_served_after_a_restart(tmp_path, fresh_url):
    env = {"DATABASE_URL": fresh_url}
    with trio.fail_after(120):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                first = await say(client, "s", "My name is Alice.")
                assert first.status_code == 200, first.text
        await wait_no_live_fakes(service)
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                reply = await say(client, "s", "What is my name?")
                assert reply.json()["output"] == "Your name is Alice."
                [view] = (await client.get("/status", headers=AUTH)).json()["sessions"]
                assert view["id"] == "s" and view["turns"] == 2
    with psycopg.connect(fresh_url) as connection:
        rows = connection.execute(
            "SELECT user_id, session_id, turns, claude_session_id FROM sessions"
        ).fetchall()
    assert rows == [("api", "s", 2, first.json()["claudeSessionId"])]
    assert not list(tmp_path.rglob("sessions.sqlite3*"))
