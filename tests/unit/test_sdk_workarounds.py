"""claude_code_api.agent.sdk_workarounds: the upstream gap it covers, the private parts it uses
on the pinned claude-agent-sdk, and the fallback on any other version.

``test_upstream_*`` shows the gap against the installed SDK through its public API:
it fails once a release gives ``ResultMessage`` the field (or keeps unknown keys),
and then the module can go.
"""

from __future__ import annotations

import logging
import tomllib
import uuid
from pathlib import Path

import claude_agent_sdk
import pytest
import trio
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

from claude_code_api.agent import sdk_workarounds
from claude_code_api.agent.protocol import AgentSpec
from tests.fake_claude import TURN_COST_USD
from tests.support.harness import service_agents, service_env

FAKE_CLAUDE = Path(__file__).parent.parent.joinpath("fake_claude.py")
PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
TIMEOUT_S = 30


def fake_client(tmp_path: Path) -> ClaudeSDKClient:
    return ClaudeSDKClient(
        ClaudeAgentOptions(
            cli_path=str(FAKE_CLAUDE),
            cwd=str(tmp_path),
            env={"FAKE_CLAUDE_HOME": str(tmp_path / "home")},
        )
    )


async def test_upstream_result_message_drops_model_usage_since_last_result(tmp_path):
    """The CLI's result has the turn's own usage in ``model_usage_since_last_result``;
    the SDK's public ``receive_messages()`` hands out a ``ResultMessage`` without it.

    The second turn's, where the running totals (``total_cost_usd``, ``modelUsage``)
    are twice the turn's own cost: nothing on the message holds the key or its value.
    """
    client = fake_client(tmp_path)
    results: list[ResultMessage] = []
    with trio.fail_after(TIMEOUT_S):
        await client.connect()
        try:
            for prompt in ("one", "two"):
                await client.query(prompt)
                async for message in client.receive_response():
                    if isinstance(message, ResultMessage):
                        results.append(message)
        finally:
            await client.disconnect()
    second = results[1]
    assert second.total_cost_usd == pytest.approx(2 * TURN_COST_USD)
    own = {"costUSD": TURN_COST_USD}  # what the CLI sent, per model
    assert "model_usage_since_last_result" not in ResultMessage.__dataclass_fields__
    shown = repr(vars(second))
    assert "since_last_result" not in shown
    assert repr(own) not in shown


async def test_the_pinned_sdks_private_parts_hand_out_the_clis_json_of_each_message(tmp_path):
    """What receive_messages_with_raw uses on the pinned version: the client's
    ``_query.receive_messages()`` (the CLI's JSON) and the SDK's ``parse_message``."""
    from claude_agent_sdk._internal.message_parser import parse_message

    client = fake_client(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        await client.connect()
        try:
            await client.query("hello")
            async for data in client._query.receive_messages():
                assert isinstance(data, dict)
                message = parse_message(data)
                if isinstance(message, ResultMessage):
                    assert message.total_cost_usd == data["total_cost_usd"]
                    assert "model_usage_since_last_result" in data
                    break
        finally:
            await client.disconnect()


def test_the_pinned_version_is_pyprojects_and_the_installed_one():
    """The module checks against pyproject.toml's pin; the venv has that version."""
    pins = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert f"claude-agent-sdk=={sdk_workarounds.PINNED_SDK_VERSION}" in pins
    assert claude_agent_sdk.__version__ == sdk_workarounds.PINNED_SDK_VERSION
    assert sdk_workarounds.reader_for(claude_agent_sdk.__version__).parse is not None
    assert sdk_workarounds.reader_for("0.2.189").parse is None


async def ignore(_event) -> None:
    pass


@pytest.mark.parametrize("pinned", [True, False])
async def test_on_another_sdk_version_turns_are_costed_by_the_growth_of_the_total(
    tmp_path, monkeypatch, caplog, pinned
):
    """Two turns, then two on a process resuming the conversation. On another SDK
    version the raw JSON is not read: the resumed process's first turn has no known
    cost (its total includes the earlier turns), the others the growth of the total.
    The fallback is logged once."""
    if not pinned:
        monkeypatch.setattr(sdk_workarounds, "_reader", sdk_workarounds.reader_for("9.9.9"))
        monkeypatch.setattr(sdk_workarounds, "_fallback_told", False)
    caplog.set_level(logging.WARNING, logger=sdk_workarounds.__name__)
    settings, make_agent = service_agents(service_env(tmp_path))
    home = tmp_path / "home"
    session_id = str(uuid.uuid4())
    costs = []
    with trio.fail_after(TIMEOUT_S):
        for spec in (
            AgentSpec(name="first", home=home, ephemeral=False, session_id=session_id),
            AgentSpec(name="resumed", home=home, ephemeral=False, resume=session_id),
        ):
            agent = make_agent(spec)
            try:
                await agent.start(settings.warmup_timeout_s)
                for prompt in ("one", "two"):
                    result = await agent.run_turn(prompt, ignore)
                    assert not result.is_error, result
                    costs.append(result.cost_usd)
            finally:
                await agent.close()
    one = pytest.approx(TURN_COST_USD)
    told = [r.getMessage() for r in caplog.records if r.name == sdk_workarounds.__name__]
    if pinned:
        assert costs == [one, one, one, one]
        assert told == []
    else:
        assert costs == [one, one, None, one]
        assert len(told) == 1 and "9.9.9" in told[0] and "0.2.188" in told[0], told
