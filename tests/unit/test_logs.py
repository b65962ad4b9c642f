"""The log format: JSON lines with context fields, and nothing secret in a whole run's output."""

from __future__ import annotations

import json
import logging
import time
import warnings
from urllib.parse import parse_qs, urlsplit

import trio

from claude_code_api.http.auth import make_token
from claude_code_api.observe import logs
from tests.support.fake_token_endpoint import FakeTokenEndpoint
from tests.support.harness import AUTH, run_service, wait_healthy, wait_until
from tests.support.sse import read_all


def test_a_json_record_carries_its_context_fields(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)  # pytest's own (caplog) among them
    logs.configure("INFO", "json")
    try:
        logging.getLogger("claude_code_api.x").info(
            "turn of %s", "w0", extra={"runId": "r1", "userId": "alice", "worker": "w0"}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful", UserWarning, stacklevel=1)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "turn of w0" and lines[0]["level"] == "INFO"
    assert {k: lines[0][k] for k in ("runId", "userId", "worker")} == {
        "runId": "r1",
        "userId": "alice",
        "worker": "w0",
    }
    assert "sessionId" not in lines[0]
    assert lines[1]["logger"] == "py.warnings" and "careful" in lines[1]["message"]


SECRET_PROMPT = "the prompt's contents: sk-in-the-prompt"
SECRET_SYSTEM_PROMPT = "the system prompt's contents: be-secretly-brief"
NEXTAUTH_SECRET = "nextauth-secret-value"


async def test_with_log_format_json_every_line_is_json_and_nothing_secret_is_logged(
    tmp_path, nursery
):
    """A run at LOG_LEVEL=DEBUG that uses every secret the service handles: API keys (good
    and bad), bearer tokens (good and bad), the NEXTAUTH secret, ANTHROPIC_API_KEY, OAuth
    access and refresh tokens (refreshed at start, then from a login), the login's code,
    state and PKCE verifier (and codes that are refused), and prompts' contents (one-shot,
    session and streamed runs, a system prompt). None of it is in the output."""
    endpoint = FakeTokenEndpoint()
    await nursery.start(endpoint.serve)
    credentials = tmp_path / "service-claude" / ".credentials.json"
    credentials.parent.mkdir()
    soon = round((time.time() + 120) * 1000)  # within the refresh margin: refreshed at start
    credentials.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": "access-0",
                    "refreshToken": "refresh-0",
                    "expiresAt": soon,
                    "scopes": ["user:inference"],
                }
            }
        )
    )
    env = {
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "API_KEYS": "alice:sk-alice-secret-key",
        "NEXTAUTH_SECRET": NEXTAUTH_SECRET,
        "AUTH_ADMINS": "alice",
        "ANTHROPIC_API_KEY": "sk-ant-secret",
        "CLAUDE_CONFIG_DIR": str(credentials.parent),
        "CLAUDE_OAUTH_TOKEN_URL": endpoint.url,
    }
    token = make_token(NEXTAUTH_SECRET, "bob", round(time.time() * 1000))
    forged = make_token("not-the-secret", "mallory", round(time.time() * 1000))
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)

            async def refreshed() -> bool:
                return "refresh-1" in credentials.read_text()

            await wait_until(refreshed, timeout=20)
            async with service.client() as client:
                headers = {"x-api-key": "sk-alice-secret-key"}
                for body in (
                    {"prompt": SECRET_PROMPT},
                    {"prompt": SECRET_PROMPT, "sessionId": "s"},
                    {"prompt": SECRET_PROMPT, "systemPrompt": SECRET_SYSTEM_PROMPT},
                ):
                    reply = await client.post("/run", json=body, headers=headers)
                    assert reply.status_code == 200, reply.text
                streamed = {"prompt": SECRET_PROMPT, "stream": True}
                async with client.stream("POST", "/run", json=streamed, headers=headers) as stream:
                    assert (await read_all(stream))[-1].name == "result"
                by_token = await client.post(
                    "/run",
                    json={"prompt": SECRET_PROMPT},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert by_token.status_code == 200
                refused = await client.get("/status", headers={"Authorization": f"Bearer {forged}"})
                assert refused.status_code == 401
                await client.get("/status", headers={"x-api-key": "sk-wrong-key"})
                await client.get("/status", headers=AUTH)

                login = await client.post("/auth/login", headers=headers)
                state = parse_qs(urlsplit(login.json()["url"]).query)["state"][0]
                for code in ("the-refused-code-without-hash", "the-unknown-code#not-a-state"):
                    bad = await client.post("/auth/exchange", json={"code": code}, headers=headers)
                    assert bad.status_code == 400
                exchanged = await client.post(
                    "/auth/exchange", json={"code": f"the-login-code#{state}"}, headers=headers
                )
                assert exchanged.json() == {"success": True}
    verifier = endpoint.requests[-1]["code_verifier"]
    text = service.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["level"] == "DEBUG" for r in records)
    assert any(r["logger"] == "hypercorn.access" for r in records)
    runs = [r for r in records if r["message"].startswith("run user=alice")]
    assert len(runs) == 4 and runs[1]["sessionId"] == "s" and runs[0]["userId"] == "alice"
    # Prompt lengths are fine; contents are not.
    assert f"prompt_chars={len(SECRET_PROMPT)}" in runs[0]["message"]
    for secret in (
        "sk-alice-secret-key",
        "sk-wrong-key",
        token,
        forged,
        NEXTAUTH_SECRET,
        "sk-ant-secret",
        "access-0",
        "refresh-0",
        "access-1",
        "refresh-1",
        "access-2",
        "refresh-2",
        "the-login-code",
        "the-refused-code",
        "the-unknown-code",
        state,
        verifier,
        "sk-in-the-prompt",
        "be-secretly-brief",
    ):
        assert secret not in text, secret
