"""The official ``openai`` and ``anthropic`` clients against a test service.

What the end-to-end tests of the compatible routes (tests/e2e/test_e2e_openai.py,
tests/e2e/test_e2e_anthropic.py) share: the callers, a client of each kind, what the
fake CLI's turns received, and how a stream its client left is seen to end.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai

from tests.e2e.test_e2e_stream import wait_runs
from tests.support.harness import RunningService, wait_healthy

MODEL = "claude-sonnet-4-6"
ALICE_KEY, BOB_KEY = "key-alice", "key-bob"
ALICE = {"x-api-key": ALICE_KEY}
USERS = f"alice:{ALICE_KEY},bob:{BOB_KEY}"


def openai_client(service: RunningService, key: str = ALICE_KEY, **kwargs) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(verify=False, timeout=60)
    return openai.AsyncOpenAI(
        base_url=service.url + "/v1", api_key=key, max_retries=0, http_client=http, **kwargs
    )


def anthropic_client(
    service: RunningService, key: str = ALICE_KEY, **kwargs
) -> anthropic.AsyncAnthropic:
    http = httpx.AsyncClient(verify=False, timeout=60)
    return anthropic.AsyncAnthropic(
        base_url=service.url, api_key=key, max_retries=0, http_client=http, **kwargs
    )


def turns(service: RunningService) -> list[dict]:
    """What the fake CLI logged of each turn so far (prompt, images...)."""
    assert service.fake_log is not None, "started without FAKE_CLAUDE_LOG"
    lines = service.fake_log.read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == "turn"]


async def assert_the_left_stream_ended(service: RunningService, how: str) -> None:
    """After Alice's client left a stream: no run of hers is left, the agent is idle
    again, and the service logged the cut turn and the run's end (``how``: its label)."""
    async with service.client() as plain:
        await wait_runs(plain, ALICE, [])
    await wait_healthy(service, ready=1)

    await service.wait_logged("turn cut short (client gone); agent idle")
    await service.wait_logged(how)
