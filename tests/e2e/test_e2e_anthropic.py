"""End to end: the official ``anthropic`` client against ``POST /v1/messages``.

A client nobody here wrote (it sends ``x-api-key``), against the real service with
the real SDK and the fake CLI, as tests/e2e/test_e2e_openai.py does for OpenAI's client.
"""

from __future__ import annotations

import json
from functools import partial

import anthropic
import httpx
import pytest
import trio

from tests.e2e.test_e2e_stream import wait_runs
from tests.support.compat_clients import ALICE, MODEL, USERS, assert_the_left_stream_ended, turns
from tests.support.compat_clients import anthropic_client as client_for
from tests.support.harness import for_one_test, run_service, shared_service, wait_healthy
from tests.support.images import GIF, b64, png


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    env = {"API_KEYS": USERS, "MAX_IMAGES": "2", "MAX_OUTPUT_CHARS": "2000"}
    with shared_service(tmp_path_factory.mktemp("anthropic"), env=env) as service:
        yield service


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


def user(content) -> dict:
    return {"role": "user", "content": content}


def image(data: bytes, media_type: str = "image/png") -> dict:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": b64(data)},
    }


async def test_a_plain_message_with_a_system_prompt(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL,
                max_tokens=100,
                system=[{"type": "text", "text": "Be brief."}],
                messages=[user("[[fake:whoami]]")],
                temperature=0.5,
                top_k=3,
                stop_sequences=["END"],
                metadata={"user_id": "u"},
            )
            message = raw.parse()
    assert raw.headers["x-run-id"] == message.id.removeprefix("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL and message.stop_reason == "end_turn"
    whoami = json.loads(message.content[0].text.removeprefix("whoami: "))
    assert whoami["appendSystemPrompt"] == "Be brief."
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


async def test_a_conversation_one_shot_and_in_a_session(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            message = await client.messages.create(
                model=MODEL,
                max_tokens=10,
                messages=[user("Hello."), {"role": "assistant", "content": "Hi."}, user("Again.")],
            )
            assert "<conversation>\nUSER:\nHello.\n\nASSISTANT:\nHi.\n</conversation>" in (
                message.content[0].text
            )
        async with client_for(service, default_headers={"X-Session-Id": "msgs"}) as client:
            first = await client.messages.create(
                model=MODEL, max_tokens=10, messages=[user("My name is Ada.")]
            )
            history = [
                user("My name is Ada."),
                {"role": "assistant", "content": first.content[0].text},
                user([{"type": "text", "text": "What is my name?"}]),
            ]
            second = await client.messages.create(model=MODEL, max_tokens=10, messages=history)
            assert second.content[0].text == "Your name is Ada."
            assert turns(service)[-1]["prompt"] == "What is my name?"
    async with service.client() as plain:
        await plain.request("DELETE", "/session", headers=ALICE, json={"sessionId": "msgs"})


async def test_a_streamed_message_has_anthropics_event_sequence(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            async with client.messages.stream(
                model=MODEL, max_tokens=10, messages=[user("[[fake:slow:3:0.2]]")]
            ) as stream:
                kinds = [event.type async for event in stream]
                final = await stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 3
    assert final.content[0].text == "piece 1\n\npiece 2\n\npiece 3"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


async def test_images_as_base64_blocks(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            message = await client.messages.create(
                model=MODEL,
                max_tokens=10,
                messages=[
                    user(
                        [
                            image(png()),
                            image(GIF, "image/gif"),
                            {"type": "text", "text": "[[fake:images]]"},
                        ]
                    )
                ],
            )
            assert message.content[0].text == f"images: image/png {len(png())}, image/gif 43"
            for block, message_part in [
                (
                    {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}},
                    "not fetched",
                ),
                (image(GIF, "image/png"), "not an image/png image"),
                (image(png(), "image/tiff"), "is not accepted"),
                ({"type": "tool_result", "tool_use_id": "t", "content": "x"}, "not supported"),
                ({"type": "document", "source": {}}, "not supported"),
            ]:
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await client.messages.create(
                        model=MODEL, max_tokens=10, messages=[user([block])]
                    )
                assert refused.value.body["error"]["type"] == "invalid_request_error"
                assert message_part in refused.value.message
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.messages.create(
                    model=MODEL, max_tokens=10, messages=[user([image(png())] * 3)]
                )
            assert "at most 2 images" in refused.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 5, "messages": [user("hi")]}, "model: Field required"),
        ({"model": MODEL, "messages": [user("hi")]}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 0, "messages": [user("hi")]}, "max_tokens: expected"),
        ({"model": "gpt-4o", "max_tokens": 5, "messages": [user("hi")]}, "is not allowed here"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [user("hi")], "tools": [{"name": "t"}]},
            "tools: tools are not supported",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "role",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages: expected a non-empty"),
        ({"model": MODEL, "max_tokens": 5, "messages": [user("hi")], "top_k": "x"}, "top_k"),
    ],
)
async def test_bad_requests_are_400_in_anthropics_shape(service, body, message):
    with trio.fail_after(30):
        async with client_for(service) as client:
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.post("/v1/messages", body=body, cast_to=httpx.Response)
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": refused.value.body["error"]["message"],
        },
    }
    assert message in refused.value.message


async def test_auth_and_failures_in_anthropics_shape(service):
    with trio.fail_after(30):
        async with client_for(service, key="wrong") as client:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await client.messages.create(model=MODEL, max_tokens=5, messages=[user("hi")])
            assert refused.value.body["error"]["type"] == "authentication_error"
        async with client_for(service) as client:
            with pytest.raises(anthropic.InternalServerError) as failed:
                await client.messages.create(
                    model=MODEL, max_tokens=5, messages=[user("[[fake:crash]]")]
                )
            assert failed.value.status_code == 502
            assert failed.value.body["error"]["type"] == "api_error"
            await wait_healthy(service, ready=1)
            # Cut at MAX_OUTPUT_CHARS: "max_tokens", as the API says of a cut answer.
            message = await client.messages.create(
                model=MODEL, max_tokens=5, messages=[user("[[fake:big:3000]]")]
            )
            assert message.stop_reason == "max_tokens" and len(message.content[0].text) == 2000
            # A failure once streaming is Anthropic's error event.
            await wait_healthy(service, ready=1)
            with pytest.raises(anthropic.APIStatusError) as failed:
                async with client.messages.stream(
                    model=MODEL, max_tokens=5, messages=[user("[[fake:error]]")]
                ) as stream:
                    async for _ in stream:
                        pass
            assert "the agent failed" in str(failed.value)


async def test_a_full_queue_is_429_with_retry_after(tmp_path):
    env = {"API_KEYS": USERS, "QUEUE_MAX": "0"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with client_for(service) as client, trio.open_nursery() as nursery:
                create = partial(client.messages.create, model=MODEL, max_tokens=5)
                nursery.start_soon(partial(create, messages=[user("[[fake:sleep:1]]")]))
                async with service.client() as plain:
                    await wait_runs(plain, ALICE, ["running"])
                with pytest.raises(anthropic.RateLimitError) as limited:
                    await create(messages=[user("x")])
                assert limited.value.body["error"]["type"] == "rate_limit_error"
                assert limited.value.response.headers["retry-after"] == "1"


async def test_a_client_that_leaves_a_stream_cancels_the_run(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            async with client.messages.stream(
                model=MODEL, max_tokens=5, messages=[user("[[fake:slow:1000:0.1]]")]
            ) as stream:
                async for event in stream:
                    if event.type == "content_block_delta":
                        break  # and leave
        await assert_the_left_stream_ended(service, "messages stream")
