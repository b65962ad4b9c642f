"""The OpenAPI document against the app's routes, and the page that shows it.

What the running service answers is checked against the document by the
schemathesis pass (``tests/test_schemathesis.py``); here, without a server: the
document is valid OpenAPI 3.1, every route the app serves is in it and nothing
else is, its bounds follow the configuration, and ``/docs`` shows all of it
with nothing fetched from elsewhere.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from openapi_spec_validator import validate

from claude_code_api.actors.registry import RegistryClient
from claude_code_api.config import load_settings
from claude_code_api.http.app import create_app
from claude_code_api.http.docs import docs_page
from claude_code_api.http.observe import route_pattern
from claude_code_api.http.openapi import openapi_spec
from claude_code_api.http.requests import BadRequest, parse_exchange_code, parse_run_request

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


@given(st.text(alphabet=st.sampled_from("ab#é \t\n\x1c\u00a0"), max_size=12))
def test_the_documented_code_pattern_is_what_the_parser_accepts(pasted):
    schema = openapi_spec(load_settings({}))["components"]["schemas"]["ExchangeRequest"]
    documented = re.search(schema["properties"]["code"]["pattern"], pasted) is not None
    try:
        parse_exchange_code(json.dumps({"code": pasted}).encode())
        accepted = True
    except BadRequest:
        accepted = False
    assert documented == accepted


@given(st.text(alphabet=st.sampled_from("ab \t\n\x1c\u00a0\u2028"), min_size=1, max_size=6))
def test_the_documented_prompt_pattern_is_what_the_parser_accepts(prompt):
    schema = openapi_spec(load_settings({}))["components"]["schemas"]["RunRequest"]
    documented = re.search(schema["properties"]["prompt"]["pattern"], prompt) is not None
    try:
        parse_run_request(
            json.dumps({"prompt": prompt}).encode(), max_prompt_chars=10, max_timeout_ms=1
        )
        accepted = True
    except BadRequest:
        accepted = False
    assert documented == accepted
