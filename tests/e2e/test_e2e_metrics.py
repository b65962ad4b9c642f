"""End to end: ``GET /metrics`` of the real service (real SDK, fake CLI), and ``METRICS=0``.

Each test reads the scrape a client reads, parsed with prometheus-client's own
parser, so the exposition format is checked along with the figures.
"""

from __future__ import annotations

from contextlib import aclosing

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import AUTH, run_service, wait_healthy, wait_until
from tests.support.sse import events, read_all

JSON = {**AUTH, "Content-Type": "application/json"}


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_state(samples: dict, name: str) -> dict[str, float]:
    return {dict(labels)["state"]: v for (n, labels), v in samples.items() if n == name}


async def test_runs_sessions_and_requests_show_in_the_scrape(tmp_path):
    with trio.fail_after(90):
        # Sessions hibernate after 0.5 s idle, so the second turn wakes one.
        env = {"POOL_SIZE": "2", "SESSION_IDLE_MS": "500"}
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=2)
            async with service.client() as client:
                before = await scrape(client)
                assert by_state(before, "claude_code_api_workers") == {
                    "starting": 0,
                    "ready": 2,
                    "busy": 0,
                    "error": 0,
                    "kept": 0,
                    # The spares (AGENT_REUSE_S): POOL_SIZE + AGENT_REUSE_MAX (= POOL_SIZE).
                    "dormant": 4,
                }
                assert get(before, "claude_code_api_warmup_seconds_count") >= 2
                ok = await client.post("/run", headers=JSON, json={"prompt": "hello"})
                assert ok.status_code == 200
                crashed = await client.post(
                    "/run", headers=JSON, json={"prompt": "[[fake:crash:3]]"}
                )
                assert crashed.status_code == 502
                first = await client.post(
                    "/run", headers=JSON, json={"prompt": "My name is Ann.", "sessionId": "s1"}
                )
                assert first.status_code == 200

                async def hibernated() -> bool:
                    sessions = by_state(await scrape(client), "claude_code_api_sessions")
                    return sessions == {"live": 0, "busy": 0, "hibernated": 1}

                await wait_until(hibernated, timeout=10)
                second = await client.post(
                    "/run", headers=JSON, json={"prompt": "What is my name?", "sessionId": "s1"}
                )
                assert second.json()["output"] == "Your name is Ann."
                assert (await client.get("/no/such/route")).status_code == 404
                closed = await client.request(
                    "DELETE", "/session", headers=JSON, json={"sessionId": "s1"}
                )
                assert closed.status_code == 200
                after = await scrape(client)

        def grew(name: str, **labels: str) -> float:
            return get(after, name, **labels) - get(before, name, **labels)

        assert grew("claude_code_api_run_duration_seconds_count", outcome="ok") == 3
        assert grew("claude_code_api_run_duration_seconds_count", outcome="failed") == 1
        assert grew("claude_code_api_queue_wait_seconds_count") == 4
        assert grew("claude_code_api_agent_failures_total", reason="exit") == 1
        assert grew("claude_code_api_session_wakeups_total") == 1
        # The fake reports 0.0001 USD a turn and a token per 4 characters; by default they
        # are the service's totals, with no user label.
        assert round(grew("claude_code_api_cost_usd_total"), 6) == 0.0003
        outputs = [reply.json()["output"] for reply in (ok, first, second)]
        tokens = sum(max(1, len(output) // 4) for output in outputs)
        assert grew("claude_code_api_tokens_total", type="output") == tokens
        requests = "claude_code_api_http_requests_total"
        assert grew(requests, method="POST", route="/run", status="200") == 3
        assert grew(requests, method="POST", route="/run", status="502") == 1
        assert grew(requests, method="GET", route="unmatched", status="404") == 1
        assert grew(requests, method="DELETE", route="/session", status="200") == 1
        # The raw path is never a label value.
        assert not [key for key in after if ("route", "/no/such/route") in key[1]]
        assert by_state(after, "claude_code_api_sessions") == {
            "live": 0,
            "busy": 0,
            "hibernated": 0,
        }
        # 2 x POOL_SIZE + AGENT_REUSE_MAX, whatever their states.
        assert sum(by_state(after, "claude_code_api_workers").values()) == 6
        assert get(after, "process_resident_memory_bytes") > 0


async def test_a_scrape_is_answered_at_once_while_the_pool_is_busy(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client, trio.open_nursery() as nursery:
                for _ in range(2):  # one runs, one waits for the only worker
                    nursery.start_soon(
                        lambda: client.post(
                            "/run", headers=JSON, json={"prompt": "[[fake:sleep:5]]"}
                        )
                    )

                async def one_waits() -> bool:
                    return get(await scrape(client), "claude_code_api_queue_length") == 1

                await wait_until(one_waits, timeout=10)
                began = trio.current_time()
                samples = await scrape(client)
                took = trio.current_time() - began
                assert by_state(samples, "claude_code_api_workers")["busy"] == 1
                assert took < 1.0, f"a scrape took {took:.3f} s"
                nursery.cancel_scope.cancel()


async def test_a_failed_warm_up_restarts_the_worker_and_is_counted(tmp_path):
    with trio.fail_after(60):
        mode_file = tmp_path / "modes"
        mode_file.write_text("")
        env = {"FAKE_CLAUDE_MODE_FILE": str(mode_file)}
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                before = await scrape(client)
                # The next agent (warmed after this run) exits at start, once.
                mode_file.write_text("exit_at_start:1")
                reply = await client.post("/run", headers=JSON, json={"prompt": "hi"})
                assert reply.status_code == 200

                async def failed_once() -> bool:
                    samples = await scrape(client)
                    return get(samples, "claude_code_api_agent_failures_total", reason="warmup") > 0

                await wait_until(failed_once, timeout=15)
                mode_file.write_text("")
                await wait_healthy(service, ready=1, timeout=20)
                after = await scrape(client)
        assert (
            get(after, "claude_code_api_worker_restarts_total")
            - get(before, "claude_code_api_worker_restarts_total")
            >= 1
        )


async def test_metrics_off_serves_no_metrics_and_documents_none(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"METRICS": "0"}) as service:
            async with service.client() as client:
                assert (
                    await client.post("/run", headers=JSON, json={"prompt": "hi"})
                ).status_code == 200
                response = await client.get("/metrics")
                assert response.status_code == 404
                assert response.json() == {"error": "Not found"}
                spec = (await client.get("/openapi.json")).json()
                assert "/metrics" not in spec["paths"] and "/run" in spec["paths"]


async def test_every_outcome_of_a_run_is_counted_and_cancelled_is_every_way_of_cancelling(
    tmp_path,
):
    """ok, agent_error, timeout, failed, and cancelled three ways: DELETE /runs of a running
    and of a queued run, and a client that leaves its stream."""
    with trio.fail_after(90):
        async with run_service(tmp_path, env={"POOL_SIZE": "1"}) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                before = await scrape(client)
                assert (await client.post("/run", headers=JSON, json={"prompt": "hi"})).json()[
                    "success"
                ]
                errored = await client.post("/run", headers=JSON, json={"prompt": "[[fake:error]]"})
                assert errored.json()["success"] is False
                late = await client.post(
                    "/run", headers=JSON, json={"prompt": "[[fake:sleep:30]]", "timeoutMs": 300}
                )
                assert late.json()["timedOut"] is True
                unreadable = await client.post("/run", headers=JSON, content=b"{")
                assert unreadable.status_code == 400  # refused before it was a run: not counted

                # A running run cancelled by DELETE /runs, while a queued one waits behind it.
                sleepy = {"prompt": "[[fake:sleep:30]]", "stream": True}
                async with client.stream("POST", "/run", headers=JSON, json=sleepy) as running:
                    run_id = running.headers["X-Run-Id"]
                    replies: list[httpx.Response] = []
                    async with trio.open_nursery() as nursery:

                        async def queued_run() -> None:
                            replies.append(
                                await client.post(
                                    "/run", headers=JSON, json={"prompt": "[[fake:sleep:30]]"}
                                )
                            )

                        nursery.start_soon(queued_run)

                        async def two_runs() -> list[dict]:
                            status = await client.get("/status", headers=AUTH)
                            return status.json()["runs"]

                        async def one_queued() -> bool:
                            return [r["state"] for r in await two_runs()] == ["running", "queued"]

                        await wait_until(one_queued, timeout=10)
                        queued_id = (await two_runs())[1]["runId"]
                        for cancelled_id in (queued_id, run_id):
                            gone = await client.delete(f"/runs/{cancelled_id}", headers=AUTH)
                            assert gone.json() == {"cancelled": True}
                    assert replies[0].json()["cancelled"] is True
                    assert (await read_all(running))[-1].data["cancelled"] is True

                # A streamed run whose client leaves once it has started.
                async with (
                    client.stream("POST", "/run", headers=JSON, json=sleepy) as left,
                    aclosing(events(left)) as arriving,
                ):
                    async for event in arriving:
                        if event.name == "started":
                            break

                async def counted() -> bool:
                    # The departed stream's run and request both end a moment after it left.
                    samples = await scrape(client)

                    def grown(name: str, **labels: str) -> float:
                        return get(samples, name, **labels) - get(before, name, **labels)

                    runs = grown("claude_code_api_run_duration_seconds_count", outcome="cancelled")
                    requests = grown(
                        "claude_code_api_http_request_duration_seconds_count", route="/run"
                    )
                    return runs >= 3 and requests >= 7

                await wait_until(counted, timeout=15)
                after = await scrape(client)

        def grew(name: str, **labels: str) -> float:
            return get(after, name, **labels) - get(before, name, **labels)

        runs = "claude_code_api_run_duration_seconds_count"
        assert {
            outcome: grew(runs, outcome=outcome)
            for outcome in ("ok", "agent_error", "timeout", "cancelled", "failed")
        } == {"ok": 1, "agent_error": 1, "timeout": 1, "cancelled": 3, "failed": 0}
        requests = "claude_code_api_http_requests_total"
        assert grew(requests, method="DELETE", route="/runs/{runId}", status="200") == 2
        assert grew(requests, method="POST", route="/run", status="400") == 1
        # A stream is timed to its end: the cancelled one lasted until its cancellation.
        durations = "claude_code_api_http_request_duration_seconds_count"
        assert grew(durations, route="/run") == 7


CAROL = {"x-api-key": "sk-carol", "Content-Type": "application/json"}


async def carols_turns(client: httpx.AsyncClient) -> None:
    """A one-shot run and a session turn of the user carol.smith@example.com."""
    for body in ({"prompt": "hi"}, {"prompt": "hello", "sessionId": "c1"}):
        reply = await client.post("/run", headers=CAROL, json=body)
        assert reply.status_code == 200, reply.text


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_no_user_id_is_in_the_scrape_unless_the_operator_asks(tmp_path):
    """Issue 20 §6: user ids are often e-mail addresses; /metrics shows none by default,
    and labels cost and tokens by user with METRICS_PER_USER=1."""
    keys = {"API_KEYS": "carol.smith@example.com:sk-carol"}
    with trio.fail_after(60):
        async with run_service(tmp_path / "default", env=keys) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                await carols_turns(client)
                text = (await client.get("/metrics")).text
                samples = await scrape(client)
        assert "carol" not in text
        assert not [key for key in samples if "user" in dict(key[1])]
        assert round(get(samples, "claude_code_api_cost_usd_total"), 6) == 0.0002
        assert get(samples, "claude_code_api_tokens_total", type="output") >= 2

        async with run_service(
            tmp_path / "per-user", env={**keys, "METRICS_PER_USER": "1"}
        ) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                await carols_turns(client)
                samples = await scrape(client)
        carol = "carol.smith@example.com"
        assert round(get(samples, "claude_code_api_cost_usd_total", user=carol), 6) == 0.0002
        assert get(samples, "claude_code_api_tokens_total", user=carol, type="output") >= 2
        assert get(samples, "claude_code_api_cost_usd_total") == 0


async def test_metrics_token_guards_the_scrape(tmp_path):
    """Issue 20 §6: with METRICS_TOKEN set, only that bearer token opens /metrics; API keys
    and claude-code-web's tokens do not; /health stays public."""
    env = {"METRICS_TOKEN": "scrape-secret"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                refusals = [
                    ({}, "Missing metrics token"),
                    (AUTH, "Missing metrics token"),
                    ({"Authorization": "Basic scrape-secret"}, "Missing metrics token"),
                    ({"Authorization": f"Bearer {AUTH['x-api-key']}"}, "Invalid metrics token"),
                    ({"Authorization": "Bearer scrape-secre"}, "Invalid metrics token"),
                ]
                for headers, message in refusals:
                    refused = await client.get("/metrics", headers=headers)
                    assert refused.status_code == 401, headers
                    assert refused.json() == {"error": message}, headers
                    assert refused.headers["www-authenticate"].startswith("Bearer")
                opened = await client.get(
                    "/metrics", headers={"Authorization": "Bearer scrape-secret"}
                )
                assert opened.status_code == 200
                assert "claude_code_api_queue_length" in opened.text
                assert (await client.get("/health")).status_code in (200, 503)
                spec = (await client.get("/openapi.json")).json()
        operation = spec["paths"]["/metrics"]["get"]
        assert operation["security"] == [{"metricsToken": []}]
        assert "401" in operation["responses"]
        assert spec["components"]["securitySchemes"]["metricsToken"]["scheme"] == "bearer"
