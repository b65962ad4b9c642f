"""Credentials actor: what the service knows about the Claude credentials agents use.

It owns:

* the view ``GET /auth/status`` shows (:class:`CredentialsStatus`): the method
  (``apiKey``, ``oauth``, ``none``), the OAuth access token's expiry, the newest
  refresh failure — answered from memory, never by running a process;
* every write of the service's credentials file (:class:`CredentialsFile`): the
  login ``/auth/exchange`` gets, and refreshed tokens. One writer, so a refresh
  and a login never interleave;
* the pending OAuth logins of ``/auth/login`` (:class:`PendingLogins`);
* the bumps of :class:`CredentialsVersion`: after a login, a refresh, or the
  file changed from outside (``claude login``, a mounted volume; checked every
  :data:`FILE_CHECK_INTERVAL_S`), so idle agents restart with the new credentials.

Refresh: while agents use the file's OAuth login and it has a refresh token, the
access token is refreshed when less than ``OAUTH_REFRESH_MARGIN_S`` of it remain
(for a token this service obtained, at the latest halfway through its life), also
for a login that was there at start-up. Refresh tokens rotate: the new one is
stored before anything else happens.

With ``DATABASE_URL`` (a :class:`~claude_code_api.auth.shared_login.SharedLogin`), the login
is one for every replica: pending logins are kept in the database (an exchange works on
any replica), a login or refresh is stored there first and every replica copies it into
its own file (told by a notification, else within :data:`SHARED_CHECK_INTERVAL_S`); a
refresh is made by the replica that claims it, the others wait and take its result
rather than use a refresh token already rotated. A login in the file and none in the
database is stored there (the first replica's, at start-up).

Error handling: a failed refresh is kept for ``/auth/status`` and retried after
:data:`REFRESH_RETRY_FIRST_S`, doubling up to :data:`REFRESH_RETRY_MAX_S`: never
a storm. A failed exchange answers its request (502: the token endpoint, 503:
the file) and changes nothing. File I/O runs in worker threads. The calls out
are bounded (:mod:`claude_code_api.auth.oauth`) and run in the actor's own nursery,
so it answers status requests meanwhile. No message or log line holds a code,
verifier or token.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, assert_never

import trio

from ..auth.credentials import Credentials, CredentialsFile, credentials_path, read_credentials
from ..auth.oauth import (
    MAX_PENDING_LOGINS,
    PENDING_LOGIN_S,
    REFRESH_TIMEOUT_S,
    PendingLogins,
    TokenEndpointError,
    TokenGrant,
    TokenGranter,
    authorize_url,
    code_challenge,
    new_verifier,
)
from ..auth.renewal import CredentialsVersion
from ..auth.shared_login import (
    Busy,
    Claimed,
    Rotated,
    SharedLogin,
    SharedLoginUnavailable,
    StoredLogin,
)
from ..messages import (
    AuthFailed,
    CredentialsMessage,
    CredentialsStatus,
    CredentialsStatusRequest,
    ExchangeCode,
    LoginSaved,
    RefreshFailure,
    StartLogin,
    answer_once,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]

REFRESH_RETRY_FIRST_S = 10.0
REFRESH_RETRY_MAX_S = 300.0
# However short-lived the tokens the endpoint grants, refreshes are at least this far apart.
MIN_REFRESH_INTERVAL_S = 30.0
FILE_CHECK_INTERVAL_S = 30.0
# With a shared login: how often the database's login is read besides its notifications, how
# long a refresh claim lasts (the refresh's own timeout and a margin), and how soon a replica
# that found another refreshing looks again if no notification comes.
SHARED_CHECK_INTERVAL_S = 15.0
REFRESH_CLAIM_S = REFRESH_TIMEOUT_S + 15.0
REFRESH_BUSY_RECHECK_S = 5.0
NO_MATCHING_LOGIN = "No matching OAuth session. Start login again."
# How long an HTTP handler waits for the actor (claude-code-web gives up after 5 s).
ANSWER_TIMEOUT_S = 2.0
EXCHANGE_ANSWER_TIMEOUT_S = 4.0


class CredentialsUnavailable(Exception):
    """The credentials actor did not answer in time (it is restarting, or stuck)."""


class CredentialsClient:
    """How HTTP handlers ask the credentials actor, each request bounded in time."""

    def __init__(self, inbox: trio.MemorySendChannel[CredentialsMessage]) -> None:
        self.inbox = inbox

    async def status(self) -> CredentialsStatus:
        send, receive = trio.open_memory_channel[CredentialsStatus](1)
        return await self._ask(CredentialsStatusRequest(send), receive, ANSWER_TIMEOUT_S)

    async def start_login(self) -> str:
        send, receive = trio.open_memory_channel[str](1)
        return await self._ask(StartLogin(send), receive, ANSWER_TIMEOUT_S)

    async def exchange(self, code: str, state: str) -> LoginSaved | AuthFailed:
        send, receive = trio.open_memory_channel[LoginSaved | AuthFailed](1)
        message = ExchangeCode(code, state, send)
        return await self._ask(message, receive, EXCHANGE_ANSWER_TIMEOUT_S)

    async def _ask(
        self,
        message: CredentialsMessage,
        receive: trio.MemoryReceiveChannel[T],
        timeout_s: float,
    ) -> T:
        with receive, trio.move_on_after(timeout_s):
            await self.inbox.send(message)
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                pass
        raise CredentialsUnavailable("the credentials service did not answer in time")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class CredentialsActor:
    """See the module docstring. ``inbox`` is the receive end of its (tree-owned) channel.

    ``wall_clock`` gives the time in seconds since the epoch (expiry times are
    wall-clock times) and ``run_blocking`` runs file I/O (in a thread); tests on
    trio's MockClock derive the one from trio's clock and run the other inline.
    """

    def __init__(
        self,
        inbox: trio.MemoryReceiveChannel[CredentialsMessage],
        *,
        environ: Mapping[str, str],
        use_api_key: bool,
        endpoint: TokenGranter,
        version: CredentialsVersion,
        refresh_margin_s: float,
        wall_clock: Callable[[], float] = time.time,
        run_blocking: RunBlocking = trio.to_thread.run_sync,
        on_login: Callable[[str | None], None] | None = None,
        shared: SharedLogin | None = None,
    ) -> None:
        self.inbox = inbox
        self.environ = environ
        self.use_api_key = use_api_key
        self.endpoint = endpoint
        self.version = version
        self.refresh_margin_s = refresh_margin_s
        self.wall_clock = wall_clock
        self.run_blocking = run_blocking
        # Told the login's access token whenever it is read (the model proxy puts it on).
        self.on_login = on_login
        self.file = CredentialsFile(credentials_path(environ))
        # The login shared by replicas (DATABASE_URL); the generation of it the file holds.
        self.shared = shared
        self.shared_generation: int | None = None
        self.shared_down = False
        self.owner = secrets.token_hex(8)  # this actor, as a refresh claim's holder
        # Another replica is refreshing: not before this (wall-clock) time, unless told.
        self.refresh_not_before: float | None = None
        # Tokens a refresh got that the database did not take (it was away): stored later.
        self.unpublished: tuple[str, StoredLogin] | None = None
        self.pending = PendingLogins()
        self.current = Credentials("none")
        self.signature: tuple[int, int, int] | None = None
        # The lifetime of an access token this service obtained (None: not known).
        self.lifetime_s: float | None = None
        self.last_refresh_at: float | None = None
        self.failure: RefreshFailure | None = None
        self.retry_delay_s = REFRESH_RETRY_FIRST_S
        self.changed_at: float | None = None
        self._writing = trio.Lock()
        self._wake = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer requests and keep the login fresh until the inbox closes or it is cancelled."""
        await self._reload()
        async with trio.open_nursery() as nursery:
            if self.shared is not None:
                changes_send, changes = trio.open_memory_channel[None](1)
                await nursery.start(self.shared.serve_changes, changes_send)
                nursery.start_soon(self._follow_shared, changes)
            nursery.start_soon(self._keep_fresh)
            task_status.started()
            while True:
                try:
                    message = await self.inbox.receive()
                except trio.EndOfChannel:
                    break
                self._handle(message, nursery)
            nursery.cancel_scope.cancel()

    def status(self) -> CredentialsStatus:
        login = self.current.login
        return CredentialsStatus(
            method=self.current.method,
            expires_at_ms=self.current.expires_at_ms,
            refreshable=login is not None and login.refresh_token is not None,
            refresh_failure=self.failure,
            changed_at=self.changed_at,
        )

    def _handle(self, message: CredentialsMessage, nursery: trio.Nursery) -> None:
        match message:
            case CredentialsStatusRequest(reply):
                answer_once(reply, self.status())
            case StartLogin(reply) if self.shared is not None:
                nursery.start_soon(self._start_shared_login, self.shared, reply)
            case StartLogin(reply):
                answer_once(reply, self.pending.start())
                log.info("OAuth login started (%d pending)", len(self.pending))
            case ExchangeCode(code, state, reply) if self.shared is not None:
                nursery.start_soon(self._exchange_shared, self.shared, code, state, reply)
            case ExchangeCode(code, state, reply):
                verifier = self.pending.take(state)
                if verifier is None:
                    answer_once(reply, AuthFailed(400, NO_MATCHING_LOGIN))
                else:
                    nursery.start_soon(self._exchange, code, state, verifier, reply)
            case _:
                assert_never(message)

    # --- logins and refreshes ---------------------------------------------------

    async def _start_shared_login(
        self, shared: SharedLogin, reply: trio.MemorySendChannel[str]
    ) -> None:
        verifier, state = new_verifier(), secrets.token_urlsafe(32)
        try:
            await shared.add_pending(state, verifier, PENDING_LOGIN_S, MAX_PENDING_LOGINS)
        except SharedLoginUnavailable as exc:
            log.error("OAuth login not started: the database did not answer: %s", exc)
            reply.close()  # the handler answers 503
            return
        log.info("OAuth login started (pending in the database)")
        answer_once(reply, authorize_url(code_challenge(verifier), state))

    async def _exchange_shared(
        self,
        shared: SharedLogin,
        code: str,
        state: str,
        reply: trio.MemorySendChannel[LoginSaved | AuthFailed],
    ) -> None:
        try:
            verifier = await shared.take_pending(state)
        except SharedLoginUnavailable as exc:
            answer_once(reply, AuthFailed(503, f"cannot read the pending login: {exc}"))
            return
        if verifier is None:
            answer_once(reply, AuthFailed(400, NO_MATCHING_LOGIN))
        else:
            await self._exchange(code, state, verifier, reply)

    async def _exchange(
        self,
        code: str,
        state: str,
        verifier: str,
        reply: trio.MemorySendChannel[LoginSaved | AuthFailed],
    ) -> None:
        try:
            grant = await self.endpoint.exchange(code, verifier, state)
        except TokenEndpointError as exc:
            log.warning("OAuth login failed: %s", exc)
            answer_once(reply, AuthFailed(502, f"Token exchange failed: {exc}"))
            return
        async with self._writing:
            now = self.wall_clock()
            try:
                if self.shared is None:
                    await self.run_blocking(self.file.save_login, grant, round(now * 1000))
                else:
                    # The database first: every replica (this one too) takes the login from it.
                    stored = await self.shared.save_login(
                        grant.access_token,
                        grant.refresh_token,
                        round(now * 1000) + round(grant.expires_in_s * 1000),
                        grant.scopes,
                        grant.expires_in_s,
                    )
                    await self.run_blocking(self._save_stored, stored)
                    self.shared_generation = stored.generation
            except SharedLoginUnavailable as exc:
                log.error("OAuth login not stored in the database: %s", exc)
                answer_once(reply, AuthFailed(503, f"cannot store the Claude credentials: {exc}"))
                return
            except OSError as exc:
                log.error("OAuth login not stored in %s: %s", self.file.path, exc)
                answer_once(reply, AuthFailed(503, f"cannot store the Claude credentials: {exc}"))
                return
            self.last_refresh_at = None
            await self._reload(changed=True, lifetime_s=grant.expires_in_s)
        log.info(
            "logged in to Claude (OAuth): stored in %s; the access token expires at %s",
            self.file.path,
            _when(now + grant.expires_in_s),
        )
        if self.current.login is None:
            log.warning(
                "agents do not use the stored login: they use %s",
                "ANTHROPIC_API_KEY"
                if self.current.method == "apiKey"
                else "CLAUDE_CODE_OAUTH_TOKEN",
            )
        answer_once(reply, LoginSaved())

    def refresh_due(self) -> float | None:
        """When the next refresh is due (wall-clock seconds), or None if there is none to make."""
        login = self.current.login
        if login is None or login.refresh_token is None or login.expires_at_ms is None:
            return None
        if self.failure is not None:
            return self.failure.next_attempt_at
        if self.refresh_not_before is not None and self.refresh_not_before > self.wall_clock():
            return self.refresh_not_before  # another replica is refreshing it
        # The earlier of "less than the margin remains" and "half its life is gone": a long-lived
        # token is renewed halfway, a short-lived one (less than the margin) at once.
        margin = self.refresh_margin_s
        if self.lifetime_s is not None:
            margin = max(margin, self.lifetime_s / 2)
        due = login.expires_at_ms / 1000 - margin
        if self.last_refresh_at is not None:
            due = max(due, self.last_refresh_at + MIN_REFRESH_INTERVAL_S)
        return due

    async def _refresh(self) -> None:
        login = self.current.login
        assert login is not None and login.refresh_token is not None
        used = login.refresh_token
        if self.shared is not None and not await self._claim(self.shared, used):
            return
        try:
            grant = await self.endpoint.refresh(used)
        except TokenEndpointError as exc:
            self._refresh_failed(str(exc))
            if self.shared is not None:
                await self._hold_claim(self.shared, used)
            return
        if self.shared is not None and await self._publish_refresh(self.shared, used, grant):
            return
        async with self._writing:
            now = self.wall_clock()
            try:
                saved = await self.run_blocking(
                    self.file.save_refresh, used, grant, round(now * 1000)
                )
            except OSError as exc:
                # The rotated refresh token is lost with it: the login may need renewing.
                self._refresh_failed(f"cannot store the refreshed tokens: {exc}")
                return
            if not saved:
                log.info("a newer login replaced the one being refreshed: keeping the newer")
                await self._reload()
                return
            self.last_refresh_at = now
            await self._reload(changed=True, lifetime_s=grant.expires_in_s)
        expires = _when(now + grant.expires_in_s)
        log.info("refreshed the Claude login; the access token expires at %s", expires)

    async def _claim(self, shared: SharedLogin, used: str) -> bool:
        """True when this replica may refresh with ``used`` now; else it takes what another
        replica stored, or waits for it."""
        try:
            claim = await shared.claim_refresh(self.owner, used, REFRESH_CLAIM_S)
        except SharedLoginUnavailable as exc:
            # Refreshing unclaimed could rotate the token under another replica: wait instead.
            self._refresh_failed(f"cannot claim the refresh in the database: {exc}")
            return False
        match claim:
            case Claimed():
                return True
            case Rotated(stored) if stored is not None:
                log.info("another replica refreshed the Claude login: using its tokens")
                await self._adopt(stored)
            case Rotated():  # no login stored yet: this one becomes the shared one
                self.refresh_not_before = self.wall_clock() + REFRESH_BUSY_RECHECK_S
                await self._sync_shared()
            case Busy():
                self.refresh_not_before = self.wall_clock() + REFRESH_BUSY_RECHECK_S
                log.info("another replica is refreshing the Claude login: waiting for it")
        return False

    async def _hold_claim(self, shared: SharedLogin, used: str) -> None:
        """Keep the claim until this replica's retry: the others wait rather than refresh."""
        assert self.failure is not None
        hold_s = max(0.0, self.failure.next_attempt_at - self.wall_clock()) + REFRESH_CLAIM_S
        try:
            await shared.hold_claim(self.owner, used, hold_s)
        except SharedLoginUnavailable as exc:
            log.warning("could not keep the refresh claim: %s", exc)

    async def _publish_refresh(self, shared: SharedLogin, used: str, grant: TokenGrant) -> bool:
        """Store a refresh's tokens in the database and take them from there: True. False
        when the database is away: the caller keeps them in the file (stored later)."""
        now = self.wall_clock()
        tokens = StoredLogin(
            grant.access_token,
            grant.refresh_token or used,
            round(now * 1000) + round(grant.expires_in_s * 1000),
            grant.scopes,
            grant.expires_in_s,
            generation=0,
        )
        try:
            stored = await shared.finish_refresh(
                used,
                grant.access_token,
                grant.refresh_token,
                tokens.expires_at_ms or 0,
                grant.scopes,
                grant.expires_in_s,
            )
        except SharedLoginUnavailable as exc:
            log.error(
                "the refreshed Claude login is not in the database (%s): kept in this"
                " replica's file, stored there when it answers",
                exc,
            )
            self.unpublished = (used, tokens)
            return False
        if stored is None:
            log.info("a newer login replaced the one being refreshed: keeping the newer")
            await self._sync_shared()
            return True
        await self._adopt(stored)
        log.info(
            "refreshed the Claude login for every replica; the access token expires at %s",
            _when(now + grant.expires_in_s),
        )
        return True

    def _refresh_failed(self, reason: str) -> None:
        now = self.wall_clock()
        delay = self.retry_delay_s
        self.retry_delay_s = min(delay * 2, REFRESH_RETRY_MAX_S)
        self.failure = RefreshFailure(reason, now, now + delay)
        log.warning("refreshing the Claude login failed: %s; next attempt in %g s", reason, delay)

    async def _keep_fresh(self) -> None:
        """Refresh when due; notice a credentials file changed from outside."""
        next_check = self.wall_clock() + FILE_CHECK_INTERVAL_S
        while True:
            due = self.refresh_due()
            wake_at = min(next_check, math.inf if due is None else due)
            wake = self._wake
            with trio.move_on_after(max(0.0, wake_at - self.wall_clock())):
                await wake.wait()  # set when the login changes: the due time moves
            if self.wall_clock() >= next_check:
                async with self._writing:
                    if self.signature != await self.run_blocking(self.file.signature):
                        before = _token(self.current)
                        await self._reload(changed_outside=True)
                        if self.shared is not None and _token(self.current) != before:
                            await self._publish_outside_login(self.shared)
                next_check = self.wall_clock() + FILE_CHECK_INTERVAL_S
            due = self.refresh_due()
            if due is not None and self.wall_clock() >= due:
                await self._refresh()

    # --- the shared login (DATABASE_URL) -----------------------------------------

    async def _follow_shared(self, changes: trio.MemoryReceiveChannel[None]) -> None:
        """Take the database's login whenever it may have changed, and every
        :data:`SHARED_CHECK_INTERVAL_S` (a notification lost while disconnected)."""
        with changes:
            while True:
                await self._sync_shared()
                with trio.move_on_after(SHARED_CHECK_INTERVAL_S):
                    try:
                        await changes.receive()
                    except trio.EndOfChannel:
                        await trio.sleep_forever()  # (the listener is gone: check by time)

    async def _sync_shared(self) -> None:
        """Make the stored login this replica's, storing first a refresh the database missed,
        or this replica's login when none is stored. The database away: logged, tried again
        at the next change or check."""
        shared = self.shared
        assert shared is not None
        try:
            if self.unpublished is not None:
                used, tokens = self.unpublished
                assert tokens.expires_at_ms is not None and tokens.lifetime_s is not None
                await shared.finish_refresh(
                    used,
                    tokens.access_token,
                    tokens.refresh_token,
                    tokens.expires_at_ms,
                    tokens.scopes,
                    tokens.lifetime_s,
                )
                self.unpublished = None
            stored = await shared.load()
            login = self.current.login
            if stored is None and login is not None:
                stored = await shared.seed(
                    login.access_token, login.refresh_token, login.expires_at_ms
                )
                if stored.access_token == login.access_token:
                    log.info("the Claude login of %s is now every replica's", self.file.path)
        except SharedLoginUnavailable as exc:
            if not self.shared_down:
                self.shared_down = True
                log.warning("the shared Claude login: the database did not answer: %s", exc)
            return
        if self.shared_down:
            self.shared_down = False
            log.info("the shared Claude login: the database answers again")
        if stored is not None and stored.generation != self.shared_generation:
            await self._adopt(stored)

    async def _publish_outside_login(self, shared: SharedLogin) -> None:
        """A login put in this replica's file from outside (``claude-code-api login``) becomes
        every replica's. The database away: it stays this replica's until the next change."""
        login = self.current.login
        if login is None:
            return
        try:
            stored = await shared.save_login(
                login.access_token, login.refresh_token, login.expires_at_ms, None, None
            )
        except SharedLoginUnavailable as exc:
            log.warning("the changed credentials file's login is not shared: %s", exc)
            return
        self.shared_generation = stored.generation
        log.info("the changed credentials file's login is now every replica's")

    async def _adopt(self, stored: StoredLogin) -> None:
        """Make ``stored`` this replica's login: its file, and a bump if new to its agents.

        Nothing happens when this replica already holds that generation or a later one (a
        wake-up for its own write, read before that write finished): its file may since hold
        a login put there from outside, which the next file check makes every replica's.
        """
        async with self._writing:
            held = self.shared_generation
            if held is not None and stored.generation <= held:
                return  # generations only grow: this one is not news
            in_file = await self.run_blocking(self.file.login)
            changed = in_file is None or (
                in_file.access_token,
                in_file.refresh_token,
                in_file.expires_at_ms,
            ) != (stored.access_token, stored.refresh_token, stored.expires_at_ms)
            if changed:
                try:
                    await self.run_blocking(self._save_stored, stored)
                except OSError as exc:
                    log.error("the shared Claude login not stored in %s: %s", self.file.path, exc)
                    return  # tried again at the next change or check
                self.last_refresh_at = self.wall_clock()
            self.shared_generation = stored.generation
            self.refresh_not_before = None
            await self._reload(changed=changed, lifetime_s=stored.lifetime_s)

    def _save_stored(self, stored: StoredLogin) -> None:
        self.file.save_stored(
            stored.access_token, stored.refresh_token, stored.expires_at_ms, stored.scopes
        )

    # --- the current view -------------------------------------------------------

    async def _reload(
        self,
        *,
        changed: bool = False,
        changed_outside: bool = False,
        lifetime_s: float | None = None,
    ) -> None:
        """Read what agents use now; with ``changed``, it is new to them: bump the version."""

        def read() -> tuple[tuple[int, int, int] | None, Credentials]:
            # The signature first: a write in between shows as a change at the next check.
            return self.file.signature(), read_credentials(self.environ, self.use_api_key)

        self.signature, credentials = await self.run_blocking(read)
        before, self.current = self.current, credentials
        if self.on_login is not None:
            self.on_login(_token(credentials))
        if changed_outside:
            changed = _token(before) != _token(credentials)
            if changed:
                log.info("the Claude credentials file changed: %s", self.file.path)
        if changed and credentials.login is not None:
            self.lifetime_s = lifetime_s
            self.failure, self.retry_delay_s = None, REFRESH_RETRY_FIRST_S
            self.changed_at = self.wall_clock()
            self.version.bump()
        self._wake.set()
        self._wake = trio.Event()


def _token(credentials: Credentials) -> str | None:
    return None if credentials.login is None else credentials.login.access_token
