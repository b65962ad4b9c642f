"""``DELETE /runs/{runId}`` and ``GET /status`` with other replicas (http/runs.py, app.py),
in-process, a fake standing for :class:`~claude_code_api.actors.replica_runs.ReplicaRuns`;
and the wake-ups that carry a cancel between replicas (store/wakeups.py)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.config.settings import load_settings
from claude_code_api.http.app import create_app
from claude_code_api.messages import CancelRun, DispatcherMessage, RunState, RunView
from claude_code_api.store.errors import StoreUnavailable
from tests.unit.test_json_run import KEY, SETTINGS_ENV, Exchange

pytest.importorskip("psycopg")  # (the wake-ups' module imports it)

from claude_code_api.store.wakeups import (  # noqa: E402
    CancelReply,
    CancelRequest,
    HandOverRequest,
    _for,
    decode,
    encode,
    user_digest,
)


@attrs.define
class FakeReplicas:
    """Other replicas: ``answer`` is what :meth:`cancel` says (or raises)."""

    answer: bool | None | Exception = False
    asked: list[tuple[str, str]] = attrs.field(factory=list)

    async def runs_of(self, user_id: str) -> tuple[RunView, ...]:
        return ()

    async def cancel(self, user_id: str, run_id: str) -> bool | None:
        self.asked.append((user_id, run_id))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def delete(
    run_id: str, replicas: FakeReplicas, local: frozenset[str] = frozenset()
) -> Exchange:
    """``DELETE /runs/run_id`` as alice; the dispatcher knows the runs in ``local``."""
    dispatcher, inbox = trio.open_memory_channel[DispatcherMessage](10)
    settings = load_settings(SETTINGS_ENV)
    registry, _registry_inbox = trio.open_memory_channel[Any](0)
    app = create_app(settings, dispatcher, RegistryClient(registry), other_replicas=replicas)
    exchange = Exchange("DELETE", f"/runs/{run_id}", {"x-api-key": KEY}, [b""])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, exchange.scope, exchange.receive, exchange.send)
            message = await inbox.receive()
            assert isinstance(message, CancelRun)
            message.ack.send_nowait(message.run_id in local)
            await trio.testing.wait_all_tasks_blocked()
            exchange.disconnect.set()
    return exchange


async def test_a_local_run_is_cancelled_here_without_asking_the_others():
    replicas = FakeReplicas(answer=True)
    exchange = await delete("r1", replicas, {"r1"})
    assert (exchange.status, exchange.json()) == (200, {"cancelled": True})
    assert replicas.asked == []


@pytest.mark.parametrize(
    "answer, status, body",
    [
        (True, 200, {"cancelled": True}),
        (False, 404, {"error": "Run 'r1' not found"}),
        (None, 202, {"cancelled": False, "cancelling": True}),
        (StoreUnavailable("run store unavailable: down"), 503, None),
    ],
)
async def test_a_run_unknown_here_is_cancelled_where_it_runs(answer, status, body):
    replicas = FakeReplicas(answer=answer)
    exchange = await delete("r1", replicas)
    assert replicas.asked == [("alice", "r1")]
    assert exchange.status == status
    assert exchange.json() == (body or {"error": "run store unavailable: down"})


def test_cancel_wake_ups_round_trip_and_reach_their_addressee_only():
    asked = CancelRequest("a", "r1", user_digest("alice\x00\ud800" + "x" * 10_000), "b", "q1")
    answered = CancelReply("b", "q1", True)
    for wakeup in (asked, answered):
        assert decode(*encode(wakeup)) == wakeup
    assert len(encode(asked)[1]) < 300  # a user id of any length: its digest
    assert _for("a", asked) and not _for("b", asked)
    assert _for("b", answered) and not _for("a", answered)
    assert _for("h", HandOverRequest("h", "k")) and not _for("a", HandOverRequest("h", "k"))
    assert decode("cca_cancelled", '{"asker": "b", "request": "q", "cancelled": "yes"}') is None


def test_run_views_merge_this_replicas_and_the_others_oldest_first():
    from claude_code_api.http.runs import run_views
    from tests.unit.test_json_run import PoolSnapshot

    here = RunView("h", "alice", RunState.RUNNING, None, 2.0, 3.0)
    there = RunView("t", "alice", RunState.QUEUED, "s", 1.0)
    snapshot = PoolSnapshot((), 0, 0, 0, 0, None, False, True, runs=(here,))
    assert [v["runId"] for v in run_views(snapshot, (there,))] == ["t", "h"]
    assert run_views(snapshot, (there,))[0] == {
        "runId": "t",
        "state": "queued",
        "queuedAt": 1000,
        "sessionId": "s",
    }
