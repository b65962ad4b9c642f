"""``scripts/demo``: the service with the real CLI and the scripted model stand-in.

The demo is run as a newcomer runs it: its printed curl lines are run as printed (with curl
when it is installed, else the same requests with httpx), their answers checked, and a
SIGINT must leave none of its processes behind. The stand-in's scripted answers are
checked on their own too.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from claude_code_api.demo.answers import demo_answer
from claude_code_api.demo.mock_messages_api import RecordedRequest, TextReply, ToolUseReply
from tests.support.real_cli import requires_real_cli

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo"
BUDGET_S = 120
READY_MARK = "Ctrl-C stops the service and the stand-in."
THREADS_RETIRED_S = 12


def sse_events(text: str) -> list[tuple[str, dict]]:
    """``(event, data)`` of each event in an SSE body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc; zombies count as gone)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def run_curl(line: str) -> str:
    """Run a printed curl line; its output. Without curl, the same request with httpx."""
    argv = shlex.split(line)
    if shutil.which("curl"):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
        return done.stdout.decode()
    method, headers, body, url = "GET", {}, None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, value = next(args).split(": ", 1)
            headers[name] = value
        elif arg == "-d":
            body = next(args)
        elif not arg.startswith("-"):
            url = arg
    assert url is not None, line
    async with httpx.AsyncClient(timeout=60) as client:
        return (await client.request(method, url, headers=headers, content=body)).text


@requires_real_cli
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_the_demo_answers_the_curl_lines_it_prints_and_stops_on_sigint(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), VENV=str(Path(sys.executable).parent.parent))
    env.pop("API_KEYS", None)
    with trio.fail_after(BUDGET_S):
        demo = await trio.lowlevel.open_process(
            [str(DEMO), "--port", "0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with trio.open_nursery() as nursery:
                errors = bytearray()

                async def drain_stderr() -> None:
                    assert demo.stderr is not None
                    while chunk := await demo.stderr.receive_some():
                        errors.extend(chunk)

                nursery.start_soon(drain_stderr)
                printed = bytearray()
                assert demo.stdout is not None
                while READY_MARK.encode() not in printed:
                    chunk = await demo.stdout.receive_some()
                    assert chunk, f"the demo ended: {printed.decode()} {errors.decode()}"
                    printed.extend(chunk)

                curls = [line for line in printed.decode().splitlines() if line.startswith("curl ")]
                assert len(curls) == 4, printed.decode()
                # Tried once the threads trio started it from have retired (idle for 10 s): a
                # service tied to the thread that forked it (PR_SET_PDEATHSIG) died then.
                await trio.sleep(THREADS_RETIRED_S)
                one_shot, my_name, asked, stream = [await run_curl(line) for line in curls]
                processes = children(demo.pid)

                demo.send_signal(signal.SIGINT)
                await demo.wait()
        finally:
            if demo.returncode is None:
                demo.kill()
                with trio.CancelScope(shield=True):
                    await demo.wait()

    assert demo.returncode == 0, errors.decode()
    assert json.loads(one_shot)["output"] == "6 * 7 = 42."
    assert json.loads(my_name)["success"] is True
    assert json.loads(asked)["output"] == "Your name is Ada."
    events = sse_events(stream)
    names = [name for name, _ in events]
    assert "tool_use" in names and names[-1] == "result", names
    assert events[names.index("tool_use")][1] == {"name": "Bash", "summary": "ls -la"}
    result = events[-1][1]
    assert result["success"] is True and result["output"].startswith("`ls -la` printed:\ntotal")

    # The service, its reaper and the agents (sandboxed or not) were running; none is now.
    assert len(processes) >= 3
    with trio.fail_after(10):
        while left := [pid for pid in processes if alive(pid)]:
            await trio.sleep(0.1)
    assert not left
    assert not list(tmp_path.glob("claude-code-api-demo-*"))  # its DATA_DIR is removed


def request(*messages: dict) -> RecordedRequest:
    return RecordedRequest(1, "POST", "/v1/messages", {}, {"messages": list(messages)})


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def test_the_stand_in_remembers_a_name_from_the_history_the_cli_sends():
    first = user("<system-reminder>my name is Nobody</system-reminder>My name is Grace.")
    reply = {"role": "assistant", "content": [{"type": "text", "text": "Nice to meet you"}]}

    assert demo_answer(request(user("What is my name?"))) == TextReply(
        'You have not told me your name yet: say "My name is ..." first.'
    )
    assert demo_answer(request(first)) == TextReply(
        "Nice to meet you, Grace. I will remember your name."
    )
    assert demo_answer(request(first, reply, user("What is my name?"))) == TextReply(
        "Your name is Grace."
    )


def test_the_stand_in_calls_a_tool_then_quotes_its_output():
    asked = user("Run `uname -s` please")
    call = demo_answer(request(asked))
    assert call == ToolUseReply(
        "Bash",
        {"command": "uname -s", "description": "Run uname -s"},
        text="I will run `uname -s`.",
    )
    tool_use = {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "uname -s"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "Linux\n"}
    answer = demo_answer(
        request(
            asked,
            {"role": "assistant", "content": [tool_use]},
            {"role": "user", "content": [result]},
        )
    )
    assert answer == TextReply("`uname -s` printed:\nLinux")
    assert demo_answer(request(user("what is 2+2?"))) == TextReply("2 + 2 = 4.")
    assert demo_answer(request(user("What date is it?"))).name == "Bash"
