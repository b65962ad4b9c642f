"""The credentials actor on trio's MockClock: refresh timing, rotation, backoff, logins.

The token endpoint is a scripted fake; the credentials file is a real file in
``tmp_path``, read and written inline (not in a thread) so virtual time moves
only where the actor waits. Its wall clock is trio's clock plus a fixed epoch.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from claude_code_api.actors.claude_login import (
    FILE_CHECK_INTERVAL_S,
    MIN_REFRESH_INTERVAL_S,
    NO_MATCHING_LOGIN,
    CredentialsActor,
    CredentialsClient,
)
from claude_code_api.auth.credentials import CredentialsFile
from claude_code_api.auth.oauth import TokenEndpointError, TokenGrant
from claude_code_api.auth.renewal import CredentialsVersion
from claude_code_api.messages import AuthFailed, LoginSaved

LIMIT = 100_000
EPOCH = 1_800_000_000.0  # the wall clock at trio time 0
MARGIN = 300.0


def wall() -> float:
    return EPOCH + trio.current_time()


async def inline(function, *args):
    return function(*args)


@attrs.define(eq=False)
class ScriptedEndpoint:
    """Answers from ``script`` (a grant, an error, or seconds to hang first then a grant)."""

    script: list = attrs.Factory(list)
    calls: list[tuple[float, str, tuple[str, ...]]] = attrs.Factory(list)
    issued: int = 0
    expires_in: float = 3600.0

    def _grant(self) -> TokenGrant:
        self.issued += 1
        return TokenGrant(f"access-{self.issued}", f"refresh-{self.issued}", self.expires_in, None)

    async def _answer(self, kind: str, args: tuple[str, ...]) -> TokenGrant:
        self.calls.append((trio.current_time(), kind, args))
        # A storm takes no virtual time: fail it here rather than spin forever.
        assert len(self.calls) < 100, f"a refresh storm: {self.calls[-5:]}"
        step = self.script.pop(0) if self.script else None
        if isinstance(step, float):
            await trio.sleep(step)
            step = None
        if isinstance(step, Exception):
            raise step
        return step or self._grant()

    async def exchange(self, code: str, verifier: str, state: str) -> TokenGrant:
        return await self._answer("exchange", (code, verifier, state))

    async def refresh(self, refresh_token: str) -> TokenGrant:
        return await self._answer("refresh", (refresh_token,))

    def refreshed_with(self) -> list[str]:
        return [args[0] for _, kind, args in self.calls if kind == "refresh"]


@attrs.define(eq=False)
class Running:
    actor: CredentialsActor
    client: CredentialsClient
    endpoint: ScriptedEndpoint
    version: CredentialsVersion
    path: Path

    def stored(self) -> dict:
        return json.loads(self.path.read_text())["claudeAiOauth"]


def write_login(path: Path, *, access: str, refresh: str | None, expires_at: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    login = {"accessToken": access, "refreshToken": refresh, "expiresAt": round(expires_at * 1000)}
    path.write_text(json.dumps({"claudeAiOauth": login}))


async def start_actor(
    nursery: trio.Nursery,
    tmp_path: Path,
    endpoint: ScriptedEndpoint | None = None,
    environ: dict[str, str] | None = None,
    **options,
) -> Running:
    """The actor on the file in ``tmp_path``; ``options`` replace its keyword arguments."""
    config_dir = tmp_path / "claude"
    send, receive = trio.open_memory_channel(0)
    version = CredentialsVersion()
    endpoint = endpoint or ScriptedEndpoint()
    arguments = {"use_api_key": True, "run_blocking": inline, **options}
    actor = CredentialsActor(
        receive,
        environ={"CLAUDE_CONFIG_DIR": str(config_dir), **(environ or {})},
        endpoint=endpoint,
        version=version,
        refresh_margin_s=MARGIN,
        wall_clock=wall,
        **arguments,
    )
    await nursery.start(actor.serve)
    return Running(
        actor, CredentialsClient(send), endpoint, version, config_dir / ".credentials.json"
    )


async def login(running: Running) -> LoginSaved | AuthFailed:
    url = await running.client.start_login()
    state = parse_qs(urlsplit(url).query)["state"][0]
    return await running.client.exchange("the-code", state)


# --- refresh ---------------------------------------------------------------------------------------


async def test_start_up_credentials_near_expiry_are_refreshed_at_once(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH + 100)
        running = await start_actor(nursery, tmp_path)
        await trio.testing.wait_all_tasks_blocked()
        assert running.endpoint.calls == [(0.0, "refresh", ("refresh-0",))]
        assert running.stored()["accessToken"] == "access-1"
        assert running.stored()["refreshToken"] == "refresh-1"
        assert running.stored()["expiresAt"] == round((EPOCH + 3600) * 1000)
        assert running.version.number == 1
        status = await running.client.status()
        assert (status.method, status.expires_at_ms) == ("oauth", round((EPOCH + 3600) * 1000))
        assert status.refresh_failure is None and status.changed_at == EPOCH


async def test_a_refresh_is_due_margin_seconds_before_expiry_and_tokens_rotate(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH + 1000)
        # Tokens of 500 s: MARGIN before their expiry comes before halfway through their life.
        running = await start_actor(nursery, tmp_path, ScriptedEndpoint(expires_in=500.0))
        await trio.sleep(700 - 0.001)
        assert running.endpoint.calls == []
        await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        # The second refresh uses the rotated token, MARGIN before the new expiry.
        await trio.sleep(700 + 200 - trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert running.endpoint.calls == [
            (700.0, "refresh", ("refresh-0",)),
            (900.0, "refresh", ("refresh-1",)),
        ]
        assert running.stored()["refreshToken"] == "refresh-2"
        assert running.version.number == 2


async def test_a_token_shorter_than_twice_the_margin_is_refreshed_margin_before_expiry(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        endpoint = ScriptedEndpoint(expires_in=400.0)
        running = await start_actor(nursery, tmp_path, endpoint)
        assert isinstance(await login(running), LoginSaved)
        await trio.sleep(1000)
        await trio.testing.wait_all_tasks_blocked()
        # Lifetime 400 s: less than MARGIN remains 100 s into each token's life, before halfway.
        times = [at for at, kind, _ in endpoint.calls if kind == "refresh"]
        assert times == [100.0 * n for n in range(1, 11)]
        endpoint.expires_in = 1.0  # absurdly short: at least MIN_REFRESH_INTERVAL_S apart
        await trio.sleep(300)
        times = [at for at, kind, _ in endpoint.calls if kind == "refresh"][10:]
        assert times == [1100.0 + MIN_REFRESH_INTERVAL_S * n for n in range(7)]


async def test_a_token_shorter_than_the_margin_is_refreshed_at_once_then_every_min_interval(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        endpoint = ScriptedEndpoint(expires_in=60.0)
        running = await start_actor(nursery, tmp_path, endpoint)
        await trio.sleep(5)
        assert isinstance(await login(running), LoginSaved)
        await trio.sleep(100)
        await trio.testing.wait_all_tasks_blocked()
        # Less than MARGIN remains from the start: refreshed at once, and then as often as the
        # storm guard allows, so a token is never more than MIN_REFRESH_INTERVAL_S old.
        times = [at for at, kind, _ in endpoint.calls if kind == "refresh"]
        assert times == [5.0 + MIN_REFRESH_INTERVAL_S * n for n in range(4)]
        assert running.stored()["refreshToken"] == "refresh-5"


async def test_a_long_lived_token_is_refreshed_halfway_through_its_life(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        hours = 3600.0
        endpoint = ScriptedEndpoint(expires_in=8 * hours)
        running = await start_actor(nursery, tmp_path, endpoint)
        assert isinstance(await login(running), LoginSaved)
        await trio.sleep(4 * hours - 0.001)
        assert [kind for _, kind, _ in endpoint.calls] == ["exchange"]
        await trio.sleep(9 * hours)
        await trio.testing.wait_all_tasks_blocked()
        # Halfway through each 8 h token's life, long before MARGIN before its expiry.
        times = [at for at, kind, _ in endpoint.calls if kind == "refresh"]
        assert times == [4 * hours, 8 * hours, 12 * hours]
        assert running.stored()["expiresAt"] == round((EPOCH + 20 * hours) * 1000)


async def test_failed_refreshes_back_off_and_show_in_the_status(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH + 10)
        failures = [TokenEndpointError("the token endpoint answered 503")] * 7
        running = await start_actor(nursery, tmp_path, ScriptedEndpoint(script=list(failures)))
        await trio.sleep(1000)
        times = [at for at, _, _ in running.endpoint.calls]
        assert times == [0.0, 10.0, 30.0, 70.0, 150.0, 310.0, 610.0, 910.0]
        assert running.stored()["accessToken"] == "access-1"  # the 8th attempt worked
        assert (await running.client.status()).refresh_failure is None
        assert running.version.number == 1


async def test_a_failure_is_reported_with_its_next_attempt(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH - 10)
        failure = TokenEndpointError("the token endpoint answered 400 (invalid_grant)")
        running = await start_actor(nursery, tmp_path, ScriptedEndpoint(script=[failure]))
        await trio.testing.wait_all_tasks_blocked()
        status = await running.client.status()
        assert status.refresh_failure is not None
        assert status.refresh_failure.message == "the token endpoint answered 400 (invalid_grant)"
        assert (status.refresh_failure.at, status.refresh_failure.next_attempt_at) == (
            EPOCH,
            EPOCH + 10,
        )
        assert status.expires_at_ms == round((EPOCH - 10) * 1000) and status.refreshable
        assert running.version.number == 0


async def test_the_status_is_answered_while_a_refresh_hangs(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH + 10)
        running = await start_actor(nursery, tmp_path, ScriptedEndpoint(script=[50.0]))
        await trio.sleep(1)
        asked = trio.current_time()
        status = await running.client.status()
        assert trio.current_time() == asked
        assert status.method == "oauth" and status.expires_at_ms == round((EPOCH + 10) * 1000)


async def test_nothing_is_refreshed_without_a_refresh_token_or_with_an_api_key(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh=None, expires_at=EPOCH + 10)
        running = await start_actor(nursery, tmp_path)
        api_key = await start_actor(
            nursery, tmp_path, environ={"ANTHROPIC_API_KEY": "sk-ant-x"}
        )  # the same file, but agents use the key
        await trio.sleep(10_000)
        assert running.endpoint.calls == [] and api_key.endpoint.calls == []
        assert (await running.client.status()).refreshable is False
        assert (await api_key.client.status()).method == "apiKey"


# --- logins ----------------------------------------------------------------------------------------


async def test_a_login_is_stored_and_bumps_the_version(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        running = await start_actor(nursery, tmp_path)
        assert (await running.client.status()).method == "none"
        url = await running.client.start_login()
        state = parse_qs(urlsplit(url).query)["state"][0]
        assert await running.client.exchange("the-code", state) == LoginSaved()
        (_, kind, (code, verifier, sent_state)), *_ = running.endpoint.calls
        assert (kind, code, sent_state) == ("exchange", "the-code", state)
        assert len(verifier) == 43
        assert running.stored()["accessToken"] == "access-1"
        assert stat.S_IMODE(running.path.stat().st_mode) == 0o600
        assert running.version.number == 1
        status = await running.client.status()
        assert status.method == "oauth" and status.refreshable
        # A state is good for one exchange only.
        assert await running.client.exchange("the-code", state) == AuthFailed(
            400, NO_MATCHING_LOGIN
        )
        assert await running.client.exchange("the-code", "made-up") == AuthFailed(
            400, NO_MATCHING_LOGIN
        )
        assert len(running.endpoint.calls) == 1


async def test_a_failed_exchange_answers_502_and_changes_nothing(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        failure = TokenEndpointError("the token endpoint answered 500")
        running = await start_actor(nursery, tmp_path, ScriptedEndpoint(script=[failure]))
        assert await login(running) == AuthFailed(
            502, "Token exchange failed: the token endpoint answered 500"
        )
        assert not running.path.exists() and running.version.number == 0


async def test_a_pending_login_expires(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        running = await start_actor(nursery, tmp_path)
        url = await running.client.start_login()
        await trio.sleep(600)
        state = parse_qs(urlsplit(url).query)["state"][0]
        assert await running.client.exchange("c", state) == AuthFailed(400, NO_MATCHING_LOGIN)


async def test_a_login_during_a_refresh_wins(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH + 10)
        # The refresh hangs 5 s; the exchange (next in the script) answers at once.
        endpoint = ScriptedEndpoint(script=[5.0])
        running = await start_actor(nursery, tmp_path, endpoint)
        await trio.sleep(1)
        assert await login(running) == LoginSaved()  # access-1
        await trio.sleep(10)
        # The refresh's grant (access-2) came back for a login that is gone: dropped.
        assert running.stored()["accessToken"] == "access-1"
        assert running.version.number == 1


async def test_a_file_changed_from_outside_is_noticed(autojump_clock, nursery, tmp_path):
    with trio.fail_after(LIMIT):
        running = await start_actor(nursery, tmp_path)
        await trio.sleep(1)
        write_login(running.path, access="from-claude-login", refresh="r", expires_at=EPOCH + 1e6)
        await trio.sleep(FILE_CHECK_INTERVAL_S - 1 - 0.001)
        assert running.version.number == 0
        await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert running.version.number == 1
        status = await running.client.status()
        assert status.method == "oauth" and status.changed_at == EPOCH + FILE_CHECK_INTERVAL_S
        # Rewritten with the same token (another key added): not a change for agents.
        document = json.loads(running.path.read_text())
        running.path.write_text(json.dumps({**document, "mcpOAuth": {}}))
        await trio.sleep(FILE_CHECK_INTERVAL_S)
        await trio.testing.wait_all_tasks_blocked()
        assert running.actor.signature == running.actor.file.signature()  # it was read
        assert running.version.number == 1


async def test_a_refreshed_token_that_cannot_be_stored_is_a_failure(
    autojump_clock, nursery, tmp_path, monkeypatch
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "claude" / ".credentials.json"
        write_login(path, access="access-0", refresh="refresh-0", expires_at=EPOCH + 10)

        def disk_full(self, document):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(CredentialsFile, "_write", disk_full)
        running = await start_actor(nursery, tmp_path)
        await trio.testing.wait_all_tasks_blocked()
        status = await running.client.status()
        assert status.refresh_failure is not None
        assert status.refresh_failure.message == (
            "cannot store the refreshed tokens: [Errno 28] No space left on device"
        )
        assert running.version.number == 0
        assert running.stored()["accessToken"] == "access-0"


async def test_a_credentials_path_that_cannot_be_read_is_no_login_not_a_crash(
    autojump_clock, nursery, tmp_path
):
    with trio.fail_after(LIMIT):
        (tmp_path / "claude").write_text("a file where the config dir should be")
        running = await start_actor(nursery, tmp_path)
        await trio.sleep(FILE_CHECK_INTERVAL_S * 3)
        assert (await running.client.status()).method == "none"
        failed = await login(running)
        assert isinstance(failed, AuthFailed) and failed.status == 503
        assert failed.error.startswith("cannot store the Claude credentials: ")
