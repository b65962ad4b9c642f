"""Soak: the real service under a long mixed load with faults stays consistent.

A shorter run of ``bench/soak.py`` (see its docstring): one-shot, slow, crashing,
hanging, erroring and garbage-writing turns, clients that disconnect mid-run or
while queued, multi-turn sessions that must remember names across hibernation,
crashes and DELETEs, and bad input — then the pool must be back to full, the
counters must add up, and SIGTERM must leave no fake process behind.
"""

from __future__ import annotations

import pytest
import trio

from bench.soak import soak

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
    assert report.completed_ops == REQUESTS, summary
    assert report.unexpected == [], summary
    assert report.pool_recovered, summary
    assert report.orphans == [], summary
    assert report.exit_code == 0, summary
    # counters consistent, no worker stuck busy, live fakes within bounds, no prompt run twice
    assert report.problems == [], summary
    assert report.log_problems == [], summary
    assert report.max_live_fakes <= report.live_fakes_bound, summary
