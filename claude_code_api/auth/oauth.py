"""Claude's OAuth (subscription login): PKCE, the authorize URL, and the token endpoint.

The same public client and endpoints as Claude Code's own ``claude login``:
the user opens :func:`authorize_url` in a browser, logs in, and the callback page
shows ``CODE#STATE``; :meth:`TokenEndpoint.exchange` trades the code for tokens,
:meth:`TokenEndpoint.refresh` trades a refresh token for fresh ones.

:class:`PendingLogins` remembers the PKCE verifier of each login started, by its
state, until it is exchanged (once), expires or is pushed out by newer ones.

Error handling: every way the token endpoint can fail (unreachable, too slow, a
non-2xx status, a body that is not a token grant) is a :class:`TokenEndpointError`
whose message is fit for a client and a log: it never holds a code, verifier or
token.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

import attrs
import trio

if TYPE_CHECKING:
    import httpx

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
AUTHORIZE_URL = "https://claude.ai/oauth/authorize"
REDIRECT_URI = "https://platform.claude.com/oauth/code/callback"
SCOPE = "org:create_api_key user:profile user:inference user:sessions:claude_code user:mcp_servers"

PENDING_LOGIN_S = 10 * 60.0
MAX_PENDING_LOGINS = 64
# claude-code-web gives up on /auth/exchange after 5 s: the call out must end well before.
EXCHANGE_TIMEOUT_S = 3.0
# Nobody waits for a refresh, but it must not hang the refresher either.
REFRESH_TIMEOUT_S = 15.0


def new_verifier() -> str:
    """A PKCE code verifier: 32 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def code_challenge(verifier: str) -> str:
    """The S256 challenge of ``verifier``: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_url(challenge: str, state: str) -> str:
    """Where the user logs in to Claude; the callback page then shows ``CODE#STATE``."""
    query = {
        "code": "true",
        "client_id": CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
    }
    return f"{AUTHORIZE_URL}?{urlencode(query, quote_via=quote)}"


class PendingLogins:
    """Logins started and not yet exchanged: state -> PKCE verifier.

    Each expires after ``ttl_s`` (trio time) and can be taken once; past
    ``max_size`` the oldest is forgotten, so repeated logins cost bounded memory.
    """

    def __init__(self, ttl_s: float = PENDING_LOGIN_S, max_size: int = MAX_PENDING_LOGINS):
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._logins: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def start(self) -> str:
        """Begin a login; returns the URL to open."""
        self._forget_expired()
        verifier, state = new_verifier(), secrets.token_urlsafe(32)
        self._logins[state] = (verifier, trio.current_time() + self.ttl_s)
        while len(self._logins) > self.max_size:
            self._logins.popitem(last=False)
        return authorize_url(code_challenge(verifier), state)

    def take(self, state: str) -> str | None:
        """The verifier of the pending login ``state`` (then forgotten), or None."""
        self._forget_expired()
        found = self._logins.pop(state, None)
        return None if found is None else found[0]

    def __len__(self) -> int:
        self._forget_expired()
        return len(self._logins)

    def _forget_expired(self) -> None:
        now = trio.current_time()
        for state in [s for s, (_, expires) in self._logins.items() if expires <= now]:
            del self._logins[state]


@attrs.frozen
class TokenGrant:
    """What the token endpoint granted."""

    access_token: str = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    expires_in_s: float
    scopes: tuple[str, ...] | None  # None: the endpoint did not say


class TokenEndpointError(Exception):
    """The token endpoint did not grant tokens; the message says why, without secrets."""


class TokenGranter(Protocol):
    """What grants tokens: :class:`TokenEndpoint`, or a fake in tests."""

    async def exchange(self, code: str, verifier: str, state: str) -> TokenGrant: ...

    async def refresh(self, refresh_token: str) -> TokenGrant: ...


class TokenEndpoint:
    """Claude's OAuth token endpoint at ``url`` (``CLAUDE_OAUTH_TOKEN_URL``).

    Each call opens its own short-lived HTTP client (httpx, which runs on trio):
    calls are rare, and nothing stays open between them. The proxy and CA
    variables of the environment apply (``HTTPS_PROXY``, ``SSL_CERT_FILE``).
    """

    def __init__(self, url: str) -> None:
        self.url = url

    async def exchange(self, code: str, verifier: str, state: str) -> TokenGrant:
        """Trade an authorization code for tokens, within :data:`EXCHANGE_TIMEOUT_S`."""
        payload = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": CLIENT_ID,
            "code_verifier": verifier,
            "state": state,
        }
        return await self._post(payload, EXCHANGE_TIMEOUT_S, hidden=(code, verifier, state))

    async def refresh(self, refresh_token: str) -> TokenGrant:
        """Trade a refresh token for fresh tokens, within :data:`REFRESH_TIMEOUT_S`."""
        payload = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
        }
        return await self._post(payload, REFRESH_TIMEOUT_S, hidden=(refresh_token,))

    async def _post(
        self, payload: dict[str, str], timeout_s: float, *, hidden: tuple[str, ...]
    ) -> TokenGrant:
        import httpx  # here, not at start-up: ~0.1 s, and logins and refreshes are rare

        response: httpx.Response | None = None
        # One deadline over connecting, sending and reading: httpx's own timeouts are per step.
        with trio.move_on_after(timeout_s):
            try:
                async with httpx.AsyncClient(timeout=timeout_s) as client:
                    response = await client.post(
                        self.url, json=payload, headers={"Accept": "application/json"}
                    )
            except httpx.HTTPError as exc:
                reason = _redact(str(exc), hidden) or type(exc).__name__
                raise TokenEndpointError(f"cannot reach the token endpoint: {reason}") from None
        if response is None:
            raise TokenEndpointError(f"the token endpoint did not answer within {timeout_s:g} s")
        if not response.is_success:
            detail = _error_detail(response, hidden)
            raise TokenEndpointError(f"the token endpoint answered {response.status_code}{detail}")
        try:
            return parse_grant(response.json())
        except ValueError as exc:
            raise TokenEndpointError(
                f"the token endpoint's answer is not a token grant: {exc}"
            ) from None


def parse_grant(body: Any) -> TokenGrant:
    """A token endpoint's JSON answer as a :class:`TokenGrant`; ValueError naming what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    access, refresh = body.get("access_token"), body.get("refresh_token")
    expires_in, scope = body.get("expires_in"), body.get("scope")
    if not isinstance(access, str) or not access:
        raise ValueError("access_token is missing")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise ValueError("refresh_token is not a string")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise ValueError("expires_in is not a positive number")
    if scope is not None and not isinstance(scope, str):
        raise ValueError("scope is not a string")
    scopes = None if scope is None else tuple(scope.split())
    return TokenGrant(access, refresh, float(expires_in), scopes)


def _error_detail(response: httpx.Response, hidden: tuple[str, ...]) -> str:
    """``": <error>"`` from an OAuth or Anthropic error body, if it has one."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # Anthropic's {"error": {"type", "message"}}
        parts = [error.get("type"), error.get("message")]
    else:  # OAuth's {"error", "error_description"}
        parts = [error, body.get("error_description") if isinstance(body, dict) else None]
    text = ": ".join(p for p in parts if isinstance(p, str) and p)
    text = "".join(c for c in _redact(text, hidden) if c.isprintable())[:200]
    return f" ({text})" if text else ""


def _redact(text: str, hidden: tuple[str, ...]) -> str:
    for secret in hidden:
        # Real codes and tokens are long; a short test value would mangle the text.
        if len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    return text
