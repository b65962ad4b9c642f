"""The model proxy: agents reach the model API through the service, never holding its credential.

Every agent gets ``ANTHROPIC_BASE_URL`` pointing here and a token of its own
(:func:`model_env`): random, registered when the agent starts and revoked when it
closes (:class:`Grants`), tied to the user and run it works for at the moment
(:class:`Charge`). The proxy checks the token, replaces it with the real
credential (:class:`UpstreamCredential`: the API key, or a bearer token), and
forwards the request to the model API the operator configured
(``ANTHROPIC_BASE_URL`` of the service's environment, default
``https://api.anthropic.com``), streaming the request's body up and the answer's
body back byte for byte, as they come. On the way back it reads the answer's
``usage`` (:mod:`claude_code_api.limits.usage`): what the user and the run spent is
counted from the model API's own answers, not from what an agent prints. While an
agent runs its warm-up turn (its grant ``warming``: before anyone's request reaches
it), the proxy answers its model call itself (:mod:`claude_code_api.agent.warm_up`) and
refuses any other: a warm-up never reaches the model API and is counted for no one.

It listens, outside every sandbox, on a Unix socket ``DATA_DIR/run/model-proxy.sock``
(bridged into an agent's network namespace, where it is ``127.0.0.1:``
:data:`SANDBOX_MODEL_PORT`) and on TCP ``127.0.0.1:<ephemeral port>`` for agents
that share the host's network. The listeners are opened once and kept across a
restart of the proxy's actor, so agents started before it keep their address.

Why h11 for the agents' side and httpx for the model API's side: the server is a
few explicit lines over h11 (already installed with hypercorn, and what the
mock Messages API uses) that notice a client hanging up while the model thinks,
with no framework timeout cutting a long stream; the client side needs TLS,
connection pooling and the operator's HTTPS_PROXY, which httpx (already a
dependency, maintained, runs on trio through anyio) gives.

Error handling: a request without a valid token is answered 401 with an
Anthropic-shaped error (one of an agent that has ended is logged, naming the
agent and its user); a user over the daily budget gets 429 with
``x-should-retry: false`` (the CLI ends the turn instead of retrying). When the
model API cannot be reached the agent's connection is closed without an answer,
so the CLI sees what it would have seen without the proxy (a connection error it
retries, ``status: null``); every status the model API answers with (401, 429,
5xx, 529) is passed on unchanged, so the CLI retries as before. A failure
handling one connection costs that connection only.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio

from ..agent import warm_up
from ..agent.protocol import Charge
from ..agent.sandbox import MODEL_PROXY_SOCKET, MODEL_VARIABLES, SANDBOX_MODEL_PORT

if TYPE_CHECKING:
    import httpx  # imported when the proxy starts: /health answers before
from ..limits.usage import UsageLedger, UsageReader

log = logging.getLogger(__name__)

DEFAULT_UPSTREAM = "https://api.anthropic.com"
TOKEN_PREFIX = "ccapi-agent-"
# Tokens of ended agents remembered, to say so in the log when one is used again.
REVOKED_REMEMBERED = 4096
RECEIVE_CHUNK = 65536
MAX_HEADER_BYTES = 256 * 1024
# Connecting to the model API; reading and writing are left to the CLI's own timeouts.
CONNECT_TIMEOUT_S = 30.0
# Hop-by-hop headers (RFC 9110 7.6.1) and what the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
CREDENTIAL_HEADERS = frozenset({b"x-api-key", b"authorization"})
# The model API's statuses for a credential it refuses, and how much of such an answer is kept.
AUTH_STATUSES = frozenset({401, 403})
MAX_ERROR_KEPT = 4096


def model_env(token: str, address: str) -> dict[str, str]:
    """What an agent's environment gets to reach the model API: the proxy and its token.

    ``address`` is :meth:`ModelProxy.address`'s for the agent (its network namespace's
    bridge, or the host's loopback). The credential variables the CLI would prefer to
    the token are emptied (the SDK merges the service's environment under these).
    """
    env = dict.fromkeys(MODEL_VARIABLES, "")
    env.update({"ANTHROPIC_BASE_URL": address, "ANTHROPIC_API_KEY": token})
    return env


# --- who may call, and for whom ---------------------------------------------------------


@attrs.define(eq=False)
class Grant:
    """One agent's right to call the model API: valid from its start until it closes.

    ``charge`` is whom its calls count against: set for each turn (a pool worker's
    agent starts before its user is known), and kept after the turn, so what the
    agent's tools still do with the token is its last user's.
    """

    agent: str  # for logs: "worker-0 (1a2b3c4d5e6f)"
    digest: bytes = attrs.field(repr=False)
    charge: Charge | None = None
    calls: int = 0
    # Its agent runs its warm-up turn (warm_up.py): the proxy answers its model calls itself.
    warming: bool = False


@attrs.frozen
class Revoked:
    agent: str
    user_id: str | None
    at: float  # time.time()


class Grants:
    """The live agents' tokens, by digest (the tokens themselves are never kept)."""

    def __init__(self) -> None:
        self._live: dict[bytes, Grant] = {}
        self._revoked: collections.OrderedDict[bytes, Revoked] = collections.OrderedDict()

    def register(self, agent: str) -> tuple[str, Grant]:
        """A new token for ``agent``, valid until :meth:`revoke`; returns it and its grant."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        grant = Grant(agent, _digest(token))
        self._live[grant.digest] = grant
        return token, grant

    def revoke(self, grant: Grant) -> None:
        """End ``grant``: its token is refused from now on (idempotent)."""
        if self._live.pop(grant.digest, None) is None:
            return
        user = None if grant.charge is None else grant.charge.user_id
        self._revoked[grant.digest] = Revoked(grant.agent, user, time.time())
        while len(self._revoked) > REVOKED_REMEMBERED:
            self._revoked.popitem(last=False)

    def find(self, token: str) -> Grant | Revoked | None:
        digest = _digest(token)
        return self._live.get(digest) or self._revoked.get(digest)

    def __len__(self) -> int:
        return len(self._live)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode(errors="surrogateescape")).digest()


# --- what is put on the request -------------------------------------------------------------


# What the CLI adds to anthropic-beta when it logs in with a Claude login (bundled 2.1.331).
OAUTH_BETA = b"oauth-2025-04-20"


class UpstreamCredential:
    """The real credential the proxy puts on every forwarded request, in place of the token.

    One of, as the service's settings say (:meth:`for_service`):

    * ``api_key``: ``ANTHROPIC_API_KEY`` (``USE_CLAUDE_API_KEY=1``), as ``x-api-key``;
    * ``auth_token``: ``ANTHROPIC_AUTH_TOKEN`` (``USE_CLAUDE_API_KEY=1``, no key), as
      ``Authorization: Bearer`` (a gateway's);
    * ``oauth``: the Claude login — ``CLAUDE_CODE_OAUTH_TOKEN``, or the access token of the
      service's credentials file, which the credentials actor keeps fresh and hands over
      (:meth:`update`) — as ``Authorization: Bearer``, with ``oauth-2025-04-20`` added to
      ``anthropic-beta``, as the CLI sends a login itself.

    ``apply`` returns None while there is no credential (no login yet): the proxy then
    answers 401 itself, naming what to do.
    """

    def __init__(self, method: str, secret: str | None = None, *, file_login: bool = False) -> None:
        self.method = method
        self._secret = secret
        self.file_login = file_login  # the token comes from the credentials file (update)

    @classmethod
    def for_service(cls, environ: Mapping[str, str], use_api_key: bool) -> UpstreamCredential:
        if use_api_key:
            if key := environ.get("ANTHROPIC_API_KEY", "").strip():
                return cls("api_key", key)
            if bearer := environ.get("ANTHROPIC_AUTH_TOKEN", "").strip():
                return cls("auth_token", bearer)
        if token := environ.get("CLAUDE_CODE_OAUTH_TOKEN", "").strip():
            return cls("oauth", token)
        return cls("oauth", None, file_login=True)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> UpstreamCredential:
        """With ``USE_CLAUDE_API_KEY=1``: the key, else the auth token, of ``environ``."""
        return cls.for_service(environ, True)

    def update(self, access_token: str | None) -> None:
        """The credentials file's login changed (the credentials actor read it)."""
        if self.file_login:
            self._secret = access_token or None

    @property
    def available(self) -> bool:
        return self._secret is not None

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
        """``headers`` (credential headers already removed) with the credential put on."""
        secret = self._secret
        if secret is None:
            return None
        if self.method == "api_key":
            return [*headers, (b"x-api-key", secret.encode())]
        bearer = (b"authorization", b"Bearer " + secret.encode())
        if self.method != "oauth":
            return [*headers, bearer]
        out, beta_seen = [], False
        for name, value in headers:
            if name == b"anthropic-beta":
                beta_seen = True
                betas = [b.strip() for b in value.split(b",") if b.strip()]
                if OAUTH_BETA not in betas:
                    value = b",".join([*betas, OAUTH_BETA])
            out.append((name, value))
        if not beta_seen:
            out.append((b"anthropic-beta", OAUTH_BETA))
        return [*out, bearer]


NO_CREDENTIALS = (
    "the service has no Claude credentials: log it in (claude-code-api login, or POST"
    " /auth/login), or set ANTHROPIC_API_KEY with USE_CLAUDE_API_KEY=1"
)


def keep_memory_private() -> bool:
    """Make this process non-dumpable (``PR_SET_DUMPABLE`` 0); True when it is. Linux only.

    The service holds the model API's key (in its environment and memory). Agents without
    the sandbox may run as the service's own OS user: a non-dumpable process's
    ``/proc/<pid>/environ``, ``mem`` and the like are root's, and no process of the same
    uid may attach to it. Its children (agents) are dumpable again once they exec.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(4, 0, 0, 0, 0)) == 0  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        return False


def upstream_url(environ: Mapping[str, str]) -> str:
    """The model API the operator configured: ``ANTHROPIC_BASE_URL``, or Anthropic's."""
    return (environ.get("ANTHROPIC_BASE_URL", "").strip() or DEFAULT_UPSTREAM).rstrip("/")


# --- the proxy ------------------------------------------------------------------------------


class ModelProxy:
    """The proxy's state (grants, listeners, the HTTP client) and its actor (:meth:`serve`).

    Owned by the service, which builds it once: a restart of its actor keeps the
    grants and the listeners (agents keep their address and tokens).
    """

    def __init__(
        self,
        run_dir: Path,
        upstream: str,
        credential: UpstreamCredential,
        ledger: UsageLedger | None = None,
        *,
        tcp_host: str = "127.0.0.1",
    ) -> None:
        self.run_dir = run_dir
        self.upstream = upstream.rstrip("/")
        self.credential = credential
        self.ledger = ledger
        self.grants = Grants()
        self._tcp_host = tcp_host
        # The model API's last refusal of the credential, until a call succeeds (/auth/status).
        self.last_refusal: UpstreamRefusal | None = None
        self._listeners: list[trio.abc.Listener[Any]] = []
        self._port: int | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / MODEL_PROXY_SOCKET

    def address(self, *, in_netns: bool) -> str:
        """The ``ANTHROPIC_BASE_URL`` of an agent: in a network namespace of its own, or not."""
        if in_netns:
            return f"http://127.0.0.1:{SANDBOX_MODEL_PORT}"
        if self._port is None:
            raise RuntimeError("the model proxy is not listening yet")
        return f"http://{self._tcp_host}:{self._port}"

    def env(self, token: str, *, in_netns: bool = False) -> dict[str, str]:
        """:func:`model_env` for an agent holding ``token``."""
        return model_env(token, self.address(in_netns=in_netns))

    async def _open_listeners(self) -> None:
        if self._listeners:
            return
        tcp = await trio.open_tcp_listeners(0, host=self._tcp_host)
        self._port = tcp[0].socket.getsockname()[1]
        self._listeners = [*tcp]
        try:
            self._listeners.append(await self._open_unix_listener())
        except OSError as exc:
            log.error(
                "model proxy: cannot listen on %s (%s): agents in a network namespace of their"
                " own cannot reach the model API",
                self.socket_path,
                exc.strerror or exc,
            )

    async def _open_unix_listener(self) -> trio.SocketListener:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.socket_path
        with suppress(FileNotFoundError):
            path.unlink()
        unix = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        # A Unix socket's path holds 107 bytes at most, and DATA_DIR may be deeper: bound
        # through its directory's descriptor (/proc/self/fd/N/...), any depth works.
        directory = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await unix.bind(f"/proc/self/fd/{directory}/{MODEL_PROXY_SOCKET}")
        except OSError:
            unix.close()
            raise
        finally:
            os.close(directory)
        # Anyone who reaches it needs a token all the same; the bridge in a sandbox runs as
        # the agent's own user. (Its directory is the service's, hidden from agents.)
        os.chmod(path, 0o666)
        unix.listen(128)
        return trio.SocketListener(unix)

    async def aclose(self) -> None:
        """Close the listeners and remove the socket file (the service's end). Shielded."""
        if self._listeners:
            with suppress(OSError):
                self.socket_path.unlink()
        listeners, self._listeners = self._listeners, []
        with trio.CancelScope(shield=True):
            for listener in listeners:
                with suppress(Exception):
                    await listener.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept agents' connections until cancelled. Started once the listeners are open."""
        import httpx

        await self._open_listeners()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept, listener, client, nursery)
                log.info(
                    "model proxy: agents reach it at %s and %s; it forwards to %s (%s)",
                    self.address(in_netns=False),
                    self.socket_path,
                    self.upstream,
                    self.credential.method,
                )
                task_status.started()

    async def _accept(
        self, listener: trio.abc.Listener[Any], client: httpx.AsyncClient, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:  # out of descriptors: wait, as trio's serve_listeners does
                log.error("model proxy: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_connection, stream, client)

    async def _serve_connection(self, stream: trio.abc.Stream, client: httpx.AsyncClient) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                request = await _next_request(connection, stream)
                if request is None:
                    return
                await _Exchange(self, connection, stream, client, request).run()
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (_Hangup, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except h11.RemoteProtocolError:
            if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    body = error_body("invalid_request_error", "malformed HTTP request")
                    await _send(connection, stream, *_json_events(400, body))
        except Exception:
            log.exception("model proxy: a request failed; its connection is closed")
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    def upstream_refused(self, status: int, body: bytes) -> None:
        try:
            error = json.loads(body).get("error", {})
            message = str(error.get("message") or error.get("type") or "")
        except (ValueError, AttributeError):
            message = ""
        message = " ".join((message or f"HTTP {status}").split())[:500]
        if self.last_refusal is None or self.last_refusal.message != message:
            log.warning(
                "model proxy: the model API refused the credential (%s): %s", status, message
            )
        self.last_refusal = UpstreamRefusal(status, message, time.time())

    def authorize(self, request: h11.Request) -> tuple[Grant | None, tuple[int, bytes] | None]:
        """The grant of ``request``'s token, or the refusal to answer with (status, body)."""
        token = _token_of(request)
        found = self.grants.find(token) if token else None
        if isinstance(found, Grant):
            return found, None
        target = request.target.decode(errors="replace")[:200]
        if isinstance(found, Revoked):
            log.warning(
                "model proxy: refused %s %s with the token of %s (user %s), which ended %s",
                request.method.decode(errors="replace"),
                target,
                found.agent,
                found.user_id or "none yet",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.at)),
            )
            message = "this agent's token has expired: its agent has ended"
        else:
            log.warning("model proxy: refused %s without a valid agent token", target)
            message = "invalid agent token: only the service's agents may call the model API here"
        return None, (401, error_body("authentication_error", message))


@attrs.frozen
class UpstreamRefusal:
    """The model API refused the service's credential (401, 403): its words, and when."""

    status: int
    message: str
    at: float  # time.time()


class _Hangup(Exception):
    """The agent closed its connection."""


# What a connection whose agent went away fails with, in an exchange's tasks.
_CONNECTION_GONE = (_Hangup, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


class _Exchange:
    """One request from an agent and its answer."""

    def __init__(
        self,
        proxy: ModelProxy,
        connection: h11.Connection,
        stream: trio.abc.Stream,
        client: httpx.AsyncClient,
        request: h11.Request,
    ) -> None:
        self.proxy = proxy
        self.connection = connection
        self.stream = stream
        self.client = client
        self.request = request
        self.body_read = trio.Event()

    async def run(self) -> None:
        proxy, request = self.proxy, self.request
        grant, refusal = proxy.authorize(request)
        if grant is None or refusal is not None:
            assert refusal is not None
            await self._refuse(*refusal)
            return
        grant.calls += 1
        if grant.warming:  # before any credential: a warm-up never reaches the model API
            await self._answer_warm_up()
            return
        if not proxy.credential.available:
            await self._refuse(401, error_body("authentication_error", NO_CREDENTIALS))
            return
        path = request.target.split(b"?", 1)[0]
        metered = request.method == b"POST" and path == b"/v1/messages"
        ledger = proxy.ledger
        if metered and ledger is not None and grant.charge is not None:
            over = ledger.refusal(grant.charge)
            if over is not None:
                status, body, headers = over
                await self._refuse(status, body, headers)
                return
        reader = UsageReader() if metered else None
        gone = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_for_hangup, nursery.cancel_scope)
                await self._forward(reader)
                nursery.cancel_scope.cancel()
        except* _CONNECTION_GONE:
            # The agent went away mid-call (it gave up, or was killed: past AGENT_MEMORY_MB,
            # say), or the model API did (_forward's _Hangup): this connection is done.
            # Anything else propagates: a fault, logged by _serve_connection.
            gone = True
        if nursery.cancel_scope.cancelled_caught and self.connection.our_state is not h11.DONE:
            gone = True
        if reader is not None and ledger is not None and reader.seen:
            ledger.record(grant.charge, reader.model, reader.usage)
        if gone:
            raise _Hangup

    async def _answer_warm_up(self) -> None:
        """Answer a warming agent's call here (warm_up.py): its model call, or a refusal."""
        path = self.request.target.split(b"?", 1)[0]
        if self.request.method != b"POST" or path != b"/v1/messages":
            body = error_body("permission_error", "no other call during an agent's warm-up")
            await self._refuse(403, body)
            return
        body = b"".join([chunk async for chunk in self._request_body()])
        content_type, answer = warm_up.answer(body)
        head = [(b"content-type", content_type), (b"content-length", str(len(answer)).encode())]
        await _send(
            self.connection,
            self.stream,
            h11.Response(status_code=200, headers=head),
            h11.Data(data=answer),
            h11.EndOfMessage(),
        )

    async def _refuse(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        # The body is read first: the connection stays usable for the next request.
        async for _ in self._request_body():
            pass
        await _send(self.connection, self.stream, *_json_events(status, body, headers))

    async def _request_body(self) -> AsyncIterator[bytes]:
        while True:
            event = self.connection.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
                if not data:
                    raise _Hangup
                self.connection.receive_data(bytes(data))
            elif isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_read.set()
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise _Hangup

    async def _watch_for_hangup(self, scope: trio.CancelScope) -> None:
        """Once the request is read, an EOF from the agent means it gave up: stop at once."""
        await self.body_read.wait()
        try:
            while data := await self.stream.receive_some(RECEIVE_CHUNK):
                self.connection.receive_data(bytes(data))  # an early next request: h11 keeps it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self.connection.our_state not in (h11.DONE, h11.MUST_CLOSE):
            scope.cancel()

    async def _forward(self, reader: UsageReader | None) -> None:
        """Send the agent's request upstream with the real credential; relay the answer."""
        import httpx

        upstream_request, has_body = self._upstream_request()
        if not has_body:
            async for _ in self._request_body():
                pass
        try:
            response = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            # As without the proxy: the agent's call fails without an answer (it retries).
            log.warning(
                "model proxy: the model API at %s is unreachable: %r", self.proxy.upstream, exc
            )
            raise _Hangup from exc
        try:
            await self._relay(response, reader)
        except httpx.TransportError as exc:
            log.warning("model proxy: the model API's answer broke off: %r", exc)
            raise _Hangup from exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await response.aclose()

    def _upstream_request(self) -> tuple[httpx.Request, bool]:
        """The request to the model API (the real credential on it), and whether it has a
        body (streamed from the agent's as it comes)."""
        proxy, request = self.proxy, self.request
        headers = [
            (name, value)
            for name, value in request.headers
            if name not in HOP_BY_HOP
            and name not in CREDENTIAL_HEADERS
            and name not in (b"host", b"accept-encoding")
        ]
        credentialed = proxy.credential.apply(headers)
        assert credentialed is not None  # (checked before: run)
        # The answer's bytes are passed on as they are, and read on the way for its usage.
        credentialed.append((b"accept-encoding", b"identity"))
        has_body = any(
            name in (b"content-length", b"transfer-encoding") for name, _ in request.headers
        )
        upstream_request = self.client.build_request(
            request.method.decode("ascii"),
            proxy.upstream + request.target.decode("ascii", errors="replace"),
            headers=credentialed,
            content=self._request_body() if has_body else None,
        )
        return upstream_request, has_body

    async def _relay(self, response: httpx.Response, reader: UsageReader | None) -> None:
        """Pass the model API's answer to the agent unchanged, reading its usage on the way;
        a refusal of the credential (401/403) is noted before the agent can see it."""
        proxy = self.proxy
        kept = [
            (name, value) for name, value in response.headers.raw if name.lower() not in HOP_BY_HOP
        ]
        if reader is not None:
            reader.start(response.status_code, response.headers.get("content-type", ""))
        reason = (response.reason_phrase or "").encode("ascii", errors="replace")
        head = h11.Response(status_code=response.status_code, headers=kept, reason=reason)
        await _send(self.connection, self.stream, head)
        chunks: AsyncIterator[bytes]
        if response.status_code in AUTH_STATUSES:
            # Read whole (a short error), noted, then sent: a client that has the body
            # (its Content-Length reached) before the end of the message is sent must
            # find the refusal noted already.
            body = b"".join([chunk async for chunk in response.aiter_raw()])  # (as sent)
            proxy.upstream_refused(response.status_code, body[:MAX_ERROR_KEPT])
            chunks = _one(body)
        else:
            chunks = response.aiter_raw()
        async for chunk in chunks:
            if reader is not None:
                reader.feed(chunk)
            await _send(self.connection, self.stream, h11.Data(data=chunk))
        if response.status_code == 200:
            proxy.last_refusal = None
        await _send(self.connection, self.stream, h11.EndOfMessage())


async def _one(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


async def _next_request(connection: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data and not connection.trailing_data[0]:
                return None
            connection.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            return event
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # (h11 gives nothing else before a request)
            return None


def _token_of(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"x-api-key":
            return value.decode(errors="replace").strip() or None
    for name, value in request.headers:
        if name == b"authorization":
            scheme, _, token = value.decode(errors="replace").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip() or None
    return None


def error_body(error_type: str, message: str) -> bytes:
    """An error as the model API words one (the CLI shows its ``message``)."""
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()


def _json_events(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    return [h11.Response(status_code=status, headers=head), h11.Data(data=body), h11.EndOfMessage()]


async def _send(connection: h11.Connection, stream: trio.abc.Stream, *events: Any) -> None:
    for event in events:
        data = connection.send(event)
        if data:
            await stream.send_all(data)
