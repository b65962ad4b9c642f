"""One Claude login for two replicas of the real service (fake CLI) on one database, against
the OAuth test endpoint: a login started on one is exchanged on the other, one replica
refreshes, and the other's model proxy puts the refreshed token on its agents' calls.

Each replica has its own DATA_DIR and its own Claude config dir (its credentials file);
they share DATABASE_URL and WORKSPACES_DIR (:mod:`tests.postgres.test_replicas`).
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import trio

from claude_code_api.demo.mock_messages_api import open_mock_api
from tests.postgres.test_replicas import replica, replica_env
from tests.support.fake_token_endpoint import FakeTokenEndpoint
from tests.support.harness import AUTH, RunningService, run_service, wait_until

JSON = {**AUTH, "Content-Type": "application/json"}
BUDGET_S = 120
REFRESHED = "refreshed the Claude login for every replica"
# What an agent runs to make a model call as the CLI would: to its ANTHROPIC_BASE_URL (the
# model proxy) with its own token, which the proxy swaps for the login's.
MODEL_CALL = """
import json, os, urllib.request
body = {"model": "claude-sonnet-4-6", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]}
request = urllib.request.Request(
    os.environ["ANTHROPIC_BASE_URL"].rstrip("/") + "/v1/messages",
    data=json.dumps(body).encode(),
    headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"], "content-type": "application/json",
             "anthropic-version": "2023-06-01"},
)
with urllib.request.urlopen(request, timeout=20) as response:
    print("model call:", response.status)
"""


def credentials(tmp_path: Path, name: str) -> Path:
    return tmp_path / name / "claude" / ".credentials.json"


def login_env(tmp_path: Path, name: str, endpoint: FakeTokenEndpoint, **extra: str) -> dict:
    return {
        "CLAUDE_CONFIG_DIR": str(credentials(tmp_path, name).parent),
        "CLAUDE_OAUTH_TOKEN_URL": endpoint.url,
        **extra,
    }


def stored(tmp_path: Path, name: str) -> dict:
    try:
        return json.loads(credentials(tmp_path, name).read_text())["claudeAiOauth"]
    except (OSError, ValueError, KeyError):
        return {}


def refreshes(endpoint: FakeTokenEndpoint) -> list[str]:
    return [r["refresh_token"] for r in endpoint.requests if r["grant_type"] == "refresh_token"]


async def post(service: RunningService, path: str, body: dict | None = None) -> tuple[int, dict]:
    async with service.client(timeout=60) as client:
        reply = await client.post(path, headers=JSON, json=body)
    return reply.status_code, reply.json()


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_login_on_one_replica_is_exchanged_on_the_other_and_its_refresh_serves_both(
    tmp_path, fresh_url, nursery
):
    # A token shorter than the refresh margin (300 s): refreshed as soon as it is stored.
    endpoint = FakeTokenEndpoint(expires_in=60)
    await nursery.start(endpoint.serve)
    script = tmp_path / "model_call.py"
    script.write_text(MODEL_CALL)
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api, AsyncExitStack() as stack:
            services = {}
            for name in ("a", "b"):
                env = login_env(tmp_path, name, endpoint, ANTHROPIC_BASE_URL=api.url)
                services[name] = await replica(stack, tmp_path, name, fresh_url, **env)
            status, started = await post(services["a"], "/auth/login")
            assert status == 200, started
            state = parse_qs(urlsplit(started["url"]).query)["state"][0]
            exchanged = await post(services["b"], "/auth/exchange", {"code": f"c#{state}"})
            assert exchanged == (200, {"success": True})

            async def both_refreshed() -> bool:
                return all(stored(tmp_path, n).get("accessToken") == "access-2" for n in "ab")

            await wait_until(both_refreshed, timeout=20)
            await trio.sleep(1.0)  # another refresh would come now, if any
            [refresher] = [n for n, s in services.items() if REFRESHED in s.log_text()]
            other = services["b" if refresher == "a" else "a"]
            reply = await post(other, "/run", {"prompt": f"[[fake:bash]] python3 {script}"})
    assert reply[0] == 200 and "model call: 200" in reply[1]["output"], reply
    assert api.model_calls[-1].headers["authorization"] == "Bearer access-2"
    assert refreshes(endpoint) == ["refresh-1"]
    assert stored(tmp_path, "a")["refreshToken"] == stored(tmp_path, "b")["refreshToken"]
    assert stored(tmp_path, "a")["expiresAt"] == stored(tmp_path, "b")["expiresAt"]
    for service in services.values():
        log = service.log_text()
        assert "access-2" not in log and "refresh-2" not in log and state not in log


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_two_replicas_due_to_refresh_at_once_call_the_token_endpoint_once(
    tmp_path, fresh_url, nursery
):
    # Slow to answer: the replica that did not claim the refresh asks while it runs.
    endpoint = FakeTokenEndpoint(delay_s=3.0)
    await nursery.start(endpoint.serve)
    soon = round((time.time() + 120) * 1000)  # within the 300 s margin: due at start-up
    for name in ("a", "b"):
        path = credentials(tmp_path, name)
        path.parent.mkdir(parents=True)
        login = {"accessToken": "access-0", "refreshToken": "refresh-0", "expiresAt": soon}
        path.write_text(json.dumps({"claudeAiOauth": login}))
    done = trio.Event()

    async def serve(name: str) -> None:
        env = replica_env(tmp_path, name, fresh_url, **login_env(tmp_path, name, endpoint))
        async with run_service(tmp_path / name, env=env):
            await done.wait()

    with trio.fail_after(BUDGET_S):
        async with trio.open_nursery() as replicas:
            # Both at once: each finds the login due as it starts.
            replicas.start_soon(serve, "a")
            replicas.start_soon(serve, "b")

            async def both_refreshed() -> bool:
                return all(stored(tmp_path, n).get("accessToken") == "access-1" for n in "ab")

            await wait_until(both_refreshed, timeout=30)
            await trio.sleep(1.0)  # another refresh would come now, if any
            done.set()
    assert refreshes(endpoint) == ["refresh-0"]
    assert stored(tmp_path, "a")["refreshToken"] == stored(tmp_path, "b")["refreshToken"]
