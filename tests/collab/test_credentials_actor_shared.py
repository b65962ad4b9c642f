"""The credentials actor with a shared login (DATABASE_URL), on trio's MockClock.

The database's side is :class:`MemoryLogin`, an in-memory stand-in for
:class:`~claude_code_api.store.claude_login.PostgresLogin` (whose own tests, against a real
PostgreSQL, are in ``tests/postgres/test_claude_login.py``); here the order in which a
replica hears of its own writes and of a file changed from outside is under the test's control.
"""

from __future__ import annotations

import attrs
import trio

from claude_code_api.actors.claude_login import FILE_CHECK_INTERVAL_S
from claude_code_api.auth.shared_login import Busy, Claim, Claimed, Rotated, StoredLogin
from claude_code_api.messages import LoginSaved

from .test_credentials_actor import (
    EPOCH,
    LIMIT,
    login,
    start_actor,
    write_login,
)


@attrs.define(eq=False)
class MemoryLogin:
    """One login row, pending logins and a refresh claim, in memory; every write wakes the
    replicas listening. ``after_save`` runs inside :meth:`save_login`, after the write and
    its wake-up, before the caller hears the answer (a slow round trip)."""

    stored: StoredLogin | None = None
    pending: dict[str, str] = attrs.Factory(dict)
    claim: tuple[str, str] | None = None
    listeners: list[trio.MemorySendChannel[None]] = attrs.Factory(list)
    after_save: float = 0.0

    def _write(self, **fields) -> StoredLogin:
        generation = 1 if self.stored is None else self.stored.generation + 1
        self.stored = StoredLogin(**fields, generation=generation)
        self.claim = None
        for listener in self.listeners:
            try:
                listener.send_nowait(None)
            except trio.WouldBlock:
                pass  # a wake-up is already waiting
        return self.stored

    async def add_pending(self, state: str, verifier: str, ttl_s: float, max_size: int) -> None:
        self.pending[state] = verifier

    async def take_pending(self, state: str) -> str | None:
        return self.pending.pop(state, None)

    async def load(self) -> StoredLogin | None:
        return self.stored

    async def save_login(self, access_token, refresh_token, expires_at_ms, scopes, lifetime_s):
        stored = self._write(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at_ms=expires_at_ms,
            scopes=scopes,
            lifetime_s=lifetime_s,
        )
        await trio.sleep(self.after_save)
        return stored

    async def seed(self, access_token, refresh_token, expires_at_ms) -> StoredLogin:
        if self.stored is None:
            return self._write(
                access_token=access_token,
                refresh_token=refresh_token,
                expires_at_ms=expires_at_ms,
                scopes=None,
                lifetime_s=None,
            )
        return self.stored

    async def claim_refresh(self, owner: str, refresh_token: str, hold_s: float) -> Claim:
        if self.stored is None or self.stored.refresh_token != refresh_token:
            return Rotated(self.stored)
        if self.claim is not None and self.claim[0] != owner:
            return Busy()
        self.claim = (owner, refresh_token)
        return Claimed()

    async def finish_refresh(
        self, used, access_token, refresh_token, expires_at_ms, scopes, lifetime_s
    ):
        if self.stored is None or self.stored.refresh_token != used:
            return None
        return self._write(
            access_token=access_token,
            refresh_token=refresh_token or used,
            expires_at_ms=expires_at_ms,
            scopes=scopes,
            lifetime_s=lifetime_s,
        )

    async def hold_claim(self, owner: str, refresh_token: str, hold_s: float) -> None:
        self.claim = (owner, refresh_token)

    async def serve_changes(self, changes, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with changes:
            self.listeners.append(changes)
            task_status.started()
            await trio.sleep_forever()


async def test_a_login_put_in_the_file_just_after_an_exchange_is_not_overwritten_by_it(
    autojump_clock, nursery, tmp_path
):
    """The replica's own login comes back as a wake-up while its exchange is still storing it;
    the file is then changed from outside (``claude-code-api login``) before the stale wake-up
    reaches the file. The outside login stays, and becomes every replica's (seen once in CI
    as a test on PostgreSQL timing out: the outside login was overwritten with the older one)."""

    async def in_a_slow_thread(function, *args):
        await trio.sleep(0.01)  # a worker thread's latency on a busy machine
        return function(*args)

    with trio.fail_after(LIMIT):
        shared = MemoryLogin(after_save=0.05)
        running = await start_actor(
            nursery, tmp_path, use_api_key=False, run_blocking=in_a_slow_thread, shared=shared
        )
        assert isinstance(await login(running), LoginSaved)
        assert running.stored()["accessToken"] == "access-1" and running.version.number == 1
        write_login(
            running.path, access="access-cli", refresh="refresh-cli", expires_at=EPOCH + 7200
        )
        await trio.sleep(FILE_CHECK_INTERVAL_S + 1)
        await trio.testing.wait_all_tasks_blocked()
        assert running.stored()["accessToken"] == "access-cli"
        assert running.version.number == 2
        assert shared.stored is not None and shared.stored.access_token == "access-cli"
        assert shared.stored.generation == 2
