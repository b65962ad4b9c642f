"""End to end: multi-turn sessions on the real server, real SDK, fake CLI.

The fake CLI keeps transcripts on disk and is as strict about ``--session-id``
and ``--resume`` as Claude Code, so a session that loses its conversation, or
reuses a UUID it should not, shows up here.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.support.harness import (
    API_KEY,
    AUTH,
    fake_turn_pid,
    for_one_test,
    run_service,
    shared_service,
    wait_healthy,
    wait_no_live_fakes,
    wait_until,
)

JSON = {**AUTH, "Content-Type": "application/json"}
# Users of the shared service with a test of their own (status lists a user's sessions).
ALICE = {"x-api-key": "key-alice", "Content-Type": "application/json"}
CRASH = {"x-api-key": "key-crash", "Content-Type": "application/json"}
SLOW = {"x-api-key": "key-slow", "Content-Type": "application/json"}
DELETER = {"x-api-key": "key-deleter", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One service for the tests that need no settings of their own (an interrupted turn
    gets 1 s, as test_a_timed_out_turn_does_not_leak_into_the_next wants); each of them
    talks as a user of its own."""
    env = {
        "API_KEYS": ",".join(
            [API_KEY, "alice:key-alice", "crash:key-crash", "slow:key-slow"]
            + ["ann:key-ann", "ben:key-ben", "deleter:key-deleter"]
        ),
        "INTERRUPT_GRACE_MS": "1000",
    }
    with shared_service(tmp_path_factory.mktemp("sessions"), env=env) as service:
        yield service


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


async def say(client: httpx.AsyncClient, session: str, prompt: str, headers=JSON, **extra):
    return await client.post(
        "/run", headers=headers, json={"prompt": prompt, "sessionId": session, **extra}
    )


async def test_alice_is_remembered_across_turns(service):
    with trio.fail_after(60):
        async with service.client() as client:
            first = await say(client, "session-1", "My name is Alice.", ALICE)
            assert first.status_code == 200, first.text
            assert first.json()["output"] == "Nice to meet you, Alice."
            second = await say(client, "session-1", "What is my name?", ALICE)
            original = {"success", "output", "durationMs", "timedOut"}
            assert {k: v for k, v in second.json().items() if k in original} == {
                "success": True,
                "output": "Your name is Alice.",
                "durationMs": second.json()["durationMs"],
                "timedOut": False,
            }
            # Metadata is added, with the session's own ids.
            assert second.json()["sessionId"] == "session-1"
            assert second.json()["claudeSessionId"] == first.json()["claudeSessionId"]
            status = (await client.get("/status", headers=ALICE)).json()
            [view] = status["sessions"]
            assert view["id"] == "session-1" and view["turns"] == 2
            assert view["state"] == "live"


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_remembered_after_the_service_restarts(tmp_path):
    with trio.fail_after(90):
        async with run_service(tmp_path) as service:
            async with service.client() as client:
                assert (await say(client, "s", "My name is Alice.")).status_code == 200
        await wait_no_live_fakes(service)
        async with run_service(tmp_path) as service:
            async with service.client() as client:
                reply = await say(client, "s", "What is my name?")
                assert reply.json()["output"] == "Your name is Alice."
                [view] = (await client.get("/status", headers=AUTH)).json()["sessions"]
                assert view["turns"] == 2


async def test_remembered_after_a_crash_mid_turn(service):
    with trio.fail_after(60):
        async with service.client() as client:
            await say(client, "s", "My name is Alice.", CRASH)
            crashed = await say(client, "s", "boom [[fake:crash:7]]", CRASH)
            assert crashed.status_code == 502
            assert "exited with code 7" in crashed.json()["error"]
            reply = await say(client, "s", "What is my name?", CRASH)
            assert reply.json()["output"] == "Your name is Alice."


async def test_a_timed_out_turn_does_not_leak_into_the_next(service):
    with trio.fail_after(60):
        async with service.client() as client:
            await say(client, "s", "My name is Alice.", SLOW)
            slow = await say(client, "s", "[[fake:slow:50:0.1]]", SLOW, timeoutMs=600)
            assert slow.json()["timedOut"] is True
            assert "piece 1" in slow.json()["output"]
            nxt = await say(client, "s", "second question", SLOW)
            assert nxt.json()["output"] == "echo: second question"
            name = await say(client, "s", "What is my name?", SLOW)
            assert name.json()["output"] == "Your name is Alice."


async def test_two_users_with_one_session_id_are_isolated(service):
    with trio.fail_after(60):
        ann = {"x-api-key": "key-ann", "Content-Type": "application/json"}
        ben = {"Authorization": "Bearer key-ben", "Content-Type": "application/json"}
        users = service.data_dir / "users"
        earlier = set(users.iterdir()) if users.exists() else set()
        async with service.client() as client:
            await say(client, "shared", "My name is Alice.", headers=ann)
            reply = await say(client, "shared", "What is my name?", headers=ben)
            assert reply.json()["output"] == "I don't know your name."
            # ben cannot delete ann's session; after his own is gone, ann's remains
            gone = await client.request(
                "DELETE", "/session", headers=ben, json={"sessionId": "shared"}
            )
            assert gone.status_code == 200
            again = await client.request(
                "DELETE", "/session", headers=ben, json={"sessionId": "shared"}
            )
            assert again.status_code == 404
            assert (await say(client, "shared", "What is my name?", headers=ann)).json()[
                "output"
            ] == "Your name is Alice."
            ben_status = (await client.get("/status", headers=ben)).json()
            assert ben_status["sessions"] == []
        assert len(set(users.iterdir()) - earlier) == 2  # a workspace each


@pytest.mark.slow  # ~60 agent starts: 8-20 s on a 2-CPU machine
async def test_thirty_sessions_with_four_live_processes(tmp_path):
    with trio.fail_after(120):
        env = {"MAX_LIVE_SESSIONS": "4", "POOL_SIZE": "1", "QUEUE_MAX": "100"}
        async with run_service(tmp_path, env=env) as service:
            most_live = 0

            async def watch_processes() -> None:
                nonlocal most_live
                while True:
                    most_live = max(most_live, len(service.live_fake_pids()))
                    await trio.sleep(0.01)

            answers: dict[int, str] = {}
            async with service.client() as client:

                async def converse(n: int) -> None:
                    first = await say(client, f"s{n}", f"My name is N{n}.")
                    assert first.status_code == 200, first.text
                    reply = await say(client, f"s{n}", "What is my name?")
                    answers[n] = reply.json()["output"]

                async with trio.open_nursery() as watcher:
                    watcher.start_soon(watch_processes)
                    async with trio.open_nursery() as nursery:
                        for n in range(30):
                            nursery.start_soon(converse, n)
                    watcher.cancel_scope.cancel()
                assert answers == {n: f"Your name is N{n}." for n in range(30)}
                # 4 session processes + the one-shot worker (+1 retiring/warming at most)
                assert most_live <= 4 + 2, most_live
                sessions = (await client.get("/status", headers=AUTH)).json()["sessions"]
                assert len(sessions) == 30
                assert sum(s["state"] != "hibernated" for s in sessions) <= 4


async def test_delete_session_semantics(service):
    named, long = "My name is Alice. (deleted)", "[[fake:slow:100:0.1]] (deleted while running)"
    with trio.fail_after(60):
        async with service.client() as client:

            async def delete(session: str, headers=DELETER) -> httpx.Response:
                return await client.request(
                    "DELETE", "/session", headers=headers, json={"sessionId": session}
                )

            assert (await delete("never")).status_code == 404
            assert "not found" in (await delete("never")).json()["error"]
            await say(client, "s", named, DELETER)
            closed = await delete("s")
            assert closed.status_code == 200 and closed.json() == {"closed": True}
            assert (await delete("s")).status_code == 404
            # the same sessionId now starts a new conversation (a new Claude UUID)
            fresh = await say(client, "s", "What is my name?", DELETER)
            assert fresh.status_code == 200, fresh.text
            assert fresh.json()["output"] == "I don't know your name."

            # DELETE while a turn runs: that turn is interrupted and answers success:false
            replies: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:

                async def long_turn() -> None:
                    replies.append(await say(client, "s", long, DELETER))

                nursery.start_soon(long_turn)

                async def busy() -> bool:
                    status = (await client.get("/status", headers=DELETER)).json()
                    return any(s["state"] == "busy" for s in status["sessions"])

                await wait_until(busy)
                started = trio.current_time()
                assert (await delete("s")).status_code == 200
            assert trio.current_time() - started < 5
            assert replies[0].status_code == 200
            assert replies[0].json()["success"] is False
            assert replies[0].json()["timedOut"] is False
            # bad bodies
            bad = await client.request("DELETE", "/session", headers=DELETER, json={})
            assert bad.status_code == 400 and "sessionId" in bad.json()["error"]
        # Both of the session's processes are gone: the first conversation's, and the one
        # whose turn the DELETE cut short.
        pids = {await fake_turn_pid(service, named), await fake_turn_pid(service, long)}

        async def both_gone() -> bool:
            return not pids & set(service.live_fake_pids())

        await wait_until(both_gone, timeout=10)


async def test_session_id_is_validated(service):
    with trio.fail_after(60):
        async with service.client() as client:
            for bad in ["", "a/b", "x" * 129, "../etc", "tab\there", "nul\x00", 5, True]:
                reply = await client.post(
                    "/run", headers=JSON, json={"prompt": "x", "sessionId": bad}
                )
                assert reply.status_code == 400, bad
                assert "sessionId" in reply.json()["error"]


async def test_a_session_waiting_line_is_bounded(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"SESSION_QUEUE_MAX": "1"}) as service:
            async with service.client() as client:
                await say(client, "s", "warm up")
                replies: dict[str, httpx.Response] = {}

                async def turn(name: str, prompt: str) -> None:
                    replies[name] = await say(client, "s", prompt)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(turn, "running", "[[fake:slow:10:0.2]]")
                    await trio.sleep(0.3)
                    nursery.start_soon(turn, "waiting", "second")
                    await trio.sleep(0.3)
                    await turn("refused", "third")
                assert replies["refused"].status_code == 429
                assert replies["refused"].headers["retry-after"] == "1"
                assert replies["running"].json()["success"] is True
                assert replies["waiting"].json()["output"] == "echo: second"


async def test_an_idle_session_hibernates_and_wakes_with_its_memory(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"SESSION_IDLE_MS": "500"}) as service:
            # The one-shot worker's agent may start after the session's: tell them apart.
            await wait_healthy(service, ready=1)
            worker_pids = set(service.fake_pids())
            async with service.client() as client:
                await say(client, "s", "My name is Alice.")
                [session_pid] = set(service.fake_pids()) - worker_pids

                async def hibernated() -> bool:
                    status = (await client.get("/status", headers=AUTH)).json()
                    return status["sessions"][0]["state"] == "hibernated"

                await wait_until(hibernated, timeout=10)

                async def process_gone() -> bool:
                    return session_pid not in service.live_fake_pids()

                await wait_until(process_gone, timeout=10)
                reply = await say(client, "s", "What is my name?")
                assert reply.json()["output"] == "Your name is Alice."


async def test_a_user_at_the_bound_drops_the_least_recently_used_hibernated_session(tmp_path):
    """claude-code-web never closes a session: the bound keeps the newest, it never refuses."""
    env = {
        "FAKE_CLAUDE_HOME": "",  # transcripts where the real CLI keeps them
        "MAX_SESSIONS_PER_USER": "2",
        "MAX_LIVE_SESSIONS": "1",  # so the older sessions are hibernated, not live
    }
    with trio.fail_after(90):
        async with run_service(tmp_path, env=env) as service:
            users = service.data_dir / "users"
            async with service.client() as client:
                first = await say(client, "s1", "My name is Alice.")
                assert first.status_code == 200, first.text
                s1_transcript = first.json()["claudeSessionId"] + ".jsonl"
                assert (await say(client, "s2", "My name is Bob.")).status_code == 200
                third = await say(client, "s3", "hello")
                assert third.status_code == 200, third.text  # not 429

                status = (await client.get("/status", headers=AUTH)).json()
                assert {s["id"] for s in status["sessions"]} == {"s2", "s3"}
                assert status["sessionsTotal"] == 2
                # s1's files went with it; s2's are kept.
                assert s1_transcript not in {p.name for p in users.rglob("*.jsonl")}
                assert len(list(users.rglob("*.jsonl"))) == 2
                scrape = (await client.get("/metrics")).text
                assert "claude_code_api_sessions_evicted_total 1.0" in scrape
                await service.wait_logged("evicted session 's1'")

                # s1 used again is a new conversation, as after a DELETE (and s2 goes now).
                again = await say(client, "s1", "What is my name?")
                assert again.status_code == 200, again.text
                assert again.json()["output"] == "I don't know your name."
                assert again.json()["claudeSessionId"] != first.json()["claudeSessionId"]
                status = (await client.get("/status", headers=AUTH)).json()
                assert {s["id"] for s in status["sessions"]} == {"s1", "s3"}
