"""OAuth pieces: PKCE and the authorize URL, pending logins, the credentials file,
and the token endpoint client against a fake endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
import trio

from claude_code_api.auth.credentials import CredentialsFile, read_credentials
from claude_code_api.auth.oauth import (
    CLIENT_ID,
    EXCHANGE_TIMEOUT_S,
    REDIRECT_URI,
    PendingLogins,
    TokenEndpoint,
    TokenEndpointError,
    TokenGrant,
    code_challenge,
    new_verifier,
    parse_grant,
)
from claude_code_api.http.app import auth_status_body
from claude_code_api.http.requests import INVALID_CODE_FORMAT, BadRequest, parse_exchange_code
from claude_code_api.messages import CredentialsStatus, PoolSnapshot, RefreshFailure, UpstreamError
from tests.support.fake_token_endpoint import FakeTokenEndpoint

SCOPE = "org:create_api_key user:profile user:inference user:sessions:claude_code user:mcp_servers"


def query_of(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://claude.ai/oauth/authorize"
    query = parse_qs(parts.query, strict_parsing=True)
    assert all(len(values) == 1 for values in query.values())
    return {name: values[0] for name, values in query.items()}


# --- PKCE and the URL ---------------------------------------------------------------------------


def test_the_verifier_is_32_random_bytes_base64url():
    verifier = new_verifier()
    assert len(base64.urlsafe_b64decode(verifier + "=")) == 32
    assert "=" not in verifier and new_verifier() != verifier


def test_the_challenge_is_s256_of_the_verifier():
    verifier = "a-verifier"
    # printf a-verifier | openssl dgst -sha256 -binary | basenc --base64url
    assert code_challenge(verifier) == "NORfwpEYKakZsuYgaey8PFmACPx5Ikq_PyZGYQ7p8NI"


async def test_a_login_url_has_the_parameters_claude_expects(autojump_clock):
    pending = PendingLogins()
    query = query_of(pending.start())
    verifier = pending.take(query["state"])
    assert verifier is not None
    assert query == {
        "code": "true",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "response_type": "code",
        "redirect_uri": "https://platform.claude.com/oauth/code/callback",
        "scope": SCOPE,
        "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        .rstrip(b"=")
        .decode(),
        "code_challenge_method": "S256",
        "state": query["state"],
    }
    assert len(query["state"]) >= 32


# --- pending logins -------------------------------------------------------------------------------


async def test_a_pending_login_is_taken_once(autojump_clock):
    pending = PendingLogins()
    state = query_of(pending.start())["state"]
    assert pending.take(state) is not None
    assert pending.take(state) is None
    assert pending.take("never-issued") is None


async def test_a_pending_login_expires_after_ten_minutes(autojump_clock):
    pending = PendingLogins()
    early = query_of(pending.start())["state"]
    late = query_of(pending.start())["state"]
    await trio.sleep(599.9)
    assert pending.take(late) is not None
    await trio.sleep(0.1)
    assert pending.take(early) is None
    assert len(pending) == 0


async def test_pending_logins_are_bounded_the_oldest_go_first(autojump_clock):
    pending = PendingLogins(max_size=3)
    states = [query_of(pending.start())["state"] for _ in range(5)]
    assert len(pending) == 3
    assert [pending.take(s) is not None for s in states] == [False, False, True, True, True]


# --- the grant ----------------------------------------------------------------------------------


def test_a_grant_is_parsed():
    grant = parse_grant(
        {"access_token": "a", "refresh_token": "r", "expires_in": 28800, "scope": "x y"}
    )
    assert grant == TokenGrant("a", "r", 28800.0, ("x", "y"))
    assert "'a'" not in repr(grant) and "'r'" not in repr(grant)
    assert parse_grant({"access_token": "a", "expires_in": 1.5}).refresh_token is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "not a JSON object"),
        ({"expires_in": 1}, "access_token"),
        ({"access_token": "", "expires_in": 1}, "access_token"),
        ({"access_token": "a"}, "expires_in"),
        ({"access_token": "a", "expires_in": 0}, "expires_in"),
        ({"access_token": "a", "expires_in": True}, "expires_in"),
        ({"access_token": "a", "expires_in": "60"}, "expires_in"),
        ({"access_token": "a", "expires_in": 1, "refresh_token": 5}, "refresh_token"),
        ({"access_token": "a", "expires_in": 1, "scope": ["x"]}, "scope"),
    ],
)
def test_a_body_that_is_no_grant_is_refused(body, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_grant(body)


# --- the credentials file ------------------------------------------------------------------------


def test_a_login_is_stored_0600_keeping_other_keys(tmp_path):
    path = tmp_path / "claude" / ".credentials.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"mcpOAuth": {"x": 1}, "claudeAiOauth": {"accessToken": "old"}}))
    path.chmod(0o644)
    CredentialsFile(path).save_login(TokenGrant("a1", "r1", 3600.0, ("s1", "s2")), 1_000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "mcpOAuth": {"x": 1},
        "claudeAiOauth": {
            "accessToken": "a1",
            "refreshToken": "r1",
            "expiresAt": 3_601_000,
            "scopes": ["s1", "s2"],
            "subscriptionType": None,
            "rateLimitTier": None,
        },
    }
    assert [p.name for p in path.parent.iterdir()] == [".credentials.json"]  # no temporary left


def test_the_first_login_creates_the_directory_and_file(tmp_path):
    path = tmp_path / "nothing-yet" / ".credentials.json"
    CredentialsFile(path).save_login(TokenGrant("a1", None, 60.0, None), 0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())["claudeAiOauth"]
    assert stored["refreshToken"] is None and stored["scopes"] == []
    environ = {"CLAUDE_CONFIG_DIR": str(path.parent)}
    assert read_credentials(environ, False).method == "oauth"
    assert read_credentials(environ, False).expires_at_ms == 60_000


def test_a_file_that_is_not_json_reads_as_no_login_and_a_login_replaces_it(tmp_path):
    path = tmp_path / ".credentials.json"
    path.write_bytes(b"\xff{not json")
    assert read_credentials({"CLAUDE_CONFIG_DIR": str(tmp_path)}, False).method == "none"
    CredentialsFile(path).save_login(TokenGrant("a1", "r1", 60.0, None), 0)
    assert CredentialsFile(path).login().access_token == "a1"


def test_a_refresh_rotates_the_tokens_and_keeps_the_rest(tmp_path):
    path = tmp_path / ".credentials.json"
    file = CredentialsFile(path)
    file.save_login(TokenGrant("a1", "r1", 60.0, ("s",)), 0)
    document = json.loads(path.read_text())
    document["claudeAiOauth"]["subscriptionType"] = "max"
    document["other"] = True
    path.write_text(json.dumps(document))
    assert file.save_refresh("r1", TokenGrant("a2", "r2", 120.0, None), 10_000)
    stored = json.loads(path.read_text())
    assert stored["other"] is True
    assert stored["claudeAiOauth"] == {
        "accessToken": "a2",
        "refreshToken": "r2",
        "expiresAt": 130_000,
        "scopes": ["s"],
        "subscriptionType": "max",
        "rateLimitTier": None,
    }
    # An endpoint that sends no new refresh token leaves the old one valid.
    assert file.save_refresh("r2", TokenGrant("a3", None, 120.0, ("t",)), 0)
    assert file.login().refresh_token == "r2"
    assert json.loads(path.read_text())["claudeAiOauth"]["scopes"] == ["t"]


def test_a_refresh_of_a_login_replaced_meanwhile_writes_nothing(tmp_path):
    path = tmp_path / ".credentials.json"
    file = CredentialsFile(path)
    file.save_login(TokenGrant("new", "r-new", 60.0, None), 0)
    before = path.read_bytes()
    assert not file.save_refresh("r-old", TokenGrant("a2", "r2", 60.0, None), 0)
    assert path.read_bytes() == before


def test_a_symlinked_file_is_written_where_it_points(tmp_path):
    (tmp_path / "volume").mkdir()
    real = tmp_path / "volume" / "creds.json"
    real.write_text("{}")
    link = tmp_path / ".credentials.json"
    link.symlink_to(real)
    CredentialsFile(link).save_login(TokenGrant("a1", "r1", 60.0, None), 0)
    assert link.is_symlink()
    assert CredentialsFile(real).login().access_token == "a1"


def test_a_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / ".credentials.json"
    file = CredentialsFile(path)
    file.save_login(TokenGrant("a1", "r1", 60.0, None), 0)

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        file.save_login(TokenGrant("a2", "r2", 60.0, None), 0)
    assert file.login().access_token == "a1"
    assert [p.name for p in tmp_path.iterdir()] == [".credentials.json"]


# --- the token endpoint client --------------------------------------------------------------------


async def test_an_exchange_posts_json_and_returns_the_grant(nursery):
    with trio.fail_after(10):
        fake = FakeTokenEndpoint()
        await nursery.start(fake.serve)
        grant = await TokenEndpoint(fake.url).exchange("the-code", "the-verifier", "the-state")
    assert grant == TokenGrant("access-1", "refresh-1", 3600.0, ("user:inference", "user:profile"))
    assert fake.requests == [
        {
            "grant_type": "authorization_code",
            "code": "the-code",
            "redirect_uri": REDIRECT_URI,
            "client_id": CLIENT_ID,
            "code_verifier": "the-verifier",
            "state": "the-state",
        }
    ]


async def test_a_refresh_posts_the_refresh_token(nursery):
    with trio.fail_after(10):
        fake = FakeTokenEndpoint()
        await nursery.start(fake.serve)
        grant = await TokenEndpoint(fake.url).refresh("refresh-0")
    assert grant.refresh_token == "refresh-1"
    assert fake.requests == [
        {"grant_type": "refresh_token", "refresh_token": "refresh-0", "client_id": CLIENT_ID}
    ]


async def test_an_error_status_says_what_the_endpoint_said_without_secrets(nursery):
    with trio.fail_after(10):
        fake = FakeTokenEndpoint(
            answer=(400, {"error": "invalid_grant", "error_description": "bad code the-code"})
        )
        await nursery.start(fake.serve)
        with pytest.raises(TokenEndpointError) as caught:
            await TokenEndpoint(fake.url).exchange("the-code", "the-verifier", "the-state")
    assert str(caught.value) == (
        "the token endpoint answered 400 (invalid_grant: bad code [redacted])"
    )


async def test_a_server_error_and_a_non_grant_are_errors(nursery):
    with trio.fail_after(10):
        fake = FakeTokenEndpoint(answer=(500, b"<html>oops</html>"))
        await nursery.start(fake.serve)
        with pytest.raises(TokenEndpointError, match="^the token endpoint answered 500$"):
            await TokenEndpoint(fake.url).refresh("r")
        fake.answer = (200, {"error": {"type": "x", "message": "y"}})
        with pytest.raises(TokenEndpointError, match="not a token grant: access_token"):
            await TokenEndpoint(fake.url).refresh("r")


async def test_an_unreachable_endpoint_is_an_error(nursery):
    with trio.fail_after(10):
        with pytest.raises(TokenEndpointError, match="cannot reach the token endpoint"):
            await TokenEndpoint("http://127.0.0.1:1/token").refresh("r")


async def test_a_hanging_endpoint_is_given_up_in_time(nursery):
    with trio.fail_after(10):
        fake = FakeTokenEndpoint(answer="hang")
        await nursery.start(fake.serve)
        started = trio.current_time()
        with pytest.raises(TokenEndpointError, match="did not answer within 3 s"):
            await TokenEndpoint(fake.url).exchange("c", "v", "s")
        took = trio.current_time() - started
    assert EXCHANGE_TIMEOUT_S <= took < EXCHANGE_TIMEOUT_S + 0.5


# --- request and status bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"code": "abc#xyz"}', ("abc", "xyz")),
        (b'{"code": "  abc#xyz\\n"}', ("abc", "xyz")),
        (b'{"code": "a#b#xyz"}', ("a#b", "xyz")),  # the state is ours and holds no '#'
    ],
)
def test_an_exchange_body_gives_code_and_state(body, expected):
    assert parse_exchange_code(body) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{}", "code: required, the CODE#STATE the callback page shows"),
        (b'{"code": 5}', "code: expected a string, got number"),
        (b'{"code": "abc"}', INVALID_CODE_FORMAT),
        (b'{"code": "#xyz"}', INVALID_CODE_FORMAT),
        (b'{"code": "abc#"}', INVALID_CODE_FORMAT),
        (b"", "Request body is empty: expected a JSON object"),
        (b'{"code": "' + b"x" * 5000 + b'#s"}', "code: exceeds 4096 characters"),
    ],
)
def test_a_bad_exchange_body_is_a_400_naming_the_problem(body, message):
    with pytest.raises(BadRequest) as caught:
        parse_exchange_code(body)
    assert (caught.value.status, caught.value.message) == (400, message)


SNAPSHOT = PoolSnapshot((), 0, 20, 0, 0, None, False, True)
NOW_MS = 1_800_000_000_000


def test_the_status_of_an_api_key_is_exactly_what_claude_code_web_expects():
    body = auth_status_body(CredentialsStatus("apiKey"), SNAPSHOT, NOW_MS)
    assert body == {"authenticated": True, "method": "apiKey"}


def test_an_expired_login_is_authenticated_only_while_a_refresh_can_still_save_it():
    expired = NOW_MS - 1
    refreshable = CredentialsStatus("oauth", expired, refreshable=True)
    assert auth_status_body(refreshable, SNAPSHOT, NOW_MS)["authenticated"] is True
    failing = attrs.evolve(refreshable, refresh_failure=RefreshFailure("x", 1.0, 11.0))
    body = auth_status_body(failing, SNAPSHOT, NOW_MS)
    assert body["authenticated"] is False
    assert body["lastRefreshError"] == {"message": "x", "at": 1000, "nextAttemptAt": 11000}
    stranded = CredentialsStatus("oauth", expired, refreshable=False)
    assert auth_status_body(stranded, SNAPSHOT, NOW_MS)["authenticated"] is False
    valid = CredentialsStatus("oauth", NOW_MS + 1, refreshable=False)
    assert auth_status_body(valid, SNAPSHOT, NOW_MS) == {
        "authenticated": True,
        "method": "oauth",
        "expiresAt": NOW_MS + 1,
    }


def test_a_refusal_of_credentials_replaced_since_no_longer_counts():
    refused = attrs.evolve(
        SNAPSHOT, upstream_auth_error=UpstreamError(401, "invalid", 0), upstream_auth_error_at=100.0
    )
    old = CredentialsStatus("oauth", NOW_MS + 10**6, True, None, changed_at=50.0)
    new = attrs.evolve(old, changed_at=150.0)
    assert auth_status_body(old, refused, NOW_MS)["authenticated"] is False
    assert auth_status_body(old, refused, NOW_MS)["lastUpstreamAuthError"]["status"] == 401
    assert auth_status_body(new, refused, NOW_MS) == {
        "authenticated": True,
        "method": "oauth",
        "expiresAt": NOW_MS + 10**6,
    }
