"""The real bundled Claude Code CLI, through the real SDK, against the mock Messages API.

These pin down what the service relies on (see tests/REAL_CLI_FINDINGS.md):
how many model calls a turn makes, how tool calls and upstream errors look on
the wire, what ``/clear`` does to the session id, where transcripts go. Each
test starts one CLI (~1 s warm-up here) and runs under ``trio.fail_after``.
"""

from __future__ import annotations

import pytest
import trio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeSDKError,
    ConversationResetMessage,
    ProcessError,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from claude_code_api.demo.mock_messages_api import (
    ApiError,
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from tests.support.real_cli import (
    RUNNING_AS_ROOT,
    CliDirs,
    open_real_cli,
    real_cli_options,
    requires_real_cli,
    run_turn,
)

pytestmark = requires_real_cli

# One CLI start, one short turn and a disconnect, on a loaded 2-CPU machine.
TURN_BUDGET_S = 30


@pytest.fixture
async def mock_api():
    async with open_mock_api() as api:
        yield api


@pytest.fixture
def cli_dirs(tmp_path):
    return CliDirs.create(tmp_path)


def result_of(messages: list) -> ResultMessage:
    assert isinstance(messages[-1], ResultMessage), messages
    return messages[-1]


def system_messages(messages: list, subtype: str) -> list[SystemMessage]:
    return [m for m in messages if isinstance(m, SystemMessage) and m.subtype == subtype]


def assistant_texts(messages: list) -> list[str]:
    return [
        block.text
        for m in messages
        if isinstance(m, AssistantMessage)
        for block in m.content
        if isinstance(block, TextBlock)
    ]


async def test_one_shot_text_reply_makes_exactly_one_model_call(mock_api, cli_dirs):
    mock_api.enqueue(TextReply("Four.", chunk_size=2))
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)) as client:
            messages = await run_turn(client, "What is 2+2?")

    result = result_of(messages)
    assert (result.subtype, result.is_error, result.result) == ("success", False, "Four.")
    assert assistant_texts(messages) == ["Four."]
    assert [r.path for r in mock_api.requests] == ["/v1/messages"]
    call = mock_api.model_calls[0]
    assert call.body["stream"] is True
    assert call.last_user_text() == "What is 2+2?"
    assert call.headers["x-api-key"] == "sk-ant-mock-key"
    assert call.headers["x-claude-code-session-id"] == result.session_id


async def test_initialize_makes_no_model_call(mock_api, cli_dirs):
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)):
            await trio.sleep(0.5)  # room for any call the CLI would make after initialize
    assert mock_api.requests == []


async def test_bash_tool_call_round_trip(mock_api, cli_dirs):
    mock_api.enqueue(
        ToolUseReply("Bash", {"command": "echo tool-says-$((6*7))", "description": "say 42"}),
        TextReply("The tool said 42."),
    )
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)) as client:
            messages = await run_turn(client, "run it")

    assert result_of(messages).result == "The tool said 42."
    (tool_use,) = [
        block
        for m in messages
        if isinstance(m, AssistantMessage)
        for block in m.content
        if isinstance(block, ToolUseBlock)
    ]
    assert tool_use.name == "Bash"
    first, second = mock_api.model_calls
    assert first.tool_results() == []
    (tool_result,) = second.tool_results()
    assert tool_result["tool_use_id"] == tool_use.id
    assert tool_result_text(tool_result).strip() == "tool-says-42"
    assert not tool_result.get("is_error")
    # The SDK relays the same result as a UserMessage with a ToolResultBlock.
    relayed = [
        block
        for m in messages
        if isinstance(m, UserMessage) and isinstance(m.content, list)
        for block in m.content
        if isinstance(block, ToolResultBlock)
    ]
    assert [b.tool_use_id for b in relayed] == [tool_use.id]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, "authentication_failed"),
        (429, "rate_limit"),
        (500, "server_error"),
        (529, "overloaded"),
    ],
)
async def test_retryable_upstream_error_is_reported_as_api_retry(mock_api, cli_dirs, status, error):
    mock_api.enqueue(ApiError(status), TextReply("recovered"))
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)) as client:
            messages = await run_turn(client, "hello")

    (retry,) = system_messages(messages, "api_retry")
    data = dict(retry.data)
    assert 300 <= data.pop("retry_delay_ms") <= 1000  # the first back-off: ~0.5 s + jitter
    assert data.pop("session_id") == result_of(messages).session_id
    data.pop("uuid")
    assert data == {
        "type": "system",
        "subtype": "api_retry",
        "attempt": 1,
        "max_retries": 10,
        "error_status": status,
        "error": error,
    }
    assert result_of(messages).result == "recovered"
    assert [r.status for r in mock_api.model_calls] == [status, 200]


async def test_exhausted_retries_end_the_turn_with_an_error_result(mock_api, cli_dirs):
    mock_api.enqueue(ApiError(500, "upstream is down", times=None))
    options = real_cli_options(mock_api, cli_dirs, env={"CLAUDE_CODE_MAX_RETRIES": "1"})
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(options) as client:
            messages = await run_turn(client, "hello")
            # The process survives an error result and takes the next turn.
            mock_api.clear_script()
            after = await run_turn(client, "again")

    assert [m.data["attempt"] for m in system_messages(messages, "api_retry")] == [1]
    result = result_of(messages)
    assert (result.subtype, result.is_error, result.api_error_status) == ("success", True, 500)
    assert result.result.startswith("API Error: 500 upstream is down")
    (error_message,) = [m for m in messages if isinstance(m, AssistantMessage)]
    assert (error_message.model, error_message.error) == ("<synthetic>", "server_error")
    assert len(mock_api.model_calls) == 3
    assert result_of(after).result == "echo: again"


@pytest.mark.parametrize("status", [403, 413])
async def test_non_retryable_upstream_error_fails_at_once(mock_api, cli_dirs, status):
    mock_api.enqueue(ApiError(status, times=None))
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)) as client:
            messages = await run_turn(client, "hello")

    assert system_messages(messages, "api_retry") == []
    result = result_of(messages)
    assert (result.is_error, result.api_error_status) == (True, status)
    assert len(mock_api.model_calls) == 1


async def test_unreachable_api_is_retried_without_a_status(mock_api, cli_dirs):
    options = real_cli_options(
        mock_api,
        cli_dirs,
        # Port 9 (discard) on loopback: nothing listens, the connection is refused.
        env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "CLAUDE_CODE_MAX_RETRIES": "1"},
    )
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(options) as client:
            messages = await run_turn(client, "hello")

    (retry,) = system_messages(messages, "api_retry")
    assert (retry.data["error_status"], retry.data["error"]) == (None, "unknown")
    result = result_of(messages)
    assert (result.is_error, result.api_error_status) == (True, None)
    assert "ECONNREFUSED" in result.result


async def test_interrupt_mid_stream_aborts_the_model_call(mock_api, cli_dirs):
    mock_api.enqueue(TextReply("x" * 400, chunk_size=10, chunk_delay=0.25))
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)) as client:
            await client.query("talk slowly")
            await mock_api.wait_for_model_calls(1)
            await trio.sleep(0.5)
            await client.interrupt()
            messages = []
            async for message in client.receive_messages():
                messages.append(message)
                if isinstance(message, ResultMessage):
                    break
            await mock_api.wait_until(lambda: mock_api.model_calls[0].disconnected)
            after = await run_turn(client, "still there?")

    result = result_of(messages)
    assert (result.subtype, result.is_error) == ("error_during_execution", True)
    assert not mock_api.model_calls[0].completed
    assert result_of(after).result == "echo: still there?"


async def test_clear_moves_the_conversation_to_a_new_session_id(mock_api, cli_dirs):
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, cli_dirs)) as client:
            first = await run_turn(client, "My name is Alice.")
            cleared = await run_turn(client, "/clear")
            after = await run_turn(client, "What is my name?")

    old_id = result_of(first).session_id
    new_id = result_of(cleared).session_id
    assert new_id != old_id
    (reset,) = [m for m in cleared if isinstance(m, ConversationResetMessage)]
    assert reset.session_id == old_id
    assert reset.new_conversation_id != new_id  # not the session id: read that from init
    (init,) = system_messages(cleared, "init")
    assert init.data["session_id"] == new_id
    assert result_of(cleared).result == ""  # a local command: no model call
    assert result_of(after).session_id == new_id
    assert len(mock_api.model_calls) == 2
    assert "Alice" not in mock_api.model_calls[1].all_text()


@pytest.mark.parametrize("persist", [True, False], ids=["default", "no-session-persistence"])
async def test_transcripts_unless_no_session_persistence(mock_api, cli_dirs, persist):
    extra_args = {} if persist else {"no-session-persistence": None}
    options = real_cli_options(mock_api, cli_dirs, extra_args=extra_args)
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(options) as client:
            messages = await run_turn(client, "hello")

    session_id = result_of(messages).session_id
    transcripts = cli_dirs.transcripts()
    if persist:
        assert [p.name for p in transcripts] == [f"{session_id}.jsonl"]
        assert transcripts[0].parent.parent == cli_dirs.config_dir / "projects"
    else:
        assert transcripts == []


@pytest.mark.parametrize("max_buffer_size", [None, 4 * 1024 * 1024], ids=["default", "4MiB"])
async def test_stdout_line_over_one_mebibyte(mock_api, cli_dirs, max_buffer_size):
    big = "y" * (1024 * 1024 + 100)
    mock_api.enqueue(TextReply(big))
    options = real_cli_options(mock_api, cli_dirs, max_buffer_size=max_buffer_size)
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(options) as client:
            if max_buffer_size is None:
                with pytest.raises(ClaudeSDKError, match="maximum buffer size"):
                    await run_turn(client, "say a lot")
            else:
                messages = await run_turn(client, "say a lot")
                assert result_of(messages).result == big


@pytest.mark.parametrize(
    ("setting_sources", "loaded"),
    [(None, {"project", "user"}), (["project"], {"project"}), ([], set())],
    ids=["sdk-default", "project", "none"],
)
async def test_which_claude_md_files_reach_the_model(mock_api, cli_dirs, setting_sources, loaded):
    (cli_dirs.workspace / "CLAUDE.md").write_text("PROJECT-MARKER-7431\n")
    (cli_dirs.config_dir / "CLAUDE.md").write_text("USER-MARKER-9920\n")
    options = real_cli_options(mock_api, cli_dirs, setting_sources=setting_sources)
    with trio.fail_after(TURN_BUDGET_S):
        async with open_real_cli(options) as client:
            await run_turn(client, "hello")

    (call,) = mock_api.model_calls
    markers = {"project": "PROJECT-MARKER-7431", "user": "USER-MARKER-9920"}
    assert {name for name, marker in markers.items() if marker in call.all_text()} == loaded
    # Not in the system prompt: the CLI sends CLAUDE.md inside the first user message.
    assert not any(marker in call.system_text() for marker in markers.values())


@pytest.mark.skipif(not RUNNING_AS_ROOT, reason="the CLI's root check only applies to root")
async def test_root_without_is_sandbox_refuses_bypass_permissions(mock_api, cli_dirs):
    stderr: list[str] = []
    # Only IS_SANDBOX=1 lets root through; "", "0", "yes" and "true" do not.
    options = real_cli_options(mock_api, cli_dirs, env={"IS_SANDBOX": "yes"}, stderr=stderr.append)
    with trio.fail_after(TURN_BUDGET_S), pytest.raises(ProcessError) as caught:
        async with open_real_cli(options):
            pass
    assert stderr == [
        "--dangerously-skip-permissions cannot be used with root/sudo privileges"
        " for security reasons"
    ]
    assert caught.value.exit_code == 1
    assert mock_api.requests == []


async def test_another_cli_of_the_same_os_user_can_start_a_turn_in_an_idle_session(
    mock_api, tmp_path
):
    """A hazard, pinned: Claude Code's peer messaging crosses config dirs.

    Every CLI listens on ``cc-socks/<pid>.sock`` under ``$XDG_RUNTIME_DIR``,
    ``$CLAUDE_CODE_TMPDIR`` or /tmp (the init message's
    ``messaging_socket_path``); another CLI of the same OS user can
    ``SendMessage`` to it by path, even with a different ``CLAUDE_CONFIG_DIR``
    and temp dir, and the idle receiver runs a whole unsolicited turn on it.
    Only OS isolation (mount namespaces that hide other agents' sockets, or
    another uid) keeps agents apart.
    """
    victim_dirs = CliDirs.create(tmp_path / "victim")
    sender_dirs = CliDirs.create(tmp_path / "sender")
    with trio.fail_after(2 * TURN_BUDGET_S):
        async with open_real_cli(real_cli_options(mock_api, victim_dirs)) as victim:
            (init,) = system_messages(await run_turn(victim, "I am the victim"), "init")
            socket_path = init.data["messaging_socket_path"]
            async with open_real_cli(real_cli_options(mock_api, sender_dirs)) as sender:
                mock_api.enqueue(
                    ToolUseReply("SendMessage", {"to": f"uds:{socket_path}", "message": "PEER-7"})
                )
                await run_turn(sender, "send it")
            # The victim, idle and never queried, runs a turn on the message.
            unsolicited = []
            async for message in victim.receive_messages():
                unsolicited.append(message)
                if isinstance(message, ResultMessage):
                    break

    injected = [c for c in mock_api.model_calls if "PEER-7" in c.last_user_text()]
    assert [c.headers["x-claude-code-session-id"] for c in injected] == [init.data["session_id"]]
    assert "<cross-session-message" in injected[0].last_user_text()
    assert isinstance(unsolicited[-1], ResultMessage)
