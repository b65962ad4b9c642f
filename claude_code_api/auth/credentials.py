"""Claude credentials: which ones agents use, and the service's credentials file.

* ``apiKey``: ``USE_CLAUDE_API_KEY`` is on and ``ANTHROPIC_API_KEY`` (or
  ``ANTHROPIC_AUTH_TOKEN``) is set: the model proxy uses it for agents.
* ``oauth``: ``CLAUDE_CODE_OAUTH_TOKEN`` is set, or the service's Claude config dir
  holds a login (``.credentials.json``, from ``claude login`` or ``/auth/exchange``).
* ``none``: agents' model calls will be refused (the model proxy has nothing to put on).

The credentials file is Claude Code's own: ``$CLAUDE_CONFIG_DIR/.credentials.json``,
else ``~/.claude/.credentials.json``, holding the login under ``claudeAiOauth``.
Agents never see it: the model proxy (:mod:`claude_code_api.proxy.model`) puts its
access token on their model calls, told of every change by the credentials actor. :class:`CredentialsFile` writes it atomically (a temporary
file, fsync, rename), mode 0600, keeping every other key in it.

Everything here is blocking file I/O: call it in a worker thread. Errors:
:class:`OSError` when the file cannot be read or written; a file that is not
JSON reads as "no login".
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ..agent.sandbox import CREDENTIALS_FILE, service_claude_dir
from .oauth import TokenGrant

log = logging.getLogger(__name__)

OAUTH_KEY = "claudeAiOauth"


@attrs.frozen
class OAuthLogin:
    """The OAuth login in the credentials file."""

    access_token: str = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    expires_at_ms: int | None


@attrs.frozen
class Credentials:
    method: str  # "apiKey" | "oauth" | "none"
    expires_at_ms: int | None = None  # an OAuth access token's expiry, when known
    # The file's login, when agents use it (not with an API key or CLAUDE_CODE_OAUTH_TOKEN).
    login: OAuthLogin | None = None


def credentials_path(environ: Mapping[str, str]) -> Path:
    """The service's credentials file (whether or not it exists)."""
    return service_claude_dir(environ) / CREDENTIALS_FILE


def read_credentials(environ: Mapping[str, str], use_claude_api_key: bool) -> Credentials:
    """What agents will log in with. Blocking (reads the credentials file)."""
    if use_claude_api_key and (
        environ.get("ANTHROPIC_API_KEY") or environ.get("ANTHROPIC_AUTH_TOKEN")
    ):
        return Credentials("apiKey")
    if environ.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return Credentials("oauth")
    try:
        login = CredentialsFile(credentials_path(environ)).login()
    except OSError:
        return Credentials("none")
    if login is None:
        return Credentials("none")
    return Credentials("oauth", login.expires_at_ms, login)


def _login_from(stored: Any) -> OAuthLogin | None:
    oauth = stored.get(OAUTH_KEY) if isinstance(stored, dict) else None
    if not isinstance(oauth, dict) or not isinstance(oauth.get("accessToken"), str):
        return None
    if not oauth["accessToken"]:
        return None
    refresh = oauth.get("refreshToken")
    expires = oauth.get("expiresAt")
    return OAuthLogin(
        oauth["accessToken"],
        refresh if isinstance(refresh, str) and refresh else None,
        expires if isinstance(expires, int) and not isinstance(expires, bool) else None,
    )


FileSignature = tuple[int, int, int]  # inode, mtime (ns), size


class CredentialsFile:
    """The service's Claude credentials file at ``path``. Blocking; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def signature(self) -> FileSignature | None:
        """What changes when the file is replaced or rewritten; None when it cannot be seen."""
        try:
            stat = self.path.stat()
        except OSError:  # missing, or a directory on the way that may not be searched
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def login(self) -> OAuthLogin | None:
        """The login in the file; None when there is none (or the file is not JSON)."""
        return _login_from(self._document())

    def save_login(self, grant: TokenGrant, now_ms: int) -> None:
        """Store a new login (from ``/auth/exchange``) in place of any earlier one."""
        document = self._document(replace_garbage=True)
        document[OAUTH_KEY] = {
            "accessToken": grant.access_token,
            "refreshToken": grant.refresh_token,
            "expiresAt": now_ms + round(grant.expires_in_s * 1000),
            "scopes": list(grant.scopes or ()),
            "subscriptionType": None,
            "rateLimitTier": None,
        }
        self._write(document)

    def save_stored(
        self,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int | None,
        scopes: tuple[str, ...] | None,
    ) -> None:
        """Store the login every replica shares (from the database), keeping the file's other
        keys and the login's other fields."""
        document = self._document(replace_garbage=True)
        oauth = document.get(OAUTH_KEY)
        oauth = dict(oauth) if isinstance(oauth, dict) else {}
        oauth.setdefault("subscriptionType", None)
        oauth.setdefault("rateLimitTier", None)
        oauth["accessToken"] = access_token
        oauth["refreshToken"] = refresh_token
        oauth["expiresAt"] = expires_at_ms
        if scopes is not None:
            oauth["scopes"] = list(scopes)
        document[OAUTH_KEY] = oauth
        self._write(document)

    def save_refresh(self, used_refresh_token: str, grant: TokenGrant, now_ms: int) -> bool:
        """Store refreshed tokens over the login they refresh, keeping its other fields.

        False (nothing written) when the file no longer holds the login whose refresh
        token was used: a newer login replaced it meanwhile and wins.
        """
        document = self._document()
        oauth = document.get(OAUTH_KEY)
        if not isinstance(oauth, dict) or oauth.get("refreshToken") != used_refresh_token:
            return False
        oauth = dict(oauth)
        oauth["accessToken"] = grant.access_token
        # Refresh tokens rotate; an endpoint that sends none keeps the old one valid.
        oauth["refreshToken"] = grant.refresh_token or used_refresh_token
        oauth["expiresAt"] = now_ms + round(grant.expires_in_s * 1000)
        if grant.scopes is not None:
            oauth["scopes"] = list(grant.scopes)
        document[OAUTH_KEY] = oauth
        self._write(document)
        return True

    def _document(self, *, replace_garbage: bool = False) -> dict[str, Any]:
        """The file's JSON object; ``{}`` when it does not exist or holds no object."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(data.decode("utf-8"))
        except ValueError:  # not UTF-8, or not JSON
            document = None
        if isinstance(document, dict):
            return document
        if replace_garbage:
            log.warning("%s is not a JSON object: replacing it", self.path)
        return {}

    def _write(self, document: dict[str, Any]) -> None:
        """Replace the file atomically with ``document``, mode 0600.

        A symlinked file is written where it points (a mounted volume's file).
        """
        target = Path(os.path.realpath(self.path))
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        # mkstemp creates the file 0600, so no reader ever sees the tokens with looser rights.
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".credentials.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
