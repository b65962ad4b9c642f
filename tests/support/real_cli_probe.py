"""Drive the bundled CLI by hand against the mock and print its raw stdout, timestamped.

Not a test: the tool behind tests/REAL_CLI_FINDINGS.md, to re-check them when
the CLI changes. It speaks stream-json to the CLI directly (no SDK), so what
it prints is exactly what the CLI wrote. Examples::

    python -m tests.support.real_cli_probe --prompt hello
    python -m tests.support.real_cli_probe --status 401 --timeout 300      # the whole retry sequence
    python -m tests.support.real_cli_probe --status 500 --env CLAUDE_CODE_MAX_RETRIES=1
    python -m tests.support.real_cli_probe --base-url http://127.0.0.1:9   # nothing listening
    python -m tests.support.real_cli_probe --prompts "My name is Al." /clear "Who am I?"
    python -m tests.support.real_cli_probe --cli ./bwrap-wrapper.sh --root /tmp/x

Each output line is ``<seconds since spawn> OUT|ERR|REQ|EXIT ...``; REQ lines are
requests the mock received. ``--dump FILE`` writes every recorded request
(headers and bodies) as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from claude_code_api.demo.mock_messages_api import ApiError, open_mock_api
from tests.support.real_cli import BUNDLED_CLI, CliDirs, cli_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="hello")
    parser.add_argument("--prompts", nargs="+", help="several turns, each after the last result")
    parser.add_argument("--status", type=int, help="answer model calls with this HTTP error")
    parser.add_argument("--times", type=int, default=0, help="for --status: N calls (0: forever)")
    parser.add_argument("--header", action="append", default=[], help="for --status: NAME:VALUE")
    parser.add_argument("--base-url", help="instead of the mock's")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the CLI")
    parser.add_argument("--cli", default=str(BUNDLED_CLI), help="e.g. a bwrap wrapper script")
    parser.add_argument("--root", help="directory for config/home/workspace (default: new)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--dump", help="write the recorded requests here as JSON")
    parser.add_argument("cli_args", nargs="*", help="extra CLI arguments (after --)")
    return parser.parse_args(argv)


async def probe(args: argparse.Namespace) -> None:
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="cli-probe-"))
    dirs = CliDirs.create(root)
    started = time.monotonic()

    def say(kind: str, text: str) -> None:
        print(f"{time.monotonic() - started:8.3f} {kind} {text}", flush=True)

    async with open_mock_api() as api:
        if args.status:
            headers = tuple(tuple(h.split(":", 1)) for h in args.header)
            api.enqueue(ApiError(args.status, times=args.times or None, headers=headers))
        env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
        env.update(cli_env(args.base_url or api.url, dirs), CLAUDE_CODE_ENTRYPOINT="sdk-py")
        env.update(item.split("=", 1) for item in args.env)
        argv = [
            args.cli,
            *("--output-format", "stream-json", "--verbose", "--input-format", "stream-json"),
            *("--permission-mode", "bypassPermissions", *args.cli_args),
        ]
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=dirs.workspace,
            env=env,
        )
        results = trio.Semaphore(0)

        async def send(message: dict) -> None:
            await process.stdin.send_all(json.dumps(message).encode() + b"\n")

        async def read_stdout() -> None:
            buffer = b""
            async for chunk in process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    say("OUT", line.decode(errors="replace"))
                    if _message_type(line) == "result":
                        results.release()
            results.release()  # stdout closed: no more results will come

        async def read_stderr() -> None:
            async for chunk in process.stderr:
                say("ERR", chunk.decode(errors="replace").rstrip())

        async def report_requests() -> None:
            for number in itertools.count(1):
                requests = await api.wait_for_requests(number)
                r = requests[number - 1]
                say("REQ", f"#{r.number} {r.method} {r.target}")

        with trio.move_on_after(args.timeout) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_stdout)
                nursery.start_soon(read_stderr)
                nursery.start_soon(report_requests)
                init = {"subtype": "initialize", "hooks": None}
                await send({"type": "control_request", "request_id": "req_1", "request": init})
                for prompt in args.prompts or [args.prompt]:
                    user = {"role": "user", "content": prompt}
                    await send({"type": "user", "message": user, "parent_tool_use_id": None})
                    await results.acquire()
                    if process.poll() is not None:
                        break
                await process.stdin.aclose()
                say("EXIT", str(await process.wait()))
                nursery.cancel_scope.cancel()
        if deadline.cancelled_caught:
            say("TIMEOUT", f"after {args.timeout:g}s; killing pid {process.pid}")
            process.kill()
            await process.wait()
        if args.dump:
            recorded = [
                {"number": r.number, "target": r.target, "status": r.status,
                 "disconnected": r.disconnected, "headers": r.headers, "body": r.body}
                for r in api.requests
            ]  # fmt: skip
            Path(args.dump).write_text(json.dumps(recorded, default=repr))
    print(f"root: {root}")


def _message_type(line: bytes) -> str | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message.get("type") if isinstance(message, dict) else None


def main(argv: list[str] | None = None) -> None:
    trio.run(probe, parse_args(argv))


if __name__ == "__main__":
    main()
