"""The fake `claude` CLI (tests/fake_claude.py), driven through the real claude-agent-sdk.

These tests pin both the fake's behaviour and the SDK's reaction to it, so the
service's tests can rely on the fake failing the way the real CLI fails.
"""

import ast
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest
import trio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLIConnectionError,
    CLIJSONDecodeError,
    ProcessError,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

FAKE = pathlib.Path(__file__).parent.parent.joinpath("fake_claude.py")


def make_options(tmp_path, env=None, **kwargs):
    base_env = {
        "FAKE_CLAUDE_HOME": str(tmp_path),
        # Isolate from whatever the developer's shell exports.
        "FAKE_CLAUDE_MODE": "",
        "FAKE_CLAUDE_MODE_FILE": "",
        "FAKE_CLAUDE_PIDDIR": "",
        "FAKE_CLAUDE_LOG": "",
        "ANTHROPIC_API_KEY": "",
    }
    return ClaudeAgentOptions(cli_path=str(FAKE), env={**base_env, **(env or {})}, **kwargs)


async def run_turn(client, prompt):
    await client.query(prompt)
    return [message async for message in client.receive_response()]


def texts(messages):
    return [
        block.text
        for message in messages
        if isinstance(message, AssistantMessage)
        for block in message.content
        if isinstance(block, TextBlock)
    ]


def result_of(messages):
    assert isinstance(messages[-1], ResultMessage), messages
    return messages[-1]


def pid_alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def only_pid(piddir):
    pids = [int(p.name) for p in pathlib.Path(piddir).iterdir()]
    assert len(pids) == 1, pids
    return pids[0]


def fake_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_CLAUDE_")}
    env["FAKE_CLAUDE_HOME"] = str(tmp_path)
    env.update(extra)
    return env


def user_line(prompt):
    return (
        json.dumps(
            {
                "type": "user",
                "message": {"role": "user", "content": prompt},
                "parent_tool_use_id": None,
                "session_id": "default",
            }
        )
        + "\n"
    ).encode()


# -- the file itself ---------------------------------------------------------


def test_fake_is_executable_stdlib_only():
    assert os.access(FAKE, os.X_OK)
    source = FAKE.read_text()
    assert source.startswith("#!/usr/bin/env python3\n")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


# -- conversations -----------------------------------------------------------


async def test_echo_turn(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            messages = await run_turn(client, "hello there")
        finally:
            await client.disconnect()
    assert isinstance(messages[0], SystemMessage) and messages[0].subtype == "init"
    session_id = messages[0].data["session_id"]
    uuid.UUID(session_id)
    assert texts(messages) == ["echo: hello there"]
    result = result_of(messages)
    assert result.subtype == "success" and not result.is_error
    assert result.result == "echo: hello there"
    assert result.session_id == session_id
    assert result.usage["input_tokens"] > 0 and result.usage["output_tokens"] > 0
    assert all(m.session_id == session_id for m in messages if isinstance(m, AssistantMessage))
    # The transcript holds the prompt, the reply, then what the turn cost.
    lines = (tmp_path / "transcripts" / f"{session_id}.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["type"] for e in entries] == ["user", "assistant", "cost"]
    assert entries[0]["message"]["content"] == "hello there"


async def test_two_turns_in_one_process_remember_the_name(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            first = await run_turn(client, "What is my name?")
            second = await run_turn(client, "My name is Alice.")
            third = await run_turn(client, "What is my name?")
        finally:
            await client.disconnect()
    assert result_of(first).result == "I don't know your name."
    assert result_of(second).result == "Nice to meet you, Alice."
    assert result_of(third).result == "Your name is Alice."
    assert result_of(first).session_id == result_of(third).session_id


async def test_resume_in_a_new_process_remembers_the_name(tmp_path):
    session_id = str(uuid.uuid4())
    log = tmp_path / "log.jsonl"
    env = {"FAKE_CLAUDE_LOG": str(log)}
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path, env, session_id=session_id))
        await client.connect()
        try:
            first = await run_turn(client, "My name is Bob.")
        finally:
            await client.disconnect()
        assert result_of(first).session_id == session_id

        client = ClaudeSDKClient(make_options(tmp_path, env, resume=session_id))
        await client.connect()
        try:
            second = await run_turn(client, "What is my name?")
        finally:
            await client.disconnect()
    assert result_of(second).result == "Your name is Bob."
    assert result_of(second).session_id == session_id
    starts = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "start"]
    assert f"--session-id={session_id}" in starts[0]["argv"]
    assert f"--resume={session_id}" in starts[1]["argv"]
    assert starts[0]["pid"] != starts[1]["pid"]


async def test_the_cost_is_the_conversations_running_total_as_the_real_clis(tmp_path):
    """As measured with the real CLI (tests/REAL_CLI_FINDINGS.md, "Costs of a turn")."""
    session_id = str(uuid.uuid4())
    totals = []
    with trio.fail_after(10):
        for options, prompts in [
            (make_options(tmp_path, session_id=session_id), ["one", "two"]),
            (make_options(tmp_path, resume=session_id), ["three", "/clear", "four"]),
        ]:
            client = ClaudeSDKClient(options)
            await client.connect()
            try:
                for prompt in prompts:
                    result = result_of(await run_turn(client, prompt))
                    totals.append(result.total_cost_usd)
                    assert result.usage["input_tokens"] == max(1, len(prompt) // 4)  # its own
            finally:
                await client.disconnect()
    assert [round(total / 0.0001, 6) for total in totals] == [1, 2, 3, 0, 1]


async def test_fresh_process_without_resume_forgets(tmp_path):
    with trio.fail_after(10):
        for prompt, expected in [
            ("My name is Carol.", "Nice to meet you, Carol."),
            ("What is my name?", "I don't know your name."),
        ]:
            client = ClaudeSDKClient(make_options(tmp_path))
            await client.connect()
            try:
                assert result_of(await run_turn(client, prompt)).result == expected
            finally:
                await client.disconnect()


async def test_reusing_a_session_id_fails_at_connect(tmp_path):
    session_id = str(uuid.uuid4())
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path, session_id=session_id))
        await client.connect()
        try:
            await run_turn(client, "hi")
        finally:
            await client.disconnect()

        stderr_lines = []
        client = ClaudeSDKClient(
            make_options(tmp_path, session_id=session_id, stderr=stderr_lines.append)
        )
        # The CLI exits 1 before answering initialize: connect() itself raises
        # (the reader fails the pending initialize request with the ProcessError).
        with pytest.raises(ProcessError) as info:
            await client.connect()
        await client.disconnect()
    assert info.value.exit_code == 1
    assert type(info.value) is ProcessError
    # The real reason is only on stderr, seen through the stderr callback.
    assert f"Error: Session ID {session_id} is already in use." in stderr_lines


async def test_resuming_an_unknown_session_fails_at_connect(tmp_path):
    session_id = str(uuid.uuid4())
    stderr_lines = []
    with trio.fail_after(10):
        client = ClaudeSDKClient(
            make_options(tmp_path, resume=session_id, stderr=stderr_lines.append)
        )
        with pytest.raises(ProcessError) as info:
            await client.connect()
        await client.disconnect()
    assert info.value.exit_code == 1
    assert f"No conversation found with session ID: {session_id}" in stderr_lines


# -- interrupts and faults ---------------------------------------------------


async def test_slow_turn_interrupted(tmp_path):
    with trio.fail_after(15):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            await client.query("go [[fake:slow:50:0.1]]")
            messages = []
            async for message in client.receive_response():
                messages.append(message)
                if texts(messages) == ["piece 1", "piece 2"]:
                    await client.interrupt()
            # The same client is usable once the interrupted turn is drained.
            after = await run_turn(client, "still there?")
        finally:
            await client.disconnect()
    result = result_of(messages)
    assert result.subtype == "error_during_execution" and result.is_error
    pieces = texts(messages)
    assert 2 <= len(pieces) < 10
    assert pieces == [f"piece {i}" for i in range(1, len(pieces) + 1)]
    assert result_of(after).result == "echo: still there?"


async def test_slow_turn_runs_to_completion(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            start = trio.current_time()
            messages = await run_turn(client, "[[fake:slow:3:0.2]]")
            elapsed = trio.current_time() - start
        finally:
            await client.disconnect()
    assert texts(messages) == ["piece 1", "piece 2", "piece 3"]
    assert result_of(messages).result == "piece 1piece 2piece 3"
    assert elapsed >= 0.35


async def test_sleep_is_interruptible(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            await client.query("[[fake:sleep:30]]")
            await trio.sleep(0.3)
            await client.interrupt()
            messages = [m async for m in client.receive_response()]
        finally:
            await client.disconnect()
    assert result_of(messages).subtype == "error_during_execution"
    assert texts(messages) == []


async def test_crash_raises_process_error(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        messages = []
        try:
            await client.query("[[fake:crash:7]]")
            with pytest.raises(ProcessError) as info:
                async for message in client.receive_response():
                    messages.append(message)
        finally:
            await client.disconnect()
    assert type(info.value) is ProcessError
    assert info.value.exit_code == 7
    assert texts(messages) == ["partial before crash"]
    assert not any(isinstance(m, ResultMessage) for m in messages)


async def test_error_result_and_process_stays_alive(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            failed = await run_turn(client, "[[fake:error]]")
            after = await run_turn(client, "again")
        finally:
            await client.disconnect()
    result = result_of(failed)
    assert result.is_error and result.subtype == "error_max_turns"
    assert result.errors and "maximum number of turns" in result.errors[0]
    assert result_of(after).result == "echo: again"


async def test_garbage_line_raises_json_decode_error(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            await client.query("[[fake:garbage]]")
            with pytest.raises(CLIJSONDecodeError):
                async for _ in client.receive_response():
                    pass
        finally:
            await client.disconnect()


async def test_truncated_line_raises_json_decode_error(tmp_path):
    piddir = tmp_path / "pids"
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path, {"FAKE_CLAUDE_PIDDIR": str(piddir)}))
        await client.connect()
        try:
            await client.query("[[fake:truncated]]")
            with pytest.raises(CLIJSONDecodeError) as info:
                async for _ in client.receive_response():
                    pass
        finally:
            await client.disconnect()
    assert info.value.line.startswith('{"type":"assistant"')
    assert not pid_alive(only_pid(piddir))


async def test_tool_use_then_text(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            messages = await run_turn(client, "list [[fake:tool]]")
        finally:
            await client.disconnect()
    tool_uses = [
        block
        for m in messages
        if isinstance(m, AssistantMessage)
        for block in m.content
        if isinstance(block, ToolUseBlock)
    ]
    assert [(t.id, t.name, t.input) for t in tool_uses] == [("toolu_1", "Bash", {"command": "ls"})]
    tool_results = [
        block
        for m in messages
        if isinstance(m, UserMessage) and isinstance(m.content, list)
        for block in m.content
        if isinstance(block, ToolResultBlock)
    ]
    assert [t.tool_use_id for t in tool_results] == ["toolu_1"]
    assert texts(messages) == ["echo: list [[fake:tool]]"]
    assert result_of(messages).result == "echo: list [[fake:tool]]"


async def test_big_reply(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            messages = await run_turn(client, "[[fake:big:300000]]")
        finally:
            await client.disconnect()
    joined = "".join(texts(messages))
    assert len(joined) == 300000 and set(joined) == {"x"}
    assert len(texts(messages)) > 1
    assert result_of(messages).result == joined


async def test_stderr_noise_then_normal_reply(tmp_path):
    lines = []
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path, stderr=lines.append))
        await client.connect()
        try:
            messages = await run_turn(client, "noisy [[fake:stderr:50]]")
            await trio.sleep(0.2)  # stderr is read by its own task
        finally:
            await client.disconnect()
    assert result_of(messages).result == "echo: noisy [[fake:stderr:50]]"
    assert len([line for line in lines if "noise" in line]) == 50


async def test_close_stdout_ends_the_stream_without_a_result(tmp_path):
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path))
        await client.connect()
        try:
            messages = await run_turn(client, "[[fake:close_stdout]]")
            # The process has exited 0; the transport refuses further writes.
            with pytest.raises(CLIConnectionError):
                await client.query("anyone?")
        finally:
            await client.disconnect()
    assert texts(messages) == ["partial before close"]
    assert not any(isinstance(m, ResultMessage) for m in messages)


async def test_hang_ignores_interrupt_and_eof_until_sigterm(tmp_path):
    piddir = tmp_path / "pids"
    with trio.fail_after(20):
        client = ClaudeSDKClient(make_options(tmp_path, {"FAKE_CLAUDE_PIDDIR": str(piddir)}))
        await client.connect()
        try:
            await client.query("[[fake:hang]]")
            async for message in client.receive_response():
                if isinstance(message, AssistantMessage):
                    break
            await client.interrupt()  # acknowledged ...
            with trio.move_on_after(1) as scope:  # ... but the turn never ends
                async for _ in client.receive_response():
                    pass
            assert scope.cancelled_caught
        finally:
            start = trio.current_time()
            await client.disconnect()
            took = trio.current_time() - start
    # disconnect(): stdin EOF is ignored, so the SDK waits 5 s, then SIGTERMs.
    assert took >= 4.5
    assert not pid_alive(only_pid(piddir))


async def test_hang_hard_ignores_sigterm(tmp_path):
    with trio.fail_after(10):
        proc = await trio.lowlevel.open_process(
            [str(FAKE), "--input-format", "stream-json"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=fake_env(tmp_path),
        )
        try:
            await proc.stdin.send_all(user_line("[[fake:hang_hard]]"))
            seen = b""
            while b"partial before hang" not in seen:
                chunk = await proc.stdout.receive_some()
                assert chunk, seen
                seen += chunk
            await proc.stdin.aclose()
            proc.send_signal(signal.SIGTERM)
            await trio.sleep(0.5)
            assert proc.poll() is None
        finally:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL


async def test_stdin_eof_exits_zero_after_finishing_the_turn(tmp_path):
    with trio.fail_after(10):
        start = time.monotonic()
        done = await trio.run_process(
            [str(FAKE), "--output-format", "stream-json", "--input-format", "stream-json"],
            stdin=user_line("[[fake:slow:3:0.2]]"),
            capture_stdout=True,
            env=fake_env(tmp_path),
        )
    assert done.returncode == 0
    assert time.monotonic() - start >= 0.35
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert lines[-1]["type"] == "result" and lines[-1]["result"] == "piece 1piece 2piece 3"


# -- start-up modes and observability ----------------------------------------


async def test_no_init_makes_connect_hang(tmp_path):
    piddir = tmp_path / "pids"
    env = {"FAKE_CLAUDE_MODE": "no_init", "FAKE_CLAUDE_PIDDIR": str(piddir)}
    with trio.fail_after(15):
        client = ClaudeSDKClient(make_options(tmp_path, env))
        with trio.move_on_after(2) as scope:
            await client.connect()
        assert scope.cancelled_caught
        pid = only_pid(piddir)
        # connect() cleans up after itself when cancelled: stdin EOF ends the fake.
        await client.disconnect()
        with trio.move_on_after(2):
            while pid_alive(pid):
                await trio.sleep(0.05)
    assert not pid_alive(pid)


async def test_mode_file_is_reread_at_each_start(tmp_path):
    mode_file = tmp_path / "mode"
    env = {"FAKE_CLAUDE_MODE_FILE": str(mode_file)}
    with trio.fail_after(15):
        mode_file.write_text("exit_at_start:4\n")
        client = ClaudeSDKClient(make_options(tmp_path, env))
        with pytest.raises(ProcessError) as info:
            await client.connect()
        assert info.value.exit_code == 4

        mode_file.write_text("garbage_at_start")
        client = ClaudeSDKClient(make_options(tmp_path, env))
        with pytest.raises(CLIJSONDecodeError):
            await client.connect()

        mode_file.write_text("slow_start:1")
        client = ClaudeSDKClient(make_options(tmp_path, env))
        start = trio.current_time()
        await client.connect()
        try:
            assert trio.current_time() - start >= 0.9
            assert result_of(await run_turn(client, "up")).result == "echo: up"
        finally:
            await client.disconnect()

        # A per-turn directive in the mode file applies to every turn.
        mode_file.write_text("crash:9")
        client = ClaudeSDKClient(make_options(tmp_path, env))
        await client.connect()
        try:
            await client.query("plain prompt")
            with pytest.raises(ProcessError) as info:
                async for _ in client.receive_response():
                    pass
            assert info.value.exit_code == 9
        finally:
            await client.disconnect()

        mode_file.unlink()
        client = ClaudeSDKClient(make_options(tmp_path, env))
        await client.connect()
        try:
            assert result_of(await run_turn(client, "ok")).result == "echo: ok"
        finally:
            await client.disconnect()


async def test_pid_file_and_log(tmp_path):
    piddir = tmp_path / "pids"
    log = tmp_path / "log.jsonl"
    env = {"FAKE_CLAUDE_PIDDIR": str(piddir), "FAKE_CLAUDE_LOG": str(log)}
    with trio.fail_after(10):
        client = ClaudeSDKClient(make_options(tmp_path, env, model="claude-test"))
        await client.connect()
        try:
            pid = only_pid(piddir)
            assert pid_alive(pid)
            await run_turn(client, "logged prompt")
        finally:
            await client.disconnect()
    assert not pid_alive(pid)
    assert (piddir / str(pid)).exists()  # never removed
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    start, turn = entries
    assert start["pid"] == pid and start["event"] == "start"
    assert start["entrypoint"] == "sdk-py"
    assert start["has_anthropic_api_key"] is False
    assert start["cwd"] == os.getcwd()
    assert "--model" in start["argv"] and "claude-test" in start["argv"]
    assert isinstance(turn["at"], float)  # when the turn began (wall clock)
    assert turn == {
        "pid": pid,
        "event": "turn",
        "at": turn["at"],
        "prompt": "logged prompt",
        "session_id": turn["session_id"],
        "memory": [],
        "images": [],
    }


@pytest.mark.parametrize(
    "setting_sources, loaded",
    [
        (None, ["user: USER-RULE", "project: PROJECT-RULE"]),
        (["project"], ["project: PROJECT-RULE"]),
        (["user"], ["user: USER-RULE"]),
        ([], []),
    ],
)
async def test_memory_files_are_read_at_start_as_the_real_cli_reads_them(
    tmp_path, setting_sources, loaded
):
    """As tests/real_cli/test_real_cli_basics.py pins it for the real CLI: user memory from
    $CLAUDE_CONFIG_DIR, project memory from the cwd; and never again in that process."""
    config, workspace = tmp_path / "config", tmp_path / "workspace"
    config.mkdir()
    workspace.mkdir()
    (config / "CLAUDE.md").write_text("USER-RULE\n")
    (workspace / "CLAUDE.md").write_text("PROJECT-RULE\n")
    options = make_options(
        tmp_path,
        env={"CLAUDE_CONFIG_DIR": str(config)},
        cwd=str(workspace),
        setting_sources=setting_sources,
    )
    with trio.fail_after(20):
        async with ClaudeSDKClient(options) as client:
            (config / "CLAUDE.md").write_text("CHANGED-AFTER-START\n")
            first = result_of(await run_turn(client, "[[fake:memory]]")).result
    expected = " | ".join(loaded) or "none"
    assert first == f"memory: {expected}"


async def test_system_reminder_blocks_are_context_and_the_rest_is_the_prompt(tmp_path):
    async def message(*texts):
        content = [{"type": "text", "text": text} for text in texts]
        yield {"type": "user", "message": {"role": "user", "content": content}}

    with trio.fail_after(20):
        async with ClaudeSDKClient(make_options(tmp_path, cwd=str(tmp_path))) as client:
            await client.query(message("<system-reminder>RULE-1</system-reminder>", "hello"))
            echo = result_of([m async for m in client.receive_response()]).result
            later = result_of(await run_turn(client, "[[fake:memory]]")).result
    assert echo == "echo: hello"
    # Kept for the rest of the conversation, as the real CLI keeps it in its history.
    assert later == "memory: context: <system-reminder>RULE-1</system-reminder>"
