"""End-to-end harness: the real service in a subprocess on 127.0.0.1.

The service runs as ``python -m claude_code_api`` with the real SDK and
``tests/fake_claude.py`` as ``CLAUDE_EXECUTABLE``; tests talk to it over real
HTTP with httpx. Every fake CLI process writes its pid into a directory, so a
test can check that none outlived the service or its job.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import trio

FAKE_CLAUDE = Path(__file__).with_name("fake_claude.py")
API_KEY = "sk-test-key"
AUTH = {"x-api-key": API_KEY}
LISTENING = re.compile(r"listening on (http://\S+)")
FAKE_CLAUDE_VARIABLES = (
    "FAKE_CLAUDE_HOME,FAKE_CLAUDE_PIDDIR,FAKE_CLAUDE_MODE,FAKE_CLAUDE_MODE_FILE,FAKE_CLAUDE_LOG,"
    "FAKE_CLAUDE_REFUSE_ROOT"
)


@attrs.define
class RunningService:
    url: str
    process: trio.Process
    piddir: Path
    data_dir: Path
    fake_home: Path
    log: list[str]

    def client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=60, **kwargs)

    def fake_pids(self) -> list[int]:
        return sorted(int(p.name) for p in self.piddir.iterdir())

    def live_fake_pids(self) -> list[int]:
        """Fake CLI processes still alive (running or zombie)."""
        return [pid for pid in self.fake_pids() if process_exists(pid)]

    def log_text(self) -> str:
        return "".join(self.log)


def process_exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The pid may have been reused by an unrelated process: check it is our fake.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state == "Z" or b"fake_claude" in cmdline


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


async def wait_no_live_fakes(service: RunningService, timeout: float = 10.0) -> None:
    async def none_alive() -> bool:
        return not service.live_fake_pids()

    await wait_until(none_alive, timeout)


async def wait_healthy(service: RunningService, *, ready: int, timeout: float = 15.0) -> dict:
    body: dict = {}

    async def pool_ready() -> bool:
        nonlocal body
        async with service.client() as client:
            body = (await client.get("/health")).json()
        return body["workers"]["ready"] >= ready

    await wait_until(pool_ready, timeout, interval=0.05)
    return body


@asynccontextmanager
async def run_service(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    fake_mode: str = "",
    stop_signal: int | None = signal.SIGTERM,
    expect_exit: int | None = 0,
    open_files_limit: int | None = None,
) -> AsyncIterator[RunningService]:
    """Start the service, wait until it listens, yield it; stop it and check it exited.

    ``open_files_limit`` lowers the service's ``RLIMIT_NOFILE`` (soft and hard).
    """
    piddir = tmp_path / "pids"
    data_dir = tmp_path / "data"
    fake_home = tmp_path / "fake-home"
    for path in (piddir, data_dir, fake_home):
        path.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": "0",
        "API_KEYS": API_KEY,
        "POOL_SIZE": "1",
        "DATA_DIR": str(data_dir),
        "CLAUDE_EXECUTABLE": str(FAKE_CLAUDE),
        "FAKE_CLAUDE_HOME": str(fake_home),
        "FAKE_CLAUDE_PIDDIR": str(piddir),
        "FAKE_CLAUDE_MODE": fake_mode,
        # Agents get an allowlisted environment: the fake's own settings are passed by name.
        "AGENT_ENV": FAKE_CLAUDE_VARIABLES,
        # The fake writes pid files the tests read from outside: no pid namespace by default
        # (tests of the sandbox turn it on).
        "AGENT_SANDBOX": "off",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log: list[str] = []

    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files_limit, open_files_limit))

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "claude_code_api"],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=None if open_files_limit is None else limit_open_files,
    )
    url_found = trio.Event()
    found: list[str] = []

    async def read_log() -> None:
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace") + "\n"
                log.append(line)
                match = LISTENING.search(line)
                if match and not url_found.is_set():
                    found.append(match.group(1))
                    url_found.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(20):
                while not url_found.is_set():
                    if process.poll() is not None:
                        raise RuntimeError(f"service exited early:\n{''.join(log)}")
                    with trio.move_on_after(0.05):
                        await url_found.wait()
            service = RunningService(found[0], process, piddir, data_dir, fake_home, log)
            yield service
            if stop_signal is not None and process.poll() is None:
                process.send_signal(stop_signal)
            with trio.fail_after(60):
                code = await process.wait()
            if expect_exit is not None:
                assert code == expect_exit, f"service exited {code}:\n{service.log_text()}"
    finally:
        if process.poll() is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
