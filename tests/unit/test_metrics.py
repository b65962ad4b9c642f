"""The metrics' feeding points and the scrape's gauges, without a server (MockClock).

Counters are process-wide (module-level, as prometheus-client keeps them), so each
test reads how much a value *changed*.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from claude_code_api.actors.registry import serve_registry
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.supervision import Backoff, ChildSpec, Supervisor
from claude_code_api.actors.turn import TurnLimits, run_turn
from claude_code_api.actors.worker import WorkerConfig, serve_worker
from claude_code_api.agent.metered import metered
from claude_code_api.agent.protocol import AgentError, AgentStartError
from claude_code_api.http.jobs import pool_snapshot
from claude_code_api.http.observe import StateGauges, count_requests, note_route, route_pattern
from claude_code_api.messages import (
    JobFailed,
    PoolSnapshot,
    RunResult,
    SessionKey,
    SessionState,
    SessionView,
    Submit,
    Withdraw,
    WorkerState,
    WorkerView,
)
from claude_code_api.observe import metrics
from claude_code_api.store import SqliteSessionTable
from tests.collab.test_dispatcher import make_job, start_dispatcher
from tests.collab.test_registry import record
from tests.collab.test_worker import ready
from tests.support.fake_agent import Die, FakeAgents, Finish, Say, Wait

LIMIT = 1000


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Change:
    """How much samples changed between construction and :meth:`of`."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self.before = {self._key(name, labels): value(name, **labels) for name, labels in samples}

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted(labels.items()))

    def of(self, name: str, labels: dict[str, str] | None = None, **more: str) -> float:
        labels = {**(labels or {}), **more}
        return value(name, **labels) - self.before.get(self._key(name, labels), 0.0)


def sample(name: str, **labels: str) -> tuple[str, dict[str, str]]:
    return name, labels


@pytest.fixture(autouse=True)
def metrics_on():
    metrics.set_enabled(True)
    metrics.set_per_user(False)
    yield
    metrics.set_enabled(True)
    metrics.set_per_user(False)


# --- runs: Job.answer and the dispatcher's withdrawals ---------------------------------------


def runs(outcome: str) -> tuple[str, dict[str, str]]:
    return sample("claude_code_api_run_duration_seconds_count", outcome=outcome)


async def test_every_answer_is_counted_by_outcome_with_its_duration(autojump_clock):
    outcomes = ["ok", "agent_error", "timeout", "cancelled", "stopped", "failed"]
    change = Change(
        *(runs(o) for o in outcomes),
        sample("claude_code_api_run_duration_seconds_sum", outcome="timeout"),
    )
    answers = [
        RunResult(success=True, output="", duration_ms=0),
        RunResult(success=False, output="", duration_ms=0),
        RunResult(success=False, output="", duration_ms=0, timed_out=True),
        RunResult(success=False, output="", duration_ms=0, cancelled=True),
        RunResult(success=False, output="", duration_ms=0, stopped=True),
        JobFailed(429, "Queue is full, try again later"),
    ]
    for answer in answers:
        job, _reply = make_job("j")
        await trio.sleep(2.5)
        job.answer(answer)
    for outcome in outcomes:
        assert change.of(*runs(outcome)) == 1, outcome
    assert change.of("claude_code_api_run_duration_seconds_sum", outcome="timeout") == 2.5


def answer_spend(user: str, costs: tuple[float, ...]) -> None:
    reply_send, _reply = trio.open_memory_channel(4)
    from claude_code_api.messages import Job

    for cost in costs:
        job = Job("j", user, "p", trio.current_time(), math.inf, reply_send.clone())
        usage = {"input_tokens": 10, "cache_read_input_tokens": 7, "service_tier": "standard"}
        job.answer(RunResult(True, "", 0, cost_usd=cost, usage=usage))


async def test_cost_and_tokens_are_totals_with_no_user_id_by_default(autojump_clock):
    user = "carol.smith@example.com"
    change = Change(
        sample("claude_code_api_cost_usd_total"),
        sample("claude_code_api_tokens_total", type="input"),
    )
    answer_spend(user, (0.25, 0.5))
    assert change.of("claude_code_api_cost_usd_total") == 0.75
    assert change.of("claude_code_api_tokens_total", type="input") == 20
    text = metrics.render().decode()
    assert user not in text and 'user="' not in text


async def test_cost_and_tokens_are_counted_by_user_and_type(autojump_clock):
    metrics.set_per_user(True)
    user = "metrics-cost-user"
    change = Change(
        sample("claude_code_api_cost_usd_total", user=user),
        sample("claude_code_api_tokens_total", user=user, type="input"),
        sample("claude_code_api_tokens_total", user=user, type="cache_read"),
    )
    answer_spend(user, (0.25, 0.5))
    assert change.of("claude_code_api_cost_usd_total", user=user) == 0.75
    assert change.of("claude_code_api_tokens_total", user=user, type="input") == 20
    assert change.of("claude_code_api_tokens_total", user=user, type="cache_read") == 14
    assert f'user="{user}"' in metrics.render().decode()


async def test_nothing_is_counted_when_metrics_are_off(autojump_clock):
    change = Change(runs("ok"))
    metrics.set_enabled(False)
    job, _reply = make_job("j")
    job.answer(RunResult(success=True, output="", duration_ms=0))
    assert change.of(*runs("ok")) == 0


async def test_a_queued_job_whose_client_left_counts_as_cancelled(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        change = Change(runs("cancelled"))
        inbox = await start_dispatcher(nursery)
        job, _reply = make_job("gone")
        await inbox.send(Submit(job))
        await trio.sleep(3)
        await inbox.send(Withdraw(job.id))
        await pool_snapshot(inbox)  # the withdrawal has been handled
        assert change.of(*runs("cancelled")) == 1
        # Withdrawing it again (or a job that is not queued) counts nothing more.
        await inbox.send(Withdraw(job.id))
        await pool_snapshot(inbox)
        assert change.of(*runs("cancelled")) == 1


async def test_queue_wait_is_observed_when_an_agent_starts_on_the_run(autojump_clock):
    with trio.fail_after(LIMIT):
        change = Change(
            sample("claude_code_api_queue_wait_seconds_count"),
            sample("claude_code_api_queue_wait_seconds_sum"),
        )
        agents = FakeAgents()
        agent = agents(spec_for("w"))
        await agent.start(10)
        job, _reply = make_job("j")
        await trio.sleep(4)
        await run_turn(agent, job, worker_id="w", limits=TurnLimits(1.0, 1000))
        assert change.of("claude_code_api_queue_wait_seconds_count") == 1
        assert change.of("claude_code_api_queue_wait_seconds_sum") == 4


# --- agents: warm-ups and failures --------------------------------------------------------------


def spec_for(name: str):
    from claude_code_api.agent.protocol import AgentSpec

    return AgentSpec(name=name, home=Path("/homes") / name, ephemeral=True)


def failures(reason: str) -> tuple[str, dict[str, str]]:
    return sample("claude_code_api_agent_failures_total", reason=reason)


async def test_a_metered_agent_times_its_warm_up_and_counts_a_failed_one(autojump_clock):
    change = Change(sample("claude_code_api_warmup_seconds_sum"), failures("warmup"))
    agents = FakeAgents(start_s=1.5)
    await metered(agents)(spec_for("a")).start(10)
    assert change.of("claude_code_api_warmup_seconds_sum") == 1.5
    agents.start_failure = "no credentials"
    with pytest.raises(AgentStartError):
        await metered(agents)(spec_for("b")).start(10)
    assert change.of("claude_code_api_agent_failures_total", reason="warmup") == 1


async def test_a_metered_agent_tells_a_dead_process_from_a_broken_protocol(autojump_clock):
    change = Change(failures("exit"), failures("protocol"))
    script = {"die": [Die()], "mute": [Say("no result follows")]}
    agents = FakeAgents(script=lambda prompt: script[prompt])
    for prompt in ("die", "mute"):
        agent = metered(agents)(spec_for(prompt))
        await agent.start(10)
        with pytest.raises(AgentError):
            await agent.run_turn(prompt, _ignore)
        await agent.close()
    assert change.of("claude_code_api_agent_failures_total", reason="exit") == 1
    assert change.of("claude_code_api_agent_failures_total", reason="protocol") == 1


async def test_an_idle_exit_is_a_failure_and_a_close_is_not(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        change = Change(failures("exit"))
        agents = FakeAgents()
        for name, ended_by in (("killed", "exit_now"), ("closed", "close")):
            agent = metered(agents)(spec_for(name))
            await agent.start(10)
            waited = trio.Event()

            async def wait(agent=agent, waited=waited) -> None:
                await agent.wait_exited()
                waited.set()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            if ended_by == "exit_now":
                agents.made[-1].exit_now()
            else:
                await agent.close()
            await waited.wait()
        assert change.of("claude_code_api_agent_failures_total", reason="exit") == 1


async def _ignore(event) -> None:
    pass


async def test_a_worker_on_metered_agents_counts_its_runs_and_warm_ups(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        change = Change(sample("claude_code_api_warmup_seconds_count"), runs("ok"))
        agents = FakeAgents(script=lambda p: [Wait(2), Finish("done")])
        send, messages = trio.open_memory_channel(0)
        config = WorkerConfig(warmup_timeout_s=30, turn=TurnLimits(2.0, 1000))
        nursery.start_soon(
            serve_worker, "w", config, send, metered(agents), Path("/homes"), StopSignal()
        )
        inbox = await ready(messages)
        job, reply = make_job("j")
        await inbox.send(job)
        while not isinstance(await reply.receive(), RunResult):
            pass
        assert change.of("claude_code_api_warmup_seconds_count") >= 1
        assert change.of(*runs("ok")) == 1


# --- worker restarts --------------------------------------------------------------------------


async def test_the_pool_supervisor_reports_each_restart(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        restarted: list[str] = []
        attempts = 0

        async def flaky(*, task_status) -> None:
            nonlocal attempts
            attempts += 1
            task_status.started()
            if attempts <= 2:
                raise RuntimeError("crash")
            await trio.sleep_forever()

        supervisor = Supervisor(
            "workers",
            [ChildSpec("worker-0", flaky)],
            backoff=Backoff(initial=1, factor=2, cap=4),
            on_restart=restarted.append,
        )
        nursery.start_soon(supervisor.run)
        await trio.sleep(30)
        assert restarted == ["worker-0", "worker-0"]
        supervisor.request_stop()


# --- the registry's record count ----------------------------------------------------------------


async def test_the_registry_reports_its_record_count_as_it_changes(tmp_path, nursery):
    with trio.fail_after(LIMIT):
        store = SqliteSessionTable(tmp_path / "sessions.sqlite3")
        store.save(record("old", "s0", last=100.0))  # expired by the first sweep
        store.save(record("kept", "s0", last=10_000.0))
        counts: list[int] = []
        send, inbox = trio.open_memory_channel(0)
        await nursery.start(
            partial(
                serve_registry,
                store,
                inbox,
                ttl_s=1000.0,
                wall_clock=lambda: 10_500.0,
                on_count=counts.append,
            )
        )
        async with send:
            client = RegistryClient(send)
            await client.create(record("u", "s1"), max_per_user=10)
            await client.create(record("u", "s2"), max_per_user=10)
            await client.save(record("u", "s2", turns=3))  # an update: no new record
            assert await client.delete(SessionKey("u", "s1"))
            assert not await client.delete(SessionKey("u", "nope"))
            # Read while the registry still owns the store: it closes it once its inbox ends.
            assert counts == [2, 1, 2, 3, 2]
            assert await trio.to_thread.run_sync(store.count) == 2


# --- the scrape's gauges ------------------------------------------------------------------------


def snapshot_with(workers=(), sessions=(), queue_length=0) -> PoolSnapshot:
    return PoolSnapshot(
        workers=tuple(WorkerView(f"w{i}", state, None, 0, None) for i, state in enumerate(workers)),
        queue_length=queue_length,
        queue_max=20,
        processed=0,
        failed=0,
        degraded_reason=None,
        draining=False,
        ever_ready=True,
        sessions=tuple(
            SessionView(SessionKey("u", f"s{i}"), state) for i, state in enumerate(sessions)
        ),
    )


def gauges(collector: StateGauges) -> dict[tuple[str, str], float]:
    text = metrics.render([collector]).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("claude_code_api_workers", "claude_code_api_sessions"):
            for s in family.samples:
                found[family.name.rsplit("_", 1)[-1], s.labels["state"]] = s.value
        elif family.name == "claude_code_api_queue_length":
            found["queue", ""] = family.samples[0].value
    return found


def test_workers_sum_to_the_worker_count_counting_unreported_ones_as_starting():
    worker_states = [
        WorkerState.READY,
        WorkerState.BUSY,
        WorkerState.ERROR,
        WorkerState.KEPT,
        WorkerState.DORMANT,
    ]
    snapshot = snapshot_with(worker_states, (), 3)
    found = gauges(StateGauges(snapshot, worker_count=7, records=0))
    assert found["queue", ""] == 3
    workers = {state: n for (kind, state), n in found.items() if kind == "workers"}
    assert workers == {"starting": 2, "ready": 1, "busy": 1, "error": 1, "kept": 1, "dormant": 1}
    assert sum(workers.values()) == 7


def test_sessions_are_live_busy_or_hibernated_records():
    states = [
        SessionState.IDLE,
        SessionState.STARTING,
        SessionState.STOPPING,
        SessionState.BUSY,
        SessionState.WAITING,  # holds no process: among the hibernated
    ]
    found = gauges(StateGauges(snapshot_with((), states), worker_count=1, records=10))
    sessions = {state: n for (kind, state), n in found.items() if kind == "sessions"}
    assert sessions == {"live": 3, "busy": 1, "hibernated": 6}
    # Records not counted yet: no hibernated figure rather than a wrong one.
    found = gauges(StateGauges(snapshot_with((), states), worker_count=1, records=None))
    assert ("sessions", "hibernated") not in found
    # No snapshot (the dispatcher is restarting): no gauges at all.
    assert gauges(StateGauges(None, worker_count=1, records=3)) == {}


# --- HTTP: routes, never raw paths --------------------------------------------------------------


def test_a_route_is_named_by_its_pattern():
    assert route_pattern("/runs/<run_id>") == "/runs/{runId}"  # as the API names it
    assert route_pattern("/a/<int:page_no>/<b>") == "/a/{pageNo}/{b}"
    assert route_pattern("/files/<path:name>") == "/files/{name}"
    assert route_pattern("/health") == "/health"


def http_requests(method: str, route: str, status: str) -> tuple[str, dict[str, str]]:
    return sample("claude_code_api_http_requests_total", method=method, route=route, status=status)


async def test_requests_are_counted_by_method_route_and_status():
    async def app(scope, receive, send) -> None:
        if scope["path"] == "/raise":
            raise RuntimeError("boom")
        if scope["path"] == "/leave":
            return  # no response: the client went away
        if scope["path"].startswith("/runs/"):
            note_route(scope, "/runs/<run_id>")
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    counted = count_requests(app)
    cases = [
        ("DELETE", "/runs/abc", http_requests("DELETE", "/runs/{runId}", "202")),
        ("DELETE", "/runs/def", http_requests("DELETE", "/runs/{runId}", "202")),
        ("GET", "/no/such/thing", http_requests("GET", "unmatched", "202")),
        ("BREW", "/x", http_requests("other", "unmatched", "202")),
        ("GET", "/leave", http_requests("GET", "unmatched", "499")),
        ("GET", "/raise", http_requests("GET", "unmatched", "500")),
    ]
    change = Change(*(expected for _, _, expected in cases))

    async def send(message) -> None:
        pass

    for method, path, _ in cases:
        scope = {"type": "http", "method": method, "path": path}
        try:
            await counted(scope, None, send)
        except RuntimeError:
            assert path == "/raise"
    got = {(e[1]["method"], e[1]["route"], e[1]["status"]): change.of(*e) for *_, e in cases}
    assert got == {
        ("DELETE", "/runs/{runId}", "202"): 2,
        ("GET", "unmatched", "202"): 1,
        ("other", "unmatched", "202"): 1,
        ("GET", "unmatched", "499"): 1,
        ("GET", "unmatched", "500"): 1,
    }
