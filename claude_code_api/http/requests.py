"""Parsing and validating request bodies: pure functions, no I/O.

Every way a body can be wrong becomes :class:`BadRequest` with the HTTP status
and a message naming the field, so no input a client can send reaches the
actors malformed or turns into a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Protocol

import attrs

from ..ceiling import OptionCeiling as OptionCeiling  # (re-exported for the HTTP layer)
from ..messages import IMAGE_MEDIA_TYPES, PERMISSION_MODES, Image, RunOptions

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SESSION_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -"


class BadRequest(Exception):
    """A client error: answered as ``{"error": message}`` with ``status``.

    ``param``: the parameter at fault, for the compatible routes' error shapes."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


@attrs.frozen
class RunRequest:
    prompt: str
    session_id: str | None
    timeout_ms: int | None
    stream: bool | None = None  # None: not said (the Accept header decides)
    options: RunOptions = RunOptions()
    images: tuple[Image, ...] = ()


@attrs.frozen
class ImageLimits:
    """How many images a request may carry, and how large each may be (decoded bytes)."""

    max_images: int = 4
    max_image_bytes: int = 5 * 1024 * 1024

    @classmethod
    def of(cls, settings: Any) -> ImageLimits:
        return cls(settings.max_images, settings.max_image_bytes)


# Standard base64, padded (what base64.b64decode(validate=True) accepts).
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# The first bytes of each image type the model reads.
_IMAGE_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}
# What a client may call a media type that is one of IMAGE_MEDIA_TYPES.
_MEDIA_TYPE_ALIASES = {"image/jpg": "image/jpeg"}
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)


def _sniffed_type(head: bytes) -> str | None:
    """The image type ``head`` (an image's first bytes) starts as, if one of ours."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for media_type, signatures in _IMAGE_SIGNATURES.items():
        if head.startswith(signatures):
            return media_type
    return None


def parse_image(media_type: object, data: object, field: str, limits: ImageLimits) -> Image:
    """One image: ``media_type`` one of png, jpeg, gif, webp and ``data`` its bytes in base64.

    A wrong type or bad base64 is a 400 naming ``field``; an image over
    ``limits.max_image_bytes`` a 413; bytes that are not an image of the type said a 400
    (the model API would refuse them mid-turn).
    """
    if not isinstance(media_type, str):
        raise BadRequest(
            f"{field}: the media type must be one of " + ", ".join(IMAGE_MEDIA_TYPES), param=field
        )
    kind = media_type.strip().lower()
    kind = _MEDIA_TYPE_ALIASES.get(kind, kind)
    if kind not in IMAGE_MEDIA_TYPES:
        raise BadRequest(
            f"{field}: media type {media_type[:80]!r} is not accepted; accepted: "
            + ", ".join(IMAGE_MEDIA_TYPES),
            param=field,
        )
    if not isinstance(data, str) or not data:
        raise BadRequest(
            f"{field}: the image's data must be a non-empty base64 string", param=field
        )
    # A quick bound before decoding: base64 has 4 characters per 3 bytes.
    if len(data) > 4 * -(-limits.max_image_bytes // 3) + 4:
        raise BadRequest(
            f"{field}: the image exceeds {limits.max_image_bytes} bytes", 413, param=field
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: the image's data is not valid base64", param=field) from None
    if len(raw) > limits.max_image_bytes:
        raise BadRequest(
            f"{field}: the image exceeds {limits.max_image_bytes} bytes", 413, param=field
        )
    sniffed = _sniffed_type(raw[:16])
    if sniffed != kind:
        found = f"it looks like {sniffed}" if sniffed else "it is not an image the model reads"
        raise BadRequest(f"{field}: the data is not an {kind} image ({found})", param=field)
    return Image(kind, data)


def parse_image_url(url: object, field: str, limits: ImageLimits) -> Image:
    """An image given as a URL: only ``data:<type>;base64,<data>`` is accepted.

    A remote ``http(s)`` URL is a 400: the service fetches nothing on a user's behalf.
    """
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{field}: expected a data: URL (data:image/png;base64,...)", param=field)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        raise BadRequest(
            f"{field}: remote image URLs are not fetched (the service fetches nothing on a"
            " user's behalf); send the image inline as a data: URL (data:image/png;base64,...)",
            param=field,
        )
    match = _DATA_URL.match(url)
    if match is None or "base64" not in (p.strip().lower() for p in match.group(2).split(";")):
        raise BadRequest(
            f"{field}: expected a base64 data: URL (data:image/png;base64,...)", param=field
        )
    return parse_image(match.group(1), url[match.end() :], field, limits)


def check_image_count(count: int, limits: ImageLimits, field: str = "images") -> None:
    if count > limits.max_images:
        raise BadRequest(
            f"{field}: at most {limits.max_images} images per request (MAX_IMAGES), got {count}",
            param=field,
        )


def parse_run_images(obj: dict[str, Any], limits: ImageLimits) -> tuple[Image, ...]:
    """``images`` of a ``POST /run`` body: ``[{"mediaType", "data"}]``; null or absent: none."""
    value = obj.get("images")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest(
            'images: expected a list of {"mediaType": "image/png", "data": "<base64>"} objects'
        )
    check_image_count(len(value), limits)
    images = []
    for index, item in enumerate(value):
        field = f"images[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f'{field}: expected an object {{"mediaType", "data"}}')
        images.append(parse_image(item.get("mediaType"), item.get("data"), field, limits))
    return tuple(images)


# A system prompt travels as one process argument (Linux: at most 128 KiB each).
MAX_SYSTEM_PROMPT_BYTES = 100_000
MAX_TOOL_NAMES = 100
MAX_TOOL_NAME_CHARS = 200
# White space as Python's str.strip() and str.isspace() see it, spelled out: regular
# expression engines disagree on \s (ECMA-262's, which OpenAPI documents use, has U+FEFF
# and lacks U+001C-U+001F and U+0085), so the patterns below name the characters.
WHITE_SPACE = r"\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A prompt that is not only white space (it is stripped to tell).
PROMPT_PATTERN = f"[^{WHITE_SPACE}]"
# A tool name or rule: not only white space, no ',' (the CLI takes them comma-separated),
# no control characters or line separators (it travels as a process argument).
_NOT_IN_TOOL_NAME = r",\x00-\x1f\x7f-\x9f\u2028\u2029"
TOOL_NAME_PATTERN = (
    f"^[^{_NOT_IN_TOOL_NAME}]*[^{WHITE_SPACE}{_NOT_IN_TOOL_NAME}][^{_NOT_IN_TOOL_NAME}]*$"
)
_TOOL_NAME = re.compile(TOOL_NAME_PATTERN)
MAX_MODEL_NAME_CHARS = 200
MAX_TURNS = 1_000_000
MAX_BUDGET_USD = 1_000_000.0


# Defaults of common clients that send JSON without saying so (curl -d, fetch with a
# string body). The original service accepts any type; we accept these and JSON.
LENIENT_MEDIA_TYPES = frozenset(
    {"application/json", "text/plain", "application/x-www-form-urlencoded"}
)


def check_content_type(content_type: str | None) -> None:
    """Refuse, with 415, a body that says it is something other than JSON."""
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in LENIENT_MEDIA_TYPES and not media_type.endswith("+json"):
        raise BadRequest(f"Content-Type must be application/json, got {media_type!r}", 415)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"Invalid JSON: duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"Invalid JSON: {name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):  # e.g. 1e400: too large for a float
        raise BadRequest(f"Invalid JSON: number {literal[:40]} is out of range")
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a UTF-8 JSON object strictly: no duplicate keys, NaN or Infinity."""
    if not body.strip():
        raise BadRequest("Request body is empty: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Request body is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except BadRequest:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert.
        raise BadRequest(f"Invalid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"Request body must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def session_id_field(obj: dict[str, Any], *, required: bool) -> str | None:
    value = obj.get("sessionId")
    if value is None:
        if required:
            raise BadRequest("sessionId: required, a string of " + SESSION_ID_RULE)
        return None
    if not isinstance(value, str) or not SESSION_ID_PATTERN.fullmatch(value):
        raise BadRequest(f"sessionId: expected {SESSION_ID_RULE}")
    return value


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_OFFSET = 10**9


class QueryArguments(Protocol):
    """A query string's arguments (werkzeug's ``MultiDict``): every value of a name."""

    def getlist(self, key: str) -> list[str]: ...


def page_arguments(args: QueryArguments) -> tuple[int, int]:
    """``?limit=&offset=`` of a paged list: ``limit`` 1..1000 (default 100), ``offset`` >= 0.

    Each given at most once, as a whole number (an empty one is not).
    """
    limit = _whole_argument(args, "limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    offset = _whole_argument(args, "offset", 0, 0, MAX_PAGE_OFFSET)
    return limit, offset


def _whole_argument(args: QueryArguments, name: str, default: int, low: int, high: int) -> int:
    values = args.getlist(name)
    if not values:
        return default
    raw = values[0]
    if len(values) > 1 or not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadRequest(f"{name}: expected one whole number from {low} to {high}")
    return int(raw)


def integral(value: Any) -> Any:
    """``value``, with a JSON number that has no fraction (``1000.0``, ``1e3``) as an int.

    JSON has numbers, not integers: JSON Schema (and so the OpenAPI document) counts
    1000.0 as the integer 1000, and so do the parsers.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_run_request(
    body: bytes,
    *,
    max_prompt_chars: int,
    max_timeout_ms: int,
    ceiling: OptionCeiling | None = None,
    image_limits: ImageLimits = ImageLimits(),
) -> RunRequest:
    """Validate a ``POST /run`` body: ``{"prompt", "sessionId"?, "timeoutMs"?, "stream"?,
    "images"?}`` and the options (:func:`parse_run_options`) within ``ceiling`` (None: no
    ceiling)."""
    obj = parse_json_object(body)
    prompt = obj.get("prompt")
    if prompt is None:
        raise BadRequest("prompt: required, a non-empty string")
    if not isinstance(prompt, str):
        raise BadRequest(f"prompt: expected a string, got {_json_type(prompt)}")
    if not prompt.strip():
        raise BadRequest("prompt: must not be empty")
    if len(prompt) > max_prompt_chars:
        raise BadRequest(f"prompt: exceeds {max_prompt_chars} characters")
    timeout_ms = integral(obj.get("timeoutMs"))
    if timeout_ms is not None and (
        isinstance(timeout_ms, bool)
        or not isinstance(timeout_ms, int)
        or not 1 <= timeout_ms <= max_timeout_ms
    ):
        raise BadRequest(f"timeoutMs: expected an integer from 1 to {max_timeout_ms}")
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, got {_json_type(stream)}")
    return RunRequest(
        prompt=prompt,
        session_id=session_id_field(obj, required=False),
        timeout_ms=timeout_ms,
        stream=stream,
        options=parse_run_options(obj, ceiling),
        images=parse_run_images(obj, image_limits),
    )


def parse_run_options(obj: dict[str, Any], ceiling: OptionCeiling | None) -> RunOptions:
    """The per-request options of a ``POST /run`` body; ``null`` is the same as absent.

    A wrong type or value is a 400 naming the field; a value outside the operator's
    ``ceiling`` a 400 naming the option and what is allowed. Empty lists and an empty
    system prompt ask for nothing.
    """
    model = obj.get("model")
    if model is not None:
        if not isinstance(model, str) or not model or not model.isprintable():
            raise BadRequest("model: expected a model name (a non-empty string)")
        if len(model) > MAX_MODEL_NAME_CHARS:
            raise BadRequest(f"model: exceeds {MAX_MODEL_NAME_CHARS} characters")
        if ceiling is not None and model not in ceiling.allowed_models:
            raise BadRequest(
                f"model: {model[:80]!r} is not allowed here; allowed: "
                + ", ".join(ceiling.allowed_models)
            )
    system_prompt = obj.get("systemPrompt")
    if system_prompt is not None:
        if not isinstance(system_prompt, str):
            raise BadRequest(f"systemPrompt: expected a string, got {_json_type(system_prompt)}")
        if _utf8_size("systemPrompt", system_prompt) > MAX_SYSTEM_PROMPT_BYTES:
            raise BadRequest(f"systemPrompt: exceeds {MAX_SYSTEM_PROMPT_BYTES} bytes")
        if "\x00" in system_prompt:
            raise BadRequest("systemPrompt: must not contain NUL characters")
    max_turns = integral(obj.get("maxTurns"))
    if max_turns is not None:
        if isinstance(max_turns, bool) or not isinstance(max_turns, int):
            raise BadRequest(f"maxTurns: expected a whole number, got {_json_type(max_turns)}")
        if not 1 <= max_turns <= MAX_TURNS:
            raise BadRequest(f"maxTurns: expected a whole number from 1 to {MAX_TURNS}")
        if ceiling is not None and ceiling.max_turns is not None and max_turns > ceiling.max_turns:
            raise BadRequest(f"maxTurns: at most {ceiling.max_turns} allowed here")
    budget = obj.get("maxBudgetUsd")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise BadRequest(f"maxBudgetUsd: expected a number, got {_json_type(budget)}")
        if not 0 < budget <= MAX_BUDGET_USD:
            raise BadRequest(f"maxBudgetUsd: expected a number above 0, at most {MAX_BUDGET_USD:g}")
        if (
            ceiling is not None
            and ceiling.max_budget_usd is not None
            and budget > ceiling.max_budget_usd
        ):
            raise BadRequest(f"maxBudgetUsd: at most {ceiling.max_budget_usd:g} allowed here")
    mode = obj.get("permissionMode")
    if mode is not None:
        if not isinstance(mode, str) or mode not in PERMISSION_MODES:
            raise BadRequest("permissionMode: expected one of " + ", ".join(PERMISSION_MODES))
        if ceiling is not None and mode not in ceiling.allowed_permission_modes:
            raise BadRequest(
                f"permissionMode: {mode!r} is not allowed here; allowed: "
                + ", ".join(ceiling.allowed_permission_modes)
                + " (a request without permissionMode runs with bypassPermissions)"
            )
    return RunOptions(
        model=model,
        system_prompt=system_prompt or None,
        allowed_tools=_tool_names(obj, "allowedTools"),
        disallowed_tools=_tool_names(obj, "disallowedTools"),
        max_turns=max_turns,
        max_budget_usd=None if budget is None else float(budget),
        permission_mode=mode,
    )


def _utf8_size(field: str, text: str) -> int:
    """``text``'s size in UTF-8; a lone surrogate (JSON lets one be written) is a 400."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{field}: not valid Unicode text (a lone surrogate)") from None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tool_names(obj: dict[str, Any], field: str) -> tuple[str, ...] | None:
    """A list of tool names (or rules such as ``Bash(git:*)``); None when absent or empty."""
    value = obj.get(field)
    if value is None:
        return None
    rule = (
        f"{field}: expected a list of at most {MAX_TOOL_NAMES} tool names"
        f" (strings of at most {MAX_TOOL_NAME_CHARS} characters, not only white space,"
        " with no ',' or control characters)"
    )
    if not isinstance(value, list) or len(value) > MAX_TOOL_NAMES:
        raise BadRequest(rule)
    for name in value:
        if (
            not isinstance(name, str)
            or len(name) > MAX_TOOL_NAME_CHARS
            or not _TOOL_NAME.fullmatch(name)
            or not _is_unicode(name)  # a lone surrogate (JSON lets one be written)
        ):
            raise BadRequest(rule)
    return tuple(dict.fromkeys(value)) or None


# CODE#STATE as parse_exchange_code reads it: text before and after the last "#", white
# space around the whole ignored.
CODE_PATTERN = f"^[{WHITE_SPACE}]*[^{WHITE_SPACE}][\\s\\S]*#[^#]*[^#{WHITE_SPACE}][{WHITE_SPACE}]*$"
INVALID_CODE_FORMAT = "Invalid code format. Expected CODE#STATE from the callback page."
MAX_CODE_CHARS = 4096


def parse_exchange_code(body: bytes) -> tuple[str, str]:
    """Validate a ``POST /auth/exchange`` body ``{"code": "CODE#STATE"}``; ``(code, state)``.

    The state is ours (base64url, no ``#``), so the text splits at its last ``#``;
    whitespace around what was pasted is ignored.
    """
    obj = parse_json_object(body)
    pasted = obj.get("code")
    if pasted is None:
        raise BadRequest("code: required, the CODE#STATE the callback page shows")
    if not isinstance(pasted, str):
        raise BadRequest(f"code: expected a string, got {_json_type(pasted)}")
    if len(pasted) > MAX_CODE_CHARS:
        raise BadRequest(f"code: exceeds {MAX_CODE_CHARS} characters")
    code, hash_sign, state = pasted.strip().rpartition("#")
    if not (hash_sign and code and state):
        raise BadRequest(INVALID_CODE_FORMAT)
    return code, state


def parse_user_claude_request(body: bytes, *, max_bytes: int) -> str:
    """Validate a ``PUT /user-claude`` body: ``{"content": string}``, at most ``max_bytes`` in UTF-8.

    Over the bound is a 413, as for a body too large.
    """
    obj = parse_json_object(body)
    content = obj.get("content")
    if content is None:
        raise BadRequest('content: required, a string (the CLAUDE.md text; "" removes it)')
    if not isinstance(content, str):
        raise BadRequest(f"content: expected a string, got {_json_type(content)}")
    if _utf8_size("content", content) > max_bytes:
        raise BadRequest(f"content: exceeds {max_bytes} bytes ({max_bytes // 1024} KiB)", 413)
    return content
