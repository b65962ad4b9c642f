"""``POST /v1/messages``: Anthropic's Messages API shape over ``/run``.

A translation (:mod:`.compat`), as :mod:`.openai_api` is: the body becomes the
run request ``/run`` builds; the run's result a ``message``, its stream
Anthropic's events (``message_start``, ``content_block_start``,
``content_block_delta``, ``content_block_stop``, ``message_delta``,
``message_stop``). Served by the Quart app.

Applied: ``model`` (required, one of ``ALLOWED_MODELS``), ``max_tokens``
(required, as Anthropic requires it: a whole number >= 1; not applied to the
agent, whose CLI sets its own), ``system`` (a string or text blocks: the system
prompt), ``messages`` (``user`` and ``assistant``, content a string or ``text``
and base64 ``image`` blocks), ``stream``, and the session (``X-Session-Id`` or
``session_id``). Accepted and ignored: ``temperature``, ``top_p``, ``top_k``,
``stop_sequences``, ``metadata``, ``thinking``, ``service_tier``. Refused (400):
``tools`` (and ``tool_choice``), ``tool_use`` and ``tool_result`` blocks, documents,
image ``url`` sources that are ``http(s)`` (the service fetches nothing).
"""

from __future__ import annotations

import functools
import json
import logging
from functools import partial
from typing import Annotated, Any

import attrs
from pydantic import BaseModel, Field
from quart import Blueprint, Response

from ..messages import Job, JobFailed, RunResult
from .compat import (
    NO_TOOLS,
    NUMBER,
    STREAM,
    WHOLE,
    CompatRuns,
    Dialect,
    Limits,
    Message,
    TextStream,
    anthropic_error,
    bad,
    cut_short,
    ignored,
    messages_list,
    model_name,
    refused,
    run_request_for,
    session_id_field,
    session_id_from,
    usage_counts,
)
from .jobs import Finished
from .requests import RunRequest, parse_image, parse_image_url, parse_json_object
from .schema import Integral, Says, Schema, body_model, documented, validate

log = logging.getLogger(__name__)

TEXT_BLOCK: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}


@functools.cache
def messages_request_model(allowed_models: tuple[str, ...]) -> type[BaseModel]:
    """A ``POST /v1/messages`` body, its fields in the order they are checked.

    ``system`` and each message are checked by :func:`parse_messages_request` (roles,
    content blocks, images)."""
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["user", "assistant"]},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "anyOf": [TEXT_BLOCK, {"$ref": "#/components/schemas/AnthropicImage"}]
                        },
                    },
                ]
            },
        },
    }
    system = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_BLOCK}]}
    return body_model(
        "AnthropicMessagesRequest",
        "Anthropic's Messages API request; `tools` are refused (400).",
        model=model_name(allowed_models, "Field required"),
        max_tokens=(
            Annotated[
                Annotated[int, Field(ge=1), Integral],
                Field(description="required, as Anthropic requires it; not applied"),
                Says("expected a whole number, at least 1", required="Field required"),
            ],
            ...,
        ),
        tools=refused("tools", lambda value: not value, NO_TOOLS),
        tool_choice=refused("tool_choice", lambda value: value is None, NO_TOOLS),
        temperature=ignored(NUMBER),
        top_p=ignored(NUMBER),
        top_k=ignored(WHOLE),
        stop_sequences=ignored(list[Any]),
        metadata=ignored(dict[str, Any]),
        thinking=ignored(dict[str, Any]),
        service_tier=ignored(str),
        stream=STREAM,
        session_id=session_id_field("a turn of this session (as the X-Session-Id header)"),
        system=(
            Annotated[
                str | list[Any] | None,
                documented(anyOf=[system, {"type": "null"}], description="the system prompt"),
                Says("expected a string or a list of text blocks"),
            ],
            None,
        ),
        messages=messages_list(message),
    )


@attrs.frozen
class MessagesRequest:
    run: RunRequest
    model: str
    stream: bool


def _content(content: object, where: str, limits: Limits, role: str) -> Message:
    if isinstance(content, str):
        return Message(role, content)
    if not isinstance(content, list):
        raise bad(where, "expected a string or a list of content blocks")
    texts: list[str] = []
    images = []
    for index, block in enumerate(content):
        at = f"{where}.{index}"
        if not isinstance(block, dict):
            raise bad(at, "expected a content block object")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise bad(f"{at}.text", "Field required (a string)")
            texts.append(text)
        elif kind == "image" and role == "user":
            source = block.get("source")
            if not isinstance(source, dict):
                raise bad(f"{at}.source", "Field required")
            source_type = source.get("type")
            if source_type == "base64":
                images.append(
                    parse_image(
                        source.get("media_type"), source.get("data"), f"{at}.source", limits.images
                    )
                )
            elif source_type == "url":
                images.append(parse_image_url(source.get("url"), f"{at}.source.url", limits.images))
            else:
                raise bad(f"{at}.source.type", "expected base64 (a url source is not fetched)")
        else:
            raise bad(
                f"{at}.type",
                f"content blocks of type {str(kind)[:40]!r} are not supported here (text, and"
                " base64 image in user messages)",
            )
    return Message(role, "\n".join(texts), tuple(images))


def parse_messages_request(
    body: bytes, session_header: str | None, limits: Limits
) -> MessagesRequest:
    """Validate a ``POST /v1/messages`` body (see the module docstring)."""
    values = validate(
        messages_request_model(limits.ceiling.allowed_models), parse_json_object(body)
    )
    model: str = values["model"]
    stream = bool(values["stream"])
    session_id = session_id_from(session_header, values["session_id"], "session_id")
    system = values["system"]
    if isinstance(system, list):
        system = _content(system, "system", limits, "system").text
    conversation = []
    for index, raw in enumerate(values["messages"]):
        where = f"messages.{index}"
        if not isinstance(raw, dict):
            raise bad(where, "expected a message object")
        role = raw.get("role")
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role", "expected user or assistant")
        conversation.append(_content(raw.get("content"), f"{where}.content", limits, role))
    run = run_request_for(
        conversation,
        system=system or None,
        model=model,
        session_id=session_id,
        stream=stream,
        limits=limits,
    )
    return MessagesRequest(run, model, stream)


def message_id(job: Job) -> str:
    return f"msg_{job.id}"


def usage_body(result: RunResult | None) -> dict[str, int]:
    fresh, created, read, output = usage_counts(None if result is None else result.usage)
    return {
        "input_tokens": fresh,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": output,
    }


def stop_reason(finished: Finished) -> str:
    return "max_tokens" if cut_short(finished) else "end_turn"


def message_body(chat: MessagesRequest, job: Job, finished: Finished) -> dict[str, Any]:
    result = finished.terminal
    assert isinstance(result, RunResult)
    return {
        "id": message_id(job),
        "type": "message",
        "role": "assistant",
        "model": chat.model,
        "content": [{"type": "text", "text": result.output}],
        "stop_reason": stop_reason(finished),
        "stop_sequence": None,
        "usage": usage_body(result),
    }


def _event(name: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": name, **data}, ensure_ascii=False)
    return f"event: {name}\ndata: {payload}\n\n".encode("utf-8", "backslashreplace")


@attrs.define
class EventEncoder(TextStream):
    """A run's events as Anthropic's stream (:func:`~.streaming.relay_stream`)."""

    chat: MessagesRequest
    job: Job

    def opening(self) -> bytes:
        message: dict[str, Any] = {
            "id": message_id(self.job),
            "type": "message",
            "role": "assistant",
            "model": self.chat.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_body(None),
        }
        return _event("message_start", {"message": message}) + _event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        )

    def text(self, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _event("content_block_delta", {"index": 0, "delta": delta})

    def failed(self, failure: JobFailed) -> bytes:
        return _event("error", {"error": anthropic_error(failure.status, failure.error)["error"]})

    def ending(self, finished: Finished, result: RunResult) -> bytes:
        usage = usage_body(result)
        return b"".join(
            [
                _event("content_block_stop", {"index": 0}),
                _event(
                    "message_delta",
                    {
                        "delta": {"stop_reason": stop_reason(finished), "stop_sequence": None},
                        "usage": {"output_tokens": usage["output_tokens"]},
                    },
                ),
                _event("message_stop", {}),
            ]
        )


ANTHROPIC_REPLIES = Dialect("messages", anthropic_error, ("X-Run-Id", "request-id"))


def anthropic_routes(runs: CompatRuns) -> Blueprint:
    """``POST /v1/messages``."""
    routes = Blueprint("anthropic", __name__)

    @routes.post("/v1/messages")
    async def messages() -> Response:
        user_id, chat = await runs.request(parse_messages_request)
        return await runs.answer(
            user_id,
            chat,
            ANTHROPIC_REPLIES,
            body=partial(message_body, chat),
            encoder=partial(EventEncoder, chat),
        )

    return routes
