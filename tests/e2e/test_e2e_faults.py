"""End to end: injected faults, shutdown and resource bounds on the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from tests.support.harness import (
    AUTH,
    FAKE_CLAUDE,
    for_one_test,
    run_service,
    shared_service,
    wait_healthy,
    wait_no_live_fakes,
    wait_until,
)

JSON = {**AUTH, "Content-Type": "application/json"}


async def health(client: httpx.AsyncClient) -> tuple[int, dict]:
    reply = await client.get("/health")
    return reply.status_code, reply.json()


@pytest.fixture(scope="module")
def pool_of_two(tmp_path_factory):
    """A service with two workers, shared by the misbehaving-agent cases (each counts
    differences); it must exit 0 with no agent left (shared_service)."""
    with shared_service(tmp_path_factory.mktemp("faults"), env={"POOL_SIZE": "2"}) as service:
        yield service


@pytest.mark.parametrize(
    ("prompt", "status", "fragment"),
    [
        ("[[fake:garbage]]", 502, "malformed JSON"),
        ("[[fake:truncated]]", 502, "agent"),
        ("[[fake:close_stdout]]", 502, "without a result"),
        ("[[fake:crash:9]]", 502, "exited with code 9"),
        ("[[fake:stderr:20000]] hello", 200, "echo: [[fake:stderr:20000]] hello"),
    ],
)
async def test_a_misbehaving_agent_fails_only_its_job(pool_of_two, prompt, status, fragment):
    service = await for_one_test(pool_of_two)
    with trio.fail_after(60):
        await wait_healthy(service, ready=2)
        async with service.client() as client:
            before = (await client.get("/status", headers=AUTH)).json()
            reply = await client.post("/run", headers=JSON, json={"prompt": prompt})
            assert reply.status_code == status, reply.text
            body = reply.json()
            assert fragment in (body.get("error") or body.get("output")), body
            # the worker was replaced; both workers serve again, counters add up
            await wait_healthy(service, ready=2)
            for n in range(3):
                ok = await client.post("/run", headers=JSON, json={"prompt": f"ok {n}"})
                assert ok.json()["output"] == f"echo: ok {n}"
            stats = (await client.get("/status", headers=AUTH)).json()
            assert stats["totalProcessed"] - before["totalProcessed"] == 4
            assert stats["totalErrors"] - before["totalErrors"] == (0 if status == 200 else 1)
            idle = ("ready", "starting", "kept", "dormant")
            assert all(w["state"] in idle for w in stats["workers"])


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_crash_loop_backs_off_answers_503_and_recovers(tmp_path):
    with trio.fail_after(90):
        mode_file = tmp_path / "mode"
        mode_file.write_text("exit_at_start:4")
        env = {
            "FAKE_CLAUDE_MODE_FILE": str(mode_file),
            "RESTART_BACKOFF_MAX_MS": "1000",
            "POOL_SIZE": "2",
        }
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:

                async def degraded() -> bool:
                    return (await health(client))[1]["status"] == "degraded"

                await wait_until(degraded, timeout=15)
                code, body = await health(client)
                assert code == 503
                assert "exited with code 4" in body["reason"]
                started = trio.current_time()
                reply = await client.post("/run", headers=JSON, json={"prompt": "x"})
                assert trio.current_time() - started < 1
                assert reply.status_code == 503
                assert reply.json()["error"].startswith("no agent workers available: ")
                assert "exited with code 4" in reply.json()["error"]
                # backing off: over 3 s, far fewer starts than an unthrottled loop would make
                before = len(service.fake_pids())
                await trio.sleep(3)
                assert len(service.fake_pids()) - before <= 2 * 4
                # the CLI works again: the pool recovers by itself
                mode_file.write_text("")
                await wait_healthy(service, ready=2, timeout=15)
                ok = await client.post("/run", headers=JSON, json={"prompt": "back"})
                assert ok.json()["output"] == "echo: back"
        await wait_no_live_fakes(service)


async def test_shutdown_interrupts_what_outlives_the_grace(tmp_path):
    with trio.fail_after(60):
        env = {"SHUTDOWN_GRACE_S": "1", "INTERRUPT_GRACE_MS": "1000"}
        async with run_service(tmp_path, env=env, stop_signal=None) as service:
            await wait_healthy(service, ready=1)
            replies: list[httpx.Response] = []
            async with service.client() as client, trio.open_nursery() as nursery:

                async def slow() -> None:
                    replies.append(
                        await client.post(
                            "/run", headers=JSON, json={"prompt": "[[fake:slow:300:0.1]]"}
                        )
                    )

                nursery.start_soon(slow)

                async def busy() -> bool:
                    return (await health(client))[1]["workers"]["busy"] == 1

                await wait_until(busy)
                started = trio.current_time()
                service.process.send_signal(signal.SIGTERM)

                async def stopping() -> bool:
                    return (await health(client))[1]["status"] == "stopping"

                await wait_until(stopping, timeout=2)
                assert (await health(client))[0] == 503
                refused = await client.post("/run", headers=JSON, json={"prompt": "late"})
                assert refused.status_code == 503
                assert refused.json()["error"] == "service is shutting down"
            assert replies[0].status_code == 200
            body = replies[0].json()
            assert body["success"] is False and "piece 1" in body["output"]
            assert body["stopped"] is True and "cancelled" not in body
            assert trio.current_time() - started < 6
        await wait_no_live_fakes(service, timeout=2)


async def test_a_second_signal_skips_the_grace(tmp_path):
    with trio.fail_after(60):
        async with run_service(
            tmp_path, env={"SHUTDOWN_GRACE_S": "60"}, stop_signal=None
        ) as service:
            await wait_healthy(service, ready=1)
            replies: list[httpx.Response] = []
            async with service.client() as client, trio.open_nursery() as nursery:

                async def slow() -> None:
                    replies.append(
                        await client.post(
                            "/run", headers=JSON, json={"prompt": "[[fake:slow:600:0.1]]"}
                        )
                    )

                nursery.start_soon(slow)
                await wait_until(lambda: _busy(client))
                started = trio.current_time()
                service.process.send_signal(signal.SIGTERM)
                await trio.sleep(0.3)
                service.process.send_signal(signal.SIGINT)
            assert replies[0].status_code == 200 and replies[0].json()["success"] is False
            assert trio.current_time() - started < 8
        await wait_no_live_fakes(service, timeout=2)


async def _busy(client: httpx.AsyncClient) -> bool:
    return (await health(client))[1]["workers"]["busy"] == 1


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_shutdown_keeps_sessions_for_the_next_start(tmp_path):
    with trio.fail_after(90):
        env = {"SHUTDOWN_GRACE_S": "1"}
        async with run_service(tmp_path, env=env, stop_signal=None) as service:
            replies: list[httpx.Response] = []
            async with service.client() as client:
                first = await client.post(
                    "/run", headers=JSON, json={"prompt": "My name is Alice.", "sessionId": "s"}
                )
                assert first.status_code == 200
                async with trio.open_nursery() as nursery:

                    async def slow() -> None:
                        replies.append(
                            await client.post(
                                "/run",
                                headers=JSON,
                                json={"prompt": "[[fake:slow:300:0.1]]", "sessionId": "s"},
                            )
                        )

                    nursery.start_soon(slow)

                    async def session_busy() -> bool:
                        status = (await client.get("/status", headers=AUTH)).json()
                        return status["sessions"][0]["state"] == "busy"

                    await wait_until(session_busy)
                    service.process.send_signal(signal.SIGTERM)
            assert replies[0].status_code == 200 and replies[0].json()["success"] is False
        await wait_no_live_fakes(service, timeout=2)
        async with run_service(tmp_path) as service:
            async with service.client() as client:
                reply = await client.post(
                    "/run", headers=JSON, json={"prompt": "What is my name?", "sessionId": "s"}
                )
                assert reply.json()["output"] == "Your name is Alice."
                [view] = (await client.get("/status", headers=AUTH)).json()["sessions"]
                assert view["turns"] == 3


async def test_enormous_output_is_capped_and_says_so(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env={"MAX_OUTPUT_CHARS": "1000"}) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await client.post(
                    "/run", headers=JSON, json={"prompt": "[[fake:big:200000]]"}
                )
                body = reply.json()
                assert reply.status_code == 200 and body["success"] is True
                assert body["outputTruncated"] is True
                assert body["output"] == "x" * 1000
                small = await client.post("/run", headers=JSON, json={"prompt": "small"})
                assert "outputTruncated" not in small.json()


def test_an_unreadable_session_database_stops_start_up_clearly(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = data_dir / "sessions.sqlite3"
    database.write_bytes(b"this is not a database" * 100)
    before = database.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "claude_code_api"],
        env={
            **os.environ,
            "DATA_DIR": str(data_dir),
            "PORT": "0",
            "HOST": "127.0.0.1",
            "API_KEYS": "k",
            "CLAUDE_EXECUTABLE": str(FAKE_CLAUDE),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "claude-code-api:" in line]
    assert len(errors) == 1 and "sessions.sqlite3" in errors[0], result.stderr
    assert database.read_bytes() == before


async def test_an_idle_agent_that_dies_is_replaced_before_the_next_job(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path) as service:
            await wait_healthy(service, ready=1)
            [idle_pid] = service.live_fake_pids()
            os.kill(idle_pid, signal.SIGKILL)  # e.g. the OOM killer

            async def replaced() -> bool:
                live = service.live_fake_pids()
                return bool(live) and idle_pid not in live

            await wait_until(replaced)
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                reply = await client.post("/run", headers=JSON, json={"prompt": "after"})
                assert reply.status_code == 200, reply.text
                assert reply.json()["output"] == "echo: after"
                stats = (await client.get("/status", headers=AUTH)).json()
                assert stats["totalErrors"] == 0
