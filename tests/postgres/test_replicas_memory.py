"""Users' CLAUDE.md across two replicas of the real service (real SDK, fake CLI) on one
database: saved on one, what the other's agents are given ("[[fake:memory]]" answers with
the memory its process was given, and its turn log line carries it).

Each replica has its own DATA_DIR, so its own users' HOMEs: only the database carries the
CLAUDE.md from one to the other.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from tests.postgres.test_replicas import JSON, replica, say
from tests.support.harness import AUTH, RunningService

BUDGET_S = 120


def logged(tmp_path: Path, name: str) -> list[dict]:
    """The turns of replica ``name``'s fake CLIs, in order."""
    lines = (tmp_path / name / "fake.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return sorted((r for r in records if r["event"] == "turn"), key=lambda r: r["at"])


async def put(service: RunningService, content: str) -> None:
    async with service.client() as client:
        reply = await client.put("/user-claude", headers=JSON, json={"content": content})
    assert (reply.status_code, reply.json()) == (200, {"saved": True}), reply.text


async def get(service: RunningService) -> str:
    async with service.client() as client:
        reply = await client.get("/user-claude", headers=AUTH)
    assert reply.status_code == 200, reply.text
    return reply.json()["content"]


async def one_shot_memory(service: RunningService) -> str:
    async with service.client(timeout=60) as client:
        reply = await client.post("/run", headers=JSON, json={"prompt": "[[fake:memory]]"})
    assert reply.status_code == 200, reply.text
    return reply.json()["output"]


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_claude_md_saved_on_one_replica_is_what_a_one_shot_on_another_gets(
    tmp_path, fresh_url
):
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            a = await replica(stack, tmp_path, "a", fresh_url)
            b = await replica(stack, tmp_path, "b", fresh_url)
            before = await one_shot_memory(b)
            await put(a, "Answer in French.")
            seen_on_b = await one_shot_memory(b)
            read_on_b = await get(b)
            await put(a, "Answer in German.")
            changed_on_b = await one_shot_memory(b)
    assert before == "memory: none"
    assert "Answer in French." in seen_on_b, seen_on_b
    assert read_on_b == "Answer in French."
    assert "Answer in German." in changed_on_b and "French" not in changed_on_b, changed_on_b


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_session_live_on_another_replica_restarts_with_a_claude_md_saved_on_one(
    tmp_path, fresh_url
):
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            a = await replica(stack, tmp_path, "a", fresh_url)
            b = await replica(stack, tmp_path, "b", fresh_url)
            first = await say(b, "My name is Alice.")
            await put(a, "Answer in French.")
            # The save's wake-up reaches B asynchronously; the session restarts at its
            # next turn boundary once B has heard it.
            for _ in range(50):
                second = await say(b, "[[fake:memory]]")
                if "French" in second.get("output", ""):
                    break
                await trio.sleep(0.1)
            third = await say(b, "What is my name?")
    assert first["status"] == 200
    assert second["status"] == 200 and second["output"] == "memory: user: Answer in French."
    assert third["output"] == "Your name is Alice."  # the conversation went on
    # The session stayed on B, its process restarted there: the new one given the CLAUDE.md.
    assert not (tmp_path / "a" / "fake.log").exists() or not logged(tmp_path, "a")
    on_b = logged(tmp_path, "b")
    assert on_b[0]["prompt"] == "My name is Alice." and on_b[-1]["prompt"] == "What is my name?"
    assert on_b[-1]["pid"] != on_b[0]["pid"]
    assert "French" not in json.dumps(on_b[0]["memory"])
    assert "Answer in French." in json.dumps(on_b[-1]["memory"])


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_claude_md_removed_on_one_replica_is_gone_from_the_others_one_shots(
    tmp_path, fresh_url
):
    with trio.fail_after(BUDGET_S):
        async with AsyncExitStack() as stack:
            a = await replica(stack, tmp_path, "a", fresh_url)
            b = await replica(stack, tmp_path, "b", fresh_url)
            await put(a, "Answer in French.")
            had = await one_shot_memory(a)
            await put(b, "")  # the removal: PUT with no content
            after = await one_shot_memory(a)
            read_on_a = await get(a)
    assert "Answer in French." in had, had
    assert after == "memory: none"
    assert read_on_a == ""
