"""Dispatcher actor: the queue, and which worker gets which job.

It owns the :class:`JobQueue`, the set of idle workers and what ``/health`` and
``/status`` report. Everything reaches it as a message on its inbox; it never
awaits anyone else (every send it makes is ``send_nowait`` on a channel with room
reserved for it), so a slow client or worker can never stall dispatch.

* A job starts the moment a worker is warm: a :class:`WorkerReady` or a
  :class:`Submit` each dispatch at once. No polling, and jobs submitted while the
  pool is still warming wait in the queue instead of being forgotten.
* ``pool_size`` warm agents are for anyone, and never more than ``pool_size``
  jobs run at once. With ``AGENT_REUSE_S`` (``kept_max`` set) the service starts
  ``pool_size`` + ``kept_max`` spare workers, dormant (no process): for the
  agents running jobs and those kept. The dispatcher keeps
  ``pool_size`` agents warm or warming for anyone (*unassigned*): when a job takes
  one, or an agent is kept for the user it served (``WorkerReady.bound_to``:
  *kept*), a dormant worker is woken (:class:`Warm`) to warm one in its place —
  once the running jobs have answered, while another agent is still warm;
  past ``kept_max`` kept agents, or when no dormant worker is left to wake, the
  oldest kept one is retired (:class:`Retire`) and its worker goes dormant
  (:meth:`Dispatcher._balance`). So a kept agent never makes another user wait
  for a cold start while the pool is idle. An agent is kept only for a user whose
  previous one-shot came within ``AGENT_REUSE_S`` (:class:`ReturningUsers`): a
  user who sends one request costs no kept agent. (Without spares, a worker
  replaces its agent after every job: the original's pool.)
* A job goes to a kept agent of its own user first, else to an unassigned warm
  one, else waits for one warming; another user's kept agent takes it (its
  worker replaces the agent first) only when no unassigned one is warm or
  warming (every other worker failed or is busy).
* Each job's deadline covers its wait here: an overdue queued job is answered
  ``timed_out`` by the dispatcher; once running, its worker enforces the rest.
* The queue is fair between users (round-robin between their lines, FIFO within
  one: :class:`JobQueue`). A full queue answers 429, and so does a user's full
  line (``queue_max_per_user``) while other users' jobs are still taken; a pool whose every worker failed its last warm-up
  answers 503 at once, naming the last failure, instead of letting jobs hang.
* One user runs at most ``max_running_per_user`` things at once, one-shot jobs
  and session turns counted together (:meth:`Dispatcher.running_counts`): a job
  of a user at that bound waits in their line, passed over (keeping its place)
  while other users' jobs start on the idle workers; the session scheduler
  applies the same bound to its turns and live slots.

* It answers every :class:`Submit` at once: :class:`Queued` (with the number of
  runs ahead of it) when it takes the job, or the refusal — so a streamed reply
  knows its status before it starts.
* It knows every queued and running job (which worker or session runs which),
  so it lists a user's runs for ``/status`` and cancels a run by id for its owner
  (:class:`CancelRun`): a queued one is answered ``cancelled`` at once, a running
  one has its :class:`Cancellation` set, which its turn watches.

Error handling: a worker that died between offering itself and receiving a job
is noticed when the hand-over fails; the job goes back to the front of the queue.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Never, assert_never

import attrs
import trio

from ..messages import (
    DEFAULT_OPTIONS,
    CancelRun,
    ClientRequest,
    CloseSession,
    DispatcherMessage,
    Drain,
    HandOverSession,
    Job,
    JobFailed,
    PoolSnapshot,
    Queued,
    Retire,
    RunResult,
    RunState,
    RunView,
    SessionDeleted,
    SessionIdle,
    SessionKey,
    SessionReport,
    SessionsReset,
    SessionStarted,
    SessionStopped,
    StartSession,
    StatusRequest,
    Submit,
    UpstreamError,
    UserMemoryChanged,
    Warm,
    Withdraw,
    WorkerCommand,
    WorkerDormant,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerReport,
    WorkerStarting,
    WorkerState,
    WorkerView,
    answer_once,
)
from ..observe import metrics
from .job_queue import JobQueue
from .registry import DeleteSession, RegistryMessage
from .returning_users import ReturningUsers
from .session_scheduler import SessionScheduler

log = logging.getLogger(__name__)

QUEUE_FULL_ERROR = "Queue is full, try again later"
USER_QUEUE_FULL_ERROR = "Too many of your requests are waiting, try again later"
RETRY_AFTER_S = 1
SHUTTING_DOWN = JobFailed(503, "service is shutting down")
RESTARTING = JobFailed(503, "the dispatcher restarted; try again")
# Cancellation.reason of a run cancelled by its owner (DELETE /runs/{runId}).
CANCELLED = "cancelled"
# Model API statuses that mean the service's credentials are refused.
AUTH_STATUSES = (401, 403)


@attrs.define
class _WorkerRecord:
    state: WorkerState = WorkerState.STARTING
    busy_since: float | None = None
    jobs: int = 0
    last_error: str | None = None
    # Its latest warm-up attempt failed and it has not been ready since.
    failing: bool = False
    # Where its one command goes: offered with WorkerReady or WorkerDormant.
    inbox: trio.MemorySendChannel[WorkerCommand] | None = None
    job: Job | None = None  # the job handed to it and not finished yet
    bound_to: str | None = None  # its ready agent served this user last (WorkerReady)


@attrs.define(eq=False)
class PoolView:
    """The pool's state as ``/health`` shows it, read without a message to the dispatcher.

    The running dispatcher publishes how to read it (a restarted one replaces
    that); :meth:`read` answers at once from the dispatcher's own state, so
    ``/health`` never waits behind the jobs in the dispatcher's inbox. Only on
    the trio thread: the dispatcher changes its state between two messages, never
    across an await, so what a reader sees is consistent.
    """

    source: Callable[[], PoolSnapshot] | None = None

    def read(self) -> PoolSnapshot | None:
        """The pool's workers, queue and state now (no sessions, no runs); None: no dispatcher."""
        return None if self.source is None else self.source()

    sessions_source: Callable[[str], frozenset[str]] | None = None

    def sessions_in_use(self, user_id: str) -> frozenset[str] | None:
        """Ids of ``user_id``'s sessions that are live or have turns waiting; None: no dispatcher.

        The registry asks it before it evicts a hibernated session of that user.
        """
        return None if self.sessions_source is None else self.sessions_source(user_id)

    runs_source: Callable[[], tuple[RunView, ...]] | None = None
    # Set by the dispatcher at each turn of its loop (its runs may have changed).
    changed: trio.Event = attrs.field(factory=trio.Event)

    def runs(self) -> tuple[RunView, ...]:
        """Every user's queued and running runs now; none without a dispatcher."""
        return () if self.runs_source is None else self.runs_source()

    async def wait_changed(self) -> None:
        """Return after the dispatcher's next turn (at once if one came since the last call)."""
        await self.changed.wait()
        self.changed = trio.Event()


@attrs.frozen
class SessionLimits:
    max_live: int = 8
    per_session_max: int = 10
    idle_s: float = 30 * 60.0


class Dispatcher:
    """See the module docstring. ``inbox`` is the receive end of its channel.

    ``session_starter`` (send end, room for ``max_live`` messages) reaches the
    session supervisor; ``registry`` (send end with spare room) the registry.
    """

    def __init__(
        self,
        inbox: trio.MemoryReceiveChannel[DispatcherMessage],
        *,
        pool_size: int,
        queue_max: int,
        queue_max_per_user: int | None = None,
        session_starter: trio.MemorySendChannel[StartSession] | None = None,
        registry: trio.MemorySendChannel[RegistryMessage] | None = None,
        session_limits: SessionLimits = SessionLimits(),
        view: PoolView | None = None,
        max_running_per_user: int | None = None,
        refusal_for: Callable[[str], JobFailed | None] | None = None,
        kept_max: int | None = None,
        reuse_s: float | None = None,
    ):
        self.inbox = inbox
        # A user's new work refused before it queues (their daily budget spent: usage.py).
        self.refusal_for = refusal_for
        self.view = view
        self.registry = registry
        self.session_starter = session_starter
        # None: no bound (the collaboration tests' default; the service always sets one).
        self.max_running_per_user = max_running_per_user
        self.sessions = SessionScheduler(
            max_live=session_limits.max_live,
            per_session_max=session_limits.per_session_max,
            max_waiting_sessions=queue_max,
            max_waiting_sessions_per_user=queue_max_per_user,
            idle_s=session_limits.idle_s,
            start_session=self._start_session,
            delete_record=self._delete_record,
            max_running_per_user=max_running_per_user,
            running_elsewhere=self._jobs_running,
        )
        self.queue = JobQueue(queue_max, queue_max_per_user)
        self.workers: dict[str, _WorkerRecord] = {}
        self.pool_size = pool_size
        # AGENT_REUSE_MAX: kept agents at most. None: no bound and no spares (the
        # collaboration tests' default); 0: no reuse and no spares. Otherwise there are
        # pool_size + kept_max spare workers (Settings.spare_workers).
        self.kept_max = kept_max
        # AGENT_REUSE_S: an agent is kept only for a user who came back within it. None:
        # for every user (the collaboration tests' default).
        self.returning = None if reuse_s is None else ReturningUsers(reuse_s)
        spares = pool_size + kept_max if kept_max else 0
        self.expected_workers = pool_size + spares
        self.idle: list[str] = []  # ready and kept worker ids, longest idle first
        self.processed = 0
        self.failed = 0
        self.last_failure: str | None = None  # the newest warm-up failure of any worker
        self.draining = False
        self.drained_waiters: list[trio.MemorySendChannel[None]] = []
        self.ever_ready = False
        self.upstream_auth_error: UpstreamError | None = None
        self.upstream_auth_error_at: float | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle messages until cancelled or the inbox closes.

        The inbox belongs to the supervision tree, not to this actor, so a
        restarted dispatcher (a fresh object) reads the same inbox. If this one
        crashes, the jobs it holds are answered 503 on the way out.
        """
        if self.view is not None:
            self.view.source = self.health_snapshot
            self.view.sessions_source = self.sessions.session_ids_of
            self.view.runs_source = self.all_runs
        task_status.started()
        try:
            while True:
                now = trio.current_time()
                self.on_time(now)
                if self.view is not None:
                    self.view.changed.set()  # (a watcher of runs reads them when it can)
                wake_at = self.next_deadline()
                if wake_at <= now:  # a bug: waking for it again would spin without receiving
                    log.error("dispatcher: a deadline stayed in the past; waking in 1 s")
                    wake_at = now + 1.0
                with trio.move_on_at(wake_at):
                    try:
                        message = await self.inbox.receive()
                    except trio.EndOfChannel:
                        return
                    self.handle(message)
        except BaseException:
            self._fail_queued(SHUTTING_DOWN if self.draining else RESTARTING)
            self.sessions.fail_all_waiting(SHUTTING_DOWN if self.draining else RESTARTING)
            raise
        finally:
            if self.view is not None and self.view.source == self.health_snapshot:
                self.view.source = None
                self.view.sessions_source = None
                self.view.runs_source = None
                self.view.changed.set()

    def on_time(self, now: float) -> None:
        """Everything due by ``now``, then dispatch: after it, no deadline is in the past."""
        self._expire_queued(now)
        self.sessions.hibernate_idle(now)
        self._balance()  # first: a job waits for an agent warming, never replaces a kept one
        self._dispatch()
        self._balance()  # the agents jobs just took: replaced now if none is left warm
        self.sessions.schedule()
        if self.draining:
            self._notify_if_drained()

    def next_deadline(self) -> float:
        return min(self.queue.next_deadline(), self.sessions.next_deadline())

    # --- messages ---------------------------------------------------------

    def handle(self, message: DispatcherMessage) -> None:
        """Take one message; never awaits."""
        match message:
            case Submit() | Withdraw() | CancelRun() | StatusRequest() | Drain():
                self._handle_client(message)
            case WorkerStarting() | WorkerReady() | WorkerFinished() | WorkerFailed():
                self._handle_worker(message)
            case WorkerDormant():
                self._handle_worker(message)
            case SessionStarted() | SessionIdle() | SessionStopped() | SessionsReset():
                self._handle_session(message)
            case CloseSession() | UserMemoryChanged() | HandOverSession():
                self._handle_session(message)
            case _:
                # Checked as assert_never is, but a stray object is logged, not raised: a
                # restarted dispatcher fails every job it holds.
                _unknown(message)

    def _handle_client(self, message: ClientRequest) -> None:
        match message:
            case Submit(job):
                self._submit(job)
            case Withdraw(job_id):
                withdrawn = self.queue.remove(job_id) or self.sessions.withdraw(job_id)
                if withdrawn is not None:
                    withdrawn.reply.close()  # unanswered: its client has left
                    waited_s = trio.current_time() - withdrawn.submitted_at
                    metrics.run_answered(withdrawn.user_id, waited_s, "cancelled")
            case CancelRun(user_id, run_id, ack):
                answer_once(ack, self._cancel_run(user_id, run_id))
            case StatusRequest(reply, user_id):
                try:
                    reply.send_nowait(self.snapshot(user_id))
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            case Drain(done):
                self.draining = True
                self.drained_waiters.append(done)
                self._fail_queued(SHUTTING_DOWN)
                self.sessions.fail_all_waiting(SHUTTING_DOWN)
            case _:
                assert_never(message)

    def _handle_worker(self, message: WorkerReport) -> None:
        record = self._record(message.worker_id)
        if not isinstance(message, WorkerFinished):
            self._drop_offer(record)  # any offer it made before is void
            self._forget_idle(message.worker_id)
        match message:
            case WorkerStarting():
                record.state, record.busy_since, record.job = WorkerState.STARTING, None, None
            case WorkerReady(worker_id, inbox, bound_to):
                record.state = WorkerState.READY if bound_to is None else WorkerState.KEPT
                record.failing, record.inbox, record.bound_to = False, inbox, bound_to
                record.busy_since = record.job = None
                self.ever_ready = True
                self.idle.append(worker_id)
            case WorkerFinished(_worker_id, _job_id, ok, upstream_error):
                self._count_turn(ok, upstream_error)
                record.state, record.bound_to = self._after_job(record.job, ok)
                record.busy_since = record.job = None
            case WorkerDormant(_worker_id, inbox):
                record.state, record.inbox, record.bound_to = WorkerState.DORMANT, inbox, None
                record.busy_since = record.job = None
            case WorkerFailed(_worker_id, reason):
                record.state, record.failing, record.last_error = WorkerState.ERROR, True, reason
                self.last_failure = reason
                record.busy_since = record.job = None
                if self.degraded_reason() is not None:
                    self._fail_queued(self._unavailable())
            case _:
                assert_never(message)

    def _handle_session(self, message: SessionReport) -> None:
        match message:
            case SessionStarted(key, inbox, actor):
                self.sessions.started(key, inbox, actor)
            case SessionIdle(key, finished_ok, upstream_error, actor):
                if finished_ok is not None:
                    self._count_turn(finished_ok, upstream_error)
                self.sessions.idle(key, trio.current_time(), actor)
            case SessionStopped(key, failure, actor):
                self.sessions.stopped(key, failure, actor)
            case SessionsReset():
                self.sessions.reset()
            case CloseSession(key, ack, deleted):
                self.sessions.close(key, ack, deleted)
            case UserMemoryChanged(user_id):
                self.sessions.memory_changed(user_id)
            case HandOverSession(key):
                self.sessions.hand_over(key)
            case _:
                assert_never(message)

    def _count_turn(self, ok: bool, upstream_error: UpstreamError | None) -> None:
        self.processed += 1
        self.failed += 0 if ok else 1
        if upstream_error is not None and upstream_error.status in AUTH_STATUSES:
            self.upstream_auth_error, self.upstream_auth_error_at = upstream_error, time.time()
        elif ok:
            self.upstream_auth_error = self.upstream_auth_error_at = None

    def _submit(self, job: Job) -> None:
        """Take ``job`` (answering :class:`Queued`) or refuse it (its terminal answer), at once."""
        if job.session_id is None and self.returning is not None:
            came_back = self.returning.came_back(job.user_id, job.submitted_at)
            job = attrs.evolve(job, keep_agent=came_back)
        refusal = None if self.refusal_for is None else self.refusal_for(job.user_id)
        if self.draining:
            job.answer(SHUTTING_DOWN)
        elif refusal is not None:
            job.answer(refusal)
        elif job.session_id is not None:
            refusal = self.sessions.submit(job)
            if refusal is not None:
                job.answer(refusal)
            else:
                _acknowledge(job, self.sessions.turns_ahead(job))
        elif self.degraded_reason() is not None:
            job.answer(self._unavailable())
        elif self._starts_at_once(job.user_id):
            self.queue.push(job)
            _acknowledge(job, 0)
        elif self.queue.full:
            job.answer(JobFailed(429, QUEUE_FULL_ERROR, retry_after_s=RETRY_AFTER_S))
        elif self.queue.full_for(job.user_id):
            job.answer(JobFailed(429, USER_QUEUE_FULL_ERROR, retry_after_s=RETRY_AFTER_S))
        else:
            self.queue.push(job)
            _acknowledge(job, self.queue.ahead_of(job.id))

    def _cancel_run(self, user_id: str, run_id: str) -> bool:
        """DELETE /runs/{run_id}: True when it was ``user_id``'s and queued or running.

        A queued one is answered ``cancelled`` now; a running one has its
        cancellation set, which its turn watches (it is interrupted, drained, and
        answers ``cancelled`` with its partial output).
        """
        queued = self.queue.get(run_id) or self.sessions.queued_job(run_id)
        if queued is not None:
            if queued.user_id != user_id:
                return False
            self.queue.remove(run_id) or self.sessions.withdraw(run_id)
            waited_ms = round((trio.current_time() - queued.submitted_at) * 1000)
            queued.answer(
                RunResult(success=False, output="", duration_ms=waited_ms, cancelled=True)
            )
            return True
        for job, _since in self._running():
            if job.id == run_id:
                if job.user_id != user_id:
                    return False
                job.cancellation.cancel(CANCELLED)
                return True
        return False

    # --- dispatch ---------------------------------------------------------

    def _dispatch(self) -> None:
        if not (self.idle and len(self.queue)):  # the usual case: nothing to do
            return
        cap = self.max_running_per_user
        running = self.running_counts()

        def may_run(user_id: str) -> bool:
            return (cap is None or running[user_id] < cap) and self._worker_for(user_id) is not None

        one_shots = self._one_shots_running()
        while self.idle and len(self.queue) and one_shots < self.pool_size:
            job = self.queue.pop_next(may_run)
            if job is None:  # every user waiting runs all they may already, or waits for an agent
                break
            worker_id = self._worker_for(job.user_id)
            assert worker_id is not None
            self.idle.remove(worker_id)
            record = self.workers[worker_id]
            inbox, record.inbox = record.inbox, None
            assert inbox is not None
            try:
                inbox.send_nowait(job)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                # The worker died after offering itself; its supervisor restarts it.
                self.queue.push_front(job)
                record.state = WorkerState.STARTING
                continue
            finally:
                inbox.close()  # one job per offer
            record.state, record.busy_since, record.job = WorkerState.BUSY, time.time(), job
            record.jobs += 1
            running[job.user_id] += 1
            one_shots += 1

    def _balance(self) -> None:
        """Keep ``pool_size`` agents warm or warming for anyone, and ``kept_max`` kept at most.

        ``pool_size`` unassigned agents whatever runs: the agent a job takes is replaced
        as the job starts when no other is warm (a warm-up with the real CLI takes several
        one-shots' time), else once the running jobs have answered, so that no start
        takes the CPU from a job while the next user's agent is ready anyway. Past ``kept_max`` kept agents
        (counting those being reset for their user) the oldest (longest idle) is retired,
        and so are unassigned warm ones beyond ``pool_size`` (after a worker's restart).
        While the pool is short, dormant workers are woken; with none left, the oldest
        kept agent is retired to make room: an agent for anyone comes before one kept for
        a user. Only with spares (``kept_max`` set).
        """
        if self.kept_max is None or len(self.workers) < self.expected_workers:
            return  # (at start-up, a spare may report before the pool's workers warming)
        kept = self._idle_in(WorkerState.KEPT)
        # Those being reset for their user count already: the oldest makes room at once.
        resetting = sum(
            1 for r in self.workers.values() if r.state is WorkerState.KEPT and r.inbox is None
        )
        retired = kept[: max(0, len(kept) + resetting - self.kept_max)]
        ready = self._idle_in(WorkerState.READY)
        retired += ready[::-1][: max(0, len(ready) + self._warming() - self.pool_size)]
        for worker_id in retired:
            self._command(worker_id, Retire(), WorkerState.DORMANT)
        short = self.pool_size - self._unassigned()
        if self._one_shots_running() and self._idle_in(WorkerState.READY):
            # A warm agent still waits for the next user: the replacements warm once the
            # running jobs have answered. A start (a process and its set-up, ~0.3 s of CPU
            # with the real CLI) taken during a job slows that job on a small machine.
            short = 0
        dormant = [r for r in sorted(self.workers.items()) if r[1].state is WorkerState.DORMANT]
        wakeable = [worker_id for worker_id, record in dormant if record.inbox is not None]
        for worker_id in wakeable[: max(0, short)]:
            self._command(worker_id, Warm(), WorkerState.STARTING)
        # Those going dormant (told to, or done with their agent) are woken when they report.
        room = short - len(dormant)
        for worker_id in [w for w in kept if w not in retired][: max(0, room)]:
            self._command(worker_id, Retire(), WorkerState.DORMANT)

    def _idle_in(self, state: WorkerState) -> list[str]:
        """Idle workers in ``state`` (READY or KEPT), longest idle first."""
        return [w for w in self.idle if self.workers[w].state is state]

    def _command(self, worker_id: str, command: Warm | Retire, state: WorkerState) -> None:
        """Send an idle or dormant worker its one command; it is in ``state`` from now."""
        record = self.workers[worker_id]
        self._forget_idle(worker_id)
        inbox, record.inbox = record.inbox, None
        assert inbox is not None
        try:
            inbox.send_nowait(command)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            state = WorkerState.STARTING  # it died: its supervisor restarts it, and it reports
        finally:
            inbox.close()
        record.state = state

    def _after_job(self, job: Job | None, ok: bool) -> tuple[WorkerState, str | None]:
        """What a worker that finished ``job`` is until it reports, and for whom.

        With spares, its agent is no longer unassigned: after a job that went well and
        changed nothing on the agent, of a user who came back (``Job.keep_agent``), it is
        being reset for that job's user (``KEPT``, not offered yet: that user's next job
        waits for it rather than take an unassigned agent); else it is going dormant.
        Without spares, or after a job that ran on a process of its own, it warms or is
        offered again as it was.
        """
        if self.kept_max is None or job is None or job.options.needs_own_process:
            return WorkerState.STARTING, None
        if ok and job.options == DEFAULT_OPTIONS and job.keep_agent:
            return WorkerState.KEPT, job.user_id
        return WorkerState.DORMANT, None

    def _one_shots_running(self) -> int:
        return sum(1 for r in self.workers.values() if r.job is not None)

    def _warming(self) -> int:
        """Workers warming an agent for anyone (no job carried)."""
        return sum(
            1 for r in self.workers.values() if r.state is WorkerState.STARTING and r.job is None
        )

    def _unassigned(self) -> int:
        """Agents warm or warming for anyone, and those of failed workers: their supervisor
        restarts them (a spare woken in their place would only fail too in a crash loop)."""
        ready = sum(1 for w in self.idle if self.workers[w].state is WorkerState.READY)
        failed = sum(1 for r in self.workers.values() if r.state is WorkerState.ERROR)
        # A job run on a process of its own leaves its worker's warm agent as it was.
        aside = sum(
            1
            for r in self.workers.values()
            if r.job is not None and r.job.options.needs_own_process and r.bound_to is None
        )
        return ready + self._warming() + failed + aside

    def _worker_for(self, user_id: str) -> str | None:
        """The idle worker to run a job of ``user_id``: the longest idle of those whose agent
        is kept for that user, else of the unassigned ones; else, unless one is warming, the
        longest idle agent kept for another user (replaced first: an agent never serves two
        users); None: the job waits."""
        for wanted in (user_id, None):
            if wanted is None and self._being_kept_for(user_id):
                return None  # it is offered in a moment: a reset, not a warm-up
            for worker_id in self.idle:
                if self.workers[worker_id].bound_to == wanted:
                    return worker_id
        if not self.idle or self._warming():
            return None
        return self.idle[0]

    def _being_kept_for(self, user_id: str) -> bool:
        """A worker that just ran a job of ``user_id`` is resetting its agent for them."""
        return any(
            r.state is WorkerState.KEPT and r.inbox is None and r.bound_to == user_id
            for r in self.workers.values()
        )

    def _starts_at_once(self, user_id: str) -> bool:
        """A job of ``user_id`` submitted now starts at once."""
        cap = self.max_running_per_user
        return (
            (cap is None or self.running_counts()[user_id] < cap)
            and self._one_shots_running() < self.pool_size
            and self._worker_for(user_id) is not None
        )

    def _jobs_running(self) -> Counter[str]:
        """How many one-shot jobs each user has on a worker now."""
        return Counter(r.job.user_id for r in self.workers.values() if r.job is not None)

    def running_counts(self) -> Counter[str]:
        """What each user runs now, one-shot jobs and session turns together (a session
        granted a live slot for a turn counts from the grant)."""
        running = self._jobs_running()
        running.update(self.sessions.running_counts())
        return running

    def _start_session(self, message: StartSession) -> bool:
        """Ask the session supervisor for an actor; False when its channel is full.

        It holds max_live starts, as many as can be in flight, except right after
        the supervisor restarted: the starts it had not taken are sent again.
        """
        assert self.session_starter is not None
        try:
            self.session_starter.send_nowait(message)
        except trio.WouldBlock:
            return False
        return True

    def _delete_record(
        self, key: SessionKey, deleted: trio.MemorySendChannel[SessionDeleted]
    ) -> None:
        try:
            assert self.registry is not None
            self.registry.send_nowait(DeleteSession(key, deleted))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            answer_once(deleted, JobFailed(503, "session registry is overloaded, try again"))

    def _expire_queued(self, now: float) -> None:
        for job in self.queue.pop_expired(now) + self.sessions.expire(now):
            waited_ms = round((now - job.submitted_at) * 1000)
            self.processed += 1
            self.failed += 1
            job.answer(RunResult(success=False, output="", duration_ms=waited_ms, timed_out=True))

    def _notify_if_drained(self) -> None:
        busy = any(r.state is WorkerState.BUSY for r in self.workers.values())
        if busy or self.sessions.busy_count():
            return
        for done in self.drained_waiters:
            answer_once(done, None)
        self.drained_waiters.clear()

    def _fail_queued(self, failure: JobFailed) -> None:
        for job in self.queue.pop_all():
            job.answer(failure)

    # --- state ------------------------------------------------------------

    def degraded_reason(self) -> str | None:
        """Why no job can run now, or None. Degraded = the last warm-up of every worker
        that tried one failed (dormant spares that never warmed are not woken for that)."""
        records = list(self.workers.values())
        tried = [r for r in records if r.state is not WorkerState.DORMANT or r.failing]
        if len(records) < self.expected_workers or not tried:
            return None
        if not all(r.failing for r in tried):
            return None
        return self.last_failure or "agent workers failed to start"

    def _unavailable(self) -> JobFailed:
        return JobFailed(503, f"no agent workers available: {self.degraded_reason()}")

    def _running(self) -> list[tuple[Job, float | None]]:
        """Jobs handed to a worker or a session actor and not finished, with since when."""
        running = [(r.job, r.busy_since) for r in self.workers.values() if r.job is not None]
        return running + self.sessions.running_jobs()

    def runs_of(self, user_id: str) -> tuple[RunView, ...]:
        """``user_id``'s queued and running jobs, the oldest first."""
        return self.all_runs(user_id)

    def all_runs(self, user_id: str | None = None) -> tuple[RunView, ...]:
        """Every queued and running job (of ``user_id`` only, if given), the oldest first."""
        # Jobs keep trio time; clients read wall-clock time.
        to_wall = time.time() - trio.current_time()
        views = [
            RunView(
                job.id, job.user_id, RunState.QUEUED, job.session_id, job.submitted_at + to_wall
            )
            for job in self.queue.jobs() + self.sessions.queued_jobs()
            if user_id is None or job.user_id == user_id
        ]
        views += [
            RunView(
                job.id,
                job.user_id,
                RunState.RUNNING,
                job.session_id,
                job.submitted_at + to_wall,
                started_at=since,
            )
            for job, since in self._running()
            if user_id is None or job.user_id == user_id
        ]
        return tuple(sorted(views, key=lambda view: view.queued_at))

    def health_snapshot(self) -> PoolSnapshot:
        """What ``/health`` shows (:class:`PoolView`): :meth:`snapshot` without sessions and runs."""
        return PoolSnapshot(
            workers=self._worker_views(),
            queue_length=len(self.queue),
            queue_max=self.queue.max_size,
            processed=self.processed,
            failed=self.failed,
            degraded_reason=self.degraded_reason(),
            draining=self.draining,
            ever_ready=self.ever_ready,
        )

    def _worker_views(self) -> tuple[WorkerView, ...]:
        return tuple(
            WorkerView(wid, r.state, r.busy_since, r.jobs, r.last_error)
            for wid, r in sorted(self.workers.items())
        )

    def snapshot(self, user_id: str | None = None) -> PoolSnapshot:
        """:meth:`health_snapshot` with the sessions, the upstream auth error, and
        ``user_id``'s runs (none without one)."""
        return attrs.evolve(
            self.health_snapshot(),
            sessions=self.sessions.views(),
            upstream_auth_error=self.upstream_auth_error,
            upstream_auth_error_at=self.upstream_auth_error_at,
            runs=() if user_id is None else self.runs_of(user_id),
        )

    def _record(self, worker_id: str) -> _WorkerRecord:
        return self.workers.setdefault(worker_id, _WorkerRecord())

    def _forget_idle(self, worker_id: str) -> None:
        if worker_id in self.idle:
            self.idle.remove(worker_id)

    @staticmethod
    def _drop_offer(record: _WorkerRecord) -> None:
        """Close the one-job channel of an offer that will not be taken up."""
        if record.inbox is not None:
            record.inbox.close()
            record.inbox = None


def _acknowledge(job: Job, position: int) -> None:
    """Tell a job's client it is taken; its reply has room (nothing was sent on it yet)."""
    try:
        job.reply.send_nowait(Queued(position))
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _unknown(message: Never) -> None:
    """The arm no message type reaches: mypy flags one without its own arm (``message``
    is ``Never``); at run time an object that is no message is logged and dropped."""
    log.error("dispatcher: unknown message %r", message)
