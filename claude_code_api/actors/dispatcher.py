"""Dispatcher actor: the queue, and which worker gets which job.

It owns the :class:`JobQueue`, the set of idle workers and what ``/health`` and
``/status`` report. Everything reaches it as a message on its inbox; it never
awaits anyone else (every send it makes is ``send_nowait`` on a channel with room
reserved for it), so a slow client or worker can never stall dispatch.

* A job starts the moment a worker is warm: a :class:`WorkerReady` or a
  :class:`Submit` each dispatch at once. No polling, and jobs submitted while the
  pool is still warming wait in the queue instead of being forgotten.
* Each job's deadline covers its wait here: an overdue queued job is answered
  ``timed_out`` by the dispatcher; once running, its worker enforces the rest.
* A full queue answers 429; a pool whose every worker failed its last warm-up
  answers 503 at once, naming the last failure, instead of letting jobs hang.

Error handling: a worker that died between offering itself and receiving a job
is noticed when the hand-over fails; the job goes back to the front of the queue.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from ..messages import (
    CloseSession,
    DispatcherMessage,
    Drain,
    Job,
    JobFailed,
    PoolSnapshot,
    RunResult,
    SessionIdle,
    SessionKey,
    SessionStarted,
    SessionStopped,
    StartSession,
    StatusRequest,
    Submit,
    Withdraw,
    WorkerFailed,
    WorkerFinished,
    WorkerReady,
    WorkerStarting,
    WorkerView,
)
from .job_queue import JobQueue
from .registry import DeleteSession
from .session_scheduler import SessionScheduler

log = logging.getLogger(__name__)

QUEUE_FULL_ERROR = "Queue is full, try again later"
RETRY_AFTER_S = 1


@attrs.define
class _WorkerRecord:
    state: str = "starting"
    busy_since: float | None = None
    jobs: int = 0
    last_error: str | None = None
    # Its latest warm-up attempt failed and it has not been ready since.
    failing: bool = False
    inbox: trio.MemorySendChannel | None = None


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
        inbox: trio.MemoryReceiveChannel,
        *,
        pool_size: int,
        queue_max: int,
        session_starter: trio.MemorySendChannel | None = None,
        registry: trio.MemorySendChannel | None = None,
        session_limits: SessionLimits = SessionLimits(),
    ):
        self.inbox = inbox
        self.registry = registry
        self.session_starter = session_starter
        self.sessions = SessionScheduler(
            max_live=session_limits.max_live,
            per_session_max=session_limits.per_session_max,
            max_waiting_sessions=queue_max,
            idle_s=session_limits.idle_s,
            start_session=self._start_session,
            delete_record=self._delete_record,
        )
        self.queue = JobQueue(queue_max)
        self.workers: dict[str, _WorkerRecord] = {}
        self.expected_workers = pool_size
        self.idle: list[str] = []  # ready worker ids, longest idle first
        self.processed = 0
        self.failed = 0
        self.last_failure: str | None = None  # the newest warm-up failure of any worker
        self.draining = False
        self.drained_waiters: list[trio.MemorySendChannel] = []
        self.ever_ready = False

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Handle messages until cancelled or the inbox closes.

        The inbox belongs to the supervision tree, not to this actor, so a restarted
        dispatcher reads the same inbox.
        """
        task_status.started()
        while True:
            wake_at = min(self.queue.next_deadline(), self.sessions.next_deadline())
            with trio.move_on_at(wake_at):
                try:
                    message = await self.inbox.receive()
                except trio.EndOfChannel:
                    return
                self.handle(message)
            now = trio.current_time()
            self._expire_queued(now)
            self.sessions.hibernate_idle(now)
            self._dispatch()
            self.sessions.schedule()
            if self.draining:
                self._notify_if_drained()

    # --- messages ---------------------------------------------------------

    def handle(self, message: DispatcherMessage) -> None:
        match message:
            case Submit(job):
                self._submit(job)
            case Withdraw(job_id):
                job = self.queue.remove(job_id) or self.sessions.withdraw(job_id)
                if job is not None:
                    job.reply.close()
            case WorkerStarting(worker_id):
                record = self._record(worker_id)
                record.state, record.busy_since, record.inbox = "starting", None, None
                self._forget_idle(worker_id)
            case WorkerReady(worker_id, inbox):
                record = self._record(worker_id)
                record.state, record.failing, record.inbox = "ready", False, inbox
                self.ever_ready = True
                self._forget_idle(worker_id)
                self.idle.append(worker_id)
            case WorkerFinished(worker_id, _job_id, ok):
                self.processed += 1
                self.failed += 0 if ok else 1
                record = self._record(worker_id)
                record.state, record.busy_since = "starting", None
            case WorkerFailed(worker_id, reason):
                record = self._record(worker_id)
                record.state, record.failing, record.last_error = "error", True, reason
                self.last_failure = reason
                record.busy_since, record.inbox = None, None
                self._forget_idle(worker_id)
                if self.degraded_reason() is not None:
                    self._fail_queued(self._unavailable())
            case StatusRequest(reply):
                try:
                    reply.send_nowait(self.snapshot())
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            case Drain(done):
                self.draining = True
                self.drained_waiters.append(done)
                self._fail_queued(JobFailed(503, "service is shutting down"))
                self.sessions.fail_all_waiting(JobFailed(503, "service is shutting down"))
            case SessionStarted(key, inbox):
                self.sessions.started(key, inbox)
            case SessionIdle(key, finished_ok):
                if finished_ok is not None:
                    self.processed += 1
                    self.failed += 0 if finished_ok else 1
                self.sessions.idle(key, trio.current_time())
            case SessionStopped(key, reason):
                self.sessions.stopped(key, reason)
            case CloseSession(key, ack, deleted):
                self.sessions.close(key, ack, deleted)
            case _:
                log.error("dispatcher: unknown message %r", message)

    def _submit(self, job: Job) -> None:
        if self.draining:
            job.answer(JobFailed(503, "service is shutting down"))
        elif job.session_id is not None:
            refusal = self.sessions.submit(job)
            if refusal is not None:
                job.answer(refusal)
        elif self.degraded_reason() is not None:
            job.answer(self._unavailable())
        elif self.queue.full and not self.idle:
            job.answer(JobFailed(429, QUEUE_FULL_ERROR, retry_after_s=RETRY_AFTER_S))
        else:
            self.queue.push(job)

    # --- dispatch ---------------------------------------------------------

    def _dispatch(self) -> None:
        while self.idle and len(self.queue):
            worker_id = self.idle.pop(0)
            record = self.workers[worker_id]
            job = self.queue.pop_next()
            inbox, record.inbox = record.inbox, None
            try:
                inbox.send_nowait(job)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                # The worker died after offering itself; its supervisor restarts it.
                self.queue.push_front(job)
                record.state = "starting"
                continue
            finally:
                inbox.close()  # one job per offer
            record.state, record.busy_since = "busy", time.time()
            record.jobs += 1

    def _start_session(self, message: StartSession) -> None:
        # Room for max_live messages is reserved: at most that many starts are in flight.
        self.session_starter.send_nowait(message)

    def _delete_record(self, key: SessionKey, deleted: trio.MemorySendChannel) -> None:
        try:
            self.registry.send_nowait(DeleteSession(key, deleted))
        except trio.WouldBlock:
            deleted.send_nowait(JobFailed(503, "session registry is overloaded, try again"))
            deleted.close()

    def _expire_queued(self, now: float) -> None:
        for job in self.queue.pop_expired(now) + self.sessions.expire(now):
            waited_ms = round((now - job.submitted_at) * 1000)
            self.processed += 1
            self.failed += 1
            job.answer(RunResult(success=False, output="", duration_ms=waited_ms, timed_out=True))

    def _notify_if_drained(self) -> None:
        if any(r.state == "busy" for r in self.workers.values()) or self.sessions.busy_count():
            return
        for done in self.drained_waiters:
            try:
                done.send_nowait(None)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            done.close()
        self.drained_waiters.clear()

    def _fail_queued(self, failure: JobFailed) -> None:
        for job in self.queue.pop_all():
            job.answer(failure)

    # --- state ------------------------------------------------------------

    def degraded_reason(self) -> str | None:
        """Why no job can run now, or None. Degraded = every worker's last warm-up failed."""
        records = list(self.workers.values())
        if len(records) < self.expected_workers or not all(r.failing for r in records):
            return None
        return self.last_failure or "agent workers failed to start"

    def _unavailable(self) -> JobFailed:
        return JobFailed(503, f"no agent workers available: {self.degraded_reason()}")

    def snapshot(self) -> PoolSnapshot:
        views = tuple(
            WorkerView(wid, r.state, r.busy_since, r.jobs, r.last_error)
            for wid, r in sorted(self.workers.items())
        )
        return PoolSnapshot(
            workers=views,
            queue_length=len(self.queue),
            queue_max=self.queue.max_size,
            processed=self.processed,
            failed=self.failed,
            degraded_reason=self.degraded_reason(),
            draining=self.draining,
            ever_ready=self.ever_ready,
            sessions=self.sessions.views(),
        )

    def _record(self, worker_id: str) -> _WorkerRecord:
        return self.workers.setdefault(worker_id, _WorkerRecord())

    def _forget_idle(self, worker_id: str) -> None:
        if worker_id in self.idle:
            self.idle.remove(worker_id)
