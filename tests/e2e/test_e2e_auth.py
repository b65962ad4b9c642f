"""Auth end to end: claude-code-web's tokens and request shapes, and the Claude OAuth
login (``/auth/*``) against a fake token endpoint on 127.0.0.1.

The real service runs in a subprocess (tests/support/harness.py) with its Claude config
dir in ``tmp_path``; the fake token endpoint runs in the test process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import trio

from claude_code_api.agent.sandbox import probe_sandbox
from claude_code_api.http.auth import make_token
from claude_code_api.http.compat import error_body
from tests.support.fake_token_endpoint import FakeTokenEndpoint
from tests.support.harness import AUTH, run_service, wait_healthy, wait_until
from tests.support.raw_http import RawConnection

SECRET = "the-nextauth-secret"
WEB = {"Content-Type": "application/json", **AUTH}  # what claude-code-web sends on every call
SANDBOX_REASON = probe_sandbox(__import__("shutil").which("bwrap"))
NO_MATCHING = "No matching OAuth session. Start login again."


def oauth_env(tmp_path: Path, endpoint: FakeTokenEndpoint | None, **more: str) -> dict[str, str]:
    env = {
        "CLAUDE_CONFIG_DIR": str(tmp_path / "service-claude"),
        "NEXTAUTH_SECRET": SECRET,
        **more,
    }
    if endpoint is not None:
        env["CLAUDE_OAUTH_TOKEN_URL"] = endpoint.url
    return env


def credentials_file(tmp_path: Path) -> Path:
    return tmp_path / "service-claude" / ".credentials.json"


def token_for(username: str, offset_ms: int = 0) -> dict[str, str]:
    token = make_token(SECRET, username, round(time.time() * 1000) + offset_ms)
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


async def timed(request) -> tuple:
    """Await an httpx request; also return how long it took."""
    started = trio.current_time()
    response = await request
    return response, trio.current_time() - started


async def start_login(client, headers=WEB) -> tuple[dict[str, str], float]:
    # claude-code-web's POST /auth/login: a JSON Content-Type and no body at all.
    response, took = await timed(client.post("/auth/login", headers=headers))
    assert response.status_code == 200, response.text
    query = parse_qs(urlsplit(response.json()["url"]).query)
    return {name: values[0] for name, values in query.items()}, took


# --- OAuth ---------------------------------------------------------------------------------------


async def test_a_login_end_to_end(tmp_path, nursery):
    endpoint = FakeTokenEndpoint(scope="user:inference user:profile")
    await nursery.start(endpoint.serve)
    with trio.fail_after(60):
        async with run_service(tmp_path, env=oauth_env(tmp_path, endpoint)) as service:
            async with service.client() as client:
                before = (await client.get("/auth/status", headers=WEB)).json()
                assert before == {"authenticated": False, "method": "none"}
                query, took = await start_login(client)
                assert took < 1
                assert query["code_challenge_method"] == "S256"
                assert query["client_id"] == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
                state = query["state"]

                reply, took = await timed(
                    client.post("/auth/exchange", headers=WEB, json={"code": f"the-code#{state}"})
                )
                assert (reply.status_code, reply.json()) == (200, {"success": True})
                assert took < 5

                # PKCE: the verifier the service kept hashes to the challenge it sent.
                (sent,) = endpoint.requests
                verifier = sent["code_verifier"]
                challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                assert challenge.rstrip(b"=").decode() == query["code_challenge"]
                assert len(base64.urlsafe_b64decode(verifier + "=")) == 32
                assert (sent["code"], sent["state"], sent["grant_type"]) == (
                    "the-code",
                    state,
                    "authorization_code",
                )

                path = credentials_file(tmp_path)
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                stored = json.loads(path.read_text())["claudeAiOauth"]
                expires_at = stored.pop("expiresAt")
                assert stored == {
                    "accessToken": "access-1",
                    "refreshToken": "refresh-1",
                    "scopes": ["user:inference", "user:profile"],
                    "subscriptionType": None,
                    "rateLimitTier": None,
                }
                assert abs(expires_at - (time.time() + 3600) * 1000) < 10_000

                status = (await client.get("/auth/status", headers=WEB)).json()
                assert status == {"authenticated": True, "method": "oauth", "expiresAt": expires_at}

                # A state is good once; a paste without '#' is explained.
                again = await client.post(
                    "/auth/exchange", headers=WEB, json={"code": f"the-code#{state}"}
                )
                assert (again.status_code, again.json()) == (400, {"error": NO_MATCHING})
                no_hash = await client.post("/auth/exchange", headers=WEB, json={"code": "abc"})
                assert no_hash.status_code == 400
                assert no_hash.json() == {
                    "error": "Invalid code format. Expected CODE#STATE from the callback page."
                }
                missing = await client.post("/auth/exchange", headers=WEB, json={})
                assert missing.status_code == 400 and "code" in missing.json()["error"]
                assert len(endpoint.requests) == 1
    log = service.log_text()
    for secret in ("the-code", verifier, "access-1", "refresh-1", state):
        assert secret not in log
    assert "logged in to Claude (OAuth)" in log


async def test_a_failing_or_hanging_token_endpoint_answers_502_in_time(tmp_path, nursery):
    endpoint = FakeTokenEndpoint(answer=(500, {"error": "server_error"}))
    await nursery.start(endpoint.serve)
    with trio.fail_after(60):
        async with run_service(tmp_path, env=oauth_env(tmp_path, endpoint)) as service:
            async with service.client() as client:
                query, _ = await start_login(client)
                body = {"code": f"c#{query['state']}"}
                failed = await client.post("/auth/exchange", headers=WEB, json=body)
                assert failed.status_code == 502
                assert failed.json() == {
                    "error": "Token exchange failed: the token endpoint answered 500 (server_error)"
                }

                endpoint.answer = "hang"
                query, _ = await start_login(client)
                body = {"code": f"c#{query['state']}"}
                hung, took = await timed(client.post("/auth/exchange", headers=WEB, json=body))
                assert hung.status_code == 502
                assert "did not answer within 3 s" in hung.json()["error"]
                assert took < 4
                assert not credentials_file(tmp_path).exists()
                status = (await client.get("/auth/status", headers=WEB)).json()
                assert status["authenticated"] is False


async def test_an_unreachable_token_endpoint_answers_502(tmp_path):
    env = oauth_env(tmp_path, None, CLAUDE_OAUTH_TOKEN_URL="http://127.0.0.1:1/token")
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                query, _ = await start_login(client)
                body = {"code": f"c#{query['state']}"}
                failed = await client.post("/auth/exchange", headers=WEB, json=body)
    assert failed.status_code == 502
    assert failed.json()["error"].startswith(
        "Token exchange failed: cannot reach the token endpoint"
    )


async def test_only_admins_may_log_the_service_in(tmp_path, nursery):
    endpoint = FakeTokenEndpoint()
    await nursery.start(endpoint.serve)
    env = oauth_env(
        tmp_path,
        endpoint,
        API_KEYS="alice:sk-alice,bob:sk-bob",
        AUTH_ADMINS="alice,web:carol",
        TOKEN_USER_PREFIX="web:",
    )
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                bob = {"x-api-key": "sk-bob", "Content-Type": "application/json"}
                alice = {"x-api-key": "sk-alice", "Content-Type": "application/json"}
                for headers in (bob, token_for("bob"), token_for("alice")):
                    refused = await client.post("/auth/login", headers=headers)
                    assert refused.status_code == 403, refused.text
                    assert "AUTH_ADMINS" in refused.json()["error"]
                    refused = await client.post("/auth/exchange", headers=headers, json={})
                    assert refused.status_code == 403
                # Everyone may look at the status.
                assert (await client.get("/auth/status", headers=bob)).status_code == 200
                query, _ = await start_login(client, headers=alice)
                query, _ = await start_login(client, headers=token_for("carol"))
                done = await client.post(
                    "/auth/exchange",
                    headers=token_for("carol"),
                    json={"code": f"c#{query['state']}"},
                )
                assert done.json() == {"success": True}
                unauthenticated = await client.post("/auth/login")
                assert unauthenticated.status_code == 401
    assert "AUTH_ADMINS is not set" not in service.log_text()


async def test_start_up_credentials_are_refreshed_and_the_refresh_token_rotates(tmp_path, nursery):
    endpoint = FakeTokenEndpoint()
    await nursery.start(endpoint.serve)
    path = credentials_file(tmp_path)
    path.parent.mkdir()
    soon = round((time.time() + 120) * 1000)  # within the 300 s margin
    path.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": "access-0",
                    "refreshToken": "refresh-0",
                    "expiresAt": soon,
                    "scopes": ["user:inference"],
                    "subscriptionType": "max",
                },
                "somethingElse": 1,
            }
        )
    )
    with trio.fail_after(60):
        async with run_service(tmp_path, env=oauth_env(tmp_path, endpoint)) as service:
            status: dict = {}
            async with service.client() as client:

                async def refreshed() -> bool:
                    nonlocal status
                    status = (await client.get("/auth/status", headers=WEB)).json()
                    # The service saves the file, then reads it back: its status follows.
                    return "refresh-1" in path.read_text() and status.get("expiresAt", 0) > soon

                await wait_until(refreshed, timeout=20)
    assert endpoint.requests == [
        {
            "grant_type": "refresh_token",
            "refresh_token": "refresh-0",
            "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        }
    ]
    stored = json.loads(path.read_text())
    assert stored["somethingElse"] == 1
    assert stored["claudeAiOauth"]["subscriptionType"] == "max"
    assert stored["claudeAiOauth"]["accessToken"] == "access-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert status["authenticated"] is True
    assert status["expiresAt"] == stored["claudeAiOauth"]["expiresAt"] > soon
    assert "refreshed the Claude login" in service.log_text()


async def test_a_failing_refresh_shows_in_the_status(tmp_path, nursery):
    endpoint = FakeTokenEndpoint(answer=(400, {"error": "invalid_grant"}))
    await nursery.start(endpoint.serve)
    path = credentials_file(tmp_path)
    path.parent.mkdir()
    expired = round((time.time() - 10) * 1000)
    login = {"accessToken": "a", "refreshToken": "r", "expiresAt": expired}
    path.write_text(json.dumps({"claudeAiOauth": login}))
    with trio.fail_after(60):
        async with run_service(tmp_path, env=oauth_env(tmp_path, endpoint)) as service:
            async with service.client() as client:

                async def failed() -> bool:
                    status = (await client.get("/auth/status", headers=WEB)).json()
                    return "lastRefreshError" in status

                await wait_until(failed, timeout=20)
                status = (await client.get("/auth/status", headers=WEB)).json()
    assert status["authenticated"] is False and status["method"] == "oauth"
    assert status["expiresAt"] == expired
    error = status["lastRefreshError"]
    assert error["message"] == "the token endpoint answered 400 (invalid_grant)"
    assert error["nextAttemptAt"] - error["at"] == 10_000
    assert len(endpoint.requests) == 1  # backing off, not retrying in a loop


async def test_new_credentials_restart_idle_agents_and_let_busy_ones_finish(tmp_path, nursery):
    endpoint = FakeTokenEndpoint()
    await nursery.start(endpoint.serve)
    with trio.fail_after(90):
        async with run_service(tmp_path, env=oauth_env(tmp_path, endpoint)) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                named = await client.post(
                    "/run", headers=WEB, json={"prompt": "My name is Ada.", "sessionId": "idle"}
                )
                assert named.status_code == 200
                await client.post("/run", headers=WEB, json={"prompt": "hi", "sessionId": "busy"})
                before = set(service.live_fake_pids())
                assert len(before) == 3  # the warm worker and two sessions

                async with trio.open_nursery() as turns:
                    busy_reply: list = []

                    async def busy_turn() -> None:
                        reply = await client.post(
                            "/run",
                            headers=WEB,
                            json={"prompt": "[[fake:sleep:2]] still here", "sessionId": "busy"},
                        )
                        busy_reply.append(reply)

                    turns.start_soon(busy_turn)
                    await trio.sleep(0.5)  # the busy session's turn is running
                    query, _ = await start_login(client)
                    body = {"code": f"c#{query['state']}"}
                    assert (await client.post("/auth/exchange", headers=WEB, json=body)).json() == {
                        "success": True
                    }

                    async def idle_ones_replaced() -> bool:
                        return len(before - set(service.live_fake_pids())) >= 2

                    # No request needed: the idle worker and the idle session restart.
                    await wait_until(idle_ones_replaced, timeout=15)
                    assert not busy_reply  # the busy one is still on its turn
                (reply,) = busy_reply
                assert reply.status_code == 200
                assert reply.json()["success"] is True and "still here" in reply.json()["output"]

                async def all_replaced() -> bool:
                    now = set(service.live_fake_pids())
                    return not (now & before) and len(now) == 3

                await wait_until(all_replaced, timeout=15)
                # The conversations go on in the new processes.
                recalled = await client.post(
                    "/run", headers=WEB, json={"prompt": "What is my name?", "sessionId": "idle"}
                )
                assert recalled.json()["output"] == "Your name is Ada."
                one_shot = await client.post("/run", headers=WEB, json={"prompt": "after"})
                assert one_shot.json()["output"] == "echo: after"
    assert "new Claude credentials; replacing" in service.log_text()


@pytest.mark.skipif(SANDBOX_REASON is not None, reason=str(SANDBOX_REASON))
async def test_a_sandboxed_agent_never_holds_the_login_before_or_after_one_is_made(
    tmp_path, nursery
):
    """The model proxy puts the login on agents' model calls: no agent gets the file, not
    one started before the login, nor one after (the real CLI's calls: test_e2e_real_cli_escape)."""
    endpoint = FakeTokenEndpoint()
    await nursery.start(endpoint.serve)
    env = oauth_env(tmp_path, endpoint, AGENT_SANDBOX="on", FAKE_CLAUDE_HOME="")
    look = '[[fake:bash]] cat "$CLAUDE_CONFIG_DIR/.credentials.json" || echo no-file'
    with trio.fail_after(90):
        async with run_service(tmp_path, env=env) as service:
            async with service.client() as client:
                first = await client.post(
                    "/run", headers=WEB, json={"prompt": look, "sessionId": "s"}
                )
                assert "no-file" in first.json()["output"], first.text
                query, _ = await start_login(client)
                body = {"code": f"c#{query['state']}"}
                assert (await client.post("/auth/exchange", headers=WEB, json=body)).json() == {
                    "success": True
                }
                second = await client.post(
                    "/run", headers=WEB, json={"prompt": look, "sessionId": "s"}
                )
                one_shot = await client.post("/run", headers=WEB, json={"prompt": look})
    assert "no-file" in second.json()["output"], second.text
    assert "no-file" in one_shot.json()["output"], one_shot.text


# --- claude-code-web's requests and tokens ------------------------------------------------------


async def test_claude_code_webs_request_shapes(tmp_path):
    with trio.fail_after(60):
        async with run_service(tmp_path, env=oauth_env(tmp_path, None)) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                # GETs carry a JSON Content-Type and x-api-key.
                for path in ("/status", "/auth/status", "/health"):
                    reply, took = await timed(client.get(path, headers=WEB))
                    assert reply.status_code == 200, (path, reply.text)
                    assert took < 5
                # An empty x-api-key is no key: the bearer token decides.
                web_user = {**token_for("alice"), "x-api-key": ""}
                status = await client.get("/auth/status", headers=web_user)
                assert status.status_code == 200 and status.json()["authenticated"] is False
            # A base URL ending in "/" makes claude-code-web call //run.
            connection = await RawConnection.open(service.url)
            body = json.dumps({"prompt": "double slash"}).encode()
            await connection.request("POST", "//run", headers=WEB, body=body)
            reply = await connection.response()
            assert reply is not None and reply.status == 200, reply
            assert reply.json()["output"] == "echo: double slash"
            await connection.request("GET", "//auth/status", headers={"x-api-key": "wrong"})
            refused = await connection.response()
            assert refused is not None and refused.status == 401
            assert refused.json() == {"error": "Invalid API key"}
            await connection.request("POST", "//auth/login", headers=WEB)
            login = await connection.response()
            assert login is not None and login.status == 200 and "url" in login.json()
            # Any run of slashes is one: answered, not redirected with an HTML body.
            await connection.request("GET", "///auth//status", headers=WEB)
            status = await connection.response()
            assert status is not None and status.status == 200, status
            assert status.json()["method"] == "none"
            await connection.aclose()


async def test_tokens_work_without_api_keys(tmp_path):
    env = oauth_env(tmp_path, None, API_KEYS="", TOKEN_USER_PREFIX="web:")
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                ran = await client.post(
                    "/run", headers=token_for("alice"), json={"prompt": "hi", "sessionId": "s1"}
                )
                assert ran.status_code == 200 and ran.json()["output"] == "echo: hi"
                mine = (await client.get("/status", headers=token_for("alice"))).json()
                theirs = (await client.get("/status", headers=token_for("bob"))).json()
                assert [s["id"] for s in mine["sessions"]] == ["s1"]
                assert theirs["sessions"] == []
                expired = await client.get("/status", headers=token_for("alice", -301_000))
                future = await client.get("/status", headers=token_for("alice", 120_000))
                keyed = await client.get("/status", headers=AUTH)
    assert (expired.status_code, expired.json()) == (401, {"error": "Invalid or expired token"})
    assert future.status_code == 401
    assert (keyed.status_code, keyed.json()) == (401, {"error": "Invalid API key"})
    log = service.log_text()
    assert "every authenticated route will answer 401" not in log
    assert "user=web:alice" in log


async def test_every_authenticated_route_says_what_is_missing(tmp_path):
    """No credentials at all: the original's ``Missing API key``; a header that is not a
    bearer, or a token that fails: ours (issue 20 §9). Every route the document marks
    authenticated is asked, with the body it would accept."""
    with trio.fail_after(60):
        async with run_service(tmp_path, env=oauth_env(tmp_path, None)) as service:
            async with service.client() as client:
                spec = (await client.get("/openapi.json")).json()
                routes = [
                    (
                        method.upper(),
                        path.replace("{runId}", "r1")
                        .replace("{path}", "a.txt")
                        .replace("{model}", "m"),
                    )
                    for path, operations in spec["paths"].items()
                    for method, operation in operations.items()
                    if operation["security"] == [{"apiKey": []}, {"bearer": []}]
                ]
                # Nine of our own, four of /files, four of the compatible routes.
                assert len(routes) == 17, routes
                cases = [
                    ({}, "Missing API key"),
                    ({"x-api-key": ""}, "Missing API key"),
                    ({"Authorization": "Basic YWxpY2U6"}, "Missing authorization token"),
                    ({"Authorization": "Bearer"}, "Missing authorization token"),
                    (token_for("alice", -301_000), "Invalid or expired token"),
                    ({"x-api-key": "wrong"}, "Invalid API key"),
                ]
                for method, path in routes:
                    for headers, message in cases:
                        reply = await client.request(
                            method,
                            path,
                            headers={"Content-Type": "application/json", **headers},
                            json={"prompt": "hi", "sessionId": "s1", "content": "", "code": "a#b"},
                        )
                        assert reply.status_code == 401, (method, path, headers, reply.text)
                        # (The compatible routes answer in their clients' error shapes.)
                        expected = error_body(path, 401, message)
                        assert reply.json() == expected, (method, path, headers)
