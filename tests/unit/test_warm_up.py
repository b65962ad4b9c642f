"""The warm-up turn's answer (agent/warm_up.py): shaped as the model's, usage included.

With zero usage the real CLI left part of its accounting for a real answer to the user's
turn (~15 ms of it, measured with direct agents): the answer's usage must look real."""

from __future__ import annotations

import json

from claude_code_api.agent import warm_up


def events(stream: bytes) -> list[dict]:
    return [
        json.loads(line.removeprefix(b"data: "))
        for line in stream.splitlines()
        if line.startswith(b"data: ")
    ]


def test_a_streamed_answer_carries_usage_shaped_as_the_models() -> None:
    body = json.dumps({"model": "claude-x", "stream": True, "messages": ["." * 4000]}).encode()
    content_type, answer = warm_up.answer(body)
    assert content_type == b"text/event-stream"
    sent = events(answer)
    assert [e["type"] for e in sent][0] == "message_start" and sent[-1]["type"] == "message_stop"
    usage = sent[0]["message"]["usage"]
    assert usage["input_tokens"] >= 1000 and usage["output_tokens"] >= 1
    assert usage["cache_creation_input_tokens"] == 0 and usage["cache_read_input_tokens"] == 0
    [delta] = [e for e in sent if e["type"] == "message_delta"]
    assert delta["usage"]["output_tokens"] >= 1
    assert sent[0]["message"]["model"] == "claude-x"


def test_a_json_answer_and_a_body_that_is_not_json() -> None:
    content_type, answer = warm_up.answer(b'{"messages": []}')
    message = json.loads(answer)
    assert content_type == b"application/json" and message["content"][0]["text"] == warm_up.TEXT
    assert message["usage"]["input_tokens"] >= 1
    content_type, answer = warm_up.answer(b"not json")
    assert json.loads(answer)["model"] == warm_up.DEFAULT_MODEL
