"""Collaboration tests of the dispatcher actor, with fake workers and clients.

No SDK and no subprocess: the test plays every worker by sending
``WorkerStarting`` / ``WorkerReady`` / ``WorkerFinished`` / ``WorkerFailed`` to the
dispatcher's inbox and reading jobs from the one-job channels it offered, and
plays HTTP clients with :mod:`claude_code_api.http.jobs` or hand-built jobs.
Everything runs on trio's autojump clock, so times are asserted exactly.
"""

from __future__ import annotations

from functools import partial

import attrs
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from claude_code_api.actors.dispatcher import QUEUE_FULL_ERROR, RETRY_AFTER_S, Dispatcher, PoolView
from claude_code_api.http.jobs import BACKSTOP_S, open_job, pool_snapshot, run_job
from claude_code_api.messages import (
    AssistantText,
    Drain,
    Job,
    JobFailed,
    JobStarted,
    Queued,
    RunResult,
    Submit,
    Withdraw,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
)

SHUTTING_DOWN = JobFailed(503, "service is shutting down")
# Virtual seconds: a test blocked for good jumps straight here and fails at once.
LIMIT = 1000


async def start_dispatcher(
    nursery: trio.Nursery, *, pool_size: int = 1, queue_max: int = 20
) -> trio.MemorySendChannel:
    """Start a dispatcher in ``nursery`` (pytest-trio's, cancelled after the test, so a
    failed assert is not wrapped in an exception group); return its inbox's send end,
    unbuffered as in the service."""
    inbox_send, inbox_receive = trio.open_memory_channel(0)
    dispatcher = Dispatcher(inbox_receive, pool_size=pool_size, queue_max=queue_max)
    await nursery.start(dispatcher.serve)
    return inbox_send


def make_job(job_id: str, *, timeout_s: float = 60.0) -> tuple[Job, trio.MemoryReceiveChannel]:
    """A job as ``open_job`` builds it; returns it and the receive end of its reply."""
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=job_id,
        user_id="user",
        prompt=f"prompt of {job_id}",
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
    )
    return job, reply_receive


async def offer(inbox: trio.MemorySendChannel, worker_id: str) -> trio.MemoryReceiveChannel:
    """Play a worker that is warm: offer a one-job channel, as the real worker does."""
    job_send, job_receive = trio.open_memory_channel(1)
    await inbox.send(WorkerReady(worker_id, job_send))
    return job_receive


async def nothing_arrives(channel: trio.MemoryReceiveChannel) -> bool:
    """True if ``channel`` holds nothing once every task is blocked (it may be closed),
    but the dispatcher's acknowledgement of a job it took (``Queued``)."""
    await wait_all_tasks_blocked()
    try:
        while isinstance(channel.receive_nowait(), Queued):
            pass
    except (trio.WouldBlock, trio.EndOfChannel):
        return True
    return False


async def terminal_of(reply: trio.MemoryReceiveChannel):
    """The one event on a reply the dispatcher answered (after its ``Queued``, if it took
    the job); checks it closed the channel after."""
    event = await reply.receive()
    if isinstance(event, Queued):
        event = await reply.receive()
    with pytest.raises(trio.EndOfChannel):
        await reply.receive()
    return event


def states(snapshot) -> dict[str, str]:
    return {view.id: view.state.value for view in snapshot.workers}


# --- dispatch ----------------------------------------------------------------


async def test_queued_jobs_run_in_fifo_order_on_one_worker(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        jobs = [make_job(f"job-{i}")[0] for i in range(5)]
        for job in jobs:
            await inbox.send(Submit(job))
        got = []
        for _ in jobs:
            job_channel = await offer(inbox, "w0")
            job = await job_channel.receive()
            # One job per offer: the dispatcher closes the channel it used.
            with pytest.raises(trio.EndOfChannel):
                await job_channel.receive()
            got.append(job.id)
            await inbox.send(WorkerFinished("w0", job.id, ok=True))
            await inbox.send(WorkerStarting("w0"))
        assert got == [job.id for job in jobs]
        assert (await pool_snapshot(inbox)).processed == 5


async def test_job_waiting_for_a_worker_starts_the_moment_one_is_ready(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        await inbox.send(WorkerStarting("w0"))
        job, reply = make_job("job", timeout_s=60)
        await inbox.send(Submit(job))
        await trio.sleep(3)  # the pool is still warming
        assert (await pool_snapshot(inbox)).queue_length == 1
        assert trio.current_time() == 3

        job_channel = await offer(inbox, "w0")
        assert await job_channel.receive() is job
        # No polling: the hand-over took no (virtual) time at all.
        assert trio.current_time() == 3
        assert await nothing_arrives(reply)  # the reply now belongs to the worker


async def test_submit_goes_straight_to_an_idle_worker(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, queue_max=0)
        job_channel = await offer(inbox, "w0")
        await trio.sleep(2)
        job, _reply = make_job("job")
        await inbox.send(Submit(job))
        assert await job_channel.receive() is job
        assert trio.current_time() == 2


async def test_longest_idle_worker_gets_the_next_job(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        first = await offer(inbox, "w0")
        second = await offer(inbox, "w1")
        job, _ = make_job("job")
        await inbox.send(Submit(job))
        assert await first.receive() is job
        assert await nothing_arrives(second)


async def test_a_job_goes_to_its_users_agent_then_a_fresh_one_then_another_users(
    autojump_clock, nursery
):
    """Kept agents (AGENT_REUSE_S): the user's own first, a fresh one next, and another
    user's kept one only when nothing else is idle (its worker replaces that agent)."""
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=3)
        offers = {}
        for worker_id, bound_to in (("kept-for-bob", "bob"), ("fresh", None), ("kept", "alice")):
            job_send, offers[worker_id] = trio.open_memory_channel(1)
            await inbox.send(WorkerReady(worker_id, job_send, bound_to))
        for expected in ("kept", "fresh", "kept-for-bob"):
            job, _reply = make_job(f"alice-{expected}")
            await inbox.send(Submit(attrs.evolve(job, user_id="alice", reply=job.reply)))
            assert (await offers[expected].receive()).id == f"alice-{expected}"


async def test_the_published_view_answers_without_a_message(autojump_clock, nursery):
    """/health reads the pool through a PoolView: no message, so never behind the inbox."""
    with trio.fail_after(LIMIT):
        view = PoolView()
        assert view.read() is None  # no dispatcher yet
        inbox_send, inbox_receive = trio.open_memory_channel(0)
        scope = trio.CancelScope()

        async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                dispatcher = Dispatcher(inbox_receive, pool_size=1, queue_max=20, view=view)
                await dispatcher.serve(task_status=task_status)

        await nursery.start(serve)
        await offer(inbox_send, "w0")
        job, _reply = make_job("queued")
        await inbox_send.send(WorkerStarting("w0"))
        await inbox_send.send(Submit(job))
        await wait_all_tasks_blocked()  # the dispatcher has handled them
        snapshot = view.read()  # synchronous: no message, no checkpoint
        assert snapshot is not None
        assert states(snapshot) == {"w0": "starting"} and snapshot.queue_length == 1
        scope.cancel()
        await wait_all_tasks_blocked()
        assert view.read() is None  # a stopped dispatcher is not read


async def test_full_queue_answers_429_with_retry_after(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, queue_max=2)
        queued = [make_job(f"queued-{i}") for i in range(2)]
        for job, _ in queued:
            await inbox.send(Submit(job))
        refused, refused_reply = make_job("refused")
        await inbox.send(Submit(refused))
        assert await terminal_of(refused_reply) == JobFailed(
            429, "Queue is full, try again later", retry_after_s=1
        )
        assert trio.current_time() == 0
        # The queued ones are untouched and run once a worker frees a place.
        assert (await pool_snapshot(inbox)).queue_length == 2
        for _, reply in queued:
            assert await nothing_arrives(reply)
        job_channel = await offer(inbox, "w0")
        assert await job_channel.receive() is queued[0][0]
        accepted, accepted_reply = make_job("accepted")
        await inbox.send(Submit(accepted))
        assert await nothing_arrives(accepted_reply)
        assert (await pool_snapshot(inbox)).queue_length == 2


async def test_run_job_on_a_full_queue_returns_429_at_once(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, queue_max=0)
        outcome = await run_job(inbox, user_id="u", prompt="hi", timeout_s=60)
        assert outcome == JobFailed(429, QUEUE_FULL_ERROR, retry_after_s=RETRY_AFTER_S)
        assert trio.current_time() == 0


# --- deadlines and withdrawal ---------------------------------------------------


async def test_queued_job_times_out_exactly_at_its_deadline_and_never_runs(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        patient, patient_reply = make_job("patient", timeout_s=10)
        hasty, hasty_reply = make_job("hasty", timeout_s=5)
        await inbox.send(Submit(patient))
        await inbox.send(Submit(hasty))

        assert await terminal_of(hasty_reply) == RunResult(
            success=False, output="", duration_ms=5000, timed_out=True
        )
        assert trio.current_time() == hasty.deadline == 5
        snapshot = await pool_snapshot(inbox)
        assert (snapshot.queue_length, snapshot.processed, snapshot.failed) == (1, 1, 1)

        await trio.sleep(2)
        first = await offer(inbox, "w0")
        assert await first.receive() is patient  # not the expired one, though it was behind
        second = await offer(inbox, "w1")
        assert await nothing_arrives(second)
        assert await nothing_arrives(patient_reply)
        assert trio.current_time() == 7


async def test_run_job_of_a_job_that_never_leaves_the_queue_times_out(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        outcome = await run_job(inbox, user_id="u", prompt="hi", timeout_s=2.5)
        assert outcome == RunResult(success=False, output="", duration_ms=2500, timed_out=True)
        assert trio.current_time() == 2.5


async def test_withdrawn_job_is_dropped_and_the_next_one_runs(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        gone, gone_reply = make_job("gone")
        stays, _ = make_job("stays")
        await inbox.send(Submit(gone))
        await inbox.send(Submit(stays))
        await inbox.send(Withdraw(gone.id))
        # The dispatcher closes the reply of a job it dropped, without answering it.
        assert await gone_reply.receive() == Queued(0)
        with pytest.raises(trio.EndOfChannel):
            await gone_reply.receive()
        assert (await pool_snapshot(inbox)).queue_length == 1
        job_channel = await offer(inbox, "w0")
        assert await job_channel.receive() is stays
        # Withdrawing a job that already runs (or is unknown) changes nothing.
        await inbox.send(Withdraw(stays.id))
        await inbox.send(Withdraw("never-submitted"))
        assert states(await pool_snapshot(inbox)) == {"w0": "busy"}


async def test_client_leaving_run_job_withdraws_its_queued_job(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        client = trio.CancelScope()

        async def impatient_client():
            with client:
                await run_job(inbox, user_id="u", prompt="first", timeout_s=60)

        nursery.start_soon(impatient_client)
        await wait_all_tasks_blocked()
        assert (await pool_snapshot(inbox)).queue_length == 1
        second, _ = make_job("second")
        await inbox.send(Submit(second))
        client.cancel()  # the HTTP client disconnected
        await wait_all_tasks_blocked()
        assert (await pool_snapshot(inbox)).queue_length == 1
        job_channel = await offer(inbox, "w0")
        assert await job_channel.receive() is second
        assert trio.current_time() == 0


# --- workers dying and failing -----------------------------------------------------


async def test_job_offered_to_a_dead_worker_goes_to_the_next_ready_one(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        dead = await offer(inbox, "w0")
        dead.close()  # it died after offering itself
        alive = await offer(inbox, "w1")
        job, reply = make_job("job")
        await inbox.send(Submit(job))
        assert await alive.receive() is job
        assert await nothing_arrives(reply)
        snapshot = await pool_snapshot(inbox)
        assert states(snapshot) == {"w0": "starting", "w1": "busy"}
        assert (snapshot.queue_length, snapshot.processed, snapshot.failed) == (0, 0, 0)


async def test_job_offered_only_to_a_dead_worker_waits_for_the_next(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=1)
        first, _ = make_job("first")
        second, _ = make_job("second")
        await inbox.send(Submit(first))
        await inbox.send(Submit(second))
        dead_send, dead_receive = trio.open_memory_channel(1)
        dead_receive.close()
        await inbox.send(WorkerReady("w0", dead_send))
        await wait_all_tasks_blocked()
        assert (await pool_snapshot(inbox)).queue_length == 2
        # Its restart offers again: it gets the first job, still ahead of the second.
        await inbox.send(WorkerStarting("w0"))
        job_channel = await offer(inbox, "w0")
        assert await job_channel.receive() is first


async def test_every_worker_failing_warm_up_answers_503_then_recovers(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        queued, queued_reply = make_job("queued")
        await inbox.send(Submit(queued))
        await inbox.send(WorkerFailed("w0", "CLI not found"))
        # One worker of two failing is not an outage: the job keeps waiting.
        assert await nothing_arrives(queued_reply)
        assert (await pool_snapshot(inbox)).degraded_reason is None

        await inbox.send(WorkerFailed("w1", "CLI not found"))
        expected = JobFailed(503, "no agent workers available: CLI not found")
        assert await terminal_of(queued_reply) == expected
        assert expected.error.startswith("no agent workers available:")

        later, later_reply = make_job("later")
        await inbox.send(Submit(later))
        assert await terminal_of(later_reply) == expected
        snapshot = await pool_snapshot(inbox)
        assert snapshot.degraded_reason == "CLI not found"
        assert states(snapshot) == {"w0": "error", "w1": "error"}
        assert snapshot.queue_length == 0

        # A restart alone is not a recovery: its last warm-up still failed.
        await inbox.send(WorkerStarting("w0"))
        again, again_reply = make_job("again")
        await inbox.send(Submit(again))
        assert (await terminal_of(again_reply)).status == 503

        job_channel = await offer(inbox, "w0")
        recovered, recovered_reply = make_job("recovered")
        await inbox.send(Submit(recovered))
        assert await job_channel.receive() is recovered
        assert await nothing_arrives(recovered_reply)
        assert (await pool_snapshot(inbox)).degraded_reason is None
        assert trio.current_time() == 0


async def test_503_names_the_most_recent_warm_up_failure(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        await inbox.send(WorkerStarting("w0"))
        await inbox.send(WorkerStarting("w1"))
        await inbox.send(WorkerFailed("w0", "first reason"))
        await inbox.send(WorkerFailed("w1", "second reason"))
        # w0's supervisor restarts it and it fails again, for a new reason.
        await inbox.send(WorkerStarting("w0"))
        await inbox.send(WorkerFailed("w0", "newest reason"))
        job, reply = make_job("job")
        await inbox.send(Submit(job))
        assert await terminal_of(reply) == JobFailed(
            503, "no agent workers available: newest reason"
        )


async def test_worker_failing_while_others_are_ready_does_not_fail_jobs(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        await inbox.send(WorkerFailed("w0", "boom"))
        job_channel = await offer(inbox, "w1")
        job, _ = make_job("job")
        await inbox.send(Submit(job))
        assert await job_channel.receive() is job


# --- status --------------------------------------------------------------------------


async def test_snapshot_counts_states_and_outcomes(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=4, queue_max=7)
        empty = await pool_snapshot(inbox)
        assert (empty.workers, empty.queue_length, empty.queue_max) == ((), 0, 7)
        assert (empty.processed, empty.failed, empty.draining, empty.ever_ready) == (
            0,
            0,
            False,
            False,
        )

        await inbox.send(WorkerStarting("a-starting"))
        busy_channel = await offer(inbox, "b-busy")
        running, _ = make_job("running")
        await inbox.send(Submit(running))
        assert await busy_channel.receive() is running
        ready_channel = await offer(inbox, "c-ready")
        await inbox.send(WorkerFailed("d-error", "warm-up timed out"))
        expiring, _ = make_job("expiring", timeout_s=1)

        snapshot = await pool_snapshot(inbox)
        assert [(v.id, v.state, v.jobs, v.last_error) for v in snapshot.workers] == [
            ("a-starting", "starting", 0, None),
            ("b-busy", "busy", 1, None),
            ("c-ready", "ready", 0, None),
            ("d-error", "error", 0, "warm-up timed out"),
        ]
        busy_since = {v.id: v.busy_since for v in snapshot.workers}
        assert busy_since["b-busy"] is not None
        assert [busy_since[w] for w in ("a-starting", "c-ready", "d-error")] == [None] * 3
        assert (snapshot.processed, snapshot.failed) == (0, 0)
        assert snapshot.ever_ready and snapshot.degraded_reason is None

        await inbox.send(WorkerFinished("b-busy", running.id, ok=True))
        snapshot = await pool_snapshot(inbox)
        assert (snapshot.processed, snapshot.failed) == (1, 0)
        assert states(snapshot)["b-busy"] == "starting"

        # c-ready takes one job and fails it (agent error or timeout).
        second, _ = make_job("second")
        await inbox.send(Submit(second))
        assert await ready_channel.receive() is second
        await inbox.send(WorkerFinished("c-ready", second.id, ok=False))
        # A job that expires in the queue counts as processed and failed too.
        await inbox.send(Submit(expiring))
        await trio.sleep(1)
        snapshot = await pool_snapshot(inbox)
        assert (snapshot.processed, snapshot.failed, snapshot.queue_length) == (3, 2, 0)
        assert {v.id: v.jobs for v in snapshot.workers} == {
            "a-starting": 0,
            "b-busy": 1,
            "c-ready": 1,
            "d-error": 0,
        }


async def test_unknown_message_is_ignored(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        await inbox.send("not a message")
        job_channel = await offer(inbox, "w0")
        job, _ = make_job("job")
        await inbox.send(Submit(job))
        assert await job_channel.receive() is job


# --- drain -------------------------------------------------------------------------------


async def test_drain_fails_queued_refuses_new_and_waits_for_running_job(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery, pool_size=2)
        job_channel = await offer(inbox, "w0")
        running, running_reply = make_job("running")
        await inbox.send(Submit(running))
        assert await job_channel.receive() is running
        queued = [make_job(f"queued-{i}") for i in range(2)]
        for job, _ in queued:
            await inbox.send(Submit(job))

        done_send, done_receive = trio.open_memory_channel(1)
        await inbox.send(Drain(done_send))
        for _, reply in queued:
            assert await terminal_of(reply) == SHUTTING_DOWN
        late, late_reply = make_job("late")
        await inbox.send(Submit(late))
        assert await terminal_of(late_reply) == SHUTTING_DOWN

        # A worker warming up meanwhile gets nothing; the running job is not touched.
        idle_channel = await offer(inbox, "w1")
        await trio.sleep(5)
        assert await nothing_arrives(done_receive)
        assert await nothing_arrives(idle_channel)
        assert await nothing_arrives(running_reply)
        snapshot = await pool_snapshot(inbox)
        assert snapshot.draining and snapshot.queue_length == 0

        await inbox.send(WorkerFinished("w0", running.id, ok=True))
        assert await done_receive.receive() is None
        assert trio.current_time() == 5
        with pytest.raises(trio.EndOfChannel):
            await done_receive.receive()


async def test_drain_with_nothing_running_is_done_at_once(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        await offer(inbox, "w0")
        done_send, done_receive = trio.open_memory_channel(1)
        await inbox.send(Drain(done_send))
        assert await done_receive.receive() is None
        assert trio.current_time() == 0
        assert await run_job(inbox, user_id="u", prompt="hi", timeout_s=9) == SHUTTING_DOWN


# --- run_job end to end, with a fake worker ------------------------------------------------


async def fake_worker(inbox, worker_id, *, events, finish=True):
    """A worker that takes one job and plays ``events`` on its reply."""
    job_channel = await offer(inbox, worker_id)
    job = await job_channel.receive()
    async with job.reply:
        for event in events:
            await trio.sleep(1)
            await job.reply.send(event)
        if not finish:
            await trio.sleep_forever()
    await inbox.send(WorkerFinished(worker_id, job.id, ok=True))


ANSWER = RunResult(success=True, output="hello", duration_ms=2000, num_turns=1)
SCRIPT = [JobStarted("w0"), AssistantText("hello"), ANSWER]


async def test_run_job_end_to_end_with_a_fake_worker(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        nursery.start_soon(partial(fake_worker, inbox, "w0", events=SCRIPT))
        outcome = await run_job(inbox, user_id="alice", prompt="say hello", timeout_s=60)
        assert outcome == ANSWER
        assert trio.current_time() == 3
        await wait_all_tasks_blocked()
        snapshot = await pool_snapshot(inbox)
        assert (snapshot.processed, snapshot.failed) == (1, 0)


async def test_open_job_streams_every_event_in_order(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        nursery.start_soon(partial(fake_worker, inbox, "w0", events=SCRIPT))
        async with open_job(inbox, user_id="alice", prompt="say hello", timeout_s=60) as (
            job,
            events,
        ):
            got = [event async for event in events]
        assert got == [Queued(0), *SCRIPT]
        assert (job.user_id, job.prompt, job.session_id) == ("alice", "say hello", None)
        assert (job.submitted_at, job.deadline) == (0, 60)
        assert trio.current_time() == 3


async def test_run_job_reports_502_when_the_worker_closes_without_answering(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        nursery.start_soon(partial(fake_worker, inbox, "w0", events=[JobStarted("w0")]))
        outcome = await run_job(inbox, user_id="u", prompt="hi", timeout_s=60)
        assert outcome == JobFailed(502, "the agent stopped without answering")
        assert trio.current_time() == 1


async def test_run_job_backstop_fires_when_a_worker_never_answers(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        inbox = await start_dispatcher(nursery)
        nursery.start_soon(
            partial(fake_worker, inbox, "w0", events=[JobStarted("w0")], finish=False)
        )
        outcome = await run_job(inbox, user_id="u", prompt="hi", timeout_s=10)
        assert outcome == JobFailed(504, "the job outlived its deadline without an answer")
        assert trio.current_time() == 10 + BACKSTOP_S


async def test_a_request_withdraws_its_job_only_while_someone_holds_it(autojump_clock):
    with trio.fail_after(LIMIT):
        inbox_send, inbox = trio.open_memory_channel(10)
        async with open_job(inbox_send, user_id="u", prompt="p", timeout_s=60) as (job, _):
            assert inbox.receive_nowait() == Submit(job)
        assert inbox.receive_nowait() == Withdraw(job.id)  # the client left: withdrawn
        async with open_job(inbox_send, user_id="u", prompt="p", timeout_s=60) as (job, _):
            assert inbox.receive_nowait() == Submit(job)
            job.answer(RunResult(success=True, output="ok", duration_ms=1))
        with pytest.raises(trio.WouldBlock):  # answered: nobody holds it, no message
            inbox.receive_nowait()
