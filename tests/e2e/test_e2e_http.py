"""End to end at the HTTP layer: connections held open, shutdown, request framing.

The real service in a subprocess (tests/support/harness.py), raw sockets where httpx
would hide what the server did with the connection.
"""

from __future__ import annotations

import resource
import signal

import pytest
import trio

from tests.support.harness import AUTH, run_service, wait_healthy, wait_until
from tests.support.raw_http import RawConnection

JSON = {**AUTH, "Content-Type": "application/json"}


async def open_idle_connections(url: str, count: int, *, used: bool) -> list[RawConnection]:
    """``count`` connections, each kept open after one /health (``used``) or silent."""
    opened: list[RawConnection] = []

    async def open_some(n: int) -> None:
        for _ in range(n):
            connection = await RawConnection.open(url)
            opened.append(connection)
            if used:
                await connection.request("GET", "/health")
                # None: closed to make room for a newer connection, which is allowed.
                await connection.response()

    async with trio.open_nursery() as nursery:
        for share in range(10):
            nursery.start_soon(open_some, count // 10 + (share < count % 10))
    return opened


async def others_are_served(service, deadline_s: float) -> None:
    """A fresh client's /health and /run are answered within ``deadline_s``."""
    with trio.fail_after(deadline_s):
        async with service.client() as client:
            health = await client.get("/health")
            assert health.status_code == 200
            reply = await client.post("/run", headers=JSON, json={"prompt": "still here?"})
            assert reply.status_code == 200
            assert reply.json()["output"] == "echo: still here?"


async def test_idle_connections_beyond_the_fd_limit_do_not_stop_other_clients(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, open_files_limit=256) as service:
            await wait_healthy(service, ready=1)
            held = await open_idle_connections(service.url, 150, used=True)
            held += await open_idle_connections(service.url, 150, used=False)
            await others_are_served(service, deadline_s=5)
            # ... also while more keep arriving.
            async with trio.open_nursery() as nursery:

                async def keep_arriving() -> None:
                    held.extend(await open_idle_connections(service.url, 300, used=False))

                nursery.start_soon(keep_arriving)
                await others_are_served(service, deadline_s=5)
            for connection in held:
                await connection.aclose()
        assert "Too many open files" not in service.log_text()


@pytest.mark.slow
async def test_ten_thousand_idle_sockets_do_not_stop_other_clients(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 10_500:
        pytest.skip(f"needs 10,500 open files in the test process (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 10_500), hard))
    try:
        with trio.fail_after(180):
            async with run_service(tmp_path, open_files_limit=1024) as service:
                await wait_healthy(service, ready=1)
                held: list[RawConnection] = []
                async with trio.open_nursery() as nursery:

                    async def attack() -> None:
                        held.extend(await open_idle_connections(service.url, 10_000, used=False))

                    nursery.start_soon(attack)
                    await trio.sleep(5)  # well past the service's bound of ~880
                    await others_are_served(service, deadline_s=5)
                await others_are_served(service, deadline_s=5)
                for connection in held:
                    await connection.aclose()
            assert "Too many open files" not in service.log_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_requests_on_kept_alive_connections_during_shutdown_get_503_and_close(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, stop_signal=None) as service:
            await wait_healthy(service, ready=1)
            kept: list[RawConnection] = []
            for _ in range(20):
                connection = await RawConnection.open(service.url)
                await connection.request("GET", "/health")
                assert (await connection.response()).status == 200
                kept.append(connection)
            lingering = kept.pop()  # stays idle throughout
            async with service.client() as client, trio.open_nursery() as nursery:
                running: list = []

                async def slow_job() -> None:
                    prompt = {"prompt": "[[fake:slow:30:0.1]]"}  # about 3 s
                    running.append(await client.post("/run", headers=JSON, json=prompt))

                nursery.start_soon(slow_job)

                async def job_running() -> bool:
                    return (await client.get("/health")).json()["workers"]["busy"] == 1

                await wait_until(job_running)
                signalled_at = trio.current_time()
                service.process.send_signal(signal.SIGTERM)
                await trio.sleep(0.1)

                requests = [
                    ("GET", "/health", b""),
                    ("GET", "/status", b""),
                    ("POST", "/run", b'{"prompt": "late"}'),
                    ("DELETE", "/session", b'{"sessionId": "s"}'),
                ]
                for index, connection in enumerate(kept):
                    method, path, body = requests[index % len(requests)]
                    await connection.request(method, path, headers=JSON, body=body)
                for connection in kept:
                    response = await connection.response()
                    assert response is not None, "a request during shutdown went unanswered"
                    assert response.status == 503 and response.closes
                    assert response.json()["error"] == "service is shutting down"
                    await connection.wait_closed()
                answered_at = trio.current_time()
            assert answered_at - signalled_at < 2  # not held back by the running job
            assert running[0].status_code == 200 and running[0].json()["success"] is True
            await lingering.wait_closed()
            await service.process.wait()
            # Right after the job (~3 s): an idle kept-alive connection does not hold
            # up the exit for hypercorn's graceful timeout (5 s).
            assert trio.current_time() - signalled_at < 5


async def test_requests_whose_body_is_not_read_close_the_connection(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path) as service:
            await wait_healthy(service, ready=1)

            # Content-Length with Transfer-Encoding: 400, and what follows is never served.
            connection = await RawConnection.open(service.url)
            body = b'{"prompt": "smuggler"}'
            await connection.send(
                b"POST /run HTTP/1.1\r\nHost: test\r\nx-api-key: "
                + AUTH["x-api-key"].encode()
                + b"\r\nContent-Type: application/json\r\n"
                + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                + f"{len(body):x}\r\n".encode()
                + body
                + b"\r\n0\r\n\r\n"
                + b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
            )
            response = await connection.response()
            assert response is not None
            assert response.status == 400 and response.closes
            assert "Transfer-Encoding" in response.json()["error"]
            await connection.wait_closed()

            # Refused before its body was read (here 401): the app says Connection: close,
            # and the connection really closes instead of wedging.
            connection = await RawConnection.open(service.url)
            await connection.request("POST", "/run", body=b'{"prompt": "no key"}')
            response = await connection.response()
            assert response.status == 401 and response.closes
            await connection.wait_closed()

            async with service.client() as client:
                status = (await client.get("/status", headers=AUTH)).json()
            assert status["totalProcessed"] == 0
