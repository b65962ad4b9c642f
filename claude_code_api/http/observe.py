"""The HTTP side of the metrics: counting requests, and answering ``GET /metrics``.

:func:`count_requests` wraps the app (ASGI): for every HTTP request it counts
``http_requests_total`` by method, route and status and observes
``http_request_duration_seconds`` by route, from the request's arrival to the
end of its response (a stream's whole length). The route is the pattern the app
matched (``/runs/{runId}``), written into the request's ASGI scope by the app
(:func:`note_route`), never the raw path: a path no route matches counts as
``unmatched``, so clients cannot mint label values. Methods outside HTTP's own
are counted as ``other`` for the same reason.

:func:`scrape` renders a scrape: the counters and histograms of
:mod:`claude_code_api.observe.metrics`, and the gauges of the moment, computed from the
dispatcher's snapshot and the registry's record count (:class:`StateGauges`).
The text is rendered in a worker thread (the process collector reads
``/proc``), so a scrape never blocks the event loop, and it asks the dispatcher
(which never waits on anyone) for nothing but its snapshot.

Error handling: a request whose response never started — the client left, or
the service cancelled it — counts with status 499 (as nginx logs a client that
closed the connection first); one whose app raised counts as 500 and the
exception goes on. A dispatcher that does not answer within
:data:`SNAPSHOT_TIMEOUT_S` (it is restarting) leaves its gauges out of that scrape.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..limits.usage import UsageLedger
from ..messages import PoolSnapshot, SessionState, WorkerState
from ..observe import metrics

# Where the app writes the matched route's pattern into a request's ASGI scope.
ROUTE_KEY = "claude_code_api.route"
UNMATCHED = "unmatched"
CLIENT_GONE_STATUS = 499
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
SNAPSHOT_TIMEOUT_S = 2.0

AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]

_RULE_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def route_pattern(rule: str) -> str:
    """A Quart rule as the API writes a path: ``/runs/<run_id>`` -> ``/runs/{runId}``.

    Variables in camelCase, as the API names its fields (``runId``), whatever the
    handler's argument is called.
    """
    return _RULE_VARIABLE.sub(lambda match: "{" + _camel_case(match[1]) + "}", rule)


def _camel_case(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word[:1].upper() + word[1:] for word in rest)


def count_requests(app: AsgiApp) -> AsgiApp:
    """ASGI: count every HTTP request ``app`` answers; see the module docstring."""

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not metrics.enabled():
            await app(scope, receive, send)
            return
        began = time.perf_counter()
        status = CLIENT_GONE_STATUS

        async def noting_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, noting_status)
        except Exception:
            if status == CLIENT_GONE_STATUS:
                status = 500
            raise
        finally:
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            route = scope.get(ROUTE_KEY) or UNMATCHED
            metrics.http_answered(method, route, status, time.perf_counter() - began)

    return counted


def note_route(scope: Any, rule: str | None) -> None:
    """Tell :func:`count_requests` which route (a Quart rule) answered this request."""
    if rule is not None:
        scope[ROUTE_KEY] = _patterns.get(rule) or _patterns.setdefault(rule, route_pattern(rule))


_patterns: dict[str, str] = {}


class StateGauges:
    """The gauges of one scrape, computed from what the dispatcher and registry report.

    * ``queue_length``: one-shot runs waiting for a worker (``/health``'s ``queue.length``);
    * ``workers`` by ``state`` (starting, ready, busy, error, kept, dormant), summing to
      ``worker_count`` (``POOL_SIZE`` and its spares: ``Settings.spare_workers``): a
      worker that has not reported yet is ``starting``;
    * ``sessions`` by ``state``: ``busy`` (running a turn), ``live`` (holding a process
      slot otherwise: starting, idle, stopping), ``hibernated`` (a record and no
      process; those waiting for a slot are among them). Exact but for a moment while
      a new session's record is being created.
    """

    def __init__(self, snapshot: PoolSnapshot | None, worker_count: int, records: int | None):
        self.snapshot = snapshot
        self.worker_count = worker_count
        self.records = records

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return
        prefix = metrics.PREFIX
        yield GaugeMetricFamily(
            prefix + "queue_length",
            "One-shot runs waiting for a worker",
            value=snapshot.queue_length,
        )
        workers = {state.value: 0 for state in WorkerState}
        for worker in snapshot.workers:
            workers[worker.state.value] += 1
        workers[WorkerState.STARTING.value] += max(0, self.worker_count - len(snapshot.workers))
        family = GaugeMetricFamily(
            prefix + "workers",
            "Pool workers by state (starting, ready, busy, error; kept: an agent kept for its"
            " user; dormant: a spare with no process); they sum to POOL_SIZE and its spares",
            labels=["state"],
        )
        for state, count in workers.items():
            family.add_metric([state], count)
        yield family
        busy = sum(1 for view in snapshot.sessions if view.state is SessionState.BUSY)
        live = sum(
            1
            for view in snapshot.sessions
            if view.state in (SessionState.STARTING, SessionState.IDLE, SessionState.STOPPING)
        )
        family = GaugeMetricFamily(
            prefix + "sessions",
            "Sessions by state: busy (running a turn), live (holding a process otherwise),"
            " hibernated (a record and no process)",
            labels=["state"],
        )
        family.add_metric(["live"], live)
        family.add_metric(["busy"], busy)
        if self.records is not None:
            family.add_metric(["hibernated"], max(0, self.records - live - busy))
        yield family


class BudgetGauges:
    """``users_over_budget``: users whose daily budget (USER_DAILY_BUDGET_USD) is spent today.

    Only with a budget (an aggregate: no user id in it)."""

    def __init__(self, usage: UsageLedger | None) -> None:
        self.over = None if usage is None or usage.budget_usd is None else usage.users_over_budget()

    def collect(self) -> Iterable[Metric]:
        if self.over is not None:
            yield GaugeMetricFamily(
                metrics.PREFIX + "users_over_budget",
                "Users whose daily model budget (USER_DAILY_BUDGET_USD) is spent today (UTC)",
                value=self.over,
            )


async def scrape(
    snapshot: Callable[[], Awaitable[PoolSnapshot]],
    worker_count: int,
    records: int | None,
    usage: UsageLedger | None = None,
) -> bytes:
    """The text of ``GET /metrics``; ``snapshot()`` asks the dispatcher for its view."""
    seen: PoolSnapshot | None = None
    with trio.move_on_after(SNAPSHOT_TIMEOUT_S):
        seen = await snapshot()
    gauges: list[Collector] = [StateGauges(seen, worker_count, records), BudgetGauges(usage)]
    return await trio.to_thread.run_sync(metrics.render, gauges)
