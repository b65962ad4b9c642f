"""The OpenAPI document against the app's routes, and the page that shows it.

What the running service answers is checked against the document by the
schemathesis pass (``tests/e2e/test_schemathesis.py``); here, without a server: the
document is valid OpenAPI 3.1, every route the app serves is in it and nothing
else is, its bounds follow the configuration, and ``/docs`` shows all of it
with nothing fetched from elsewhere.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import jsonschema_rs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from openapi_spec_validator import validate

from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.config.settings import load_settings
from claude_code_api.http.anthropic_api import parse_messages_request
from claude_code_api.http.app import create_app
from claude_code_api.http.docs import docs_page
from claude_code_api.http.jobs import Finished
from claude_code_api.http.observe import route_pattern
from claude_code_api.http.openai_api import limits_of, parse_chat_request
from claude_code_api.http.openapi import openapi_spec
from claude_code_api.http.requests import (
    BadRequest,
    OptionCeiling,
    RunBounds,
    body_schemas,
    parse_exchange_code,
    parse_run_request,
    parse_user_claude_request,
    session_id_field,
)
from claude_code_api.http.runs import result_body
from claude_code_api.http.streaming import event_data, terminal_frame
from claude_code_api.messages import (
    AssistantText,
    Job,
    JobFailed,
    JobStarted,
    Queued,
    RunResult,
    ToolResult,
    ToolUse,
    UpstreamError,
    UpstreamRetry,
)
from claude_code_api.store.user_memory import MAX_SAVED_BYTES

# Methods Quart answers for every route by itself (HEAD for GET, OPTIONS), which
# OpenAPI documents do not list.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
DOCUMENTED_METHODS = {"get", "put", "post", "delete", "patch"}


def served_routes(env: dict[str, str]) -> set[tuple[str, str]]:
    settings = load_settings(env)
    dispatcher, _ = trio.open_memory_channel(0)
    registry_inbox, _ = trio.open_memory_channel(0)
    app = create_app(settings, dispatcher, RegistryClient(registry_inbox))
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":  # Quart's own static folder (none here)
            continue
        for method in rule.methods or ():
            if method not in IMPLICIT_METHODS:
                routes.add((method.lower(), route_pattern(rule.rule)))
    return routes


def documented_routes(spec: dict) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in DOCUMENTED_METHODS
    }


@pytest.mark.parametrize("metrics", ["on", "off"])
def test_every_route_served_is_documented_and_nothing_else(metrics):
    env = {"METRICS": metrics}
    served = served_routes(env)
    documented = documented_routes(openapi_spec(load_settings(env)))
    assert served == documented
    assert (("get", "/metrics") in served) is (metrics == "on")
    # A sanity check that the comparison sees the routes at all.
    assert {("post", "/run"), ("get", "/docs"), ("get", "/openapi.json")} <= served


def test_the_document_is_valid_openapi_3_1():
    spec = openapi_spec(load_settings({}))
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_the_document_follows_the_configuration():
    spec = openapi_spec(load_settings({"MAX_TIMEOUT_MS": "60000", "DEFAULT_TIMEOUT_MS": "5000"}))
    timeout = spec["components"]["schemas"]["RunRequest"]["properties"]["timeoutMs"]
    assert timeout["anyOf"][0]["maximum"] == 60000
    assert "5000" in timeout["description"]


def test_every_operation_names_its_auth_and_every_authenticated_one_its_401():
    spec = openapi_spec(load_settings({}))
    public = {"/health", "/metrics", "/openapi.json", "/docs"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path in public:
                assert operation["security"] == [], (method, path)
            else:
                assert operation["security"], (method, path)
                assert "401" in operation["responses"], (method, path)
            # While the service stops, every route answers 503.
            assert "503" in operation["responses"], (method, path)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_the_docs_page_shows_every_route_and_schema_and_fetches_nothing():
    spec = openapi_spec(load_settings({}))
    page = _Page()
    page.feed(docs_page(spec))
    text = " ".join(page.text)
    for method, path in documented_routes(spec):
        assert re.search(rf"{method}\s*{re.escape(path)}", text, re.I), (method, path)
    anchors = {attrs.get("id") for _, attrs in page.tags}
    for name in spec["components"]["schemas"]:
        assert f"schema-{name}" in anchors
    # Self-contained: no script, stylesheet, image or frame, and links only within the service.
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "img", "iframe")]
    for _, attrs in page.tags:
        for name in ("src", "href"):
            target = attrs.get(name)
            assert target is None or "//" not in target, target


def test_the_docs_page_escapes_what_it_shows():
    spec = openapi_spec(load_settings({}))
    spec["paths"]["/run"]["post"]["summary"] = "<script>alert(1)</script>"
    assert "<script>" not in docs_page(spec)


# Characters on which regular expression dialects (ECMA-262's, which OpenAPI documents and
# schemathesis use, and Python's) or str.strip() disagree, and some that are plain.
TRICKY = "ab#é ,\t\n\x00\x1c\x1f\x7f\x85\xa0\u2028\u2029\u3000\ufeff"


def ecma_matches(pattern: str, text: str) -> bool:
    """Whether ``text`` matches ``pattern`` as JSON Schema reads it (ECMA-262)."""
    return jsonschema_rs.validator_for({"type": "string", "pattern": pattern}).is_valid(text)


def accepted(parse, body: dict) -> bool:
    try:
        parse(json.dumps(body).encode())
    except BadRequest:
        return False
    return True


def run_parser(body: bytes):
    return parse_run_request(body, max_prompt_chars=10, max_timeout_ms=1)


@given(st.text(alphabet=st.sampled_from(TRICKY), max_size=8))
def test_the_documented_code_pattern_is_what_the_parser_accepts(pasted):
    schema = openapi_spec(load_settings({}))["components"]["schemas"]["ExchangeRequest"]
    documented = ecma_matches(schema["properties"]["code"]["pattern"], pasted)
    assert documented == accepted(parse_exchange_code, {"code": pasted})


@given(st.text(alphabet=st.sampled_from(TRICKY), min_size=1, max_size=6))
def test_the_documented_prompt_pattern_is_what_the_parser_accepts(prompt):
    schema = openapi_spec(load_settings({}))["components"]["schemas"]["RunRequest"]
    documented = ecma_matches(schema["properties"]["prompt"]["pattern"], prompt)
    assert documented == accepted(run_parser, {"prompt": prompt})


@given(st.text(alphabet=st.sampled_from(TRICKY), max_size=6))
def test_the_documented_tool_name_pattern_is_what_the_parser_accepts(name):
    schema = openapi_spec(load_settings({}))["components"]["schemas"]["RunRequest"]
    tools = schema["properties"]["allowedTools"]["anyOf"][0]
    documented = ecma_matches(tools["items"]["pattern"], name)
    assert documented == accepted(run_parser, {"prompt": "a", "allowedTools": [name]})


# --- the document against the code that answers -------------------------------------------


def conforms(spec: dict, schema_name: str, instance: object) -> bool:
    """Whether ``instance`` is valid against the document's schema ``schema_name`` (as
    schemathesis checks it: JSON Schema 2020-12, ECMA-262 patterns)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    return jsonschema_rs.Draft202012Validator(schema).is_valid(instance)


CEILING_ENV = {
    "CLAUDE_MODEL": "model-a",
    "ALLOWED_MODELS": "model-b",
    "MAX_TURNS_LIMIT": "5",
    "MAX_BUDGET_USD_LIMIT": "1.5",
    "ALLOWED_PERMISSION_MODES": "plan,dontAsk",
}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"stream": True},
        {"stream": None, "sessionId": None, "timeoutMs": None},
        {"stream": "yes"},
        {"timeoutMs": 1000.0},
        {"timeoutMs": 1000.5},
        {"model": "model-a"},
        {"model": "model-b"},
        {"model": "model-c"},
        {"model": None},
        {"systemPrompt": ""},
        {"systemPrompt": "Be brief."},
        {"systemPrompt": "a\x00b"},
        {"systemPrompt": 3},
        {"allowedTools": []},
        {"allowedTools": ["Read", "Bash(git:*)", "Read", "données"]},
        {"allowedTools": ["a,b"]},
        {"allowedTools": [" "]},
        {"allowedTools": ["a\nb"]},
        {"allowedTools": ["a\u2028"]},
        {"allowedTools": ["x" * 201]},
        {"allowedTools": ["x"] * 101},
        {"disallowedTools": "Bash"},
        {"disallowedTools": ["WebFetch"]},
        {"maxTurns": 5},
        {"maxTurns": 5.0},
        {"maxTurns": 6},
        {"maxTurns": 0},
        {"maxTurns": True},
        {"maxBudgetUsd": 1.5},
        {"maxBudgetUsd": 1},
        {"maxBudgetUsd": 0},
        {"maxBudgetUsd": 1.6},
        {"permissionMode": "plan"},
        {"permissionMode": "bypassPermissions"},
        {"permissionMode": "nonsense"},
    ],
    ids=repr,
)
def test_a_run_body_is_valid_in_the_document_exactly_when_the_parser_accepts_it(fields):
    settings = load_settings(CEILING_ENV)
    spec = openapi_spec(settings)
    body = {"prompt": "hi", **fields}
    try:
        parse_run_request(
            json.dumps(body).encode(),
            max_prompt_chars=settings.max_prompt_chars,
            max_timeout_ms=settings.max_timeout_ms,
            ceiling=OptionCeiling.of(settings),
        )
        accepted = True
    except BadRequest:
        accepted = False
    assert conforms(spec, "RunRequest", body) == accepted


def a_job(session_id: str | None = None) -> Job:
    send, _ = trio.open_memory_channel(1)
    return Job("run-1", "alice", "hi", 10.0, 70.0, send, session_id=session_id)


RESULTS = [
    RunResult(
        success=True,
        output="Four.",
        duration_ms=1116,
        cost_usd=0.002,
        num_turns=1,
        usage={"input_tokens": 4, "output_tokens": 5},
        claude_session_id="c-1",
        model="claude-sonnet-4-6",
    ),
    RunResult(success=False, output="", duration_ms=3, cancelled=True),
    RunResult(
        success=False,
        output="part",
        duration_ms=60000,
        timed_out=True,
        output_truncated=True,
        upstream_error=UpstreamError(None, "unreachable", 3),
    ),
]


@pytest.mark.parametrize("result", RESULTS)
@pytest.mark.parametrize("session_id", [None, "s-1"])
def test_every_run_reply_conforms_and_every_field_it_has_is_documented(result, session_id):
    spec = openapi_spec(load_settings({}))
    body = result_body(result, Finished(result, started_at=10.5), a_job(session_id))
    assert conforms(spec, "RunResult", body)
    assert set(body) <= set(spec["components"]["schemas"]["RunResult"]["properties"])


def test_a_run_streams_the_documented_events():
    spec = openapi_spec(load_settings({}))
    ok = spec["paths"]["/run"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert "X-Run-Id" in ok["headers"]
    documented = {
        event["properties"]["event"]["const"]: event["properties"]["data"]["contentSchema"]
        for event in ok["content"]["text/event-stream"]["schema"]["oneOf"]
    }
    job = a_job()
    events = [
        Queued(0),
        JobStarted("w-1", at=10.25),
        AssistantText("hi"),
        ToolUse("Bash", {"command": "ls"}),
        ToolResult(True),
        UpstreamRetry(529, "overloaded", 1, 10),
        UpstreamRetry(None, "unreachable", 2),
    ]
    shown = set()
    for event in events:
        name, data = event_data(event, job)
        shown.add(name)
        assert conforms(spec, documented[name]["$ref"].rsplit("/", 1)[-1], data), name
    for terminal in (RESULTS[0], JobFailed(502, "the agent process died")):
        frame = terminal_frame(1, job, Finished(terminal), result_body).decode()
        name = re.search(r"^event: (\S+)$", frame, re.M)[1]
        data = json.loads(re.search(r"^data: (.*)$", frame, re.M)[1])
        shown.add(name)
        assert conforms(spec, documented[name]["$ref"].rsplit("/", 1)[-1], data), name
    # Every event the stream sends is documented, and nothing else is.
    assert shown == set(documented)


def test_cancelling_a_run_and_the_run_id_are_documented():
    spec = openapi_spec(load_settings({}))
    cancel = spec["paths"]["/runs/{runId}"]["delete"]
    assert [p["name"] for p in cancel["parameters"]] == ["runId"]
    assert {"200", "401", "404", "503"} <= set(cancel["responses"])
    failed = spec["paths"]["/run"]["post"]["responses"]["502"]
    assert "X-Run-Id" in failed["headers"]
    assert conforms(spec, "Error", {"error": "boom", "runId": "run-1"})
    status = spec["components"]["schemas"]["Status"]
    assert "runs" in status["required"]
    assert conforms(
        spec,
        "Run",
        {"runId": "r", "state": "running", "queuedAt": 1, "startedAt": 2, "sessionId": "s"},
    )


@pytest.mark.parametrize("metrics", ["on", "off"])
def test_every_operation_has_its_own_id_and_links_lead_to_operations(metrics):
    spec = openapi_spec(load_settings({"METRICS": metrics}))
    ids = [op["operationId"] for operations in spec["paths"].values() for op in operations.values()]
    assert len(ids) == len(set(ids))
    links = spec["paths"]["/run"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in links.values()} <= set(ids)


# --- the bodies: one declaration for the parser and the document ---------------------------


def test_the_request_bodies_in_the_document_are_the_parsers_own_declarations():
    settings = load_settings(CEILING_ENV)
    schemas = openapi_spec(settings)["components"]["schemas"]
    declared = body_schemas(RunBounds.of(settings), MAX_SAVED_BYTES)
    for name in ("RunRequest", "ImageInput", "SessionRef", "UserClaude", "ExchangeRequest"):
        assert schemas[name] == declared[name], name
    # The ceiling reaches the document through the declaration.
    options = schemas["RunRequest"]["properties"]
    assert options["model"]["anyOf"][0] == {"enum": ["model-a", "model-b"]}
    assert options["maxTurns"]["anyOf"][0]["maximum"] == 5
    assert options["maxBudgetUsd"]["anyOf"][0]["maximum"] == 1.5
    assert options["permissionMode"]["anyOf"][0] == {"enum": ["plan", "dontAsk"]}


def case_id(value: object) -> str:
    """A test's id that is the same in every process (a function's repr holds its address)."""
    return getattr(value, "__name__", None) or repr(value)


def session_parser(body: bytes) -> str | None:
    return session_id_field(json.loads(body), required=True)


@pytest.mark.parametrize(
    ("schema_name", "parse", "body"),
    [
        ("SessionRef", session_parser, {"sessionId": "s-1"}),
        ("SessionRef", session_parser, {"sessionId": "a" * 129}),
        ("SessionRef", session_parser, {"sessionId": "abc\n"}),
        ("SessionRef", session_parser, {"sessionId": 3}),
        ("SessionRef", session_parser, {}),
        ("ExchangeRequest", parse_exchange_code, {"code": "abc#def"}),
        ("ExchangeRequest", parse_exchange_code, {"code": "abc"}),
        ("ExchangeRequest", parse_exchange_code, {"code": "x" * 5000 + "#s"}),
        ("ExchangeRequest", parse_exchange_code, {"code": None}),
        ("UserClaude", lambda body: parse_user_claude_request(body, max_bytes=10), {"content": ""}),
        ("UserClaude", lambda body: parse_user_claude_request(body, max_bytes=10), {"content": 1}),
    ],
    ids=case_id,
)
def test_a_body_is_valid_in_the_document_exactly_when_its_parser_accepts_it(
    schema_name, parse, body
):
    spec = openapi_spec(load_settings({}))
    assert conforms(spec, schema_name, body) == accepted(parse, body)


def compat_parser(parse):
    settings = load_settings(CEILING_ENV)
    limits = limits_of(settings, OptionCeiling.of(settings))
    return lambda body: parse(body, None, limits)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": None},
        {"model": "model-c"},
        {"n": 1},
        {"n": 2},
        {"max_tokens": 5.0},
        {"max_tokens": 5.5},
        {"temperature": 1},
        {"temperature": True},
        {"stop": ["a"]},
        {"stop": 3},
        {"stream": "yes"},
        {"stream_options": {"include_usage": True}},
        {"stream_options": 1},
        {"session_id": "s-1"},
        {"session_id": "a b"},
        {"messages": []},
        {"messages": "hi"},
    ],
    ids=repr,
)
def test_a_chat_body_is_valid_in_the_document_exactly_when_the_parser_accepts_it(fields):
    spec = openapi_spec(load_settings(CEILING_ENV))
    body = {"model": "model-a", "messages": [USER], **fields}
    parse = compat_parser(parse_chat_request)
    assert conforms(spec, "ChatCompletionRequest", body) == accepted(parse, body)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": "model-c"},
        {"max_tokens": None},
        {"max_tokens": 0},
        {"max_tokens": 2.0},
        {"max_tokens": "2"},
        {"top_k": 1.0},
        {"top_k": "x"},
        {"metadata": []},
        {"system": "be brief"},
        {"system": [{"type": "text", "text": "s"}]},
        {"system": 5},
        {"stream": 1},
        {"messages": []},
    ],
    ids=repr,
)
def test_a_messages_body_is_valid_in_the_document_exactly_when_the_parser_accepts_it(fields):
    spec = openapi_spec(load_settings(CEILING_ENV))
    body = {"model": "model-a", "max_tokens": 5, "messages": [USER], **fields}
    parse = compat_parser(parse_messages_request)
    assert conforms(spec, "AnthropicMessagesRequest", body) == accepted(parse, body)
