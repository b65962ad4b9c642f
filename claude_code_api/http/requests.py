"""Parsing and validating request bodies: pure functions, no I/O.

Every way a body can be wrong becomes :class:`BadRequest` with the HTTP status
and a message naming the field, so no input a client can send reaches the
actors malformed or turns into a 500.

The native routes' bodies are declared once, below, as models (:mod:`.schema`):
``RunRequest`` (``POST /run``), ``SessionRef``, ``UserClaude`` and
``ExchangeRequest``. The same declaration validates a body and is the schema the
OpenAPI document shows (:func:`body_schemas`). A body is first decoded strictly
(:func:`parse_json_object`: UTF-8, no duplicate keys, no NaN or Infinity), then
validated against its model.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from typing import Annotated, Any, Protocol

import attrs
from pydantic import BaseModel, Field, StringConstraints

from ..config.ceiling import OptionCeiling as OptionCeiling  # (re-exported for the HTTP layer)
from ..config.settings import Settings
from ..messages import IMAGE_MEDIA_TYPES, PERMISSION_MODES, Image, RunOptions
from .schema import BadRequest as BadRequest  # (re-exported for the HTTP layer)
from .schema import (
    Integral,
    Says,
    Schema,
    body_model,
    checked,
    component_schemas,
    documented,
    json_type,
    validate,
)
from .schema import integral as integral  # (re-exported for the compatible routes)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SESSION_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -"


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
        raise BadRequest(f"Request body must be a JSON object, got {json_type(value)}")
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


# --- the bodies, declared once ---------------------------------------------------------------

MODEL_RULE = "expected a model name (a non-empty string)"
SESSION_ID = Annotated[
    str,
    StringConstraints(pattern=f"^{SESSION_ID_PATTERN.pattern}$"),
    Field(description="names a conversation within the caller's user id"),
]


@attrs.frozen
class RunBounds:
    """What bounds a ``POST /run`` body: the configuration's limits (None: no ceiling).

    ``default_timeout_ms`` only words the schema (what an absent ``timeoutMs`` means)."""

    max_prompt_chars: int
    max_timeout_ms: int
    ceiling: OptionCeiling | None = None
    images: ImageLimits = ImageLimits()
    default_timeout_ms: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> RunBounds:
        """The bounds the operator configured (the app's and the OpenAPI document's)."""
        return cls(
            settings.max_prompt_chars,
            settings.max_timeout_ms,
            OptionCeiling.of(settings),
            ImageLimits.of(settings),
            settings.default_timeout_ms,
        )


def _prompt(bound: int) -> Any:
    """A prompt: not only white space, at most ``bound`` characters. Checked here, not by
    pydantic's constraints, which refuse a lone surrogate (JSON lets one be written)."""

    def check(prompt: str) -> str:
        if not prompt.strip():
            raise BadRequest("prompt: must not be empty")
        if len(prompt) > bound:
            raise BadRequest(f"prompt: exceeds {bound} characters")
        return prompt

    return Annotated[
        str,
        # Not only white space (as the check strips it).
        documented(type="string", minLength=1, maxLength=bound, pattern=PROMPT_PATTERN),
        checked(check),
        Says("expected a string, got {got}", required="required, a non-empty string"),
    ]


def _timeout(bounds: RunBounds) -> Any:
    said = "deadline for queueing and running together"
    if bounds.default_timeout_ms is not None:
        said += f"; null or absent: {bounds.default_timeout_ms}"
    return Annotated[
        Annotated[int, Field(ge=1, le=bounds.max_timeout_ms), Integral] | None,
        Field(description=said),
        Says(f"expected an integer from 1 to {bounds.max_timeout_ms}"),
    ]


def _model(ceiling: OptionCeiling | None) -> Any:
    """A model name; with a ceiling, one of ``ALLOWED_MODELS``."""

    def check(model: str) -> str:
        if not model.isprintable():
            raise BadRequest(f"model: {MODEL_RULE}")
        if ceiling is not None and model not in ceiling.allowed_models:
            raise BadRequest(
                f"model: {model[:80]!r} is not allowed here; allowed: "
                + ", ".join(ceiling.allowed_models)
            )
        return model

    name: Any = Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_MODEL_NAME_CHARS), checked(check)
    ]
    if ceiling is not None:
        name = Annotated[name, documented(enum=list(ceiling.allowed_models))]
    return Annotated[
        name | None,
        Field(description="the model for this run (ALLOWED_MODELS; default CLAUDE_MODEL)"),
        Says(MODEL_RULE, when={"string_too_long": "exceeds {max_length} characters"}),
    ]


def _system_prompt() -> Any:
    def check(text: str) -> str:
        if len(text.encode("utf-8")) > MAX_SYSTEM_PROMPT_BYTES:
            raise BadRequest(f"systemPrompt: exceeds {MAX_SYSTEM_PROMPT_BYTES} bytes")
        return text

    return Annotated[
        Annotated[
            str,
            StringConstraints(max_length=MAX_SYSTEM_PROMPT_BYTES, pattern=r"^[^\x00]*$"),
            checked(check),
        ]
        | None,
        Field(
            description="appended to Claude Code's own system prompt; at most"
            f' {MAX_SYSTEM_PROMPT_BYTES} bytes in UTF-8, no NUL; "" asks for nothing'
        ),
        Says(
            "expected a string, got {got}",
            when={
                "string_too_long": f"exceeds {MAX_SYSTEM_PROMPT_BYTES} bytes",
                "string_pattern_mismatch": "must not contain NUL characters",
                "string_unicode": "not valid Unicode text (a lone surrogate)",
            },
        ),
    ]


def _limited(kind: type, low: dict[str, Any], high: float, limit: float | None) -> Any:
    """``kind`` from ``low`` to ``high``, or to the ceiling's ``limit`` when it is lower."""
    return Annotated[kind, Field(**low, le=high if limit is None else min(high, limit))]


def _max_turns(ceiling: OptionCeiling | None) -> Any:
    limit = None if ceiling is None else ceiling.max_turns
    range_rule = f"expected a whole number from 1 to {MAX_TURNS}"
    over = range_rule if limit is None or limit >= MAX_TURNS else "at most {le} allowed here"
    return Annotated[
        Annotated[_limited(int, {"ge": 1}, MAX_TURNS, limit), Integral] | None,
        Field(description="model round trips the agent may make (MAX_TURNS_LIMIT)"),
        Says(
            "expected a whole number, got {got}",
            when={"greater_than_equal": range_rule, "less_than_equal": over},
        ),
    ]


def _max_budget(ceiling: OptionCeiling | None) -> Any:
    limit = None if ceiling is None else ceiling.max_budget_usd
    range_rule = f"expected a number above 0, at most {MAX_BUDGET_USD:g}"
    over = range_rule if limit is None or limit >= MAX_BUDGET_USD else "at most {le:g} allowed here"
    return Annotated[
        _limited(float, {"gt": 0}, MAX_BUDGET_USD, limit) | None,
        Field(description="what the run may cost, in US dollars (MAX_BUDGET_USD_LIMIT)"),
        Says(
            "expected a number, got {got}",
            when={"greater_than": range_rule, "less_than_equal": over},
        ),
    ]


def _permission_mode(ceiling: OptionCeiling | None) -> Any:
    rule = "expected one of " + ", ".join(PERMISSION_MODES)
    allowed = PERMISSION_MODES if ceiling is None else ceiling.allowed_permission_modes

    def check(mode: str) -> str:
        if mode not in PERMISSION_MODES:
            raise BadRequest(f"permissionMode: {rule}")
        if mode not in allowed:
            raise BadRequest(
                f"permissionMode: {mode!r} is not allowed here; allowed: "
                + ", ".join(allowed)
                + " (a request without permissionMode runs with bypassPermissions)"
            )
        return mode

    return Annotated[
        Annotated[str, checked(check), documented(enum=list(allowed))] | None,
        Field(
            description="what the agent may do without asking (ALLOWED_PERMISSION_MODES);"
            " null or absent: bypassPermissions"
        ),
        Says(rule),
    ]


TOOL_NAME = Annotated[
    str,
    StringConstraints(max_length=MAX_TOOL_NAME_CHARS, pattern=TOOL_NAME_PATTERN),
    Field(description="a tool name or rule: Read, Bash(git:*)"),
]


def _tool_names(description: str) -> Any:
    """A list of tool names (or rules such as ``Bash(git:*)``); any fault, one rule."""
    return Annotated[
        Annotated[list[TOOL_NAME], Field(max_length=MAX_TOOL_NAMES)] | None,
        Field(description=description),
        Says(
            f"expected a list of at most {MAX_TOOL_NAMES} tool names (strings of at most"
            f" {MAX_TOOL_NAME_CHARS} characters, not only white space, with no ',' or"
            " control characters)"
        ),
    ]


def _option_fields(ceiling: OptionCeiling | None) -> dict[str, Any]:
    """The per-request options of ``POST /run`` (``null`` is the same as absent)."""
    return {
        "model": (_model(ceiling), None),
        "systemPrompt": (_system_prompt(), None),
        "maxTurns": (_max_turns(ceiling), None),
        "maxBudgetUsd": (_max_budget(ceiling), None),
        "permissionMode": (_permission_mode(ceiling), None),
        "allowedTools": (
            _tool_names("tools the agent may use without asking; [] asks for nothing"),
            None,
        ),
        "disallowedTools": (
            _tool_names("tools the agent may not use, beside the service's own list"),
            None,
        ),
    }


@functools.cache
def image_input_model(limits: ImageLimits) -> type[BaseModel]:
    """An image of a ``/run`` body. Its fields state the schema; the ``images`` field's
    validator checks each whole (:func:`parse_image`: its type, base64, size, first bytes)."""
    data = documented(
        type="string",
        minLength=4,
        maxLength=4 * -(-limits.max_image_bytes // 3),
        contentEncoding="base64",
        pattern=BASE64_PATTERN,
    )
    return body_model(
        "ImageInput",
        "An image: its bytes in base64, at most MAX_IMAGE_BYTES"
        f" ({limits.max_image_bytes}) decoded, of the type said (its first bytes"
        " are checked: else 400; too large: 413).",
        required=("mediaType", "data"),
        mediaType=(
            Annotated[object, documented(type="string", enum=list(IMAGE_MEDIA_TYPES))],
            None,
        ),
        data=(Annotated[object, data], None),
    )


def _images(limits: ImageLimits) -> Any:
    def check(items: list[Any]) -> tuple[Image, ...]:
        return tuple(
            parse_image(item.mediaType, item.data, f"images[{index}]", limits)
            for index, item in enumerate(items)
        )

    return Annotated[
        Annotated[
            list[image_input_model(limits)],  # type: ignore[misc]
            Field(max_length=limits.max_images),
            checked(check),
        ]
        | None,
        Field(
            description="images sent with the prompt, as image content blocks before its text"
            " (MAX_IMAGES at most)"
        ),
        Says(
            'expected a list of {{"mediaType": "image/png", "data": "<base64>"}} objects',
            when={
                "too_long": "at most {max_length} images per request (MAX_IMAGES), got"
                " {actual_length}",
                "model_type": 'expected an object {{"mediaType", "data"}}',
            },
            per_item=True,
        ),
    ]


@functools.cache
def run_request_model(bounds: RunBounds) -> type[BaseModel]:
    """The ``POST /run`` body within ``bounds``, its fields in the order they are checked."""
    return body_model(
        "RunRequest",
        "A run: the prompt, and what it may ask for within this service's ceilings.",
        prompt=(_prompt(bounds.max_prompt_chars), ...),
        timeoutMs=(_timeout(bounds), None),
        stream=(
            Annotated[
                bool | None,
                Field(
                    description="true: the reply is a text/event-stream of events; null or"
                    " absent: as the Accept header says (text/event-stream listed: a stream)"
                ),
                Says("expected true or false, got {got}"),
            ],
            None,
        ),
        sessionId=(
            Annotated[
                SESSION_ID | None,
                Field(description="continue this session's conversation (null: a one-shot run)"),
                Says(f"expected {SESSION_ID_RULE}"),
            ],
            None,
        ),
        **_option_fields(bounds.ceiling),
        images=(_images(bounds.images), None),
    )


@functools.cache
def run_options_model(ceiling: OptionCeiling | None) -> type[BaseModel]:
    """The options of ``POST /run`` alone (the compatible routes translate into them)."""
    return body_model("RunOptions", "A run's options.", **_option_fields(ceiling))


def _options_of(values: dict[str, Any]) -> RunOptions:
    def tools(name: str) -> tuple[str, ...] | None:
        names = values[name]
        return tuple(dict.fromkeys(names)) or None if names is not None else None

    return RunOptions(
        model=values["model"],
        system_prompt=values["systemPrompt"] or None,
        allowed_tools=tools("allowedTools"),
        disallowed_tools=tools("disallowedTools"),
        max_turns=values["maxTurns"],
        max_budget_usd=values["maxBudgetUsd"],
        permission_mode=values["permissionMode"],
    )


def parse_run_request(
    body: bytes,
    *,
    max_prompt_chars: int,
    max_timeout_ms: int,
    ceiling: OptionCeiling | None = None,
    image_limits: ImageLimits = ImageLimits(),
) -> RunRequest:
    """Validate a ``POST /run`` body (:func:`run_request_model`) within ``ceiling`` (None:
    no ceiling)."""
    bounds = RunBounds(max_prompt_chars, max_timeout_ms, ceiling, image_limits)
    values = validate(run_request_model(bounds), parse_json_object(body))
    return RunRequest(
        prompt=values["prompt"],
        session_id=values["sessionId"],
        timeout_ms=values["timeoutMs"],
        stream=values["stream"],
        options=_options_of(values),
        images=values["images"] or (),
    )


def parse_run_options(obj: dict[str, Any], ceiling: OptionCeiling | None) -> RunOptions:
    """The per-request options of a ``POST /run`` body; ``null`` is the same as absent.

    A wrong type or value is a 400 naming the field; a value outside the operator's
    ``ceiling`` a 400 naming the option and what is allowed. Empty lists and an empty
    system prompt ask for nothing.
    """
    return _options_of(validate(run_options_model(ceiling), obj))


SESSION_REF = body_model(
    "SessionRef",
    "A session of the caller's.",
    sessionId=(
        Annotated[
            SESSION_ID,
            Says(
                f"expected {SESSION_ID_RULE}", required=f"required, a string of {SESSION_ID_RULE}"
            ),
        ],
        ...,
    ),
)


def session_id_field(obj: dict[str, Any], *, required: bool) -> str | None:
    """The ``sessionId`` of a body (:data:`SESSION_REF`); absent or null is None unless
    ``required``."""
    if not required and obj.get("sessionId") is None:
        return None
    session_id: str = validate(SESSION_REF, obj)["sessionId"]
    return session_id


# CODE#STATE as parse_exchange_code reads it: text before and after the last "#", white
# space around the whole ignored.
CODE_PATTERN = f"^[{WHITE_SPACE}]*[^{WHITE_SPACE}][\\s\\S]*#[^#]*[^#{WHITE_SPACE}][{WHITE_SPACE}]*$"
INVALID_CODE_FORMAT = "Invalid code format. Expected CODE#STATE from the callback page."
MAX_CODE_CHARS = 4096


def _split_code(pasted: str) -> tuple[str, str]:
    """The state is ours (base64url, no ``#``), so the text splits at its last ``#``;
    whitespace around what was pasted is ignored. (A check, not a pydantic pattern: those
    refuse a lone surrogate, which the old parser let through to the token endpoint.)"""
    if len(pasted) > MAX_CODE_CHARS:
        raise BadRequest(f"code: exceeds {MAX_CODE_CHARS} characters")
    code, hash_sign, state = pasted.strip().rpartition("#")
    if not (hash_sign and code and state):
        raise BadRequest(INVALID_CODE_FORMAT)
    return code, state


EXCHANGE_REQUEST = body_model(
    "ExchangeRequest",
    "The code the OAuth callback page shows.",
    code=(
        Annotated[
            str,
            documented(
                type="string",
                maxLength=MAX_CODE_CHARS,
                pattern=CODE_PATTERN,
                description="the CODE#STATE the callback page shows",
            ),
            checked(_split_code),
            Says(
                "expected a string, got {got}",
                required="required, the CODE#STATE the callback page shows",
            ),
        ],
        ...,
    ),
)


def parse_exchange_code(body: bytes) -> tuple[str, str]:
    """Validate a ``POST /auth/exchange`` body ``{"code": "CODE#STATE"}``; ``(code, state)``."""
    split: tuple[str, str] = validate(EXCHANGE_REQUEST, parse_json_object(body))["code"]
    return split


@functools.cache
def user_claude_model(max_bytes: int) -> type[BaseModel]:
    """A ``PUT /user-claude`` body (and ``GET``'s reply): ``{"content"}``, at most
    ``max_bytes`` in UTF-8; over it a 413, as for a body too large."""

    def check(content: str) -> str:
        try:
            size = len(content.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadRequest("content: not valid Unicode text (a lone surrogate)") from None
        if size > max_bytes:
            raise BadRequest(f"content: exceeds {max_bytes} bytes ({max_bytes // 1024} KiB)", 413)
        return content

    # maxLength: a bound on characters that holds for any text within the byte bound.
    said = f'at most {max_bytes} bytes in UTF-8 (413 past it); "" removes it'
    return body_model(
        "UserClaude",
        "The caller's own CLAUDE.md.",
        content=(
            Annotated[
                str,
                documented(type="string", maxLength=max_bytes, description=said),
                checked(check),
                Says(
                    "expected a string, got {got}",
                    required='required, a string (the CLAUDE.md text; "" removes it)',
                ),
            ],
            ...,
        ),
    )


def parse_user_claude_request(body: bytes, *, max_bytes: int) -> str:
    """Validate a ``PUT /user-claude`` body (:func:`user_claude_model`)."""
    content: str = validate(user_claude_model(max_bytes), parse_json_object(body))["content"]
    return content


def body_schemas(bounds: RunBounds, max_claude_bytes: int) -> dict[str, Schema]:
    """The request bodies' schemas, for the OpenAPI document's components."""
    return component_schemas(
        run_request_model(bounds),
        SESSION_REF,
        user_claude_model(max_claude_bytes),
        EXCHANGE_REQUEST,
    )
