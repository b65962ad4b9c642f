"""The database failing under a running service on DATABASE_URL (real service, fake CLI):
session turns answer 503 "session store unavailable: …" and /health says so; one-shots keep
working; once the database is back the service reconnects by itself, and the conversation goes
on with nothing acknowledged lost."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import trio

from tests.postgres.support import TcpLink
from tests.support.harness import AUTH, RunningService, run_service

JSON = {**AUTH, "Content-Type": "application/json"}


async def run(service: RunningService, prompt: str, session: str | None = "s") -> dict:
    body = {"prompt": prompt} if session is None else {"prompt": prompt, "sessionId": session}
    async with service.client(timeout=60) as client:
        reply = await client.post("/run", headers=JSON, json=body)
    return {"status": reply.status_code, **reply.json()}


async def health(service: RunningService) -> tuple[int, dict]:
    async with service.client() as client:
        reply = await client.get("/health")
    return reply.status_code, reply.json()


@pytest.mark.slow  # ~20 s: it waits for the pool to reconnect (.ci/run runs it)
async def test_a_database_outage_fails_session_turns_not_one_shots_and_heals(
    tmp_path, fresh_url: str, link: TcpLink
) -> None:
    url = link.url(urlsplit(fresh_url).path.lstrip("/"))
    env = {"DATABASE_URL": url, "FAKE_CLAUDE_HOME": "", "SESSION_LEASE_S": "3"}
    with trio.fail_after(180):
        async with run_service(tmp_path, env=env) as service:
            assert (await run(service, "My name is Bo."))["status"] == 200
            link.cut()
            one_shot = await run(service, "hello", session=None)
            turn = await run(service, "What is my name?")
            new_session = await run(service, "hi", session="other")
            await trio.sleep(1.5)  # (the database's check runs every third of a lease)
            during = await health(service)
            link.restore()
            # It reconnects by itself: retried while the pool comes back.
            for _ in range(60):
                after = await run(service, "What is my name?")
                if after["status"] == 200:
                    break
                await trio.sleep(1)
            await trio.sleep(1.5)
            healed = await health(service)
    assert one_shot["status"] == 200 and one_shot["output"] == "echo: hello"
    for failed in (turn, new_session):
        assert failed["status"] == 503, failed
        assert "session store unavailable" in failed["error"], failed
    assert during[0] == 503 and "session store unavailable" in str(during[1]), during
    assert after["status"] == 200 and after["output"] == "Your name is Bo.", after
    assert healed[0] == 200, healed
