"""What each user and each run spent on the model, counted from the model API's own answers.

The model proxy (:mod:`claude_code_api.proxy.model`) reads every ``POST
/v1/messages`` answer on its way back to the agent (:class:`UsageReader`: the
``usage`` of a JSON answer, or of a stream's ``message_start`` and
``message_delta`` events) and hands it to the :class:`UsageLedger`, against the
user and run the agent works for. This is the service's authoritative count: an
agent's stdout (the CLI's ``total_cost_usd``) is the agent's to forge, the model
API's answers are not.

Cost is priced here from the tokens (:func:`price`, US dollars per million tokens
by model family, as Anthropic lists them; cache writes at 1.25x the input price
for 5 minutes and 2x for an hour, cache reads at 0.1x). A model the table does not
know is priced as Sonnet, and said once in the log.

Budgets (``USER_DAILY_BUDGET_USD``): per user id and **calendar day in UTC**. A
user whose spend today has reached the budget gets 429 with ``Retry-After`` (the
seconds until 00:00 UTC) for new work, and the proxy refuses their running
turns' next model calls (:meth:`UsageLedger.refusal`). A call already under way
when the budget is reached finishes: the budget can be overrun by the calls in
flight at that moment.

Nothing here awaits or does I/O; the ledger lives in the service's memory (a
restart starts the day's count again from zero: see README).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ..agent.protocol import Charge
from ..messages import JobFailed
from ..observe import metrics

log = logging.getLogger(__name__)

MILLION = 1_000_000
# (input, output) US dollars per million tokens, by the first pattern matching the model.
PRICES: tuple[tuple[re.Pattern[str], float, float], ...] = (
    (re.compile(r"opus-4-(?:[5-9]|\d\d)"), 5.0, 25.0),
    (re.compile(r"opus"), 15.0, 75.0),
    (re.compile(r"sonnet"), 3.0, 15.0),
    (re.compile(r"haiku-4"), 1.0, 5.0),
    (re.compile(r"3-5-haiku|haiku-3-5"), 0.8, 4.0),
    (re.compile(r"haiku"), 0.25, 1.25),
)
UNKNOWN_MODEL_PRICE = (3.0, 15.0)  # Sonnet's
CACHE_WRITE_5M, CACHE_WRITE_1H, CACHE_READ = 1.25, 2.0, 0.1
# The token counts of a usage, as runs report them (the model API's names).
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Runs whose usage was never taken (a tool's calls after the turn) are forgotten past this.
RUNS_KEPT = 10_000
# A JSON answer longer than this is passed on but not read for its usage.
MAX_JSON_BYTES = 32 * 1024 * 1024
# An event-stream line longer than this is not a usage event: skipped, not kept.
MAX_EVENT_LINE = 64 * 1024

_unknown_models: set[str] = set()


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def price(model: str | None, usage: Mapping[str, Any]) -> float:
    """What ``usage`` (the model API's ``usage`` object) of ``model`` costs, in US dollars."""
    input_price, output_price = _prices(model)
    written = _count(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    one_hour = _count(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else 0
    one_hour = min(one_hour, written)
    cost = (
        _count(usage.get("input_tokens")) * input_price
        + _count(usage.get("output_tokens")) * output_price
        + (written - one_hour) * input_price * CACHE_WRITE_5M
        + one_hour * input_price * CACHE_WRITE_1H
        + _count(usage.get("cache_read_input_tokens")) * input_price * CACHE_READ
    )
    return cost / MILLION


def _prices(model: str | None) -> tuple[float, float]:
    """(input, output) US dollars per million tokens of ``model``."""
    name = (model or "").lower()
    for pattern, input_price, output_price in PRICES:
        if pattern.search(name):
            return input_price, output_price
    if name not in _unknown_models and len(_unknown_models) < 100:
        _unknown_models.add(name)
        log.warning("usage: no price known for model %r: priced as Sonnet", model)
    return UNKNOWN_MODEL_PRICE


class UsageReader:
    """Reads the usage of one model answer from its bytes as they pass, changing nothing.

    ``start`` with the answer's status and content type, ``feed`` every chunk;
    ``seen`` once a usage was read, then ``model`` and ``usage`` (the token counts
    so far: a stream cut short counts what its events had reported).
    """

    def __init__(self) -> None:
        self.model: str | None = None
        self.usage: dict[str, Any] = {}
        self.seen = False
        self._mode: str | None = None
        self._buffer = bytearray()
        self._skipping = False

    def start(self, status: int, content_type: str) -> None:
        if status != 200:
            self._mode = None
        elif content_type.startswith("text/event-stream"):
            self._mode = "events"
        elif "json" in content_type:
            self._mode = "json"

    def feed(self, chunk: bytes) -> None:
        if self._mode == "events":
            self._feed_events(chunk)
        elif self._mode == "json":
            self._buffer += chunk
            if len(self._buffer) > MAX_JSON_BYTES:
                self._mode, self._buffer = None, bytearray()
                return
            try:
                answer = json.loads(self._buffer)
            except ValueError:
                return  # not all of it yet
            self._buffer = bytearray()
            if isinstance(answer, dict):
                self._take(answer.get("model"), answer.get("usage"))

    def _feed_events(self, chunk: bytes) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not self._skipping:
                    self._buffer += chunk[start:]
                    if len(self._buffer) > MAX_EVENT_LINE:
                        self._buffer, self._skipping = bytearray(), True
                return
            if not self._skipping:
                self._buffer += chunk[start:end]
                self._line(bytes(self._buffer))
            self._buffer, self._skipping = bytearray(), False
            start = end + 1

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        head = line[:80]
        if b'"message_start"' not in head and b'"message_delta"' not in head:
            return
        try:
            event = json.loads(line[5:])
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            self._take(message.get("model"), message.get("usage"))
        elif event.get("type") == "message_delta":
            self._take(None, event.get("usage"))

    def _take(self, model: object, usage: object) -> None:
        if isinstance(model, str) and model:
            self.model = model
        if isinstance(usage, dict):
            # A delta's counts are the answer's totals so far: they replace the earlier ones.
            self.usage.update({k: v for k, v in usage.items() if v is not None})
            self.seen = True


@attrs.define
class Spend:
    """Cost and token counts, added up."""

    cost_usd: float = 0.0
    tokens: dict[str, int] = attrs.Factory(dict)
    calls: int = 0

    def add(self, cost: float, usage: Mapping[str, Any]) -> None:
        self.cost_usd += cost
        self.calls += 1
        for name in TOKEN_FIELDS:
            self.tokens[name] = self.tokens.get(name, 0) + _count(usage.get(name))


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_midnight(now: float) -> float:
    return 86400.0 - (now % 86400.0)


class UsageLedger:
    """Each user's spend today (UTC) and each run's, and the daily budget that limits users.

    ``budget_usd``: ``USER_DAILY_BUDGET_USD`` (None: no budget). ``clock``: wall time.
    """

    def __init__(
        self, budget_usd: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.budget_usd = budget_usd
        self._clock = clock
        self._day = utc_day(clock())
        self._users: dict[str, Spend] = {}
        self._runs: collections.OrderedDict[str, Spend] = collections.OrderedDict()
        self._refused_runs: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.refusals = 0

    def _roll(self) -> float:
        now = self._clock()
        day = utc_day(now)
        if day != self._day:
            self._day, self._users = day, {}
        return now

    def record(self, charge: Charge | None, model: str | None, usage: Mapping[str, Any]) -> float:
        """Count one model answer's ``usage`` against ``charge``; returns its cost."""
        self._roll()
        cost = price(model, usage)
        if charge is not None:
            self._users.setdefault(charge.user_id, Spend()).add(cost, usage)
            run = self._runs.get(charge.run_id)
            if run is None:
                run = self._runs[charge.run_id] = Spend()
                while len(self._runs) > RUNS_KEPT:
                    self._runs.popitem(last=False)
            run.add(cost, usage)
        return cost

    def spent_today(self, user_id: str) -> float:
        self._roll()
        spend = self._users.get(user_id)
        return 0.0 if spend is None else spend.cost_usd

    def over_budget(self, user_id: str) -> bool:
        return self.budget_usd is not None and self.spent_today(user_id) >= self.budget_usd

    def retry_after_s(self) -> int:
        """Seconds until the budget frees (the next day, UTC), rounded up."""
        return max(1, math.ceil(seconds_to_midnight(self._clock())))

    def budget_message(self) -> str:
        return (
            f"your daily model budget of ${self.budget_usd:g} (USER_DAILY_BUDGET_USD) is spent;"
            " it frees at 00:00 UTC"
        )

    def refusal(self, charge: Charge) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """The proxy's answer to a model call of ``charge`` when its user is over budget."""
        if not self.over_budget(charge.user_id):
            return None
        self.refusals += 1
        metrics.budget_refused()
        self._refused_runs[charge.run_id] = None
        while len(self._refused_runs) > RUNS_KEPT:
            self._refused_runs.popitem(last=False)
        log.warning(
            "usage: refused a model call of user %s (run %s): daily budget spent",
            charge.user_id,
            charge.run_id,
        )
        body = json.dumps(
            {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": self.budget_message()},
            }
        ).encode()
        headers = [
            (b"retry-after", str(self.retry_after_s()).encode()),
            (b"x-should-retry", b"false"),
        ]
        return 429, body, headers

    def take_run(self, run_id: str) -> tuple[Spend | None, bool]:
        """What ``run_id`` spent (None: no model answer counted), and whether a call was refused.

        Taken once, when the run is answered.
        """
        refused = self._refused_runs.pop(run_id, False) is None
        return self._runs.pop(run_id, None), refused

    def user_status(self, user_id: str) -> dict[str, Any]:
        """``/status``'s ``usage`` for ``user_id``: today's spend and the budget."""
        now = self._roll()
        spend = self._users.get(user_id) or Spend()
        body: dict[str, Any] = {
            "day": self._day,
            "costUsd": round(spend.cost_usd, 6),
            "tokens": {name: spend.tokens.get(name, 0) for name in TOKEN_FIELDS},
            "modelCalls": spend.calls,
            "dailyBudgetUsd": self.budget_usd,
        }
        if self.budget_usd is not None:
            body["remainingUsd"] = round(max(self.budget_usd - spend.cost_usd, 0.0), 6)
            body["overBudget"] = spend.cost_usd >= self.budget_usd
            body["resetsAt"] = round((now + seconds_to_midnight(now)) * 1000)
        return body

    def users_over_budget(self) -> int:
        if self.budget_usd is None:
            return 0
        self._roll()
        return sum(1 for spend in self._users.values() if spend.cost_usd >= self.budget_usd)


def run_usage(spend: Spend) -> dict[str, int]:
    """A run's token counts as a run's ``usage`` reports them."""
    return {name: spend.tokens.get(name, 0) for name in TOKEN_FIELDS}


def budget_refusal(ledger: UsageLedger, user_id: str) -> JobFailed | None:
    """The answer to new work of ``user_id`` when their daily budget is spent (429)."""
    if not ledger.over_budget(user_id):
        return None
    return JobFailed(429, ledger.budget_message(), retry_after_s=ledger.retry_after_s())
