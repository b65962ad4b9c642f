"""The Quart-Trio application: routes, auth and JSON errors.

The app holds no state of its own: it holds send channels to the dispatcher
(jobs, status) and the credentials actor (``/auth/*``) and asks them for
everything. It also describes itself (``/openapi.json``, ``/docs``: see
:mod:`.openapi`) and, unless ``METRICS=0``, counts its requests and serves
``/metrics`` (:mod:`.observe`). Every error a client can cause is answered as JSON
``{"error": ...}`` with a 4xx status; anything unexpected is logged and answered 500
JSON without a traceback.

Every route is a Quart route. In front of Quart, three ASGI layers, outermost first:

* :func:`merge_slashes`: repeated slashes in a path are one (``//run`` is ``/run``:
  what a base URL with a trailing slash makes of it), before any route is matched;
* :func:`~.observe.count_requests` (unless ``METRICS=0``): counts each request by
  route and status and times it to the end of its response, also a stream's whole
  length, and a client that left (499), which Quart's own hooks do not see;
* :func:`~.streaming.with_request_cleanups`: what a run's reply owns is released
  when the request ends, also when its stream never starts.

(The HTTP server adds its own in front of these: :mod:`.server`.)
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio
from quart import Response, g, has_request_context, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..actors.claude_login import ANSWER_TIMEOUT_S, CredentialsClient, CredentialsUnavailable
from ..actors.dispatcher import PoolView
from ..actors.registry_client import RegistryClient
from ..config.settings import Settings
from ..limits.disk_quota import DiskQuota
from ..limits.usage import UsageLedger
from ..messages import (
    AuthFailed,
    CredentialsStatus,
    DispatcherMessage,
    PoolSnapshot,
    RunState,
    RunView,
    SessionKey,
    SessionState,
    UpstreamError,
    WorkerState,
)
from ..observe import metrics
from ..proxy.model import ModelProxy, UpstreamRefusal
from ..store import SessionRecord
from ..store import StoreUnavailable as RegistryError
from ..store.user_paths import user_workspace
from .anthropic_api import anthropic_routes
from .auth import Unauthorized, authenticate, check_metrics_token, is_admin
from .compat import CompatRuns, error_body
from .docs import docs_page
from .files import files_routes
from .jobs import SessionStoreUnavailable, close_session, pool_snapshot
from .observe import count_requests, note_route, scrape
from .openai_api import limits_of, openai_routes
from .openapi import openapi_spec
from .parsing import BODY_TIMEOUT_S
from .requests import (
    BadRequest,
    ImageLimits,
    OptionCeiling,
    check_content_type,
    page_arguments,
    parse_exchange_code,
    parse_json_object,
    session_id_field,
)
from .runs import OtherReplicas, run_routes, run_views
from .streaming import with_request_cleanups
from .user_claude import SharedUserMemory, user_claude_routes

log = logging.getLogger(__name__)

# An idle session is "live" to clients (it has a process, ready for a turn).
SHOWN_SESSION_STATES = {SessionState.IDLE: "live"}
NEW_SESSION_STATES = (SessionState.WAITING.value, SessionState.STARTING.value)


class Forbidden(Exception):
    """The caller is known but may not do this (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def error(
    status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> Response:
    """A JSON error: ``{"error": message}``, or the compatible routes' own shapes (:mod:`.compat`)."""
    path = request.path if has_request_context() else ""
    response = jsonify(error_body(path, status, message, param))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@attrs.define
class StoreStatus:
    """Why the session store's writes fail now (None: they work), and how many records it holds.

    A published status, written by the registry (its health and count callbacks) and,
    with ``DATABASE_URL``, by the session leases' check of the database (source
    ``"database"``), and read by ``/health`` and ``/metrics``, so a failing disk or
    database shows there without a round trip through the registry, which may be stuck
    behind the very write that fails.
    """

    failures: dict[str, str] = attrs.Factory(dict)  # by source, those failing now
    records: int | None = None  # None: not counted (yet)

    @property
    def failure(self) -> str | None:
        return next(iter(self.failures.values()), None)

    def update(self, failure: str | None, source: str = "registry") -> None:
        if failure is None:
            self.failures.pop(source, None)
        else:
            self.failures[source] = failure

    def count(self, records: int) -> None:
        self.records = records


def health_body(
    snapshot: PoolSnapshot, uptime_ms: int, store_failure: str | None = None
) -> tuple[dict[str, Any], int]:
    # total: the workers for anyone (the original's fields); agents kept for their users
    # (AGENT_REUSE_S) and spare workers with no process are counted beside them.
    counts = {"total": 0, "ready": 0, "busy": 0, "starting": 0, "error": 0, "kept": 0, "dormant": 0}
    for worker in snapshot.workers:
        counts[worker.state.value] += 1
        if worker.state not in (WorkerState.KEPT, WorkerState.DORMANT):
            counts["total"] += 1
    reason = snapshot.degraded_reason
    if store_failure is not None:
        reason = f"session store unavailable: {store_failure}"
    if snapshot.draining:
        status, code = "stopping", 503
    elif reason is not None:
        status, code = "degraded", 503
    elif counts["ready"] or counts["busy"] or snapshot.ever_ready:
        # A worker being replaced after a job is not "down".
        status, code = "ok", 200
    else:
        status, code = "starting", 200
    body: dict[str, Any] = {
        "status": status,
        "workers": counts,
        "queue": {"length": snapshot.queue_length, "maxSize": snapshot.queue_max},
        "uptime": uptime_ms,
    }
    if reason is not None:
        body["reason"] = reason
    return body, code


def session_views(
    snapshot: PoolSnapshot,
    records: Sequence[SessionRecord],
    user_id: str,
    *,
    first_page: bool = True,
    elsewhere: tuple[RunView, ...] = (),
) -> list[dict[str, Any]]:
    """The caller's own sessions: registry records, with live states from the dispatcher
    (and ``busy`` for those running a turn on another replica: ``elsewhere``'s runs).

    Sessions waiting for their first actor may have no record yet: the first page lists
    them too.
    """
    live = {
        run.session_id: "busy"
        for run in elsewhere
        if run.session_id is not None and run.state is RunState.RUNNING
    }
    live.update(
        (v.key.session_id, SHOWN_SESSION_STATES.get(v.state, v.state.value))
        for v in snapshot.sessions
        if v.key.user_id == user_id
    )
    views = []
    for record in records:
        state = live.pop(record.session_id, "hibernated")
        views.append(
            {
                "id": record.session_id,
                "state": state,
                "processing": state == "busy",
                "lastActivity": round(record.last_activity * 1000),
                "turns": record.turns,
            }
        )
    if first_page:
        # A session waiting for a slot or starting its first actor may have no record
        # yet (the actor creates it); one with a live process always has.
        for session_id, state in live.items():
            if state in NEW_SESSION_STATES:
                views.append({"id": session_id, "state": state, "processing": False, "turns": 0})
    return views


def status_body(snapshot: PoolSnapshot) -> dict[str, Any]:
    workers = []
    for worker in snapshot.workers:
        view: dict[str, Any] = {"id": worker.id, "state": worker.state.value, "jobs": worker.jobs}
        if worker.busy_since is not None:
            view["busySince"] = round(worker.busy_since * 1000)
        if worker.last_error is not None:
            view["lastError"] = worker.last_error
        workers.append(view)
    return {
        "workers": workers,
        "queueLength": snapshot.queue_length,
        "maxQueueSize": snapshot.queue_max,
        "totalProcessed": snapshot.processed,
        "totalErrors": snapshot.failed,
    }


def auth_status_body(
    credentials: CredentialsStatus,
    snapshot: PoolSnapshot | None,
    now_ms: int,
    *,
    proxy_refusal: UpstreamRefusal | None = None,
) -> dict[str, Any]:
    """``GET /auth/status``: the credentials agents use, and the model API's last refusal.

    ``authenticated`` is False without credentials, with an access token that has
    expired and cannot be refreshed now, and after the model API refused the
    credentials (unless they changed since). The refusal is the model proxy's view
    (``proxy_refusal``: it puts the credential on every call, and sees every answer),
    else what the turns' failures told the dispatcher.
    """
    refused: UpstreamError | None = None if snapshot is None else snapshot.upstream_auth_error
    refused_at = (None if snapshot is None else snapshot.upstream_auth_error_at) or 0.0
    if proxy_refusal is not None and proxy_refusal.at >= refused_at:
        refused = UpstreamError(proxy_refusal.status, proxy_refusal.message, 0)
        refused_at = proxy_refusal.at
    if refused is not None and credentials.changed_at is not None:
        if refused_at < credentials.changed_at:
            refused = None  # a refusal of the credentials replaced since
    expires = credentials.expires_at_ms
    expired = expires is not None and expires <= now_ms
    stuck = expired and (not credentials.refreshable or credentials.refresh_failure is not None)
    body: dict[str, Any] = {
        "authenticated": credentials.method != "none" and not stuck and refused is None,
        "method": credentials.method,
    }
    if expires is not None:
        body["expiresAt"] = expires
    failure = credentials.refresh_failure
    if failure is not None:
        body["lastRefreshError"] = {
            "message": failure.message,
            "at": round(failure.at * 1000),
            "nextAttemptAt": round(failure.next_attempt_at * 1000),
        }
    if refused is not None:
        body["lastUpstreamAuthError"] = {
            "status": refused.status,
            "message": refused.message,
            "at": round(refused_at * 1000),
        }
    return body


_SLASHES = re.compile(r"/{2,}")


AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]


def merge_slashes(app: AsgiApp) -> AsgiApp:
    """ASGI: serve ``//run`` as ``/run`` (a client's base URL ending in ``/``), not 404 or redirect."""

    async def merged(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and "//" in scope["path"]:
            # raw_path (optional in ASGI) would still hold the slashes: drop it. The path
            # as sent stays in unmerged_path: /files/{path} refuses "//etc/passwd" instead
            # of reading it as "etc/passwd".
            scope = {k: v for k, v in scope.items() if k != "raw_path"}
            scope["unmerged_path"] = scope["path"]
            scope["path"] = _SLASHES.sub("/", scope["path"])
        await app(scope, receive, send)

    return merged


Caller = Callable[[], str]
JsonBody = Callable[[], Awaitable[bytes]]


def create_app(
    settings: Settings,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    registry: RegistryClient,
    store_status: StoreStatus | None = None,
    credentials: CredentialsClient | None = None,
    pool_view: PoolView | None = None,
    usage: UsageLedger | None = None,
    model_proxy: ModelProxy | None = None,
    disk: DiskQuota | None = None,
    other_replicas: OtherReplicas | None = None,
    shared_memory: SharedUserMemory | None = None,
) -> QuartTrio:
    """Build the app; ``dispatcher`` is a send channel to the dispatcher's inbox.

    ``usage``: the model proxy's ledger, for ``/status``'s ``usage`` (None: none shown).
    ``model_proxy``: its view of the model API's last refusal of the credential, which
    ``/auth/status`` reports (None: the dispatcher's, from the turns' failures).
    ``disk``: the service's disk quota and reserve (``/files`` writes are held to
    them); without, one of the settings' own. ``other_replicas``: with several replicas on
    one database, their runs (``/status``, ``DELETE /runs``); ``shared_memory``: and the
    users' CLAUDE.md.

    ``/health`` reads ``pool_view`` (the dispatcher's published state) when it can,
    so it never waits behind work; else it asks the dispatcher.

    Without ``credentials`` (tests of other routes), ``/auth/*`` answers 503.

    Each group of routes is registered by its own function below; this one only
    assembles them, in the order they were always registered.
    """
    store = store_status or StoreStatus()
    app = QuartTrio("claude_code_api")
    _install_layers(app, settings)

    def caller() -> str:
        return authenticate(request.headers, settings)

    json_body = partial(read_json_body, settings.max_body_bytes)
    if settings.metrics:
        _metrics_routes(app, settings, dispatcher, store, usage)
    _document_routes(app, settings)
    _pool_routes(app, dispatcher, registry, store, pool_view, usage, caller, other_replicas)
    _auth_routes(app, settings, dispatcher, credentials, model_proxy, caller, json_body)
    _session_routes(app, dispatcher, caller, json_body)
    _blueprints(app, settings, dispatcher, disk, caller, json_body, other_replicas, shared_memory)
    _error_handlers(app)
    return app


def _install_layers(app: QuartTrio, settings: Settings) -> None:
    """The ASGI layers (module docstring), Quart's limits, and closing after an unread body."""
    # The ASGI layers, outermost first (module docstring).
    cleaned = with_request_cleanups(app.asgi_app)
    counted = count_requests(cleaned) if settings.metrics else cleaned
    app.asgi_app = merge_slashes(counted)  # type: ignore[method-assign,assignment]
    # The largest body of any route: PUT /files/{path}'s, or a JSON body (held to its own
    # limit by read_json_body).
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, settings.max_file_bytes)
    # Quart cuts responses at 60 s by default; jobs have their own deadlines.
    app.config["RESPONSE_TIMEOUT"] = None

    @app.after_request
    async def close_if_body_unread(response: Response) -> Response:
        # An error answered before the request body was read (401, 413, 415...)
        # leaves that body on a kept-alive connection and wedges the next request.
        has_body = request.content_length or "chunked" in request.headers.get(
            "transfer-encoding", ""
        )
        if response.status_code >= 400 and has_body and not g.get("body_read"):
            response.headers["Connection"] = "close"
        return response


async def read_json_body(limit: int) -> bytes:
    """The current request's JSON body, at most ``limit`` bytes.

    Error handling: a wrong Content-Type is a :class:`BadRequest` (415), a body over
    ``limit`` (declared or as it arrives) one with 413, a body not received within
    ``BODY_TIMEOUT_S`` one with 408.
    """
    check_content_type(request.headers.get("content-type"))
    # Quart's own limit (MAX_CONTENT_LENGTH) is the larger one PUT /files needs: a
    # JSON body is held to max_body_bytes here, as it arrives.
    too_large = BadRequest(f"Request body exceeds {limit} bytes", 413)
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(BODY_TIMEOUT_S) as waited:
        async for chunk in request.body:
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    if waited.cancelled_caught:
        raise BadRequest(f"Request body not received within {BODY_TIMEOUT_S:g} s", 408)
    g.body_read = True
    return b"".join(chunks)


def _metrics_routes(
    app: QuartTrio,
    settings: Settings,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    store: StoreStatus,
    usage: UsageLedger | None,
) -> None:
    """``GET /metrics`` (behind ``METRICS_TOKEN`` when set), and naming each request's route."""

    @app.after_request
    async def name_the_route(response: Response) -> Response:
        rule = request.url_rule
        note_route(request.scope, None if rule is None else rule.rule)
        return response

    @app.get("/metrics")
    async def metrics_page() -> Response:
        if settings.metrics_token:
            try:
                check_metrics_token(request.headers, settings.metrics_token)
            except Unauthorized as exc:
                return error(401, exc.message, {"WWW-Authenticate": 'Bearer realm="metrics"'})

        async def snapshot() -> PoolSnapshot:
            return await pool_snapshot(dispatcher)

        text = await scrape(
            snapshot, settings.pool_size + settings.spare_workers, store.records, usage
        )
        return Response(text, content_type=metrics.CONTENT_TYPE)


def _document_routes(app: QuartTrio, settings: Settings) -> None:
    """``GET /openapi.json`` and ``GET /docs``: built once, from the settings."""
    spec = openapi_spec(settings)
    spec_json = json.dumps(spec, indent=1)
    docs_html = docs_page(spec)

    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        return Response(spec_json, content_type="application/json")

    @app.get("/docs")
    async def docs() -> Response:
        return Response(docs_html, content_type="text/html; charset=utf-8")


def _pool_routes(
    app: QuartTrio,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    registry: RegistryClient,
    store: StoreStatus,
    pool_view: PoolView | None,
    usage: UsageLedger | None,
    caller: Caller,
    other_replicas: OtherReplicas | None = None,
) -> None:
    """``GET /health`` (public) and ``GET /status`` (the caller's runs, sessions and usage)."""
    started_at = time.monotonic()

    @app.get("/health")
    async def health() -> Response:
        # From the pool's published state: never waits behind work. Nothing is
        # published while the dispatcher restarts: ask it then.
        snapshot = None if pool_view is None else pool_view.read()
        if snapshot is None:
            snapshot = await pool_snapshot(dispatcher)
        uptime_ms = round((time.monotonic() - started_at) * 1000)
        body, code = health_body(snapshot, uptime_ms, store.failure)
        response = jsonify(body)
        response.status_code = code
        return response

    @app.get("/status")
    async def status() -> Response:
        user_id = caller()
        snapshot = await pool_snapshot(dispatcher, user_id)
        body = status_body(snapshot)
        elsewhere: tuple[RunView, ...] = ()
        if other_replicas is not None:
            try:
                elsewhere = await other_replicas.runs_of(user_id)
            except RegistryError as exc:  # (this replica's runs are still worth showing)
                log.warning("/status: other replicas' runs not shown: %s", exc)
        body["runs"] = run_views(snapshot, elsewhere)
        limit, offset = page_arguments(request.args)
        page = await registry.list_for_user(user_id, limit=limit, offset=offset)
        body["sessions"] = session_views(
            snapshot, page.records, user_id, first_page=offset == 0, elsewhere=elsewhere
        )
        body["sessionsTotal"] = page.total
        if usage is not None:
            body["usage"] = usage.user_status(user_id)
        return jsonify(body)


def _auth_routes(
    app: QuartTrio,
    settings: Settings,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    credentials: CredentialsClient | None,
    model_proxy: ModelProxy | None,
    caller: Caller,
    json_body: JsonBody,
) -> None:
    """``/auth/status``, ``/auth/login`` and ``/auth/exchange``: asks the credentials actor.

    Error handling: without the actor, :class:`CredentialsUnavailable` (503); a caller
    not in ``AUTH_ADMINS`` logging the service in, :class:`Forbidden` (403).
    """

    def credentials_actor() -> CredentialsClient:
        if credentials is None:
            raise CredentialsUnavailable("the credentials service is not running")
        return credentials

    def admin() -> None:
        user_id = caller()
        if not is_admin(user_id, settings):
            log.warning("auth: %s may not log the service in to Claude (AUTH_ADMINS)", user_id)
            raise Forbidden("Only the users in AUTH_ADMINS may log the service in to Claude")

    @app.get("/auth/status")
    async def auth_status() -> Response:
        caller()
        known = await credentials_actor().status()
        snapshot = None
        # The model API's last refusal, if the dispatcher answers in time (it may be restarting).
        with trio.move_on_after(ANSWER_TIMEOUT_S):
            snapshot = await pool_snapshot(dispatcher)
        refused = None if model_proxy is None else model_proxy.last_refusal
        return jsonify(
            auth_status_body(known, snapshot, round(time.time() * 1000), proxy_refusal=refused)
        )

    @app.post("/auth/login")
    async def auth_login() -> Response:
        # No body is expected (claude-code-web sends none, with a JSON Content-Type).
        admin()
        return jsonify({"url": await credentials_actor().start_login()})

    @app.post("/auth/exchange")
    async def auth_exchange() -> Response:
        admin()
        code, state = parse_exchange_code(await json_body())
        outcome = await credentials_actor().exchange(code, state)
        if isinstance(outcome, AuthFailed):
            return error(outcome.status, outcome.error)
        return jsonify({"success": True})


def _session_routes(
    app: QuartTrio,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    caller: Caller,
    json_body: JsonBody,
) -> None:
    """``DELETE /session``: closes one of the caller's sessions (404 if unknown)."""

    @app.delete("/session")
    async def delete_session() -> Response:
        user_id = caller()
        session_id = session_id_field(parse_json_object(await json_body()), required=True)
        assert session_id is not None  # required=True
        try:
            existed = await close_session(dispatcher, SessionKey(user_id, session_id))
        except SessionStoreUnavailable as exc:
            return error(503, f"session store unavailable: {exc}")
        if not existed:
            return error(404, f"Session {session_id!r} not found")
        return jsonify({"closed": True})


def _blueprints(
    app: QuartTrio,
    settings: Settings,
    dispatcher: trio.MemorySendChannel[DispatcherMessage],
    disk: DiskQuota | None,
    caller: Caller,
    json_body: JsonBody,
    other_replicas: OtherReplicas | None = None,
    shared_memory: SharedUserMemory | None = None,
) -> None:
    """The routes other modules own: runs, the OpenAI and Anthropic APIs, files, CLAUDE.md."""
    ceiling = OptionCeiling.of(settings)
    app.register_blueprint(
        run_routes(
            dispatcher=dispatcher,
            caller=caller,
            json_body=json_body,
            data_dir=settings.data_dir,
            max_prompt_chars=settings.max_prompt_chars,
            max_timeout_ms=settings.max_timeout_ms,
            default_timeout_ms=settings.default_timeout_ms,
            ceiling=ceiling,
            image_limits=ImageLimits.of(settings),
            other_replicas=other_replicas,
            shared_memory=shared_memory,
        )
    )
    compat_runs = CompatRuns(
        dispatcher=dispatcher,
        caller=caller,
        json_body=json_body,
        data_dir=settings.data_dir,
        default_timeout_ms=settings.default_timeout_ms,
        limits=limits_of(settings, ceiling),
        shared_memory=shared_memory,
    )
    app.register_blueprint(
        openai_routes(
            compat_runs, allowed_models=settings.allowed_models, listed_at=int(time.time())
        )
    )
    app.register_blueprint(anthropic_routes(compat_runs))
    homes = partial(user_workspace, settings.data_dir)
    app.register_blueprint(
        files_routes(
            caller=caller,
            data_dir=settings.data_dir,
            max_file_bytes=settings.max_file_bytes,
            disk=disk or DiskQuota.from_settings(settings, homes),
            workspaces_dir=settings.workspaces_dir,
        )
    )
    app.register_blueprint(
        user_claude_routes(
            data_dir=settings.data_dir,
            dispatcher=dispatcher,
            caller=caller,
            json_body=json_body,
            shared=shared_memory,
        )
    )


def _error_handlers(app: QuartTrio) -> None:
    """Every error a client can cause, as JSON with its 4xx; anything else a logged 500."""

    @app.errorhandler(Unauthorized)
    async def unauthorized(exc: Unauthorized) -> Response:
        return error(401, exc.message)

    @app.errorhandler(Forbidden)
    async def forbidden(exc: Forbidden) -> Response:
        return error(403, exc.message)

    @app.errorhandler(CredentialsUnavailable)
    async def credentials_unavailable(exc: CredentialsUnavailable) -> Response:
        return error(503, str(exc))

    @app.errorhandler(RegistryError)
    async def store_unavailable(exc: RegistryError) -> Response:
        return error(503, f"session store unavailable: {exc}")

    @app.errorhandler(BadRequest)
    async def bad_request(exc: BadRequest) -> Response:
        return error(exc.status, exc.message, param=exc.param)

    @app.errorhandler(HTTPException)
    async def http_exception(exc: HTTPException) -> Response:
        messages = {
            404: "Not found",
            405: "Method not allowed",
            413: f"Request body exceeds {app.config['MAX_CONTENT_LENGTH']} bytes",
        }
        code = exc.code or 500
        response = error(code, messages.get(code, exc.description or exc.name))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error(500, "internal error")
