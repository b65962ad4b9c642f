"""End to end: each reply's ``costUsd`` is its own turn's, and the cost metric adds them up.

The real service, the real SDK, the fake CLI, which reports costs as the real
CLI does (tests/REAL_CLI_FINDINGS.md, "Costs of a turn"): every turn but
``/clear`` costs ``TURN_COST_USD``, and a result's ``total_cost_usd`` is the
conversation's running total — across the turns of a process, carried over to a
process that resumes the conversation, back to 0 after ``/clear``.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.e2e.test_e2e_metrics import by_state, get, scrape
from tests.fake_claude import TURN_COST_USD
from tests.support import sse
from tests.support.harness import AUTH, run_service, wait_healthy, wait_until

JSON = {**AUTH, "Content-Type": "application/json"}
COST = "claude_code_api_cost_usd_total"


def turns(cost: float | None) -> float:
    """``cost`` in turns of the fake (a float compared exactly after rounding)."""
    assert cost is not None
    return round(cost / TURN_COST_USD, 6)


async def run(client: httpx.AsyncClient, prompt: str, **fields: object) -> dict:
    reply = await client.post("/run", headers=JSON, json={"prompt": prompt, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def streamed(client: httpx.AsyncClient, prompt: str, **fields: object) -> dict:
    response, events = await sse.stream_run(client, JSON, {"prompt": prompt, **fields})
    assert response.status_code == 200 and events[-1].name == "result", events
    return events[-1].data


@pytest.mark.parametrize(("reuse", "total_only"), [(False, False), (True, False), (True, True)])
async def test_every_turn_reports_its_own_cost_across_resumes_and_reuse(
    tmp_path, reuse, total_only
):
    """Sessions hibernate after 0.5 s idle: a later turn resumes the conversation in a new
    process. With AGENT_REUSE_S, one-shots run on the same process, /clear between them.

    ``total_only``: a CLI whose results have the running total only (no
    ``model_usage_since_last_result``): a turn's cost is the growth of the total since the
    process's previous result; the first turn of a resumed conversation has no known
    cost (null), rather than the whole conversation's.
    """
    env = {"POOL_SIZE": "1", "SESSION_IDLE_MS": "500", "AGENT_REUSE_S": "60" if reuse else "0"}
    with trio.fail_after(90):
        fake_mode = "total_only" if total_only else ""
        async with run_service(tmp_path, env=env, fake_mode=fake_mode) as service:
            await wait_healthy(service, ready=1)
            async with service.client() as client:
                before = await scrape(client)
                costs = []
                for prompt in ("My name is Ann.", "one", "two"):
                    costs.append((await run(client, prompt, sessionId="s"))["costUsd"])

                async def hibernated() -> bool:
                    sessions = by_state(await scrape(client), "claude_code_api_sessions")
                    return sessions.get("hibernated") == 1

                await wait_until(hibernated, timeout=10)
                resumed = await run(client, "What is my name?", sessionId="s")
                assert resumed["output"] == "Your name is Ann."
                costs.append(resumed["costUsd"])
                costs.append((await streamed(client, "three", sessionId="s"))["costUsd"])
                # A turn cut short costs too, but never adds to the next turn's cost.
                cut = await run(client, "[[fake:slow:50:0.1]]", sessionId="s", timeoutMs=600)
                assert cut["timedOut"] is True
                costs.append((await run(client, "after the cut", sessionId="s"))["costUsd"])
                pids = set()
                for prompt in ("a one-shot", "[[fake:whoami]]", "[[fake:whoami]]"):
                    reply = await run(client, prompt)
                    costs.append(reply["costUsd"])
                    if "whoami" in prompt:
                        pids.add(reply["output"])
                costs.append((await streamed(client, "a streamed one-shot"))["costUsd"])
                after = await scrape(client)
    expected: list[float | None] = [1] * len(costs)
    if total_only:
        expected[3] = None  # the resumed conversation's first turn
    assert [None if cost is None else turns(cost) for cost in costs] == expected
    assert (len(pids) == 1) is reuse  # (each whoami names its process)
    grown = get(after, COST) - get(before, COST)  # (no user label: METRICS_PER_USER is off)
    assert turns(grown) == len([cost for cost in costs if cost is not None])
