"""End to end (real server, real SDK, fake CLI): ceilings hold for old sessions (issue 20 §5).

A session's options are saved with it. The service restarted with lower ceilings
must run that session's next turn under them: a saved number above its limit is
lowered to it, a model no longer allowed falls back to ``CLAUDE_MODEL``, a
permission mode no longer allowed to the default mode — the agent's argv (the
fake CLI's log) shows it, and so does the reply.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from tests.support.harness import AUTH, run_service

JSON = {**AUTH, "Content-Type": "application/json"}
GENEROUS = {
    "ALLOWED_MODELS": "claude-sonnet-4-6,claude-opus-4-1",
    "MAX_BUDGET_USD_LIMIT": "100",
    "MAX_TURNS_LIMIT": "500",
}
# The default models (CLAUDE_MODEL alone), and `plan` no longer allowed.
STRICT = {
    "MAX_BUDGET_USD_LIMIT": "1",
    "MAX_TURNS_LIMIT": "5",
    "ALLOWED_PERMISSION_MODES": "default,acceptEdits",
}
ASKED = {
    "model": "claude-opus-4-1",
    "maxBudgetUsd": 100,
    "maxTurns": 500,
    "permissionMode": "plan",
}


def whoami(reply: httpx.Response) -> dict:
    assert reply.status_code == 200, reply.text
    output = reply.json()["output"]
    assert output.startswith("whoami: "), output
    return json.loads(output.removeprefix("whoami: "))


def argv_of_agents(log_path) -> list[list[str]]:
    return [
        record["argv"]
        for record in map(json.loads, log_path.read_text().splitlines())
        if record.get("event") == "start"
    ]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_an_old_sessions_options_are_held_to_the_ceilings_in_force(tmp_path):
    log = tmp_path / "fake.log"
    with trio.fail_after(90):
        async with run_service(tmp_path, env={**GENEROUS, "FAKE_CLAUDE_LOG": str(log)}) as service:
            async with service.client() as client:
                body = {"prompt": "[[fake:whoami]]", "sessionId": "old", **ASKED}
                before = whoami(await client.post("/run", headers=JSON, json=body))
        assert before["model"] == "claude-opus-4-1"
        assert (before["maxTurns"], before["maxBudgetUsd"]) == (500, 100)
        assert before["permissionMode"] == "plan"
        starts_before = len(argv_of_agents(log))

        async with run_service(tmp_path, env={**STRICT, "FAKE_CLAUDE_LOG": str(log)}) as service:
            async with service.client() as client:
                # A new request naming the old options is refused...
                refused = await client.post(
                    "/run", headers=JSON, json={"prompt": "x", "sessionId": "new", **ASKED}
                )
                assert refused.status_code == 400
                # ...and the old session's next turn runs under the new ceilings.
                turn = await client.post(
                    "/run",
                    headers=JSON,
                    json={"prompt": "[[fake:whoami]]", "sessionId": "old"},
                )
                after = whoami(turn)
                again = await client.post(
                    "/run", headers=JSON, json={"prompt": "again", "sessionId": "old"}
                )
                # A turn naming an allowed model runs with it: only the rest is lowered.
                named = await client.post(
                    "/run",
                    headers=JSON,
                    json={"prompt": "named", "sessionId": "old", "model": "claude-sonnet-4-6"},
                )
        resumed = [
            argv
            for argv in argv_of_agents(log)[starts_before:]
            if any(arg.startswith("--resume") for arg in argv)
        ]
        (argv,) = resumed
        assert option(argv, "--max-turns") == "5"
        assert option(argv, "--max-budget-usd") in ("1", "1.0")
        assert option(argv, "--model") in (None, "claude-sonnet-4-6")
        assert option(argv, "--permission-mode") == "bypassPermissions"
        assert after["model"] == "claude-sonnet-4-6"
        assert (after["maxTurns"], after["maxBudgetUsd"]) == (5, 1)
        assert after["permissionMode"] == "bypassPermissions"
        reply = turn.json()
        assert reply["model"] == "claude-sonnet-4-6"
        assert reply["loweredOptions"] == {
            "model": "claude-sonnet-4-6",
            "maxTurns": 5,
            "maxBudgetUsd": 1,
            "permissionMode": "bypassPermissions",
        }
        # Every turn says so; the conversation goes on.
        assert again.status_code == 200 and again.json()["output"] == "echo: again"
        assert again.json()["loweredOptions"] == reply["loweredOptions"]
        assert named.json()["loweredOptions"] == {
            "maxTurns": 5,
            "maxBudgetUsd": 1,
            "permissionMode": "bypassPermissions",
        }
        assert "saved options above the ceilings in force" in service.log_text()
