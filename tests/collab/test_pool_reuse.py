"""The dispatcher and real workers with fake agents, on trio's autojump clock: agents kept
for their users (``AGENT_REUSE_S``) are extra to the ``POOL_SIZE`` warm ones for anyone.

The service's arrangement: ``pool_size`` workers warm an agent at once, ``pool_size`` +
``kept_max`` spares start dormant; a fake agent's start takes ``FakeAgents.start_s`` (1 s), a kept
agent waits ``REUSE_S`` (5 s) for its user. Times are virtual and asserted exactly.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from claude_code_api.actors.dispatcher import Dispatcher
from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.turn import TurnLimits
from claude_code_api.actors.worker import WorkerConfig, serve_worker
from claude_code_api.http.jobs import pool_snapshot
from claude_code_api.messages import (
    DEFAULT_OPTIONS,
    Job,
    JobStarted,
    RunOptions,
    RunResult,
    Submit,
    WorkerDormant,
    WorkerFailed,
    WorkerReady,
    WorkerStarting,
)
from tests.support.fake_agent import FakeAgents, Finish, Wait

LIMIT = 1000
REUSE_S = 5.0
# A fake agent's start (FakeAgents.start_s), and the moment a woken worker lets the reply
# that woke it leave first (worker.after_the_reply).
WARM_S = 1.1
CONFIG = WorkerConfig(warmup_timeout_s=30, turn=TurnLimits(2.0, 1000), reuse_s=REUSE_S)


@attrs.define
class Pool:
    inbox: trio.MemorySendChannel
    agents: FakeAgents
    jobs: int = 0

    async def run(
        self, user_id: str, options: RunOptions = DEFAULT_OPTIONS
    ) -> tuple[str, float, int]:
        """Run a job of ``user_id`` (prompt: ``<user>-<n>``, the pool's n-th job): (its worker,
        how long it waited to start, which agent ran it: an index into ``agents.made``)."""
        self.jobs += 1
        prompt = f"{user_id}-{self.jobs}"
        reply_send, reply = trio.open_memory_channel(64)
        now = trio.current_time()
        job = Job(f"job-{self.jobs}", user_id, prompt, now, now + 60, reply_send, options=options)
        await self.inbox.send(Submit(job))
        events = [event async for event in reply]
        [started] = [event for event in events if isinstance(event, JobStarted)]
        assert isinstance(events[-1], RunResult) and events[-1].success
        [agent] = [a.number for a in self.agents.made if f"turn {prompt}" in a.events]
        return started.worker_id, started.at - now, agent

    async def states(self) -> Counter[str]:
        return Counter(view.state.value for view in (await pool_snapshot(self.inbox)).workers)

    def alive(self) -> int:
        """Agent processes started and not closed."""
        return sum(1 for agent in self.agents.made if not agent._closed)


async def start_pool(
    nursery: trio.Nursery,
    *,
    pool_size: int,
    kept_max: int,
    reuse_s: float = REUSE_S,
    agents: FakeAgents | None = None,
    returning_only: bool = False,
) -> Pool:
    """A dispatcher and its workers, as the supervisor starts them: ``pool_size`` warming at
    once, ``pool_size`` + ``kept_max`` spares dormant (none without reuse). ``returning_only``:
    agents kept only for users who came back within ``reuse_s``, as the service's are (else
    for every user, which the tests of keeping use to keep from a user's first job on)."""
    inbox, inbox_receive = trio.open_memory_channel(0)
    dispatcher = Dispatcher(
        inbox_receive,
        pool_size=pool_size,
        queue_max=20,
        kept_max=kept_max,
        reuse_s=reuse_s if returning_only else None,
    )
    await nursery.start(dispatcher.serve)
    agents = agents or FakeAgents()
    config = attrs.evolve(CONFIG, reuse_s=reuse_s)
    spares = pool_size + kept_max if kept_max else 0
    for n in range(pool_size + spares):
        worker = partial(
            serve_worker, f"w{n}", config, inbox.clone(), agents, Path("/homes"), StopSignal()
        )
        nursery.start_soon(partial(worker, dormant=n >= pool_size))
    pool = Pool(inbox, agents)
    await trio.sleep(WARM_S)  # the pool warms
    return pool


async def test_after_a_kept_one_shot_pool_size_agents_are_ready_for_anyone(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=2, kept_max=2)
        assert await pool.states() == {"ready": 2, "dormant": 4}
        assert len(pool.agents.made) == 2  # no spare warmed at start-up
        alices_worker, waited, alices_agent = await pool.run("alice")
        assert waited == 0
        # Alice's agent is kept for her; a spare warms in its place in the pool.
        assert await pool.states() == {"ready": 1, "kept": 1, "starting": 1, "dormant": 3}
        await trio.sleep(WARM_S)
        assert await pool.states() == {"ready": 2, "kept": 1, "dormant": 3}
        assert pool.alive() == 3
        # Bob starts at once on an agent that was warm before he asked: no cold start.
        made = len(pool.agents.made)
        bobs_worker, waited, bobs_agent = await pool.run("bob")
        assert waited == 0 and bobs_agent < made and bobs_worker != alices_worker
        # Alice's next one-shot runs on her kept agent, cleared in between.
        worker, waited, agent = await pool.run("alice")
        assert (worker, waited, agent) == (alices_worker, 0, alices_agent)
        assert pool.agents.made[agent].events == [
            "start",
            "turn alice-1",
            "reset",
            "turn alice-3",
        ]


async def test_only_a_user_who_came_back_within_agent_reuse_s_has_their_agent_kept(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=2, kept_max=2, returning_only=True)
        _, _, first = await pool.run("alice")
        # Her first job's agent is retired, not kept: no kept agent, nothing more alive.
        assert await pool.states() == {"ready": 1, "starting": 1, "dormant": 4}
        await trio.sleep(WARM_S)
        assert pool.alive() == 2
        _, _, second = await pool.run("alice")  # back within REUSE_S: kept from now on
        assert second != first
        assert (await pool.states())["kept"] == 1
        _, _, third = await pool.run("alice")
        assert third == second
        # Away for longer than REUSE_S: her kept agent's time is up, and she is new again.
        await trio.sleep(REUSE_S + 1)
        assert "kept" not in await pool.states()
        _, _, fourth = await pool.run("alice")
        await trio.sleep(WARM_S)
        assert fourth not in (second, third) and "kept" not in await pool.states()
        assert pool.alive() == 2


async def test_another_users_job_right_after_a_kept_one_takes_the_other_warm_agent(
    autojump_clock, nursery
):
    """The sequential every-user load: each request right after the previous reply."""
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=2, kept_max=2)
        first, waited, _ = await pool.run("alice")
        assert waited == 0
        second, waited, _ = await pool.run("bob")
        assert waited == 0 and second != first


async def test_the_agent_a_job_takes_is_replaced_while_the_job_runs(autojump_clock, nursery):
    """POOL_SIZE=1: one job runs at a time, and the next user's agent warms meanwhile."""
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Wait(5) if "ann" in p else Wait(0), Finish("ok")])
        pool = await start_pool(nursery, pool_size=1, kept_max=1, agents=agents)
        nursery.start_soon(pool.run, "ann")
        await trio.sleep(WARM_S)
        assert await pool.states() == {"busy": 1, "ready": 1, "dormant": 1}
        made = len(agents.made)
        # Bob waits for Ann's job to end (POOL_SIZE one-shots run at once), not for a start.
        _, waited, agent = await pool.run("bob")
        assert waited == pytest.approx(5 - WARM_S)
        assert agent < made  # on the agent warmed while Ann's job ran


async def test_a_job_on_a_process_of_its_own_leaves_the_warm_agent_in_the_pool(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=1, kept_max=1)
        _, _, own = await pool.run("ann", RunOptions(system_prompt="Answer in French."))
        assert own == 1  # started for that job (the warm agent is the first)
        await trio.sleep(WARM_S)
        assert len(pool.agents.made) == 2  # no spare warmed: the pool's agent was not taken
        _, waited, agent = await pool.run("ben")
        assert (waited, agent) == (0, 0)


async def test_a_job_waits_for_an_agent_warming_rather_than_replace_a_kept_one(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=1, kept_max=1)
        alices_worker, _, alices_agent = await pool.run("alice")
        # Bob asks at once: the spare has just begun warming in the pool's place. He waits
        # for it; Alice's kept agent is not replaced for him.
        bobs_worker, waited, _ = await pool.run("bob")
        assert 0 < waited <= WARM_S
        assert bobs_worker != alices_worker
        assert not pool.agents.made[alices_agent]._closed


async def test_past_agent_reuse_max_the_oldest_kept_agent_is_retired(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=1, kept_max=2)
        kept = {}
        for user in ("ann", "ben", "cat"):
            _, waited, kept[user] = await pool.run(user)
            assert waited == 0
            await trio.sleep(WARM_S)  # the pool warms again
        # Three kept past a bound of two: Ann's, the oldest, is retired (its worker dormant,
        # then woken to warm for the pool); Ben's and Cat's stay.
        assert pool.agents.made[kept["ann"]]._closed
        assert not pool.agents.made[kept["ben"]]._closed
        assert not pool.agents.made[kept["cat"]]._closed
        assert await pool.states() == {"ready": 1, "kept": 2, "dormant": 1}
        assert pool.alive() == 3  # POOL_SIZE + AGENT_REUSE_MAX at most
        _, waited, agent = await pool.run("ben")
        assert (waited, agent) == (0, kept["ben"])
        _, waited, agent = await pool.run("ann")
        assert waited == 0 and agent not in kept.values()


async def test_the_oldest_kept_agent_makes_room_as_soon_as_another_is_being_kept(
    autojump_clock, nursery
):
    """Its worker warms an agent for anyone while the new kept one is reset, not after."""
    with trio.fail_after(LIMIT):
        agents = FakeAgents(reset_s=1.0)
        pool = await start_pool(nursery, pool_size=1, kept_max=1, agents=agents)
        _, _, alices = await pool.run("alice")
        await trio.sleep(WARM_S + agents.reset_s)
        _, waited, bobs = await pool.run("bob")
        finished_at = trio.current_time()
        assert waited == 0
        await trio.sleep(WARM_S)
        closed_at = [at for at, event in agents.made[alices].log if event == "closed"]
        assert closed_at and closed_at[0] - finished_at < agents.reset_s / 2
        assert not agents.made[bobs]._closed
        assert await pool.states() == {"ready": 1, "kept": 1, "dormant": 1}


async def test_a_kept_agent_whose_time_is_up_leaves_its_worker_dormant(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=1, kept_max=1)
        await pool.run("alice")
        await trio.sleep(REUSE_S + 1)
        # The pool is full (the spare warmed in its place): nothing warms for it.
        assert await pool.states() == {"ready": 1, "dormant": 2}
        assert pool.alive() == 1 and len(pool.agents.made) == 2


async def test_with_agent_reuse_s_0_every_job_gets_a_fresh_agent_as_before(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        pool = await start_pool(nursery, pool_size=2, kept_max=0, reuse_s=0)
        assert await pool.states() == {"ready": 2}
        agents = set()
        for _ in range(3):
            _, waited, agent = await pool.run("alice")
            assert waited == 0
            agents.add(agent)
            await trio.sleep(WARM_S)  # its worker replaced its agent
            assert await pool.states() == {"ready": 2}
        assert len(agents) == 3 and len(pool.agents.made) == 5 and pool.alive() == 2


async def test_failing_workers_are_not_covered_by_spares_and_the_pool_is_degraded(
    autojump_clock, nursery
):
    """A crash loop is the supervisor's to back off: a spare woken for a failed worker would
    fail too, as many times over. The spares never tried do not keep the pool from
    answering 503 at once."""
    with trio.fail_after(LIMIT):
        inbox, inbox_receive = trio.open_memory_channel(0)
        dispatcher = Dispatcher(inbox_receive, pool_size=1, queue_max=20, kept_max=1)
        await nursery.start(dispatcher.serve)
        spares = []
        await inbox.send(WorkerStarting("w0"))
        for worker_id in ("w1", "w2"):
            command_send, command_receive = trio.open_memory_channel(1)
            await inbox.send(WorkerDormant(worker_id, command_send))
            spares.append(command_receive)
        await inbox.send(WorkerFailed("w0", "exited with code 4"))
        snapshot = await pool_snapshot(inbox)
        assert snapshot.degraded_reason == "exited with code 4"
        for spare in spares:
            with pytest.raises(trio.WouldBlock):
                spare.receive_nowait()
        await inbox.send(WorkerStarting("w0"))  # restarted by its supervisor, and warm
        await inbox.send(WorkerReady("w0", trio.open_memory_channel(1)[0]))
        assert (await pool_snapshot(inbox)).degraded_reason is None


async def test_a_taken_agent_is_replaced_after_the_job_while_another_is_warm(
    autojump_clock, nursery
):
    """A start takes ~0.3 s of CPU with the real CLI: while a warm agent still waits for the
    next user, the one a job took is replaced once the job has answered, not during it."""
    with trio.fail_after(LIMIT):
        agents = FakeAgents(script=lambda p: [Wait(5) if "ann" in p else Wait(0), Finish("ok")])
        pool = await start_pool(nursery, pool_size=2, kept_max=1, agents=agents)
        made = len(agents.made)
        nursery.start_soon(pool.run, "ann")
        await trio.sleep(WARM_S)
        assert await pool.states() == {"busy": 1, "ready": 1, "dormant": 3}
        assert len(agents.made) == made
        # Bob takes the other warm agent: none is left, so both places are filled at once.
        await pool.run("bob")
        await trio.sleep(WARM_S)
        assert len(agents.made) == made + 2
        assert await pool.states() == {"busy": 1, "ready": 2, "kept": 1, "dormant": 1}
