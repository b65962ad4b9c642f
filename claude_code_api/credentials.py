"""Which Claude credentials the agents use, as far as the service can tell without asking them.

* ``apiKey``: ``USE_CLAUDE_API_KEY`` is on and ``ANTHROPIC_API_KEY`` (or
  ``ANTHROPIC_AUTH_TOKEN``) is set: agents get it.
* ``oauth``: ``CLAUDE_CODE_OAUTH_TOKEN`` is set, or the service's Claude config dir
  holds a login (``.credentials.json``, from ``claude login`` or ``/auth/exchange``).
* ``none``: agents will answer "Not logged in".

:func:`read_credentials` reads the file (blocking: call it in a thread).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from .sandbox import CREDENTIALS_FILE, service_claude_dir


@attrs.frozen
class Credentials:
    method: str  # "apiKey" | "oauth" | "none"
    expires_at_ms: int | None = None  # an OAuth access token's expiry, when known


def read_credentials(environ: Mapping[str, str], use_claude_api_key: bool) -> Credentials:
    """What agents will log in with. Blocking (reads the credentials file)."""
    if use_claude_api_key and (
        environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN")
    ):
        return Credentials("apiKey")
    if environ.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return Credentials("oauth")
    path = service_claude_dir(environ) / CREDENTIALS_FILE
    try:
        stored: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return Credentials("none")
    oauth = stored.get("claudeAiOauth") if isinstance(stored, dict) else None
    if not isinstance(oauth, dict) or not oauth.get("accessToken"):
        return Credentials("none")
    expires = oauth.get("expiresAt")
    return Credentials("oauth", expires if isinstance(expires, int) else None)
