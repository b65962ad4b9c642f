"""``python -m claude_code_api.demo`` (``scripts/demo``, ``make demo``): see it answer, no account.

Starts the model stand-in (:mod:`.mock_messages_api` answering with :func:`.answers.demo_answer`)
in this process, and the service as a child process wired to it: the real bundled Claude
Code CLI, ``ANTHROPIC_BASE_URL`` at the stand-in, a dummy ``ANTHROPIC_API_KEY`` with
``USE_CLAUDE_API_KEY=1``, its own ``DATA_DIR`` and Claude config dir in a temporary
directory, 127.0.0.1 only, and a fresh API key. Once the service is healthy it prints
curl lines to try, and runs until Ctrl-C (SIGINT) or SIGTERM.

Resource handling: on a signal, or when the service exits by itself, the service gets
SIGTERM (it stops its agents), then SIGKILL after a grace; the stand-in stops with this
process; the temporary directory is removed. The service is asked to die with this
process too (``PR_SET_PDEATHSIG``), so even a SIGKILL here leaves no server behind.

Exit status: 0 after Ctrl-C, 1 when the service does not come up (the tail of its log
is shown), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import trio

from ..config.settings import declarations
from .answers import demo_answer
from .mock_messages_api import open_mock_api

PREFERRED_PORT = 8080
HEALTH_TIMEOUT_S = 180.0  # the SDK's import and the first CLI's warm-up, on a slow machine
STOP_GRACE_S = 20.0
LOG_TAIL_LINES = 30
PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="See the service answer without a Claude account: the real Claude Code "
        "CLI with a local, scripted stand-in for the model API. Prints curl lines to try; "
        "Ctrl-C stops everything.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"the service's port on 127.0.0.1 (default {PREFERRED_PORT} if free, else any; "
        "0: any)",
    )
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else _free_or_any(PREFERRED_PORT)
    if port == 0:
        port = _free_or_any(0)
    workdir = Path(tempfile.mkdtemp(prefix="claude-code-api-demo-"))
    # Passable (not readable) by others: a root service's agents run as AGENT_UID and, without
    # the sandbox (a container), reach their HOMEs under DATA_DIR through it.
    workdir.chmod(0o711)
    try:
        status = trio.run(_demo, port, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(status)


def _free_or_any(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1 now, else a free one."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def service_environment(
    environ: Mapping[str, str], *, port: int, api_key: str, model_url: str, workdir: Path
) -> dict[str, str]:
    """The service's environment: the caller's, minus every setting and credential, plus ours."""
    settings = {declared.name for _, declared in declarations()}
    env = {
        name: value
        for name, value in environ.items()
        if name not in settings
        and not name.startswith("ANTHROPIC_")
        and name not in ("CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CONFIG_DIR")
    }
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "API_KEYS": f"demo:{api_key}",
            "AUTH_ADMINS": "demo",
            "DATA_DIR": str(workdir / "data"),
            # The service's own Claude config dir: never the real login in ~/.claude.
            "CLAUDE_CONFIG_DIR": str(workdir / "claude-config"),
            "USE_CLAUDE_API_KEY": "1",
            "ANTHROPIC_API_KEY": "sk-ant-demo-not-a-real-key",
            "ANTHROPIC_BASE_URL": model_url,
            # Without it the CLI makes calls the stand-in has no use for (and retries them).
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


async def _demo(port: int, workdir: Path) -> int:
    api_key = "sk-demo-" + secrets.token_hex(8)
    async with open_mock_api(default=demo_answer) as model:
        env = service_environment(
            os.environ, port=port, api_key=api_key, model_url=model.url, workdir=workdir
        )
        log_path = workdir / "service.log"
        with (
            open(log_path, "wb") as log_file,
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        ):
            # Started from this (the main) thread, not trio's worker threads: the death signal
            # follows the thread that forked, and trio retires its idle threads after seconds.
            service = subprocess.Popen(
                [sys.executable, "-m", "claude_code_api", "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                preexec_fn=_die_with_parent,
            )
            try:
                return await _run(
                    service, signals, f"http://127.0.0.1:{port}", api_key, model.url, log_path
                )
            finally:
                await _stop(service)


async def _run(
    service: subprocess.Popen[bytes],
    signals: AsyncIterator[int],
    url: str,
    api_key: str,
    model_url: str,
    log_path: Path,
) -> int:
    """Wait for the service to be healthy, print what to try, then for a signal; the exit status."""
    ended: list[str] = []  # why the wait ended: "signal" or "exited"
    async with trio.open_nursery() as nursery:

        async def until_the_service_exits() -> None:
            await _wait(service)
            ended.append("exited")
            nursery.cancel_scope.cancel()

        async def until_a_signal() -> None:
            async for _signum in signals:
                ended.append("signal")
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(until_the_service_exits)
        nursery.start_soon(until_a_signal)
        reason = await _wait_healthy(url)
        if reason is not None:
            print(f"demo: the service did not become healthy: {reason}", file=sys.stderr)
            _show_log_tail(log_path)
            return 1
        _print_instructions(url, api_key, model_url, log_path)
        await trio.sleep_forever()
    if ended[:1] == ["signal"]:
        print("\ndemo: stopping the service and the model stand-in", flush=True)
        return 0
    print(f"demo: the service exited (status {service.returncode})", file=sys.stderr)
    _show_log_tail(log_path)
    return 1


async def _wait_healthy(url: str) -> str | None:
    """Poll ``/health`` until ``ok``; why not, after HEALTH_TIMEOUT_S."""
    last = "no answer yet"
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.move_on_after(HEALTH_TIMEOUT_S):
            while True:
                try:
                    health = (await client.get(f"{url}/health")).json()
                except (httpx.HTTPError, ValueError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if health.get("status") == "ok":
                        return None
                    last = f"status {health.get('status')}: {health.get('reason', '')}".strip()
                await trio.sleep(0.25)
    return f"after {HEALTH_TIMEOUT_S:.0f} s, {last}"


def _print_instructions(url: str, api_key: str, model_url: str, log_path: Path) -> None:
    lines = [
        f"The demo is up: the service on {url} runs the real Claude Code CLI, whose model is",
        f"a local stand-in with scripted answers on {model_url} (no Claude account, no network).",
        "",
        f"API key: {api_key}",
        f"Service log: {log_path} (removed on exit)",
        "",
        "Try, in another terminal:",
        "",
        *curl_lines(url, api_key),
        "",
        "Ctrl-C stops the service and the stand-in.",
    ]
    print("\n".join(lines), flush=True)


def _show_log_tail(log_path: Path) -> None:
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return
    print(f"--- the last lines of {log_path}:", *tail, sep="\n", file=sys.stderr)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


async def _wait(service: subprocess.Popen[bytes]) -> None:
    """Return once the service has exited (and is reaped)."""
    while service.poll() is None:
        await trio.sleep(0.1)


async def _stop(service: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a grace for it to stop its agents, then SIGKILL; waited for, shielded."""
    with trio.CancelScope(shield=True):
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE_S):
                await _wait(service)
        if service.poll() is None:
            service.kill()
            await _wait(service)


def curl_lines(url: str, api_key: str) -> list[str]:
    """What the demo prints to try: comments and one curl command a line."""
    auth = f"-H 'x-api-key: {api_key}' -H 'Content-Type: application/json'"

    def run(body: dict[str, object], *, stream: bool = False) -> str:
        flags = "-sN" if stream else "-s"
        return f"curl {flags} -X POST {url}/run {auth} -d {shlex.quote(json.dumps(body))}"

    return [
        "# A one-shot question:",
        run({"prompt": "What is 6*7?"}),
        "",
        "# A session remembers what you said (two turns, one sessionId):",
        run({"prompt": "My name is Ada.", "sessionId": "demo"}),
        run({"prompt": "What is my name?", "sessionId": "demo"}),
        "",
        "# A stream (SSE) in which the agent calls a tool (Bash runs ls in its workspace):",
        run({"prompt": "List the files here.", "stream": True}, stream=True),
    ]


if __name__ == "__main__":
    main()
