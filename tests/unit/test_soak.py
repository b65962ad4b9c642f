"""Soak: the real service under a long mixed load with faults stays consistent.

A shorter run of ``bench/soak.py`` (see its docstring): one-shot, slow, crashing,
hanging, erroring and garbage-writing turns, clients that disconnect mid-run or
while queued, multi-turn sessions that must remember names across hibernation,
crashes and DELETEs, and bad input. The soak records what it saw; this test is its
audit: every reply as expected, then the pool back to full, the counters adding up
with what the clients saw, every fake process accounted for, no prompt run twice,
and SIGTERM leaving no fake process behind.
"""

from __future__ import annotations

import pytest
import trio

from bench.soak import MAX_LIVE_SESSIONS, POOL_SIZE, QUEUE_MAX, AtRest, SoakReport, soak

# On this 2-CPU machine the whole test takes ~100 s with a test suite running beside it, and
# was seen at 233 s on a busier one: too long for `scripts/test`, so it is marked slow and
# runs in `.ci/run`. The bound only stops a hang (the soak checks timing itself: its load has
# a deadline), so it leaves room for a loaded CI machine.
REQUESTS = 650
CONCURRENCY = 16
HANG_BOUND_S = 600


@pytest.mark.slow
async def test_soak_mixed_faulty_load_leaves_the_service_consistent(tmp_path):
    with trio.fail_after(HANG_BOUND_S):
        report = await soak(requests=REQUESTS, concurrency=CONCURRENCY, workdir=tmp_path)
    summary = report.summary()
    # The load: every operation done in time, every reply of its kind's shape and content.
    assert report.completed_ops == REQUESTS, summary
    assert report.unexpected == [], summary
    assert report.problems == [], summary  # /health answered 200 in time throughout
    assert report.max_live_fakes <= report.live_fakes_bound, summary
    assert_pool_back_to_full(report.rest, summary)
    assert_counters_add_up(report, summary)
    assert_sessions_at_rest(report.rest, summary)
    assert_processes_at_rest(report.rest, summary)
    assert_each_prompt_ran_once(report, summary)
    # The stop: a clean exit that leaves no fake process, and nothing else in the log.
    assert report.exit_code == 0, summary
    assert report.orphans == [], summary
    assert report.log_problems == [], summary


def assert_pool_back_to_full(rest: AtRest, summary: str) -> None:
    assert rest.recover_s is not None, summary
    workers, queue = rest.health["workers"], rest.health["queue"]
    assert rest.health["status"] == "ok", summary
    assert workers["ready"] == POOL_SIZE, summary
    assert workers["busy"] == workers["starting"] == workers["error"] == 0, summary
    assert queue["length"] == 0, summary


def assert_counters_add_up(report: SoakReport, summary: str) -> None:
    """``/status`` against what the clients saw (a session reports its last turn once idle)."""
    rest, tally = report.rest, report.tally
    assert rest.settled, summary
    status = rest.status
    processed, errors = status["totalProcessed"], status["totalErrors"]
    workers = status["workers"]
    assert status["queueLength"] == 0, summary
    assert status["maxQueueSize"] == QUEUE_MAX, summary
    # POOL_SIZE for anyone and the spares: POOL_SIZE + AGENT_REUSE_MAX (= POOL_SIZE).
    assert len(workers) == 3 * POOL_SIZE, summary
    assert sum(w["state"] == "ready" for w in workers) == POOL_SIZE, summary
    assert all(w["state"] in ("ready", "kept", "dormant") for w in workers), summary
    assert not any("busySince" in w for w in workers), summary
    assert 0 <= errors <= processed, summary
    # Counted at most once per /run that reached a verdict or was abandoned ...
    assert processed <= tally.run_replies + tally.cancelled_runs, summary
    # ... and at least every one-shot verdict and every successful session turn.
    session_success = tally.success_true - tally.oneshot_success
    assert processed >= tally.oneshot_replies + session_success, summary
    ok_count = processed - errors
    assert tally.success_true <= ok_count <= tally.success_true + tally.cancelled_runs, summary
    assert sum(w["jobs"] for w in workers) <= processed, summary


def assert_sessions_at_rest(rest: AtRest, summary: str) -> None:
    assert rest.live_sessions <= MAX_LIVE_SESSIONS, summary
    listed = {s["id"] for s in rest.status["sessions"]}
    assert [sid for sid in rest.deleted if sid in listed] == [], summary


def assert_processes_at_rest(rest: AtRest, summary: str) -> None:
    """Retired processes gone: exactly one per worker and one per live session remain
    (agents kept for their users, AGENT_REUSE_S, are gone by then)."""
    assert len(rest.live_fakes) == POOL_SIZE + rest.live_sessions, (rest.live_fakes, summary)


def assert_each_prompt_ran_once(report: SoakReport, summary: str) -> None:
    """The fake's turn log: no prompt ran twice; every reply that proves a run has its turn."""
    twice = {tag: n for tag, n in report.turn_counts.items() if n > 1}
    assert twice == {}, summary
    never = sorted(tag for tag in report.must_have_run if report.turn_counts[tag] == 0)
    assert never == [], summary


def consistent_report() -> SoakReport:
    """A small report of a soak that went well: two verdicts, the pool at rest."""
    report = SoakReport(requests=2, concurrency=1, seed=0)
    report.tally.run_replies = report.tally.oneshot_replies = 2
    report.tally.success_true = report.tally.oneshot_success = 1
    workers = [{"state": "ready", "jobs": 1}] * 2 + [{"state": "ready", "jobs": 0}] * 2
    workers += [{"state": "dormant", "jobs": 0}] * (2 * POOL_SIZE)
    report.rest = AtRest(
        recover_s=0.1,
        health={
            "status": "ok",
            "workers": {"ready": POOL_SIZE, "busy": 0, "starting": 0, "error": 0},
            "queue": {"length": 0},
        },
        settled=True,
        status={
            "totalProcessed": 2,
            "totalErrors": 1,
            "queueLength": 0,
            "maxQueueSize": QUEUE_MAX,
            "workers": workers,
            "sessions": [{"id": "soak-s01", "state": "live"}],
        },
        other_status={"sessions": []},
        live_fakes=[(100 + n, "S", 1) for n in range(POOL_SIZE + 1)],
        deleted=["soak-warm"],
    )
    report.turn_counts.update(["1", "2"])
    report.must_have_run = {"1"}
    return report


def audit(report: SoakReport) -> None:
    assert_pool_back_to_full(report.rest, "")
    assert_counters_add_up(report, "")
    assert_sessions_at_rest(report.rest, "")
    assert_processes_at_rest(report.rest, "")
    assert_each_prompt_ran_once(report, "")


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda r: setattr(r.rest, "recover_s", None), id="pool-not-back"),
        pytest.param(
            lambda r: r.rest.status["workers"].__setitem__(0, {"state": "busy", "jobs": 1}),
            id="worker-busy",
        ),
        pytest.param(lambda r: r.rest.status.__setitem__("totalProcessed", 9), id="counted-twice"),
        pytest.param(lambda r: r.rest.deleted.append("soak-s01"), id="deleted-still-listed"),
        pytest.param(lambda r: r.rest.live_fakes.pop(), id="a-fake-missing"),
        pytest.param(lambda r: r.turn_counts.update(["2"]), id="prompt-ran-twice"),
        pytest.param(lambda r: r.must_have_run.add("3"), id="answered-never-ran"),
    ],
)
def test_the_soak_audit_fails_on_what_it_checks(break_it):
    report = consistent_report()
    audit(report)  # as it went: passes
    break_it(report)
    with pytest.raises(AssertionError):
        audit(report)
