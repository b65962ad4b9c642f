"""``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI's shapes over ``/run``.

A translation (:mod:`.compat`): the body becomes the run request ``/run`` builds,
the run's result a ``chat.completion``, its stream ``chat.completion.chunk``
events. Served by the Quart app, as ``/run``'s streams are.

What is applied and what is only accepted:

* ``model`` (required, one of ``ALLOWED_MODELS``), ``messages`` (``system`` and
  ``developer`` ones become the system prompt; ``user`` content as a string or
  ``text`` and ``image_url`` parts, ``data:`` URLs only), ``stream``,
  ``stream_options.include_usage``, and the session (``X-Session-Id`` or
  ``session_id``) are applied.
* ``max_tokens``, ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``,
  ``seed``, ``user``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
  ``parallel_tool_calls``, ``store``, ``metadata``, ``service_tier``,
  ``reasoning_effort`` are checked for their type and ignored: the agent's
  process decides its own sampling and length (the CLI takes none of them per turn).
* ``n`` above 1, ``tools``, ``tool_choice``, ``functions``, ``function_call``,
  ``audio``, ``modalities`` other than text, ``response_format`` other than text,
  ``logprobs``, and ``tool`` / ``function`` messages are a 400 naming the parameter.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Annotated, Any

import attrs
from pydantic import BaseModel
from quart import Blueprint, Response

from ..config.settings import Settings
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
    bad,
    cut_short,
    ignored,
    messages_list,
    model_name,
    openai_error,
    refused,
    run_request_for,
    session_id_field,
    session_id_from,
    usage_counts,
)
from .jobs import Finished
from .requests import (
    BadRequest,
    ImageLimits,
    OptionCeiling,
    RunRequest,
    parse_image_url,
    parse_json_object,
)
from .schema import Says, body_model, checked, documented, validate

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _one_choice(n: object) -> object:
    if n is not None and n != 1:
        raise bad("n", "only one choice is produced here (n must be 1)")
    return n


# What the agent cannot honour (a 400 naming it), then what is accepted and ignored, with
# the JSON type it may have: checked in this order, after ``model``.
_REFUSED_AND_IGNORED: dict[str, Any] = {
    "n": (
        Annotated[
            object,
            checked(_one_choice),
            documented(anyOf=[{"const": 1}, {"type": "null"}]),
        ],
        None,
    ),
    "tools": refused("tools", lambda value: not value, NO_TOOLS),
    "functions": refused("functions", lambda value: not value, NO_TOOLS),
    "tool_choice": refused("tool_choice", lambda value: value in (None, "none"), NO_TOOLS),
    "function_call": refused("function_call", lambda value: value in (None, "none"), NO_TOOLS),
    "audio": refused("audio", lambda value: value is None, "audio output is not supported"),
    "modalities": refused(
        "modalities", lambda value: value in (None, ["text"]), "only text output is supported"
    ),
    "response_format": refused(
        "response_format",
        lambda value: value is None or (isinstance(value, dict) and value.get("type") == "text"),
        "only the text response format is supported",
    ),
    "logprobs": refused("logprobs", lambda value: not value, "log probabilities are not available"),
    "max_tokens": ignored(WHOLE),
    "max_completion_tokens": ignored(WHOLE),
    "temperature": ignored(NUMBER),
    "top_p": ignored(NUMBER),
    "stop": ignored(str | list[Any]),
    "seed": ignored(WHOLE),
    "user": ignored(str),
    "presence_penalty": ignored(NUMBER),
    "frequency_penalty": ignored(NUMBER),
    "logit_bias": ignored(dict[str, Any]),
    "parallel_tool_calls": ignored(bool),
    "store": ignored(bool),
    "metadata": ignored(dict[str, Any]),
    "service_tier": ignored(str),
    "reasoning_effort": ignored(str),
    "top_logprobs": ignored(WHOLE),
    "prediction": ignored(object),
    "web_search_options": ignored(object),
}


@functools.cache
def chat_request_model(allowed_models: tuple[str, ...]) -> type[BaseModel]:
    """A ``POST /v1/chat/completions`` body, its fields in the order they are checked.

    Each message is checked by :func:`parse_chat_request` (roles, content parts, images).
    """
    return body_model(
        "ChatCompletionRequest",
        "OpenAI's chat completion request. `tools`, `functions`, `audio`, `n` > 1,"
        " `logprobs`, a `response_format` or `modalities` other than text are refused (400"
        " naming the parameter).",
        model=model_name(allowed_models, "you must provide a model parameter"),
        **_REFUSED_AND_IGNORED,
        stream=STREAM,
        stream_options=(
            Annotated[
                dict[str, Any] | None,
                documented(
                    anyOf=[
                        {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                        {"type": "null"},
                    ]
                ),
                Says("expected an object"),
            ],
            None,
        ),
        session_id=session_id_field("a turn of this session (as the X-Session-Id header)"),
        messages=messages_list(
            {"$ref": "#/components/schemas/ChatMessage"},
            "system and developer messages become the system prompt; the last message must be"
            " the user's",
        ),
    )


@attrs.frozen
class ChatRequest:
    """A chat completion request, translated: the run it makes and how to answer."""

    run: RunRequest
    model: str
    stream: bool
    include_usage: bool


def _text_parts(content: object, where: str, limits: Limits, *, images: bool) -> Message:
    """The text (and, when ``images``, the images) of one message's ``content``."""
    if isinstance(content, str):
        return Message("user", content)
    if not isinstance(content, list):
        raise bad(where, "expected a string or a list of content parts")
    texts: list[str] = []
    found = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise bad(at, "expected a content part object")
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise bad(at, f"expected {kind!r}, a string")
            texts.append(text)
        elif kind == "image_url" and images:
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            found.append(parse_image_url(url, f"{at}.image_url.url", limits.images))
        else:
            allowed = "text and image_url" if images else "text"
            raise bad(at, f"content parts of type {str(kind)[:40]!r} are not supported ({allowed})")
    return Message("user", "\n".join(texts), tuple(found))


def parse_chat_request(body: bytes, session_header: str | None, limits: Limits) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body (:func:`chat_request_model`, then each
    message) and translate it."""
    values = validate(chat_request_model(limits.ceiling.allowed_models), parse_json_object(body))
    model: str = values["model"]
    stream = bool(values["stream"])
    include_usage = (values["stream_options"] or {}).get("include_usage") is True
    session_id = session_id_from(session_header, values["session_id"], "session_id")

    raw_messages: list[Any] = values["messages"]
    system: list[str] = []
    conversation: list[Message] = []
    for index, raw in enumerate(raw_messages):
        where = f"messages[{index}]"
        if not isinstance(raw, dict):
            raise bad(where, "expected a message object")
        role = raw.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", "expected one of " + ", ".join(ROLES))
        if role in ("tool", "function"):
            raise bad(f"{where}.role", f"{role} messages are not supported (no tools here)")
        if role == "assistant" and (raw.get("tool_calls") or raw.get("function_call")):
            raise bad(f"{where}.tool_calls", "tools are not supported: the agent uses its own")
        content = raw.get("content")
        if content is None and role == "assistant":
            content = ""
        parsed = _text_parts(content, f"{where}.content", limits, images=role == "user")
        if role in ("system", "developer"):
            system.append(parsed.text)
        else:
            conversation.append(attrs.evolve(parsed, role=role))
    run = run_request_for(
        conversation,
        system="\n\n".join(text for text in system if text) or None,
        model=model,
        session_id=session_id,
        stream=stream,
        limits=limits,
    )
    return ChatRequest(run, model, stream, include_usage)


def completion_id(job: Job) -> str:
    return f"chatcmpl-{job.id}"


def usage_body(result: RunResult) -> dict[str, int]:
    fresh, created, read, output = usage_counts(result.usage)
    prompt = fresh + created + read
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def completion_body(
    chat: ChatRequest, job: Job, finished: Finished, created: int
) -> dict[str, Any]:
    """The ``chat.completion`` of a run that answered."""
    result = finished.terminal
    assert isinstance(result, RunResult)
    return {
        "id": completion_id(job),
        "object": "chat.completion",
        "created": created,
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.output, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if cut_short(finished) else "stop",
            }
        ],
        "usage": usage_body(result),
        "system_fingerprint": None,
    }


def _data(value: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace")
        + b"\n\n"
    )


DONE = b"data: [DONE]\n\n"


@attrs.define
class ChunkEncoder(TextStream):
    """A run's events as ``chat.completion.chunk`` lines (:func:`~.streaming.relay_stream`)."""

    chat: ChatRequest
    job: Job
    created: int

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id(self.job),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.chat.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def opening(self) -> bytes:
        return _data(self._chunk({"role": "assistant", "content": ""}))

    def text(self, text: str) -> bytes:
        return _data(self._chunk({"content": text}))

    def failed(self, failure: JobFailed) -> bytes:
        return _data(openai_error(failure.status, failure.error)) + DONE

    def ending(self, finished: Finished, result: RunResult) -> bytes:
        finish = "length" if cut_short(finished) else "stop"
        parts = [_data(self._chunk({}, finish))]
        if self.chat.include_usage:
            usage = {**self._chunk({}), "choices": [], "usage": usage_body(result)}
            parts.append(_data(usage))
        parts.append(DONE)
        return b"".join(parts)


OPENAI_REPLIES = Dialect("chat", openai_error, ("X-Run-Id",))


def openai_routes(
    runs: CompatRuns, *, allowed_models: tuple[str, ...], listed_at: int
) -> Blueprint:
    """``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{model}``."""
    routes = Blueprint("openai", __name__)

    def model_view(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": listed_at, "owned_by": "anthropic"}

    @routes.get("/v1/models")
    async def models() -> Response:
        runs.caller()
        body = {"object": "list", "data": [model_view(name) for name in allowed_models]}
        return Response(json.dumps(body), content_type="application/json")

    @routes.get("/v1/models/<path:model>")
    async def model(model: str) -> Response:
        runs.caller()
        if model not in allowed_models:
            raise BadRequest(f"The model {model[:200]!r} does not exist here", 404, param="model")
        return Response(json.dumps(model_view(model)), content_type="application/json")

    @routes.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        user_id, chat = await runs.request(parse_chat_request)
        created = int(time.time())
        return await runs.answer(
            user_id,
            chat,
            OPENAI_REPLIES,
            body=lambda job, finished: completion_body(chat, job, finished, created),
            encoder=lambda job: ChunkEncoder(chat, job, created),
        )

    return routes


def limits_of(settings: Settings, ceiling: OptionCeiling) -> Limits:
    return Limits(settings.max_prompt_chars, ceiling, ImageLimits.of(settings))
