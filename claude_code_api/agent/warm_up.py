"""The warm-up turn: a pool agent's first turn, run before any user's, answered by the service.

The real CLI does much of its work for a turn lazily, the first time it runs one (building
its request, its tools' descriptions, the code paths of a model call): measured with the
bundled 2.1.331 on a 2-CPU machine, a fresh agent's first turn costs ~0.17 s of CPU and a
later one ~0.05 s. A one-shot that goes to a fresh agent would pay that on its user's
time. So a pool agent, once started, runs one turn with :data:`PROMPT` before it is
offered to anyone. Its model call never leaves the service: the model proxy answers it
itself (:func:`answer`) while the agent's grant is marked warming, so it costs no model call
and nothing is counted against anyone.

The exchange stays in the agent's conversation, before its one-shot's prompt (as the
original's "hi" does): a ``/clear`` after it made the CLI redo its per-conversation set-up
on the request's turn (measured: that turn ~0.15 s against ~0.10 s without the ``/clear``).
It costs the request a dozen input tokens, and it is the service's own words, never another
user's: an agent kept for its user (``AGENT_REUSE_S``) is cleared between that user's
requests as before.

Owns nothing but the words and the shape of that answer: a minimal Messages API answer
(an ``end_turn`` text of :data:`TEXT`), streamed as server-sent events when the request asks
for a stream, else one JSON object. Its usage is shaped as the model's (input tokens estimated
from the request's size, one output token, the cache fields): with zero usage the CLI left
part of its accounting for a real answer to the request's turn (measured, direct agents, real
CLI: the first user turn p50 0.069–0.072 s after a zero-usage warm-up, 0.053–0.056 s after
this one, 0.059 s after one answered by the mock API). Nobody is charged: the proxy answers it
and counts nothing, and a turn's cost is the proxy's count for its run.

Error handling: a body that is not JSON (or not an object) is answered as a JSON (not
streamed) answer all the same: the warm-up turn is the service's own, and the CLI's error
on a malformed answer would fail the agent's start, which is what a broken warm-up should do.
"""

from __future__ import annotations

import json
from typing import Any

# What a warming agent is asked; its answer is never shown to anyone.
PROMPT = "Reply with: ok"
TEXT = "ok"
# The model named in the answer when the request names none.
DEFAULT_MODEL = "claude-sonnet-4-6"
MESSAGE_ID = "msg_service_warm_up"


def answer(body: bytes) -> tuple[bytes, bytes]:
    """The answer to a warming agent's ``POST /v1/messages`` body: (content type, bytes)."""
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        request = {}
    model = request.get("model")
    message = _message(model if isinstance(model, str) and model else DEFAULT_MODEL, len(body))
    if request.get("stream") is True:
        return b"text/event-stream", _events(message)
    return b"application/json", json.dumps(message).encode()


def _message(model: str, body_bytes: int) -> dict[str, Any]:
    return {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _usage(body_bytes),
    }


def _usage(body_bytes: int) -> dict[str, int]:
    """Usage shaped as the model's: the CLI's own accounting runs as on a real answer."""
    return {
        "input_tokens": max(1, body_bytes // 4),
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _events(message: dict[str, Any]) -> bytes:
    """``message`` as the Messages API streams one (message_start ... message_stop)."""
    start = {**message, "content": [], "stop_reason": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": TEXT},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
    )
