"""Who is calling: API keys from ``x-api-key`` or ``Authorization: Bearer``.

The user id always comes from the key (``prefix:key`` -> prefix, plain key ->
"api"), never from the request body. Keys are compared in constant time.
claude-code-web's HMAC bearer tokens will slot in here as a second method.
"""

from __future__ import annotations

from typing import Protocol

from ..config import Settings


class HeaderLookup(Protocol):
    """Request headers (werkzeug's ``Headers``, or a plain dict in tests)."""

    def get(self, key: str, /) -> str | None: ...


class Unauthorized(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def authenticate(headers: HeaderLookup, settings: Settings) -> str:
    """Return the caller's user id or raise :class:`Unauthorized`."""
    api_key = headers.get("x-api-key")
    if api_key:
        user_id = settings.user_for_key(api_key)
        if user_id is None:
            raise Unauthorized("Invalid API key")
        return user_id
    authorization = headers.get("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing authorization token")
    user_id = settings.user_for_key(token.strip())
    if user_id is None:
        raise Unauthorized("Invalid or expired token")
    return user_id
