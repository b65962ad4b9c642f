"""Who is calling: API keys, and the bearer tokens claude-code-web signs.

Two methods, tried in this order (claude-code-web's, with its holes closed):

1. ``x-api-key``: when present and not empty it must be a key (else 401
   ``Invalid API key``, never a fall back to the token).
2. ``Authorization: Bearer <value>``: the value as an API key, then as a token.
   Neither valid: 401 ``Invalid or expired token``; a header that is not a bearer
   (or an empty one): 401 ``Missing authorization token``.

No credentials at all (no ``x-api-key`` and no ``Authorization``, or both empty):
401 ``Missing API key``, the original's words where a plain API client reads them.

A key's user id comes from ``API_KEYS`` (``prefix:key`` -> prefix, plain key ->
"api"). A token is ``base64(username:timestampMs:hex(HMAC-SHA256(NEXTAUTH_SECRET,
username:timestampMs)))``; its user id is ``TOKEN_USER_PREFIX`` + username
(``anonymous`` when empty). The user id never comes from the request body.

Keys and MACs are compared in constant time. A token is valid for
:data:`TOKEN_LIFETIME_MS` after its timestamp and up to :data:`TOKEN_FUTURE_SKEW_MS`
before it; without ``NEXTAUTH_SECRET`` every token is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Protocol

from ..config.settings import Settings

TOKEN_LIFETIME_MS = 5 * 60 * 1000
# Clock skew tolerated between claude-code-web and this service.
TOKEN_FUTURE_SKEW_MS = 60 * 1000
# Longer tokens are refused unread: a username is a name or an e-mail address.
MAX_TOKEN_CHARS = 4096
MAX_USERNAME_CHARS = 256
ANONYMOUS = "anonymous"
# The original's answer to a request that sends no credentials at all.
MISSING_API_KEY = "Missing API key"


class HeaderLookup(Protocol):
    """Request headers (werkzeug's ``Headers``, or a plain dict in tests)."""

    def get(self, key: str, /) -> str | None: ...


class Unauthorized(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _mac(secret: str, signed: str) -> bytes:
    """The hex HMAC-SHA256 of ``signed`` (UTF-8, as Node hashes a string)."""
    key = secret.encode("utf-8", "surrogatepass")
    digest = hmac.new(key, signed.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return digest.hexdigest().encode("ascii")


def make_token(secret: str, username: str, timestamp_ms: int) -> str:
    """A token as claude-code-web makes it (for tests and tools)."""
    signed = f"{username}:{timestamp_ms}"
    text = f"{signed}:{_mac(secret, signed).decode()}"
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


def verify_token(token: str, secret: str, now_ms: int) -> str | None:
    """The token's username ("" when it signed none), or None if it is not valid now.

    Never raises. The username is everything before the last two ``:``, so it may
    hold ``:`` itself; it must be printable (it reaches logs and directory names).
    """
    if not secret or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        # Node writes padded standard base64; tolerate missing padding, nothing else.
        text = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        return None
    username, timestamp, mac = parts
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16):
        return None
    expected = _mac(secret, f"{username}:{timestamp}")
    mac_ok = hmac.compare_digest(expected, mac.encode("utf-8", "surrogatepass"))
    fresh = -TOKEN_FUTURE_SKEW_MS <= now_ms - int(timestamp) <= TOKEN_LIFETIME_MS
    if not (mac_ok and fresh):
        return None
    if len(username) > MAX_USERNAME_CHARS or not username.isprintable():
        return None
    return username


def authenticate(headers: HeaderLookup, settings: Settings, now_ms: int | None = None) -> str:
    """Return the caller's user id or raise :class:`Unauthorized`."""
    api_key = headers.get("x-api-key")
    if api_key:  # an empty x-api-key (claude-code-web sends one) means none
        user_id = settings.user_for_key(api_key)
        if user_id is None:
            raise Unauthorized("Invalid API key")
        return user_id
    authorization = headers.get("authorization") or ""
    if not authorization.strip():
        raise Unauthorized(MISSING_API_KEY)
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise Unauthorized("Missing authorization token")
    user_id = settings.user_for_key(value)
    if user_id is not None:
        return user_id
    now_ms = round(time.time() * 1000) if now_ms is None else now_ms
    username = verify_token(value, settings.nextauth_secret, now_ms)
    if username is None:
        raise Unauthorized("Invalid or expired token")
    return settings.token_user_prefix + (username or ANONYMOUS)


def check_metrics_token(headers: HeaderLookup, expected: str) -> None:
    """Raise :class:`Unauthorized` unless ``Authorization: Bearer <expected>`` was sent.

    ``METRICS_TOKEN`` guards the scrape alone: API keys and tokens do not open it (a
    Prometheus server is no user). Compared in constant time."""
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise Unauthorized("Missing metrics token")
    presented = value.encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(presented, expected.encode("utf-8", "surrogatepass")):
        raise Unauthorized("Invalid metrics token")


def is_admin(user_id: str, settings: Settings) -> bool:
    """Whether ``user_id`` may log the service in to Claude (``AUTH_ADMINS``; unset: anyone)."""
    return not settings.auth_admins or user_id in settings.auth_admins


def auth_warnings(settings: Settings) -> list[str]:
    """What start-up should say about how callers authenticate (one line each)."""
    warnings = []
    if not settings.api_keys and not settings.nextauth_secret:
        warnings.append(
            "neither API_KEYS nor NEXTAUTH_SECRET is set: every authenticated route will answer 401"
        )
    if not settings.auth_admins:
        warnings.append(
            "AUTH_ADMINS is not set: every authenticated caller may log the service in to "
            "Claude (POST /auth/login, /auth/exchange); set it to the user ids of your admins"
        )
    return warnings
