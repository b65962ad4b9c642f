"""claude-code-web's bearer tokens, and the order in which keys and tokens are tried.

Pure functions: ``authenticate`` takes the clock as ``now_ms``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from claude_code_api.config.settings import Settings, load_settings, parse_api_keys
from claude_code_api.http.auth import (
    Unauthorized,
    auth_warnings,
    authenticate,
    is_admin,
    make_token,
    verify_token,
)

SECRET = "the-nextauth-secret"
NOW = 1_800_000_000_000
WITH_SECRET = Settings(api_keys=parse_api_keys("sk-plain,alice:sk-alice"), nextauth_secret=SECRET)


def node_token(username: str, timestamp_ms: int, secret: str = SECRET) -> str:
    """A token exactly as claude-code-web's generateToken writes it (written out, not shared)."""
    data = f"{username}:{timestamp_ms}"
    mac = hmac.new(secret.encode(), data.encode(), hashlib.sha256).hexdigest()
    return base64.b64encode(f"{data}:{mac}".encode()).decode()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def user_of(headers: dict[str, str], settings: Settings = WITH_SECRET, now: int = NOW) -> str:
    return authenticate(headers, settings, now_ms=now)


def refused(headers: dict[str, str], settings: Settings = WITH_SECRET, now: int = NOW) -> str:
    with pytest.raises(Unauthorized) as caught:
        authenticate(headers, settings, now_ms=now)
    return caught.value.message


def test_make_token_is_what_claude_code_web_sends():
    assert make_token(SECRET, "alice", NOW) == node_token("alice", NOW)


def test_a_fresh_token_authenticates_as_its_username():
    assert user_of(bearer(node_token("alice", NOW))) == "alice"
    assert user_of(bearer(node_token("bob@example.com", NOW - 1000))) == "bob@example.com"
    assert user_of(bearer(node_token("Ünïcode Name", NOW))) == "Ünïcode Name"


def test_a_token_is_valid_for_five_minutes():
    assert user_of(bearer(node_token("alice", NOW - 300_000))) == "alice"
    assert refused(bearer(node_token("alice", NOW - 300_001))) == "Invalid or expired token"


def test_up_to_a_minute_in_the_future_is_tolerated_not_more():
    assert user_of(bearer(node_token("alice", NOW + 60_000))) == "alice"
    assert refused(bearer(node_token("alice", NOW + 60_001))) == "Invalid or expired token"
    assert refused(bearer(node_token("alice", NOW + 86_400_000))) == "Invalid or expired token"


def test_usernames_may_hold_colons_split_from_the_right():
    assert user_of(bearer(node_token("web:alice", NOW))) == "web:alice"
    assert user_of(bearer(node_token("a:b:c", NOW))) == "a:b:c"


def test_an_empty_username_is_anonymous():
    assert user_of(bearer(node_token("", NOW))) == "anonymous"


@pytest.mark.parametrize(
    "token",
    [
        node_token("alice", NOW, secret="another-secret"),
        # Tampered: the username changed, the MAC kept.
        base64.b64encode(
            base64.b64decode(node_token("alice", NOW)).replace(b"alice", b"admin")
        ).decode(),
        # Tampered: the timestamp changed (to stay fresh), the MAC kept.
        base64.b64encode(
            base64.b64decode(node_token("alice", NOW - 600_000)).replace(
                str(NOW - 600_000).encode(), str(NOW).encode()
            )
        ).decode(),
        # The MAC in upper case (Node writes lower case), cut short, or missing.
        base64.b64encode(
            b"alice:%d:%s" % (NOW, base64.b64decode(node_token("alice", NOW))[-64:].upper())
        ).decode(),
        base64.b64encode(base64.b64decode(node_token("alice", NOW))[:-2]).decode(),
        base64.b64encode(f"alice:{NOW}".encode()).decode(),
        base64.b64encode(f"alice:{NOW}:".encode()).decode(),
        # A timestamp that is not a plain number.
        make_token(SECRET, "alice", NOW).replace("=", "") + "!",
        base64.b64encode(f"alice:+{NOW}:x".encode()).decode(),
        "not base64 at all",
        "",
        "a" * 5000,
        base64.b64encode(b"\xff\xfe:1:2").decode(),
    ],
)
def test_tampered_or_foreign_tokens_are_refused(token):
    assert refused(bearer(token)) in ("Invalid or expired token", "Missing authorization token")


def test_a_token_with_a_control_character_in_its_username_is_refused():
    # The username reaches logs; a newline would forge log lines.
    assert refused(bearer(node_token("alice\nINFO forged", NOW))) == "Invalid or expired token"


def test_missing_padding_is_tolerated():
    token = node_token("a", NOW)
    assert token.endswith("=")
    assert user_of(bearer(token.rstrip("="))) == "a"


def test_without_a_secret_tokens_are_refused_and_keys_still_work():
    keys_only = Settings(api_keys=parse_api_keys("sk-plain"))
    assert refused(bearer(node_token("alice", NOW)), keys_only) == "Invalid or expired token"
    # A token signed with the empty secret is refused too.
    assert refused(bearer(node_token("alice", NOW, secret="")), keys_only) == (
        "Invalid or expired token"
    )
    assert user_of({"x-api-key": "sk-plain"}, keys_only) == "api"
    assert verify_token(node_token("alice", NOW, secret=""), "", NOW) is None


def test_a_secret_without_api_keys_lets_tokens_in():
    tokens_only = load_settings({"NEXTAUTH_SECRET": SECRET})
    assert tokens_only.api_keys == ()
    assert user_of(bearer(node_token("alice", NOW)), tokens_only) == "alice"
    assert refused({"x-api-key": "sk-plain"}, tokens_only) == "Invalid API key"
    assert not any("401" in warning for warning in auth_warnings(tokens_only))


def test_without_keys_or_secret_start_up_warns_that_everything_is_401():
    (warning, _admins) = auth_warnings(Settings())
    assert "every authenticated route will answer 401" in warning


def test_x_api_key_comes_first_and_a_wrong_one_never_falls_back_to_the_token():
    token = node_token("alice", NOW)
    assert user_of({"x-api-key": "sk-plain", **bearer(token)}) == "api"
    assert refused({"x-api-key": "sk-wrong", **bearer(token)}) == "Invalid API key"
    # An empty x-api-key is none (claude-code-web sends one): the token decides.
    assert user_of({"x-api-key": "", **bearer(token)}) == "alice"


def test_the_bearer_value_is_tried_as_a_key_before_as_a_token():
    assert user_of(bearer("sk-alice")) == "alice"
    assert refused(bearer("sk-nothing")) == "Invalid or expired token"
    assert refused({}) == "Missing API key"
    assert refused({"authorization": "Basic " + node_token("alice", NOW)}) == (
        "Missing authorization token"
    )


def test_token_user_prefix_separates_token_users_from_key_users():
    shared = WITH_SECRET
    separate = load_settings(
        {"API_KEYS": "alice:sk-alice", "NEXTAUTH_SECRET": SECRET, "TOKEN_USER_PREFIX": "web:"}
    )
    token = bearer(node_token("alice", NOW))
    # One namespace by default: web user alice is key user alice.
    assert user_of(token, shared) == user_of({"x-api-key": "sk-alice"}, shared) == "alice"
    assert user_of(token, separate) == "web:alice"
    assert user_of({"x-api-key": "sk-alice"}, separate) == "alice"
    assert user_of(bearer(node_token("", NOW)), separate) == "web:anonymous"


def test_admins_are_named_alike_for_keys_and_tokens():
    settings = load_settings({"AUTH_ADMINS": "alice, web:bob", "NEXTAUTH_SECRET": SECRET})
    assert is_admin("alice", settings) and is_admin("web:bob", settings)
    assert not is_admin("bob", settings) and not is_admin("api", settings)
    everyone = Settings()
    assert is_admin("anybody", everyone)
    assert any("AUTH_ADMINS is not set" in w for w in auth_warnings(everyone))
    assert not any("AUTH_ADMINS" in w for w in auth_warnings(settings))
