"""A one-shot agent kept for its user's next request (AGENT_REUSE_S), end to end.

The real service, the real SDK, the fake CLI (which keeps a one-shot's
conversation in its process, as the real CLI does, and forgets it on ``/clear``).
A one-worker pool, so every request of these tests goes through the same worker:
what a user's request may find of an earlier one is what that worker left.
"""

from __future__ import annotations

import json

import pytest
import trio

from tests.e2e.test_e2e_user_claude import AS_ALICE, AS_BOB, AS_CAROL, KEYS, memory_of, put, run
from tests.support.harness import for_one_test, shared_service, wait_healthy


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One worker keeping agents for a minute; the tests use users of their own (what one
    test's requests leave in the worker is another user's to the next test)."""
    keys = KEYS["API_KEYS"] + ",dave:sk-dave-key,erin:sk-erin-key,frank:sk-frank-key"
    env = {"API_KEYS": keys, "POOL_SIZE": "1", "AGENT_REUSE_S": "60"}
    with shared_service(tmp_path_factory.mktemp("reuse"), env=env) as service:
        yield service


AS_DAVE = {"x-api-key": "sk-dave-key"}
AS_ERIN = {"x-api-key": "sk-erin-key"}
AS_FRANK = {"x-api-key": "sk-frank-key"}


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


async def pid_of(client, headers) -> int:
    """The pid of the agent process that serves this request."""
    output = (await run(client, "[[fake:whoami]]", headers))["output"]
    return json.loads(output.removeprefix("whoami: "))["pid"]


async def sh(client, headers, command: str) -> str:
    return (await run(client, f"[[fake:bash]] {command}", headers))["output"]


LEAVE_FILES = (
    'echo A > note.txt && echo A > "$HOME/loose" && echo A > "$TMPDIR/scratch"'
    ' && echo RULE-FROM-A-REQUEST > "$HOME/.claude/CLAUDE.md" && echo done'
)
LIST_FILES = 'ls -A; echo /; ls -A "$HOME"; echo /; ls -A "$TMPDIR"; echo /; ls -A "$HOME/.claude"'


async def test_a_users_next_one_shot_reuses_a_cleared_agent_with_no_file_left(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            await run(client, "Hello.", AS_ALICE)  # her first: no agent kept (see below)
            first = await pid_of(client, AS_ALICE)
            assert "done" in await sh(client, AS_ALICE, LEAVE_FILES)
            await run(client, "My name is Alice.", AS_ALICE)
            # The conversation was cleared (/clear) between the requests.
            answer = await run(client, "What is my name?", AS_ALICE)
            assert answer["output"] == "I don't know your name."
            listing = await sh(client, AS_ALICE, LIST_FILES)
            for name in ("note.txt", "loose", "scratch", "CLAUDE.md"):
                assert name not in listing, listing
            # The user's CLAUDE.md comes with each request: the current one only.
            assert (await put(client, "RULE-1", AS_ALICE)).status_code == 200
            assert "RULE-1" in await memory_of(client, AS_ALICE)
            assert (await put(client, "RULE-2", AS_ALICE)).status_code == 200
            memory = await memory_of(client, AS_ALICE)
            assert "RULE-2" in memory and "RULE-1" not in memory
            assert await pid_of(client, AS_ALICE) == first  # one process all along


async def test_a_users_first_one_shot_keeps_no_agent_their_second_within_the_window_does(
    service,
):
    """An agent kept for a user who never comes back costs the machine its idle work (with
    the real CLI ~0.4 s of CPU) for nothing: it is kept only for a user whose previous
    one-shot came within AGENT_REUSE_S."""
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            first, second, third = [await pid_of(client, AS_FRANK) for _ in range(3)]
            workers = (await wait_healthy(service, ready=1))["workers"]
    assert first != second  # the first was retired, not kept
    assert third == second  # kept from the second on
    assert workers["kept"] == 1, workers


async def test_another_users_request_never_runs_on_an_agent_that_served_someone(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            await run(client, "Hello.", AS_CAROL)  # (her first: no agent kept for it)
            carols = await pid_of(client, AS_CAROL)
            carols_home = await sh(client, AS_CAROL, 'echo A > note.txt && echo "$HOME"')
            await run(client, "My name is Carol.", AS_CAROL)
            # The only worker keeps Carol's agent; Bob's request gets a new one.
            bobs = await pid_of(client, AS_BOB)
            assert bobs != carols
            assert (await run(client, "What is my name?", AS_BOB))["output"] == (
                "I don't know your name."
            )
            bobs_files = await sh(client, AS_BOB, 'ls -A; echo "$HOME"')
            assert "note.txt" not in bobs_files and carols_home not in bobs_files
            # And Carol's next request does not get Bob's (nor her retired one).
            assert await pid_of(client, AS_CAROL) not in (carols, bobs)


async def test_an_agent_kept_for_a_user_leaves_one_warm_for_the_next_user(service):
    """POOL_SIZE=1: Dave's agent is kept for him (AGENT_REUSE_MAX, by default POOL_SIZE),
    and a spare warms an agent for anyone meanwhile: Erin, coming while the service is
    idle, is served by a process that was warm before she asked (no cold start)."""
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            await run(client, "Hello.", AS_DAVE)  # (his first: no agent kept for it)
            daves = await pid_of(client, AS_DAVE)
            # The service is idle: an agent for anyone is ready besides Dave's.
            workers = (await wait_healthy(service, ready=1))["workers"]
            assert (workers["total"], workers["kept"]) == (1, 1)
            warm_before = set(service.live_fake_pids())
            erins = await pid_of(client, AS_ERIN)
            assert erins != daves and erins in warm_before
