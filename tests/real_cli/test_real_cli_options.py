"""The real bundled CLI: a warm process switched by control requests (per-request options).

The service starts its pool's agents with ``bypassPermissions`` and
``CLAUDE_MODEL`` before any request is known, and gives a request another model
or permission mode with ``set_model`` / ``set_permission_mode`` on the warm
process instead of starting a new one. These pin that the switch takes effect
for the next turn exactly as the same option given at start would (see
tests/REAL_CLI_FINDINGS.md §10).
"""

from __future__ import annotations

import pytest
import trio

from claude_code_api.demo.mock_messages_api import TextReply, ToolUseReply, open_mock_api
from tests.support.real_cli import (
    CliDirs,
    open_real_cli,
    real_cli_options,
    requires_real_cli,
    run_turn,
)

pytestmark = requires_real_cli

TURN_BUDGET_S = 30


@pytest.mark.parametrize(
    ("mode", "runs"),
    [("dontAsk", False), ("default", False), ("plan", False), ("acceptEdits", True)],
)
async def test_a_permission_mode_set_on_a_warm_bypass_process_governs_its_next_turn(
    tmp_path, mode, runs
):
    with trio.fail_after(TURN_BUDGET_S):
        async with open_mock_api() as api:
            dirs = CliDirs.create(tmp_path)
            marker = dirs.workspace / "marker"
            async with open_real_cli(real_cli_options(api, dirs)) as client:
                await client.set_permission_mode(mode)
                api.enqueue(ToolUseReply("Bash", {"command": f"touch {marker}"}), TextReply("done"))
                await run_turn(client, "touch the marker")
            [result] = api.model_calls[-1].tool_results()
    assert marker.exists() is runs
    assert result["is_error"] is not runs


async def test_set_model_on_a_warm_process_is_the_model_of_its_next_turn(tmp_path):
    with trio.fail_after(TURN_BUDGET_S):
        async with open_mock_api() as api:
            dirs = CliDirs.create(tmp_path)
            options = real_cli_options(api, dirs, model="claude-sonnet-4-6")
            async with open_real_cli(options) as client:
                await client.set_model("model-b")
                api.enqueue(TextReply("hello"))
                await run_turn(client, "hi")
    # The CLI may check a new model with a one-token call first; the turn uses it.
    turn_call = api.model_calls[-1]
    assert turn_call.body["model"] == "model-b"
    assert all(call.body["model"] == "model-b" for call in api.model_calls)
