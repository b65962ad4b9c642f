"""The container check's replicas: three containers of the image behind the balancer, on one
PostgreSQL, checked from outside (issue 22's deploy).

Run by ``scripts/container-check`` after ``tests/container_smoke.py``; standard library only::

    python3 tests/container_replicas.py --engine podman --image IMAGE \\
        --balancer BALANCER_IMAGE --postgres POSTGRES_IMAGE [--run-option=...]...

What compose.replicas.yaml runs, driven through podman directly (no Compose and no DNS between
containers here): one pod, so the containers meet on its loopback: PostgreSQL (Debian's, on
5432), replicas ``api-1``..``api-3`` of the image on ports 8081-8083 with the fake CLI, each its
own DATA_DIR, one shared ``WORKSPACES_DIR`` volume, ``DATABASE_URL``; the balancer
(``deploy/haproxy``, its real haproxy.cfg) on 8080, published. It checks, through the balancer:

* every replica's HEALTHCHECK passes and the balancer's too;
* the balancer hashes on the key: one key always reaches one replica (``X-Served-By``), and the
  user's several keys reach every replica;
* one session's turns sent with keys that hash to different replicas land there, and the
  conversation goes on ("What is my name?");
* the replica that holds the session is stopped (``engine stop``); the session's next turn, sent
  with the key that hashed to it, is served by another replica and the conversation goes on.

Error handling: the first failed check raises :class:`SmokeFailure`; the script prints it with
the containers' logs and exits 1. The pod, its containers and the volumes are removed in every
case (``SMOKE_LOG=1`` prints the logs first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from container_smoke import FAKE_CLAUDE, SmokeFailure, check

POD = "claude-code-api-replicas"
REPLICAS = {"api-1": 8081, "api-2": 8082, "api-3": 8083}
# One user with several keys: each hashes to one replica.
KEYS = [f"sk-replicas-alice-{n}" for n in range(8)]
START_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10
LEASE_S = 5
BALANCER_CFG = Path(__file__).parent.parent / "deploy" / "haproxy" / "haproxy.cfg"


def log(message: str) -> None:
    print(f"container_replicas: {message}", flush=True)


class Pod:
    """The pod and its containers, driven through the engine's command line."""

    def __init__(self, engine: str, name: str) -> None:
        self.engine = engine
        self.name = name
        self.workspaces = f"{name}-workspaces"
        self.containers: list[str] = []
        self.base_url = ""

    def engine_command(self, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            [self.engine, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise SmokeFailure(f"{self.engine} {args[0]} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip()

    def create(self) -> None:
        self.engine_command("pod", "create", "--name", self.name, "--publish", "127.0.0.1::8080")
        self.engine_command("volume", "create", self.workspaces)

    def run(self, name: str, *args: str) -> None:
        container = f"{self.name}-{name}"
        self.engine_command(
            "run", "--detach", "--pod", self.name, "--name", container,
            "--health-interval=disable", *args,
        )  # fmt: skip
        self.containers.append(container)

    def find_port(self) -> None:
        published = self.engine_command("port", f"{self.name}-balancer", "8080/tcp")
        self.base_url = f"http://127.0.0.1:{published.splitlines()[0].rsplit(':', 1)[1]}"

    def healthy(self, name: str) -> bool:
        done = subprocess.run(
            [self.engine, "healthcheck", "run", f"{self.name}-{name}"],
            capture_output=True,
            timeout=30,
        )
        return done.returncode == 0

    def wait_healthy(self, *names: str) -> float:
        started = time.monotonic()
        waiting = list(names)
        while waiting:
            waiting = [name for name in waiting if not self.healthy(name)]
            for name in waiting:
                state = self.engine_command(
                    "inspect", "--format", "{{.State.Status}}", f"{self.name}-{name}"
                )
                check(state == "running", f"{name} keeps running while starting", state)
            check(
                time.monotonic() - started < START_TIMEOUT_S,
                f"healthy within {START_TIMEOUT_S:.0f} s",
                waiting,
            )
            if waiting:
                time.sleep(0.5)
        return time.monotonic() - started

    def logs(self) -> str:
        parts = []
        for container in self.containers:
            done = subprocess.run(
                [self.engine, "logs", "--tail", "40", container],
                capture_output=True,
                text=True,
                timeout=30,
            )
            parts.append(f"--- {container} ---\n{done.stdout}{done.stderr}")
        return "\n".join(parts)

    def remove(self) -> None:
        for args in (
            ["pod", "rm", "--force", self.name],
            ["volume", "rm", "--force", self.workspaces],
        ):
            subprocess.run([self.engine, *args], capture_output=True, timeout=120)


def request(
    base_url: str, method: str, path: str, body: dict[str, Any] | None = None, key: str = ""
) -> tuple[int, dict[str, Any], str]:
    """One HTTP request; (status, JSON body, the replica that answered: ``X-Served-By``)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["x-api-key"] = key
    req = urllib.request.Request(base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            served_by = response.headers.get("X-Served-By", "")
            return response.status, json.loads(response.read() or b"{}"), served_by
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            answer = {"body": raw[:300].decode(errors="replace")}
        return exc.code, answer, exc.headers.get("X-Served-By", "")


def start(pod: Pod, image: str, balancer: str, postgres: str, run_options: list[str]) -> None:
    pod.create()
    pod.run("postgres", postgres)
    took = pod.wait_healthy("postgres")
    log(f"PostgreSQL ready in {took:.1f} s")
    environment = {
        "API_KEYS": ",".join(f"alice:{key}" for key in KEYS),
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
        "WORKSPACES_DIR": "/workspaces",
        "SESSION_LEASE_S": str(LEASE_S),
        "CLAUDE_EXECUTABLE": "/opt/fake/claude",
        "AGENT_SANDBOX": "on",
        "FAKE_CLAUDE_REFUSE_ROOT": "1",
        "AGENT_ENV": "FAKE_CLAUDE_REFUSE_ROOT",
    }
    for name, port in REPLICAS.items():
        args = ["--env", f"PORT={port}", "--volume", f"{FAKE_CLAUDE}:/opt/fake/claude:ro"]
        args += ["--volume", f"{pod.workspaces}:/workspaces"]
        for variable, value in environment.items():
            args += ["--env", f"{variable}={value}"]
        pod.run(name, *args, *run_options, image)
    addresses = [f"--env=API_{n}=127.0.0.1:{port}" for n, port in enumerate(REPLICAS.values(), 1)]
    pod.run(
        "balancer", *addresses, "--volume", f"{BALANCER_CFG}:/etc/haproxy/haproxy.cfg:ro", balancer
    )
    took = pod.wait_healthy(*REPLICAS, "balancer")
    pod.find_port()
    log(f"three replicas and the balancer healthy {took:.1f} s later")


def turn(pod: Pod, key: str, prompt: str) -> tuple[str, str]:
    """A turn of the session ``shared``; (its output, the replica that answered)."""
    status, answer, served_by = request(
        pod.base_url, "POST", "/run", {"prompt": prompt, "sessionId": "shared"}, key
    )
    check(status == 200, f"POST /run {prompt!r} answers 200", (status, answer, served_by))
    return str(answer.get("output")), served_by


def check_replicas(pod: Pod) -> None:
    # Where each key goes: the balancer must know all three replicas up before this.
    deadline = time.monotonic() + 30
    while True:
        replica_of = {key: request(pod.base_url, "GET", "/health", key=key)[2] for key in KEYS}
        if set(replica_of.values()) == set(REPLICAS):
            break
        check(time.monotonic() < deadline, "the keys reach every replica", replica_of)
        time.sleep(1)
    again = {key: request(pod.base_url, "GET", "/health", key=key)[2] for key in KEYS}
    check(again == replica_of, "one key always reaches the same replica", (replica_of, again))
    key_for = {replica: key for key, replica in reversed(replica_of.items())}
    log(f"the balancer hashes on the key: {len(KEYS)} keys over {sorted(key_for)}")

    order = sorted(key_for)
    output, served_by = turn(pod, key_for[order[0]], "My name is Alice.")
    check(output == "Nice to meet you, Alice.", "the session's first turn", output)
    seen = [served_by]
    for replica in order[1:]:
        started = time.monotonic()
        output, served_by = turn(pod, key_for[replica], "What is my name?")
        check(output == "Your name is Alice.", f"the conversation goes on on {replica}", output)
        seen.append(served_by)
        log(f"the session moved to {served_by} in {time.monotonic() - started:.2f} s")
    check(seen == order, "each turn lands on the replica its key hashes to", (seen, order))

    holder = seen[-1]
    pod.engine_command("stop", "--time", str(STOP_TIMEOUT_S), f"{pod.name}-{holder}", timeout=60)
    started = time.monotonic()
    output, served_by = turn(pod, key_for[holder], "Who am I? What is my name?")
    took = time.monotonic() - started
    check(output == "Your name is Alice.", "the session goes on after its replica stopped", output)
    check(served_by not in ("", holder), "another replica serves it", served_by)
    status, health, _ = request(pod.base_url, "GET", "/health")
    check(status == 200, "the balancer's /health answers with a replica stopped", (status, health))
    log(f"{holder} stopped: the session's next turn served by {served_by} in {took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--image", required=True)
    parser.add_argument("--balancer", required=True)
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--run-option", action="append", default=[], dest="run_options")
    options = parser.parse_args()
    pod = Pod(options.engine, POD)
    pod.remove()  # a leftover of an interrupted run
    started = time.monotonic()
    try:
        start(pod, options.image, options.balancer, options.postgres, options.run_options)
        check_replicas(pod)
    except (SmokeFailure, OSError, subprocess.TimeoutExpired) as exc:
        print(f"container_replicas: FAILED: {exc}", file=sys.stderr)
        print("--- the containers' logs ---", file=sys.stderr)
        print(pod.logs()[-12000:], file=sys.stderr)
        sys.exit(1)
    finally:
        if os.environ.get("SMOKE_LOG"):
            print(pod.logs())
        pod.remove()
    log(f"replicas checked in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
