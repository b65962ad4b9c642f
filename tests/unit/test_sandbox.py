"""What an agent process sees: its environment, its files, its neighbours.

Unit tests of the environment allowlist and the launcher script, and tests that
run a generated launcher for real — with ``/bin/sh`` standing in for the CLI —
inside bubblewrap (skipped where bubblewrap cannot run), checking what the OS
lets the agent read and write.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from claude_code_api.agent import sandbox
from claude_code_api.agent.protocol import AgentSpec
from claude_code_api.agent.sandbox import (
    agent_environment,
    credentials_copy_path,
    login_for_agents,
    make_launcher,
    probe_sandbox,
    remove_conversation_files,
)

SERVICE_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/service",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "API_KEYS": "alice:sk-alice,bob:sk-bob",
    "NEXTAUTH_SECRET": "s3cret",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "ANTHROPIC_API_KEY": "sk-ant",
    "ANTHROPIC_BASE_URL": "http://127.0.0.1:1",
    "CLAUDE_CODE_OAUTH_TOKEN": "oauth",
    "CLAUDE_CONFIG_DIR": "/home/service/.claude",
    "IS_SANDBOX": "1",
    "MY_TOOL_TOKEN": "tool",
    "HTTPS_PROXY": "http://proxy:3128",
}
BWRAP = shutil.which("bwrap")
SANDBOX_REASON = probe_sandbox(BWRAP)
needs_sandbox = pytest.mark.skipif(SANDBOX_REASON is not None, reason=str(SANDBOX_REASON))


def test_the_environment_is_an_allowlist():
    passed, withheld = agent_environment(SERVICE_ENV, use_api_key=False)
    assert {"PATH", "LANG", "LC_ALL", "IS_SANDBOX", "HTTPS_PROXY"} <= passed.keys()
    assert passed["CLAUDE_CODE_OAUTH_TOKEN"] == "oauth"  # Claude Code's own credential
    for secret in ("API_KEYS", "NEXTAUTH_SECRET", "AWS_SECRET_ACCESS_KEY", "MY_TOOL_TOKEN"):
        assert secret not in passed and secret in withheld
    # Set per agent, never inherited from the service.
    assert "HOME" not in passed and "CLAUDE_CONFIG_DIR" not in passed
    assert not any(name.startswith("ANTHROPIC_") for name in passed)


def test_the_model_api_settings_pass_only_with_use_claude_api_key():
    passed, withheld = agent_environment(SERVICE_ENV, use_api_key=True)
    assert passed["ANTHROPIC_API_KEY"] == "sk-ant"
    assert passed["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"
    assert "ANTHROPIC_API_KEY" not in withheld


def test_an_operator_passes_more_variables_by_name():
    passed, _ = agent_environment(
        SERVICE_ENV, use_api_key=False, extra=frozenset({"MY_TOOL_TOKEN"})
    )
    assert passed["MY_TOOL_TOKEN"] == "tool"
    assert "API_KEYS" not in passed


def launcher_for(
    tmp_path: Path,
    *,
    sandbox: bool,
    environ: dict[str, str] | None = None,
    bwrap: str | None = None,
):
    """A launcher for a service in ``tmp_path``: sandboxed with ``bwrap`` (default: this machine's)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    environ = environ or {
        **SERVICE_ENV,
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "service-home"),
        "CLAUDE_CONFIG_DIR": str(tmp_path / "service-home" / ".claude"),
    }
    return make_launcher(
        cli=Path("/bin/sh"),
        data_dir=data_dir,
        environ=environ,
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=(bwrap or BWRAP) if sandbox else None,
    )


# For the tests that only read the launcher script bubblewrap never runs: they need no bwrap.
NAMED_BWRAP = "/usr/bin/bwrap"


def test_the_launcher_script_names_what_it_hides_and_quotes_paths(tmp_path):
    (tmp_path / "a dir").mkdir()
    launcher = launcher_for(tmp_path / "a dir", sandbox=True, bwrap=NAMED_BWRAP)
    home = tmp_path / "a dir" / "data/users/alice"
    spec = AgentSpec(name="session alice/s 1", home=home, ephemeral=False)
    text = launcher.script(spec, credentials=None)
    assert text.startswith("#!/bin/sh\n")
    assert f"--bind '{spec.home}' '{spec.home}'" in text
    assert f"--tmpfs '{tmp_path / 'a dir' / 'data'}'" in text
    assert "--unsetenv API_KEYS" in text and "--unsetenv NEXTAUTH_SECRET" in text
    assert "s3cret" not in text and "sk-alice" not in text  # names only, never values
    assert text.rstrip().endswith('/bin/sh "$@"')


@pytest.mark.parametrize("sandbox", [False, pytest.param(True, marks=needs_sandbox)])
def test_an_agent_cannot_write_a_file_past_its_file_size_limit(tmp_path, sandbox):
    launcher = attrs.evolve(launcher_for(tmp_path, sandbox=sandbox), max_file_size=lambda: 65536)
    spec = AgentSpec(name="session alice/s", home=tmp_path / "data/users/alice", ephemeral=False)
    done = run_agent_shell(launcher, spec, "dd if=/dev/zero of=big bs=4096 count=100; echo $?")
    assert (spec.cwd / "big").stat().st_size == 65536, done.stdout + done.stderr
    assert done.stdout.strip() != "0"  # dd was stopped (SIGXFSZ or EFBIG), the shell lives on


def run_agent_shell(launcher, spec: AgentSpec, command: str) -> subprocess.CompletedProcess:
    """Run ``command`` as the agent would run: through its launcher, with its environment."""
    path = launcher.prepare(spec, "test")
    env = {**SERVICE_ENV, "PATH": os.environ["PATH"], **launcher.environment(spec)}
    try:
        return subprocess.run(
            [str(path), "-c", command],
            env=env,
            cwd=spec.cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        launcher.cleanup(spec, path)


@needs_sandbox
def test_in_the_sandbox_an_agent_sees_no_secret_and_no_other_user(tmp_path):
    launcher = launcher_for(tmp_path, sandbox=True)
    data = tmp_path / "data"
    alice = AgentSpec(name="alice", home=data / "users" / "alice", ephemeral=False)
    bob_file = data / "users" / "bob" / "workspace" / "notes.txt"
    bob_file.parent.mkdir(parents=True)
    bob_file.write_text("bob's secret notes")
    (data / "sessions.sqlite3").write_text("the database")
    done = run_agent_shell(
        launcher,
        alice,
        f"echo keys=[$API_KEYS] secret=[$NEXTAUTH_SECRET]; env | grep -c API_KEYS; "
        f"cat {bob_file} 2>&1; cat {data}/sessions.sqlite3 2>&1; ls {data}/users; "
        f"cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-alice; "
        f"echo mine > $HOME/workspace/mine.txt && echo wrote-mine; "
        f"echo x > {data}/users/bob/workspace/evil.txt 2>&1 || echo cannot-write-bob",
    )
    out = done.stdout
    assert "keys=[] secret=[]" in out
    assert "sk-alice" not in out and "bob's secret notes" not in out and "the database" not in out
    assert out.splitlines()[1] == "0"  # API_KEYS not even present, empty or not
    assert "cannot-write-bob" in out
    assert "wrote-mine" in out and (alice.cwd / "mine.txt").read_text() == "mine\n"
    assert not (bob_file.parent / "evil.txt").exists()
    # Only alice's own directory shows under users/ (bob's is hidden with the rest of DATA_DIR).
    assert "alice\n0\n" in out


@needs_sandbox
def test_in_the_sandbox_an_agent_holds_no_capability_even_as_root(tmp_path):
    """bwrap started by root keeps every capability: mount would undo the sandbox."""
    launcher = launcher_for(tmp_path, sandbox=True)
    alice = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    bob_file = tmp_path / "data" / "users" / "bob" / "notes.txt"
    bob_file.parent.mkdir(parents=True)
    bob_file.write_text("bob's notes")
    data = tmp_path / "data"
    done = run_agent_shell(
        launcher,
        alice,
        "grep CapEff /proc/self/status; "
        f"mount -o remount,rw,bind {data} 2>&1 && echo remounted; "
        f"echo x >> {bob_file} 2>&1; echo done",
    )
    assert "CapEff:\t0000000000000000" in done.stdout, done.stdout
    assert "remounted" not in done.stdout and "done" in done.stdout
    assert bob_file.read_text() == "bob's notes"


@needs_sandbox
def test_in_the_sandbox_the_kernels_settings_are_read_only(tmp_path):
    """As root (no capability needed) /proc/sys/kernel/core_pattern would run a host program."""
    launcher = launcher_for(tmp_path, sandbox=True)
    alice = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    done = run_agent_shell(
        launcher,
        alice,
        "for name in core_pattern modprobe; do "
        'test -w /proc/sys/kernel/$name && echo "writable: $name"; done; '
        "cat /proc/sys/kernel/core_pattern >/dev/null && echo readable",
    )
    assert "writable" not in done.stdout and "readable" in done.stdout, done.stdout


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory outside /tmp (which the sandbox replaces): what agents could see."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def listening_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    return server


@needs_sandbox
def test_a_socket_to_hide_reached_through_a_symlink_is_hidden(tmp_path, host_dir, monkeypatch):
    """/var/run is a link to /run on most systems: /var/run/docker.sock must not stop bwrap."""
    (host_dir / "run").mkdir()
    (host_dir / "var-run").symlink_to(host_dir / "run")
    hidden = host_dir / "var-run" / "engine.sock"
    monkeypatch.setattr(sandbox, "HIDDEN_SOCKETS", (hidden,))
    launcher = launcher_for(tmp_path, sandbox=True)
    alice = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    with listening_socket(host_dir / "run" / "engine.sock"):
        done = run_agent_shell(
            launcher,
            alice,
            f"for path in {hidden} {host_dir}/run/engine.sock; do "
            'test -S "$path" && echo "socket: $path"; done; echo started',
        )
    assert "started" in done.stdout, done.stderr
    assert "socket:" not in done.stdout


@needs_sandbox
def test_every_users_runtime_dir_is_hidden_with_the_engines_sockets_in_it(
    tmp_path, host_dir, monkeypatch
):
    """Rootless Docker and Podman listen in the user's runtime dir, as the service's own user."""
    runtime = host_dir / "user"
    monkeypatch.setattr(sandbox, "HIDDEN_RUNTIME_DIRS", (runtime,))
    launcher = launcher_for(tmp_path, sandbox=True)
    alice = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    with listening_socket(runtime / "1000" / "podman" / "podman.sock"):
        done = run_agent_shell(launcher, alice, f"ls -A {runtime}; echo listed")
    assert done.stdout == "listed\n", (done.stdout, done.stderr)


def test_the_real_runtime_dirs_and_engine_sockets_are_on_the_list():
    assert Path("/run/user") in sandbox.HIDDEN_RUNTIME_DIRS
    for name in ("docker.sock", "containerd/containerd.sock", "podman/podman.sock"):
        assert Path("/run", name) in sandbox.HIDDEN_SOCKETS


AS_ROOT_SERVICE = pytest.mark.skipif(os.geteuid() != 0, reason="agents get AGENT_UID as root")


@pytest.mark.parametrize(
    ("sandboxed", "as_agent_uid"),
    [
        pytest.param(True, False, marks=needs_sandbox),
        pytest.param(True, True, marks=[needs_sandbox, AS_ROOT_SERVICE]),
        pytest.param(False, True, marks=AS_ROOT_SERVICE),
    ],
)
def test_agents_start_with_a_relative_data_dir(tmp_path, monkeypatch, sandboxed, as_agent_uid):
    """DATA_DIR's default is relative ("data"): README's quick start runs with it — as root
    too, where agents change to their workspace after becoming AGENT_UID."""
    monkeypatch.chdir(tmp_path)
    user = None
    if as_agent_uid:
        user = sandbox.AgentUser(uid=65536, setpriv=shutil.which("setpriv") or "setpriv")
        if not sandboxed:  # (tmp_path's parents are pytest's, mode 0700)
            user.open_walls([tmp_path / "data"], inside=True)
    launcher = make_launcher(
        cli=Path("/bin/sh"),
        data_dir=Path("data"),
        environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "service-home")},
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=BWRAP if sandboxed else None,
        user=user,
    )
    alice = AgentSpec(name="alice", home=Path("data/users/alice"), ephemeral=False)
    done = run_agent_shell(launcher, alice, "pwd; echo mine > mine.txt")
    assert done.stdout == f"{tmp_path / 'data/users/alice/workspace'}\n", done.stderr
    assert (tmp_path / "data/users/alice/workspace/mine.txt").is_file()


@needs_sandbox
def test_a_data_dir_reached_through_a_symlink_is_hidden_and_agents_start(tmp_path, host_dir):
    (host_dir / "volume").mkdir()
    (host_dir / "data").symlink_to(host_dir / "volume")
    bob_file = host_dir / "volume" / "users" / "bob" / "notes.txt"
    bob_file.parent.mkdir(parents=True)
    bob_file.write_text("bob's notes")
    launcher = make_launcher(
        cli=Path("/bin/sh"),
        data_dir=host_dir / "data",
        environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "service-home")},
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=BWRAP,
    )
    alice = AgentSpec(name="alice", home=host_dir / "data" / "users" / "alice", ephemeral=False)
    done = run_agent_shell(
        launcher,
        alice,
        f"cat {bob_file} {host_dir}/data/users/bob/notes.txt 2>&1; echo mine > mine.txt; echo ok",
    )
    assert "ok" in done.stdout, done.stderr
    assert "bob's notes" not in done.stdout
    assert (host_dir / "volume" / "users" / "alice" / "workspace" / "mine.txt").is_file()


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_no_other_os_user_reaches_a_setuid_file_an_agent_made(host_dir):
    """The agent owns its HOME and may chmod u+s there (as the service's user, or root):
    another account on the host must not get to run what it made."""
    host_dir.chmod(0o755)  # (as DATA_DIR's parent usually is; the data dir made 0755 too)
    (host_dir / "data").mkdir(mode=0o755)
    launcher = launcher_for(host_dir, sandbox=True)
    alice = AgentSpec(name="alice", home=host_dir / "data" / "users" / "alice", ephemeral=False)
    planted = alice.home / "sh"
    done = run_agent_shell(
        launcher, alice, f"cp /bin/true {planted}; chmod 4755 {planted}; chmod 755 $HOME"
    )
    assert planted.stat().st_mode & 0o4000, done.stderr  # made, setuid
    nobody = subprocess.run(  # (a shell: setpriv's own exec skips the path's checks)
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        + ["sh", "-c", 'exec "$0"', str(planted)],
        capture_output=True,
        timeout=10,
    )
    assert nobody.returncode != 0, nobody
    # A one-shot agent's HOME too (removed with it: its parent is what keeps others out).
    worker = AgentSpec(name="w", home=host_dir / "data" / "workers" / "w0" / "a1", ephemeral=True)
    launcher.cleanup(worker, launcher.prepare(worker, "a1"))
    assert (worker.home.parent.stat().st_mode & 0o777) == 0o700
    # An operator's volume for the HOMEs, through a link: the directory it leads to.
    volume = host_dir / "volume"
    volume.mkdir(mode=0o755)
    (host_dir / "data" / "workers" / "w1").symlink_to(volume)
    linked = AgentSpec(name="w", home=host_dir / "data" / "workers" / "w1" / "a2", ephemeral=True)
    launcher.cleanup(linked, launcher.prepare(linked, "a2"))
    assert (volume.stat().st_mode & 0o777) == 0o700


@needs_sandbox
def test_in_the_sandbox_the_system_is_read_only(tmp_path):
    launcher = launcher_for(tmp_path, sandbox=True)
    alice = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    victim = tmp_path / "service-file"
    victim.write_text("original")
    done = run_agent_shell(launcher, alice, f"echo changed > {victim} 2>&1; echo done")
    assert "done" in done.stdout
    assert victim.read_text() == "original"


def test_without_the_sandbox_secrets_are_still_not_in_the_environment(tmp_path):
    launcher = launcher_for(tmp_path, sandbox=False)
    alice = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    done = run_agent_shell(
        launcher, alice, "echo keys=[$API_KEYS] secret=[$NEXTAUTH_SECRET] home=$HOME"
    )
    assert f"keys=[] secret=[] home={alice.home}" in done.stdout


def test_an_ephemeral_home_is_removed_with_its_launcher(tmp_path):
    launcher = launcher_for(tmp_path, sandbox=False)
    spec = AgentSpec(
        name="worker-0", home=tmp_path / "data" / "workers" / "w0" / "a1", ephemeral=True
    )
    path = launcher.prepare(spec, "a1")
    assert path.is_file() and spec.cwd.is_dir() and spec.config_dir.is_dir()
    launcher.cleanup(spec, path)
    assert not path.exists() and not spec.home.exists()


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        (
            {
                "claudeAiOauth": {"accessToken": "a", "refreshToken": "r", "expiresAt": 1},
                "mcpOAuth": {"server": {"refreshToken": "m"}},
            },
            {"claudeAiOauth": {"accessToken": "a", "expiresAt": 1}},
        ),
        ({"mcpOAuth": {"server": {"refreshToken": "m"}}}, {}),
        ({"claudeAiOauth": "not an object"}, {}),
        (["not", "an", "object"], {}),
    ],
)
def test_an_agent_is_shown_the_login_without_its_refresh_token(stored, shown):
    assert json.loads(login_for_agents(json.dumps(stored).encode())) == shown


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe"])
def test_a_credentials_file_that_is_no_login_is_shown_as_an_empty_object(garbage):
    assert json.loads(login_for_agents(garbage)) == {}


def test_a_sandboxed_agents_copy_of_the_login_is_private_and_removed_with_it(tmp_path):
    launcher = launcher_for(tmp_path, sandbox=True, bwrap=NAMED_BWRAP)
    service_file = tmp_path / "service-home" / ".claude" / ".credentials.json"
    service_file.parent.mkdir(parents=True)
    service_file.write_text('{"claudeAiOauth": {"accessToken": "a", "refreshToken": "r"}}')
    spec = AgentSpec(name="alice", home=tmp_path / "data" / "users" / "alice", ephemeral=False)
    path = launcher.prepare(spec, "a1")
    copy = credentials_copy_path(path)
    assert copy.parent == launcher.run_dir and copy.stat().st_mode & 0o777 == 0o600
    assert json.loads(copy.read_text()) == {"claudeAiOauth": {"accessToken": "a"}}
    assert f"--ro-bind {copy} {spec.config_dir / '.credentials.json'}" in path.read_text()
    launcher.cleanup(spec, path)
    assert not path.exists() and not copy.exists()
    assert "refreshToken" in service_file.read_text()  # the service's own file is untouched


def kept_agent_home(tmp_path: Path) -> tuple[object, AgentSpec, Path]:
    """A launcher, a one-shot agent's prepared HOME, and another user's home beside it."""
    launcher = launcher_for(tmp_path, sandbox=False)
    spec = AgentSpec(name="worker-1", home=tmp_path / "data/workers/w1", ephemeral=True)
    for directory in (spec.cwd, spec.config_dir, spec.home / "tmp"):
        directory.mkdir(parents=True)
    victim = tmp_path / "data/users/bob"
    (victim / "workspace").mkdir(parents=True)
    (victim / "workspace/important.txt").write_text("bob's")
    (victim / ".claude/projects").mkdir(parents=True)
    (victim / ".claude/CLAUDE.md").write_text("bob's memory")
    return launcher, spec, victim


def files_of(victim: Path) -> list[str]:
    return sorted(str(path.relative_to(victim)) for path in victim.rglob("*"))


def test_emptying_a_kept_agents_home_removes_what_the_request_left_and_never_follows_links(
    tmp_path,
):
    launcher, spec, victim = kept_agent_home(tmp_path)
    before = files_of(victim)
    (spec.cwd / "out/deep").mkdir(parents=True)
    (spec.cwd / "out/deep/file").write_text("x")
    (spec.cwd / "to-bob").symlink_to(victim / "workspace")
    (spec.home / "tmp/scratch").write_text("x")
    (spec.home / ".bashrc").write_text("x")
    (spec.home / "bob-home").symlink_to(victim)
    (spec.config_dir / "CLAUDE.md").symlink_to(victim / ".claude/CLAUDE.md")
    (spec.config_dir / "projects").symlink_to(victim / ".claude/projects")
    (spec.config_dir / "skills/s").mkdir(parents=True)
    (spec.config_dir / "statsig").mkdir()  # the CLI's own bookkeeping stays
    launcher.empty_home(spec)
    assert sorted(os.listdir(spec.home)) == [".claude", "tmp", "workspace"]
    assert os.listdir(spec.cwd) == [] and os.listdir(spec.home / "tmp") == []
    assert os.listdir(spec.config_dir) == ["statsig"]
    assert files_of(victim) == before


def test_a_directory_swapped_for_a_link_while_emptying_deletes_nothing_outside(
    tmp_path, monkeypatch
):
    # A process the request left running replaces the workspace and the config dir
    # with links to another user's home while the service empties the HOME.
    from claude_code_api.agent import sandbox

    launcher, spec, victim = kept_agent_home(tmp_path)
    before = files_of(victim)
    (spec.home / "left-behind").write_text("x")
    remove_at = sandbox._remove_at

    def swap_then_remove(dir_fd: int, name: str) -> None:
        for directory, target in ((spec.cwd, "workspace"), (spec.config_dir, ".claude")):
            if not directory.is_symlink():
                shutil.rmtree(directory)
                directory.symlink_to(victim / target)
        remove_at(dir_fd, name)

    monkeypatch.setattr(sandbox, "_remove_at", swap_then_remove)
    with pytest.raises(OSError):
        launcher.empty_home(spec)
    assert files_of(victim) == before


def _conversation(projects: Path, slug: str, claude_id: str) -> None:
    (projects / slug / claude_id / "tool-results").mkdir(parents=True)
    (projects / slug / claude_id / "tool-results" / "out.txt").write_text("x")
    (projects / slug / f"{claude_id}.jsonl").write_text("{}\n")


def test_a_conversations_files_are_removed_in_every_slug_and_never_through_a_link(tmp_path):
    alice = AgentSpec(name="a", home=tmp_path / "alice", ephemeral=False)
    bob = AgentSpec(name="b", home=tmp_path / "bob", ephemeral=False)
    alice_projects, bob_projects = alice.config_dir / "projects", bob.config_dir / "projects"
    for slug in ("-workspace", "-workspace-sub"):
        _conversation(alice_projects, slug, "gone")
    _conversation(alice_projects, "-workspace", "kept")
    _conversation(bob_projects, "-workspace", "gone")  # the same id in Bob's home
    (alice_projects / "to-bob").symlink_to(bob_projects / "-workspace")
    (alice_projects / "a-file").write_text("x")
    before = files_of(bob.home)

    remove_conversation_files(alice.home, "gone")
    assert sorted(files_of(alice_projects)) == [
        "-workspace",
        "-workspace-sub",
        "-workspace/kept",
        "-workspace/kept.jsonl",
        "-workspace/kept/tool-results",
        "-workspace/kept/tool-results/out.txt",
        "a-file",
        "to-bob",
    ]
    assert files_of(bob.home) == before

    # Alice's agent made her config dir a link to Bob's: nothing is removed there.
    shutil.rmtree(alice.config_dir)
    alice.config_dir.symlink_to(bob.config_dir)
    with pytest.raises(OSError, match="not a directory"):
        remove_conversation_files(alice.home, "gone")
    assert files_of(bob.home) == before

    remove_conversation_files(tmp_path / "nobody", "gone")  # nothing there: fine


def test_a_conversations_shell_env_and_file_history_go_with_it(tmp_path):
    alice = AgentSpec(name="a", home=tmp_path / "alice", ephemeral=False)
    _conversation(alice.config_dir / "projects", "-workspace", "gone")
    for name in ("session-env", "file-history"):
        for claude_id in ("gone", "kept"):
            (alice.config_dir / name / claude_id).mkdir(parents=True)
            (alice.config_dir / name / claude_id / "f").write_text("x")
    remove_conversation_files(alice.home, "gone")
    assert sorted(files_of(alice.config_dir / "file-history")) == ["kept", "kept/f"]
    assert sorted(files_of(alice.config_dir / "session-env")) == ["kept", "kept/f"]


@pytest.mark.parametrize("claude_id", ["../../../../bob/.claude", ".", "..", "a/b", ""])
def test_a_session_id_that_is_not_a_plain_name_removes_nothing(tmp_path, claude_id):
    # The id comes from the agent's own output: it must not lead out of its slug.
    alice = AgentSpec(name="a", home=tmp_path / "users" / "alice", ephemeral=False)
    bob = AgentSpec(name="b", home=tmp_path / "users" / "bob", ephemeral=False)
    _conversation(alice.config_dir / "projects", "-workspace", "kept")
    _conversation(bob.config_dir / "projects", "-workspace", "kept")
    before = files_of(tmp_path)
    with pytest.raises(OSError, match="not a session id"):
        remove_conversation_files(alice.home, claude_id)
    assert files_of(tmp_path) == before


def test_a_slug_that_cannot_be_emptied_does_not_keep_the_others(tmp_path, monkeypatch):
    from claude_code_api.agent import sandbox

    alice = AgentSpec(name="a", home=tmp_path / "alice", ephemeral=False)
    projects = alice.config_dir / "projects"
    for slug in ("-a", "-b", "-c"):
        _conversation(projects, slug, "gone")
    remove_at = sandbox._remove_at

    def failing_in_b(dir_fd: int, name: str) -> None:
        if os.readlink(f"/proc/self/fd/{dir_fd}").endswith("/-b"):
            raise PermissionError(13, "Permission denied", name)
        remove_at(dir_fd, name)

    monkeypatch.setattr(sandbox, "_remove_at", failing_in_b)
    with pytest.raises(OSError, match="'-b/gone.jsonl'.*'-b/gone'|'-b/gone'.*'-b/gone.jsonl'"):
        remove_conversation_files(alice.home, "gone")
    assert sorted(files_of(projects)) == [
        "-a",
        "-b",
        "-b/gone",
        "-b/gone.jsonl",
        "-b/gone/tool-results",
        "-b/gone/tool-results/out.txt",
        "-c",
    ]


def test_a_tree_deeper_than_the_recursion_limit_is_refused_by_reset_and_removed_by_cleanup(
    tmp_path,
):
    launcher, spec, _ = kept_agent_home(tmp_path)
    directory_fd = os.open(spec.cwd, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):  # by descriptors: paths this long are past PATH_MAX
        os.mkdir("d", dir_fd=directory_fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=directory_fd)
        os.close(directory_fd)
        directory_fd = inner
    os.close(directory_fd)
    try:
        with pytest.raises(OSError, match="too deep"):
            launcher.empty_home(spec)  # the agent is then retired, not reused
        launcher.cleanup(spec, None)  # no RecursionError out of the worker
        assert not spec.home.exists()
    finally:
        # Whatever happened: pytest's own clean-up of old temporary directories
        # (shutil.rmtree) would fail on this tree in a later run.
        subprocess.run(["rm", "-rf", "--", str(spec.home)], check=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_a_home_given_to_the_agents_user_never_follows_a_link(tmp_path):
    """A root service gives a HOME to AGENT_UID (a HOME an earlier version made as root);
    the agents own it and may have left links in it, to files that are not theirs."""
    user = sandbox.AgentUser(uid=65536, setpriv=shutil.which("setpriv") or "setpriv")
    launcher = attrs.evolve(launcher_for(tmp_path, sandbox=False), user=user)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("root's")
    home = tmp_path / "data" / "users" / "alice"
    (home / "workspace").mkdir(parents=True)
    (home / "workspace" / "link").symlink_to(outside / "victim")
    (home / "tmp").symlink_to(outside)
    alice = AgentSpec(name="alice", home=home, ephemeral=False)
    launcher.cleanup(alice, launcher.prepare(alice, "a1"))
    assert (home / "workspace").stat().st_uid == 65536
    assert (home / "workspace" / "link").lstat().st_uid == 65536
    assert outside.stat().st_uid == 0 and (outside / "victim").stat().st_uid == 0
    # Its config dir a link: refused (the agent does not start), nothing given away.
    (home / ".claude").rename(home / "config")
    (home / ".claude").symlink_to(outside)
    with pytest.raises(OSError):
        launcher.prepare(alice, "a2")
    assert outside.stat().st_uid == 0 and (outside / "victim").stat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_walls_are_the_highest_directories_the_agents_user_cannot_pass(tmp_path):
    user = sandbox.AgentUser(uid=65536, setpriv="setpriv")

    for directory in (tmp_path, *tmp_path.parents):  # (pytest's are root's, mode 0700)
        directory.chmod(directory.stat().st_mode | 0o011)

    def walls(path: Path, *, inside: bool) -> list[Path]:
        return list(user.walls([path], inside=inside))

    private = tmp_path / "private"
    (private / "inner" / "data").mkdir(parents=True)
    private.chmod(0o700)
    (private / "inner").chmod(0o700)
    data = private / "inner" / "data"
    assert walls(data, inside=True) == [private]
    assert walls(private, inside=True) == [private]
    assert walls(private, inside=False) == []  # (a file in it, say)
    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    assert walls(opened / "cli", inside=False) == []
    os.chown(private, 65536, 65536)  # its own: it passes
    assert walls(data, inside=True) == [private / "inner"]


@pytest.mark.parametrize("sandbox", [False, pytest.param(True, marks=needs_sandbox)])
def test_a_workspace_in_workspaces_dir_is_the_agents_cwd_and_only_its_own_is_shown(
    tmp_path, sandbox
):
    """WORKSPACES_DIR: the agent works in its user's directory there (HOME stays in DATA_DIR);
    in the sandbox, the other users' directories there are hidden as DATA_DIR is."""
    workspaces = tmp_path / "workspaces"
    launcher = launcher_for(tmp_path, sandbox=sandbox)
    if sandbox:
        launcher = attrs.evolve(launcher, hidden=(*launcher.hidden, workspaces))
    home = tmp_path / "data" / "users" / "alice"
    alice = AgentSpec(name="alice", home=home, ephemeral=False, workspace=workspaces / "alice")
    bob_file = workspaces / "bob" / "notes.txt"
    bob_file.parent.mkdir(parents=True)
    bob_file.write_text("bob's secret notes")
    done = run_agent_shell(
        launcher, alice, f"pwd; echo mine > mine.txt; cat {bob_file} 2>&1; ls $HOME"
    )
    out = done.stdout.splitlines()
    assert out[0] == os.path.realpath(workspaces / "alice"), done.stdout + done.stderr
    assert (workspaces / "alice" / "mine.txt").read_text() == "mine\n"
    assert not (home / "workspace").exists()
    assert ("bob's secret notes" in done.stdout) is not sandbox


def test_workspaces_dir_is_hidden_in_the_sandbox(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    launcher = make_launcher(
        cli=Path("/bin/sh"),
        data_dir=data_dir,
        environ={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        use_api_key=False,
        extra_env=frozenset(),
        bwrap=NAMED_BWRAP,
        workspaces_dir=tmp_path / "w",
    )
    assert tmp_path / "w" in launcher.hidden


# A client in the agent's namespace, sending a request and reading a two-part answer, 20 times:
# the median seconds a round took.
ROUNDS_CLIENT = """
import socket, statistics, sys, time
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
times = []
for _ in range(20):
    started = time.perf_counter()
    client.sendall(b"ask")
    got = b""
    while len(got) < 2:
        got += client.recv(2 - len(got))
    times.append(time.perf_counter() - started)
print(statistics.median(times))
"""


@needs_sandbox
@pytest.mark.skipif(shutil.which("socat") is None, reason="the bridges need socat")
def test_a_bridge_passes_a_small_write_on_at_once_not_after_the_agents_delayed_ack(tmp_path):
    """A model API streams its answer in small writes. Through a bridge that left Nagle's
    algorithm on, each write after the first waited for the agent's delayed ACK (40 ms on
    Linux): a sandboxed agent's every turn took ~40 ms longer than an unsandboxed one's."""
    launcher = launcher_for(tmp_path, sandbox=True)
    path = tmp_path / "data" / "run" / "bridge.sock"
    path.parent.mkdir(parents=True)
    port = sandbox.SANDBOX_MODEL_PORT
    network = sandbox.AgentNetwork(shutil.which("socat"), (sandbox.Bridge(port, path),))
    launcher = attrs.evolve(launcher, network=network)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        os.chmod(path, 0o777)  # (the bridge runs as the agent's user)
        server.listen()

        def answer_in_two_writes() -> None:
            connection, _ = server.accept()
            with connection:
                while connection.recv(16):
                    connection.sendall(b"a")
                    time.sleep(0.002)  # the model's next chunk
                    connection.sendall(b"b")

        answering = threading.Thread(target=answer_in_two_writes, daemon=True)
        answering.start()
        spec = AgentSpec(
            name="session alice/s", home=tmp_path / "data/users/alice", ephemeral=False
        )
        client = shlex.quote(ROUNDS_CLIENT)
        done = run_agent_shell(launcher, spec, f"exec python3 -c {client} {port}")
    assert done.returncode == 0, done.stderr
    # A round is the 2 ms pause and a few hops; Nagle's made it 40 ms or more.
    assert float(done.stdout) < 0.025, done.stdout
