"""What the OpenAI- and Anthropic-compatible routes share: one translation to a ``/run``.

``POST /v1/chat/completions`` (:mod:`.openai_api`) and ``POST /v1/messages``
(:mod:`.anthropic_api`) are translations, not a second pipeline: each turns its
body into the :class:`~.requests.RunRequest` that ``POST /run`` builds
(:func:`run_request_for`), submits it the way ``/run`` does
(:func:`~.runs.start_run`: the same dispatcher, queue, per-user limits,
sessions, ceilings, disk quota and metrics), and writes the run's result or its
stream events in its own shape (:func:`~.streaming.relay_stream` with an
encoder of its own). The handling of a request, from its body to its answer, is
one (:class:`CompatRuns`); each route gives only what differs: its parser, its
reply's body, its stream's frames (a :class:`TextStream`) and its error shape
and run headers (a :class:`Dialect`).

The conversation a client sends becomes one prompt:

* **In a session** (``X-Session-Id: <id>``, or ``session_id`` in the body) only the
  messages after the last assistant message are sent: the session's agent holds
  the rest of the conversation already.
* **Without one**, a conversation of one user message is that message; a longer one
  is rendered as a transcript (:func:`render_conversation`) ahead of its last user
  messages, for a one-shot agent that has never seen it.

The system messages become the run's ``systemPrompt`` (appended to Claude Code's
own, under the same ceiling as ``/run``'s option). Images of every message sent
count toward ``MAX_IMAGES``.

Each route declares its body once, as a model (:mod:`.schema`) built from the
fields declared here (:func:`model_name`, :func:`ignored`, :func:`refused`, ...):
the same declaration validates the body and is its OpenAPI schema. The messages
inside it are checked by the route's own functions, which name each part in the
route's own style (``messages[0].content[1]``, ``messages.0.content.1``).

Error handling: every way a body can be wrong is a :class:`~.requests.BadRequest`
naming the parameter (``param``), which the app answers in the route's error
shape (:func:`error_body`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

import attrs
import trio
from pydantic import Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema
from quart import Response, request

from ..messages import (
    AssistantText,
    DispatcherMessage,
    Image,
    Job,
    JobFailed,
    ReplyEvent,
    RunResult,
)
from .jobs import Finished
from .parsing import parse_body
from .requests import (
    MAX_MODEL_NAME_CHARS,
    MODEL_RULE,
    SESSION_ID_PATTERN,
    SESSION_ID_RULE,
    BadRequest,
    ImageLimits,
    OptionCeiling,
    RunRequest,
    check_image_count,
    parse_run_options,
)
from .runs import log_run_end, start_run
from .schema import Integral, Says, Schema, checked, documented
from .streaming import STREAM_HEADERS, StreamEncoder, relay_stream
from .user_claude import SharedUserMemory

SESSION_HEADER = "X-Session-Id"
OPENAI = "openai"
ANTHROPIC = "anthropic"


@attrs.frozen
class Message:
    """One message of a client's conversation, translated: who said it, its text, its images."""

    role: str  # "user" or "assistant"
    text: str
    images: tuple[Image, ...] = ()


@attrs.frozen
class Limits:
    """The bounds a translated request is held to (the same as ``/run``'s)."""

    max_prompt_chars: int
    ceiling: OptionCeiling
    images: ImageLimits


def bad(param: str, message: str, status: int = 400) -> BadRequest:
    """A 400 (or ``status``) about ``param``, its message starting with the parameter's name."""
    return BadRequest(f"{param}: {message}", status, param=param)


def session_id_from(header: str | None, body_value: object, param: str) -> str | None:
    """The session a request continues: the ``X-Session-Id`` header, else the body's field."""
    value: object = header if header is not None else body_value
    if value is None:
        return None
    if not isinstance(value, str) or not SESSION_ID_PATTERN.fullmatch(value):
        where = SESSION_HEADER if header is not None else param
        raise bad(where, f"expected {SESSION_ID_RULE}")
    return value


# --- the fields the two shapes declare (their bodies: parse_chat_request, ...) ---------------


def model_name(allowed: Sequence[str], missing: str) -> Any:
    """``model``: required (``missing``: what a refusal says when there is none), a model
    name; the ceiling (``ALLOWED_MODELS``, the schema's enum) is held by
    :func:`run_request_for`, as for ``/run``."""
    return (
        Annotated[
            str,
            StringConstraints(min_length=1, max_length=MAX_MODEL_NAME_CHARS),
            documented(enum=list(allowed)),
            Says(MODEL_RULE, required=missing),
        ],
        ...,
    )


def ignored(kind: Any, description: str = "accepted, ignored") -> Any:
    """A field accepted and ignored, of the JSON type ``kind`` (``object``: any)."""
    return (Annotated[kind | None, Field(description=description), Says("wrong type")], None)


WHOLE = Annotated[int, Integral]
NUMBER = float  # strict: an int is a number, true is not


def refused(name: str, allowed: Callable[[object], bool], why: str) -> Any:
    """A field the agent cannot honour: a 400 naming it unless ``allowed(value)``; not in
    the schema (the body's description lists them)."""

    def check(value: object) -> object:
        if not allowed(value):
            raise bad(name, why)
        return value

    return (SkipJsonSchema[Annotated[object, checked(check)]], None)


NO_TOOLS = "tools are not supported: the agent uses its own"
STREAM = (Annotated[bool | None, Says("expected true or false")], None)


def session_id_field(description: str) -> Any:
    """``session_id``: checked by :func:`session_id_from` (the ``X-Session-Id`` header,
    when given, takes its place)."""
    session = {"type": "string", "pattern": f"^{SESSION_ID_PATTERN.pattern}$"}
    return (
        Annotated[
            object,
            documented(anyOf=[session, {"type": "null"}], description=description),
        ],
        None,
    )


def messages_list(items: Schema, description: str | None = None) -> Any:
    """``messages``: a non-empty list; each message is the route's to check."""
    schema: Schema = {"type": "array", "minItems": 1, "items": items}
    if description:
        schema["description"] = description
    return (
        Annotated[
            list[object],
            Field(min_length=1),
            documented(**schema),
            Says("expected a non-empty list of messages"),
        ],
        ...,
    )


def render_conversation(earlier: Sequence[Message], last: str) -> str:
    """A one-shot's prompt for a conversation: its earlier turns as a transcript, then ``last``.

    Each earlier message is its role in capitals on a line of its own, then its text
    (``[image]`` where it had images), messages separated by a blank line, inside
    ``<conversation>`` tags; then the instruction to reply to the last message.
    """
    turns = []
    for message in earlier:
        shown = message.text
        if message.images:
            marks = " ".join("[image]" for _ in message.images)
            shown = f"{marks}\n{shown}" if shown else marks
        turns.append(f"{message.role.upper()}:\n{shown}")
    history = "\n\n".join(turns)
    return (
        "The conversation so far (earlier messages, oldest first):\n"
        f"<conversation>\n{history}\n</conversation>\n\n"
        f"Reply to the user's last message:\n{last}"
    )


def run_request_for(
    messages: Sequence[Message],
    *,
    system: str | None,
    model: str,
    session_id: str | None,
    stream: bool,
    limits: Limits,
) -> RunRequest:
    """The ``/run`` request a conversation makes (see the module docstring).

    The conversation must end with a user message. ``model`` must be allowed
    (``ALLOWED_MODELS``); ``system`` is held to ``systemPrompt``'s bound.
    """
    if not messages:
        raise bad("messages", "at least one message is required")
    if messages[-1].role != "user":
        raise bad("messages", "the last message must be the user's")
    last_assistant = max(
        (i for i, message in enumerate(messages) if message.role == "assistant"), default=-1
    )
    trailing = messages[last_assistant + 1 :]
    text = "\n\n".join(message.text for message in trailing if message.text)
    if session_id is not None or last_assistant < 0:
        sent = trailing
        prompt = text
    else:
        sent = messages
        prompt = render_conversation(messages[: last_assistant + 1], text)
    images = tuple(image for message in sent for image in message.images)
    check_image_count(len(images), limits.images, "messages")
    if not prompt.strip() and not images:
        raise bad("messages", "the user's last message has no text and no image")
    if len(prompt) > limits.max_prompt_chars:
        raise bad(
            "messages", f"the prompt made of them exceeds {limits.max_prompt_chars} characters"
        )
    try:
        options = parse_run_options({"model": model, "systemPrompt": system}, limits.ceiling)
    except BadRequest as exc:
        param = "model" if exc.message.startswith("model") else "system"
        raise BadRequest(exc.message, exc.status, param=param) from None
    return RunRequest(
        prompt=prompt,
        session_id=session_id,
        timeout_ms=None,
        stream=stream,
        options=options,
        images=images,
    )


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int, int, int]:
    """(input, cache creation, cache read, output) tokens of a run's ``usage`` (0 when absent)."""

    def count(name: str) -> int:
        value = (usage or {}).get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return (
        count("input_tokens"),
        count("cache_creation_input_tokens"),
        count("cache_read_input_tokens"),
        count("output_tokens"),
    )


def failure_of(terminal: RunResult | JobFailed) -> JobFailed | None:
    """The error a run that did not answer is reported as; None for an answer.

    An answer is a successful run or one cut by its deadline (``timedOut``: what it
    wrote so far, ended as "length"). A run that ended with the agent's error is a
    502 (its text the message), one cancelled by ``DELETE /runs/{runId}`` a 409, one
    stopped by the service's shutdown a 503.
    """
    if isinstance(terminal, JobFailed):
        return terminal
    if terminal.success or terminal.timed_out:
        return None
    if terminal.cancelled:
        return JobFailed(409, "the run was cancelled before it finished")
    if terminal.stopped:
        return JobFailed(503, "the service stopped the run (it is shutting down)")
    upstream = terminal.upstream_error
    if upstream is not None:
        status = upstream.status or "unreachable"
        return JobFailed(502, f"upstream API error {status}: {upstream.message}")
    text = " ".join(terminal.output.split())[:500] or "the agent ended its turn with an error"
    return JobFailed(502, f"the agent failed: {text}")


def cut_short(finished: Finished) -> bool:
    """Whether a run's answer was cut: by its deadline, or at ``MAX_OUTPUT_CHARS``."""
    terminal = finished.terminal
    return isinstance(terminal, RunResult) and (terminal.timed_out or terminal.output_truncated)


# --- error shapes -------------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "api_error",
}
_OPENAI_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    507: "insufficient_storage",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    error = {"message": message, "type": kind, "param": param, "code": _OPENAI_CODES.get(status)}
    return {"error": error}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def dialect_of(path: str) -> str | None:
    """Which error shape a path's answers have: OpenAI's, Anthropic's, or ours (None)."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC
    if path.startswith("/v1/"):
        return OPENAI
    return None


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answered on ``path``, in that route's shape."""
    match dialect_of(path):
        case "openai":
            return openai_error(status, message, param)
        case "anthropic":
            return anthropic_error(status, message)
    return {"error": message}


# --- answering a translated request -------------------------------------------


class Translated(Protocol):
    """A compatible route's request, translated: the run it makes, and whether it streams."""

    @property
    def run(self) -> RunRequest: ...

    @property
    def stream(self) -> bool: ...


T = TypeVar("T", bound=Translated)


@attrs.frozen
class Dialect:
    """What a compatible route answers in its own way: errors, the run's id, its log lines.

    ``name`` is how its runs end in the log (``chat``, ``chat refused``, ``chat
    stream``); ``error`` its error body (status, message); every answer names the
    run in each of ``run_id_headers``.
    """

    name: str
    error: Callable[[int, str], dict[str, Any]]
    run_id_headers: tuple[str, ...]

    def run_headers(self, run_id: str) -> dict[str, str]:
        return dict.fromkeys(self.run_id_headers, run_id)

    def error_reply(self, failure: JobFailed, run_id: str | None = None) -> Response:
        response = Response(
            json.dumps(self.error(failure.status, failure.error)),
            failure.status,
            content_type="application/json",
        )
        if run_id is not None:
            response.headers.update(self.run_headers(run_id))
        if failure.retry_after_s is not None:
            response.headers["Retry-After"] = str(failure.retry_after_s)
        return response


@attrs.frozen
class CompatRuns:
    """How the compatible routes run a request: ``/run``'s dispatcher, bounds and defaults."""

    dispatcher: trio.MemorySendChannel[DispatcherMessage]
    caller: Callable[[], str]
    json_body: Callable[[], Awaitable[bytes]]
    data_dir: Path
    default_timeout_ms: int
    limits: Limits
    shared_memory: SharedUserMemory | None = None  # users' CLAUDE.md with DATABASE_URL

    async def request(self, parse: Callable[[bytes, str | None, Limits], T]) -> tuple[str, T]:
        """The caller (authenticated first) and the current request's body, translated."""
        user_id = self.caller()
        session_header = request.headers.get(SESSION_HEADER)
        translated = await parse_body(
            await self.json_body(), lambda body: parse(body, session_header, self.limits)
        )
        return user_id, translated

    async def answer(
        self,
        user_id: str,
        translated: Translated,
        dialect: Dialect,
        *,
        body: Callable[[Job, Finished], dict[str, Any]],
        encoder: Callable[[Job], StreamEncoder],
    ) -> Response:
        """Run ``translated`` and answer: ``body`` of its result, or its stream by ``encoder``.

        A refusal, and a run that did not answer (:func:`failure_of`), is the
        dialect's error; the run ends with the request (the client left).
        """
        began = time.monotonic()
        started = await start_run(
            self.dispatcher,
            user_id,
            translated.run,
            data_dir=self.data_dir,
            default_timeout_ms=self.default_timeout_ms,
            shared_memory=self.shared_memory,
        )
        job = started.job

        def log_end(outcome: RunResult | JobFailed | None, how: str) -> None:
            log_run_end(user_id, translated.run, began, job.id, outcome, how)

        if isinstance(started.first, JobFailed):
            await started.close()
            log_end(started.first, f"{dialect.name} refused")
            return dialect.error_reply(started.first, job.id)
        if not translated.stream:
            try:
                finished = await started.follow()
            finally:
                await started.close()
            log_end(finished.terminal, dialect.name)
            failure = failure_of(finished.terminal)
            if failure is not None:
                return dialect.error_reply(failure, job.id)
            response = Response(json.dumps(body(job, finished)), content_type="application/json")
            response.headers.update(dialect.run_headers(job.id))
            return response

        async def end(finished: Finished | None) -> None:
            await started.close()  # the client left: the run ends too
            log_end(None if finished is None else finished.terminal, f"{dialect.name} stream")

        stream = relay_stream(job, started.events, started.first, encoder(job), on_end=end)
        return Response(stream, 200, headers={**STREAM_HEADERS, **dialect.run_headers(job.id)})


@attrs.define
class TextStream:
    """A run's events as a compatible route's stream (:func:`~.streaming.relay_stream`).

    What both shapes have: an opening before anything else, each text the agent
    writes as a delta (texts separated as the reply's output joins them; the whole
    output at the end when none was streamed), then the route's ending, or its
    error once streaming. A route gives the frames: :meth:`opening`, :meth:`text`,
    :meth:`failed` and :meth:`ending`.
    """

    began: bool = attrs.field(default=False, init=False)
    wrote_text: bool = attrs.field(default=False, init=False)

    def opening(self) -> bytes:
        raise NotImplementedError

    def text(self, text: str) -> bytes:
        raise NotImplementedError

    def failed(self, failure: JobFailed) -> bytes:
        raise NotImplementedError

    def ending(self, finished: Finished, result: RunResult) -> bytes:
        raise NotImplementedError

    def _head(self) -> bytes:
        if self.began:
            return b""
        self.began = True
        return self.opening()

    def event(self, event: ReplyEvent) -> bytes:
        head = self._head()
        if isinstance(event, AssistantText) and event.text:
            text = ("\n\n" if self.wrote_text else "") + event.text
            self.wrote_text = True
            return head + self.text(text)
        return head

    def terminal(self, finished: Finished) -> bytes:
        head = self._head()
        failure = failure_of(finished.terminal)
        if failure is not None:
            return head + self.failed(failure)
        result = finished.terminal
        assert isinstance(result, RunResult)
        parts = [head]
        if not self.wrote_text and result.output:
            parts.append(self.text(result.output))
        parts.append(self.ending(finished, result))
        return b"".join(parts)
