"""The real bundled CLI against the mock Messages API, through images and the compatible routes.

What the model sees is what matters here: the mock records each call the CLI makes,
so a test reads the image blocks, the system prompt and a session's earlier turns
from it. The service runs as in tests/real_cli/test_e2e_real_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from claude_code_api.demo.mock_messages_api import (
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from claude_code_api.store.workspace_files import workspace_of
from tests.support.harness import run_service, wait_healthy
from tests.support.images import JPEG, b64, data_url, png
from tests.support.real_cli import requires_real_cli, service_overrides

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


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_chat_completions_reach_the_model_with_system_prompt_image_and_session(
    tmp_path: Path,
) -> None:
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = service_overrides(api.url, tmp_path)
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                http = httpx.AsyncClient(verify=False, timeout=60)
                async with openai.AsyncOpenAI(
                    base_url=service.url + "/v1",
                    api_key="sk-alice-key",
                    http_client=http,
                    max_retries=0,
                    default_headers={"X-Session-Id": "chat"},
                ) as client:
                    api.enqueue(TextReply("A red square."), TextReply("It was red."))
                    content = [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": data_url(png(2, 2))}},
                    ]
                    messages: list[Any] = [
                        {"role": "system", "content": "Answer in three words."},
                        {"role": "user", "content": content},
                    ]
                    first = await client.chat.completions.create(
                        model="claude-sonnet-4-6", messages=messages
                    )
                    messages += [
                        {"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "What colour was it?"},
                    ]
                    stream = await client.chat.completions.create(
                        model="claude-sonnet-4-6", messages=messages, stream=True
                    )
                    streamed = "".join(
                        [chunk.choices[0].delta.content or "" async for chunk in stream]
                    )
    assert first.choices[0].message.content == "A red square."
    assert streamed == "It was red."
    one, two = api.model_calls[-2:]
    assert "Answer in three words." in one.system_text()
    assert [b["source"]["data"] for b in image_blocks(one)] == [b64(png(2, 2))]
    # The second turn sent only the new message; the session's CLI brought the first.
    assert two.last_user_text() == "What colour was it?" or "What colour was it?" in two.all_text()
    assert "What is this?" in two.all_text() and "A red square." in two.all_text()
    assert sum("What is this?" in text for text in _user_texts(two)) == 1


def _user_texts(call: Any) -> list[str]:
    texts = []
    for message in call.messages:
        content = message.get("content")
        if message.get("role") != "user":
            continue
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [b.get("text", "") for b in content if b.get("type") == "text"]
    return texts


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_files_the_real_agent_reads_and_writes(tmp_path: Path) -> None:
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = service_overrides(api.url, tmp_path)
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                async with service.client() as client:
                    put = await client.put(
                        "/files/in/data.txt", headers=AS_ALICE, content=b"forty-two\n"
                    )
                    assert put.status_code == 200, put.text
                    api.enqueue(
                        ToolUseReply(
                            "Bash",
                            {"command": "cat in/data.txt && printf 'from the agent' > out.txt"},
                        ),
                        TextReply("done"),
                    )
                    body = {"prompt": "read it", "sessionId": "files"}
                    reply = await client.post("/run", headers=AS_ALICE, json=body)
                    got = await client.get("/files/out.txt", headers=AS_ALICE)
                    # Written once the agent has run: owned as the workspace is (as root,
                    # by AGENT_UID), so the agent can change it.
                    later = await client.put("/files/d/later.txt", headers=AS_ALICE, content=b"x")
                    assert later.status_code == 200, later.text
                    listed = (await client.get("/files", headers=AS_ALICE)).json()
                    workspace = workspace_of(service.data_dir, "alice")
                    owners = {
                        (path.stat().st_uid, path.stat().st_gid)
                        for path in (workspace, workspace / "d", workspace / "d" / "later.txt")
                    }
    assert reply.status_code == 200 and reply.json()["output"] == "done", reply.text
    assert "forty-two" in tool_result_text(api.model_calls[-1].tool_results()[0])
    assert (got.status_code, got.content) == (200, b"from the agent")
    assert [f["name"] for f in listed["files"]] == ["d/later.txt", "in/data.txt", "out.txt"]
    assert len(owners) == 1, owners


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_messages_reach_the_model_with_system_prompt_image_and_session(
    tmp_path: Path,
) -> None:
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = service_overrides(api.url, tmp_path)
            async with run_service(tmp_path, env=env) as service:
                await wait_healthy(service, ready=1, timeout=60)
                http = httpx.AsyncClient(verify=False, timeout=60)
                async with anthropic.AsyncAnthropic(
                    base_url=service.url,
                    api_key="sk-alice-key",
                    http_client=http,
                    max_retries=0,
                    default_headers={"X-Session-Id": "msgs"},
                ) as client:
                    api.enqueue(TextReply("A GIF."), TextReply("It was a GIF."))
                    image = {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": b64(JPEG)},
                    }
                    messages: list[Any] = [
                        {"role": "user", "content": [image, {"type": "text", "text": "What?"}]}
                    ]
                    first = await client.messages.create(
                        model="claude-sonnet-4-6",
                        max_tokens=100,
                        system="Be terse.",
                        messages=messages,
                    )
                    messages += [
                        {"role": "assistant", "content": first.content[0].text},
                        {"role": "user", "content": "And before?"},
                    ]
                    async with client.messages.stream(
                        model="claude-sonnet-4-6", max_tokens=100, messages=messages
                    ) as stream:
                        final = await stream.get_final_message()
    assert first.content[0].text == "A GIF." and final.content[0].text == "It was a GIF."
    one, two = api.model_calls[-2:]
    assert "Be terse." in one.system_text()
    assert [b["source"]["data"] for b in image_blocks(one)] == [b64(JPEG)]
    assert "What?" in two.all_text() and "A GIF." in two.all_text()
    assert sum("What?" in text for text in _user_texts(two)) == 1
