"""Which session runs where: the dispatcher's bookkeeping for multi-turn sessions.

Owned by the dispatcher and, like it, it never awaits: every send is
``send_nowait`` on a channel with room reserved by protocol.

* A session is *live* while an actor (and so a Claude Code process) runs for
  it: ``starting``, ``idle``, ``busy`` or ``stopping``. At most ``max_live`` are.
  A hibernated session has no entry here at all — only its registry record —
  so thousands of them cost no memory.
* Each session's turns wait in their own :class:`JobQueue` (bounded; over the
  bound → 429), in order, under their deadlines. The actor gets one job at a
  time, only when idle.
* A session needing a live slot when none is free waits (``waiting``) in a line
  that is fair between users (round-robin between users, FIFO within one:
  :class:`FairLine`; at most ``max_waiting_sessions`` in all and
  ``max_waiting_sessions_per_user`` of one user, else 429). A slot is freed for
  it at the next *turn boundary*: the least-recently-used idle session with no
  turn waiting is hibernated; failing that, a live session that has run a turn
  since it got its slot and now has its next turn queued *yields*: it is
  hibernated instead of taking that turn, and waits at the back of the line
  with its turns (in order) until a slot comes round again. So sessions with
  continuous traffic cannot starve a waiting one: it gets a slot as soon as any
  live session finishes a turn, and the sessions then take turns, one turn per
  slot grant at worst. A session that has not yet run a turn since its slot was
  granted never yields, so every grant makes progress. An idle session
  hibernates after ``idle_s``.
* One user runs at most ``max_running_per_user`` things at once, counted with
  their one-shot jobs (``running_elsewhere``): a session turn running, or a
  session granted a live slot for its next turn (it counts from the grant until
  that turn starts). A session of a user at that bound is passed over in the line
  for a slot (keeping its place), and a live session's turn waits in its queue
  until the user runs less; such a *blocked* session may yield its slot to a
  waiting session at once; one with a turn ready runs it before another of that
  user's sessions is granted a slot. So one user alone never holds every live
  slot with long turns.
* When a user's CLAUDE.md changes (:meth:`SessionScheduler.memory_changed`), each
  of that user's live sessions is restarted at its next turn boundary (hibernated
  when idle, and started again — resuming its conversation — when it has a turn
  to run): the Claude Code CLI reads CLAUDE.md only when its process starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from ..messages import (
    ActorId,
    CloseSessionNow,
    Hibernate,
    Job,
    JobFailed,
    RunOptions,
    RunResult,
    SessionCommand,
    SessionDeleted,
    SessionKey,
    SessionState,
    SessionView,
    StartSession,
    answer_once,
)
from .fair_line import FairLine
from .job_queue import JobQueue

log = logging.getLogger(__name__)

LIVE_STATES = (SessionState.STARTING, SessionState.IDLE, SessionState.BUSY, SessionState.STOPPING)
# Live and not on the way out: an agent runs, or is starting, and will go on.
RUNNING_STATES = (SessionState.STARTING, SessionState.IDLE, SessionState.BUSY)
# Cancellation.reason of a running turn whose session is closed (DELETE /session).
SESSION_CLOSED_REASON = "session closed"
DeleteReply = tuple[trio.MemorySendChannel[bool], trio.MemorySendChannel[SessionDeleted]]


@attrs.define(eq=False)
class SessionEntry:
    key: SessionKey
    waiting: JobQueue
    state: SessionState = SessionState.WAITING
    # The actor's inbox; the scheduler closes it when the actor is gone.
    inbox: trio.MemorySendChannel[SessionCommand] | None = None
    actor: ActorId | None = None  # the current actor's number, once it has started
    last_used: float = 0.0
    # DELETE requests waiting for this session's actor to end: (ack, deleted) channels.
    closing: list[DeleteReply] = attrs.Factory(list)
    # Which grant gave it its live slot (they are numbered), and turns handed over since.
    slot_grant: int = 0
    turns_since_grant: int = 0
    # Hibernated to give its slot to a waiting session: it goes to the back of the line.
    yielding: bool = False
    # Its agent may hold an outdated CLAUDE.md: restart it at the next turn boundary.
    stale_memory: bool = False
    # Asked for by another replica (or its lease lost): hibernate it once no turn of it
    # waits here, and so release its lease (``HandOverSession``).
    handing_over: bool = False
    # Granted its live slot for a turn that has not started yet: it counts as running.
    reserved: bool = False
    # The turn handed to its actor and not over yet, and when (wall-clock seconds).
    running: Job | None = None
    running_since: float | None = None


@attrs.define
class _Budget:
    """What each user runs against ``max_running_per_user`` (``cap``; None: no bound),
    as one :meth:`SessionScheduler.schedule` counts it and updates it as it goes."""

    cap: int | None
    # Per user: one-shot jobs and session turns running, and sessions granted a slot for a
    # turn not started yet (None: no bound, not counted).
    running: Counter[str] | None
    ready: Counter[str]  # per user: idle live sessions with a turn to run, not granted

    def may_run(self, user_id: str) -> bool:
        return self.cap is None or self.running is None or self.running[user_id] < self.cap

    def may_start(self, user_id: str) -> bool:
        """Whether another of the user's sessions may get a slot: their ready ones first."""
        if self.cap is None or self.running is None:
            return True
        return self.running[user_id] + self.ready[user_id] < self.cap

    def took(self, user_id: str) -> None:
        if self.running is not None:
            self.running[user_id] += 1

    def with_ready(self) -> Counter[str] | None:
        return None if self.running is None else self.running + self.ready


class SessionScheduler:
    """See the module docstring.

    ``per_session_max``: turns that may wait behind a session's running turn.
    ``max_waiting_sessions``: sessions that may wait for a live slot (then 429);
    ``max_waiting_sessions_per_user`` (default: the same): those of one user.
    ``start_session`` sends a :class:`StartSession` to the session supervisor
    (False: its channel is full, try again later);
    ``delete_record(key, reply)`` asks the registry to delete a record.
    """

    def __init__(
        self,
        *,
        max_live: int,
        per_session_max: int,
        max_waiting_sessions: int,
        max_waiting_sessions_per_user: int | None = None,
        idle_s: float,
        start_session: Callable[[StartSession], bool],
        delete_record: Callable[[SessionKey, trio.MemorySendChannel[SessionDeleted]], None],
        max_running_per_user: int | None = None,
        running_elsewhere: Callable[[], Counter[str]] = Counter,
    ) -> None:
        self.max_live = max_live
        self.per_session_max = per_session_max
        self.max_waiting_sessions = max_waiting_sessions
        self.max_waiting_sessions_per_user = (
            max_waiting_sessions
            if max_waiting_sessions_per_user is None
            else max_waiting_sessions_per_user
        )
        self.idle_s = idle_s
        self._start_session = start_session
        self._delete_record = delete_record
        self.max_running_per_user = max_running_per_user
        self._running_elsewhere = running_elsewhere
        self.entries: dict[SessionKey, SessionEntry] = {}
        self.waiting_for_slot: FairLine[SessionKey, SessionKey] = FairLine()
        self.grants = 0  # live slots granted so far

    # --- from the dispatcher's messages ------------------------------------

    def submit(self, job: Job) -> JobFailed | None:
        """Queue a session turn; returns the refusal, or None when accepted."""
        key = job.session_key
        assert key is not None, "a session turn names its session"
        entry = self.entries.get(key)
        if entry is None:
            # Sessions waiting for a live slot hold requests open: bound them like the queue.
            if len(self.waiting_for_slot) >= self.max_waiting_sessions:
                return JobFailed(429, "Queue is full, try again later", retry_after_s=1)
            if self.waiting_for_slot.count(key.user_id) >= self.max_waiting_sessions_per_user:
                return JobFailed(
                    429, "Too many of your requests are waiting, try again later", retry_after_s=1
                )
            entry = self.entries[key] = SessionEntry(key, JobQueue(self.per_session_max))
            self._wait_for_slot(entry)
        turns_ahead = len(entry.waiting) + (entry.state is SessionState.BUSY)
        if turns_ahead > self.per_session_max:
            return JobFailed(
                429,
                f"Too many turns waiting for session {key.session_id!r}, try again later",
                retry_after_s=1,
            )
        entry.waiting.push(job)
        return None

    def turns_ahead(self, job: Job) -> int:
        """Turns of ``job``'s session that will run before it (it was just accepted)."""
        key = job.session_key
        entry = self.entries.get(key) if key is not None else None
        if entry is None or entry.waiting.get(job.id) is None:
            return 0
        return entry.waiting.ahead_of(job.id) + (entry.running is not None)

    def queued_job(self, job_id: str) -> Job | None:
        """The session turn ``job_id`` if it is waiting (in any session), else None."""
        for entry in self.entries.values():
            job = entry.waiting.get(job_id)
            if job is not None:
                return job
        return None

    def running_jobs(self) -> list[tuple[Job, float | None]]:
        """The turns handed to session actors and not over yet, with when they were."""
        return [(e.running, e.running_since) for e in self.entries.values() if e.running]

    def queued_jobs(self) -> list[Job]:
        return [job for entry in self.entries.values() for job in entry.waiting.jobs()]

    def withdraw(self, job_id: str) -> Job | None:
        for entry in self.entries.values():
            job = entry.waiting.remove(job_id)
            if job is not None:
                self._forget_if_unused(entry)
                return job
        return None

    def started(
        self, key: SessionKey, inbox: trio.MemorySendChannel[SessionCommand], actor: ActorId
    ) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.state is not SessionState.STARTING or entry.actor is not None:
            # Closed while starting and already forgotten, or a stale actor: end it.
            _send_nowait(inbox, CloseSessionNow())
            inbox.close()
            return
        entry.inbox, entry.actor = inbox, actor
        if entry.closing:
            self._send(entry, CloseSessionNow())
            entry.state = SessionState.STOPPING

    def idle(self, key: SessionKey, now: float, actor: ActorId) -> None:
        entry = self._current(key, actor)
        if entry is not None:
            entry.running = entry.running_since = None
        if entry is not None and entry.state is not SessionState.STOPPING:
            entry.state, entry.last_used = SessionState.IDLE, now

    def stopped(self, key: SessionKey, failure: JobFailed | None, actor: ActorId) -> None:
        entry = self._current(key, actor)
        if entry is None or entry.state is SessionState.WAITING:
            return  # not ours: a stale actor, an actor of before a reset, or already gone
        if entry.inbox is not None:
            entry.inbox.close()
        entry.inbox, entry.actor = None, None
        entry.running = entry.running_since = None
        entry.reserved = entry.handing_over = False
        if entry.closing:
            for ack, deleted in entry.closing:
                self._delete_record(key, deleted)
                answer_once(ack, True)
            entry.closing.clear()
        if failure is not None:
            # The actor could not go on (its agent cannot start, too many sessions, the
            # store fails): answer the turns waiting for it rather than retrying forever.
            for job in entry.waiting.pop_all():
                job.answer(failure)
        if len(entry.waiting):
            entry.state = SessionState.WAITING
            # It had a slot: first in line again, unless it gave the slot to another.
            self._wait_for_slot(entry, first=not entry.yielding)
        else:
            del self.entries[key]

    def memory_changed(self, user_id: str) -> None:
        """``user_id``'s CLAUDE.md changed: restart their live sessions at the next turn boundary.

        A session still starting may have read the old file or the new one: it is
        restarted too, to be sure. A stopping one starts afresh anyway.
        """
        for entry in self.entries.values():
            if entry.key.user_id == user_id and entry.state in RUNNING_STATES:
                entry.stale_memory = True

    def hand_over(self, key: SessionKey) -> None:
        """Another replica asks for ``key`` (or this one lost its lease): hibernate it at its
        next turn boundary once no turn of it waits here. Not live here: nothing to do."""
        entry = self.entries.get(key)
        if entry is not None and entry.state in RUNNING_STATES:
            entry.handing_over = True

    def reset(self) -> None:
        """No session actor runs any more (their supervisor restarted): forget them all.

        Their waiting turns wait for a new actor; DELETEs in progress complete.
        """
        for entry in list(self.entries.values()):
            if entry.state in LIVE_STATES:
                self.stopped(entry.key, None, entry.actor or 0)

    def close(
        self,
        key: SessionKey,
        ack: trio.MemorySendChannel[bool],
        deleted: trio.MemorySendChannel[SessionDeleted],
    ) -> None:
        """DELETE /session: end the actor if any, then delete the record."""
        entry = self.entries.get(key)
        if entry is None:
            self._delete_record(key, deleted)
            answer_once(ack, False)
            return
        for job in entry.waiting.pop_all():
            job.answer(RunResult(success=False, output="session closed", duration_ms=0))
        if entry.state is SessionState.WAITING:
            self.waiting_for_slot.remove(key)
            del self.entries[key]
            self._delete_record(key, deleted)
            answer_once(ack, True)
            return
        # Starting without an inbox yet: `started` sends the close when it arrives.
        entry.closing.append((ack, deleted))
        if entry.running is not None:
            # Its turn is cut at once, as a cancelled run's; the actor then reads the close.
            entry.running.cancellation.cancel(SESSION_CLOSED_REASON)
        if entry.inbox is not None and entry.state is not SessionState.STOPPING:
            self._send(entry, CloseSessionNow())
            entry.state = SessionState.STOPPING

    # --- time ---------------------------------------------------------------

    def expire(self, now: float) -> list[Job]:
        expired = []
        for entry in list(self.entries.values()):
            expired += entry.waiting.pop_expired(now)
            self._forget_if_unused(entry)
        return expired

    def hibernate_idle(self, now: float) -> None:
        """Hibernate every session idle for ``idle_s``: none stays due after this."""
        for entry in self.entries.values():
            # The same sum as next_deadline(): `now - last_used >= idle_s` can be an ulp
            # short at the very time the dispatcher woke for it, and it would spin.
            idle_until = entry.last_used + self.idle_s
            if entry.state is SessionState.IDLE and now >= idle_until:
                log.info("session %s idle for %gs: hibernating", entry.key, self.idle_s)
                self._hibernate(entry)

    def next_deadline(self) -> float:
        soonest = math.inf
        for entry in self.entries.values():  # (one pass: asked on every dispatcher message)
            if entry.waiting:
                soonest = min(soonest, entry.waiting.next_deadline())
            if entry.state is SessionState.IDLE:
                soonest = min(soonest, entry.last_used + self.idle_s)
        return soonest

    # --- scheduling ---------------------------------------------------------

    def schedule(self) -> None:
        """Grant free slots, free slots at turn boundaries, then hand idle sessions their turn.

        In that order: a session waiting for a slot is served before a live session
        takes its next turn (see the module docstring).
        """
        for entry in self.entries.values():
            if entry.reserved and entry.state is SessionState.IDLE and not len(entry.waiting):
                entry.reserved = False  # the turn it was granted for went (withdrawn, expired)
        budget = self._budget()
        self._grant_slots(budget)
        self._restart_for_memory()
        self._release_handed_over()
        self._free_slots(budget)
        self._hand_over_turns(budget)

    def _budget(self) -> _Budget:
        cap = self.max_running_per_user
        if cap is None:
            return _Budget(None, None, Counter())
        # A user's live sessions with a turn to run take what the user may run before a
        # new slot is granted to another of theirs (they need no process start).
        ready = Counter(
            e.key.user_id
            for e in self.entries.values()
            if e.state is SessionState.IDLE and len(e.waiting) and not e.reserved
        )
        return _Budget(cap, self._running_elsewhere() + self.running_counts(), ready)

    def _grant_slots(self, budget: _Budget) -> None:
        """Start sessions from the line while live slots are free (fair between users)."""
        live = self.live_count()
        while len(self.waiting_for_slot) and live < self.max_live:
            key = self.waiting_for_slot.peek_next(budget.may_start)
            if key is None:  # every user waiting runs all they may already
                break
            first_turn = self.entries[key].waiting.peek_next()
            options = first_turn.options if first_turn is not None else RunOptions()
            if not self._start_session(StartSession(key, options)):
                # The supervisor has starts to take first (after a restart, some twice);
                # each it takes answers with a message, and this runs again then.
                break
            self.waiting_for_slot.pop_next(budget.may_start)
            entry = self.entries[key]
            entry.reserved = True
            budget.took(key.user_id)
            self.grants += 1
            entry.state, entry.slot_grant, entry.turns_since_grant = (
                SessionState.STARTING,
                self.grants,
                0,
            )
            live += 1

    def _restart_for_memory(self) -> None:
        """Hibernate idle sessions whose user's CLAUDE.md changed (a turn restarts them)."""
        for entry in [e for e in self.entries.values() if e.state is SessionState.IDLE]:
            if entry.stale_memory:
                log.info("session %s: its user's CLAUDE.md changed; restarting it", entry.key)
                self._hibernate(entry)

    def _release_handed_over(self) -> None:
        """Hibernate idle sessions another replica asked for, once no turn of theirs waits."""
        for entry in [e for e in self.entries.values() if e.state is SessionState.IDLE]:
            if entry.handing_over and not len(entry.waiting):
                log.info("session %s: handed over to another replica", entry.key)
                self._hibernate(entry)

    def _free_slots(self, budget: _Budget) -> None:
        """Hibernate idle sessions for the waiting ones that could start: first those with
        no turn waiting (least recently used first), then those that yield their slot."""
        freeing = sum(1 for e in self.entries.values() if e.state is SessionState.STOPPING)
        free = self.max_live - self.live_count()  # left only while starts cannot be sent yet
        short = self._could_start(budget.with_ready()) - freeing - max(free, 0)
        if short <= 0:
            return
        idle = [e for e in self.entries.values() if e.state is SessionState.IDLE]
        unused = sorted((e for e in idle if not len(e.waiting)), key=lambda e: e.last_used)
        # Those that have had a turn since their grant, or whose user runs all they
        # may (so its turn cannot start), the longest-held slot first.
        served = sorted(
            (
                e
                for e in idle
                if len(e.waiting)
                and (e.turns_since_grant or not (e.reserved or budget.may_run(e.key.user_id)))
            ),
            key=lambda e: e.slot_grant,
        )
        for entry in (unused + served)[:short]:
            if len(entry.waiting):
                log.info("session %s: yields its live slot to a waiting session", entry.key)
                entry.yielding = True
            self._hibernate(entry)

    def _hand_over_turns(self, budget: _Budget) -> None:
        """Send each idle session its next turn, unless its user runs all they may."""
        for entry in self.entries.values():
            if entry.state is not SessionState.IDLE or not len(entry.waiting):
                continue
            if not (entry.reserved or budget.may_run(entry.key.user_id)):
                continue  # its user runs all they may: the turn waits
            job = entry.waiting.pop_next()
            assert job is not None
            if self._send(entry, job):
                if not entry.reserved:
                    budget.took(entry.key.user_id)
                entry.reserved = False
                entry.state = SessionState.BUSY
                entry.turns_since_grant += 1
                entry.running, entry.running_since = job, time.time()
            else:
                # Its actor is ending; SessionStopped brings it back to the line.
                entry.waiting.push_front(job)
                entry.state = SessionState.STOPPING

    def session_ids_of(self, user_id: str) -> frozenset[str]:
        """Ids of ``user_id``'s sessions known here: live, or waiting with turns queued.

        Those the registry must not evict; a hibernated session has no entry.
        """
        return frozenset(k.session_id for k in self.entries if k.user_id == user_id)

    def running_counts(self) -> Counter[str]:
        """Per user: turns running, and sessions granted a slot for a turn not started yet."""
        return Counter(
            e.key.user_id for e in self.entries.values() if e.running is not None or e.reserved
        )

    def _could_start(self, running: Counter[str] | None) -> int:
        """Sessions waiting for a slot that could start now if there were slots: all of
        them, less those of users who run (``running``: or are about to) all they may."""
        cap = self.max_running_per_user
        if running is None or cap is None:
            return len(self.waiting_for_slot)
        return sum(
            min(self.waiting_for_slot.count(user_id), max(cap - running[user_id], 0))
            for user_id in self.waiting_for_slot.owners()
        )

    def live_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.state in LIVE_STATES)

    def busy_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.state is SessionState.BUSY)

    def queued_count(self) -> int:
        return sum(len(e.waiting) for e in self.entries.values())

    def views(self) -> tuple[SessionView, ...]:
        return tuple(SessionView(e.key, e.state) for e in self.entries.values())

    def fail_all_waiting(self, failure: JobFailed) -> None:
        for entry in list(self.entries.values()):
            for job in entry.waiting.pop_all():
                job.answer(failure)
            self._forget_if_unused(entry)

    # --- helpers ------------------------------------------------------------

    def _hibernate(self, entry: SessionEntry) -> None:
        """Ask an idle actor to hibernate; it is then ``stopping`` until it reports.

        Either way its idle deadline is gone: the dispatcher must never keep a
        deadline in the past (it would wake forever without receiving).
        """
        # A failed send means the actor is ending already: SessionStopped follows.
        self._send(entry, Hibernate())
        entry.state = SessionState.STOPPING

    def _wait_for_slot(self, entry: SessionEntry, *, first: bool = False) -> None:
        """Put ``entry`` (``waiting``) in the line for a live slot: its user's back, or front."""
        entry.yielding = entry.stale_memory = False
        if first:
            self.waiting_for_slot.push_front(entry.key.user_id, entry.key, entry.key)
        else:
            self.waiting_for_slot.push(entry.key.user_id, entry.key, entry.key)

    def _current(self, key: SessionKey, actor: ActorId) -> SessionEntry | None:
        """The entry of ``key`` if ``actor`` is its current actor (or it has none yet)."""
        entry = self.entries.get(key)
        if entry is None or (entry.actor is not None and entry.actor != actor):
            return None
        return entry

    def _send(self, entry: SessionEntry, message: SessionCommand) -> bool:
        if entry.inbox is None:
            return False
        return _send_nowait(entry.inbox, message)

    def _forget_if_unused(self, entry: SessionEntry) -> None:
        if entry.state is SessionState.WAITING and not len(entry.waiting):
            self.waiting_for_slot.remove(entry.key)
            del self.entries[entry.key]


def _send_nowait(inbox: trio.MemorySendChannel[SessionCommand], message: SessionCommand) -> bool:
    try:
        inbox.send_nowait(message)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        # The actor is ending (its inbox holds room for every command the
        # dispatcher can have outstanding); its supervisor reports SessionStopped.
        return False
    return True
