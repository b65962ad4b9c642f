"""What the OpenAI- and Anthropic-compatible routes share: one translation to a ``/run``.

``POST /v1/chat/completions`` (:mod:`.openai_api`) and ``POST /v1/messages``
(:mod:`.anthropic_api`) are translations, not a second pipeline: each turns its
body into the :class:`~.requests.RunRequest` that ``POST /run`` builds
(:func:`run_request_for`), submits it the way ``/run`` does
(:func:`~.runs.start_run`: the same dispatcher, queue, per-user limits,
sessions, ceilings, disk quota and metrics), and writes the run's result or its
stream events in its own shape (:func:`~.streaming.relay_stream` with an
encoder of its own).

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

Error handling: every way a body can be wrong is a :class:`~.requests.BadRequest`
naming the parameter (``param``), which the app answers in the route's error
shape (:func:`error_body`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from ..messages import Image, JobFailed, RunResult
from .jobs import Finished
from .requests import (
    SESSION_ID_PATTERN,
    SESSION_ID_RULE,
    BadRequest,
    ImageLimits,
    OptionCeiling,
    RunRequest,
    check_image_count,
    parse_run_options,
)

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
