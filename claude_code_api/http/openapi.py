"""The API's contract: an OpenAPI 3.1 document, its paths and prose beside the routes.

:func:`openapi_spec` builds the document ``GET /openapi.json`` serves: every
route, its parameters, request body, and each response and error it can give,
with the bounds of this service's configuration (``timeoutMs`` up to
``MAX_TIMEOUT_MS``, the prompt's length). The request bodies of the native
routes are not restated here: their schemas are generated from the models that
validate them (:func:`.requests.body_schemas`), so the two cannot drift apart. The tests hold the rest together: every
route the app serves is in it and nothing else (``tests/unit/test_openapi.py``), and a
schemathesis pass against the running service checks that what it answers
conforms (``tests/e2e/test_schemathesis.py``).

The compatible routes' bodies come from their models too
(:func:`.openai_api.chat_request_model`, :func:`.anthropic_api.messages_request_model`);
the messages inside them (``ChatMessage``, ``AnthropicImage``), the replies and
the paths are written here by hand: a hand-kept document can say what a
generator cannot (who may call a route, when a 429 or 502 happens). A field
accepted as ``null`` means "not given", as the parsers treat it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from ..config.settings import Settings
from ..messages import IMAGE_MEDIA_TYPES
from ..store.user_memory import MAX_SAVED_BYTES
from .anthropic_api import messages_request_model
from .openai_api import chat_request_model
from .parsing import BODY_TIMEOUT_S
from .requests import MAX_PAGE_OFFSET, MAX_PAGE_SIZE, SESSION_ID_PATTERN, RunBounds, body_schemas
from .schema import component_schemas
from .streaming import KEEP_ALIVE_S

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"

# The events of a streamed reply, in the order they come, and the schema of each one's data.
STREAM_EVENTS = {
    "queued": "QueuedEvent",
    "started": "StartedEvent",
    "text": "TextEvent",
    "tool_use": "ToolUseEvent",
    "tool_result": "ToolResultEvent",
    "upstream_retry": "UpstreamRetryEvent",
    "result": "RunResult",
    "error": "ErrorEvent",
}

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


def _nullable(json_type: str, description: str) -> Schema:
    """A value of ``json_type``, or null (not known)."""
    return {"type": [json_type, "null"], "description": description}


def _or_null(schema: Schema, description: str = "") -> Schema:
    """``schema`` or ``null`` (which the parsers read as "not given")."""
    either: Schema = {"anyOf": [schema, {"type": "null"}]}
    if description:
        either["description"] = description
    return either


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
    408: "RequestTimeout",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
    507: "InsufficientStorage",
}

# Every authenticated route: a key in x-api-key, or a key or token as a bearer.
AUTHENTICATED: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]
PUBLIC: list[dict[str, list[str]]] = []
# GET /metrics when METRICS_TOKEN is set: that token alone.
METRICS_SCRAPER: list[dict[str, list[str]]] = [{"metricsToken": []}]


def _event_schemas() -> dict[str, Schema]:
    """The ``data:`` of each event of a streamed reply but ``result`` (a :func:`RunResult`)."""
    run_id = {"type": "string"}
    count = {"type": "integer", "minimum": 0}
    return {
        "QueuedEvent": _object(
            {"runId": run_id, "position": {**count, "description": "runs that start before it"}}
        )
        | {"description": "`queued`: the run was taken"},
        "StartedEvent": _object({"runId": run_id, "queuedMs": count})
        | {"description": "`started`: an agent is working on it"},
        "TextEvent": _object({"text": {"type": "string"}})
        | {"description": "`text`: a block of text the agent wrote"},
        "ToolUseEvent": _object(
            {
                "name": {"type": "string"},
                "summary": {"type": "string", "description": "its input in one short line"},
            }
        )
        | {"description": "`tool_use`: the agent called a tool"},
        "ToolResultEvent": _object({"ok": {"type": "boolean"}})
        | {"description": "`tool_result`: that tool call finished (false: with an error)"},
        "UpstreamRetryEvent": _object(
            {
                "status": {"type": ["integer", "null"], "description": "null: unreachable"},
                "message": {"type": "string"},
                "attempt": {"type": "integer"},
                "maxRetries": {"type": ["integer", "null"]},
            }
        )
        | {"description": "`upstream_retry`: the model API failed and the CLI retries"},
        "ErrorEvent": _object(
            {
                "error": {"type": "string"},
                "status": {"type": "integer", "description": "what a JSON reply would answer"},
                "runId": run_id,
            }
        )
        | {"description": "`error`: the run failed (ends the stream, as `result` does)"},
    }


def _event_stream() -> dict[str, Any]:
    """The ``text/event-stream`` alternative of a run's 200: ``schema`` describes one event.

    Each event is an ``id``, an ``event`` name and a ``data`` line of JSON whose schema
    is given by ``contentSchema`` (how OpenAPI 3.1 tools, schemathesis among them, read
    an event stream's schema; 3.2 would call it ``itemSchema``).
    """
    names = ", ".join(STREAM_EVENTS)
    events = [
        {
            "type": "object",
            "required": ["id", "event", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                "event": {"const": name},
                "data": {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": _ref(schema),
                },
            },
        }
        for name, schema in STREAM_EVENTS.items()
    ]
    return {
        "schema": {
            "description": "Server-sent events, each an `id:` (1, 2, ... within the stream),"
            f" an `event:` name ({names}) and one line of JSON `data:`; exactly one"
            " `result` or `error` ends the stream and nothing follows it. A comment line"
            f" `: keep-alive` comes after every {KEEP_ALIVE_S:g} s without an event.",
            "oneOf": events,
        },
    }


def _compat_event_stream() -> dict[str, Any]:
    """The ``text/event-stream`` of the OpenAI and Anthropic routes: ``schema`` is one event.

    Each event is a ``data:`` line (JSON, or OpenAI's closing ``[DONE]``), with an
    ``event:`` name in Anthropic's stream; their shapes are those clients' own.
    """
    return {
        "schema": {
            "description": "Server-sent events in the client's own format (see README).",
            "type": "object",
            "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
        },
    }


_COUNT: Schema = {"type": "integer", "minimum": 0}
_MILLIS: Schema = {"type": "integer", "description": "milliseconds since the Unix epoch"}
_SESSION_ID: Schema = {
    "type": "string",
    "pattern": f"^{SESSION_ID_PATTERN.pattern}$",
    "description": "names a conversation within the caller's user id",
}


def _schemas(settings: Settings) -> dict[str, Schema]:
    """The components of this service's own routes, in the document's order."""
    return {
        **body_schemas(RunBounds.of(settings), MAX_SAVED_BYTES),
        "Error": {
            **_object(
                {"error": {"type": "string"}},
                {"runId": {"type": "string", "description": "the run's id, on errors about a run"}},
            ),
            "description": "Every error: what went wrong, naming the field when a field is wrong.",
        },
        "UpstreamError": _object(
            {
                "status": {"type": ["integer", "null"], "description": "null: unreachable"},
                "message": {"type": "string"},
                "retries": _COUNT,
            }
        ),
        "RunResult": _run_result_schema(),
        **_health_schemas(),
        **_status_schemas(),
        **_usage_schemas(),
        "Cancelled": _object({"cancelled": {"const": True}}),
        "Cancelling": _object({"cancelled": {"const": False}, "cancelling": {"const": True}}),
        **_event_schemas(),
        "Closed": _object({"closed": {"const": True}}),
        "Saved": _object({"saved": {"const": True}}),
        **_auth_schemas(),
    }


def _run_result_schema() -> Schema:
    """A run's reply: the original service's four fields, then this service's metadata."""
    return {
        **_object(
            {
                "success": {"type": "boolean"},
                "output": {"type": "string", "description": "the answer, or the error text"},
                "durationMs": _COUNT,
                "timedOut": {"type": "boolean"},
                "runId": {"type": "string", "description": "the run's id (header X-Run-Id)"},
                "claudeSessionId": _nullable("string", "Claude Code's id of the conversation"),
                "model": _nullable(
                    "string", "the model that ran the turn, as the agent reported it"
                ),
                "costUsd": _nullable(
                    "number", "the turn's own cost in US dollars, as the agent reported it"
                ),
                "usage": _nullable(
                    "object", "the agent's token counts (input_tokens, output_tokens, ...)"
                ),
                "numTurns": _nullable("integer", "model round trips in the turn"),
                "queuedMs": {
                    **_COUNT,
                    "description": "time the run waited for an agent (all of it if it got none)",
                },
            },
            {
                "timeoutType": {"const": "hard"},
                "outputTruncated": {"const": True},
                "cancelled": {"const": True},
                "stopped": {"const": True},
                "upstreamError": _ref("UpstreamError"),
                "sessionId": {**_SESSION_ID, "description": "the request's; session turns only"},
                "loweredOptions": {
                    "type": "object",
                    "description": "a session's saved options that this service's ceilings"
                    " (lowered since the session was created) changed for this turn, with"
                    " the values it ran with: model (the default model), maxTurns,"
                    " maxBudgetUsd, permissionMode (the default mode)",
                    "properties": {
                        "model": {"type": ["string", "null"]},
                        "maxTurns": {"type": "integer"},
                        "maxBudgetUsd": {"type": "number"},
                        "permissionMode": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
            },
        ),
        "description": "A run's reply (the `result` event of a stream): the original"
        " service's four fields first, then this service's metadata",
    }


def _health_schemas() -> dict[str, Schema]:
    """``GET /health``'s reply, and a worker as ``GET /status`` shows it."""
    return {
        "Health": _object(
            {
                "status": {"enum": ["starting", "ok", "degraded", "stopping"]},
                "workers": _object(
                    {
                        name: _COUNT
                        for name in (
                            "total",
                            "ready",
                            "busy",
                            "starting",
                            "error",
                            "kept",
                            "dormant",
                        )
                    }
                ),
                "queue": _object({"length": _COUNT, "maxSize": _COUNT}),
                "uptime": {**_COUNT, "description": "milliseconds since start"},
            },
            {"reason": {"type": "string", "description": "why it is degraded"}},
        ),
        "Worker": _object(
            {
                "id": {"type": "string"},
                "state": {"enum": ["starting", "ready", "busy", "error", "kept", "dormant"]},
                "jobs": _COUNT,
            },
            {"busySince": _MILLIS, "lastError": {"type": "string"}},
        ),
    }


def _status_schemas() -> dict[str, Schema]:
    """A session as ``GET /status`` lists it, and that reply."""
    return {
        "Session": _object(
            {
                "id": {"type": "string"},
                "state": {
                    "enum": ["live", "busy", "hibernated", "waiting", "starting", "stopping"]
                },
                "processing": {"type": "boolean"},
                "turns": _COUNT,
            },
            {"lastActivity": _MILLIS},
        ),
        "Status": _object(
            {
                "workers": {"type": "array", "items": _ref("Worker")},
                "queueLength": _COUNT,
                "maxQueueSize": _COUNT,
                "totalProcessed": _COUNT,
                "totalErrors": _COUNT,
                "runs": {
                    "type": "array",
                    "items": _ref("Run"),
                    "description": "the caller's queued and running runs, oldest first",
                },
                "sessions": {
                    "type": "array",
                    "items": _ref("Session"),
                    "description": "the caller's own, most recent first",
                },
                "sessionsTotal": _COUNT,
            },
            {"usage": _ref("Usage")},
        ),
    }


def _usage_schemas() -> dict[str, Schema]:
    """The caller's usage today, and one of their queued or running runs."""
    return {
        "Usage": _object(
            {
                "day": {"type": "string", "description": "the calendar day counted (UTC)"},
                "costUsd": {"type": "number", "minimum": 0},
                "tokens": {
                    "type": "object",
                    "additionalProperties": {"type": "integer", "minimum": 0},
                    "description": "input_tokens, output_tokens, cache_creation_input_tokens,"
                    " cache_read_input_tokens",
                },
                "modelCalls": _COUNT,
                "dailyBudgetUsd": {"type": ["number", "null"]},
            },
            {
                "remainingUsd": {"type": "number", "minimum": 0},
                "overBudget": {"type": "boolean"},
                "resetsAt": _MILLIS,
            },
        ),
        "Run": _object(
            {
                "runId": {"type": "string"},
                "state": {"enum": ["queued", "running"]},
                "queuedAt": _MILLIS,
            },
            {"sessionId": _SESSION_ID, "startedAt": _MILLIS},
        ),
    }


def _auth_schemas() -> dict[str, Schema]:
    """The replies of ``/auth/*``."""
    return {
        "AuthStatus": _object(
            {
                "authenticated": {"type": "boolean"},
                "method": {"enum": ["apiKey", "oauth", "none"]},
            },
            {
                "expiresAt": {**_MILLIS, "description": "when the OAuth access token expires"},
                "lastRefreshError": _object(
                    {"message": {"type": "string"}, "at": _MILLIS, "nextAttemptAt": _MILLIS}
                ),
                "lastUpstreamAuthError": _object(
                    {
                        "status": {"type": ["integer", "null"]},
                        "message": {"type": "string"},
                        "at": _MILLIS,
                    }
                ),
            },
        ),
        "LoginUrl": _object({"url": {"type": "string", "format": "uri"}}),
        "Success": _object({"success": {"const": True}}),
    }


def _compat_schemas(settings: Settings) -> dict[str, Schema]:
    """The request and reply shapes of the OpenAI- and Anthropic-compatible routes, and /files'."""
    return {
        **component_schemas(
            chat_request_model(settings.allowed_models),
            messages_request_model(settings.allowed_models),
        ),
        **_openai_schemas(),
        **_file_schemas(),
        **_anthropic_schemas(),
        **_compat_error_schemas(),
    }


def _chat_message_schema() -> Schema:
    """An OpenAI chat message: its content a string, or text and image_url parts."""
    text_part = _object({"type": {"const": "text"}, "text": {"type": "string"}})
    image_url_part = _object(
        {
            "type": {"const": "image_url"},
            "image_url": _object(
                {"url": {"type": "string", "description": "a data: URL (base64); http(s): 400"}},
                {"detail": {"type": "string"}},
            ),
        }
    )
    return _object(
        {"role": {"enum": ["system", "developer", "user", "assistant"]}},
        {
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"anyOf": [text_part, image_url_part]}},
                    {"type": "null"},
                ],
                "description": "a string, or text parts (and image_url parts in user"
                " messages); null only in an assistant message",
            }
        },
    )


def _openai_schemas() -> dict[str, Schema]:
    """A chat message, a chat completion, and the model list."""
    return {
        "ChatMessage": _chat_message_schema(),
        "ChatCompletion": _object(
            {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": _object(
                        {
                            "index": {"type": "integer"},
                            "message": _object(
                                {"role": {"const": "assistant"}, "content": {"type": "string"}}
                            ),
                            "finish_reason": {"enum": ["stop", "length"]},
                        }
                    ),
                },
                "usage": _object(
                    {"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT}
                ),
            }
        ),
        "ModelList": _object(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}
        ),
        "Model": _object(
            {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            }
        ),
    }


def _file_schemas() -> dict[str, Schema]:
    """The replies of ``/files``."""
    return {
        "FileList": _object(
            {
                "files": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": {"type": "string"},
                            "size": {"type": "integer", "minimum": 0},
                            "modified": {"type": "integer", "description": "ms since the epoch"},
                        }
                    ),
                },
                "truncated": {"type": "boolean", "description": "more than 10 000 files"},
            }
        ),
        "FileWritten": _object(
            {"path": {"type": "string"}, "size": {"type": "integer", "minimum": 0}}
        ),
        "FileDeleted": _object({"deleted": {"const": True}}),
    }


def _anthropic_schemas() -> dict[str, Schema]:
    """An image block, and a message reply."""
    return {
        "AnthropicImage": _object(
            {
                "type": {"const": "image"},
                "source": _object(
                    {
                        "type": {"const": "base64"},
                        "media_type": {"enum": list(IMAGE_MEDIA_TYPES)},
                        "data": {"type": "string", "contentEncoding": "base64"},
                    }
                ),
            }
        ),
        "AnthropicMessage": _object(
            {
                "id": {"type": "string"},
                "type": {"const": "message"},
                "role": {"const": "assistant"},
                "model": {"type": "string"},
                "content": {
                    "type": "array",
                    "items": _object({"type": {"const": "text"}, "text": {"type": "string"}}),
                },
                "stop_reason": {"enum": ["end_turn", "max_tokens"]},
                "usage": _object({"input_tokens": _COUNT, "output_tokens": _COUNT}),
            }
        ),
    }


def _compat_error_schemas() -> dict[str, Schema]:
    """The compatible routes' errors, each in its API's own shape."""
    return {
        "AnthropicError": _object(
            {
                "type": {"const": "error"},
                "error": _object({"type": {"type": "string"}, "message": {"type": "string"}}),
            }
        ),
        "OpenAIError": _object(
            {
                "error": _object(
                    {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    }
                )
            }
        ),
    }


def _compat_error(schema: str, description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref(schema))}
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before trying again",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return response


# What each status of a compatible route means (their bodies are in the route's own shape).
COMPAT_ERRORS = {
    400: "A parameter is missing, mistyped, out of range or not supported: `param` names it",
    401: "No credentials, or an invalid key or expired token",
    404: "No such model",
    408: f"The request body did not arrive within {BODY_TIMEOUT_S:g} s",
    409: "The run was cancelled (DELETE /runs/{runId}) before it finished",
    413: "The body is over its limit, or an image over MAX_IMAGE_BYTES",
    415: "A Content-Type that is not JSON",
    429: "Too many runs are waiting (the queue, the caller's share of it, a session's line)",
    502: "The agent failed (its error, or the model API's), or its process died",
    503: "No agent can start, the session store cannot be written, or the service stops",
    504: "The run outlived its deadline without an answer",
    507: "The caller's files are over their disk quota (USER_DISK_MAX_MB)",
}


def _compat_errors(schema: str, *codes: int) -> dict[str, Any]:
    return {
        str(code): _compat_error(schema, COMPAT_ERRORS[code], retry_after=code == 429)
        for code in codes
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
        "RequestTimeout": _error(
            f"The request body did not arrive within {BODY_TIMEOUT_S:g} s (the connection is"
            " closed)"
        ),
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
        "InsufficientStorage": _error(
            "The caller's files are over their disk quota (USER_DISK_MAX_MB), or the turn"
            " was stopped for passing it or for writing into the service's disk reserve"
        ),
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


# Each operation's id: the name a generated client gives its method.
OPERATION_IDS = {
    ("/health", "get"): "getHealth",
    ("/run", "post"): "runPrompt",
    ("/runs/{runId}", "delete"): "cancelRun",
    ("/status", "get"): "getStatus",
    ("/session", "delete"): "closeSession",
    ("/user-claude", "get"): "getUserClaude",
    ("/user-claude", "put"): "saveUserClaude",
    ("/auth/status", "get"): "getAuthStatus",
    ("/auth/login", "post"): "startLogin",
    ("/auth/exchange", "post"): "exchangeLoginCode",
    ("/openapi.json", "get"): "getOpenApiDocument",
    ("/docs", "get"): "getDocs",
    ("/metrics", "get"): "getMetrics",
    ("/files", "get"): "listFiles",
    ("/files/{path}", "get"): "downloadFile",
    ("/files/{path}", "put"): "uploadFile",
    ("/files/{path}", "delete"): "deleteFile",
    ("/v1/chat/completions", "post"): "createChatCompletion",
    ("/v1/models", "get"): "listModels",
    ("/v1/messages", "post"): "createMessage",
    ("/v1/models/{model}", "get"): "retrieveModel",
}

# What a run's reply leads to: cancelling it by its id. (A session turn's reply names its
# session too, but a one-shot run's has none to link to.)
RUN_LINKS = {
    "cancelRun": {
        "operationId": "cancelRun",
        "parameters": {"runId": "$response.header.X-Run-Id"},
        "description": "Cancel this run (404 once it has ended)",
    },
}


# The errors of a route that reads a JSON body.
BODY_ERRORS = (400, 401, 408, 413, 415)
# The header every run's reply carries, its errors too once it was submitted.
RUN_ID_HEADER = {
    "X-Run-Id": {"description": "the run's id", "schema": {"type": "string"}},
}


def _replies(ok: str, schema: str, *codes: int) -> dict[str, Any]:
    """A route's responses: 200 with a ``schema`` component described as ``ok``, and errors."""
    return {"200": _ok(ok, _ref(schema)), **_errors(*codes)}


def _paths(settings: Settings, *, metrics: bool) -> dict[str, Any]:
    """Every route served, in the document's order, each operation with its id."""
    paths: dict[str, Any] = {
        **_health_path(),
        **_run_paths(),
        **_status_and_session_paths(),
        **_auth_paths(),
        **_document_paths(),
    }
    paths.update(_compat_paths(RUN_ID_HEADER))
    paths.update(_file_paths(settings))
    if metrics:
        paths.update(_metrics_path(settings))
    for path, operations in paths.items():
        for method, operation in operations.items():
            operation["operationId"] = OPERATION_IDS[path, method]
    paths["/run"]["post"]["responses"]["200"]["links"] = RUN_LINKS
    return paths


def _health_path() -> dict[str, Any]:
    return {
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
    }


def _run_error(code: int) -> dict[str, Any]:
    """An error about a run that was submitted: it names the run (``runId``, header)."""
    shared = _responses()[_RESPONSE_NAMES[code]]
    headers = {**shared.get("headers", {}), **RUN_ID_HEADER}
    return {**shared, "headers": headers}


def _run_paths() -> dict[str, Any]:
    """``POST /run`` and ``DELETE /runs/{runId}``."""
    return {
        "/run": {
            "post": _operation(
                "Run a prompt",
                {
                    "200": {
                        "description": "The agent's answer (success: true), its error, a"
                        " timeout with the partial output, or a cancelled run; streamed as"
                        " server-sent events when asked (`stream`, or `Accept:"
                        " text/event-stream`), the JSON reply then being the `result` event",
                        "headers": RUN_ID_HEADER,
                        "content": {
                            JSON: {"schema": _ref("RunResult")},
                            EVENT_STREAM: _event_stream(),
                        },
                    },
                    **_errors(*BODY_ERRORS),
                    **{str(code): _run_error(code) for code in (429, 502, 503, 504, 507)},
                },
                security=AUTHENTICATED,
                description="A one-shot run on a pre-warmed agent, or a turn of the caller's"
                " session `sessionId`. `timeoutMs` covers waiting in the queue and running."
                " Every run has an id (`runId`, header `X-Run-Id`) that `DELETE /runs/{runId}`"
                " cancels; a client that leaves cancels its run too. A streamed request is"
                " refused (400, 401, 413, 415, 429, 503) as a JSON error before any stream"
                " starts; a failure once it runs is its `error` event.",
                body=_ref("RunRequest"),
                tags=("runs",),
            )
        },
        "/runs/{runId}": {
            "delete": _operation(
                "Cancel one of the caller's queued or running runs",
                {
                    **_replies(
                        "Cancelled: the run's own request answers success: false,"
                        " cancelled: true (a queued run at once, a running one once its agent"
                        " is interrupted)",
                        "Cancelled",
                        *(401, 404, 503),
                    ),
                    "202": _ok(
                        "Several replicas: the run is another replica's, which was asked to"
                        " cancel it and did not say within seconds whether it did",
                        _ref("Cancelling"),
                    ),
                },
                security=AUTHENTICATED,
                description=(
                    "Anyone else's run, an unknown id and a run that has ended are 404. With"
                    " several replicas (DATABASE_URL), a run of another replica is cancelled"
                    " there; 503 when the database that lists the runs does not answer."
                ),
                parameters=[
                    {
                        "name": "runId",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "the run's id (`runId`, header `X-Run-Id`)",
                    }
                ],
                tags=("runs",),
            )
        },
    }


def _page_parameters() -> list[dict[str, Any]]:
    """``limit`` and ``offset``: a page of the caller's sessions."""
    return [
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
    ]


def _status_and_session_paths() -> dict[str, Any]:
    """``GET /status``, ``DELETE /session`` and ``/user-claude``: the caller's own state."""
    return {
        "/status": {
            "get": _operation(
                "Workers, queue, totals and the caller's sessions",
                _replies("The pool and a page of the caller's sessions", "Status", 400, 401, 503),
                security=AUTHENTICATED,
                parameters=_page_parameters(),
                tags=("service",),
            )
        },
        "/session": {
            "delete": _operation(
                "Close one of the caller's sessions",
                _replies("Closed; its transcripts are removed", "Closed", *BODY_ERRORS, 404, 503),
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
                _replies('Its content ("" when none)', "UserClaude", 401, 503),
                security=AUTHENTICATED,
                tags=("users",),
            ),
            "put": _operation(
                "Save the caller's CLAUDE.md",
                _replies(
                    "Saved; live sessions restart at their next turn", "Saved", *BODY_ERRORS, 503
                ),
                security=AUTHENTICATED,
                body=_ref("UserClaude"),
                tags=("users",),
            ),
        },
    }


def _auth_paths() -> dict[str, Any]:
    """``/auth/status``, ``/auth/login`` and ``/auth/exchange``."""
    return {
        "/auth/status": {
            "get": _operation(
                "Which credentials the agents use, and the model API's last refusal",
                _replies("What the service knows", "AuthStatus", 401, 503),
                security=AUTHENTICATED,
                tags=("auth",),
            )
        },
        "/auth/login": {
            "post": _operation(
                "Start a Claude (subscription) login",
                _replies("The URL to open; it expires after 10 minutes", "LoginUrl", 401, 403, 503),
                security=AUTHENTICATED,
                description="Admins only (AUTH_ADMINS). No body.",
                tags=("auth",),
            )
        },
        "/auth/exchange": {
            "post": _operation(
                "Finish a Claude login with the CODE#STATE the callback page shows",
                _replies(
                    "The login is stored and in effect", "Success", *BODY_ERRORS, 403, 502, 503
                ),
                security=AUTHENTICATED,
                description="Admins only (AUTH_ADMINS). 400 for a code that is not CODE#STATE,"
                " or a state unknown, expired or used; 502 when the token endpoint fails.",
                body=_ref("ExchangeRequest"),
                tags=("auth",),
            )
        },
    }


def _text_reply(description: str, media_type: str) -> dict[str, Any]:
    """A 200 that is a text document of ``media_type``."""
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _document_paths() -> dict[str, Any]:
    """``GET /openapi.json`` and ``GET /docs``: this document."""
    return {
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
                {"200": _text_reply("HTML, self-contained", "text/html"), **_errors(503)},
                security=PUBLIC,
                tags=("service",),
            )
        },
    }


def _metrics_path(settings: Settings) -> dict[str, Any]:
    """``GET /metrics`` (documented only when served: ``METRICS=1``)."""
    token = bool(settings.metrics_token)
    return {
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {
                    "200": _text_reply("The Prometheus text format", "text/plain"),
                    **_errors(*((401, 503) if token else (503,))),
                },
                security=METRICS_SCRAPER if token else PUBLIC,
                description="Off with METRICS=0 (then 404, and absent from this document)."
                " With METRICS_TOKEN set, only `Authorization: Bearer <METRICS_TOKEN>` opens it.",
                tags=("service",),
            )
        }
    }


def _binary() -> dict[str, Any]:
    """A body of raw bytes: a file's."""
    return {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def _file_paths(settings: Settings) -> dict[str, Any]:
    """``/files``: the caller's workspace (see README, "Files in and out of the workspace")."""
    path_parameter = {
        "name": "path",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
        "description": "a path relative to the caller's workspace ('/' separates directories,"
        " sent as %2F); '..', '.', empty names and absolute paths: 403; a link on the way: 403",
    }
    refused = {
        "403": _error("The path leaves the workspace, is bad, or goes through a link"),
        "404": _error("Nothing there (or not a regular file)"),
    }
    return {
        "/files": {
            "get": _operation(
                "The files in the caller's workspace",
                _replies("Every regular file, by name", "FileList", 401, 503),
                security=AUTHENTICATED,
                tags=("files",),
            )
        },
        "/files/{path}": {
            "get": _operation(
                "Download a file of the caller's workspace",
                {
                    "200": {"description": "The file's bytes", "content": _binary()},
                    **refused,
                    **_errors(401, 503),
                },
                security=AUTHENTICATED,
                parameters=[path_parameter],
                tags=("files",),
            ),
            "put": _file_upload(settings, path_parameter, refused),
            "delete": _operation(
                "Remove a file, a link (itself) or a directory tree of the caller's workspace",
                {"200": _ok("Removed", _ref("FileDeleted")), **refused, **_errors(401, 503)},
                security=AUTHENTICATED,
                parameters=[path_parameter],
                tags=("files",),
            ),
        },
    }


def _file_upload(
    settings: Settings, path_parameter: dict[str, Any], refused: dict[str, Any]
) -> dict[str, Any]:
    """``PUT /files/{path}``: its body is raw bytes, and may be empty."""
    return {
        **_operation(
            "Write a file into the caller's workspace (directories on the way are made)",
            {
                "200": _ok("Written", _ref("FileWritten")),
                **refused,
                "409": _error(
                    "A directory is where the file would go, or a file is where a directory would"
                ),
                **_errors(401, 408, 413, 503, 507),
            },
            security=AUTHENTICATED,
            parameters=[path_parameter],
            description=f"The body is the file's bytes, at most MAX_FILE_BYTES"
            f" ({settings.max_file_bytes}); it counts toward the caller's disk quota"
            " (USER_DISK_MAX_MB: 507 past it). The agent sees it on its next turn.",
            tags=("files",),
        ),
        # No body is an empty file.
        "requestBody": {"required": False, "content": _binary()},
    }


SESSION_HEADER_PARAMETER = {
    "name": "X-Session-Id",
    "in": "header",
    "schema": {"type": "string", "pattern": f"^{SESSION_ID_PATTERN.pattern}$"},
    "description": "a turn of the caller's session with this id: only the messages after the"
    " last assistant message are sent (the session holds the rest)",
}


def _compat_run(
    summary: str,
    reply: str,
    schemas: tuple[str, str, str],
    run_id_header: dict[str, Any],
    description: str,
) -> dict[str, Any]:
    """A compatible route's run: ``schemas`` is its reply's, its errors' and its body's."""
    reply_schema, error_schema, body_schema = schemas
    return _operation(
        summary,
        {
            "200": {
                "description": reply,
                "headers": run_id_header,
                "content": {
                    JSON: {"schema": _ref(reply_schema)},
                    EVENT_STREAM: _compat_event_stream(),
                },
            },
            **_compat_errors(error_schema, *BODY_ERRORS, *COMPAT_RUN_ERRORS),
        },
        security=AUTHENTICATED,
        description=description,
        body=_ref(body_schema),
        parameters=[SESSION_HEADER_PARAMETER],
        tags=("compatible",),
    )


COMPAT_RUN_ERRORS = (409, 429, 502, 503, 504, 507)


def _compat_paths(run_id_header: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI- and Anthropic-compatible routes (see README, "OpenAI- and
    Anthropic-compatible routes")."""
    return {
        "/v1/chat/completions": {
            "post": _compat_run(
                "OpenAI: create a chat completion (a run)",
                "A chat.completion; with `stream`, chat.completion.chunk"
                " events (`data:` lines) ending with `data: [DONE]`",
                ("ChatCompletion", "OpenAIError", "ChatCompletionRequest"),
                run_id_header,
                "The same run as `POST /run` (queue, sessions, ceilings, quotas),"
                ' in OpenAI\'s shapes; errors are OpenAI\'s `{"error": {"message", "type",'
                ' "param", "code"}}`.',
            )
        },
        "/v1/messages": {
            "post": _compat_run(
                "Anthropic: create a message (a run)",
                "A message; with `stream`, Anthropic's events"
                " (message_start, content_block_start, content_block_delta,"
                " content_block_stop, message_delta, message_stop)",
                ("AnthropicMessage", "AnthropicError", "AnthropicMessagesRequest"),
                run_id_header,
                "The same run as `POST /run`, in Anthropic's Messages API shapes;"
                ' errors are Anthropic\'s `{"type": "error", "error": {"type", "message"}}`.',
            )
        },
        **_model_paths(),
    }


def _model_paths() -> dict[str, Any]:
    """``GET /v1/models`` and ``GET /v1/models/{model}`` (OpenAI's)."""
    return {
        "/v1/models": {
            "get": _operation(
                "OpenAI: the models a request may name (ALLOWED_MODELS)",
                {
                    "200": _ok("OpenAI's list shape", _ref("ModelList")),
                    **_compat_errors("OpenAIError", 401, 503),
                },
                security=AUTHENTICATED,
                tags=("compatible",),
            )
        },
        "/v1/models/{model}": {
            "get": _operation(
                "OpenAI: one model a request may name",
                {
                    "200": _ok("The model", _ref("Model")),
                    **_compat_errors("OpenAIError", 401, 404, 503),
                },
                security=AUTHENTICATED,
                parameters=[
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                tags=("compatible",),
            )
        },
    }


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
            ' `{"error": "..."}` (under `/v1/`, OpenAI\'s or Anthropic\'s error shape instead);'
            " an unknown route answers 404, a method a route does not serve 405 (with `Allow`),"
            " and while the service shuts down every route answers 503.",
        },
        "paths": _paths(settings, metrics=settings.metrics),
        "components": {
            "schemas": {**_schemas(settings), **_compat_schemas(settings)},
            "responses": _responses(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key, or a token claude-code-web signs",
                },
                **(
                    {
                        "metricsToken": {
                            "type": "http",
                            "scheme": "bearer",
                            "description": "`METRICS_TOKEN`, for `GET /metrics` alone",
                        }
                    }
                    if settings.metrics and settings.metrics_token
                    else {}
                ),
            },
        },
    }
