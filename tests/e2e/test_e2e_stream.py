"""End to end: streamed replies (SSE), run ids and cancellation, result metadata.

The real server on 127.0.0.1, the real SDK, the fake CLI; streams are read with
httpx as they arrive (the quart-trio test client cannot stream).
"""

from __future__ import annotations

import json
from contextlib import aclosing
from functools import partial

import httpx
import pytest
import trio

from claude_code_api.config.settings import Settings
from tests.support import sse
from tests.support.harness import (
    API_KEY,
    AUTH,
    RunningService,
    fake_turn_pid,
    for_one_test,
    run_service,
    shared_service,
    wait_healthy,
    wait_until,
)

ALICE = {"x-api-key": "key-alice"}
BOB = {"x-api-key": "key-bob"}
USERS = {"API_KEYS": "alice:key-alice,bob:key-bob"}
METADATA_TYPES = {
    "runId": str,
    "claudeSessionId": str,
    "model": str,
    "costUsd": float,
    "usage": dict,
    "numTurns": int,
    "queuedMs": int,
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One service for the tests that need no settings of their own: the default user,
    alice and bob, model-b allowed, the fake's log in ``fake.log``."""
    workdir = tmp_path_factory.mktemp("stream")
    env = {"API_KEYS": f"{API_KEY},alice:key-alice,bob:key-bob", "ALLOWED_MODELS": "model-b"}
    with shared_service(workdir, env=env) as service:
        yield service


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


def check_metadata(body: dict) -> None:
    for name, kind in METADATA_TYPES.items():
        assert isinstance(body[name], kind), (name, body)
    assert body["queuedMs"] >= 0 and body["numTurns"] >= 1
    assert all(isinstance(count, int) for count in body["usage"].values())


async def runs_of(client: httpx.AsyncClient, headers: dict[str, str]) -> list[dict]:
    return (await client.get("/status", headers=headers)).json()["runs"]


async def wait_runs(client: httpx.AsyncClient, headers: dict[str, str], states: list[str]) -> list:
    found: list = []

    async def reached() -> bool:
        nonlocal found
        found = await runs_of(client, headers)
        return [run["state"] for run in found] == states

    await wait_until(reached, timeout=20)
    return found


async def test_events_arrive_while_the_agent_works_each_with_a_unique_id(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            body = {"prompt": "[[fake:slow:3:0.5]]", "stream": True}
            async with client.stream("POST", "/run", headers=AUTH, json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["x-accel-buffering"] == "no"
                events = await sse.read_all(response)
                run_id = response.headers["x-run-id"]
    names = [event.name for event in events]
    assert names == ["queued", "started", "text", "text", "text", "result"]
    assert len({event.id for event in events}) == len(events)
    assert all(event.id for event in events)
    assert events[0].data == {"runId": run_id, "position": 0}
    assert events[1].data["runId"] == run_id and events[1].data["queuedMs"] >= 0
    assert [event.data["text"] for event in events[2:5]] == ["piece 1", "piece 2", "piece 3"]
    # The first piece came a second before the agent finished: streamed, not buffered.
    assert events[-1].at - events[2].at > 0.8
    result = events[-1].data
    assert result["success"] is True and result["output"] == "piece 1piece 2piece 3"
    assert result["runId"] == run_id
    check_metadata(result)


async def test_accept_header_streams_and_stream_false_answers_json(service):
    with trio.fail_after(60):
        async with service.client() as client:
            headers = {**AUTH, "Accept": "application/json, text/event-stream"}
            async with client.stream(
                "POST", "/run", headers=headers, json={"prompt": "hi"}
            ) as response:
                events = await sse.read_all(response)
            assert [e.name for e in events] == ["queued", "started", "text", "result"]
            plain = await client.post(
                "/run", headers=headers, json={"prompt": "hi", "stream": False}
            )
            assert plain.headers["content-type"] == "application/json"
            assert plain.json()["output"] == "echo: hi"
            assert plain.json()["runId"] == plain.headers["x-run-id"]


async def test_a_crashed_agent_is_an_error_event_and_nothing_follows(service):
    with trio.fail_after(60):
        async with service.client() as client:
            response, events = await sse.stream_run(client, AUTH, {"prompt": "[[fake:crash]] now"})
            assert response.status_code == 200
            assert [e.name for e in events] == ["queued", "started", "text", "error"]
            error = events[-1].data
            assert error["status"] == 502
            assert error["error"].startswith("agent process exited with code 3")
            assert error["runId"] == response.headers["x-run-id"]
            # The pool healed.
            assert (await client.post("/run", headers=AUTH, json={"prompt": "x"})).json()["success"]


async def test_text_with_a_lone_surrogate_streams_to_its_result(service):
    # JSON lets a string hold half a surrogate pair ("\ud83d"); the real CLI's output
    # may too (a JavaScript string cut between the halves of an emoji). A frame that
    # could not be encoded ended the stream with neither a result nor an error event.
    with trio.fail_after(60):
        async with service.client() as client:
            prompt = "half an emoji: \ud83d"
            # (json.dumps escapes it; httpx's json= would fail to encode it as UTF-8.)
            body = json.dumps({"prompt": prompt, "stream": True}).encode()
            async with client.stream("POST", "/run", headers=AUTH, content=body) as response:
                assert response.status_code == 200
                events = await sse.read_all(response)
            assert [e.name for e in events] == ["queued", "started", "text", "result"]
            assert events[-1].data["output"] == f"echo: {prompt}"
            assert events[-2].data == {"text": f"echo: {prompt}"}


async def test_tool_calls_stream_as_tool_use_and_tool_result(service):
    with trio.fail_after(60):
        async with service.client() as client:
            _, events = await sse.stream_run(client, AUTH, {"prompt": "[[fake:tool]] go"})
    names = [e.name for e in events]
    assert names == ["queued", "started", "tool_use", "tool_result", "text", "result"]
    assert events[2].data == {"name": "Bash", "summary": "ls"}
    assert events[3].data == {"ok": True}


async def test_refusals_are_plain_json_before_any_stream(tmp_path):
    env = {"QUEUE_MAX": "0", **USERS}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                stream = {"stream": True}
                bad = await client.post("/run", headers=ALICE, json={"prompt": 3, **stream})
                assert (bad.status_code, bad.json()) == (
                    400,
                    {"error": "prompt: expected a string, got number"},
                )
                option = await client.post(
                    "/run", headers=ALICE, json={"prompt": "x", "maxTurns": 0, **stream}
                )
                assert option.status_code == 400 and option.json()["error"].startswith("maxTurns")
                unauthorized = await client.post("/run", json={"prompt": "x", **stream})
                assert unauthorized.status_code == 401
                media = await client.post(
                    "/run",
                    headers={**ALICE, "Content-Type": "application/xml"},
                    content=b'{"prompt": "x", "stream": true}',
                )
                assert media.status_code == 415
                big = await client.post(
                    "/run",
                    headers={**ALICE, "Content-Type": "application/json"},
                    content=b'{"prompt": "'
                    + b"x" * Settings().max_body_bytes
                    + b'", "stream": true}',
                )
                assert big.status_code == 413
                for refused in (bad, option, unauthorized, media, big):
                    assert refused.headers["content-type"] == "application/json"

                # The one worker is busy and no job may wait: 429 before the stream starts.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            client.post, "/run", headers=ALICE, json={"prompt": "[[fake:sleep:2]]"}
                        )
                    )
                    await wait_runs(client, ALICE, ["running"])
                    full = await client.post(
                        "/run", headers=BOB, json={"prompt": "x", "stream": True}
                    )
                    assert full.status_code == 429
                    assert full.headers["content-type"] == "application/json"
                    assert full.headers["retry-after"] == "1"
                    assert full.json() == {
                        "error": "Queue is full, try again later",
                        "runId": full.headers["x-run-id"],
                    }


async def test_a_client_that_leaves_a_stream_cancels_its_run_and_frees_the_worker(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            body = {"prompt": "[[fake:slow:1000:0.1]]", "stream": True}
            async with client.stream("POST", "/run", headers=AUTH, json=body) as response:
                async with aclosing(sse.events(response)) as events:
                    async for event in events:
                        if event.name == "text":
                            break  # and leave
            await wait_runs(client, AUTH, [])
            await wait_healthy(service, ready=1)
            reply = await client.post("/run", headers=AUTH, json={"prompt": "next"})
            assert reply.json()["output"] == "echo: next"
        # Interrupted, not killed: the agent stopped its turn and was retired normally.
        await service.wait_logged("turn cut short (client gone); agent idle")


# --- run ids and cancellation ---------------------------------------------------------------


async def test_delete_cancels_a_running_run_of_its_owner_only(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client, trio.open_nursery() as nursery:
            replies: dict[str, httpx.Response] = {}

            prompt = "[[fake:slow:1000:0.1]] to be cancelled while running"

            async def run() -> None:
                replies["run"] = await client.post("/run", headers=ALICE, json={"prompt": prompt})

            nursery.start_soon(run)
            [view] = await wait_runs(client, ALICE, ["running"])
            # "running" comes before the agent's turn when the worker first replaces an agent
            # kept for another user: cancel once the agent has begun (it says "piece 1" first).
            await fake_turn_pid(service, prompt)
            run_id = view["runId"]
            assert isinstance(view["queuedAt"], int) and view["startedAt"] >= view["queuedAt"]
            assert "sessionId" not in view
            assert await runs_of(client, BOB) == []  # only one's own runs
            stranger = await client.delete(f"/runs/{run_id}", headers=BOB)
            assert stranger.status_code == 404
            unknown = await client.delete("/runs/no-such-run", headers=ALICE)
            assert unknown.status_code == 404
            assert unknown.json() == {"error": "Run 'no-such-run' not found"}
            cancelled = await client.delete(f"/runs/{run_id}", headers=ALICE)
            assert (cancelled.status_code, cancelled.json()) == (200, {"cancelled": True})
        body = replies["run"].json()
        assert replies["run"].status_code == 200
        assert body["success"] is False and body["cancelled"] is True
        assert body["runId"] == run_id and body["output"].startswith("piece 1")
        async with service.client() as client:
            gone = await client.delete(f"/runs/{run_id}", headers=ALICE)
            assert gone.status_code == 404
        await service.wait_logged("turn cut short (cancelled); agent idle")


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_delete_cancels_a_queued_run_at_once(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client, trio.open_nursery() as nursery:
            replies: dict[str, httpx.Response] = {}

            async def run(name: str, prompt: str) -> None:
                replies[name] = await client.post("/run", headers=ALICE, json={"prompt": prompt})

            nursery.start_soon(run, "first", "[[fake:sleep:3]]")
            await wait_runs(client, ALICE, ["running"])
            nursery.start_soon(run, "second", "never runs")
            views = await wait_runs(client, ALICE, ["running", "queued"])
            queued = views[1]
            assert "startedAt" not in queued
            assert (await client.delete(f"/runs/{queued['runId']}", headers=BOB)).status_code == 404
            cancelled = await client.delete(f"/runs/{queued['runId']}", headers=ALICE)
            assert cancelled.json() == {"cancelled": True}
            await wait_until(lambda: _has(replies, "second"), timeout=5)
            assert "first" not in replies  # answered at once, while the first still runs
            second = replies["second"].json()
            assert second["cancelled"] is True and second["success"] is False
            assert second["runId"] == queued["runId"] and second["queuedMs"] >= 0
            assert second["model"] is None and second["numTurns"] is None
        assert replies["first"].json()["success"] is True


async def _has(replies: dict, name: str) -> bool:
    return name in replies


async def test_a_cancelled_session_turn_streams_its_result_and_the_session_goes_on(service):
    with trio.fail_after(60):
        async with service.client() as client:
            session = {"sessionId": "cancelled-turn"}
            first = await client.post(
                "/run", headers=ALICE, json={"prompt": "My name is Alice.", **session}
            )
            assert first.json()["sessionId"] == "cancelled-turn"
            body = {"prompt": "[[fake:slow:1000:0.1]]", "stream": True, **session}
            async with client.stream("POST", "/run", headers=ALICE, json=body) as response:
                run_id = response.headers["x-run-id"]
                seen = []
                async for event in sse.events(response):  # read to its end
                    seen.append(event)
                    if event.name == "text" and event.data["text"] == "piece 2":
                        [view] = await runs_of(client, ALICE)
                        assert view == {**view, "runId": run_id, "state": "running"}
                        assert view["sessionId"] == "cancelled-turn"
                        assert (
                            await client.delete(f"/runs/{run_id}", headers=BOB)
                        ).status_code == 404
                        deleted = await client.delete(f"/runs/{run_id}", headers=ALICE)
                        assert deleted.json() == {"cancelled": True}
            assert seen[-1].name == "result"
            result = seen[-1].data
            assert result["cancelled"] is True and result["success"] is False
            assert result["sessionId"] == "cancelled-turn" and result["runId"] == run_id
            assert result["claudeSessionId"] == first.json()["claudeSessionId"]
            # Interrupted and drained: the next turn answers its own prompt, remembering.
            after = await client.post(
                "/run", headers=ALICE, json={"prompt": "What is my name?", **session}
            )
            assert after.json()["output"] == "Your name is Alice."
            await service.wait_logged(
                "session:cancelled-turn: turn cut short (cancelled); agent idle"
            )


async def test_metadata_is_present_and_typed(service):
    with trio.fail_after(60):
        async with service.client() as client:
            one_shot = await client.post("/run", headers=AUTH, json={"prompt": "hello"})
            session = await client.post(
                "/run", headers=AUTH, json={"prompt": "hello", "sessionId": "typed"}
            )
    for reply in (one_shot, session):
        body = reply.json()
        check_metadata(body)
        assert body["runId"] == reply.headers["x-run-id"]
        assert body["model"] == "claude-sonnet-4-6"  # CLAUDE_MODEL, as the agent reported it
    assert "sessionId" not in one_shot.json()
    assert session.json()["sessionId"] == "typed"


# --- options ----------------------------------------------------------------------------------


def whoami(reply: httpx.Response) -> dict:
    assert reply.status_code == 200, reply.text
    output = reply.json()["output"]
    assert output.startswith("whoami: "), output
    return json.loads(output.removeprefix("whoami: "))


def started_argv(service: RunningService, log_path, pid: int) -> list[str]:
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    [start] = [r for r in records if r["event"] == "start" and r["pid"] == pid]
    return start["argv"]


async def test_options_are_applied_model_by_control_request_the_rest_by_a_process(service):
    log = service.fake_log
    assert log is not None
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:

            async def ask(**options) -> dict:
                await wait_healthy(service, ready=1)
                reply = await client.post(
                    "/run", headers=AUTH, json={"prompt": "[[fake:whoami]]", **options}
                )
                assert reply.json()["model"] == options.get("model", "claude-sonnet-4-6")
                return whoami(reply)

            plain = await ask()
            assert plain["model"] == "claude-sonnet-4-6"
            assert plain["permissionMode"] == "bypassPermissions"
            assert plain["appendSystemPrompt"] is None

            # Another model on the warm worker: a control request, no new process.
            switched = await ask(model="model-b", permissionMode="plan")
            assert (switched["model"], switched["permissionMode"]) == ("model-b", "plan")
            argv = started_argv(service, log, switched["pid"])
            assert argv[argv.index("--model") + 1] == "claude-sonnet-4-6"
            assert "--append-system-prompt" not in argv

            # Process arguments: a process of its own, started for this run.
            own = await ask(
                systemPrompt="Answer in French.",
                allowedTools=["Read"],
                disallowedTools=["WebFetch"],
                maxTurns=3,
                maxBudgetUsd=0.5,
                permissionMode="dontAsk",
            )
            assert own["appendSystemPrompt"] == "Answer in French."
            assert own["allowedTools"] == ["Read"]
            assert own["disallowedTools"][-1] == "WebFetch"
            assert "SendMessage" in own["disallowedTools"]  # the service's own stay
            assert (own["maxTurns"], own["maxBudgetUsd"]) == (3, 0.5)
            assert own["permissionMode"] == "dontAsk"
            # ... while the warm one stayed warm and serves the next plain run.
            after = await ask()
            assert after["appendSystemPrompt"] is None
            assert after["pid"] not in (own["pid"], switched["pid"])
            starts = [
                json.loads(line)["pid"]
                for line in log.read_text().splitlines()
                if json.loads(line)["event"] == "start"
            ]
            assert starts.index(after["pid"]) < starts.index(own["pid"])


async def test_options_outside_the_ceiling_or_mistyped_are_refused_naming_them(tmp_path):
    env = {
        "ALLOWED_MODELS": "model-b",
        "MAX_TURNS_LIMIT": "5",
        "MAX_BUDGET_USD_LIMIT": "1.5",
        "ALLOWED_PERMISSION_MODES": "plan,default",
    }
    refused = [
        ({"model": "model-c"}, "model: 'model-c' is not allowed here"),
        ({"maxTurns": 6}, "maxTurns: at most 5 allowed here"),
        ({"maxBudgetUsd": 2}, "maxBudgetUsd: at most 1.5 allowed here"),
        ({"permissionMode": "bypassPermissions"}, "permissionMode: 'bypassPermissions' is not"),
        ({"permissionMode": "acceptEdits"}, "permissionMode: 'acceptEdits' is not allowed"),
        ({"permissionMode": "yolo"}, "permissionMode: expected one of"),
        ({"model": 4}, "model: expected"),
        ({"systemPrompt": ["x"]}, "systemPrompt: expected a string"),
        ({"allowedTools": "Bash"}, "allowedTools: expected a list"),
        ({"disallowedTools": ["a,b"]}, "disallowedTools: expected a list"),
        ({"maxTurns": True}, "maxTurns: expected a whole number"),
        ({"maxBudgetUsd": 0}, "maxBudgetUsd: expected a number above 0"),
    ]
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                for options, message in refused:
                    for stream in (False, True):
                        reply = await client.post(
                            "/run",
                            headers=AUTH,
                            json={"prompt": "x", "stream": stream, **options},
                        )
                        assert reply.status_code == 400, (options, reply.text)
                        assert reply.json()["error"].startswith(message), reply.json()
                accepted = await client.post(
                    "/run",
                    headers=AUTH,
                    json={"prompt": "x", "model": "claude-sonnet-4-6", "maxTurns": 5},
                )
                assert accepted.json()["success"] is True


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_session_keeps_its_first_turns_options_but_a_later_model(tmp_path):
    log = tmp_path / "fake.log"
    env = {"ALLOWED_MODELS": "model-b", "FAKE_CLAUDE_LOG": str(log)}
    session = {"sessionId": "s", "prompt": "[[fake:whoami]]"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                first = whoami(
                    await client.post(
                        "/run", headers=AUTH, json={**session, "systemPrompt": "Be terse."}
                    )
                )
                assert first["appendSystemPrompt"] == "Be terse."
                ignored = whoami(
                    await client.post(
                        "/run",
                        headers=AUTH,
                        json={**session, "systemPrompt": "Be verbose.", "maxTurns": 2},
                    )
                )
                assert ignored == first
                switched = whoami(
                    await client.post("/run", headers=AUTH, json={**session, "model": "model-b"})
                )
                assert switched == {**first, "model": "model-b"}  # same process, set_model
    # A restart (the session's process starts anew, resuming): its options stay.
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                resumed = whoami(await client.post("/run", headers=AUTH, json=session))
    assert resumed["pid"] != first["pid"]
    assert resumed == {**first, "model": "model-b", "pid": resumed["pid"]}
