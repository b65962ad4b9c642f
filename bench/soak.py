"""Soak: the real service under a long, mixed, faulty load, and what it left at rest.

Prints a summary of figures. The checks are asserted by ``tests/unit/test_soak.py``
(``@pytest.mark.slow``: ``.venv/bin/pytest -m slow tests/unit/test_soak.py``), which runs a
shorter soak; this module runs the load and records what the audit checks (a
:class:`SoakReport`, its :class:`AtRest`). Everything runs on 127.0.0.1 against the
fake CLI ``tests/fake_claude.py``: no network, no credentials.

    .venv/bin/python -m bench.soak                      # 1000 requests, 16 at a time
    .venv/bin/python -m bench.soak --requests 200 --concurrency 8 --seed 7

It starts ``python -m claude_code_api`` (PORT=0, POOL_SIZE=4, MAX_LIVE_SESSIONS=4,
INTERRUPT_GRACE_MS=300, its own DATA_DIR and FAKE_CLAUDE_HOME, every fake process
recording its pid), warms it up, then sends ``--requests`` operations chosen by a
seeded random generator, at most ``--concurrency`` at a time:

* one-shot: normal, sleep, tool, slow (streams), big output, crash mid-turn (502),
  garbage on stdout (502), error result (200, success false), hang and hang_hard
  with a short ``timeoutMs`` (200, timedOut true), client disconnect mid-run and
  while queued (the reply is abandoned);
* sessions (20 ids, plus a second user on the same ids): "My name is X." then
  "What is my name?" (the answer must match), echo, crash, hang, error turns, a
  DELETE while idle or during a turn, a queued turn whose client disconnects;
* bad input: invalid JSON, wrong fields, 401/404/405/413/415.

Every reply is checked for its kind: status code and JSON shape (200 has exactly
success/output/durationMs/timedOut [+timeoutType, outputTruncated]; an error is
exactly ``{"error": str}``) and content. Anything else is an *unexpected* reply.

Afterwards (checked by the test): ``/health`` must show the pool back to full (4 ready, queue 0) within a
bound; ``/status`` counters must add up with what the clients saw (no worker stuck
busy); live fake processes at rest must be exactly the workers' plus the live
sessions' (agents kept for their users, AGENT_REUSE_S, are gone by then); during the load
at most 3 x POOL_SIZE (running, warm for anyone, kept: AGENT_REUSE_MAX) + MAX_LIVE_SESSIONS
+ POOL_SIZE (processes retiring) fakes may live; the fake's turn log must show no prompt
run twice. Then SIGTERM: the service must exit 0 and leave no fake process alive or
zombie. RSS (VmRSS) of the service is read after warm-up and after the load.

Importable: ``await soak(requests, concurrency, workdir)`` returns a :class:`SoakReport`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.stats import QUIET_SHARE_PERCENT, QuietMeter, percentile
from claude_code_api.config.settings import Settings, load_settings
from claude_code_api.http.openapi import openapi_spec
from tests.support.harness import CLK_TCK, RunningService, launch_service
from tests.support.harness import service_env as harness_env

API_KEY = "sk-soak-key"  # user id "api"
OTHER_KEY = "sk-soak-other"  # user id "other": same session ids, other conversations
AUTH = {"x-api-key": API_KEY}
OTHER_AUTH = {"x-api-key": OTHER_KEY}
JSON_HEADERS = {**AUTH, "Content-Type": "application/json"}

POOL_SIZE = 4
MAX_LIVE_SESSIONS = 4
QUEUE_MAX = 10_000  # never the limit: a 429 is unexpected
INTERRUPT_GRACE_MS = 300
WARMUP_TIMEOUT_MS = 5_000
SHUTDOWN_GRACE_S = 10
# One process retiring per worker next to its fresh one.
RETIRING_ALLOWANCE = POOL_SIZE
SESSION_COUNT = 20
DEFAULT_SEED = 20_240_601

# Bounds: every wait is bounded, so the soak always ends by itself.
START_TIMEOUT_S = 30.0
WARM_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 90.0  # one HTTP request
LONG_TIMEOUT_MS = 60_000  # timeoutMs of requests that are expected to finish
RECOVER_TIMEOUT_S = 30.0  # pool back to full after the load
SETTLE_TIMEOUT_S = 15.0  # sessions idle, counters stable, retired processes gone
STOP_TIMEOUT_S = 60.0  # exit after SIGTERM
MONITOR_INTERVAL_S = 0.2
HEALTH_INTERVAL_S = 0.5

NAMES = (
    "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia "
    "Peggy Rupert Sybil Trent Victor Walter Yolanda"
).split()
NAME_REPLY = re.compile(r"Nice to meet you, (.+)\.")
# What the SDK logs when the CLI dies or writes garbage mid-turn: expected for the faults.
SDK_FAULT_LINE = "claude_agent_sdk._internal.query: Fatal error in message reader"
TAG_RE = re.compile(r"#(\d+[a-z]?)(?!\w)")

# --- the plan: which operations, chosen by a seeded generator ------------------------

ONE_SHOT_WEIGHTS = {
    "normal": 22,
    "sleep": 3,
    "tool": 3,
    "slow": 7,
    "big": 2,
    "crash": 5,
    "garbage": 4,
    "error": 4,
    "hang": 3,
    "hang_hard": 3,
    "disconnect_running": 5,
    "disconnect_queued": 4,
    "bad_input": 6,
    "session": 29,
}
SESSION_WEIGHTS = {
    "name": 24,
    "ask": 34,
    "echo": 8,
    "crash": 5,
    "hang": 4,
    "error": 4,
    "delete": 5,
    "delete_midturn": 4,
    "queued_cancel": 6,
    "other_user_ask": 6,
}
BAD_INPUTS = (
    # (label, method, path, headers, body, expected status)
    ("invalid_json", "POST", "/run", JSON_HEADERS, b'{"prompt": "x",', 400),
    ("not_an_object", "POST", "/run", JSON_HEADERS, b"[1, 2]", 400),
    ("no_prompt", "POST", "/run", JSON_HEADERS, b'{"sessionId": "x"}', 400),
    ("prompt_number", "POST", "/run", JSON_HEADERS, b'{"prompt": 42}', 400),
    ("blank_prompt", "POST", "/run", JSON_HEADERS, b'{"prompt": "   "}', 400),
    ("timeout_zero", "POST", "/run", JSON_HEADERS, b'{"prompt": "x", "timeoutMs": 0}', 400),
    ("bad_session_id", "POST", "/run", JSON_HEADERS, b'{"prompt": "x", "sessionId": "a b!"}', 400),
    ("duplicate_key", "POST", "/run", JSON_HEADERS, b'{"prompt": "a", "prompt": "b"}', 400),
    ("not_utf8", "POST", "/run", JSON_HEADERS, b'{"prompt": "\xff\xfe"}', 400),
    (
        "xml_type",
        "POST",
        "/run",
        {**AUTH, "Content-Type": "application/xml"},
        b'{"prompt": "x"}',
        415,
    ),
    ("no_key", "POST", "/run", {"Content-Type": "application/json"}, b'{"prompt": "x"}', 401),
    (
        "wrong_key",
        "POST",
        "/run",
        {"x-api-key": "nope", "Content-Type": "application/json"},
        b'{"prompt": "x"}',
        401,
    ),
    ("unknown_route", "POST", "/nope", JSON_HEADERS, b'{"prompt": "x"}', 404),
    ("wrong_method", "GET", "/run", AUTH, None, 405),
    ("delete_invalid_json", "DELETE", "/session", JSON_HEADERS, b"{oops", 400),
    ("delete_no_id", "DELETE", "/session", JSON_HEADERS, b"{}", 400),
    ("too_large", "POST", "/run", JSON_HEADERS, None, 413),  # body built at run time
)


@dataclass
class Op:
    index: int
    kind: str  # a key of ONE_SHOT_WEIGHTS, or "session:<a key of SESSION_WEIGHTS>"
    session: int | None = None  # session number, for session ops
    seq: int = 0  # position among its session's ops
    arg: Any = None  # per kind: crash code, slow count, name, bad input...
    timeout_ms: int = LONG_TIMEOUT_MS
    cancel_after_s: float = 0.0


def make_plan(requests: int, seed: int) -> list[Op]:
    rng = random.Random(seed)
    kinds, weights = zip(*ONE_SHOT_WEIGHTS.items(), strict=True)
    session_kinds, session_weights = zip(*SESSION_WEIGHTS.items(), strict=True)
    seqs = [0] * SESSION_COUNT
    plan = []
    for index in range(requests):
        kind = rng.choices(kinds, weights)[0]
        op = Op(index, kind)
        if kind == "slow":
            op.arg = rng.randint(2, 6)
        elif kind == "big":
            op.arg = rng.randint(50_000, 300_000)
        elif kind == "crash":
            op.arg = rng.choice((2, 3, 7, 9, 42, 99))
        elif kind in ("hang", "hang_hard"):
            # Short, yet longer than a typical wait in the queue at concurrency 16, so
            # that most hangs reach an agent and have to be interrupted (or killed).
            op.timeout_ms = rng.randint(2500, 4000)
        elif kind == "disconnect_running":
            op.cancel_after_s = rng.uniform(0.1, 0.3)
        elif kind == "disconnect_queued":
            op.cancel_after_s = rng.uniform(0.005, 0.03)
        elif kind == "bad_input":
            op.arg = rng.choice(BAD_INPUTS)
        elif kind == "session":
            sub = rng.choices(session_kinds, session_weights)[0]
            op.kind = f"session:{sub}"
            op.session = rng.randrange(SESSION_COUNT)
            if sub != "other_user_ask":  # the other user's turns do not join the chain
                op.seq = seqs[op.session]
                seqs[op.session] += 1
            if sub == "name":
                op.arg = rng.choice(NAMES)
            elif sub == "crash":
                op.arg = rng.choice((3, 5, 9))
            elif sub == "hang":
                op.arg = rng.choice(("hang", "hang_hard"))
                op.timeout_ms = rng.randint(600, 1200)
            elif sub == "delete_midturn":
                op.cancel_after_s = rng.uniform(0.3, 0.6)  # when the DELETE is sent
            elif sub == "queued_cancel":
                op.cancel_after_s = rng.uniform(0.08, 0.15)
        plan.append(op)
    return plan


def session_id(number: int) -> str:
    return f"soak-s{number:02d}"


# --- fake processes, identified by pid file and start time --------------------------


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


BOOT_TIME = _boot_time()


def fake_state(pid: int, pidfile_mtime: float) -> str | None:
    """The /proc state of our fake ``pid`` (``"Z"`` for a zombie), or None if gone.

    Our fake is the process with that pid that started shortly before it wrote its
    pid file: pid reuse by an unrelated process (or someone else's zombie) is not ours.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    state, start_ticks = fields[0], int(fields[19])
    started = BOOT_TIME + start_ticks / CLK_TCK
    if not pidfile_mtime - 120 <= started <= pidfile_mtime + 2:
        return None
    if state != "Z" and b"fake_claude" not in cmdline:
        return None
    return state


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class FakeTracker:
    """Counts live fake processes from the pid directory, cheaply (dead ones are cached)."""

    def __init__(self, piddir: Path) -> None:
        self.piddir = piddir
        self._dead: set[tuple[str, int]] = set()
        self.max_live = 0
        self.max_live_at = 0.0
        self.started_at = time.monotonic()

    def live(self) -> list[tuple[int, str, float]]:
        """(pid, state, pid file mtime) of every recorded fake still alive or zombie."""
        found = []
        try:
            entries = list(os.scandir(self.piddir))
        except OSError:
            return found
        for entry in entries:
            try:
                mtime_ns = entry.stat().st_mtime_ns
            except OSError:
                continue
            key = (entry.name, mtime_ns)
            if key in self._dead:
                continue
            state = fake_state(int(entry.name), mtime_ns / 1e9)
            if state is None:
                self._dead.add(key)
            else:
                found.append((int(entry.name), state, mtime_ns / 1e9))
        return found

    def sample(self) -> int:
        count = len(self.live())
        if count > self.max_live:
            self.max_live, self.max_live_at = count, time.monotonic() - self.started_at
        return count

    def total_started(self) -> int:
        try:
            return len(os.listdir(self.piddir))
        except OSError:
            return 0


class TurnLog:
    """Follows the fake's log (FAKE_CLAUDE_LOG): which tagged prompts reached an agent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._seen: set[str] = set()
        self._waiters: dict[str, trio.Event] = {}

    def started(self, tag: str) -> trio.Event:
        event = self._waiters.setdefault(tag, trio.Event())
        if tag in self._seen:
            event.set()
        return event

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") != "turn":
                continue
            for tag in TAG_RE.findall(record.get("prompt", "")):
                self._seen.add(tag)
                if tag in self._waiters:
                    self._waiters[tag].set()

    async def follow(self, interval: float = 0.02) -> None:
        while True:
            self.poll()
            await trio.sleep(interval)


# --- the service ------------------------------------------------------------------------


class LogWatch:
    """Reads the service's log lines: counts the SDK's expected fault lines, keeps the rest."""

    def __init__(self) -> None:
        self.sdk_fault_lines = 0  # the SDK's ERROR line for an injected crash or garbage
        self.problems: list[str] = []  # other ERROR, CRITICAL and Traceback lines (first 50)

    def __call__(self, line: str) -> None:
        if SDK_FAULT_LINE in line:
            self.sdk_fault_lines += 1
        elif " ERROR " in line or "Traceback" in line or " CRITICAL " in line:
            if len(self.problems) < 50:
                self.problems.append(line.rstrip("\n")[:300])


def service_env(workdir: Path) -> dict[str, str]:
    return harness_env(
        workdir,
        {
            "API_KEYS": f"{API_KEY},other:{OTHER_KEY}",
            "POOL_SIZE": str(POOL_SIZE),
            "MAX_LIVE_SESSIONS": str(MAX_LIVE_SESSIONS),
            "QUEUE_MAX": str(QUEUE_MAX),
            "INTERRUPT_GRACE_MS": str(INTERRUPT_GRACE_MS),
            "WARMUP_TIMEOUT_MS": str(WARMUP_TIMEOUT_MS),
            "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
            "FAKE_CLAUDE_LOG": str(workdir / "fake.log"),
        },
    )


def rss_kib(service: RunningService, field_name: str) -> int | None:
    try:
        return service.memory_kib().get(field_name)
    except OSError:
        return None


# --- replies ----------------------------------------------------------------------------

RUN_KEYS = {"success", "output", "durationMs", "timedOut"}
# Every field a run's reply may have: the original's four, then what the API documents
# (timeoutType, cancelled, the result metadata: runId, model, usage, ...).
_SCHEMAS = openapi_spec(load_settings({}))["components"]["schemas"]
DOCUMENTED_RUN_KEYS = set(_SCHEMAS["RunResult"]["properties"])
# An error: {"error": ...}, and the run's id when it is about a run.
DOCUMENTED_ERROR_KEYS = set(_SCHEMAS["Error"]["properties"])


def check_shape(reply: httpx.Response) -> tuple[str, Any, str | None]:
    """(label, body, problem): is the reply well-formed for its status code?"""
    status = reply.status_code
    if not reply.headers.get("content-type", "").startswith("application/json"):
        return str(status), None, f"content-type {reply.headers.get('content-type')!r}"
    try:
        body = reply.json()
    except ValueError:
        return str(status), None, f"body is not JSON: {reply.text[:200]!r}"
    if status == 200 and isinstance(body, dict) and "success" in body:
        problem = _run_body_problem(body)
        return ("200" if problem else _run_label(body)), body, problem
    if status == 200:
        return "200", body, None  # DELETE /session and friends: checked by the caller
    return str(status), body, _error_body_problem(body)


def _run_body_problem(body: dict[str, Any]) -> str | None:
    """What is wrong with a run's reply (exactly the documented fields, typed), or None."""
    if not RUN_KEYS <= set(body) or set(body) - DOCUMENTED_RUN_KEYS:
        return f"keys {sorted(body)}"
    duration = body["durationMs"]
    if not (
        isinstance(body["success"], bool)
        and isinstance(body["output"], str)
        and isinstance(body["timedOut"], bool)
        and type(duration) is int
        and duration >= 0
    ):
        return f"field types {_short(body)}"
    if body["timedOut"] != ("timeoutType" in body) or body.get("timeoutType", "hard") != "hard":
        return f"timeoutType does not match timedOut: {_short(body)}"
    if body.get("outputTruncated", True) is not True:
        return f"outputTruncated {body['outputTruncated']!r}"
    if body["timedOut"] and body["success"]:
        return "success with timedOut"
    return None


def _run_label(body: dict[str, Any]) -> str:
    if body["timedOut"]:
        # "(partial)": the agent had started (the deadline passed mid-turn), "(empty)":
        # most likely the deadline passed while the job was still waiting in a queue.
        return "200 timedOut" + (" (partial)" if body["output"] else " (empty)")
    return "200 success" if body["success"] else "200 failure"


def _error_body_problem(body: Any) -> str | None:
    """An error is ``{"error": str}``, with the run's id when it is about a run."""
    if (
        isinstance(body, dict)
        and set(body) <= DOCUMENTED_ERROR_KEYS
        and isinstance(body.get("error"), str)
        and body["error"]
        and isinstance(body.get("runId", ""), str)
    ):
        return None
    return f"error body is not {{'error': str}}: {_short(body)}"


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


# --- what a reply must be ---------------------------------------------------------------

# An expectation: given a well-formed reply's label and body, what is wrong (None: nothing).
Expect = Callable[[str, Any], str | None]


def succeeds(output: str | None) -> Expect:
    """200, success true, and ``output`` exactly (None: any output)."""

    def check(label: str, body: Any) -> str | None:
        if label != "200 success":
            return f"expected 200 success, got {label}"
        if output is not None and body["output"] != output:
            return f"output {_short(body['output'], 80)!r} != {_short(output, 80)!r}"
        return None

    return check


def fails(status: int, fragment: str) -> Expect:
    """An error reply of ``status`` whose message holds ``fragment``."""

    def check(label: str, body: Any) -> str | None:
        if label != str(status):
            return f"expected {status}, got {label}"
        if fragment not in body["error"]:
            return f"error lacks {fragment!r}"
        return None

    return check


def times_out(label: str, body: Any) -> str | None:
    """200 with timedOut, the output empty or what the hanging fake wrote first."""
    if not label.startswith("200 timedOut"):
        return f"expected 200 timedOut, got {label}"
    if body["output"] not in ("", "partial before hang"):
        return f"unexpected partial output {_short(body['output'], 80)!r}"
    return None


def error_result(label: str, body: Any) -> str | None:
    """200 with success false: the agent's own error result."""
    if label != "200 failure":
        return f"expected 200 failure, got {label}"
    if body["output"] != "Reached maximum number of turns (1)":
        return f"output {body['output']!r}"
    return None


@dataclass
class Tally:
    """What the clients saw, for the /status audit."""

    http_requests: int = 0
    run_replies: int = 0  # /run answered 200 or 502 (reached the dispatcher and a verdict)
    oneshot_replies: int = 0  # of which one-shot
    success_true: int = 0  # 200 success: true, one-shot and session
    oneshot_success: int = 0  # of which one-shot
    cancelled_runs: int = 0  # /run requests abandoned by their client


@dataclass
class AtRest:
    """What the soak saw once the load was over: the figures the audit checks.

    ``tests/unit/test_soak.py`` asserts on them (the pool back to full, the counters adding up,
    the processes accounted for); the soak itself only records them.
    """

    recover_s: float | None = None  # None: the pool was not back to full in time
    health: dict[str, Any] = field(default_factory=dict)  # the last /health read
    settled: bool = False  # sessions idle and counters stable in time
    status: dict[str, Any] = field(default_factory=dict)  # /status of user "api"
    other_status: dict[str, Any] = field(default_factory=dict)  # /status of user "other"
    live_fakes: list[tuple[int, str, int | None]] = field(
        default_factory=list
    )  # pid, state, parent
    deleted: list[str] = field(default_factory=list)  # sessions whose last operation was a DELETE

    @property
    def live_sessions(self) -> int:
        sessions = self.status.get("sessions", []) + self.other_status.get("sessions", [])
        return sum(1 for s in sessions if s["state"] == "live")


@dataclass
class SoakReport:
    requests: int
    concurrency: int
    seed: int
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    latencies: dict[tuple[str, str], list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # seen during the load, besides replies
    tally: Tally = field(default_factory=Tally)
    completed_ops: int = 0
    duration_s: float = 0.0
    warmup_s: float = 0.0
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    hwm_after_kib: int | None = None
    max_live_fakes: int = 0
    max_live_fakes_at_s: float = 0.0
    # Running and warm for anyone (2 x POOL_SIZE), kept (AGENT_REUSE_MAX = POOL_SIZE), sessions.
    live_fakes_bound: int = 3 * POOL_SIZE + MAX_LIVE_SESSIONS + RETIRING_ALLOWANCE
    rest: AtRest = field(default_factory=AtRest)
    fake_starts: int = 0
    max_queue_seen: int = 0
    health_statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    disconnects: collections.Counter[str] = field(default_factory=collections.Counter)
    turns_logged: int = 0
    turn_counts: collections.Counter[str] = field(default_factory=collections.Counter)  # by tag
    must_have_run: set[str] = field(default_factory=set)  # tags whose reply proves they ran
    orphans: list[str] = field(default_factory=list)
    exit_code: int | None = None
    shutdown_s: float | None = None
    log_problems: list[str] = field(default_factory=list)
    sdk_fault_lines: int = 0
    # CPU other processes used during the load, in % of all CPUs (see bench/stats.py).
    others_cpu_share: float | None = None
    quiet_line: str = ""

    def summary(self) -> str:
        """The soak's figures, for people: what ran, how fast, what was left at rest."""
        return "\n".join(
            [*self._outcome_lines(), *self._load_lines(), *self._rest_lines(), *self._exit_lines()]
        )

    def _outcome_lines(self) -> list[str]:
        out = [
            f"soak: {self.requests} requests (seed {self.seed}), concurrency {self.concurrency}, "
            f"POOL_SIZE={POOL_SIZE}, MAX_LIVE_SESSIONS={MAX_LIVE_SESSIONS}, "
            f"INTERRUPT_GRACE_MS={INTERRUPT_GRACE_MS}",
            f"{'kind':<30} {'outcome':<24} {'count':>5} {'p50 ms':>8} {'max ms':>8}",
        ]
        for (kind, label), count in sorted(self.outcomes.items()):
            values = self.latencies.get((kind, label), [])
            p50 = f"{1000 * percentile(values, 50):8.0f}" if values else f"{'-':>8}"
            top = f"{1000 * max(values):8.0f}" if values else f"{'-':>8}"
            out.append(f"{kind:<30} {label:<24} {count:>5} {p50} {top}")
        return out

    def _load_lines(self) -> list[str]:
        total = sum(self.outcomes.values())
        rate = self.completed_ops / self.duration_s if self.duration_s else math.nan
        http_rate = self.tally.http_requests / self.duration_s if self.duration_s else math.nan
        out = [
            f"operations: {self.completed_ops}/{self.requests} completed ({total} outcomes, "
            f"{self.tally.http_requests} HTTP requests) in {self.duration_s:.1f} s: "
            f"{rate:.1f} requests/s ({http_rate:.1f} HTTP requests/s); warm-up {self.warmup_s:.1f} s"
        ]
        if self.others_cpu_share is not None:
            quiet = "yes" if self.others_cpu_share <= QUIET_SHARE_PERCENT else "NO"
            out.append(f"quiet machine during the load: {quiet} ({self.quiet_line.strip()})")
        out.append(
            "disconnects: "
            + (", ".join(f"{k}={v}" for k, v in sorted(self.disconnects.items())) or "none")
        )
        out.append(f"unexpected replies: {len(self.unexpected)}")
        out += [f"  ! {line}" for line in self.unexpected[:25]]
        if len(self.unexpected) > 25:
            out.append(f"  ... and {len(self.unexpected) - 25} more")
        before, after = self.rss_before_kib, self.rss_after_kib
        rss = (
            f"{before / 1024:.1f} MiB -> {after / 1024:.1f} MiB ({(after - before) / 1024:+.1f} "
            f"MiB; VmHWM {(self.hwm_after_kib or 0) / 1024:.1f} MiB)"
            if before and after
            else f"{before} -> {after} kB"
        )
        out.append(f"service RSS before/after load: {rss}")
        out.append(
            f"health during load: {dict(self.health_statuses)}, max queue length "
            f"{self.max_queue_seen}"
        )
        return out

    def _rest_lines(self) -> list[str]:
        rest = self.rest
        out = [
            f"pool back to full: {'yes' if rest.recover_s is not None else 'NO'}"
            + (f" after {rest.recover_s:.2f} s" if rest.recover_s is not None else "")
            + f"; final /health workers={rest.health.get('workers')} "
            f"queue={rest.health.get('queue')}"
        ]
        if rest.status:
            st = rest.status
            out.append(
                f"/status: totalProcessed={st.get('totalProcessed')} totalErrors="
                f"{st.get('totalErrors')} queueLength={st.get('queueLength')} worker jobs="
                f"{[w.get('jobs') for w in st.get('workers', [])]} states="
                f"{[w.get('state') for w in st.get('workers', [])]}; clients saw "
                f"{self.tally.run_replies} /run verdicts ({self.tally.success_true} success), "
                f"{self.tally.cancelled_runs} abandoned"
                + ("" if rest.settled else " (not settled)")
            )
        out.append(
            f"fake processes: {self.fake_starts} started, {self.turns_logged} turns logged; "
            f"max live during load {self.max_live_fakes} (bound {self.live_fakes_bound}, at "
            f"{self.max_live_fakes_at_s:.1f} s); live at rest {len(rest.live_fakes)} "
            f"(= {POOL_SIZE} workers + {rest.live_sessions} live sessions expected)"
        )
        return out

    def _exit_lines(self) -> list[str]:
        out = [f"orphans after exit: {len(self.orphans)}"]
        out += [f"  ! {o}" for o in self.orphans]
        out.append(
            f"service exit code after SIGTERM: {self.exit_code}"
            + (f" (in {self.shutdown_s:.2f} s)" if self.shutdown_s is not None else "")
        )
        out.append(
            f"service log: {self.sdk_fault_lines} SDK 'Fatal error in message reader' lines "
            f"(expected, one per injected crash/garbage); other ERROR/Traceback lines: "
            f"{len(self.log_problems)}"
        )
        out += [f"  ! {line}" for line in self.log_problems[:10]]
        out.append(f"other problems during the load: {len(self.problems)}")
        out += [f"  ! {line}" for line in self.problems[:25]]
        return out


# --- running the operations ---------------------------------------------------------------


@dataclass
class SessionState:
    name: str | None = None  # the name the conversation remembers (None: none yet)
    known: bool = True  # False when an unexpected outcome left it uncertain
    has_record: bool | None = False  # None: cannot tell
    done: list[trio.Event] = field(default_factory=list)


class Runner:
    def __init__(
        self, report: SoakReport, client: httpx.AsyncClient, plan: list[Op], turn_log: TurnLog
    ) -> None:
        self.report = report
        self.client = client
        self.turn_log = turn_log
        self.sessions = [SessionState() for _ in range(SESSION_COUNT)]
        for op in plan:
            if op.session is not None and op.kind != "session:other_user_ask":
                self.sessions[op.session].done.append(trio.Event())
        # Tags ("12", "12a") of prompts: abandoned ones, and ones whose reply proves they ran.
        self.cancelled_tags: dict[str, str] = {}
        self.must_have_run: set[str] = set()
        self.last_delete_seq: dict[int, int] = {}

    # -- bookkeeping

    def deleted_last(self) -> list[str]:
        """The sessions whose last operation was a DELETE (they must not be listed)."""
        return [
            session_id(number)
            for number, state in enumerate(self.sessions)
            if state.done and self.last_delete_seq.get(number) == len(state.done) - 1
        ]

    def outcome(self, kind: str, label: str, elapsed: float | None = None) -> None:
        self.report.outcomes[(kind, label)] += 1
        if elapsed is not None:
            self.report.latencies[(kind, label)].append(elapsed)

    def unexpected(self, op: Op | None, what: str) -> None:
        where = f"#{op.index} {op.kind}" if op is not None else "warm-up"
        if op is not None and op.session is not None:
            where += f" ({session_id(op.session)} step {op.seq})"
        self.report.unexpected.append(f"{where}: {what}")

    # -- HTTP

    async def run(
        self,
        prompt: str,
        *,
        timeout_ms: int = LONG_TIMEOUT_MS,
        session: str | None = None,
        headers: dict[str, str] = JSON_HEADERS,
        cancel_after: float | None = None,
        abandon_when: Callable[[], Any] | None = None,
    ) -> tuple[httpx.Response | None, float]:
        """POST /run. The client gives up after ``cancel_after`` s, or once the
        ``abandon_when()`` coroutine returns; the reply is then None."""
        body: dict[str, Any] = {"prompt": prompt, "timeoutMs": timeout_ms}
        if session is not None:
            body["sessionId"] = session
        self.report.tally.http_requests += 1
        started = time.monotonic()
        limit = cancel_after if cancel_after is not None else HTTP_TIMEOUT_S + 5
        reply = None
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(limit) as scope:
                if abandon_when is not None:

                    async def abandon() -> None:
                        await abandon_when()
                        scope.cancel()

                    nursery.start_soon(abandon)
                reply = await self.client.post("/run", json=body, headers=headers)
            nursery.cancel_scope.cancel()
        elapsed = time.monotonic() - started
        if reply is None:
            self.report.tally.cancelled_runs += 1
        elif reply.status_code in (200, 502):
            self.report.tally.run_replies += 1
            self.report.tally.oneshot_replies += session is None
            try:
                succeeded = reply.status_code == 200 and reply.json().get("success") is True
            except (ValueError, AttributeError):
                succeeded = False  # malformed: check_shape reports it
            if succeeded:
                self.report.tally.success_true += 1
                self.report.tally.oneshot_success += session is None
        return reply, elapsed

    async def expect_run(
        self,
        op: Op | None,
        kind: str,
        prompt: str,
        expect: Expect,
        *,
        ran: str | None = None,
        **kwargs,
    ) -> tuple[str, Any]:
        """POST /run; classify; ``expect(label, body)`` returns a problem or None.

        ``ran``: the prompt's tag, when the expected reply can only come from the agent
        (then the fake's turn log must show that prompt, exactly once).
        """
        reply, elapsed = await self.run(prompt, **kwargs)
        if reply is None:
            self.outcome(kind, "no reply", elapsed)
            self.unexpected(op, f"no reply within {HTTP_TIMEOUT_S + 5:.0f} s")
            return "no reply", None
        label, body, problem = check_shape(reply)
        self.outcome(kind, label, elapsed)
        if problem is None:
            problem = expect(label, body)
        if problem is not None:
            self.unexpected(op, f"{problem} [HTTP {reply.status_code} {_short(body)}]")
        elif ran is not None:
            self.must_have_run.add(ran)
        return label, body

    async def disconnecting_run(
        self, op: Op, kind: str, prompt: str, tag: str, cancel_after: float, **kwargs
    ) -> None:
        """A request its client abandons: nothing is expected, but a reply must be valid."""
        reply, elapsed = await self.run(prompt, cancel_after=cancel_after, **kwargs)
        self._abandoned(op, kind, tag, reply, elapsed)

    async def disconnect_mid_run(self, op: Op, kind: str, prompt: str, tag: str) -> None:
        """Abandon the request ``op.cancel_after_s`` after its turn reached an agent."""

        async def turn_started() -> None:
            with trio.move_on_after(HTTP_TIMEOUT_S):
                await self.turn_log.started(tag).wait()
            await trio.sleep(op.cancel_after_s)

        reply, elapsed = await self.run(prompt, abandon_when=turn_started)
        self._abandoned(op, kind, tag, reply, elapsed)

    def _abandoned(
        self, op: Op, kind: str, tag: str, reply: httpx.Response | None, elapsed: float
    ) -> None:
        if reply is None:
            self.outcome(kind, "disconnected", elapsed)
            self.cancelled_tags[tag] = kind
            return
        label, body, problem = check_shape(reply)
        self.outcome(kind, f"{label} (early)", elapsed)
        if problem is not None:
            self.unexpected(op, f"{problem} [HTTP {reply.status_code} {_short(body)}]")

    # -- one-shot operations

    async def one_shot(self, op: Op) -> None:
        i, kind = op.index, op.kind
        tag = f"#{i}"
        ran = str(i)

        if kind in ("normal", "sleep", "tool"):
            directive = {"normal": "", "sleep": "[[fake:sleep:0.2]] ", "tool": "[[fake:tool]] "}
            prompt = f"{directive[kind]}hello {tag}"
            await self.expect_run(op, kind, prompt, succeeds(f"echo: {prompt}"), ran=ran)
        elif kind == "slow":
            pieces = "".join(f"piece {n}" for n in range(1, op.arg + 1))
            await self.expect_run(
                op, kind, f"[[fake:slow:{op.arg}:0.05]] {tag}", succeeds(pieces), ran=ran
            )
        elif kind == "big":
            await self.expect_run(
                op, kind, f"[[fake:big:{op.arg}]] {tag}", succeeds("x" * op.arg), ran=ran
            )
        elif kind == "crash":
            await self.expect_run(
                op,
                kind,
                f"[[fake:crash:{op.arg}]] {tag}",
                fails(502, f"exited with code {op.arg}"),
                ran=ran,
            )
        elif kind == "garbage":
            await self.expect_run(
                op, kind, f"[[fake:garbage]] {tag}", fails(502, "malformed JSON"), ran=ran
            )
        elif kind == "error":
            await self.expect_run(op, kind, f"[[fake:error]] {tag}", error_result, ran=ran)
        elif kind in ("hang", "hang_hard"):
            await self.expect_run(
                op, kind, f"[[fake:{kind}]] {tag}", times_out, timeout_ms=op.timeout_ms
            )
        elif kind == "disconnect_running":
            await self.disconnect_mid_run(op, kind, f"[[fake:slow:40:0.1]] {tag}", ran)
        elif kind == "disconnect_queued":
            await self.disconnecting_run(
                op, kind, f"[[fake:slow:40:0.1]] {tag}", ran, op.cancel_after_s
            )
        elif kind == "bad_input":
            await self.bad_input(op)
        else:
            raise AssertionError(kind)

    async def bad_input(self, op: Op) -> None:
        label, method, path, headers, body, status = op.arg
        if label == "too_large":  # past the body limit (service_env leaves it at its default)
            limit = Settings().max_body_bytes
            body = json.dumps({"prompt": "x" * (limit + 10)}).encode()
        kind = f"bad_input:{label}"
        self.report.tally.http_requests += 1
        started = time.monotonic()
        reply = None
        with trio.move_on_after(HTTP_TIMEOUT_S):
            reply = await self.client.request(method, path, headers=headers, content=body)
        elapsed = time.monotonic() - started
        if reply is None:
            self.outcome(kind, "no reply", elapsed)
            self.unexpected(op, f"{label}: no reply")
            return
        got, parsed, problem = check_shape(reply)
        self.outcome(kind, got, elapsed)
        if problem is None and reply.status_code != status:
            problem = f"expected {status}"
        if problem is not None:
            self.unexpected(op, f"{label}: {problem} [HTTP {reply.status_code} {_short(parsed)}]")

    # -- session operations

    async def session_op(self, op: Op) -> None:
        sub = op.kind.split(":", 1)[1]
        if sub == "other_user_ask":
            await self.other_user_ask(op)
            return
        state = self.sessions[op.session]
        if op.seq:
            await state.done[op.seq - 1].wait()
        try:
            await self._session_step(op, sub, state)
        finally:
            state.done[op.seq].set()

    async def other_user_ask(self, op: Op) -> None:
        """Another user's conversation under the same session id knows no name."""
        tag = f"#{op.index}"
        prompt = f"What is my name? {tag}"

        await self.expect_run(
            op,
            op.kind,
            prompt,
            succeeds("I don't know your name."),
            ran=str(op.index),
            session=session_id(op.session),
            headers={**OTHER_AUTH, "Content-Type": "application/json"},
        )

    async def _session_step(self, op: Op, sub: str, state: SessionState) -> None:
        sid = session_id(op.session)
        tag = f"#{op.index}"
        if sub == "name":
            await self._tell_name(op, sid, state, tag)
        elif sub == "hang":
            label, _ = await self.expect_run(
                op,
                op.kind,
                f"[[fake:{op.arg}]] {tag}",
                times_out,
                session=sid,
                timeout_ms=op.timeout_ms,
            )
            if label == "200 timedOut (partial)":
                state.has_record = True
            elif not state.has_record:
                state.has_record = None  # timed out while waiting for a slot: maybe no actor
        elif sub == "delete":
            await self.delete(op, op.kind, sid, state, expect_closed=state.has_record)
        elif sub == "delete_midturn":
            await self.delete_midturn(op, sid, state, tag)
        elif sub == "queued_cancel":
            await self.queued_cancel(op, sid, state, tag)
        else:
            prompt, expect, recorded = self._turn(op, sub, state, tag)
            label, _ = await self.expect_run(
                op, op.kind, prompt, expect, session=sid, ran=str(op.index)
            )
            if label == recorded:
                state.has_record = True

    @staticmethod
    def _turn(op: Op, sub: str, state: SessionState, tag: str) -> tuple[str, Expect, str]:
        """A session turn: (its prompt, what its reply must be, the label that proves the
        session now has a record)."""
        if sub == "ask":
            expected = f"Your name is {state.name}." if state.name else "I don't know your name."
            return (
                f"What is my name? {tag}",
                succeeds(expected if state.known else None),
                ("200 success"),
            )
        if sub == "echo":
            prompt = f"tell me something {tag}"
            return prompt, succeeds(f"echo: {prompt}"), "200 success"
        if sub == "crash":
            return f"[[fake:crash:{op.arg}]] {tag}", fails(502, f"exited with code {op.arg}"), "502"
        if sub == "error":
            return f"[[fake:error]] {tag}", error_result, "200 failure"
        raise AssertionError(sub)

    async def _tell_name(self, op: Op, sid: str, state: SessionState, tag: str) -> None:
        reply = f"Nice to meet you, {op.arg}."
        label, body = await self.expect_run(
            op,
            op.kind,
            f"My name is {op.arg}. {tag}",
            succeeds(reply),
            session=sid,
            ran=str(op.index),
        )
        if label == "200 success" and body["output"] == reply:
            state.name, state.known, state.has_record = op.arg, True, True
        else:
            state.known = False
            state.has_record = None if not state.has_record else True

    async def delete(
        self, op: Op, kind: str, sid: str, state: SessionState, expect_closed: bool | None
    ) -> None:
        self.report.tally.http_requests += 1
        started = time.monotonic()
        reply = None
        with trio.move_on_after(HTTP_TIMEOUT_S):
            reply = await self.client.request(
                "DELETE", "/session", json={"sessionId": sid}, headers=JSON_HEADERS
            )
        elapsed = time.monotonic() - started
        if reply is None:
            self.outcome(kind, "no reply", elapsed)
            self.unexpected(op, "DELETE: no reply")
            state.known, state.has_record = False, None
            return
        label, body, problem = check_shape(reply)
        self.outcome(kind, f"DELETE {label}", elapsed)
        if problem is None:
            if reply.status_code == 200 and body != {"closed": True}:
                problem = "200 body is not {'closed': true}"
            elif reply.status_code not in (200, 404):
                problem = "expected 200 or 404"
            elif expect_closed is True and reply.status_code != 200:
                problem = "the session had a conversation: expected 200"
            elif expect_closed is False and reply.status_code != 404:
                problem = "the session had no conversation: expected 404"
        if problem is not None:
            self.unexpected(op, f"DELETE {problem} [HTTP {reply.status_code} {_short(body)}]")
        # A new conversation from now on.
        state.name, state.known, state.has_record = None, problem is None, False
        self.last_delete_seq[op.session] = op.seq

    async def wait_session_busy(self, sid: str, bound: float = 20.0) -> bool:
        """Poll /status until session ``sid`` (of the main user) runs a turn."""
        with trio.move_on_after(bound):
            while True:
                self.report.tally.http_requests += 1
                reply = await self.client.get("/status", headers=AUTH)
                if any(s["id"] == sid and s["state"] == "busy" for s in reply.json()["sessions"]):
                    return True
                await trio.sleep(0.03)
        return False

    async def delete_midturn(self, op: Op, sid: str, state: SessionState, tag: str) -> None:
        """DELETE while a turn runs: the turn answers success false, the session is gone."""
        kind = op.kind
        async with trio.open_nursery() as nursery:

            def check(label: str, body: Any) -> str | None:
                if label != "200 failure":
                    return f"turn of a deleted session: expected 200 failure, got {label}"
                return None

            nursery.start_soon(
                lambda: self.expect_run(op, kind, f"[[fake:slow:30:0.1]] {tag}", check, session=sid)
            )
            if not await self.wait_session_busy(sid):
                self.unexpected(op, "the 3 s turn was never seen busy in /status")
            await trio.sleep(op.cancel_after_s)
            await self.delete(op, kind, sid, state, expect_closed=True)

    async def queued_cancel(self, op: Op, sid: str, state: SessionState, tag: str) -> None:
        """A turn queued behind a running one, abandoned by its client: the first is fine."""
        kind = op.kind
        first = f"[[fake:slow:10:0.1]] {tag}a"
        check = succeeds("".join(f"piece {n}" for n in range(1, 11)))
        async with trio.open_nursery() as nursery:

            async def run_first() -> None:
                label, _ = await self.expect_run(
                    op, kind, first, check, session=sid, ran=f"{op.index}a"
                )
                if label == "200 success":
                    state.has_record = True

            nursery.start_soon(run_first)
            # Behind a running turn (0.9 s), the second one surely waits in the session's queue.
            busy = await self.wait_session_busy(sid)
            await self.disconnecting_run(
                op,
                "session:queued_cancel(2nd)" if busy else "session:queued_cancel(2nd, unsure)",
                f"queued then gone {tag}b",
                f"{op.index}b",
                op.cancel_after_s,
                session=sid,
            )


# --- the soak --------------------------------------------------------------------------


async def _health(client: httpx.AsyncClient) -> tuple[int, dict]:
    reply = await client.get("/health")
    return reply.status_code, reply.json()


async def _pool_full(client: httpx.AsyncClient) -> tuple[bool, dict]:
    code, body = await _health(client)
    workers, queue = body["workers"], body["queue"]
    full = (
        code == 200
        and body["status"] == "ok"
        and workers["ready"] == POOL_SIZE
        and workers["busy"] == workers["starting"] == workers["error"] == 0
        and queue["length"] == 0
    )
    return full, body


async def _warm_up(service: RunningService, client: httpx.AsyncClient, runner: Runner) -> None:
    with trio.fail_after(WARM_TIMEOUT_S):
        while not (await _pool_full(client))[0]:
            await trio.sleep(0.05)

    def echo(prompt: str) -> Expect:
        return lambda label, body: (
            None if label == "200 success" and body["output"] == f"echo: {prompt}" else "warm-up"
        )

    async with trio.open_nursery() as nursery:
        for n in range(POOL_SIZE * 2):
            prompt = f"warm-up #w{n}"
            nursery.start_soon(lambda p=prompt: runner.expect_run(None, "warm-up", p, echo(p)))
        prompt = "warm-up session #ws"
        nursery.start_soon(
            lambda: runner.expect_run(None, "warm-up", prompt, echo(prompt), session="soak-warm")
        )
    reply = await client.request(
        "DELETE", "/session", json={"sessionId": "soak-warm"}, headers=JSON_HEADERS
    )
    runner.report.tally.http_requests += 1
    if reply.status_code != 200:
        runner.unexpected(None, f"DELETE soak-warm: HTTP {reply.status_code} {reply.text[:200]}")
    with trio.fail_after(WARM_TIMEOUT_S):
        while not (await _pool_full(client))[0]:
            await trio.sleep(0.05)


async def _monitor(
    service: RunningService, tracker: FakeTracker, report: SoakReport, stop: trio.Event
) -> None:
    """Sample live fakes often and /health now and then until ``stop``."""
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        next_health = 0.0
        while not stop.is_set():
            tracker.sample()
            now = trio.current_time()
            if now >= next_health:
                next_health = now + HEALTH_INTERVAL_S
                with trio.move_on_after(10) as scope:
                    try:
                        code, body = await _health(client)
                    except (httpx.HTTPError, ValueError) as exc:
                        report.problems.append(f"/health during load failed: {exc!r}")
                        code, body = 0, {}
                if scope.cancelled_caught:
                    report.problems.append("/health during load took over 10 s")
                elif body:
                    report.health_statuses[f"{code} {body.get('status')}"] += 1
                    report.max_queue_seen = max(report.max_queue_seen, body["queue"]["length"])
                    if code != 200:
                        report.problems.append(f"/health during load: {code} {_short(body)}")
            with trio.move_on_after(MONITOR_INTERVAL_S):
                await stop.wait()
        tracker.sample()


async def _observe_rest(client: httpx.AsyncClient, runner: Runner, tracker: FakeTracker) -> AtRest:
    """After the load, record what the audit checks; each wait has its bound."""
    rest = AtRest()
    started = time.monotonic()
    with trio.move_on_after(RECOVER_TIMEOUT_S):
        while not (full := await _pool_full(client))[0]:
            rest.health = full[1]
            await trio.sleep(0.1)
        rest.recover_s = time.monotonic() - started
        rest.health = full[1]
    await _settle(client, rest)
    rest.deleted = [*runner.deleted_last(), "soak-warm"]
    # Retired processes gone: exactly one per worker and one per live session remain.
    expected = POOL_SIZE + rest.live_sessions
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while len(tracker.live()) != expected:
            await trio.sleep(0.1)
    rest.live_fakes = [(pid, state, parent_of(pid)) for pid, state, _ in tracker.live()]
    return rest


async def _settle(client: httpx.AsyncClient, rest: AtRest) -> None:
    """Wait until sessions are idle and counters stable (a session reports its last turn
    when idle again); the last /status of each user into ``rest``."""
    previous = None
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while True:
            rest.status = (await client.get("/status", headers=AUTH)).json()
            rest.other_status = (await client.get("/status", headers=OTHER_AUTH)).json()
            sessions = rest.status["sessions"] + rest.other_status["sessions"]
            states = [s["state"] for s in sessions]
            key = (rest.status["totalProcessed"], rest.status["totalErrors"], tuple(states))
            if all(s in ("live", "hibernated") for s in states) and key == previous:
                rest.settled = True
                return
            previous = key
            await trio.sleep(0.3)


def _read_turn_log(path: Path, runner: Runner) -> None:
    """The fake's turns, counted by prompt tag; what the abandoned requests became."""
    report = runner.report
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "turn":
            report.turns_logged += 1
            report.turn_counts.update(TAG_RE.findall(record.get("prompt", "")))
    report.must_have_run = set(runner.must_have_run)
    for tag, kind in runner.cancelled_tags.items():
        ran = report.turn_counts[tag] > 0
        report.disconnects[f"{kind}: {'reached the agent' if ran else 'never ran'}"] += 1


async def soak(
    requests: int,
    concurrency: int,
    workdir: Path,
    *,
    seed: int = DEFAULT_SEED,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """Run the soak against a fresh service in ``workdir``; see the module docstring."""
    workdir = Path(workdir)
    plan = make_plan(requests, seed)
    report = SoakReport(requests=requests, concurrency=concurrency, seed=seed)
    tracker = FakeTracker(workdir / "pids")
    load_deadline_s = 120 + 1.0 * requests
    limits = httpx.Limits(
        max_connections=2 * concurrency + 8, max_keepalive_connections=2 * concurrency + 8
    )
    watch = LogWatch()
    async with launch_service(
        service_env(workdir), start_timeout_s=START_TIMEOUT_S, log_lines=500, on_log_line=watch
    ) as service:
        try:
            async with httpx.AsyncClient(
                base_url=service.url,
                timeout=httpx.Timeout(HTTP_TIMEOUT_S, connect=10.0),
                limits=limits,
            ) as client:
                turn_log = TurnLog(workdir / "fake.log")
                runner = Runner(report, client, plan, turn_log)
                started = time.monotonic()
                await _warm_up(service, client, runner)
                report.warmup_s = time.monotonic() - started
                report.rss_before_kib = rss_kib(service, "VmRSS")

                stop_monitor = trio.Event()
                meter = QuietMeter(service.pid)
                async with trio.open_nursery() as side:
                    side.start_soon(_monitor, service, tracker, report, stop_monitor)
                    side.start_soon(turn_log.follow)
                    started = time.monotonic()
                    await _load(runner, plan, concurrency, load_deadline_s, progress)
                    report.duration_s = time.monotonic() - started
                    report.quiet_line, report.others_cpu_share = meter.report()
                    stop_monitor.set()
                    side.cancel_scope.cancel()
                report.max_live_fakes = tracker.max_live
                report.max_live_fakes_at_s = tracker.max_live_at
                report.rest = await _observe_rest(client, runner, tracker)
                report.rss_after_kib = rss_kib(service, "VmRSS")
                report.hwm_after_kib = rss_kib(service, "VmHWM")
        finally:
            with trio.CancelScope(shield=True):
                await _stop(service, report)
                _find_orphans(tracker, report)
    report.log_problems = list(watch.problems)
    report.sdk_fault_lines = watch.sdk_fault_lines
    report.fake_starts = tracker.total_started()
    _read_turn_log(workdir / "fake.log", runner)
    return report


async def _load(
    runner: Runner,
    plan: list[Op],
    concurrency: int,
    deadline_s: float,
    progress: Callable[[str], None] | None,
) -> None:
    limiter = trio.CapacityLimiter(concurrency)
    report = runner.report
    started = time.monotonic()

    async def one(op: Op) -> None:
        try:
            if op.session is not None:
                await runner.session_op(op)
            else:
                await runner.one_shot(op)
            report.completed_ops += 1
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            runner.unexpected(op, f"client error {exc!r}")
            if op.session is not None and op.kind != "session:other_user_ask":
                runner.sessions[op.session].known = False
        finally:
            limiter.release_on_behalf_of(op.index)

    async def report_progress() -> None:
        while True:
            await trio.sleep(10)
            progress(
                f"  {time.monotonic() - started:5.0f} s: {report.completed_ops}/{len(plan)} done, "
                f"{len(report.unexpected)} unexpected"
            )

    with trio.move_on_after(deadline_s) as scope:
        async with trio.open_nursery() as nursery:
            if progress is not None:
                nursery.start_soon(report_progress)
            async with trio.open_nursery() as ops:
                for op in plan:
                    await limiter.acquire_on_behalf_of(op.index)
                    ops.start_soon(one, op)
            nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        report.problems.append(
            f"load did not finish within {deadline_s:.0f} s: {report.completed_ops}/{len(plan)} done"
        )


async def _stop(service: RunningService, report: SoakReport) -> None:
    started = time.monotonic()
    report.exit_code = await service.stop(signal.SIGTERM, STOP_TIMEOUT_S)
    if report.exit_code is not None:  # None: still running after STOP_TIMEOUT_S, killed
        report.shutdown_s = time.monotonic() - started


def _find_orphans(tracker: FakeTracker, report: SoakReport) -> None:
    """Fake processes alive (or zombie) after the service exited; then end them, by pid."""
    for pid, state, _ in tracker.live():
        report.orphans.append(f"pid {pid} state {state} parent {parent_of(pid)}")
        if state != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# --- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="operations to send")
    parser.add_argument("--concurrency", type=int, default=16, help="operations at once")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the plan")
    parser.add_argument("--workdir", type=Path, help="keep the service's files here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--requests and --concurrency must be at least 1")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def run(workdir: Path) -> SoakReport:
        return await soak(
            args.requests, args.concurrency, workdir, seed=args.seed, progress=progress
        )

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = trio.run(run, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            report = trio.run(run, Path(tmp))
    print(report.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
