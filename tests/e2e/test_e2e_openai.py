"""End to end: the official ``openai`` client against ``/v1/chat/completions`` and ``/v1/models``.

A client nobody here wrote, pointed at the real service (real SDK, fake CLI). The
fake's directives ride in the prompt as for ``/run``; its log (FAKE_CLAUDE_LOG)
says what prompt, system prompt and images each turn received.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from functools import partial

import anthropic
import httpx
import openai
import pytest
import trio

from tests.e2e.test_e2e_stream import wait_runs
from tests.support.compat_clients import (
    ALICE,
    MODEL,
    USERS,
    anthropic_client,
    assert_the_left_stream_ended,
    turns,
)
from tests.support.compat_clients import openai_client as client_for
from tests.support.harness import (
    for_one_test,
    run_service,
    shared_service,
    wait_health_status,
    wait_healthy,
)
from tests.support.images import JPEG, data_url, png

OTHER_MODEL = "claude-opus-4-1"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    env = {
        "API_KEYS": USERS,
        "ALLOWED_MODELS": f"{MODEL},{OTHER_MODEL}",
        "MAX_IMAGES": "2",
        "MAX_OUTPUT_CHARS": "2000",
    }
    with shared_service(tmp_path_factory.mktemp("openai"), env=env) as service:
        yield service


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


async def test_a_plain_completion_and_the_models(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[user("What is 2+2?")]
            )
            completion = raw.parse()
            assert raw.headers["x-run-id"] == completion.id.removeprefix("chatcmpl-")
            assert completion.object == "chat.completion"
            assert completion.model == MODEL
            choice = completion.choices[0]
            assert choice.message.role == "assistant"
            assert choice.message.content == "echo: What is 2+2?"
            assert choice.finish_reason == "stop"
            usage = completion.usage
            assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            listed = await client.models.list()
            assert [model.id for model in listed.data] == [MODEL, OTHER_MODEL]
            assert (await client.models.retrieve(OTHER_MODEL)).id == OTHER_MODEL
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("gpt-4o")


async def test_system_messages_become_the_system_prompt_and_the_model_is_used(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            completion = await client.chat.completions.create(
                model=OTHER_MODEL,
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "developer", "content": [{"type": "text", "text": "No jokes."}]},
                    user("[[fake:whoami]]"),
                ],
                temperature=0.2,
                max_tokens=50,
                seed=3,
                stop=["\n\n"],
                user="someone",
            )
            whoami = json.loads(completion.choices[0].message.content.removeprefix("whoami: "))
            assert whoami["appendSystemPrompt"] == "Be brief.\n\nNo jokes."
            assert whoami["model"] == OTHER_MODEL


async def test_a_one_shot_conversation_is_rendered_as_a_transcript(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            completion = await client.chat.completions.create(
                model=MODEL,
                messages=[
                    user("Hello."),
                    {"role": "assistant", "content": "Hi, how can I help?"},
                    user("Spell it."),
                ],
            )
    prompt = turns(service)[-1]["prompt"]
    assert completion.choices[0].message.content == f"echo: {prompt}"
    assert prompt == (
        "The conversation so far (earlier messages, oldest first):\n<conversation>\n"
        "USER:\nHello.\n\nASSISTANT:\nHi, how can I help?\n</conversation>\n\n"
        "Reply to the user's last message:\nSpell it."
    )


async def test_a_session_by_header_sends_only_the_new_messages(service):
    with trio.fail_after(30):
        async with client_for(service, default_headers={"X-Session-Id": "chat-1"}) as client:
            first = await client.chat.completions.create(
                model=MODEL, messages=[user("My name is Grace.")]
            )
            assert first.choices[0].message.content == "Nice to meet you, Grace."
            history = [
                user("My name is Grace."),
                {"role": "assistant", "content": first.choices[0].message.content},
                user("What is my name?"),
            ]
            second = await client.chat.completions.create(model=MODEL, messages=history)
            assert second.choices[0].message.content == "Your name is Grace."
            assert turns(service)[-1]["prompt"] == "What is my name?"
        # The same session named in the body.
        async with client_for(service) as client:
            third = await client.chat.completions.create(
                model=MODEL,
                messages=[
                    *history,
                    {"role": "assistant", "content": "x"},
                    user("What is my name?"),
                ],
                extra_body={"session_id": "chat-1"},
            )
            assert third.choices[0].message.content == "Your name is Grace."
            async with service.client() as plain:
                status = (await plain.get("/status", headers=ALICE)).json()
            sessions = {s["id"]: s for s in status["sessions"]}
            assert sessions["chat-1"]["turns"] == 3
    async with service.client() as plain:
        await plain.request("DELETE", "/session", headers=ALICE, json={"sessionId": "chat-1"})


async def test_a_streamed_completion(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[user("[[fake:slow:3:0.2]]")],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "piece 1\n\npiece 2\n\npiece 3"
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


async def test_images_as_data_urls(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            content = [
                {"type": "text", "text": "[[fake:images]] what are these?"},
                {"type": "image_url", "image_url": {"url": data_url(png())}},
                {"type": "image_url", "image_url": {"url": data_url(JPEG, "image/jpeg")}},
            ]
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": content}]
            )
            shown = completion.choices[0].message.content
            assert shown == f"images: image/png {len(png())}, image/jpeg {len(JPEG)}"
            # An image alone is a prompt too.
            completion = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": content[1:2]}],
            )
            assert turns(service)[-1]["images"] == [["image/png", len(png())]]
            for url, message in [
                ("https://example.com/cat.png", "remote image URLs are not fetched"),
                ("http://127.0.0.1:1/x.png", "remote image URLs are not fetched"),
                ("data:image/png,abc", "expected a base64 data: URL"),
                (data_url(JPEG, "image/png"), "not an image/png image"),
            ]:
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(
                        model=MODEL,
                        messages=[
                            {
                                "role": "user",
                                "content": [{"type": "image_url", "image_url": {"url": url}}],
                            }
                        ],
                    )
                assert refused.value.status_code == 400
                assert message in refused.value.message
                assert refused.value.param == "messages[0].content[0].image_url.url"
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": [content[1]] * 3}],
                )
            assert "at most 2 images per request (MAX_IMAGES), got 3" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"model": None}, "model", "you must provide a model parameter"),
        ({"model": "gpt-4o"}, "model", "'gpt-4o' is not allowed here"),
        ({"n": 2}, "n", "n must be 1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"tool_choice": "auto"}, "tool_choice", "not supported"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", "only text"),
        ({"response_format": {"type": "json_object"}}, "response_format", "only the text"),
        ({"logprobs": True}, "logprobs", "not available"),
        ({"temperature": "hot"}, "temperature", "wrong type"),
        ({"messages": []}, "messages", "non-empty list"),
        (
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
            "messages[0].role",
            "not supported",
        ),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "must be the user's"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
            "not supported",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, "messages", "no text and no image"),
        ({"extra_headers": {"X-Session-Id": "bad id!"}}, "X-Session-Id", "expected 1 to 128"),
    ],
)
async def test_bad_requests_are_400_in_openais_shape_naming_the_parameter(
    service, fields, param, message
):
    with trio.fail_after(30):
        async with client_for(service) as client:
            arguments = {"model": MODEL, "messages": [user("hi")], **fields}
            if arguments["model"] is None:  # (the client itself insists on one)
                with pytest.raises(openai.BadRequestError) as refused:
                    body = {"messages": [user("hi")]}
                    await client.post("/chat/completions", body=body, cast_to=httpx.Response)
            else:
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(**arguments)
    error = refused.value
    assert error.status_code == 400
    assert error.body["type"] == "invalid_request_error"
    assert error.param == param and message in error.message, error.body


async def test_auth_rate_limit_and_failures_in_openais_shape(service):
    with trio.fail_after(30):
        async with client_for(service, key="wrong") as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(model=MODEL, messages=[user("hi")])
            assert refused.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with client_for(service) as client:
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(model=MODEL, messages=[user("[[fake:crash]]")])
            assert failed.value.status_code == 502
            assert failed.value.body["type"] == "api_error"
            await wait_healthy(service, ready=1)
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(model=MODEL, messages=[user("[[fake:error]]")])
            assert failed.value.status_code == 502 and "the agent failed" in failed.value.message
            await wait_healthy(service, ready=1)
            # An answer cut at MAX_OUTPUT_CHARS ends as "length".
            completion = await client.chat.completions.create(
                model=MODEL, messages=[user("[[fake:big:3000]]")]
            )
            assert completion.choices[0].finish_reason == "length"
            assert completion.choices[0].message.content == "x" * 2000


async def test_a_full_queue_is_429_with_retry_after(tmp_path):
    # No queue: a second one-shot while the only worker is busy is refused at once.
    env = {"API_KEYS": USERS, "QUEUE_MAX": "0"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with client_for(service) as client, trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        client.chat.completions.create,
                        model=MODEL,
                        messages=[user("[[fake:sleep:1]]")],
                    )
                )
                async with service.client() as plain:
                    await wait_runs(plain, ALICE, ["running"])
                for stream in (False, True):
                    with pytest.raises(openai.RateLimitError) as limited:
                        await client.chat.completions.create(
                            model=MODEL, messages=[user("x")], stream=stream
                        )
                    assert limited.value.code == "rate_limit_exceeded"
                    assert limited.value.response.headers["retry-after"] == "1"
                    assert limited.value.response.headers["x-run-id"]


async def test_a_client_that_leaves_a_stream_cancels_the_run(service):
    with trio.fail_after(30):
        async with client_for(service) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[user("[[fake:slow:1000:0.1]]")], stream=True
            )
            async with aclosing(stream.__aiter__()) as chunks:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        break  # and leave
            await stream.close()
        await assert_the_left_stream_ended(service, "chat stream")


async def test_no_agent_to_run_is_503_in_each_clients_shape(tmp_path):
    # Every agent exits at start: the pool is degraded and runs are refused at once.
    env = {"API_KEYS": USERS, "FAKE_CLAUDE_MODE": "exit_at_start:4"}
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_health_status(service, "degraded")
            async with client_for(service) as client:
                with pytest.raises(openai.InternalServerError) as refused:
                    await client.chat.completions.create(model=MODEL, messages=[user("hi")])
                assert refused.value.status_code == 503
                assert refused.value.body["type"] == "server_error"
                assert "no agent workers available" in refused.value.message
            async with anthropic_client(service) as claude:
                with pytest.raises(anthropic.APIStatusError) as refused:
                    await claude.messages.create(model=MODEL, max_tokens=5, messages=[user("hi")])
                assert refused.value.status_code == 503
                assert refused.value.body["error"]["type"] == "overloaded_error"


async def test_a_stream_is_data_lines_ending_with_usage_then_done(service):
    # What the openai client does not check: the wire shape, [DONE] last.
    body = {
        "model": MODEL,
        "messages": [user("[[fake:slow:2:0.1]]")],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with trio.fail_after(30):
        async with service.client() as plain:
            reply = await plain.post("/v1/chat/completions", headers=ALICE, json=body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in reply.text.split("\n") if line and not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


async def test_a_run_that_timed_out_ends_as_length_with_what_it_wrote(tmp_path):
    # The compatible routes take no timeout of their own: DEFAULT_TIMEOUT_MS cuts the run.
    env = {"API_KEYS": USERS, "DEFAULT_TIMEOUT_MS": "1000"}
    slow = [user("[[fake:slow:50:0.1]]")]
    with trio.fail_after(60):
        async with run_service(tmp_path, env=env) as service:
            await wait_healthy(service, ready=1)
            async with client_for(service) as client:
                completion = await client.chat.completions.create(model=MODEL, messages=slow)
                assert completion.choices[0].finish_reason == "length"
                assert "piece 1" in completion.choices[0].message.content
                await wait_healthy(service, ready=1)
                stream = await client.chat.completions.create(
                    model=MODEL, messages=slow, stream=True
                )
                chunks = [chunk async for chunk in stream]
                assert chunks[-1].choices[0].finish_reason == "length"
                await wait_healthy(service, ready=1)
            async with anthropic_client(service) as claude:
                message = await claude.messages.create(model=MODEL, max_tokens=5, messages=slow)
                assert message.stop_reason == "max_tokens" and "piece 1" in message.content[0].text
