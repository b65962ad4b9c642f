"""The compatible routes' translation, as pure functions: error shapes, failures, conversations."""

from __future__ import annotations

import json
import threading

import pytest
import trio

from claude_code_api.http.anthropic_api import parse_messages_request
from claude_code_api.http.compat import (
    Limits,
    Message,
    anthropic_error,
    error_body,
    failure_of,
    openai_error,
    run_request_for,
)
from claude_code_api.http.openai_api import parse_chat_request
from claude_code_api.http.parsing import LARGE_BODY_BYTES, parse_body
from claude_code_api.http.requests import (
    BadRequest,
    ImageLimits,
    OptionCeiling,
    parse_image,
    parse_image_url,
)
from claude_code_api.messages import Image, JobFailed, RunResult, UpstreamError
from tests.support.images import GIF, JPEG, b64, png

LIMITS = Limits(1000, OptionCeiling(("m",), ("default",)), ImageLimits(2, 100))


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", "invalid_api_key"),
        (404, "invalid_request_error", "not_found"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_exceeded", "rate_limit_exceeded"),
        (502, "api_error", None),
        (503, "server_error", None),
        (504, "server_error", None),
        (507, "server_error", "insufficient_storage"),
    ],
)
def test_openai_error_types_and_codes(status, kind, code):
    assert openai_error(status, "why", "p") == {
        "error": {"message": "why", "type": kind, "param": "p", "code": code}
    }


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (507, "api_error"),
    ],
)
def test_anthropic_error_types(status, kind):
    assert anthropic_error(status, "why") == {
        "type": "error",
        "error": {"type": kind, "message": "why"},
    }


def test_each_path_answers_errors_in_its_own_shape():
    assert error_body("/run", 400, "x") == {"error": "x"}
    assert error_body("/v1/messages", 400, "x")["type"] == "error"
    assert error_body("/v1/chat/completions", 400, "x")["error"]["type"] == "invalid_request_error"
    assert error_body("/v1/models/foo", 404, "x")["error"]["code"] == "not_found"


def result(**fields) -> RunResult:
    return RunResult(**{"success": False, "output": "boom", "duration_ms": 1, **fields})


def test_runs_that_did_not_answer_become_errors():
    assert failure_of(result(success=True)) is None
    assert failure_of(result(timed_out=True)) is None  # what it wrote, as "length"
    assert failure_of(result()) == JobFailed(502, "the agent failed: boom")
    assert failure_of(result(cancelled=True)).status == 409
    assert failure_of(result(stopped=True)).status == 503
    upstream = result(upstream_error=UpstreamError(529, "overloaded", 3))
    assert failure_of(upstream) == JobFailed(502, "upstream API error 529: overloaded")
    refused = JobFailed(429, "Queue is full", 1)
    assert failure_of(refused) is refused


PNG = Image("image/png", "AAAA")


def test_a_session_turn_sends_only_what_follows_the_last_assistant_message():
    messages = [
        Message("user", "one", (PNG,)),
        Message("assistant", "two"),
        Message("user", "three"),
        Message("user", "four", (PNG,)),
    ]
    run = run_request_for(
        messages, system="sys", model="m", session_id="s", stream=False, limits=LIMITS
    )
    assert run.prompt == "three\n\nfour" and run.images == (PNG,)
    assert run.options.system_prompt == "sys" and run.options.model == "m"
    one_shot = run_request_for(
        messages, system=None, model="m", session_id=None, stream=False, limits=LIMITS
    )
    assert one_shot.images == (PNG, PNG)
    assert "USER:\n[image]\none\n\nASSISTANT:\ntwo\n</conversation>" in one_shot.prompt
    assert one_shot.prompt.endswith("Reply to the user's last message:\nthree\n\nfour")


@pytest.mark.parametrize(
    ("messages", "model", "param", "message"),
    [
        ([], "m", "messages", "at least one message"),
        ([Message("user", "a"), Message("assistant", "b")], "m", "messages", "the user's"),
        ([Message("user", " ")], "m", "messages", "no text and no image"),
        ([Message("user", "a", (PNG, PNG, PNG))], "m", "messages", "at most 2 images"),
        ([Message("user", "a" * 1001)], "m", "messages", "exceeds 1000 characters"),
        ([Message("user", "a")], "gpt", "model", "'gpt' is not allowed here"),
    ],
)
def test_conversations_that_cannot_be_run(messages, model, param, message):
    with pytest.raises(BadRequest) as refused:
        run_request_for(
            messages, system=None, model=model, session_id=None, stream=False, limits=LIMITS
        )
    assert refused.value.param == param and message in refused.value.message


async def test_a_large_body_is_parsed_off_the_event_loop():
    threads = []

    def parse(body: bytes) -> int:
        threads.append(threading.get_ident())
        return len(body)

    with trio.fail_after(10):
        assert await parse_body(b"{}", parse) == 2
        assert await parse_body(b" " * (LARGE_BODY_BYTES + 1), parse) == LARGE_BODY_BYTES + 1
    assert threads[0] == threading.get_ident() != threads[1]


def test_each_accepted_image_type_is_recognised_by_its_first_bytes():
    webp = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8
    limits = ImageLimits(4, 1000)
    for media_type, data in [
        ("image/png", png()),
        ("image/jpeg", JPEG),
        ("image/jpg", JPEG),  # read as image/jpeg
        ("image/gif", GIF),
        ("IMAGE/WEBP", webp),
    ]:
        image = parse_image(media_type, b64(data), "x", limits)
        assert image.media_type == media_type.lower().replace("jpg", "jpeg")
    with pytest.raises(BadRequest) as refused:
        parse_image("image/webp", b64(b"RIFF\x10\x00\x00\x00WAVE"), "x", limits)
    assert refused.value.param == "x" and "not an image/webp image" in refused.value.message
    url = parse_image_url("data:image/gif;base64," + b64(GIF), "u", limits)
    assert url.media_type == "image/gif"
    for refused_url in ("https://a/b.png", "HTTP://a/b.png", "ftp://a", "data:image/gif,x"):
        with pytest.raises(BadRequest) as refused:
            parse_image_url(refused_url, "u", limits)
        assert refused.value.status == 400 and refused.value.param == "u"


def case_id(value: object) -> str:
    """A test's id that is the same in every process (a function's repr holds its address)."""
    return getattr(value, "__name__", None) or repr(value)


USER = {"role": "user", "content": "hi"}
CHAT = {"model": "m", "messages": [USER]}
ANTHROPIC = {"model": "m", "max_tokens": 5, "messages": [USER]}


@pytest.mark.parametrize(
    ("parse", "body", "param", "message"),
    [
        (parse_chat_request, {"messages": [USER]}, "model", "model: you must provide a model"),
        (parse_chat_request, {**CHAT, "model": 3}, "model", "model: expected a model name"),
        (parse_chat_request, {**CHAT, "n": 2}, "n", "n: only one choice is produced here"),
        (parse_chat_request, {**CHAT, "tool_choice": "auto"}, "tool_choice", "tool_choice: tools"),
        (parse_chat_request, {**CHAT, "modalities": ["audio"]}, "modalities", "modalities: only"),
        (parse_chat_request, {**CHAT, "temperature": True}, "temperature", "temperature: wrong"),
        (parse_chat_request, {**CHAT, "max_tokens": 5.5}, "max_tokens", "max_tokens: wrong type"),
        (parse_chat_request, {**CHAT, "stop": 3}, "stop", "stop: wrong type"),
        (parse_chat_request, {**CHAT, "stream": "y"}, "stream", "stream: expected true or false"),
        (parse_chat_request, {**CHAT, "stream_options": 1}, "stream_options", "stream_options:"),
        (parse_chat_request, {**CHAT, "session_id": "a b"}, "session_id", "session_id: expected"),
        (
            parse_chat_request,
            {**CHAT, "messages": []},
            "messages",
            "messages: expected a non-empty",
        ),
        (parse_chat_request, {**CHAT, "messages": [5]}, "messages[0]", "messages[0]: expected a"),
        (parse_chat_request, {**CHAT, "model": "x"}, "model", "model: 'x' is not allowed here"),
        (parse_messages_request, {"max_tokens": 5, "messages": [USER]}, "model", "model: Field"),
        (parse_messages_request, {**ANTHROPIC, "max_tokens": None}, "max_tokens", "max_tokens: F"),
        (parse_messages_request, {**ANTHROPIC, "max_tokens": True}, "max_tokens", "max_tokens: e"),
        (parse_messages_request, {**ANTHROPIC, "tools": [{}]}, "tools", "tools: tools are not"),
        (parse_messages_request, {**ANTHROPIC, "top_k": "x"}, "top_k", "top_k: wrong type"),
        (parse_messages_request, {**ANTHROPIC, "system": 5}, "system", "system: expected a string"),
        (
            parse_messages_request,
            {**ANTHROPIC, "messages": [{"role": "system"}]},
            "messages.0.role",
            "messages.0.role: expected user or assistant",
        ),
    ],
    ids=case_id,
)
def test_a_bad_compatible_body_names_its_parameter(parse, body, param, message):
    with pytest.raises(BadRequest) as refused:
        parse(json.dumps(body).encode(), None, LIMITS)
    assert refused.value.status == 400
    assert refused.value.param == param
    assert refused.value.message.startswith(message)


@pytest.mark.parametrize(
    ("parse", "body"),
    [
        (parse_chat_request, {**CHAT, "n": 1.0, "max_tokens": 5.0, "temperature": 1}),
        (parse_chat_request, {**CHAT, "tools": [], "tool_choice": "none", "logprobs": False}),
        (parse_chat_request, {**CHAT, "response_format": {"type": "text"}, "prediction": 5}),
        (parse_messages_request, {**ANTHROPIC, "max_tokens": 2.0, "top_k": 1.0, "tools": []}),
        (parse_messages_request, {**ANTHROPIC, "system": [{"type": "text", "text": "s"}]}),
    ],
    ids=case_id,
)
def test_what_a_compatible_body_may_hold_and_is_ignored(parse, body):
    assert parse(json.dumps(body).encode(), None, LIMITS).run.prompt == "hi"
