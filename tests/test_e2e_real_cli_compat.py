"""The real bundled CLI against the mock Messages API, through images and the compatible routes.

What the model sees is what matters here: the mock records each call the CLI makes,
so a test reads the image blocks, the system prompt and a session's earlier turns
from it. The service runs as in tests/test_e2e_real_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from claude_code_api.demo.mock_messages_api import TextReply, open_mock_api
from tests.harness import run_service, wait_healthy
from tests.images import JPEG, b64, png
from tests.real_cli import requires_real_cli, service_overrides

pytestmark = requires_real_cli

AS_ALICE = {"x-api-key": "sk-alice-key"}
BUDGET_S = 120


def image_blocks(call: Any) -> list[dict[str, Any]]:
    """The image blocks of a model call's last user message."""
    for message in reversed(call.messages):
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            return [b for b in message["content"] if b.get("type") == "image"]
    return []


async def test_run_sends_images_to_the_model_as_image_blocks(tmp_path: Path) -> None:
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = service_overrides(api.url, tmp_path)
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    api.enqueue(TextReply("A red pixel."), TextReply("Still red."))
                    images = [
                        {"mediaType": "image/png", "data": b64(png(2, 2))},
                        {"mediaType": "image/jpeg", "data": b64(JPEG)},
                    ]
                    body = {"prompt": "What is in these?", "images": images}
                    one_shot = await client.post("/run", headers=AS_ALICE, json=body)
                    body = {"prompt": "And this?", "images": images[:1], "sessionId": "pics"}
                    turn = await client.post("/run", headers=AS_ALICE, json=body)
    assert one_shot.status_code == 200 and one_shot.json()["output"] == "A red pixel."
    assert turn.status_code == 200 and turn.json()["output"] == "Still red.", turn.text
    first, second = api.model_calls[-2:]
    sent = image_blocks(first)
    assert [b["source"]["media_type"] for b in sent] == ["image/png", "image/jpeg"]
    assert sent[0]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": b64(png(2, 2)),
    }
    assert sent[1]["source"]["data"] == b64(JPEG)
    assert first.last_user_text() == "What is in these?"
    assert [b["source"]["data"] for b in image_blocks(second)] == [b64(png(2, 2))]
    # A session's CLI also keeps the image in its scratch directory and tells the model
    # where, in a text block after the prompt's.
    assert "And this?" in second.all_text()
