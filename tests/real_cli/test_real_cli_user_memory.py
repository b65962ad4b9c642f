"""When the real CLI reads CLAUDE.md, and how context handed with a prompt reaches the model.

Pins what per-user CLAUDE.md delivery relies on (tests/REAL_CLI_FINDINGS.md,
section 8): the bundled CLI reads CLAUDE.md files when its process starts and
never again in that process — a file written into a warm agent's config dir or
cwd after start reaches none of its turns, while a new process (resuming the
conversation) loads the new one. So a pre-warmed one-shot agent gets its user's
CLAUDE.md with the prompt, as a text block of its own before the prompt, and
these tests pin that the model receives it there, like the CLI's own memory
block, and that the prompt still works as a slash command.
"""

from __future__ import annotations

import pytest
import trio
from claude_agent_sdk import ResultMessage

from claude_code_api.demo.mock_messages_api import RecordedRequest, open_mock_api
from tests.support.real_cli import (
    CliDirs,
    open_real_cli,
    real_cli_options,
    requires_real_cli,
    run_turn,
)

pytestmark = requires_real_cli

BUDGET_S = 60


def first_user_texts(call: RecordedRequest) -> list[str]:
    """The text blocks of the first user message of a model call."""
    first = next(m for m in call.messages if m.get("role") == "user")
    content = first["content"]
    if isinstance(content, str):
        return [content]
    return [block["text"] for block in content if block.get("type") == "text"]


@pytest.mark.parametrize("where", ["config dir", "cwd"])
async def test_a_claude_md_written_after_start_reaches_no_turn_of_that_process(tmp_path, where):
    dirs = CliDirs.create(tmp_path)
    target = (dirs.config_dir if where == "config dir" else dirs.workspace) / "CLAUDE.md"
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with open_real_cli(real_cli_options(api, dirs)) as client:
                target.write_text("WRITTEN-AFTER-START\n")  # the agent is warm and idle
                await run_turn(client, "first")
                await run_turn(client, "second")
            transcript = dirs.transcripts()[0].stem
            # A new process resuming the conversation reads it.
            resumed = real_cli_options(api, dirs, resume=transcript)
            async with open_real_cli(resumed) as client:
                await run_turn(client, "third")
    first, second, third = api.model_calls
    assert "WRITTEN-AFTER-START" not in first.all_text() + second.all_text()
    assert "WRITTEN-AFTER-START" in third.all_text()


async def test_the_claude_md_in_the_services_session_layout_is_loaded_once(tmp_path):
    """HOME/.claude is both CLAUDE_CONFIG_DIR and in an ancestor of the cwd: one copy."""
    home = tmp_path / "home"
    dirs = CliDirs(home / ".claude", home, home / "workspace", home / "tmp")
    for path in (dirs.config_dir, dirs.workspace, dirs.tmp_dir):
        path.mkdir(parents=True)
    (dirs.config_dir / "CLAUDE.md").write_text("SESSION-USER-RULE\n")
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with open_real_cli(real_cli_options(api, dirs)) as client:
                await run_turn(client, "hello")
    (call,) = api.model_calls
    assert call.all_text().count("SESSION-USER-RULE") == 1
    assert "SESSION-USER-RULE" not in call.system_text()
    texts = first_user_texts(call)
    assert texts[0].startswith("<system-reminder>") and "SESSION-USER-RULE" in texts[0]
    assert texts[-1] == "hello"


async def test_a_context_block_before_the_prompt_reaches_the_model_and_a_slash_command_still_runs(
    tmp_path,
):
    dirs = CliDirs.create(tmp_path)

    async def message(*texts: str):
        content = [{"type": "text", "text": text} for text in texts]
        yield {"type": "user", "message": {"role": "user", "content": content}}

    context = "<system-reminder>\nHANDED-WITH-THE-PROMPT\n</system-reminder>"
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            async with open_real_cli(real_cli_options(api, dirs)) as client:
                await client.query(message(context, "the prompt"))
                answer = [m async for m in client.receive_response()][-1]
                await client.query(message(context, "/cost"))
                cost = [m async for m in client.receive_response()][-1]
    assert isinstance(answer, ResultMessage) and answer.result == "echo: the prompt"
    (call,) = api.model_calls  # /cost made no model call: the CLI ran it as a command
    texts = first_user_texts(call)
    assert texts[-2:] == [context, "the prompt"]
    assert "HANDED-WITH-THE-PROMPT" not in call.system_text()
    assert isinstance(cost, ResultMessage) and "cost" in (cost.result or "").lower()
