"""End to end: real server on 127.0.0.1, real claude-agent-sdk, fake CLI."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import trio

from claude_code_api.config.settings import Settings
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
# 1 MiB, and room for the images a request may carry.
MAX_BODY_BYTES = Settings().max_body_bytes


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One service with the default settings for the tests that need no settings of their
    own; the module checks it exits 0 with no agent left (shared_service)."""
    with shared_service(tmp_path_factory.mktemp("run")) as service:
        yield service


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


async def totals(client: httpx.AsyncClient) -> tuple[int, int, int]:
    """(totalProcessed, totalErrors, the workers' jobs): a test counts differences."""
    status = (await client.get("/status", headers=AUTH)).json()
    jobs = sum(worker["jobs"] for worker in status["workers"])
    return status["totalProcessed"], status["totalErrors"], jobs


async def test_readme_curl_examples(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            processed, errors, jobs = await totals(client)
            health = await client.get("/health")
            assert health.status_code == 200
            body = health.json()
            assert body["status"] == "ok"
            assert body["workers"] == {
                "total": 1,
                "ready": 1,
                "busy": 0,
                "starting": 0,
                "error": 0,
                "kept": 0,
                # Spares (AGENT_REUSE_S): for the agent a job takes and the one kept.
                "dormant": 2,
            }
            assert body["queue"] == {"length": 0, "maxSize": 20}
            assert isinstance(body["uptime"], int)

            reply = await client.post("/run", headers=JSON, json={"prompt": "What is 2+2?"})
            assert reply.status_code == 200
            body = reply.json()
            assert body["success"] is True
            assert body["output"] == "echo: What is 2+2?"
            assert body["timedOut"] is False
            assert isinstance(body["durationMs"], int) and body["durationMs"] >= 0
            # The original's fields, then the metadata this service adds, in that order.
            assert list(body) == ["success", "output", "durationMs", "timedOut"] + [
                "runId",
                "claudeSessionId",
                "model",
                "costUsd",
                "usage",
                "numTurns",
                "queuedMs",
            ]
            assert reply.headers["x-run-id"] == body["runId"]

            bearer = await client.post(
                "/run",
                headers={"Authorization": f"Bearer {API_KEY}"},
                content=b'{"prompt": "via bearer"}',
            )
            assert bearer.json()["output"] == "echo: via bearer"

            status = (await client.get("/status", headers=AUTH)).json()
            assert await totals(client) == (processed + 2, errors, jobs + 2)
            assert status["queueLength"] == 0 and status["maxQueueSize"] == 20
            # POOL_SIZE=1 and its spares (AGENT_REUSE_S): POOL_SIZE + AGENT_REUSE_MAX.
            assert [w["id"] for w in status["workers"]] == ["worker-0", "worker-1", "worker-2"]
        # the worker keeps its process for the same user's next job; shared_service checks
        # that every agent is closed when the service exits
        assert len(service.fake_pids()) >= 1


async def test_each_one_shot_job_gets_a_fresh_process(tmp_path):
    with trio.fail_after(60):
        log = tmp_path / "fake.log"
        # AGENT_REUSE_S=0: no agent is kept for its user's next request (test_e2e_reuse.py).
        env = {"FAKE_CLAUDE_LOG": str(log), "AGENT_REUSE_S": "0"}
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                for prompt in ("My name is Alice.", "What is my name?"):
                    reply = await client.post("/run", headers=JSON, json={"prompt": prompt})
                    assert reply.status_code == 200
                # no conversation leaks from one request to the next
                assert reply.json()["output"] == "I don't know your name."
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        turns = [e for e in entries if e.get("event") == "turn"]
        assert len({t["pid"] for t in turns}) == 2
        starts = [e for e in entries if "argv" in e]
        argv = starts[0]["argv"]
        # Claude Code's default system prompt (the preset), not the SDK's empty one
        assert "--system-prompt" not in argv or argv[argv.index("--system-prompt") + 1] != ""
        assert "bypassPermissions" in argv
        assert "claude-sonnet-4-6" in argv
        # Not the service's key: a token of its own, for the model proxy (model_proxy.py).
        assert starts[0]["anthropic_api_key_head"] == "ccapi-agent-"


async def test_with_an_api_key_agents_get_a_token_of_their_own_and_the_proxy(tmp_path):
    with trio.fail_after(60):
        log = tmp_path / "fake.log"
        env = {
            "FAKE_CLAUDE_LOG": str(log),
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "USE_CLAUDE_API_KEY": "1",
            "CLAUDE_MODEL": "claude-opus-test",
        }
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
        start = json.loads(log.read_text().splitlines()[0])
        assert start["anthropic_api_key_head"] == "ccapi-agent-"  # never "sk-ant-test"
        assert start["anthropic_base_url"].startswith("http://127.0.0.1:")
        assert "claude-opus-test" in start["argv"]


async def test_auth_and_bad_input_get_json_errors(service):
    with trio.fail_after(60):
        async with service.client() as client:
            cases = [
                (client.post("/run", json={"prompt": "x"}), 401, "Missing API key"),
                (
                    client.post("/run", headers={"Authorization": "Basic x"}, json={"prompt": "x"}),
                    401,
                    "Missing authorization token",
                ),
                (
                    client.post("/run", headers={"x-api-key": "nope"}, json={"prompt": "x"}),
                    401,
                    "Invalid API key",
                ),
                (
                    client.get("/status", headers={"Authorization": "Bearer nope"}),
                    401,
                    "Invalid or expired token",
                ),
                (client.post("/run", headers=JSON, content=b"{not json"), 400, "Invalid JSON"),
                (client.post("/run", headers=JSON, json={"prompt": 5}), 400, "prompt"),
                (client.post("/run", headers=JSON, json={}), 400, "prompt"),
                (client.post("/run", headers=JSON, json=["prompt"]), 400, "JSON object"),
                (
                    client.post("/run", headers=JSON, json={"prompt": "x", "timeoutMs": -5}),
                    400,
                    "timeoutMs",
                ),
                (
                    client.post("/run", headers=JSON, json={"prompt": "x", "timeoutMs": 10**12}),
                    400,
                    "timeoutMs",
                ),
                (
                    client.post("/run", headers=JSON, json={"prompt": "x" * 200_001}),
                    400,
                    "200000",
                ),
                (
                    client.post("/run", headers=JSON, content=b"{" + b" " * MAX_BODY_BYTES + b"}"),
                    413,
                    "exceeds",
                ),
                (
                    client.post(
                        "/run",
                        headers={**AUTH, "Content-Type": "application/xml"},
                        content=b"<a/>",
                    ),
                    415,
                    "Content-Type",
                ),
                (client.get("/nowhere"), 404, "Not found"),
                (client.get("/run"), 405, "Method not allowed"),
            ]
            for request, status, fragment in cases:
                reply = await request
                assert reply.status_code == status, (status, reply.text)
                assert reply.headers["content-type"].startswith("application/json")
                assert fragment in reply.json()["error"], reply.text
            # The OpenAPI document: a 405 names the methods the route serves.
            assert (await client.get("/run")).headers["allow"] == "OPTIONS, POST"
        assert "Traceback" not in service.log_text()


async def test_no_api_keys_means_every_authenticated_route_is_401(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"API_KEYS": ""}) as service:
            async with service.client() as client:
                assert (await client.get("/health")).status_code in (200, 503)
                reply = await client.post("/run", headers=JSON, json={"prompt": "x"})
                assert reply.status_code == 401
                assert (await client.get("/status", headers=AUTH)).status_code == 401
        assert "every authenticated route will answer 401" in service.log_text()


async def test_timeout_interrupts_the_agent_and_returns_partial_output(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        # This test's agents: the warm one that takes the turn, and those started after it.
        earlier = set(service.fake_pids()) - set(service.live_fake_pids())
        async with service.client() as client:
            started = trio.current_time()
            reply = await client.post(
                "/run",
                headers=JSON,
                json={"prompt": "[[fake:slow:50:0.1]]", "timeoutMs": 1000},
            )
            elapsed = trio.current_time() - started
            assert reply.status_code == 200
            body = reply.json()
            assert body["success"] is False and body["timedOut"] is True
            assert "piece 1" in body["output"]
            assert 1000 <= body["durationMs"] < 4000
            assert elapsed < 4
            # the worker healed: the next job is answered normally
            ok = await client.post("/run", headers=JSON, json={"prompt": "after"})
            assert ok.json()["output"] == "echo: after"
        # the timed-out process is gone, not left running its 5 s turn
        pids = sorted(set(service.fake_pids()) - earlier)
        await wait_until(_only_newest_alive(service, pids), timeout=5)


def _only_newest_alive(service, pids):
    async def check() -> bool:
        return service.live_fake_pids() == [] or set(service.live_fake_pids()) <= set(pids[-2:])

    return check


async def test_hung_agent_is_killed_with_no_orphan(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"INTERRUPT_GRACE_MS": "300"}) as service:
            await wait_healthy(service, ready=1)
            hung_pid = service.fake_pids()[0]
            async with service.client() as client:
                reply = await client.post(
                    "/run", headers=JSON, json={"prompt": "[[fake:hang_hard]]", "timeoutMs": 500}
                )
                body = reply.json()
                assert body["timedOut"] is True and body["success"] is False
                assert "partial before hang" in body["output"]

                # killed (SIGKILL: it ignores interrupt, EOF and SIGTERM) and reaped
                async def hung_gone() -> bool:
                    return hung_pid not in service.live_fake_pids()

                await wait_until(hung_gone, timeout=5)
                await wait_healthy(service, ready=1)
        await wait_no_live_fakes(service)


async def test_crash_mid_turn_is_502_and_the_pool_heals(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            processed, errors, _ = await totals(client)
            reply = await client.post("/run", headers=JSON, json={"prompt": "[[fake:crash:3]]"})
            assert reply.status_code == 502
            assert "exited with code 3" in reply.json()["error"]
            ok = await client.post("/run", headers=JSON, json={"prompt": "still here"})
            assert ok.status_code == 200 and ok.json()["output"] == "echo: still here"
            assert (await totals(client))[:2] == (processed + 2, errors + 1)


async def test_agent_error_result_is_200_with_success_false(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            reply = await client.post("/run", headers=JSON, json={"prompt": "[[fake:error]]"})
            assert reply.status_code == 200
            body = reply.json()
            assert body["success"] is False and body["timedOut"] is False
            assert body["output"]


async def test_full_queue_answers_429_with_retry_after(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"QUEUE_MAX": "1"}) as service:
            await wait_healthy(service, ready=1)
            replies: dict[str, httpx.Response] = {}
            async with service.client() as client, trio.open_nursery() as nursery:

                async def post(name: str, prompt: str) -> None:
                    replies[name] = await client.post("/run", headers=JSON, json={"prompt": prompt})

                nursery.start_soon(post, "running", "[[fake:slow:3:0.3]]")
                await _wait_health(client, lambda b: b["workers"]["busy"] == 1)
                nursery.start_soon(post, "queued", "second")
                await _wait_health(client, lambda b: b["queue"]["length"] == 1)
                await post("rejected", "third")
            assert replies["rejected"].status_code == 429
            rejected = replies["rejected"]
            assert rejected.json() == {
                "error": "Queue is full, try again later",
                "runId": rejected.headers["x-run-id"],
            }
            assert replies["rejected"].headers["retry-after"] == "1"
            assert replies["running"].json()["success"] is True
            assert replies["queued"].json()["output"] == "echo: second"


async def _wait_health(client: httpx.AsyncClient, predicate) -> dict:
    with trio.fail_after(10):
        while True:
            body = (await client.get("/health")).json()
            if predicate(body):
                return body
            await trio.sleep(0.02)


async def test_client_disconnect_stops_work(service):
    with trio.fail_after(60):
        await wait_healthy(service, ready=1)
        async with service.client() as client:
            processed, _, _ = await totals(client)
            # mid-run: the slow turn (30 s) is interrupted, the worker warms again
            async with trio.open_nursery() as nursery:
                slow = "[[fake:slow:300:0.1]] until the client leaves"
                nursery.start_soon(lambda: client.post("/run", headers=JSON, json={"prompt": slow}))
                await _wait_health(client, lambda b: b["workers"]["busy"] == 1)
                busy_pid = await fake_turn_pid(service, slow)
                # also one waiting in the queue behind it
                nursery.start_soon(
                    lambda: client.post("/run", headers=JSON, json={"prompt": "queued"})
                )
                await _wait_health(client, lambda b: b["queue"]["length"] == 1)
                nursery.cancel_scope.cancel()  # both clients go away
            body = await _wait_health(
                client, lambda b: b["queue"]["length"] == 0 and b["workers"]["ready"] == 1
            )
            assert body["status"] == "ok"

            async def busy_gone() -> bool:
                return busy_pid not in service.live_fake_pids()

            await wait_until(busy_gone, timeout=10)
            # The queued one is withdrawn, or — when the server notices its client left only
            # after the interrupted turn freed the pool (a warm spare takes it at once) — cut
            # short as it begins: either way nothing is left running (the health above).
            # (The dispatcher's withdrawal itself: test_dispatcher.)
            assert (await totals(client))[0] in (processed + 1, processed + 2)
            ok = await client.post("/run", headers=JSON, json={"prompt": "next"})
            assert ok.json()["output"] == "echo: next"


async def test_jobs_queued_during_start_up_run_when_a_worker_warms(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, fake_mode="slow_start:1") as service:
            async with service.client() as client:
                health = (await client.get("/health")).json()
                assert health["status"] == "starting"
                reply = await client.post("/run", headers=JSON, json={"prompt": "early"})
                assert reply.json()["output"] == "echo: early"


async def test_agent_that_never_answers_initialize_is_degraded_not_hung(tmp_path):
    with trio.fail_after(60):
        env = {"WARMUP_TIMEOUT_MS": "300"}
        async with run_service(tmp_path, env=env, fake_mode="no_init") as service:
            async with service.client() as client:
                body = await _wait_health(client, lambda b: b["status"] == "degraded")
                assert (await client.get("/health")).status_code == 503
                assert "initialize" in body["reason"]
                started = trio.current_time()
                reply = await client.post("/run", headers=JSON, json={"prompt": "x"})
                assert trio.current_time() - started < 2
                assert reply.status_code == 503
                assert reply.json()["error"].startswith("no agent workers available: ")
        await wait_no_live_fakes(service)


async def test_sigterm_lets_the_running_job_finish_then_exits_0(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, stop_signal=None) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                async with trio.open_nursery() as nursery:
                    result: list[httpx.Response] = []

                    async def slow() -> None:
                        result.append(
                            await client.post(
                                "/run", headers=JSON, json={"prompt": "[[fake:slow:5:0.2]]"}
                            )
                        )

                    nursery.start_soon(slow)
                    await _wait_health(client, lambda b: b["workers"]["busy"] == 1)
                    service.process.send_signal(signal.SIGTERM)
                assert result[0].status_code == 200
                assert result[0].json()["success"] is True
                assert result[0].json()["output"].count("piece") == 5
        # run_service checked the exit status was 0
        await wait_no_live_fakes(service, timeout=2)
