"""``GET /docs``: the OpenAPI document as one self-contained HTML page.

Rendered here, on the server, from the same document ``/openapi.json`` serves
(:func:`docs_page`): each route with who may call it, its parameters, body and
responses, then every schema as a table of its fields. No script, no stylesheet
or font from elsewhere: the page works offline, behind any proxy, and with
scripts turned off. (Swagger UI or ReDoc would add a "try it" console, at the
price of a JavaScript bundle to ship and update; for an API that curl reaches
in one line, a page that reads well is enough.)
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code,pre{font:13px ui-monospace,monospace;background:#f4f4f4;padding:0 .2em}
h2{margin-top:2.5rem;border-bottom:1px solid #ddd}
.op{border:1px solid #ddd;border-radius:4px;padding:.5rem 1rem;margin:1rem 0}
.method{font-weight:bold;text-transform:uppercase;margin-right:.5em}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .5rem;
text-align:left;vertical-align:top}.muted{color:#666}
"""


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words of HTML: a link for a named one."""
    name = _ref_name(schema)
    if name is not None:
        return f'<a href="#schema-{escape(name)}">{escape(name)}</a>'
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    if "const" in schema:
        return f"<code>{escape(json.dumps(schema['const']))}</code>"
    if "enum" in schema:
        return " | ".join(f"<code>{escape(json.dumps(value))}</code>" for value in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    bounds = []
    for key, word in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("pattern", "matching"),
    ):
        if key in schema:
            bounds.append(f"{word} <code>{escape(str(schema[key]))}</code>")
    text = escape(str(kind))
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _fields(schema: dict[str, Any]) -> str:
    properties = schema.get("properties")
    if not properties:
        return f"<p>{_type(schema)}</p>"
    required = set(schema.get("required", ()))
    rows = "".join(
        f"<tr><td><code>{escape(name)}</code>{'' if name in required else ' <span class=muted>optional</span>'}"
        f"</td><td>{_type(field)}</td><td>{escape(field.get('description', ''))}</td></tr>"
        for name, field in properties.items()
    )
    return f"<table><tr><th>field</th><th>type</th><th></th></tr>{rows}</table>"


def _events(content: dict[str, Any]) -> str:
    """The events of a ``text/event-stream``: each one's name and the schema of its data."""
    schema = content.get("schema", {})
    rows = []
    for event in schema.get("oneOf", ()):
        fields = event.get("properties", {})
        name = fields.get("event", {}).get("const")
        data = fields.get("data", {}).get("contentSchema")
        if name is not None and data is not None:
            rows.append(f"<tr><td><code>{escape(name)}</code></td><td>{_type(data)}</td></tr>")
    if not rows:
        return ""
    return (
        f"<p>{escape(schema.get('description', ''))}</p>"
        f"<table><tr><th>event</th><th>data</th></tr>{''.join(rows)}</table>"
    )


def _response(code: str, response: dict[str, Any], components: dict[str, Any]) -> str:
    name = _ref_name(response)
    if name is not None:
        response = components.get("responses", {}).get(name, {})
    contents = response.get("content", {})
    shown = ", ".join(
        f"<code>{escape(media)}</code> {_events(content) or _type(content.get('schema', {}))}"
        for media, content in contents.items()
    )
    headers = ", ".join(f"header <code>{escape(h)}</code>" for h in response.get("headers", {}))
    return (
        f"<tr><td>{escape(code)}</td><td>{escape(response.get('description', ''))}</td>"
        f"<td>{shown}{'; ' + headers if headers else ''}</td></tr>"
    )


def _operation(
    path: str, method: str, operation: dict[str, Any], components: dict[str, Any]
) -> str:
    parts = [
        f'<div class="op" id="{escape(method)}-{escape(path)}">'
        f'<p><span class="method">{escape(method)}</span><code>{escape(path)}</code>'
        f" — {escape(operation.get('summary', ''))}</p>"
    ]
    if operation.get("description"):
        parts.append(f"<p>{escape(operation['description'])}</p>")
    auth = "an API key or token" if operation.get("security") else "none"
    parts.append(f"<p class=muted>Authentication: {auth}</p>")
    parameters = operation.get("parameters", [])
    if parameters:
        rows = "".join(
            f"<tr><td><code>{escape(p['name'])}</code> ({escape(p['in'])})</td>"
            f"<td>{_type(p.get('schema', {}))}</td><td>{escape(p.get('description', ''))}</td></tr>"
            for p in parameters
        )
        parts.append(f"<p>Parameters:</p><table>{rows}</table>")
    body = operation.get("requestBody")
    if body:
        shown = [
            f"{_type(content.get('schema', {}))}"
            + ("" if media_type == "application/json" else f" (<code>{escape(media_type)}</code>)")
            for media_type, content in body.get("content", {}).items()
        ]
        kind = "JSON" if list(body.get("content", {})) == ["application/json"] else "bytes"
        parts.append(f"<p>Body ({kind}): {', '.join(shown)}</p>")
    rows = "".join(
        _response(code, response, components)
        for code, response in operation.get("responses", {}).items()
    )
    parts.append(f"<table><tr><th>status</th><th></th><th>body</th></tr>{rows}</table></div>")
    return "".join(parts)


def docs_page(spec: dict[str, Any]) -> str:
    """The HTML page for ``spec`` (an OpenAPI 3 document as :func:`.openapi.openapi_spec` makes)."""
    info = spec.get("info", {})
    components = spec.get("components", {})
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    index = []
    operations = []
    for path, methods in spec.get("paths", {}).items():
        for method, operation in methods.items():
            anchor = f"{escape(method)}-{escape(path)}"
            index.append(
                f'<li><a href="#{anchor}"><span class="method">{escape(method)}</span>'
                f"<code>{escape(path)}</code></a> {escape(operation.get('summary', ''))}</li>"
            )
            operations.append(_operation(path, method, operation, components))
    schemas = "".join(
        f'<h3 id="schema-{escape(name)}">{escape(name)}</h3>'
        f"<p>{escape(schema.get('description', ''))}</p>{_fields(schema)}"
        for name, schema in components.get("schemas", {}).items()
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{title}</title><style>{STYLE}</style></head><body>"
        f"<h1>{title}</h1><p>{escape(info.get('description', ''))}</p>"
        '<p>The machine-readable contract: <a href="openapi.json"><code>/openapi.json</code></a>'
        f" (OpenAPI {escape(str(spec.get('openapi', '')))}).</p>"
        f"<h2>Routes</h2><ul>{''.join(index)}</ul>{''.join(operations)}"
        f"<h2>Schemas</h2>{schemas}</body></html>"
    )
