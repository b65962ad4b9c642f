"""Collaboration tests of the dispatcher's session scheduling, with fake session actors.

No SDK and no subprocess. The test plays the session supervisor (it reads
``StartSession`` from the dispatcher and spawns one fake actor per key), the
session actors themselves (they follow the real actor's protocol:
``SessionStarted`` with their own inbox, ``SessionIdle`` whenever idle, one
``Job`` at a time, and they end on ``Hibernate`` or ``CloseSessionNow``, after
which the fake supervisor reports ``SessionStopped``), and the registry (it
answers ``DeleteSession``). The fakes write down what happened and when, so the
tests assert on who started, who was hibernated or closed, and at what virtual
time. Everything runs on trio's autojump clock, so times are asserted exactly.
"""

from __future__ import annotations

import time

import attrs
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from claude_code_api.actors.dispatcher import Dispatcher, PoolView, SessionLimits
from claude_code_api.actors.registry import DeleteSession
from claude_code_api.http.app import SHOWN_SESSION_STATES
from claude_code_api.http.jobs import close_session, pool_snapshot, run_job
from claude_code_api.messages import (
    TERMINAL_EVENTS,
    CloseSessionNow,
    Drain,
    Hibernate,
    Job,
    JobFailed,
    JobStarted,
    Queued,
    RunResult,
    SessionIdle,
    SessionKey,
    SessionStarted,
    SessionStopped,
    Submit,
    Withdraw,
)

# Virtual seconds: a test blocked for good jumps straight here and fails at once.
LIMIT = 10_000
# Long enough that no session hibernates for idleness unless a test means it to.
IDLE_S = 3600.0
USER = "u"
SHUTTING_DOWN = JobFailed(503, "service is shutting down")
SESSION_CLOSED = RunResult(success=False, output="session closed", duration_ms=0)


def key(session_id: str) -> SessionKey:
    return SessionKey(USER, session_id)


# --- the fakes ---------------------------------------------------------------------


class _StartFailed(Exception):
    pass


@attrs.define(eq=False)
class FakeSessions:
    """The session supervisor and every session actor, played by the test.

    ``start_s``: an actor's agent start (between ``SessionStarted`` and its first
    ``SessionIdle``); ``turn_s``: every turn; ``stop_s``: closing the agent after
    ``Hibernate`` / ``CloseSessionNow``, before the supervisor reports
    ``SessionStopped``. A turn whose prompt is in ``held`` is stuck until
    :meth:`release` (or until its session is closed).

    ``events`` is shared with the fake registry: ``(virtual time, what, detail)``
    where what is ``start``, ``turn``, ``done``, ``hibernate``, ``close``,
    ``close in turn``, ``stopped`` or ``delete`` (details: a session id or a prompt).
    """

    dispatcher: trio.MemorySendChannel
    start_s: float = 0.0
    turn_s: float = 0.0
    stop_s: float = 0.0
    events: list[tuple[float, str, str]] = attrs.Factory(list)
    alive: set[SessionKey] = attrs.Factory(set)
    max_alive: int = 0
    held: dict[str, trio.Event] = attrs.Factory(dict)
    # key -> (reason, after SessionStarted?): the next start of that key fails so.
    failures: dict[SessionKey, tuple[str, bool]] = attrs.Factory(dict)
    _changed: trio.Event = attrs.Factory(trio.Event)

    # --- what the tests read and steer ---

    def record(self, what: str, detail: str) -> None:
        self.events.append((trio.current_time(), what, detail))
        self._changed.set()
        self._changed = trio.Event()

    def times(self, what: str, detail: str) -> list[float]:
        return [t for t, w, d in self.events if (w, d) == (what, detail)]

    def details(self, what: str) -> list[str]:
        return [d for _, w, d in self.events if w == what]

    def index(self, what: str, detail: str) -> int:
        return [(w, d) for _, w, d in self.events].index((what, detail))

    async def wait_for(self, what: str, detail: str) -> float:
        """The time ``(what, detail)`` first happened, waiting for it if need be."""
        while not (times := self.times(what, detail)):
            await self._changed.wait()
        return times[0]

    def hold(self, *prompts: str) -> None:
        for prompt in prompts:
            self.held[prompt] = trio.Event()

    def release(self, prompt: str) -> None:
        self.held[prompt].set()

    # --- the fake session supervisor ---

    async def serve(
        self, starts: trio.MemoryReceiveChannel, *, task_status=trio.TASK_STATUS_IGNORED
    ):
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for message in starts:
                nursery.start_soon(self._supervise, message.key)

    async def _supervise(self, key: SessionKey) -> None:
        self.alive.add(key)
        self.max_alive = max(self.max_alive, len(self.alive))
        self.record("start", key.session_id)
        failure = None
        try:
            await self._run_actor(key)
        except _StartFailed as exc:
            # As the real actor reports an agent that cannot start.
            failure = JobFailed(502, f"session agent failed to start: {exc}")
        self.alive.discard(key)
        self.record("stopped", key.session_id)
        await self.dispatcher.send(SessionStopped(key, failure))

    # --- a fake session actor ---

    async def _run_actor(self, key: SessionKey) -> None:
        failure = self.failures.pop(key, None)
        inbox_send, inbox = trio.open_memory_channel(4)  # as SESSION_INBOX_SIZE
        async with inbox:
            if failure is not None and not failure[1]:
                await trio.sleep(self.start_s)
                raise _StartFailed(failure[0])  # e.g. the registry could not load it
            await self.dispatcher.send(SessionStarted(key, inbox_send))
            await trio.sleep(self.start_s)
            if failure is not None:
                raise _StartFailed(failure[0])  # the agent could not start
            await self.dispatcher.send(SessionIdle(key, None))
            while True:
                message = await inbox.receive()
                if isinstance(message, Hibernate):
                    self.record("hibernate", key.session_id)
                    break
                if isinstance(message, CloseSessionNow):
                    self.record("close", key.session_id)
                    break
                if not isinstance(message, Job):
                    self.record("unexpected", repr(message))
                    continue
                if await self._run_turn(key, message, inbox):
                    break
                await self.dispatcher.send(SessionIdle(key, True))
            await trio.sleep(self.stop_s)

    async def _run_turn(self, key: SessionKey, job: Job, inbox: trio.MemoryReceiveChannel) -> bool:
        """Answer ``job`` on its reply and close it; True if the session was closed meanwhile."""
        closed = False
        began = trio.current_time()
        self.record("turn", job.prompt)
        async with job.reply:
            await job.reply.send(JobStarted(f"session:{key.session_id}"))
            async with trio.open_nursery() as nursery:

                async def stop_on_close() -> None:
                    nonlocal closed
                    message = await inbox.receive()
                    if isinstance(message, CloseSessionNow):
                        self.record("close in turn", job.prompt)
                        closed = True
                        nursery.cancel_scope.cancel()
                    else:  # the dispatcher must not send anything else to a busy actor
                        self.record("unexpected in turn", repr(message))

                nursery.start_soon(stop_on_close)
                await trio.sleep(self.turn_s)
                if job.prompt in self.held:
                    await self.held[job.prompt].wait()
                nursery.cancel_scope.cancel()
            duration_ms = round((trio.current_time() - began) * 1000)
            self.record("done", job.prompt)  # before the client can see the answer
            if closed:  # interrupted, answered as the real turn answers it
                await job.reply.send(RunResult(success=False, output="", duration_ms=duration_ms))
            else:
                answer = f"answer to {job.prompt}"
                await job.reply.send(
                    RunResult(success=True, output=answer, duration_ms=duration_ms)
                )
        return closed


@attrs.define(eq=False)
class FakeRegistry:
    """Answers ``DeleteSession``: True if it held a record for the key (and drops it)."""

    sessions: FakeSessions
    records: set[SessionKey] = attrs.Factory(set)

    async def serve(
        self, inbox: trio.MemoryReceiveChannel, *, task_status=trio.TASK_STATUS_IGNORED
    ):
        task_status.started()
        async for message in inbox:
            if isinstance(message, DeleteSession):
                self.sessions.record("delete", message.key.session_id)
                existed = message.key in self.records
                self.records.discard(message.key)
                with message.reply:
                    message.reply.send_nowait(existed)
            else:
                self.sessions.record("unexpected registry message", repr(message))


@attrs.frozen
class Service:
    inbox: trio.MemorySendChannel
    sessions: FakeSessions
    registry: FakeRegistry


async def start_service(
    nursery: trio.Nursery,
    *,
    max_live: int = 2,
    per_session_max: int = 10,
    idle_s: float = IDLE_S,
    start_s: float = 0.0,
    turn_s: float = 0.0,
    stop_s: float = 0.0,
    records: tuple[str, ...] = (),
    view: PoolView | None = None,
) -> Service:
    """Start the fakes and a dispatcher in ``nursery`` (pytest-trio's, cancelled after the
    test), wired as the supervision tree wires the real ones."""
    inbox_send, inbox_receive = trio.open_memory_channel(0)
    starts_send, starts_receive = trio.open_memory_channel(max_live)
    registry_send, registry_receive = trio.open_memory_channel(8)
    sessions = FakeSessions(inbox_send.clone(), start_s=start_s, turn_s=turn_s, stop_s=stop_s)
    registry = FakeRegistry(sessions, {key(s) for s in records})
    dispatcher = Dispatcher(
        inbox_receive,
        pool_size=1,
        queue_max=20,
        session_starter=starts_send,
        registry=registry_send,
        session_limits=SessionLimits(
            max_live=max_live, per_session_max=per_session_max, idle_s=idle_s
        ),
        view=view,
    )
    await nursery.start(sessions.serve, starts_receive)
    await nursery.start(registry.serve, registry_receive)
    await nursery.start(dispatcher.serve)
    return Service(inbox_send, sessions, registry)


# --- the client side ----------------------------------------------------------------


async def submit(
    inbox: trio.MemorySendChannel, session_id: str, prompt: str, *, timeout_s: float = 60.0
) -> tuple[Job, trio.MemoryReceiveChannel]:
    """Submit a session turn as ``open_job`` builds it (its id is its prompt)."""
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=prompt,
        user_id=USER,
        prompt=prompt,
        submitted_at=now,
        deadline=now + timeout_s,
        reply=reply_send,
        session_id=session_id,
    )
    await inbox.send(Submit(job))
    return job, reply_receive


async def outcome(reply: trio.MemoryReceiveChannel):
    """The terminal event of a reply (skipping progress), checking the channel closes after."""
    async for event in reply:
        if isinstance(event, TERMINAL_EVENTS):
            with pytest.raises(trio.EndOfChannel):
                await reply.receive()
            return event
        assert isinstance(event, JobStarted | Queued)
    raise AssertionError("the reply closed without a terminal event")


async def no_answer_yet(reply: trio.MemoryReceiveChannel) -> bool:
    """True if ``reply`` holds no terminal event once every task is blocked (progress is
    consumed), and is still open."""
    await wait_all_tasks_blocked()
    while True:
        try:
            event = reply.receive_nowait()
        except trio.WouldBlock:
            return True
        except trio.EndOfChannel:
            return False
        if not isinstance(event, JobStarted | Queued):
            return False


async def session_states(inbox: trio.MemorySendChannel) -> dict[str, str]:
    await wait_all_tasks_blocked()
    snapshot = await pool_snapshot(inbox)
    # As GET /status shows them.
    return {
        view.key.session_id: SHOWN_SESSION_STATES.get(view.state, view.state.value)
        for view in snapshot.sessions
    }


def answer(prompt: str, duration_ms: int = 0) -> RunResult:
    return RunResult(success=True, output=f"answer to {prompt}", duration_ms=duration_ms)


# --- order and concurrency ----------------------------------------------------------


async def test_turns_of_a_session_run_one_at_a_time_in_order_beside_another_session(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=2, turn_s=5)
        replies = {}
        for session_id, prompt in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3")]:
            _, replies[prompt] = await submit(service.inbox, session_id, prompt)

        for prompt in ["a1", "a2", "a3"]:
            assert await outcome(replies[prompt]) == answer(prompt, 5000)
        assert await outcome(replies["b1"]) == answer("b1", 5000)
        assert trio.current_time() == 15

        fakes = service.sessions
        # Session a: each turn began when the one before it ended, in submission order.
        assert [fakes.times("turn", p) for p in ["a1", "a2", "a3"]] == [[0], [5], [10]]
        assert [d for d in fakes.details("turn") if d.startswith("a")] == ["a1", "a2", "a3"]
        # Session b ran alongside a's first turn, on its own actor; one actor per session.
        assert fakes.times("turn", "b1") == [0]
        assert fakes.times("start", "a") == fakes.times("start", "b") == [0]
        assert fakes.max_alive == 2
        assert await session_states(service.inbox) == {"a": "live", "b": "live"}


async def test_run_job_with_a_session_id_runs_on_that_sessions_actor(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, turn_s=2)
        result = await run_job(
            service.inbox, user_id=USER, prompt="hi", timeout_s=60, session_id="a"
        )
        assert result == answer("hi", 2000)
        assert trio.current_time() == 2
        assert service.sessions.details("start") == ["a"]


async def test_no_more_than_max_live_actors_are_alive_at_once(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=3, turn_s=1, stop_s=1)
        session_ids = [f"s{i}" for i in range(10)]
        replies = []
        for session_id in session_ids:
            for turn in range(2):
                prompt = f"{session_id}-{turn}"
                replies.append((prompt, (await submit(service.inbox, session_id, prompt))[1]))
        for prompt, reply in replies:
            assert await outcome(reply) == answer(prompt, 1000)

        fakes = service.sessions
        assert fakes.max_alive == 3
        # First slots are granted in arrival order, a wave once the one before it stopped
        # (1 s to close). A session that ran a turn yields its slot to a waiting one
        # instead of taking its second turn: every session's first turn ran before any
        # session's second.
        assert fakes.details("start")[:10] == session_ids
        assert [fakes.times("start", s)[0] for s in session_ids] == [0, 0, 0, 2, 2, 2, 4, 4, 4, 6]
        turns = fakes.details("turn")
        assert sorted(turns[:10]) == [f"{s}-0" for s in session_ids]
        for session_id in session_ids:  # and each session's turns ran in order
            assert turns.index(f"{session_id}-0") < turns.index(f"{session_id}-1")
        assert trio.current_time() == 13


# --- freeing a slot -------------------------------------------------------------------


async def test_least_recently_used_idle_session_is_hibernated_for_a_new_one(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=2, stop_s=1)
        fakes = service.sessions
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        await trio.sleep(5)
        assert await outcome((await submit(service.inbox, "b", "b1"))[1]) == answer("b1")
        await trio.sleep(5)
        # a was started first, but used again last: b is now the one idle longest.
        assert await outcome((await submit(service.inbox, "a", "a2"))[1]) == answer("a2")
        await trio.sleep(10)

        _, c_reply = await submit(service.inbox, "c", "c1")
        assert await session_states(service.inbox) == {"a": "live", "b": "stopping", "c": "waiting"}
        assert fakes.details("hibernate") == ["b"]
        assert fakes.times("hibernate", "b") == [20]
        assert await no_answer_yet(c_reply)

        assert await outcome(c_reply) == answer("c1")
        # c started only once b's actor had ended and been reported stopped.
        assert trio.current_time() == 21
        assert fakes.times("stopped", "b") == fakes.times("start", "c") == [21]
        assert fakes.index("stopped", "b") < fakes.index("start", "c")
        assert fakes.details("hibernate") == ["b"]
        assert fakes.max_alive == 2
        assert await session_states(service.inbox) == {"a": "live", "c": "live"}


async def test_the_registry_is_told_which_sessions_are_in_use_and_not_hibernated(
    autojump_clock, nursery
):
    """What the registry must not evict: live sessions and those with turns waiting."""
    with trio.fail_after(LIMIT):
        view = PoolView()
        assert view.sessions_in_use(USER) is None  # no dispatcher: nothing may be evicted
        service = await start_service(nursery, max_live=1, stop_s=1, view=view)
        assert view.sessions_in_use(USER) == frozenset()
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        assert view.sessions_in_use(USER) == {"a"}  # live (idle)
        _, b_reply = await submit(service.inbox, "b", "b1")
        assert await session_states(service.inbox) == {"a": "stopping", "b": "waiting"}
        assert view.sessions_in_use(USER) == {"a", "b"}
        assert view.sessions_in_use("someone else") == frozenset()
        assert await outcome(b_reply) == answer("b1")
        assert view.sessions_in_use(USER) == {"b"}  # a is hibernated: only its record is left


async def test_when_every_live_session_is_busy_a_new_turn_waits_for_one_to_finish(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=2, stop_s=1)
        fakes = service.sessions
        fakes.hold("a1", "b1")
        _, a_reply = await submit(service.inbox, "a", "a1")
        _, b_reply = await submit(service.inbox, "b", "b1")
        _, c_reply = await submit(service.inbox, "c", "c1")
        await trio.sleep(10)
        assert await session_states(service.inbox) == {"a": "busy", "b": "busy", "c": "waiting"}
        assert fakes.details("hibernate") == []  # never a busy one
        assert fakes.details("unexpected in turn") == []
        assert await no_answer_yet(c_reply)

        fakes.release("b1")
        assert await outcome(b_reply) == answer("b1", 10_000)
        assert await outcome(c_reply) == answer("c1")
        assert trio.current_time() == 11
        assert fakes.times("hibernate", "b") == [10]
        assert fakes.times("start", "c") == [11]
        assert await session_states(service.inbox) == {"a": "busy", "c": "live"}
        assert fakes.details("unexpected in turn") == []
        assert await no_answer_yet(a_reply)


async def test_a_turn_waiting_for_a_slot_times_out_exactly_at_its_deadline(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=1)
        fakes = service.sessions
        fakes.hold("a1")
        _, a_reply = await submit(service.inbox, "a", "a1")
        await trio.sleep(4)
        _, b_reply = await submit(service.inbox, "b", "b1", timeout_s=30)

        assert await outcome(b_reply) == RunResult(
            success=False, output="", duration_ms=30_000, timed_out=True
        )
        assert trio.current_time() == 34
        # The session that no longer has a turn no longer wants a slot.
        assert await session_states(service.inbox) == {"a": "busy"}
        fakes.release("a1")
        assert await outcome(a_reply) == answer("a1", 34_000)
        assert await session_states(service.inbox) == {"a": "live"}
        assert fakes.details("hibernate") == []
        assert fakes.details("start") == ["a"]
        snapshot = await pool_snapshot(service.inbox)
        assert (snapshot.processed, snapshot.failed) == (2, 1)


# --- idleness and waking ------------------------------------------------------------


async def test_an_idle_session_hibernates_after_exactly_idle_s(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, idle_s=100, stop_s=1)
        fakes = service.sessions
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        await trio.sleep(99)
        assert await session_states(service.inbox) == {"a": "live"}
        assert fakes.details("hibernate") == []

        assert await fakes.wait_for("hibernate", "a") == 100
        assert await session_states(service.inbox) == {"a": "stopping"}
        assert await fakes.wait_for("stopped", "a") == 101
        # Hibernated: no entry at all any more.
        assert await session_states(service.inbox) == {}


async def test_a_session_used_again_before_idle_s_stays_live(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, idle_s=100)
        fakes = service.sessions
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        await trio.sleep(60)
        assert await outcome((await submit(service.inbox, "a", "a2"))[1]) == answer("a2")
        await trio.sleep(40)  # 100 s after the first turn, 40 s after the second
        assert await session_states(service.inbox) == {"a": "live"}
        assert fakes.details("hibernate") == []
        assert await fakes.wait_for("hibernate", "a") == 160


async def test_a_hibernated_sessions_next_turn_wakes_it_on_a_new_actor(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, idle_s=100, start_s=2, stop_s=1)
        fakes = service.sessions
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        assert await fakes.wait_for("stopped", "a") == 103
        await trio.sleep(97)

        _, reply = await submit(service.inbox, "a", "a2")
        assert await session_states(service.inbox) == {"a": "starting"}
        assert await outcome(reply) == answer("a2")
        assert trio.current_time() == 202
        assert fakes.times("start", "a") == [0, 200]
        assert fakes.details("turn") == ["a1", "a2"]


async def test_a_turn_arriving_while_its_session_hibernates_runs_once_it_stopped(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, idle_s=100, stop_s=4)
        fakes = service.sessions
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        assert await fakes.wait_for("hibernate", "a") == 100
        await trio.sleep(1)
        _, reply = await submit(service.inbox, "a", "a2")
        assert await session_states(service.inbox) == {"a": "stopping"}
        assert await outcome(reply) == answer("a2")
        assert trio.current_time() == 104
        assert fakes.times("start", "a") == [0, 104]
        assert [(t, w) for t, w, d in fakes.events if d.startswith("a")] == [
            (0, "start"), (0, "turn"), (0, "done"),
            (100, "hibernate"), (104, "stopped"),
            (104, "start"), (104, "turn"), (104, "done"),
        ]  # fmt: skip


# --- per-session bound and withdrawal -------------------------------------------------


async def test_a_busy_session_accepts_per_session_max_waiting_turns_then_429(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, per_session_max=1)
        fakes = service.sessions
        fakes.hold("a1")
        _, a1 = await submit(service.inbox, "a", "a1")
        await wait_all_tasks_blocked()
        _, a2 = await submit(service.inbox, "a", "a2")
        _, a3 = await submit(service.inbox, "a", "a3")
        assert await outcome(a3) == JobFailed(
            429, "Too many turns waiting for session 'a', try again later", retry_after_s=1
        )
        assert trio.current_time() == 0
        assert await no_answer_yet(a2)
        # The bound is per session: another one is not affected.
        assert await outcome((await submit(service.inbox, "b", "b1"))[1]) == answer("b1")

        await trio.sleep(3)
        fakes.release("a1")
        assert await outcome(a1) == answer("a1", 3000)
        assert await outcome(a2) == answer("a2")
        assert fakes.details("turn") == ["a1", "b1", "a2"]


async def test_a_withdrawn_turn_never_runs_and_the_next_one_does(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery)
        fakes = service.sessions
        fakes.hold("a1")
        _, a1 = await submit(service.inbox, "a", "a1")
        _, a2 = await submit(service.inbox, "a", "a2")
        _, a3 = await submit(service.inbox, "a", "a3")
        await service.inbox.send(Withdraw("a2"))
        # The dispatcher closed the withdrawn job's reply without answering it.
        assert await a2.receive() == Queued(1)  # it had taken it: a1 runs, a2 is next
        with pytest.raises(trio.EndOfChannel):
            await a2.receive()
        fakes.release("a1")
        assert await outcome(a1) == answer("a1")
        assert await outcome(a3) == answer("a3")
        assert fakes.details("turn") == ["a1", "a3"]


async def test_a_session_whose_only_waiting_turn_is_withdrawn_no_longer_wants_a_slot(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=1)
        fakes = service.sessions
        fakes.hold("a1")
        _, a1 = await submit(service.inbox, "a", "a1")
        _, b1 = await submit(service.inbox, "b", "b1")
        assert await session_states(service.inbox) == {"a": "busy", "b": "waiting"}
        await service.inbox.send(Withdraw("b1"))
        assert await b1.receive() == Queued(0)
        with pytest.raises(trio.EndOfChannel):
            await b1.receive()
        assert await session_states(service.inbox) == {"a": "busy"}

        await trio.sleep(5)
        fakes.release("a1")
        assert await outcome(a1) == answer("a1", 5000)
        # a, now idle, is not hibernated for b, and b never starts.
        assert await session_states(service.inbox) == {"a": "live"}
        assert fakes.details("hibernate") == []
        assert fakes.details("start") == ["a"]


# --- closing ----------------------------------------------------------------------------


async def test_closing_an_idle_session_ends_its_actor_then_deletes_the_record(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, stop_s=1, records=("a",))
        fakes = service.sessions
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1")
        await trio.sleep(5)

        closed = {}

        async def close() -> None:
            closed["result"] = await close_session(service.inbox, key("a"))
            closed["at"] = trio.current_time()

        nursery.start_soon(close)
        assert await session_states(service.inbox) == {"a": "stopping"}
        assert fakes.times("close", "a") == [5]
        assert fakes.details("delete") == []  # not while the actor may still write it
        assert closed == {}

        assert await fakes.wait_for("delete", "a") == 6
        assert fakes.index("close", "a") < fakes.index("stopped", "a") < fakes.index("delete", "a")
        await wait_all_tasks_blocked()
        assert closed == {"result": True, "at": 6}
        assert service.registry.records == set()
        assert await session_states(service.inbox) == {}


@pytest.mark.parametrize("had_record", [True, False])
async def test_closing_an_unknown_session_asks_the_registry_at_once(
    autojump_clock, nursery, had_record
):
    with trio.fail_after(LIMIT):
        # A hibernated session has a record but no entry in the dispatcher.
        service = await start_service(nursery, records=("a",) if had_record else ())
        await trio.sleep(3)
        assert await close_session(service.inbox, key("a")) is had_record
        assert trio.current_time() == 3
        assert service.sessions.events == [(3, "delete", "a")]


async def test_closing_a_busy_session_interrupts_its_turn_and_answers_its_waiting_turns(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, stop_s=1, records=("a",))
        fakes = service.sessions
        fakes.hold("a1")  # stuck until the close interrupts it
        a1_job, a1 = await submit(service.inbox, "a", "a1")
        _, a2 = await submit(service.inbox, "a", "a2")
        _, a3 = await submit(service.inbox, "a", "a3")
        await trio.sleep(3)
        assert await session_states(service.inbox) == {"a": "busy"}

        closed = {}

        async def close() -> None:
            closed["result"] = await close_session(service.inbox, key("a"))
            closed["at"] = trio.current_time()

        nursery.start_soon(close)
        assert await outcome(a2) == SESSION_CLOSED
        # The running turn's own cancellation cuts it at once (the actor reads the close after).
        assert a1_job.cancellation.reason == "session closed"
        assert await outcome(a3) == SESSION_CLOSED
        assert await outcome(a1) == RunResult(success=False, output="", duration_ms=3000)
        assert trio.current_time() == 3
        assert fakes.times("close in turn", "a1") == [3]
        assert await session_states(service.inbox) == {"a": "stopping"}
        assert fakes.details("delete") == []

        assert await fakes.wait_for("delete", "a") == 4
        assert fakes.index("stopped", "a") < fakes.index("delete", "a")
        await wait_all_tasks_blocked()
        assert closed == {"result": True, "at": 4}
        assert fakes.details("turn") == ["a1"]
        assert await session_states(service.inbox) == {}


async def test_closing_a_session_waiting_for_a_slot_answers_its_turns_and_deletes_at_once(
    autojump_clock, nursery
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=1)
        fakes = service.sessions
        fakes.hold("a1")
        await submit(service.inbox, "a", "a1")
        _, b1 = await submit(service.inbox, "b", "b1")
        await trio.sleep(2)
        # The session was known, so the close reports it even without a record yet.
        assert await close_session(service.inbox, key("b")) is True
        assert trio.current_time() == 2
        assert await outcome(b1) == SESSION_CLOSED
        assert fakes.times("delete", "b") == [2]
        assert await session_states(service.inbox) == {"a": "busy"}
        assert fakes.details("start") == ["a"]


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("after_started", [False, True], ids=["before-started", "after-started"])
async def test_a_session_that_fails_to_start_fails_its_waiting_turns_then_retries_later(
    autojump_clock, nursery, after_started
):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, start_s=1)
        fakes = service.sessions
        fakes.failures[key("a")] = ("boom", after_started)
        _, a1 = await submit(service.inbox, "a", "a1")
        _, a2 = await submit(service.inbox, "a", "a2")
        failed = JobFailed(502, "session agent failed to start: boom")
        assert await outcome(a1) == failed
        assert await outcome(a2) == failed
        assert trio.current_time() == 1
        assert await session_states(service.inbox) == {}

        await trio.sleep(4)
        assert await outcome((await submit(service.inbox, "a", "a3"))[1]) == answer("a3")
        assert trio.current_time() == 6
        assert fakes.times("start", "a") == [0, 5]
        assert fakes.details("turn") == ["a3"]


# --- drain ----------------------------------------------------------------------------------


async def test_drain_waits_for_a_busy_session_to_report_idle(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=1)
        fakes = service.sessions
        fakes.hold("a1")
        _, a1 = await submit(service.inbox, "a", "a1")
        _, a2 = await submit(service.inbox, "a", "a2")
        _, b1 = await submit(service.inbox, "b", "b1")
        await trio.sleep(2)

        done_send, done = trio.open_memory_channel(1)
        await service.inbox.send(Drain(done_send))
        assert await outcome(a2) == SHUTTING_DOWN
        assert await outcome(b1) == SHUTTING_DOWN
        _, c1 = await submit(service.inbox, "c", "c1")
        assert await outcome(c1) == SHUTTING_DOWN
        await trio.sleep(8)
        await wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):  # the session is still busy
            done.receive_nowait()

        fakes.release("a1")
        assert await done.receive() is None
        assert trio.current_time() == 10
        with pytest.raises(trio.EndOfChannel):
            await done.receive()
        assert await outcome(a1) == answer("a1", 10_000)
        assert fakes.details("start") == ["a"]


# --- what /status shows ----------------------------------------------------------------------


async def test_snapshot_shows_each_sessions_state_at_each_step(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        service = await start_service(nursery, max_live=1, start_s=1, stop_s=1)
        fakes = service.sessions
        inbox = service.inbox
        fakes.hold("a2", "b1")
        assert await session_states(inbox) == {}

        _, a1 = await submit(inbox, "a", "a1")
        assert await session_states(inbox) == {"a": "starting"}
        assert await outcome(a1) == answer("a1")
        assert trio.current_time() == 1
        assert await session_states(inbox) == {"a": "live"}

        _, a2 = await submit(inbox, "a", "a2")
        assert await session_states(inbox) == {"a": "busy"}
        _, b1 = await submit(inbox, "b", "b1")
        assert await session_states(inbox) == {"a": "busy", "b": "waiting"}

        fakes.release("a2")
        assert await outcome(a2) == answer("a2")
        assert await session_states(inbox) == {"a": "stopping", "b": "waiting"}

        await trio.sleep(1)  # a's actor ends; b gets the slot
        assert await session_states(inbox) == {"b": "starting"}
        await trio.sleep(1)  # b's agent is up and on its turn
        assert await session_states(inbox) == {"b": "busy"}
        fakes.release("b1")
        assert await outcome(b1) == answer("b1")
        assert await session_states(inbox) == {"b": "live"}
        assert trio.current_time() == 3


# --- bugs ----------------------------------------------------------------------------------------


async def finishes_within_real_seconds(seconds: float, async_fn) -> bool:
    """Run ``async_fn``; False if it had not finished after ``seconds`` of *real* time.

    A task that never blocks freezes the autojump clock, so no ``fail_after``
    ever fires; only a thread sleeping in real time can notice it.
    """
    finished = False
    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:
            await trio.to_thread.run_sync(time.sleep, seconds, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watchdog)
        await async_fn()
        finished = True
        nursery.cancel_scope.cancel()
    return finished


async def test_idle_hibernation_at_a_deadline_that_rounds_down_in_floats(autojump_clock, nursery):
    with trio.fail_after(LIMIT):
        # Idle from t=0.2, idle_s=0.5: 0.2 + 0.5 == 0.7 but 0.7 - 0.2 < 0.5 in floats.
        service = await start_service(nursery, idle_s=0.5, turn_s=0.2)
        assert await outcome((await submit(service.inbox, "a", "a1"))[1]) == answer("a1", 200)
        assert trio.current_time() == 0.2

        hibernated_at = []

        async def wait_for_hibernation() -> None:
            hibernated_at.append(await service.sessions.wait_for("hibernate", "a"))

        assert await finishes_within_real_seconds(2, wait_for_hibernation), (
            "the dispatcher never hibernated the session and virtual time stood still"
        )
        assert hibernated_at == [0.2 + 0.5]
