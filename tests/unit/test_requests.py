"""Unit tests of what the service accepts from outside: request bodies, Content-Type
and API keys. Pure functions, no I/O. Configuration is tested in ``test_config.py``.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import string
import sys
from urllib.parse import parse_qsl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers, MultiDict

from claude_code_api.config.settings import Settings, parse_api_keys
from claude_code_api.http.auth import Unauthorized, authenticate
from claude_code_api.http.requests import (
    WHITE_SPACE,
    BadRequest,
    RunRequest,
    check_content_type,
    page_arguments,
    parse_json_object,
    parse_run_request,
)

MAX_PROMPT = 50
MAX_TIMEOUT = 10_000


def parse(body: bytes | str) -> RunRequest:
    if isinstance(body, str):
        body = body.encode()
    return parse_run_request(body, max_prompt_chars=MAX_PROMPT, max_timeout_ms=MAX_TIMEOUT)


def rejection(body: bytes | str) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse(body)
    return caught.value


# --- request bodies ------------------------------------------------------------------


def test_minimal_body():
    assert parse('{"prompt": "hello"}') == RunRequest("hello", None, None)


def test_full_body():
    body = {"prompt": "hi", "sessionId": "a.B_9:-", "timeoutMs": MAX_TIMEOUT, "extra": [1]}
    assert parse(json.dumps(body)) == RunRequest("hi", "a.B_9:-", MAX_TIMEOUT)


def test_nulls_mean_absent():
    assert parse('{"prompt": "hi", "sessionId": null, "timeoutMs": null}') == RunRequest(
        "hi", None, None
    )


def test_bounds_are_inclusive():
    body = {"prompt": "x" * MAX_PROMPT, "sessionId": "s" * 128, "timeoutMs": 1}
    assert parse(json.dumps(body)) == RunRequest("x" * MAX_PROMPT, "s" * 128, 1)


def test_a_whole_number_written_with_a_fraction_is_a_whole_number():
    # JSON has numbers, not integers; JSON Schema (and so the OpenAPI document) agrees.
    assert parse('{"prompt": "a", "timeoutMs": 1000.0}').timeout_ms == 1000
    assert isinstance(parse('{"prompt": "a", "timeoutMs": 1e3}').timeout_ms, int)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", (100, 0)),
        ("limit=5", (5, 0)),
        ("limit=1000&offset=7", (1000, 7)),
        ("offset=0", (100, 0)),
    ],
)
def test_page_arguments(query, expected):
    assert page_arguments(MultiDict(parse_qsl(query, keep_blank_values=True))) == expected


@pytest.mark.parametrize(
    "query",
    [
        "limit=",
        "offset=",
        "limit=0",
        "limit=1001",
        "limit=1&limit=2",
        "offset=-1",
        "limit=+5",
        "limit=1.0",
        "offset=%C2%B2",
    ],
)
def test_bad_page_arguments_are_a_400_naming_the_argument(query):
    with pytest.raises(BadRequest) as caught:
        page_arguments(MultiDict(parse_qsl(query, keep_blank_values=True)))
    assert caught.value.message.startswith(query.split("=")[0] + ": expected one whole number")


def test_prompt_with_non_ascii_text():
    assert parse('{"prompt": "h\\u00e9llo \\ud83d\\ude00"}').prompt == "héllo 😀"
    assert parse(json.dumps({"prompt": "héllo 😀"}, ensure_ascii=False)).prompt == "héllo 😀"


BAD_BODIES = [
    # (id, body, message fragment)
    ("empty", b"", "Request body is empty"),
    ("whitespace", b" \r\n\t ", "Request body is empty"),
    ("invalid-utf8", b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
    ("truncated-utf8", b'{"prompt": "\xe2\x82"}', "not valid UTF-8"),
    ("invalid-json", b'{"prompt": "hi",}', "Invalid JSON"),
    ("not-json", b"prompt=hello", "Invalid JSON"),
    ("unterminated", b'{"prompt": "hi"', "Invalid JSON"),
    ("trailing-garbage", b'{"prompt": "hi"} x', "Invalid JSON"),
    ("two-objects", b'{"prompt": "a"}{"prompt": "b"}', "Invalid JSON"),
    ("single-quotes", b"{'prompt': 'hi'}", "Invalid JSON"),
    ("array", b'[{"prompt": "hi"}]', "must be a JSON object, got array"),
    ("string", b'"hi"', "must be a JSON object, got string"),
    ("number", b"42", "must be a JSON object, got number"),
    ("float", b"4.2", "must be a JSON object, got number"),
    ("null", b"null", "must be a JSON object, got null"),
    ("true", b"true", "must be a JSON object, got boolean"),
    ("duplicate-key", b'{"prompt": "a", "prompt": "b"}', "duplicate key 'prompt'"),
    ("duplicate-nested", b'{"prompt": "a", "x": {"k": 1, "k": 2}}', "duplicate key 'k'"),
    ("NaN", b'{"prompt": "a", "timeoutMs": NaN}', "NaN is not a JSON number"),
    ("Infinity", b'{"prompt": "a", "timeoutMs": Infinity}', "Infinity is not a JSON number"),
    ("-Infinity", b'{"prompt": "a", "x": [-Infinity]}', "-Infinity is not a JSON number"),
    ("huge-int", b'{"prompt": "a", "timeoutMs": 1' + b"0" * 5000 + b"}", "Invalid JSON"),
    ("deep-nesting", b'{"prompt": "a", "x": ' + b"[" * 100_000, "Invalid JSON"),
    ("prompt-missing", b'{"sessionId": "s"}', "prompt: required"),
    ("prompt-null", b'{"prompt": null}', "prompt: required"),
    ("prompt-number", b'{"prompt": 1}', "prompt: expected a string, got number"),
    ("prompt-bool", b'{"prompt": true}', "prompt: expected a string, got boolean"),
    ("prompt-array", b'{"prompt": ["hi"]}', "prompt: expected a string, got array"),
    ("prompt-object", b'{"prompt": {"text": "hi"}}', "prompt: expected a string, got object"),
    ("prompt-empty", b'{"prompt": ""}', "prompt: must not be empty"),
    ("prompt-blank", b'{"prompt": " \\n\\t "}', "prompt: must not be empty"),
    ("prompt-too-long", b'{"prompt": "' + b"x" * (MAX_PROMPT + 1) + b'"}', "prompt: exceeds 50"),
    ("timeout-true", b'{"prompt": "a", "timeoutMs": true}', "timeoutMs: expected an integer"),
    ("timeout-false", b'{"prompt": "a", "timeoutMs": false}', "timeoutMs: expected an integer"),
    ("timeout-fraction", b'{"prompt": "a", "timeoutMs": 1.5}', "timeoutMs: expected an integer"),
    ("timeout-negative", b'{"prompt": "a", "timeoutMs": -1}', "timeoutMs: expected an integer"),
    ("timeout-zero", b'{"prompt": "a", "timeoutMs": 0}', "timeoutMs: expected an integer"),
    ("timeout-too-big", b'{"prompt": "a", "timeoutMs": 10001}', "timeoutMs: expected an integer"),
    ("timeout-huge", b'{"prompt": "a", "timeoutMs": 1' + b"0" * 4000 + b"}", "timeoutMs:"),
    ("timeout-string", b'{"prompt": "a", "timeoutMs": "1000"}', "timeoutMs: expected an integer"),
    ("timeout-array", b'{"prompt": "a", "timeoutMs": [1000]}', "timeoutMs: expected an integer"),
    ("session-empty", b'{"prompt": "a", "sessionId": ""}', "sessionId: expected"),
    ("session-space", b'{"prompt": "a", "sessionId": "a b"}', "sessionId: expected"),
    ("session-slash", b'{"prompt": "a", "sessionId": "../etc"}', "sessionId: expected"),
    ("session-unicode", b'{"prompt": "a", "sessionId": "caf\\u00e9"}', "sessionId: expected"),
    ("session-newline", b'{"prompt": "a", "sessionId": "abc\\n"}', "sessionId: expected"),
    ("session-nul", b'{"prompt": "a", "sessionId": "a\\u0000b"}', "sessionId: expected"),
    ("session-escape", b'{"prompt": "a", "sessionId": "a\\u001bb"}', "sessionId: expected"),
    ("session-too-long", b'{"prompt": "a", "sessionId": "' + b"s" * 129 + b'"}', "sessionId:"),
    ("session-number", b'{"prompt": "a", "sessionId": 12}', "sessionId: expected"),
    ("session-object", b'{"prompt": "a", "sessionId": {}}', "sessionId: expected"),
]


@pytest.mark.parametrize(
    ("body", "fragment"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
def test_bad_body_is_a_400_naming_what_is_wrong(body, fragment):
    error = rejection(body)
    assert error.status == 400
    assert fragment in error.message
    assert str(error) == error.message
    assert len(error.message) <= 300  # never echoes a whole huge body


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # A lone surrogate (JSON lets one be written): a prompt takes it, as it always did;
        # a field that travels as a process argument or a name refuses it, naming itself.
        ({"prompt": "a\ud800"}, None),
        ({"sessionId": "a\ud800"}, "sessionId: expected 1 to 128 characters"),
        ({"systemPrompt": "a\ud800"}, "systemPrompt: not valid Unicode text (a lone surrogate)"),
        ({"allowedTools": ["a\ud800"]}, "allowedTools: expected a list of at most 100"),
        ({"model": "a\ud800"}, "model: expected a model name (a non-empty string)"),
        # Every refusal names the field, and says what it got where it helps.
        ({"images": [{}] * 5}, "images: at most 4 images per request (MAX_IMAGES), got 5"),
        ({"images": [{"mediaType": "image/png"}]}, "images[0]: the image's data must be"),
        ({"images": ["x"]}, 'images[0]: expected an object {"mediaType", "data"}'),
        ({"images": {}}, 'images: expected a list of {"mediaType": "image/png", "data"'),
        ({"stream": "yes"}, "stream: expected true or false, got string"),
        ({"maxBudgetUsd": 2e6}, "maxBudgetUsd: expected a number above 0, at most 1e+06"),
        ({"model": "m" * 201}, "model: exceeds 200 characters"),
    ],
    ids=repr,
)
def test_each_field_names_itself_in_its_refusal(fields, message):
    body = json.dumps({"prompt": "hi", **fields}).encode()
    if message is None:
        assert parse(body).prompt == fields["prompt"]
    else:
        assert rejection(body).message.startswith(message)


def test_json_errors_do_not_reach_the_field_checks():
    # A body with both a JSON error and a bad field reports the JSON error.
    assert rejection(b'{"prompt": 1, "prompt": 2}').message.startswith("Invalid JSON")


def test_overflowing_number_is_not_decoded_as_infinity():
    with pytest.raises(BadRequest):
        parse_json_object(b'{"prompt": "a", "x": 1e400}')


# --- Content-Type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        " application/json ;charset=UTF-8",
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "application/vnd.api+json",
        "application/problem+json; charset=utf-8",
    ],
)
def test_content_types_accepted(content_type):
    check_content_type(content_type)


@pytest.mark.parametrize(
    ("content_type", "media_type"),
    [
        ("multipart/form-data; boundary=----x", "multipart/form-data"),
        ("application/xml", "application/xml"),
        ("text/xml; charset=utf-8", "text/xml"),
        ("text/html", "text/html"),
        ("application/octet-stream", "application/octet-stream"),
        ("Application/XML", "application/xml"),
    ],
)
def test_content_types_refused_with_415(content_type, media_type):
    with pytest.raises(BadRequest) as caught:
        check_content_type(content_type)
    assert caught.value.status == 415
    assert "Content-Type must be application/json" in caught.value.message
    assert repr(media_type) in caught.value.message


# --- properties --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Field values near the edges of what /run accepts, valid or just not.
prompts = (
    st.text(max_size=MAX_PROMPT + 5)
    | st.text(alphabet=" \t\n\r\x0b\x0c\u3000", min_size=1, max_size=4)  # blank
    | st.integers(MAX_PROMPT - 1, MAX_PROMPT + 1).map(lambda n: "p" * n)
    | json_values
)
session_ids = (
    st.from_regex(r"[A-Za-z0-9._:-]{0,130}", fullmatch=True)
    # Valid but for one character.
    | st.tuples(st.text(alphabet="aZ09._:-", max_size=127), st.sampled_from("/ \n\x00é+")).map(
        "".join
    )
    | json_values
)
timeouts = st.integers(-2, MAX_TIMEOUT + 2) | json_values
# Objects shaped like /run bodies, so that the field checks are reached often.
run_like_bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompt": prompts,
        "sessionId": session_ids,
        "timeoutMs": timeouts,
        "userId": json_values,
    },
)
any_json = run_like_bodies | json_values


SESSION_ID_CHARS = frozenset(string.ascii_letters + string.digits + "._:-")


def valid_session_id(value) -> bool:
    """The documented rule, written without the module's regex so that it checks it."""
    return isinstance(value, str) and 1 <= len(value) <= 128 and set(value) <= SESSION_ID_CHARS


def check_invariants(result: RunRequest) -> None:
    assert isinstance(result.prompt, str)
    assert result.prompt.strip()
    assert len(result.prompt) <= MAX_PROMPT
    assert result.session_id is None or valid_session_id(result.session_id)
    assert result.timeout_ms is None or (
        type(result.timeout_ms) is int and 1 <= result.timeout_ms <= MAX_TIMEOUT
    )


def parse_or_reject(body: bytes) -> RunRequest | None:
    """Either a valid RunRequest or BadRequest (400/415); any other exception fails the test."""
    try:
        result = parse(body)
    except BadRequest as error:
        assert error.status in (400, 415)
        assert isinstance(error.message, str) and error.message
        return None
    check_invariants(result)
    return result


def has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    return False


def acceptable(value) -> bool:
    """The specification of a valid /run body, written independently of the parser."""
    if not isinstance(value, dict) or has_non_finite(value):
        return False
    prompt, session, timeout = value.get("prompt"), value.get("sessionId"), value.get("timeoutMs")
    return bool(
        isinstance(prompt, str)
        and prompt.strip() != ""
        and len(prompt) <= MAX_PROMPT
        and (session is None or valid_session_id(session))
        and (timeout is None or (type(timeout) is int and 1 <= timeout <= MAX_TIMEOUT))
    )


PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_parsed_or_rejected(body):
    parse_or_reject(body)


@PROPERTY_SETTINGS
@given(any_json, st.integers(0, 10_000), st.binary(max_size=4))
def test_corrupted_json_is_parsed_or_rejected(value, at, noise):
    body = json.dumps(value).encode()
    at %= len(body) + 1
    parse_or_reject(body[:at] + noise + body[at:])


@PROPERTY_SETTINGS
@given(any_json, st.booleans())
def test_json_values_are_accepted_exactly_when_valid(value, ensure_ascii):
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate written raw is not UTF-8: the body must be refused.
        assert parse_or_reject(text.encode("utf-8", "surrogatepass")) is None
        return
    result = parse_or_reject(body)
    assert (result is not None) == acceptable(value)
    if result is not None:
        assert result == RunRequest(value["prompt"], value.get("sessionId"), value.get("timeoutMs"))


@PROPERTY_SETTINGS
@given(prompts, st.none() | session_ids, st.none() | timeouts)
def test_run_fields_are_accepted_exactly_when_valid(prompt, session_id, timeout_ms):
    value = {"prompt": prompt, "sessionId": session_id, "timeoutMs": timeout_ms}
    result = parse_or_reject(json.dumps(value).encode())
    assert (result is not None) == acceptable(value)
    if result is not None:
        assert result == RunRequest(prompt, session_id, timeout_ms)


# --- authentication ------------------------------------------------------------------------

KEYS = Settings(api_keys=parse_api_keys("sk-plain, alice:sk-alice,bob:sk-bob"))


@pytest.mark.parametrize(
    ("headers", "user_id"),
    [
        ({"x-api-key": "sk-plain"}, "api"),
        ({"x-api-key": "sk-alice"}, "alice"),
        ({"x-api-key": "sk-bob"}, "bob"),
        ({"authorization": "Bearer sk-alice"}, "alice"),
        ({"authorization": "bearer sk-bob"}, "bob"),
        ({"authorization": "BEARER   sk-plain  "}, "api"),
        # An empty x-api-key is as good as none: the bearer token decides.
        ({"x-api-key": "", "authorization": "Bearer sk-bob"}, "bob"),
        # The user id comes from the key, never from anything the caller claims.
        ({"x-api-key": "sk-bob", "x-user-id": "alice", "userid": "alice"}, "bob"),
    ],
)
def test_valid_keys_authenticate_as_their_user(headers, user_id):
    assert authenticate(headers, KEYS) == user_id


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        # No credentials at all: the original's words.
        ({}, "Missing API key"),
        ({"x-api-key": ""}, "Missing API key"),
        ({"x-api-key": "", "authorization": ""}, "Missing API key"),
        ({"authorization": "  "}, "Missing API key"),
        ({"x-user-id": "alice"}, "Missing API key"),
        ({"x-api-key": "sk-wrong"}, "Invalid API key"),
        ({"x-api-key": "alice:sk-alice"}, "Invalid API key"),
        ({"x-api-key": "sk-alic"}, "Invalid API key"),
        ({"x-api-key": "sk-alice "}, "Invalid API key"),
        # x-api-key is checked first; a valid bearer token does not rescue a wrong key.
        ({"x-api-key": "sk-wrong", "authorization": "Bearer sk-alice"}, "Invalid API key"),
        ({"authorization": "Bearer sk-wrong"}, "Invalid or expired token"),
        ({"authorization": "Bearer "}, "Missing authorization token"),
        ({"authorization": "Bearer"}, "Missing authorization token"),
        ({"authorization": "sk-alice"}, "Missing authorization token"),
        ({"authorization": "Basic c2stYWxpY2U6"}, "Missing authorization token"),
        ({"authorization": "Token sk-alice"}, "Missing authorization token"),
    ],
)
def test_bad_credentials_are_unauthorized(headers, message):
    with pytest.raises(Unauthorized) as caught:
        authenticate(headers, KEYS)
    assert caught.value.message == message


def test_header_names_are_case_insensitive_as_the_server_gives_them():
    assert authenticate(Headers({"X-API-Key": "sk-alice"}), KEYS) == "alice"
    assert authenticate(Headers({"Authorization": "Bearer sk-bob"}), KEYS) == "bob"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "sk-alice"},
        {"x-api-key": ""},
        {"authorization": "Bearer "},
        {"authorization": "Bearer sk-alice"},
        {"authorization": "Bearer anything"},
    ],
)
def test_without_api_keys_everyone_is_unauthorized(headers):
    with pytest.raises(Unauthorized):
        authenticate(headers, Settings())


def test_authenticate_sees_only_headers_and_settings():
    # The body (and a userId in it) cannot influence who the caller is (now_ms: the clock).
    assert list(inspect.signature(authenticate).parameters) == ["headers", "settings", "now_ms"]


def test_user_for_key():
    assert KEYS.user_for_key("sk-alice") == "alice"
    assert KEYS.user_for_key("") is None
    assert KEYS.user_for_key("sk-ALICE") is None
    assert KEYS.user_for_key("ünïcode") is None


def test_white_space_spelled_out_is_what_python_strips():
    # The documented patterns name white space instead of writing \s (see WHITE_SPACE).
    spelled = re.compile(f"[{WHITE_SPACE}]")
    every = (chr(code) for code in range(sys.maxunicode + 1))
    assert {c for c in every if spelled.fullmatch(c)} == {
        chr(code) for code in range(sys.maxunicode + 1) if chr(code).isspace()
    }
