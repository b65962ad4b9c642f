"""The command line: ``claude-code-api`` / ``python -m claude_code_api`` as an operator runs it.

Each test runs the real command in a subprocess: --help and --version never serve, unknown
arguments exit 2 with the usage, ``check`` prints one line per check and exits 0 only when
none failed (against the mock Messages API with an API key: all pass), ``login`` without a
terminal says so at once, and ``python -m claude_code_api.config`` without its argument
prints its usage.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import trio

from claude_code_api.demo.mock_messages_api import open_mock_api
from tests.support.harness import FAKE_CLAUDE_VARIABLES, service_env
from tests.support.real_cli import requires_real_cli, service_overrides

PYTHON = sys.executable
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "claude-code-api")
BUDGET_S = 30
CHECK_LINE = re.compile(r"^(ok  |warn|FAIL)  ([a-zA-Z][a-zA-Z ]*): \S")


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run(argv: list[str], env: dict[str, str], budget: float = BUDGET_S):
    with trio.fail_after(budget):
        return await trio.run_process(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def no_credentials_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A service environment with the fake CLI, no Claude credentials and no model API."""
    home = tmp_path / "home"
    home.mkdir()
    return service_env(
        tmp_path,
        {
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": "",
            "ANTHROPIC_API_KEY": "",
            "ANTHROPIC_AUTH_TOKEN": "",
            "CLAUDE_CODE_OAUTH_TOKEN": "",
            # Where agents would call the model: a closed port, so that no network is needed.
            "AGENT_ENV": f"{FAKE_CLAUDE_VARIABLES},ANTHROPIC_BASE_URL",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{closed_port()}",
            **overrides,
        },
        record_pids=False,
    )


@pytest.mark.parametrize(
    "argv",
    [[PYTHON, "-m", "claude_code_api", "--help"], [CONSOLE_SCRIPT, "-h"]],
    ids=["python -m --help", "console script -h"],
)
async def test_help_says_what_it_does_and_serves_nothing(tmp_path, argv):
    # A port that is free: a command that served would bind it and never exit by itself.
    port = closed_port()
    env = service_env(tmp_path, {"PORT": str(port)})
    done = await run(argv, env, budget=15)

    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.startswith("usage: claude-code-api ")
    for text in ("HTTP service", "serve", "check", "login", "--version", "Configuration"):
        assert text in out
    assert done.stderr == b""
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # still free


async def test_version_is_the_package_version(tmp_path):
    done = await run([CONSOLE_SCRIPT, "--version"], service_env(tmp_path))

    assert done.returncode == 0
    assert done.stdout.decode() == f"claude-code-api {metadata.version('claude-code-api')}\n"


@pytest.mark.parametrize(
    "args", [["bogus"], ["--bogus"], ["serve", "--port", "80"], ["check", "extra"], ["-x"]]
)
async def test_unknown_arguments_exit_2_with_the_usage(tmp_path, args):
    done = await run([PYTHON, "-m", "claude_code_api", *args], service_env(tmp_path))

    assert done.returncode == 2
    assert done.stdout == b""
    err = done.stderr.decode()
    assert err.startswith("usage: claude-code-api ")
    assert "Traceback" not in err


async def test_check_without_credentials_fails_one_line_per_check(tmp_path):
    done = await run([CONSOLE_SCRIPT, "check"], no_credentials_env(tmp_path))

    assert done.returncode == 1, done.stdout
    lines = done.stdout.decode().splitlines()
    checks = [CHECK_LINE.match(line) for line in lines[:-1]]
    assert all(checks), lines
    status = {match[2]: match[1].strip() for match in checks if match}
    # As root where the test's directory is closed to AGENT_UID (a clone under /root, and no
    # sandbox in a container), the service opens the way to it, and says so.
    assert status.pop("agent user", "warn") == "warn"
    # Where the service may make no cgroups (a container), what stays unbounded is said.
    assert status.pop("limits", "warn") == "warn"
    assert status == {
        "settings": "ok",
        "callers": "warn",  # AUTH_ADMINS is not set
        "executable": "ok",  # the fake CLI: it runs
        "sandbox": "warn",  # AGENT_SANDBOX=off
        "credentials": "FAIL",
        "agent start": "ok",  # the service's own start-up probe: one agent's launcher runs
        "model API": "FAIL",
    }
    credentials = next(line for line in lines if line.startswith("FAIL  credentials"))
    assert "claude-code-api login" in credentials and "USE_CLAUDE_API_KEY=1" in credentials
    model_api = next(line for line in lines if line.startswith("FAIL  model API"))
    assert "ANTHROPIC_BASE_URL" in model_api and "cannot reach" in model_api
    assert lines[-1] == "2 check(s) failed: agents will not answer until they pass"
    assert done.stderr == b""


@pytest.mark.parametrize(
    ("stored", "status", "says"),
    [
        ({"claudeAiOauth": {"accessToken": "a", "refreshToken": "r", "expiresAt": 1}}, "ok", ""),
        ({"claudeAiOauth": {"accessToken": "a", "expiresAt": 4102444800000}}, "ok", ""),
        ({"claudeAiOauth": {"accessToken": "a", "expiresAt": 1}}, "FAIL", "has expired"),
        ({"somethingElse": 1}, "FAIL", "holds no Claude login"),
        ("not json", "FAIL", "holds no Claude login"),
    ],
    ids=["refreshable", "valid", "expired", "no login", "not JSON"],
)
async def test_check_reads_the_claude_login(tmp_path, stored, status, says):
    env = no_credentials_env(tmp_path)
    claude_dir = tmp_path / "home" / ".claude"
    claude_dir.mkdir()
    credentials = claude_dir / ".credentials.json"
    credentials.write_text(stored if isinstance(stored, str) else json.dumps(stored))
    done = await run([CONSOLE_SCRIPT, "check"], env)

    line = next(x for x in done.stdout.decode().splitlines() if " credentials: " in x)
    assert line.startswith(f"{status:<4}  credentials: "), line
    assert says in line and str(credentials) in line


async def test_check_says_when_the_cli_does_not_run(tmp_path):
    broken = tmp_path / "claude"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    broken.chmod(0o755)
    done = await run(
        [CONSOLE_SCRIPT, "check"], no_credentials_env(tmp_path, CLAUDE_EXECUTABLE=str(broken))
    )

    assert done.returncode == 1
    line = next(x for x in done.stdout.decode().splitlines() if "executable:" in x)
    assert line.startswith("FAIL  executable: ") and "cannot start" in line


async def test_bad_settings_exit_2_before_any_check(tmp_path):
    env = no_credentials_env(tmp_path, PORT="eighty")
    done = await run([CONSOLE_SCRIPT, "check"], env)

    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.decode().startswith("claude-code-api: configuration error: PORT")


@requires_real_cli
async def test_check_passes_with_an_api_key_and_the_mock_model_api(tmp_path):
    with trio.fail_after(BUDGET_S):
        async with open_mock_api() as api:
            env = service_env(tmp_path, service_overrides(api.url, tmp_path))
            done = await run([CONSOLE_SCRIPT, "check"], env)

    assert done.returncode == 0, done.stdout.decode()
    lines = done.stdout.decode().splitlines()
    assert all(CHECK_LINE.match(line) for line in lines), lines
    assert not [line for line in lines if line.startswith("FAIL")]
    assert any(line.startswith("ok    executable: ") and "Claude Code" in line for line in lines)
    assert any(line.startswith("ok    credentials: ") for line in lines)
    assert f"ok    model API: {api.url} answers (HTTP 404)" in lines
    # It really asked the mock, with the key agents will use.
    assert [r.headers.get("x-api-key") for r in api.requests] == ["sk-ant-mock-key"]


async def test_login_without_a_terminal_says_so_at_once(tmp_path):
    done = await run([CONSOLE_SCRIPT, "login"], no_credentials_env(tmp_path), budget=15)

    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.startswith("claude-code-api: login needs a terminal")
    assert "/auth/login" in err and "USE_CLAUDE_API_KEY=1" in err
    assert not (tmp_path / "home" / ".claude" / ".credentials.json").exists()


async def test_login_in_a_terminal_without_network_says_so_at_once(tmp_path):
    # A terminal (a pty), but Claude's login host unreachable: the CLI would show a URL and
    # wait for a code it could never exchange.
    env = no_credentials_env(
        tmp_path, CLAUDE_OAUTH_TOKEN_URL=f"http://127.0.0.1:{closed_port()}/v1/oauth/token"
    )
    controller, terminal = os.openpty()
    try:
        with trio.fail_after(15):
            done = await trio.run_process(
                [CONSOLE_SCRIPT, "login"],
                env=env,
                stdin=terminal,
                stdout=terminal,
                stderr=terminal,
                check=False,
            )
        said = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
        os.close(terminal)

    assert done.returncode == 1, said
    assert said.startswith("claude-code-api: cannot reach Claude's login at http://127.0.0.1:")
    assert "needs a terminal" not in said


async def test_config_module_without_its_argument_prints_usage(tmp_path):
    done = await run([PYTHON, "-m", "claude_code_api.config"], service_env(tmp_path))

    assert done.returncode == 2
    err = done.stderr.decode()
    assert err.startswith("usage: python -m claude_code_api.config README.md")
    assert "Traceback" not in err
