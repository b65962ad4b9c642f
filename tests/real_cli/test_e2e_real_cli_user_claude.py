"""Per-user CLAUDE.md with the real bundled Claude Code CLI, through the service.

As ``test_e2e_real_cli.py``: the service runs as ``python -m claude_code_api``
with the bundled CLI against the mock Messages API, which records every model
call, so the test reads which user's CLAUDE.md reached the model for which
request: one-shots through a one-worker pool (agents warmed before their user is
known, handed the file with the prompt) and a session (whose CLI loads it from
the user's HOME), before and after an update.
"""

from __future__ import annotations

import pytest
import trio

from claude_code_api.demo.mock_messages_api import RecordedRequest, open_mock_api
from tests.real_cli.test_e2e_real_cli import AS_ALICE, AS_BOB, real_cli_env, run
from tests.support.harness import run_service, wait_healthy
from tests.support.real_cli import requires_real_cli

pytestmark = requires_real_cli

BUDGET_S = 180


def user_text(call: RecordedRequest) -> str:
    """Every text of the call's user messages (CLAUDE.md arrives there, never in ``system``)."""
    return "\n".join(
        block.get("text", "") if isinstance(block, dict) else str(block)
        for message in call.messages
        if message.get("role") == "user"
        for block in (
            message["content"] if isinstance(message["content"], list) else [message["content"]]
        )
    )


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_each_users_claude_md_reaches_the_model_for_their_requests_only(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = real_cli_env(api, tmp_path, POOL_SIZE="1")
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:

                    async def call_for(prompt: str, headers, **fields) -> RecordedRequest:
                        before = len(api.model_calls)
                        reply = await run(client, prompt, headers=headers, **fields)
                        assert reply["status"] == 200 and reply["success"], reply
                        (call,) = api.model_calls[before:]
                        return call

                    async def put(content: str, headers) -> None:
                        saved = await client.put(
                            "/user-claude", json={"content": content}, headers=headers
                        )
                        assert saved.json() == {"saved": True}

                    await put("ALICE-RULE-1: answer in French.", AS_ALICE)
                    await put("BOB-RULE: answer in Dutch.", AS_BOB)
                    alice = await call_for("alice one-shot", AS_ALICE)
                    bob = await call_for("bob one-shot", AS_BOB)
                    session = await call_for("alice in a session", AS_ALICE, sessionId="s1")
                    await put("ALICE-RULE-2: answer in Italian.", AS_ALICE)
                    alice_updated = await call_for("alice one-shot again", AS_ALICE)
                    session_updated = await call_for(
                        "alice's session again", AS_ALICE, sessionId="s1"
                    )

    for call in (alice, bob, session, alice_updated, session_updated):
        assert "RULE" not in call.system_text()  # in the user message, as the CLI puts it
    assert "ALICE-RULE-1" in user_text(alice) and "BOB-RULE" not in user_text(alice)
    assert "BOB-RULE" in user_text(bob) and "ALICE-RULE" not in user_text(bob)
    # The session's CLI loaded it itself from the user's HOME, once.
    assert user_text(session).count("ALICE-RULE-1") == 1 and "BOB" not in user_text(session)
    assert "ALICE-RULE-2" in user_text(alice_updated)
    assert "ALICE-RULE-1" not in user_text(alice_updated)
    # The session restarted (resuming: the first turn is still there) and loaded the update.
    assert "ALICE-RULE-2" in user_text(session_updated)
    assert "alice in a session" in user_text(session_updated)
