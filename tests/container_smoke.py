"""The container smoke test: the built image, run as compose runs it, checked from outside.

Run by ``scripts/container-check`` (which builds the image and says which
security options compose.yaml gives the container); standard library only::

    python3 tests/container_smoke.py --engine podman --image IMAGE \\
        [--run-option=--security-opt=...]...

It starts the image with ``tests/fake_claude.py`` mounted as the Claude Code
CLI, the sandbox required (``AGENT_SANDBOX=on``), and checks, talking HTTP to
the published port:

* ``/health`` turns ``ok``; the image's HEALTHCHECK command passes; the log
  says the agents run sandboxed;
* one ``POST /run`` (a one-shot worker) and a session's turns, the second
  answered from the transcript the first left in the user's HOME;
* inside an agent's sandbox: its uid is not 0, ``DATA_DIR/users`` shows only
  its own user's directory, the service's API keys are not in its
  environment, and its PID namespace holds a handful of processes;
* SIGTERM (``engine stop`` with Docker's default 10 s before SIGKILL) while
  two turns run: the one that ends within ``SHUTDOWN_GRACE_S`` gets its whole
  answer, the one that would not gets its partial output, both with 200, and
  the container exits 0;
* started again on the same volumes, the session resumes its conversation.

Error handling: the first failed check raises :class:`SmokeFailure`; the
script prints it with the container's log and exits 1. The container and its
volumes are removed in every case (``SMOKE_LOG=1`` prints its log first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

FAKE_CLAUDE = Path(__file__).with_name("fake_claude.py")
KEYS = {"alice": "sk-smoke-alice", "bob": "sk-smoke-bob"}
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10  # `docker stop`'s default
REQUEST_TIMEOUT_S = 30.0


class SmokeFailure(Exception):
    """A check failed; the message says which and what was seen."""


def check(condition: bool, what: str, seen: object = None) -> None:
    if not condition:
        raise SmokeFailure(what if seen is None else f"{what}; seen: {seen!r}")


def log(message: str) -> None:
    print(f"container_smoke: {message}", flush=True)


class Container:
    """One container of the image, driven through the engine's command line."""

    def __init__(self, engine: str, image: str, name: str, run_options: list[str]) -> None:
        self.engine = engine
        self.image = image
        self.name = name
        self.run_options = run_options
        self.base_url = ""

    def engine_command(self, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            [self.engine, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise SmokeFailure(f"{self.engine} {args[0]} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip()

    def run(self) -> None:
        environment = {
            "API_KEYS": ",".join(f"{user}:{key}" for user, key in KEYS.items()),
            "CLAUDE_EXECUTABLE": "/opt/fake/claude",
            "AGENT_SANDBOX": "on",
            # The fake refuses to run as root, as the real CLI does.
            "FAKE_CLAUDE_REFUSE_ROOT": "1",
            "FAKE_CLAUDE_MODE": "",
            "AGENT_ENV": "FAKE_CLAUDE_MODE,FAKE_CLAUDE_REFUSE_ROOT",
        }
        args = ["run", "--detach", "--name", self.name, "--publish", "127.0.0.1::8080"]
        # No timers for the HEALTHCHECK (they need systemd); it is run by hand below.
        args += ["--health-interval=disable"]
        args += ["--volume", f"{FAKE_CLAUDE}:/opt/fake/claude:ro"]
        for name, value in environment.items():
            args += ["--env", f"{name}={value}"]
        args += [*self.run_options, self.image]
        self.engine_command(*args)
        self.find_port()

    def find_port(self) -> None:
        published = self.engine_command("port", self.name, "8080/tcp").splitlines()[0]
        self.base_url = f"http://127.0.0.1:{published.rsplit(':', 1)[1]}"

    def logs(self) -> str:
        done = subprocess.run(
            [self.engine, "logs", self.name], capture_output=True, text=True, timeout=30
        )
        return done.stdout + done.stderr

    def exit_code(self) -> int:
        return int(self.engine_command("inspect", "--format", "{{.State.ExitCode}}", self.name))

    def remove(self) -> None:
        subprocess.run(
            [self.engine, "rm", "--force", "--volumes", self.name],
            capture_output=True,
            timeout=60,
        )


def request(
    base_url: str, method: str, path: str, body: dict[str, Any] | None = None, user: str = ""
) -> tuple[int, dict[str, Any]]:
    """One HTTP request; (status, JSON body). Raises OSError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if user:
        headers["x-api-key"] = KEYS[user]
    req = urllib.request.Request(base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def run_prompt(base_url: str, user: str, prompt: str, session: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt}
    if session:
        body["sessionId"] = session
    status, answer = request(base_url, "POST", "/run", body, user)
    check(status == 200, f"POST /run {prompt!r} answers 200", (status, answer))
    return answer


def wait_until_ok(container: Container) -> float:
    """Poll /health until it says ok; the seconds it took."""
    started = time.monotonic()
    seen: object = None
    while time.monotonic() - started < START_TIMEOUT_S:
        try:
            status, health = request(container.base_url, "GET", "/health")
            seen = (status, health)
            if status == 200 and health.get("status") == "ok":
                return time.monotonic() - started
        except OSError as exc:
            seen = exc
        state = container.engine_command("inspect", "--format", "{{.State.Status}}", container.name)
        check(state == "running", "the container keeps running while starting", state)
        time.sleep(0.2)
    raise SmokeFailure(f"/health is not ok after {START_TIMEOUT_S:.0f} s; last: {seen!r}")


def check_serving(container: Container) -> None:
    took = wait_until_ok(container)
    log(f"/health ok {took:.1f} s after start")
    container.engine_command("healthcheck", "run", container.name)
    log("the image's HEALTHCHECK passes")
    check(
        "agents run sandboxed (bubblewrap" in container.logs(),
        "the log says agents run sandboxed",
        container.logs()[-3000:],
    )

    answer = run_prompt(container.base_url, "alice", "hello from the smoke test")
    check(
        answer.get("success") is True and answer.get("output") == "echo: hello from the smoke test",
        "a one-shot POST /run answers",
        answer,
    )
    log(f"one-shot POST /run answered in {answer.get('durationMs')} ms")

    run_prompt(container.base_url, "bob", "My name is Bob.", session="smoke")
    answer = run_prompt(container.base_url, "alice", "My name is Alice.", session="smoke")
    check(answer.get("output") == "Nice to meet you, Alice.", "a session's first turn", answer)
    answer = run_prompt(container.base_url, "alice", "What is my name?", session="smoke")
    check(answer.get("output") == "Your name is Alice.", "a session's second turn", answer)
    log("session turns answered, the second from the first one's transcript")

    probe = (
        "[[fake:bash]] echo uid=$(id -u); ls /data/users | sed 's/^/user-dir=/';"
        " echo keys=${API_KEYS:-none}; echo processes=$(ls -d /proc/[0-9]* | wc -l)"
    )
    output = str(run_prompt(container.base_url, "alice", probe, session="smoke").get("output"))
    facts = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    check(facts.get("uid") not in (None, "0"), "agents do not run as root", output)
    user_dirs = [line.split("=", 1)[1] for line in output.splitlines() if "user-dir=" in line]
    check(
        len(user_dirs) == 1 and user_dirs[0].startswith("alice"),
        "an agent sees only its own user's directory under DATA_DIR/users",
        output,
    )
    check(facts.get("keys") == "none", "an agent's environment lacks API_KEYS", output)
    check(
        int(facts.get("processes", "99")) <= 10,
        "an agent's PID namespace holds only its own processes",
        output,
    )
    log(f"inside the sandbox: {' '.join(f'{k}={v}' for k, v in sorted(facts.items()))}")


def check_stop_with_turns_in_flight(container: Container) -> None:
    answers: dict[str, object] = {}

    def ask(label: str, user: str, prompt: str, session: str) -> None:
        body: dict[str, Any] = {"prompt": prompt}
        if session:
            body["sessionId"] = session
        try:
            answers[label] = request(container.base_url, "POST", "/run", body, user)
        except OSError as exc:
            answers[label] = exc

    clients = [
        # Ends within the grace: its whole answer.
        threading.Thread(target=ask, args=("short", "bob", "[[fake:sleep:2]] finishing", "smoke")),
        # Would take a minute: cut at the grace, answered with what it said so far.
        threading.Thread(target=ask, args=("long", "alice", "[[fake:slow:60:0.5]]", "")),
    ]
    for client in clients:
        client.start()
    # Both running: the one-shot worker is busy and bob's session too.
    deadline = time.monotonic() + 10
    while True:
        _status, health = request(container.base_url, "GET", "/health")
        _status, bob = request(container.base_url, "GET", "/status", user="bob")
        sessions = {s.get("id"): s.get("state") for s in bob.get("sessions", [])}
        if health.get("workers", {}).get("busy") == 1 and sessions.get("smoke") == "busy":
            break
        check(time.monotonic() < deadline, "both turns start", (health, bob))
        time.sleep(0.1)

    started = time.monotonic()
    container.engine_command("stop", "--time", str(STOP_TIMEOUT_S), container.name, timeout=60)
    took = time.monotonic() - started
    for client in clients:
        client.join(REQUEST_TIMEOUT_S)
    short, long = answers.get("short"), answers.get("long")
    check(
        isinstance(short, tuple)
        and short[0] == 200
        and short[1].get("output") == "echo: [[fake:sleep:2]] finishing",
        "a turn that ends within the grace gets its whole answer",
        short,
    )
    check(
        isinstance(long, tuple)
        and long[0] == 200
        and "piece 1" in str(long[1].get("output"))
        and long[1].get("stopped") is True,
        "a turn cut short at shutdown gets its partial output, marked stopped",
        long,
    )
    code = container.exit_code()
    check(code == 0, "the container exits 0 after SIGTERM", code)
    check(took < STOP_TIMEOUT_S, "the service stops before the engine's SIGKILL", took)
    log(f"stopped with 2 turns in flight in {took:.1f} s: both answered, exit code 0")


def check_restart_resumes(container: Container) -> None:
    container.engine_command("start", container.name)
    container.find_port()
    wait_until_ok(container)
    answer = run_prompt(container.base_url, "alice", "What is my name?", session="smoke")
    check(
        answer.get("output") == "Your name is Alice.", "a session resumes after a restart", answer
    )
    container.engine_command("stop", "--time", str(STOP_TIMEOUT_S), container.name, timeout=60)
    check(container.exit_code() == 0, "the container exits 0 after SIGTERM", container.exit_code())
    log("restarted on the same volumes: the session resumed its conversation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--image", required=True)
    parser.add_argument("--name", default="claude-code-api-smoke")
    parser.add_argument("--run-option", action="append", default=[], dest="run_options")
    options = parser.parse_args()
    container = Container(options.engine, options.image, options.name, options.run_options)
    container.remove()  # a leftover of an interrupted run
    try:
        container.run()
        check_serving(container)
        check_stop_with_turns_in_flight(container)
        check_restart_resumes(container)
    except (SmokeFailure, OSError, subprocess.TimeoutExpired) as exc:
        print(f"container_smoke: FAILED: {exc}", file=sys.stderr)
        print("--- the container's log ---", file=sys.stderr)
        print(container.logs()[-6000:], file=sys.stderr)
        sys.exit(1)
    finally:
        if os.environ.get("SMOKE_LOG"):
            print(container.logs())
        container.remove()


if __name__ == "__main__":
    main()
