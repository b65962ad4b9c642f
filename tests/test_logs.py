"""The log format: JSON lines with context fields, and nothing secret in a whole run's output."""

from __future__ import annotations

import json
import logging
import warnings

import trio

from claude_code_api import logs
from tests.harness import AUTH, run_service, wait_healthy


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


async def test_with_log_format_json_every_line_is_json_and_nothing_secret_is_logged(tmp_path):
    secret_prompt = "the prompt's contents: sk-in-the-prompt"
    env = {
        "LOG_FORMAT": "json",
        "API_KEYS": "alice:sk-alice-secret-key",
        "NEXTAUTH_SECRET": "nextauth-secret-value",
        "ANTHROPIC_API_KEY": "sk-ant-secret",
    }
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                headers = {"x-api-key": "sk-alice-secret-key"}
                for body in (
                    {"prompt": secret_prompt},
                    {"prompt": secret_prompt, "sessionId": "s"},
                ):
                    reply = await client.post("/run", json=body, headers=headers)
                    assert reply.status_code == 200
                await client.get("/status", headers={"x-api-key": "sk-wrong-key"})
                await client.get("/status", headers=AUTH)
    text = service.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"] == "hypercorn.access" for r in records)
    runs = [r for r in records if r["message"].startswith("run user=alice")]
    assert len(runs) == 2 and runs[1]["sessionId"] == "s" and runs[0]["userId"] == "alice"
    for secret in (
        "sk-alice-secret-key",
        "nextauth-secret-value",
        "sk-ant-secret",
        "sk-in-the-prompt",
        "sk-wrong-key",
    ):
        assert secret not in text
