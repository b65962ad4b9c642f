"""Configuration: the declarations in ``config.py``, reading the environment, and
README's table. Pure functions, except the end-to-end tests that start
``python -m claude_code_api`` with a bad variable and check it exits 2 with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from claude_code_api.config.settings import (
    TABLE_END,
    TABLE_START,
    ApiKey,
    ConfigError,
    Duration,
    Settings,
    declarations,
    load_settings,
    markdown_table,
    parse_api_keys,
    with_table,
)

REPO = Path(__file__).resolve().parents[2]
DAY_S = 24 * 3600.0


# --- the declarations -------------------------------------------------------------------------


def test_defaults():
    settings = load_settings({})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.pool_size) == ("0.0.0.0", 8080, 1)
    assert (settings.queue_max, settings.default_timeout_s, settings.max_timeout_s) == (
        20,
        120.0,
        3600.0,
    )
    assert (settings.default_timeout_ms, settings.max_timeout_ms) == (120_000, 3_600_000)
    assert settings.api_keys == ()
    assert settings.use_claude_api_key is False
    assert settings.claude_executable is None
    assert settings.data_dir == Path("data")
    assert (settings.warmup_timeout_s, settings.interrupt_grace_s) == (30.0, 2.0)
    assert (settings.shutdown_grace_s, settings.restart_backoff_max_s) == (30.0, 30.0)
    assert (settings.session_idle_s, settings.max_live_sessions) == (1800.0, 8)
    assert settings.agent_env == ()
    assert settings.agent_sandbox == "auto"
    assert settings.max_sessions_per_user == 100
    assert settings.session_ttl_s == 30 * DAY_S
    assert settings.log_level == "INFO"
    assert settings.agent_reuse_s == 5.0
    assert settings.session_lease_s == 15.0


def test_every_variable_is_declared_once():
    names = [declared.name for _attribute, declared in declarations()]
    assert len(names) == len(set(names))
    assert {"API_KEYS", "AGENT_ENV", "AGENT_SANDBOX", "SESSION_TTL_MS", "LOG_LEVEL"} <= set(names)


def test_one_unit_convention():
    # Settings holds every duration in seconds, named *_s; the variable keeps its unit's suffix.
    durations = [(a, d) for a, d in declarations() if isinstance(d.kind, Duration)]
    assert len(durations) == 11
    for attribute, declared in durations:
        assert attribute.endswith("_s"), attribute
        assert declared.name.endswith("_" + declared.kind.unit.upper()), declared.name
    for field in attrs.fields(Settings):
        if field.name.endswith("_s"):
            assert field.name in dict(durations), field.name


def test_readme_table_is_generated_from_the_declarations():
    readme = (REPO / "README.md").read_text()
    assert readme.count(TABLE_START) == 1 and readme.count(TABLE_END) == 1
    assert with_table(readme) == readme, (
        "README's configuration table differs from claude_code_api/config/settings.py:"
        " run `python -m claude_code_api.config README.md`"
    )
    # Every declared variable has its row, with its default as written in the environment.
    for _attribute, declared in declarations():
        assert f"| `{declared.name}` |" in readme
    assert "| `SESSION_IDLE_MS` | `1800000` (30 min) |" in markdown_table()


def test_with_table_replaces_only_the_table():
    text = f"intro\n{TABLE_START}\nold row\n{TABLE_END}\nrest\n"
    assert with_table(text) == f"intro\n{TABLE_START}\n{markdown_table()}{TABLE_END}\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        with_table("no markers here\n")


# --- reading the environment ---------------------------------------------------------------------


def test_values_are_read():
    settings = load_settings(
        {
            "HOST": "127.0.0.1",
            "PORT": " 9000 ",
            "POOL_SIZE": "4",
            "QUEUE_MAX": "0",
            "CLAUDE_MODEL": "claude-opus-4",
            "DEFAULT_TIMEOUT_MS": "5000",
            "MAX_TIMEOUT_MS": "5000",
            "DATA_DIR": "/tmp/data",
            "WARMUP_TIMEOUT_MS": "1500",
            "INTERRUPT_GRACE_MS": "0",
            "SHUTDOWN_GRACE_S": "7",
            "MAX_OUTPUT_CHARS": "10",
            "SESSION_IDLE_MS": "250",
            "RESTART_BACKOFF_MAX_MS": "3000",
            "MAX_SESSIONS_PER_USER": "3",
            "SESSION_TTL_MS": "86400000",
            "AGENT_ENV": " HTTPS_PROXY, _x1 ,,HTTPS_PROXY",
            "AGENT_SANDBOX": "ON",
            "LOG_LEVEL": "debug",
            "SESSION_LEASE_S": "4",
        }
    )
    assert (settings.host, settings.port, settings.pool_size, settings.queue_max) == (
        "127.0.0.1",
        9000,
        4,
        0,
    )
    assert settings.model == "claude-opus-4"
    assert (settings.default_timeout_s, settings.max_timeout_s) == (5.0, 5.0)
    assert (settings.default_timeout_ms, settings.max_timeout_ms) == (5000, 5000)
    assert settings.data_dir == Path("/tmp/data")
    assert (settings.warmup_timeout_s, settings.interrupt_grace_s) == (1.5, 0)
    assert (settings.shutdown_grace_s, settings.max_output_chars) == (7, 10)
    assert (settings.session_idle_s, settings.restart_backoff_max_s) == (0.25, 3.0)
    assert (settings.max_sessions_per_user, settings.session_ttl_s) == (3, DAY_S)
    assert settings.agent_env == ("HTTPS_PROXY", "_x1")
    assert (settings.agent_sandbox, settings.log_level) == ("on", "DEBUG")
    assert settings.session_lease_s == 4.0


def test_session_ttl_zero_means_never():
    assert load_settings({"SESSION_TTL_MS": "0"}).session_ttl_s is None


def test_blank_values_mean_defaults():
    blank = {declared.name: " " for _attribute, declared in declarations()}
    assert load_settings(blank) == Settings()
    assert load_settings({"PORT": "", "POOL_SIZE": "\t"}) == Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POOL_SIZE", "abc"),
        ("POOL_SIZE", "0"),
        ("POOL_SIZE", "257"),
        ("POOL_SIZE", "1.5"),
        ("POOL_SIZE", "0x10"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("QUEUE_MAX", "-1"),
        ("MAX_TIMEOUT_MS", "0"),
        ("DEFAULT_TIMEOUT_MS", "ten"),
        ("WARMUP_TIMEOUT_MS", "50"),
        ("SHUTDOWN_GRACE_S", "3601"),
        ("SHUTDOWN_GRACE_S", "1.5"),
        ("SESSION_LEASE_S", "2"),
        ("SESSION_LEASE_S", "601"),
        ("MAX_OUTPUT_CHARS", "0"),
        ("USE_CLAUDE_API_KEY", "maybe"),
        ("USE_CLAUDE_API_KEY", "2"),
        ("HOST", "local\x7fhost"),
        ("CLAUDE_MODEL", "claude-\udcff"),  # an undecodable byte in os.environ
        ("MAX_SESSIONS_PER_USER", "0"),
        ("SESSION_TTL_MS", "-1"),
        ("AGENT_SANDBOX", "maybe"),
        ("LOG_LEVEL", "verbose"),
        ("AGENT_ENV", "1ABC"),
        ("AGENT_ENV", "OK,NOT-OK"),
        ("AGENT_ENV", "N\udcff"),
        ("AGENT_ENV", "PATH,API_KEYS"),
    ],
)
def test_bad_value_is_a_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}={value.strip()!r}: "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        (" YES ", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_flags(raw, expected):
    assert load_settings({"USE_CLAUDE_API_KEY": raw}).use_claude_api_key is expected


def test_default_timeout_above_max_timeout():
    with pytest.raises(ConfigError) as caught:
        load_settings({"DEFAULT_TIMEOUT_MS": "5001", "MAX_TIMEOUT_MS": "5000"})
    assert "DEFAULT_TIMEOUT_MS=5001" in str(caught.value)
    assert "MAX_TIMEOUT_MS=5000" in str(caught.value)
    # The default bound applies too.
    with pytest.raises(ConfigError, match="DEFAULT_TIMEOUT_MS"):
        load_settings({"DEFAULT_TIMEOUT_MS": "3600001"})


def test_claude_executable(tmp_path):
    program = tmp_path / "claude"
    program.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match=r"^CLAUDE_EXECUTABLE="):
        load_settings({"CLAUDE_EXECUTABLE": str(program)})  # not executable
    with pytest.raises(ConfigError, match=r"^CLAUDE_EXECUTABLE="):
        load_settings({"CLAUDE_EXECUTABLE": str(tmp_path / "missing")})
    program.chmod(0o755)
    assert load_settings({"CLAUDE_EXECUTABLE": f" {program} "}).claude_executable == str(program)


def test_claude_executable_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"^CLAUDE_EXECUTABLE="):
        load_settings({"CLAUDE_EXECUTABLE": str(tmp_path)})


# --- API_KEYS ----------------------------------------------------------------------------------


def test_api_keys_parsing():
    assert parse_api_keys("") == ()
    assert parse_api_keys(" , ,") == ()
    assert parse_api_keys("k1") == (ApiKey("k1", "api"),)
    assert parse_api_keys("alice:k2, k3 ,,bob:k:4") == (
        ApiKey("k2", "alice"),
        ApiKey("k3", "api"),
        ApiKey("k:4", "bob"),  # only the first colon separates the user
    )
    # Every visible ASCII character but ',' may be in a key.
    visible = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ",")
    assert parse_api_keys(f"u:{visible}") == (ApiKey(visible, "u"),)
    # The same key twice for the same user is harmless: kept once.
    assert parse_api_keys("k1,api:k1,alice:k2,alice:k2") == (
        ApiKey("k1", "api"),
        ApiKey("k2", "alice"),
    )
    assert load_settings({"API_KEYS": "alice:k2"}).api_keys == (ApiKey("k2", "alice"),)


SECRET = "sk-secret-value"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("k1,alice:", "entry 2 (user 'alice'): the key after ':' is empty"),
        (f":{SECRET}", "entry 1: the user id before ':' is empty"),
        (f"k1, :{SECRET}", "entry 2: the user id before ':' is empty"),
        (f"alice:{SECRET}\udcff", "entry 1 (user 'alice'): a key may only hold visible ASCII"),
        (f"{SECRET}\udcff", "entry 1 (user 'api'): a key may only hold visible ASCII"),
        (f"alice:{SECRET}é", "entry 1 (user 'alice'): a key may only hold visible ASCII"),
        (f"alice:{SECRET} x", "entry 1 (user 'alice'): a key may only hold visible ASCII"),
        (f"alice: {SECRET}", "entry 1 (user 'alice'): a key may only hold visible ASCII"),
        (f"alice:{SECRET}\x01", "entry 1 (user 'alice'): a key may only hold visible ASCII"),
        (f"al ice:{SECRET}", "entry 1: a user id may only hold visible ASCII"),
        (f"al\udcffice:{SECRET}", "entry 1: a user id may only hold visible ASCII"),
        (
            f"alice:{SECRET},k1,bob:{SECRET}",
            "entries 1 and 3 give one key to two users ('alice' and 'bob')",
        ),
        (f"{SECRET},bob:{SECRET}", "entries 1 and 2 give one key to two users ('api' and 'bob')"),
    ],
)
def test_bad_api_keys_are_refused_without_showing_the_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        load_settings({"API_KEYS": raw})
    text = str(caught.value)
    assert text.startswith(f"API_KEYS: {message}"), text
    assert "\n" not in text
    assert SECRET not in text


def test_api_keys_are_not_shown_in_repr():
    settings = load_settings({"API_KEYS": f"alice:{SECRET}"})
    assert SECRET not in repr(settings)
    assert "alice" in repr(settings)


def test_user_for_key():
    settings = load_settings({"API_KEYS": "sk-plain,alice:sk-alice"})
    assert settings.user_for_key("sk-alice") == "alice"
    assert settings.user_for_key("sk-plain") == "api"
    assert settings.user_for_key("") is None
    assert settings.user_for_key("sk-ALICE") is None
    assert settings.user_for_key("ünïcode") is None
    assert settings.user_for_key("sk-alice\udcff") is None


# --- end to end: the service refuses to start --------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "named", "secret"),
    [
        ({b"POOL_SIZE": b"abc"}, "POOL_SIZE='abc'", None),
        # A byte that is not UTF-8: os.environ holds it as a surrogate escape.
        ({b"API_KEYS": b"alice:sk-secret\xff"}, "API_KEYS: entry 1 (user 'alice')", b"sk-secret"),
        ({b"API_KEYS": b"alice:sk-same,bob:sk-same"}, "API_KEYS: entries 1 and 2", b"sk-same"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(variables, named, secret):
    declared = {declared.name for _attribute, declared in declarations()}
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items() if k not in declared}
    env.update(variables)
    done = subprocess.run(
        [sys.executable, "-m", "claude_code_api"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"claude-code-api: configuration error: {named}"), lines[0]
    if secret is not None:
        assert secret not in done.stderr
    assert done.stdout == b""


def test_a_session_ttl_that_could_expire_a_live_session_is_refused():
    with pytest.raises(ConfigError, match="SESSION_TTL_MS=.*must exceed SESSION_IDLE_MS"):
        load_settings({"SESSION_TTL_MS": "60000", "SESSION_IDLE_MS": "60000"})
    assert load_settings({"SESSION_TTL_MS": "0"}).session_ttl_s is None
