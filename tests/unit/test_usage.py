"""usage.py: prices, reading a model answer's usage as it passes, the ledger and its day."""

from __future__ import annotations

import json

import pytest

from claude_code_api.agent.protocol import Charge
from claude_code_api.limits.usage import UsageLedger, UsageReader, price

DAY = 86400.0


def test_prices_by_model_family_with_cache_writes_and_reads():
    usage = {
        "input_tokens": 1_000_000,
        "output_tokens": 1_000_000,
        "cache_creation_input_tokens": 1_000_000,
        "cache_read_input_tokens": 1_000_000,
    }
    assert price("claude-sonnet-4-6", usage) == pytest.approx(3 + 15 + 3.75 + 0.3)
    assert price("claude-opus-4-1-20250805", {"output_tokens": 1_000_000}) == 75
    assert price("claude-opus-4-5", {"output_tokens": 1_000_000}) == 25
    assert price("claude-haiku-4-5", {"input_tokens": 1_000_000}) == 1
    assert price("claude-3-5-haiku-latest", {"input_tokens": 1_000_000}) == 0.8
    assert price("made-up", {"input_tokens": 1_000_000}) == 3  # as Sonnet
    one_hour = {
        "cache_creation_input_tokens": 1_000_000,
        "cache_creation": {"ephemeral_1h_input_tokens": 1_000_000},
    }
    assert price("claude-sonnet-4-6", one_hour) == 6
    assert price("claude-sonnet-4-6", {"input_tokens": True, "output_tokens": -5}) == 0


def events(*pairs: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in pairs)


def test_a_streams_usage_is_read_across_chunk_boundaries():
    stream = events(
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "model": "claude-sonnet-4-6",
                    "usage": {"input_tokens": 10, "output_tokens": 1},
                },
            },
        ),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "x" * 100_000}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}}),
    )
    reader = UsageReader()
    reader.start(200, "text/event-stream; charset=utf-8")
    for at in range(0, len(stream), 7):
        reader.feed(stream[at : at + 7])
    assert reader.seen and reader.model == "claude-sonnet-4-6"
    assert reader.usage == {"input_tokens": 10, "output_tokens": 42}


def test_a_json_answers_usage_and_an_error_counts_nothing():
    answer = json.dumps({"model": "claude-haiku-4-5", "usage": {"input_tokens": 3}}).encode()
    reader = UsageReader()
    reader.start(200, "application/json")
    reader.feed(answer[:5])
    reader.feed(answer[5:])
    assert reader.usage == {"input_tokens": 3} and reader.model == "claude-haiku-4-5"
    failed = UsageReader()
    failed.start(529, "application/json")
    failed.feed(b'{"usage": {"input_tokens": 3}}')
    assert not failed.seen


def test_the_budget_is_per_user_and_frees_at_midnight_utc():
    now = [10 * DAY + 3600.0]  # 01:00 UTC
    ledger = UsageLedger(budget_usd=1.0, clock=lambda: now[0])
    alice = Charge("alice", "run-1")
    ledger.record(alice, "claude-sonnet-4-6", {"output_tokens": 70_000})  # $1.05
    assert ledger.over_budget("alice") and not ledger.over_budget("bob")
    assert ledger.refusal(Charge("bob", "run-2")) is None
    status, body, headers = ledger.refusal(Charge("alice", "run-3")) or (0, b"", [])
    assert status == 429 and b"USER_DAILY_BUDGET_USD" in body
    assert dict(headers)[b"retry-after"] == b"82800"  # 23 hours
    assert ledger.user_status("alice")["overBudget"] is True
    assert ledger.users_over_budget() == 1
    spend, refused = ledger.take_run("run-1")
    assert spend is not None and spend.cost_usd == pytest.approx(1.05) and not refused
    assert ledger.take_run("run-3") == (None, True)
    now[0] = 11 * DAY + 1.0  # the next day
    assert not ledger.over_budget("alice") and ledger.user_status("alice")["costUsd"] == 0


def test_without_a_budget_nobody_is_refused():
    ledger = UsageLedger()
    ledger.record(Charge("alice", "r"), "claude-opus-4-1", {"output_tokens": 10**9})
    assert not ledger.over_budget("alice") and ledger.refusal(Charge("alice", "s")) is None
    assert "remainingUsd" not in ledger.user_status("alice")
