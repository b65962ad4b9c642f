"""Prometheus metrics: the objects, the few points that feed them, and the scrape.

Counters and histograms live here, at module level as prometheus-client's users
keep them, in this module's own :data:`REGISTRY` (with the process, platform and
garbage-collector collectors beside them, so nothing another library registers in
prometheus-client's global registry leaks into the scrape). They are fed at a
few points, each a plain function call that never awaits:

* :meth:`~claude_code_api.messages.Job.answer` — every job's one terminal event
  (:func:`run_answered`): ``run_duration_seconds`` by ``outcome``, and from a
  turn's result ``cost_usd_total`` and ``tokens_total`` (by ``type``, and by
  ``user`` only with ``METRICS_PER_USER=1``: :func:`set_per_user`) — the model
  proxy's count of the run's model calls (:mod:`claude_code_api.limits.usage`);
* the model proxy's budget check (:func:`budget_refused`): ``budget_refusals_total``;
* :func:`~claude_code_api.actors.turn.run_turn` — a job reaching its agent
  (:func:`run_started`): ``queue_wait_seconds``;
* :mod:`claude_code_api.agent.metered` — every agent's start and failure:
  ``warmup_seconds``, ``agent_failures_total`` by ``reason``;
* the worker pool supervisor's restarts (:func:`worker_restarted`), session
  actors that resume a hibernated session (:func:`session_woke`) and the
  registry's evictions of hibernated sessions (:func:`session_evicted`), and the
  releases of the disk reserve (:func:`disk_reserve_released`, disk_reserve.py);
* the HTTP layer (:mod:`claude_code_api.http.observe`): ``http_requests_total``
  and ``http_request_duration_seconds``.

The gauges (``queue_length``, ``workers``, ``sessions``) are not fed at all: a
scrape computes them from the dispatcher's snapshot and the registry's record
count (:mod:`claude_code_api.http.observe`), so they cost nothing between scrapes
and are exact when read.

``METRICS=0`` turns the feeding off (:func:`set_enabled`): every function here
returns at once, and the HTTP layer and agents are not wrapped at all.

User ids are often e-mail addresses, and a scrape may be read by anyone who can
reach it: by default no series carries a user id (the cost and tokens are the
service's totals); :func:`set_per_user` (``METRICS_PER_USER=1``) adds the ``user`` label.

Error handling: nothing here raises for a value it is given; a result without
cost or usage simply adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX = "claude_code_api_"
# The classic text format (every Prometheus reads it; our names need none of 1.0.0's escapes).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# The one switch: set from METRICS at start-up (the service's settings).
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Feed the metrics (True, the default) or not (``METRICS=0``)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


# The `*_created` series (each counter's creation time) double a scrape for nothing an
# operator reads; Prometheus itself notices counter resets.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
for _standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_standard)

# A run lasts from milliseconds (a refusal) to the longest timeout (an hour by default).
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
WARMUP_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)

RUN_OUTCOMES = ("ok", "agent_error", "timeout", "cancelled", "stopped", "failed")
FAILURE_REASONS = ("exit", "protocol", "warmup")
# The token counts a turn's usage reports, and the `type` each is counted as.
TOKEN_TYPES = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_creation_input_tokens": "cache_creation",
    "cache_read_input_tokens": "cache_read",
}

QUEUE_WAIT = Histogram(
    PREFIX + "queue_wait_seconds",
    "Time from a run's submission until an agent starts on it (one-shot and session runs)",
    buckets=QUEUE_BUCKETS,
    registry=REGISTRY,
)
RUN_DURATION = Histogram(
    PREFIX + "run_duration_seconds",
    "Time from a run's submission to its answer (queue wait included), by outcome: ok,"
    " agent_error (the agent ended its turn with an error), timeout, cancelled (the client"
    " left or cancelled), stopped (cut short by the service stopping), failed (the service"
    " could not run it: 429, 502, 503, 507)",
    ["outcome"],
    buckets=RUN_BUCKETS,
    registry=REGISTRY,
)
WARMUP = Histogram(
    PREFIX + "warmup_seconds",
    "Time an agent process took to start and answer initialize (workers' and sessions')",
    buckets=WARMUP_BUCKETS,
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    PREFIX + "worker_restarts",
    "Pool workers restarted by their supervisor after a failure (a failed warm-up, a crash)",
    registry=REGISTRY,
)
AGENT_FAILURES = Counter(
    PREFIX + "agent_failures",
    "Agent processes that failed, by reason: exit (died mid-turn or while idle), protocol"
    " (broke the protocol mid-turn), warmup (did not start or answer initialize)",
    ["reason"],
    registry=REGISTRY,
)
SESSION_WAKEUPS = Counter(
    PREFIX + "session_wakeups",
    "Hibernated sessions started again for a turn (after idling, eviction or a restart)",
    registry=REGISTRY,
)
BUDGET_REFUSALS = Counter(
    PREFIX + "budget_refusals",
    "Model calls the model proxy refused because their user's daily budget"
    " (USER_DAILY_BUDGET_USD) was spent",
    registry=REGISTRY,
)
SESSIONS_EVICTED = Counter(
    PREFIX + "sessions_evicted",
    "Hibernated sessions deleted (with their transcripts) to make room for a new session of"
    " a user at MAX_SESSIONS_PER_USER, the least recently used first",
    registry=REGISTRY,
)
DISK_RESERVE_RELEASED = Counter(
    PREFIX + "disk_reserve_released",
    "Times a quarter of the service's disk reserve (DISK_RESERVE_MB, held by a file in"
    " DATA_DIR) was given back because agents had filled the rest of the filesystem",
    registry=REGISTRY,
)


def _spend_counters(per_user: bool) -> tuple[Counter, Counter]:
    """The cost and tokens counters, registered; labelled by user only if ``per_user``."""
    by_user = ["user"] if per_user else []
    whose = ", by user id" if per_user else ""
    cost = Counter(
        PREFIX + "cost_usd",
        f"Cost in US dollars of the runs' model calls, as the model proxy counted them{whose}",
        by_user,
        registry=REGISTRY,
    )
    tokens = Counter(
        PREFIX + "tokens",
        f"Tokens of the runs' model calls, as the model proxy counted them{whose}, by type (input, output,"
        " cache_creation, cache_read)",
        [*by_user, "type"],
        registry=REGISTRY,
    )
    if not per_user:  # the service's totals exist from the first scrape
        for token_type in TOKEN_TYPES.values():
            tokens.labels(type=token_type)
    return cost, tokens


_per_user = False
COST, TOKENS = _spend_counters(_per_user)


def set_per_user(per_user: bool) -> None:
    """Label cost and tokens by user id (``METRICS_PER_USER=1``) or not (the default).

    Called once at start-up; a change starts both counters again from zero."""
    global _per_user, COST, TOKENS
    if per_user == _per_user:
        return
    REGISTRY.unregister(COST)
    REGISTRY.unregister(TOKENS)
    _per_user = per_user
    COST, TOKENS = _spend_counters(per_user)


def per_user() -> bool:
    return _per_user


HTTP_REQUESTS = Counter(
    PREFIX + "http_requests",
    "HTTP requests answered, by method, route pattern and status (499: the client left first)",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    PREFIX + "http_request_duration_seconds",
    "Time from a request's arrival to the end of its response (a stream's whole length),"
    " by route pattern",
    ["route"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)

# Every labelled series a fresh service has, at zero, so rates work from the first scrape.
for _outcome in RUN_OUTCOMES:
    RUN_DURATION.labels(_outcome)
for _reason in FAILURE_REASONS:
    AGENT_FAILURES.labels(_reason)


# --- feeding ----------------------------------------------------------------------------


def run_answered(
    user_id: str,
    seconds: float,
    outcome: str,
    cost_usd: float | None = None,
    usage: Mapping[str, Any] | None = None,
) -> None:
    """A run got its terminal answer ``seconds`` after submission; count what it reported."""
    if not _enabled:
        return
    RUN_DURATION.labels(outcome).observe(max(seconds, 0.0))
    whose = (user_id,) if _per_user else ()
    if cost_usd:
        (COST.labels(*whose) if whose else COST).inc(max(cost_usd, 0.0))
    if usage:
        for key, token_type in TOKEN_TYPES.items():
            count = usage.get(key)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                TOKENS.labels(*whose, token_type).inc(count)


def run_started(waited_s: float) -> None:
    """An agent started on a run that waited ``waited_s`` since its submission."""
    if _enabled:
        QUEUE_WAIT.observe(max(waited_s, 0.0))


def agent_started(seconds: float) -> None:
    if _enabled:
        WARMUP.observe(seconds)


def agent_failed(reason: str) -> None:
    """One of :data:`FAILURE_REASONS`."""
    if _enabled:
        AGENT_FAILURES.labels(reason).inc()


def budget_refused() -> None:
    if _enabled:
        BUDGET_REFUSALS.inc()


def worker_restarted(_name: str = "") -> None:
    if _enabled:
        WORKER_RESTARTS.inc()


def session_woke() -> None:
    if _enabled:
        SESSION_WAKEUPS.inc()


def session_evicted() -> None:
    if _enabled:
        SESSIONS_EVICTED.inc()


def disk_reserve_released() -> None:
    if _enabled:
        DISK_RESERVE_RELEASED.inc()


def http_answered(method: str, route: str, status: int, seconds: float) -> None:
    if _enabled:
        HTTP_REQUESTS.labels(method, route, str(status)).inc()
        HTTP_DURATION.labels(route).observe(seconds)


# --- the scrape ---------------------------------------------------------------------------


class _Scrape:
    """What one scrape shows: this module's registry, then the collectors of the moment."""

    def __init__(self, extra: Iterable[Collector]) -> None:
        self.extra = list(extra)

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        for collector in self.extra:
            yield from collector.collect()


def render(extra: Iterable[Collector] = ()) -> bytes:
    """The Prometheus text exposition of every metric, with ``extra`` collectors' too.

    Blocking (the process collector reads ``/proc``): run it in a thread.
    """
    return generate_latest(_Scrape(extra))
