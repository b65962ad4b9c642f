"""The API's contract: an OpenAPI 3.1 document, kept by hand beside the routes.

:func:`openapi_spec` builds the document ``GET /openapi.json`` serves: every
route, its parameters, request body, and each response and error it can give,
with the bounds of this service's configuration (``timeoutMs`` up to
``MAX_TIMEOUT_MS``, the prompt's length). The request parsers
(:mod:`.requests`) decide what is accepted; this document says the same in
JSON Schema, and the tests hold the two together: every route the app serves
is in it and nothing else (``tests/test_openapi.py``), and a schemathesis pass
against the running service checks that what it answers conforms
(``tests/test_schemathesis.py``).

Written by hand rather than generated from the handlers: the handlers parse
bodies themselves (to name the field in every 400), so there are no models to
generate from, and a hand-kept document can say what a generator cannot (who
may call a route, when a 429 or 502 happens). A field accepted as ``null``
means "not given", as the parsers treat it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from ..config import Settings
from ..user_memory import MAX_SAVED_BYTES
from .requests import MAX_CODE_CHARS, MAX_PAGE_OFFSET, MAX_PAGE_SIZE, SESSION_ID_PATTERN

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """A JSON object with these properties (more may be added later: none is forbidden)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def _ok(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        response["headers"] = headers
    return response


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {"$ref": f"#/components/responses/{_RESPONSE_NAMES[code]}"} for code in codes
    }


_RESPONSE_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}

# Every authenticated route: a key in x-api-key, or a key or token as a bearer.
AUTHENTICATED: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]
PUBLIC: list[dict[str, list[str]]] = []


def _schemas(settings: Settings) -> dict[str, Schema]:
    session_id = {
        "type": "string",
        "pattern": f"^{SESSION_ID_PATTERN.pattern}$",
        "description": "names a conversation within the caller's user id",
    }
    count = {"type": "integer", "minimum": 0}
    millis = {"type": "integer", "description": "milliseconds since the Unix epoch"}
    return {
        "Error": {
            **_object({"error": {"type": "string"}}),
            "description": "Every error: what went wrong, naming the field when a field is wrong.",
        },
        "RunRequest": _object(
            {
                "prompt": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": settings.max_prompt_chars,
                    # Not only white space (as the parser strips it).
                    "pattern": r"\S",
                }
            },
            {
                "sessionId": {
                    "anyOf": [session_id, {"type": "null"}],
                    "description": "continue this session's conversation (null: a one-shot run)",
                },
                "timeoutMs": {
                    "anyOf": [
                        {"type": "integer", "minimum": 1, "maximum": settings.max_timeout_ms},
                        {"type": "null"},
                    ],
                    "description": "deadline for queueing and running together; null or"
                    f" absent: {settings.default_timeout_ms}",
                },
            },
        ),
        "UpstreamError": _object(
            {
                "status": {"type": ["integer", "null"], "description": "null: unreachable"},
                "message": {"type": "string"},
                "retries": count,
            }
        ),
        "RunResult": _object(
            {
                "success": {"type": "boolean"},
                "output": {"type": "string", "description": "the answer, or the error text"},
                "durationMs": count,
                "timedOut": {"type": "boolean"},
            },
            {
                "timeoutType": {"const": "hard"},
                "outputTruncated": {"const": True},
                "cancelled": {"const": True},
                "upstreamError": _ref("UpstreamError"),
            },
        ),
        "Health": _object(
            {
                "status": {"enum": ["starting", "ok", "degraded", "stopping"]},
                "workers": _object(
                    {name: count for name in ("total", "ready", "busy", "starting", "error")}
                ),
                "queue": _object({"length": count, "maxSize": count}),
                "uptime": {**count, "description": "milliseconds since start"},
            },
            {"reason": {"type": "string", "description": "why it is degraded"}},
        ),
        "Worker": _object(
            {
                "id": {"type": "string"},
                "state": {"enum": ["starting", "ready", "busy", "error"]},
                "jobs": count,
            },
            {"busySince": millis, "lastError": {"type": "string"}},
        ),
        "Session": _object(
            {
                "id": {"type": "string"},
                "state": {
                    "enum": ["live", "busy", "hibernated", "waiting", "starting", "stopping"]
                },
                "processing": {"type": "boolean"},
                "turns": count,
            },
            {"lastActivity": millis},
        ),
        "Status": _object(
            {
                "workers": {"type": "array", "items": _ref("Worker")},
                "queueLength": count,
                "maxQueueSize": count,
                "totalProcessed": count,
                "totalErrors": count,
                "sessions": {
                    "type": "array",
                    "items": _ref("Session"),
                    "description": "the caller's own, most recent first",
                },
                "sessionsTotal": count,
            }
        ),
        "SessionRef": _object({"sessionId": session_id}),
        "Closed": _object({"closed": {"const": True}}),
        "UserClaude": _object(
            {
                "content": {
                    "type": "string",
                    # A bound on characters that holds for any text within the byte bound.
                    "maxLength": MAX_SAVED_BYTES,
                    "description": f"at most {MAX_SAVED_BYTES} bytes in UTF-8 (413 past it);"
                    ' "" removes it',
                }
            }
        ),
        "Saved": _object({"saved": {"const": True}}),
        "AuthStatus": _object(
            {
                "authenticated": {"type": "boolean"},
                "method": {"enum": ["apiKey", "oauth", "none"]},
            },
            {
                "expiresAt": {**millis, "description": "when the OAuth access token expires"},
                "lastRefreshError": _object(
                    {"message": {"type": "string"}, "at": millis, "nextAttemptAt": millis}
                ),
                "lastUpstreamAuthError": _object(
                    {
                        "status": {"type": ["integer", "null"]},
                        "message": {"type": "string"},
                        "at": millis,
                    }
                ),
            },
        ),
        "LoginUrl": _object({"url": {"type": "string", "format": "uri"}}),
        "ExchangeRequest": _object(
            {
                "code": {
                    "type": "string",
                    "maxLength": MAX_CODE_CHARS,
                    # Text before and after the last "#" (white space around it is ignored).
                    "pattern": r"^\s*\S[\s\S]*#[^#]*[^#\s]\s*$",
                    "description": "the CODE#STATE the callback page shows",
                }
            }
        ),
        "Success": _object({"success": {"const": True}}),
    }


def _responses() -> dict[str, Any]:
    retry_after = {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    return {
        "BadRequest": _error(
            "The body is not a JSON object, or a field or parameter is missing, mistyped or"
            " out of range: the message names it"
        ),
        "Unauthorized": _error("No credentials, or an invalid key or expired token"),
        "Forbidden": _error("The caller may not do this (not in AUTH_ADMINS)"),
        "NotFound": _error("No such route, or none of the caller's"),
        "PayloadTooLarge": _error("The body is over 1 MiB (or a field over its own bound)"),
        "UnsupportedMediaType": _error("A Content-Type that is not JSON"),
        "TooManyRequests": _error(
            "Too many runs are waiting (the queue, the caller's share of it, a session's"
            " line) or the caller holds MAX_SESSIONS_PER_USER sessions",
            retry_after,
        ),
        "BadGateway": _error(
            "The agent process died or broke the protocol, the model API refused the"
            " credentials, or the OAuth token endpoint failed"
        ),
        "ServiceUnavailable": _error(
            "No agent can start, the session store or credentials file cannot be written,"
            " or the service is shutting down"
        ),
        "GatewayTimeout": _error("The run outlived its deadline without an answer"),
    }


def _json_body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": _json(schema)}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    security: list[dict[str, list[str]]],
    description: str = "",
    body: Schema | None = None,
    parameters: list[dict[str, Any]] | None = None,
    tags: tuple[str, ...] = (),
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "security": security, "responses": responses}
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = _json_body(body)
    if parameters:
        operation["parameters"] = parameters
    if tags:
        operation["tags"] = list(tags)
    return operation


def _paths(settings: Settings, *, metrics: bool) -> dict[str, Any]:
    body_errors = (400, 401, 413, 415)
    paths: dict[str, Any] = {
        "/health": {
            "get": _operation(
                "Pool status",
                {
                    "200": _ok("The service can take work (ok) or is warming up", _ref("Health")),
                    "503": {
                        "description": "It cannot take work now (degraded, with a reason) or"
                        " is stopping",
                        "content": _json({"anyOf": [_ref("Health"), _ref("Error")]}),
                    },
                },
                security=PUBLIC,
                tags=("service",),
            )
        },
        "/run": {
            "post": _operation(
                "Run a prompt",
                {
                    "200": _ok(
                        "The agent's answer (success: true), its error, a timeout with the"
                        " partial output, or a cancelled run",
                        _ref("RunResult"),
                    ),
                    **_errors(*body_errors, 429, 502, 503, 504),
                },
                security=AUTHENTICATED,
                description="A one-shot run on a pre-warmed agent, or a turn of the caller's"
                " session `sessionId`. `timeoutMs` covers waiting in the queue and running.",
                body=_ref("RunRequest"),
                tags=("runs",),
            )
        },
        "/status": {
            "get": _operation(
                "Workers, queue, totals and the caller's sessions",
                {
                    "200": _ok("The pool and a page of the caller's sessions", _ref("Status")),
                    **_errors(400, 401, 503),
                },
                security=AUTHENTICATED,
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
                        "description": "sessions on the page (default 100)",
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_PAGE_OFFSET},
                        "description": "sessions skipped (default 0)",
                    },
                ],
                tags=("service",),
            )
        },
        "/session": {
            "delete": _operation(
                "Close one of the caller's sessions",
                {
                    "200": _ok("Closed; its transcripts are removed", _ref("Closed")),
                    **_errors(*body_errors, 404, 503),
                },
                security=AUTHENTICATED,
                description="A turn running at that moment is interrupted and answers"
                " success: false.",
                body=_ref("SessionRef"),
                tags=("sessions",),
            )
        },
        "/user-claude": {
            "get": _operation(
                "The caller's CLAUDE.md",
                {"200": _ok('Its content ("" when none)', _ref("UserClaude")), **_errors(401, 503)},
                security=AUTHENTICATED,
                tags=("users",),
            ),
            "put": _operation(
                "Save the caller's CLAUDE.md",
                {
                    "200": _ok("Saved; live sessions restart at their next turn", _ref("Saved")),
                    **_errors(*body_errors, 503),
                },
                security=AUTHENTICATED,
                body=_ref("UserClaude"),
                tags=("users",),
            ),
        },
        "/auth/status": {
            "get": _operation(
                "Which credentials the agents use, and the model API's last refusal",
                {"200": _ok("What the service knows", _ref("AuthStatus")), **_errors(401, 503)},
                security=AUTHENTICATED,
                tags=("auth",),
            )
        },
        "/auth/login": {
            "post": _operation(
                "Start a Claude (subscription) login",
                {
                    "200": _ok("The URL to open; it expires after 10 minutes", _ref("LoginUrl")),
                    **_errors(401, 403, 503),
                },
                security=AUTHENTICATED,
                description="Admins only (AUTH_ADMINS). No body.",
                tags=("auth",),
            )
        },
        "/auth/exchange": {
            "post": _operation(
                "Finish a Claude login with the CODE#STATE the callback page shows",
                {
                    "200": _ok("The login is stored and in effect", _ref("Success")),
                    **_errors(*body_errors, 403, 502, 503),
                },
                security=AUTHENTICATED,
                description="Admins only (AUTH_ADMINS). 400 for a code that is not CODE#STATE,"
                " or a state unknown, expired or used; 502 when the token endpoint fails.",
                body=_ref("ExchangeRequest"),
                tags=("auth",),
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document",
                {"200": _ok("OpenAPI 3.1", {"type": "object"}), **_errors(503)},
                security=PUBLIC,
                tags=("service",),
            )
        },
        "/docs": {
            "get": _operation(
                "This document as a web page",
                {
                    "200": {
                        "description": "HTML, self-contained",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_errors(503),
                },
                security=PUBLIC,
                tags=("service",),
            )
        },
    }
    if metrics:
        paths["/metrics"] = {
            "get": _operation(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "The Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(503),
                },
                security=PUBLIC,
                description="Off with METRICS=0 (then 404, and absent from this document).",
                tags=("service",),
            )
        }
    return paths


def openapi_spec(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of a service running with ``settings``."""
    try:
        version = metadata.version("claude-code-api")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "claude-code-api",
            "version": version,
            "description": "The Claude Code agent as an HTTP service. Every error is JSON"
            ' `{"error": "..."}`; an unknown route answers 404, a method a route does not'
            " serve 405 (with `Allow`), and while the service shuts down every route answers"
            " 503.",
        },
        "paths": _paths(settings, metrics=settings.metrics),
        "components": {
            "schemas": _schemas(settings),
            "responses": _responses(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key, or a token claude-code-web signs",
                },
            },
        },
    }
