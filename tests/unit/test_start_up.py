"""Start-up failures: exit status 1 and one line naming the cause, never a traceback.

Python 3.11.2 (Debian 12's) wraps an exception raised inside an ``except*``
handler, ``SystemExit`` included, in an exception group: ``sys.exit(1)`` there
printed a full ``BaseExceptionGroup`` traceback. The subprocess tests catch that
on such a Python; the source check catches it on any.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import claude_code_api
from claude_code_api.agent.sandbox import probe_sandbox
from tests.e2e.test_e2e_agents import cli_the_sandbox_hides
from tests.support.harness import service_env

PACKAGE = Path(claude_code_api.__file__).parent


def exits_inside_except_star(source: str) -> list[int]:
    """Lines of ``sys.exit(...)``/``exit(...)``/``raise SystemExit`` in an except* handler."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.TryStar):
            continue
        for handler in node.handlers:
            for inner in ast.walk(handler):
                if isinstance(inner, ast.Call):
                    name = ast.unparse(inner.func)
                    if name in ("sys.exit", "exit", "SystemExit"):
                        found.append(inner.lineno)
                elif isinstance(inner, ast.Raise) and inner.exc is not None:
                    if "SystemExit" in ast.unparse(inner.exc):
                        found.append(inner.lineno)
    return found


def test_the_source_check_finds_sys_exit_in_an_except_star_handler():
    bad = "try:\n    pass\nexcept* OSError:\n    sys.exit(1)\n"
    assert exits_inside_except_star(bad) == [4]
    assert exits_inside_except_star("try:\n    pass\nexcept* OSError:\n    status = 1\n") == []


def test_no_except_star_handler_exits():
    offenders = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := exits_inside_except_star(path.read_text()))
    }
    assert offenders == {}


def start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "claude_code_api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_already_taken_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start(service_env(tmp_path, {"PORT": str(port)}))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "claude-code-api:" in line]
    assert len(errors) == 1 and "cannot serve" in errors[0], result.stderr
    assert "address already in use" in errors[0].lower(), result.stderr


def test_a_data_dir_that_is_a_file_exits_1_with_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = start(service_env(tmp_path, {"DATA_DIR": str(not_a_dir)}))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "claude-code-api:" in line]
    assert len(errors) == 1, result.stderr
    assert os.fspath(not_a_dir) in errors[0], result.stderr


def test_a_sandbox_demanded_but_not_available_exits_1_with_one_line(tmp_path):
    # No bwrap on this PATH (the service itself runs as sys.executable, absolute).
    env = service_env(tmp_path, {"AGENT_SANDBOX": "on", "PATH": str(tmp_path / "empty")})
    result = start(env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "claude-code-api:" in line]
    assert len(errors) == 1 and "cannot start" in errors[0], result.stderr
    assert "AGENT_SANDBOX=on" in errors[0] and "bubblewrap" in errors[0], result.stderr


@pytest.mark.skipif(probe_sandbox(shutil.which("bwrap")) is not None, reason="no sandbox here")
def test_a_sandbox_demanded_in_which_no_agent_starts_exits_1_with_one_line(tmp_path):
    cli = cli_the_sandbox_hides(tmp_path)  # (the sandbox hides DATA_DIR)
    result = start(service_env(tmp_path, {"AGENT_SANDBOX": "on", "CLAUDE_EXECUTABLE": str(cli)}))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "claude-code-api:" in line]
    assert len(errors) == 1 and "AGENT_SANDBOX=on" in errors[0], result.stderr
    assert str(cli) in errors[0], result.stderr


def test_what_start_up_made_is_frozen_out_of_the_garbage_collector(tmp_path):
    # ~100 000 objects (modules, classes, the SDK's types) live as long as the process; a
    # full collection that scans them pauses every request in flight for ~60 ms.
    code = (
        "import gc, os\n"
        "from claude_code_api.config.settings import load_settings\n"
        "from claude_code_api.service import Service\n"
        "service = Service(load_settings(os.environ))\n"
        "before = gc.get_freeze_count()\n"
        "service._agent_factory()\n"
        "frozen = gc.get_freeze_count()\n"
        "alive = [[n] for n in range(1000)]  # a restart of the agent side: not frozen\n"
        "service._agent_factory()\n"
        "print(before, frozen, gc.get_freeze_count())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=service_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    before, frozen, after_restart = map(int, result.stdout.split())
    assert before == 0 and frozen > 50_000
    assert after_restart == frozen  # once per process


# --- the agents' network namespace (socat bridges) ----------------------------------


def planned(tmp_path, monkeypatch, mode: str, socat: str | None):
    """plan_with_findings for a sandboxed service whose socat is ``socat``."""
    from claude_code_api.agent import startup
    from claude_code_api.config.settings import load_settings

    monkeypatch.setattr(startup, "find_socat", lambda: socat)
    env = service_env(tmp_path, {"AGENT_SANDBOX": mode, "DATA_DIR": str(tmp_path / "data")})
    settings = load_settings(env)
    return startup.plan_with_findings(settings, env, serving=False)


def network_findings(findings) -> list[tuple[str, str]]:
    return [(f.status.value, f.text) for f in findings if f.subject == "network"]


needs_sandbox = pytest.mark.skipif(
    probe_sandbox(shutil.which("bwrap")) is not None, reason="no sandbox here"
)


@needs_sandbox
def test_without_socat_auto_keeps_the_sandbox_in_the_hosts_network_and_says_so(
    tmp_path, monkeypatch
):
    plan, findings = planned(tmp_path, monkeypatch, "auto", None)
    assert plan.launcher.sandboxed and plan.launcher.own_network is None
    [(status, text)] = network_findings(findings)
    assert status == "warn" and "socat is not installed" in text
    assert "share the host's network" in text


@needs_sandbox
def test_without_socat_on_refuses_to_start(tmp_path, monkeypatch):
    from claude_code_api.agent.startup import StartupError

    with pytest.raises(StartupError, match="AGENT_SANDBOX=on, but socat is not installed"):
        planned(tmp_path, monkeypatch, "on", None)


def broken_socat(tmp_path: Path) -> str:
    """A socat that starts and never listens (the probe finds the bridge missing)."""
    path = tmp_path / "bin" / "socat"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@needs_sandbox
def test_the_probe_starts_an_agent_in_its_network_namespace(tmp_path, monkeypatch):
    """A bridge that does not listen fails the probe: ``auto`` drops the namespace only."""
    plan, findings = planned(tmp_path, monkeypatch, "auto", shutil.which("socat"))
    assert plan.launcher.own_network is not None, findings
    assert [s for s, _ in network_findings(findings)] == ["ok"]
    plan, findings = planned(tmp_path, monkeypatch, "auto", broken_socat(tmp_path))
    assert plan.launcher.sandboxed and plan.launcher.own_network is None
    [(status, text)] = network_findings(findings)
    assert status == "warn" and "does not listen on port" in text, text


@needs_sandbox
def test_a_network_namespace_demanded_in_which_no_agent_starts_refuses_to_start(
    tmp_path, monkeypatch
):
    from claude_code_api.agent.startup import StartupError

    with pytest.raises(StartupError, match="network namespace unusable"):
        planned(tmp_path, monkeypatch, "on", broken_socat(tmp_path))


@needs_sandbox
def test_a_data_dir_too_long_for_the_bridges_sockets_is_said(tmp_path, monkeypatch):
    """socat reaches the sockets by path, which a Unix socket's address bounds (108 bytes)."""
    from claude_code_api.agent import startup
    from claude_code_api.config.settings import load_settings

    monkeypatch.setattr(startup, "find_socat", lambda: shutil.which("socat"))
    data = tmp_path / ("d" * 100)
    env = service_env(tmp_path, {"AGENT_SANDBOX": "auto", "DATA_DIR": str(data)})
    plan, findings = startup.plan_with_findings(load_settings(env), env, serving=False)
    assert plan.launcher.sandboxed and plan.launcher.own_network is None
    [(status, text)] = network_findings(findings)
    assert status == "warn" and "give DATA_DIR a shorter path" in text
    env["AGENT_SANDBOX"] = "on"
    with pytest.raises(startup.StartupError, match="longer than a Unix socket's"):
        startup.plan_with_findings(load_settings(env), env, serving=False)
