"""The Claude login shared by replicas (``DATABASE_URL``): what the credentials actor asks of it.

With several replicas the login is one, kept in the database
(:mod:`claude_code_api.store.claude_login` implements :class:`SharedLogin`): the pending
OAuth logins (so ``/auth/exchange`` works on any replica), the stored login (access token,
refresh token, expiry; a ``generation`` that grows with every write) and the claim on its
refresh (refresh tokens rotate: two replicas refreshing with one token log everyone out).
Each replica's credentials actor copies the stored login into its own credentials file and
bumps its :class:`~claude_code_api.auth.renewal.CredentialsVersion`, as after a local
refresh.

Nothing here imports psycopg: the actor knows this protocol only.

Error handling: every method raises :class:`SharedLoginUnavailable` (its text says why)
when the database does not answer; nothing is changed then.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio


class SharedLoginUnavailable(Exception):
    """The shared login's database did not answer; the text says why, without secrets."""


@attrs.frozen
class StoredLogin:
    """The login every replica uses, as stored; ``generation`` grows with every write."""

    access_token: str = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    expires_at_ms: int | None
    scopes: tuple[str, ...] | None
    lifetime_s: float | None  # of the access token, when the service obtained it
    generation: int


@attrs.frozen
class Claimed:
    """This replica may refresh now, with the refresh token it named; no other will until
    it finishes, fails (then it holds the claim until its retry) or the claim expires."""


@attrs.frozen
class Rotated:
    """The stored login no longer has that refresh token: another replica refreshed it (or a
    new login replaced it). Use ``stored`` (None: no login is stored)."""

    stored: StoredLogin | None


@attrs.frozen
class Busy:
    """Another replica is refreshing that token; wait for its result (a change comes)."""


Claim = Claimed | Rotated | Busy


class SharedLogin(Protocol):
    """The database's side of the Claude login; see the module docstring."""

    async def add_pending(self, state: str, verifier: str, ttl_s: float, max_size: int) -> None:
        """Remember a login started: ``state`` -> PKCE ``verifier`` for ``ttl_s`` seconds
        (at most ``max_size`` kept: the oldest are forgotten)."""
        ...

    async def take_pending(self, state: str) -> str | None:
        """The verifier of the pending login ``state`` (then forgotten), or None."""
        ...

    async def load(self) -> StoredLogin | None: ...

    async def save_login(
        self,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int | None,
        scopes: tuple[str, ...] | None,
        lifetime_s: float | None,
    ) -> StoredLogin:
        """Store a new login in place of any other (and of any claim); tell every replica."""
        ...

    async def seed(
        self,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int | None,
    ) -> StoredLogin:
        """Store this login if none is stored (a replica's file, before the first login in the
        database); the stored one either way."""
        ...

    async def claim_refresh(self, owner: str, refresh_token: str, hold_s: float) -> Claim:
        """Ask to refresh with ``refresh_token``, for ``hold_s`` seconds at most."""
        ...

    async def finish_refresh(
        self,
        used: str,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int,
        scopes: tuple[str, ...] | None,
        lifetime_s: float,
    ) -> StoredLogin | None:
        """Store the tokens refreshing ``used`` gave, end the claim, tell every replica.
        None (nothing stored) when the stored login no longer has ``used``."""
        ...

    async def hold_claim(self, owner: str, refresh_token: str, hold_s: float) -> None:
        """Keep ``owner``'s claim on ``refresh_token`` ``hold_s`` seconds more (a failed
        refresh's back-off: the others wait for its retry rather than refresh too)."""
        ...

    async def serve_changes(
        self,
        changes: trio.MemorySendChannel[None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send to ``changes`` whenever the stored login may have changed (a wake-up: a hint,
        so also after reconnecting), until cancelled; started at once, reconnecting by itself."""
        ...
