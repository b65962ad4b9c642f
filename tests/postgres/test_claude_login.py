"""The Claude login shared by replicas, on real PostgreSQL: the store (pending logins, the
stored login, the refresh claim, its notifications), then two credentials actors on one
database (two replicas' worth, in one process) against the OAuth test endpoint."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import attrs
import psycopg
import pytest
import trio

from claude_code_api.actors import claude_login
from claude_code_api.actors.claude_login import CredentialsActor, CredentialsClient
from claude_code_api.auth.oauth import TokenEndpoint
from claude_code_api.auth.renewal import CredentialsVersion
from claude_code_api.auth.shared_login import Busy, Claimed, Rotated
from claude_code_api.messages import LoginSaved
from claude_code_api.store import claude_login as store_module
from claude_code_api.store.claude_login import PostgresLogin
from claude_code_api.store.database import Database, open_database
from claude_code_api.store.wakeups import RETRY_S
from tests.postgres.support import TIMEOUT
from tests.support.fake_token_endpoint import FakeTokenEndpoint

TTL = 600.0
HOLD = 30.0
MARGIN = 300.0


def clear_login(connection: psycopg.Connection) -> None:
    connection.execute("TRUNCATE oauth_pending_logins, claude_login")


@pytest.fixture
async def replicas(database: Database, shared_url: str) -> AsyncIterator[list[PostgresLogin]]:
    """Two replicas' views of one database's shared login (cleared first)."""
    with trio.fail_after(TIMEOUT):
        await database.run(clear_login)
    yield [PostgresLogin(lambda: database, shared_url) for _ in range(2)]


# --- the store ---------------------------------------------------------------------------------


async def test_a_pending_login_started_on_one_replica_is_taken_once_on_another(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        await a.add_pending("state-1", "verifier-1", TTL, 64)
        assert await b.take_pending("state-1") == "verifier-1"
        assert await a.take_pending("state-1") is None
        assert await b.take_pending("unknown") is None


async def test_an_expired_pending_login_is_not_taken(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        await a.add_pending("state-1", "verifier-1", 0.2, 64)
        await trio.sleep(0.5)
        assert await b.take_pending("state-1") is None


async def test_past_the_limit_the_oldest_pending_logins_are_forgotten(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        for n in range(4):
            await a.add_pending(f"state-{n}", f"verifier-{n}", TTL, 3)
        assert await b.take_pending("state-0") is None
        assert [await b.take_pending(f"state-{n}") for n in (1, 2, 3)] == [
            "verifier-1",
            "verifier-2",
            "verifier-3",
        ]


async def test_a_login_is_stored_once_and_each_write_is_a_new_generation(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        assert await b.load() is None
        first = await a.save_login("access-1", "refresh-1", 1000, ("user:inference",), 3600.0)
        assert (first.access_token, first.scopes, first.generation) == (
            "access-1",
            ("user:inference",),
            1,
        )
        assert await b.load() == first
        second = await b.save_login("access-2", "refresh-2", 2000, None, None)
        assert second.generation == 2 and await a.load() == second
        # A replica's own file seeds the database only while it holds no login.
        assert await a.seed("access-file", "refresh-file", 5) == second
        assert await a.load() == second


async def test_a_file_login_seeds_an_empty_database(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        seeded = await a.seed("access-file", "refresh-file", 5)
        assert (seeded.access_token, seeded.refresh_token, seeded.generation) == (
            "access-file",
            "refresh-file",
            1,
        )
        assert await b.seed("access-other", "refresh-other", 6) == seeded


async def test_one_replica_at_a_time_refreshes_and_the_other_takes_its_tokens(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        await a.save_login("access-1", "refresh-1", 1000, None, 3600.0)
        assert await a.claim_refresh("a", "refresh-1", HOLD) == Claimed()
        assert await b.claim_refresh("b", "refresh-1", HOLD) == Busy()
        assert await a.claim_refresh("a", "refresh-1", HOLD) == Claimed()  # its own, again
        done = await a.finish_refresh("refresh-1", "access-2", "refresh-2", 2000, None, 3600.0)
        assert done is not None and done.generation == 2
        # B, due too, would refresh with a token already used: it is told to take A's.
        assert await b.claim_refresh("b", "refresh-1", HOLD) == Rotated(done)
        assert await b.claim_refresh("b", "refresh-2", HOLD) == Claimed()


async def test_a_claim_runs_out_and_a_failed_refresh_holds_it_longer(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        await a.save_login("access-1", "refresh-1", 1000, None, 3600.0)
        assert await a.claim_refresh("a", "refresh-1", 0.3) == Claimed()
        await a.hold_claim("a", "refresh-1", 1.0)  # a failure: its retry comes later
        await trio.sleep(0.5)
        assert await b.claim_refresh("b", "refresh-1", HOLD) == Busy()
        await trio.sleep(0.8)  # A died: its claim ran out
        assert await b.claim_refresh("b", "refresh-1", HOLD) == Claimed()


async def test_a_refresh_of_a_replaced_login_stores_nothing(replicas):
    a, b = replicas
    with trio.fail_after(TIMEOUT):
        await a.save_login("access-1", "refresh-1", 1000, None, 3600.0)
        assert await a.claim_refresh("a", "refresh-1", HOLD) == Claimed()
        newer = await b.save_login("access-new", "refresh-new", 9000, None, 3600.0)
        assert await a.finish_refresh("refresh-1", "x", "y", 2000, None, 60.0) is None
        assert await b.load() == newer
        # A new login ends the claim on the old one.
        assert await b.claim_refresh("b", "refresh-new", HOLD) == Claimed()


async def test_every_write_of_the_login_wakes_every_replica(replicas, nursery):
    a, b = replicas
    send, changes = trio.open_memory_channel[None](10)
    with trio.fail_after(TIMEOUT):
        await nursery.start(b.serve_changes, send)
        await changes.receive()  # listening: check once
        await a.save_login("access-1", "refresh-1", 1000, None, 3600.0)
        await changes.receive()
        assert await a.claim_refresh("a", "refresh-1", HOLD) == Claimed()
        await a.finish_refresh("refresh-1", "access-2", "refresh-2", 2000, None, 3600.0)
        await changes.receive()
        await a.add_pending("state", "verifier", TTL, 64)  # not the login: no wake-up
        await trio.sleep(0.5)
        with pytest.raises(trio.WouldBlock):
            changes.receive_nowait()


# --- two credentials actors on one database -------------------------------------------------


@attrs.frozen
class Replica:
    client: CredentialsClient
    version: CredentialsVersion
    path: Path
    tokens: list[str | None]

    def stored(self) -> dict:
        return json.loads(self.path.read_text())["claudeAiOauth"]


async def start_replica(
    nursery: trio.Nursery, directory: Path, endpoint: FakeTokenEndpoint, shared: PostgresLogin
) -> Replica:
    config_dir = directory / "claude"
    send, receive = trio.open_memory_channel(0)
    version = CredentialsVersion()
    tokens: list[str | None] = []
    actor = CredentialsActor(
        receive,
        environ={"CLAUDE_CONFIG_DIR": str(config_dir)},
        use_api_key=False,
        endpoint=TokenEndpoint(endpoint.url),
        version=version,
        refresh_margin_s=MARGIN,
        on_login=tokens.append,
        shared=shared,
    )
    await nursery.start(actor.serve)
    return Replica(CredentialsClient(send), version, config_dir / ".credentials.json", tokens)


def write_login(path: Path, *, access: str, refresh: str, expires_at: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    login = {"accessToken": access, "refreshToken": refresh, "expiresAt": round(expires_at * 1000)}
    path.write_text(json.dumps({"claudeAiOauth": login}))


async def wait_for(predicate, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def refreshes(endpoint: FakeTokenEndpoint) -> list[dict]:
    return [r for r in endpoint.requests if r["grant_type"] == "refresh_token"]


@pytest.fixture
async def endpoint(nursery) -> FakeTokenEndpoint:
    fake = FakeTokenEndpoint()
    await nursery.start(fake.serve)
    return fake


async def test_a_login_started_on_one_replica_is_exchanged_on_the_other_and_both_use_it(
    replicas, endpoint, nursery, tmp_path
):
    with trio.fail_after(TIMEOUT):
        a = await start_replica(nursery, tmp_path / "a", endpoint, replicas[0])
        b = await start_replica(nursery, tmp_path / "b", endpoint, replicas[1])
        url = await a.client.start_login()
        state = parse_qs(urlsplit(url).query)["state"][0]
        assert await b.client.exchange("the-code", state) == LoginSaved()
        assert b.stored()["accessToken"] == "access-1" and b.version.number == 1
        # A hears of it and takes it: its file, its model proxy's token, its agents' restart.
        await wait_for(lambda: a.path.exists() and a.version.number == 1, timeout=5)
        assert a.stored()["accessToken"] == "access-1"
        assert a.stored()["refreshToken"] == "refresh-1"
        assert a.stored()["expiresAt"] == b.stored()["expiresAt"]
        assert a.tokens[-1] == "access-1"
        # The PKCE verifier went with the state: the one A made, used by B.
        (sent,) = endpoint.requests
        assert sent["state"] == state and sent["grant_type"] == "authorization_code"
        # A state is good once, on either replica.
        assert (await a.client.exchange("the-code", state)).status == 400


async def test_two_replicas_due_to_refresh_at_once_call_the_token_endpoint_once(
    replicas, endpoint, nursery, tmp_path
):
    soon = time.time() + 120  # within the margin: both refresh at start-up
    for name in ("a", "b"):
        write_login(
            tmp_path / name / "claude" / ".credentials.json",
            access="access-0",
            refresh="refresh-0",
            expires_at=soon,
        )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as starting:
            started: dict[str, Replica] = {}

            async def start(name: str, shared: PostgresLogin) -> None:
                started[name] = await start_replica(nursery, tmp_path / name, endpoint, shared)

            starting.start_soon(start, "a", replicas[0])
            starting.start_soon(start, "b", replicas[1])
        a, b = started["a"], started["b"]
        both = (a, b)
        await wait_for(lambda: all(r.stored()["accessToken"] == "access-1" for r in both))
        await trio.sleep(1.0)  # a second refresh would come now, if any
    assert [r["refresh_token"] for r in refreshes(endpoint)] == ["refresh-0"]
    assert all(r.stored()["refreshToken"] == "refresh-1" for r in both)
    assert all(r.version.number == 1 and r.tokens[-1] == "access-1" for r in both)


async def test_a_login_put_in_one_replicas_file_from_outside_becomes_every_replicas(
    replicas, endpoint, nursery, tmp_path, monkeypatch
):
    monkeypatch.setattr(claude_login, "FILE_CHECK_INTERVAL_S", 0.2)
    with trio.fail_after(TIMEOUT):
        a = await start_replica(nursery, tmp_path / "a", endpoint, replicas[0])
        b = await start_replica(nursery, tmp_path / "b", endpoint, replicas[1])
        url = await a.client.start_login()
        state = parse_qs(urlsplit(url).query)["state"][0]
        assert await a.client.exchange("the-code", state) == LoginSaved()
        await wait_for(lambda: b.path.exists() and b.version.number == 1, timeout=5)
        # `claude-code-api login` on A's host: A's file changes, not through the service.
        write_login(
            a.path, access="access-cli", refresh="refresh-cli", expires_at=time.time() + 3600
        )
        await wait_for(lambda: b.version.number == 2, timeout=5)
    assert b.stored()["accessToken"] == "access-cli" and b.tokens[-1] == "access-cli"
    assert b.stored()["refreshToken"] == "refresh-cli"
    assert a.version.number == 2 and a.stored()["accessToken"] == "access-cli"


async def test_the_listener_reconnects_after_an_outage_and_says_so_once_each_way(
    databases, link, nursery, caplog
):
    caplog.set_level(logging.INFO, logger=store_module.__name__)
    url = link.url(databases.create().rpartition("/")[2])
    send, changes = trio.open_memory_channel[None](10)
    with trio.fail_after(TIMEOUT):
        async with open_database(url) as database:
            shared = PostgresLogin(lambda: database, url)
            await nursery.start(shared.serve_changes, send)
            await changes.receive()
            link.cut()
            await trio.sleep(10 * RETRY_S)  # many failed attempts to reconnect
            link.restore()
            await changes.receive()  # listening again: check, a change may have been missed
            await shared.save_login("access-1", "refresh-1", 1000, None, None)
            await changes.receive()
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2, said
    assert said[0].startswith("login changes: lost the database (")
    assert said[1] == "login changes: listening again"
