"""What we rely on inside claude-agent-sdk that it does not promise.

:mod:`claude_code_api.agent.sdk` reaches into the SDK in a few places (see its
``_process``): these tests fail when a new SDK release moves them, instead of
the service silently losing the ability to kill a hung agent. The private parts
:mod:`claude_code_api.agent.sdk_workarounds` uses are pinned in tests/unit/test_sdk_workarounds.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

from claude_code_api.agent.sandbox import bundled_cli

FAKE_CLAUDE = Path(__file__).parent.parent.joinpath("fake_claude.py")


async def test_the_client_keeps_its_process_on_its_transport(tmp_path):
    options = ClaudeAgentOptions(
        cli_path=str(FAKE_CLAUDE),
        cwd=str(tmp_path),
        env={"FAKE_CLAUDE_HOME": str(tmp_path / "home")},
    )
    client = ClaudeSDKClient(options)
    with trio.fail_after(30):
        await client.connect()
        try:
            transport = client._transport
            process = transport._process
            assert isinstance(process.pid, int) and process.returncode is None
            assert callable(transport.end_input)
            await transport.end_input()  # EOF: the CLI exits 0
            await process.wait()
            assert process.returncode == 0
        finally:
            await client.disconnect()


def test_the_wheel_bundles_the_cli_where_we_look_for_it():
    if not sys.platform.startswith("linux"):
        return
    cli = bundled_cli()
    assert cli is not None and cli.is_file()


async def test_max_buffer_size_and_extra_args_reach_the_transport(tmp_path):
    options = ClaudeAgentOptions(
        cli_path=str(FAKE_CLAUDE),
        max_buffer_size=123_456,
        extra_args={"no-session-persistence": None},
    )
    from claude_agent_sdk._internal.transport.subprocess_cli import SubprocessCLITransport

    transport = SubprocessCLITransport(prompt="", options=options)
    assert transport._max_buffer_size == 123_456
    assert "--no-session-persistence" in transport._build_command()
