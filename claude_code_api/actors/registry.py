"""Session registry actor: the one owner of the session table.

A session is addressed by ``(user_id, session_id)`` (:class:`SessionKey`) and
remembers the Claude CLI session it maps to (``claude_session_id``, which we
choose and pass as ``--session-id`` on the first turn and ``--resume`` after;
the ids the conversation had before a ``/clear`` are kept in
``previous_claude_session_ids``), when it was used and what it cost: a
:class:`~claude_code_api.store.SessionRecord`, kept in a
:class:`~claude_code_api.store.SessionTable` (``store/``: SQLite, or PostgreSQL with
``DATABASE_URL``) so it survives service restarts.

Three layers, each owning one thing:

* the table (``store/``) owns the storage. Synchronous; only this actor calls
  it, one call at a time.
* :func:`serve_registry` is the actor. It owns the table and the receive end of
  its inbox, and runs every table call but saves in ``trio.to_thread.run_sync``
  so the storage never blocks the trio loop. Messages are handled strictly in
  arrival order; saves that are queued together are committed together (group
  commit). It also removes the Claude transcripts of deleted sessions and, given
  a TTL, expires sessions nobody has used for that long (and has the HOMEs of
  users with no session left emptied). A new session that would take its user
  past the bound evicts that user's least recently used session that is not in use.
* :class:`~.registry_client.RegistryClient` is the requester's side: request/reply
  helpers over a send channel to the inbox, which its caller owns.

Every request carries the send end of a fresh reply channel (buffer 1), typed
with what that request is answered with; the registry sends exactly one value
on it (the answer, or the exception to raise) and closes it. The requester owns
the receive end. A save is answered once it is durable.

How the actor works, and what each option of :func:`serve_registry` does:

Table calls run one at a time and in arrival order: saves on the trio thread
(``save_many(wait=False)``: a WAL append for SQLite; in a worker thread when
the table answers :class:`StoreBusy`), everything else in
``trio.to_thread.run_sync``, and a checkpoint every ``CHECKPOINT_EVERY``
writes, in a worker thread too. Group commit: the saves queued right behind
the one taken (up to ``MAX_SAVE_BATCH``, up to the first message that is not
a save) are committed in the same transaction, then each is answered; all
succeed or all fail. The busier the registry, the larger its batches.

``remove_transcripts(user_id, claude_session_id)`` removes the files and
directories holding the Claude transcripts of one CLI session. When a
record is deleted (a delete request, or expiry) it is called for the
record's current and previous CLI session ids, in the worker thread, after
the record's deletion is committed. What it fails to remove is logged and
left (the record is gone either way). None: no transcripts are removed.

``ttl_s``: sessions whose ``last_activity`` is more than ``ttl_s`` seconds
before ``wall_clock()`` are deleted with their transcripts, by a sweep that
runs once at start-up and then every ``min(ttl_s / 10, 1 h)`` (trio time),
in chunks of ``EXPIRE_CHUNK`` that take turns with requests. Each sweep that
expired something logs one line with the count. None: sessions never expire.

``on_health(reason)`` reports the storage's health on the trio thread (it
must not block): called with the error message when a write (save, create,
delete, sweep) fails on a :class:`StoreUnavailable`, and with None when a write
succeeds after that -- only when the state changes, and never before the
first failure (a store that opened is healthy). Reads do not change it: a
deleted database file still reads.

``sessions_in_use(user_id)`` names that user's sessions that are live or
have turns waiting (read on the trio thread as a create is handled). A create
that would take its user past ``max_per_user`` evicts the least recently
active of the others: each is deleted in the create's transaction, its
transcripts removed as a delete's are, logged and counted
(``sessions_evicted_total``). Only when too few can be evicted is the create
refused (:class:`TooManySessions`, saying they are all live). None (or a
callback answering None: no dispatcher runs): nothing is evicted.

``remove_homes(user_ids, cutoff)``: at the end of each expiry sweep, in a
worker thread, given the users who still have a session and the sweep's
cutoff: it removes the files of every other user's HOME that has not changed
since (their workspace goes ``ttl_s`` after their last session did).

``make_room()``: a write that fails because the disk is full (:class:`StoreFull`)
awaits it (the service stops the agents filling the disk and releases a part of
its reserve: disk_quota.py), then checkpoints the WAL (so commits reuse its space)
and tries the write once more.

``on_count(n)`` is told how many records the store holds (all users together),
on the trio thread: counted once at start-up, then kept by the writes that
add or remove one (a create, a delete, the expiry sweep), so a reader (the
metrics' ``sessions`` gauge) never waits for the database.

Error handling: a table that cannot be opened fails before this actor starts
(the service refuses to start rather than run without its sessions). Once
running, a failed table call is logged and answered with the
:class:`StoreUnavailable`, which names the cause and the fix; it never ends the
actor. Writes that fail because of the storage itself (the database file was
deleted or replaced under the running service, the disk is full, I/O errors)
are also reported through ``on_health`` so ``/health`` can show them.
:class:`TooManySessions` and :class:`SessionExists` are refusals, answered as
they are: not storage failures.

Resource handling: the actor closes the table when it ends, whether its inbox
was closed or it was cancelled, inside a shielded scope, so the WAL is
checkpointed into the database file on shutdown. To stop gracefully close the
inbox's send end: what is queued is handled, then the actor returns. When the
actor is *cancelled*, the request in progress is still answered truthfully
(its thread is never abandoned, so a committed save is acknowledged), and every
request still queued in the inbox has its reply closed unanswered, so its
requester fails at once with a :class:`StoreUnavailable` instead of waiting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from contextlib import ExitStack
from typing import Never, TypeVar, TypeVarTuple

import attrs
import trio

from ..messages import SessionKey
from ..observe import metrics
from ..store import (
    SessionExists,
    SessionMoved,
    SessionPage,
    SessionRecord,
    SessionTable,
    StoreBusy,
    StoreFull,
    StoreUnavailable,
    TooManySessions,
)

log = logging.getLogger(__name__)

# Saves committed in one transaction at most: bounds the wait of the first one.
MAX_SAVE_BATCH = 256
# Write transactions between two checkpoints of the table (SQLite: of the WAL into
# the database). A checkpoint syncs the disk (milliseconds, more on network
# volumes): it runs in a worker thread, never inside a save on the trio thread.
CHECKPOINT_EVERY = 500
# Expired sessions deleted per table call: a long sweep takes turns with requests.
EXPIRE_CHUNK = 200
# The expiry sweep runs every ttl / 10, but at least this often.
MAX_SWEEP_INTERVAL_S = 3600.0

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


# --- messages ---------------------------------------------------------------

# Each request's reply carries its answer or the exception the client raises: one
# type of answer per request.
LoadAnswer = SessionRecord | None | StoreUnavailable
SaveAnswer = None | StoreUnavailable
CreateAnswer = None | TooManySessions | SessionExists | StoreUnavailable
DeleteAnswer = bool | StoreUnavailable
ListAnswer = SessionPage | StoreUnavailable


@attrs.frozen
class LoadSession:
    """Answered with the :class:`SessionRecord`, None, or a :class:`StoreUnavailable`."""

    key: SessionKey
    reply: trio.MemorySendChannel[LoadAnswer] = attrs.field(repr=False)


@attrs.frozen
class SaveSession:
    """Upsert ``record``; answered with None once it is durable, or a :class:`StoreUnavailable`."""

    record: SessionRecord
    reply: trio.MemorySendChannel[SaveAnswer] = attrs.field(repr=False)


@attrs.frozen
class CreateSession:
    """Insert a new ``record`` if its user has fewer than ``max_per_user``.

    Answered with None once it is durable, :class:`TooManySessions`,
    :class:`SessionExists`, or a :class:`StoreUnavailable`.
    """

    record: SessionRecord
    max_per_user: int
    reply: trio.MemorySendChannel[CreateAnswer] = attrs.field(repr=False)


@attrs.frozen
class DeleteSession:
    """Answered with True (it existed; it is deleted, then its transcripts), False, or a
    :class:`StoreUnavailable`."""

    key: SessionKey
    reply: trio.MemorySendChannel[DeleteAnswer] = attrs.field(repr=False)


@attrs.frozen
class ListSessions:
    """Answered with a :class:`SessionPage` of the user's sessions or a :class:`StoreUnavailable`."""

    user_id: str
    limit: int
    offset: int
    reply: trio.MemorySendChannel[ListAnswer] = attrs.field(repr=False)


RegistryMessage = LoadSession | SaveSession | CreateSession | DeleteSession | ListSessions

HealthCallback = Callable[[str | None], None]
CountCallback = Callable[[int], None]
# user_id -> the ids of that user's sessions that are live or have turns waiting (the
# dispatcher's view), None when no dispatcher runs; read on the trio thread.
InUseCallback = Callable[[str], "Collection[str] | None"]
# (user ids that have a session, cutoff in wall-clock seconds): removes the files of every
# other user's HOME unchanged since the cutoff; how many it emptied.
HomesRemover = Callable[[frozenset[str], float], int]
# (user_id, claude_session_id): removes that CLI session's transcripts; OSError if it cannot.
TranscriptRemover = Callable[[str, str], None]
# Called when a write finds the disk full: makes room (disk_quota.DiskQuota.make_room);
# whether it gave any space back.
RoomMaker = Callable[[], Awaitable[bool]]


# --- the actor --------------------------------------------------------------


async def serve_registry(
    store: SessionTable,
    inbox: trio.MemoryReceiveChannel[RegistryMessage],
    *,
    remove_transcripts: TranscriptRemover | None = None,
    ttl_s: float | None = None,
    on_health: HealthCallback | None = None,
    on_count: CountCallback | None = None,
    sessions_in_use: InUseCallback | None = None,
    remove_homes: HomesRemover | None = None,
    make_room: RoomMaker | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer registry messages from ``inbox`` until it is closed or this is cancelled.

    Owns ``store`` (any :class:`SessionTable`) and closes it on the way out,
    shielded (see the module docstring for stopping, and its "How the actor works"
    for what each option does).

    Error handling: a failing call is logged and answered with the
    :class:`StoreUnavailable`; an unexpected exception (a bug) too, with its
    traceback. No message ends the actor; only ``Cancelled`` passes through.
    """
    registry: _Registry | None = None
    try:
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive or None, not {ttl_s!r}")
        registry = _Registry(store, inbox, remove_transcripts, ttl_s, on_health, wall_clock)
        registry.on_count = on_count
        registry.sessions_in_use = sessions_in_use
        registry.remove_homes = remove_homes
        registry.make_room = make_room
        await registry.count_records()
        task_status.started()
        await registry.run()
    finally:
        if registry is not None:
            registry.refuse_queued()
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(store.close)
            except Exception:
                log.exception("session registry: closing the store failed")


class _Registry:
    """The actor's state: the table, the inbox, one message read ahead, health and the sweep.

    Every table call goes through :meth:`_call` (a worker thread) or :meth:`_call_here`
    (the trio thread), which hand back the call's value or the :class:`StoreUnavailable`
    to answer with: nothing raised by the table reaches the loop.
    """

    def __init__(
        self,
        store: SessionTable,
        inbox: trio.MemoryReceiveChannel[RegistryMessage],
        remove_transcripts: TranscriptRemover | None,
        ttl_s: float | None,
        on_health: HealthCallback | None,
        wall_clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.remove_transcripts = remove_transcripts
        self.ttl_s = ttl_s
        self.on_health = on_health
        self.wall_clock = wall_clock
        self.health: str | None = None
        # A message taken from the inbox while gathering a batch, not handled yet.
        self.held: RegistryMessage | None = None
        self.sweep_interval = math.inf if ttl_s is None else min(ttl_s / 10, MAX_SWEEP_INTERVAL_S)
        self.next_sweep = math.inf if ttl_s is None else trio.current_time()
        self.sweep_cutoff: float | None = None  # set while a sweep is under way
        self.swept = 0
        self.on_count: CountCallback | None = None
        self.sessions_in_use: InUseCallback | None = None
        self.remove_homes: HomesRemover | None = None
        self.make_room: RoomMaker | None = None
        self.records: int | None = None  # how many the store holds (None: not counted)
        self.writes_since_checkpoint = 0

    async def run(self) -> None:
        while True:
            if trio.current_time() >= self.next_sweep:
                await self._sweep_chunk()
            try:
                message = self._take_queued()
            except trio.EndOfChannel:
                return
            if message is None:
                if trio.current_time() >= self.next_sweep:
                    continue  # a sweep is under way: its next chunk
                with trio.move_on_at(self.next_sweep):
                    try:
                        message = await self.inbox.receive()
                    except trio.EndOfChannel:
                        return
                if message is None:
                    continue  # time to sweep
            await self._handle(message)

    def _take_queued(self) -> RegistryMessage | None:
        """The held message, else one already in the inbox, else None. EndOfChannel when done."""
        if self.held is not None:
            message, self.held = self.held, None
            return message
        try:
            return self.inbox.receive_nowait()
        except trio.WouldBlock:
            return None

    def refuse_queued(self) -> None:
        """Close the reply of every request not handled, so requesters fail now, not never."""
        pending = [self.held] if self.held is not None else []
        self.held = None
        while True:
            try:
                pending.append(self.inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        for message in pending:
            message.reply.close()

    async def count_records(self) -> None:
        count = await self._call("count", self.store.count)
        if not isinstance(count, StoreUnavailable):
            self.records = 0
            self._count_change(count, publish=True)

    def _count_change(self, change: int, *, publish: bool = False) -> None:
        if self.records is None or not (change or publish):
            return
        self.records += change
        if self.on_count is not None:
            try:
                self.on_count(self.records)
            except Exception:
                log.exception("session registry: on_count failed")

    # --- requests -----------------------------------------------------------

    async def _handle(self, message: RegistryMessage) -> None:
        match message:
            case SaveSession():
                await self._save(self._gather_saves(message))
            case LoadSession(key, reply):
                with reply:
                    _answer(reply, await self._call("load", self.store.load, key))
            case ListSessions(user_id, limit, offset, reply):
                with reply:
                    page = await self._call(
                        "list", self.store.list_for_user, user_id, limit, offset
                    )
                    _answer(reply, page)
            case CreateSession(record, max_per_user, reply):
                with reply:
                    _answer(reply, await self._create(record, max_per_user))
            case DeleteSession(key, reply):
                with reply:
                    existed = await self._write("delete", self._delete_in_thread, key)
                    self._count_change(-1 if existed is True else 0)
                    _answer(reply, existed)
            case _:
                _unknown(message)

    def _gather_saves(self, first: SaveSession) -> list[SaveSession]:
        """``first`` and the saves queued right behind it, taken without waiting."""
        batch = [first]
        while len(batch) < MAX_SAVE_BATCH:
            try:
                message = self.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if not isinstance(message, SaveSession):
                self.held = message  # handled next, so the order is kept
                break
            batch.append(message)
        return batch

    async def _save(self, batch: list[SaveSession]) -> None:
        with ExitStack() as replies:  # every reply is closed, whatever happens
            for message in batch:
                replies.enter_context(message.reply)
            records = [message.record for message in batch]
            # It runs without a checkpoint: a cancelled actor must not begin it.
            await trio.lowlevel.checkpoint_if_cancelled()
            # On the trio thread: a commit is a write() into the page cache (SQLite),
            # cheaper than the two thread switches of a worker thread. Only if the table
            # cannot write without waiting (StoreBusy) does it wait, in a worker thread.
            saved = self._call_here("save", self._save_now, records)
            if isinstance(saved, StoreBusy):
                saved = await self._write("save", self.store.save_many, records)
            else:
                saved = await self._after_write("save", saved, self.store.save_many, records)
            if isinstance(saved, SessionMoved):
                # Sessions another replica took: theirs are refused, the others saved again.
                batch = _answer_moved(batch, saved)
                if batch:
                    records = [message.record for message in batch]
                    saved = await self._write("save", self.store.save_many, records)
            for message in batch:
                # Each requester raises its own exception object.
                _answer(message.reply, None if saved is None else StoreUnavailable(str(saved)))
        if self.writes_since_checkpoint >= CHECKPOINT_EVERY:
            self.writes_since_checkpoint = 0  # failed or not, the next is due as many later
            await self._write("checkpoint", self.store.checkpoint)

    async def _create(self, record: SessionRecord, max_per_user: int) -> CreateAnswer:
        # Read on the trio thread, now: a session that goes live after this loads its
        # record after this create (one request at a time), so it finds it gone if it
        # was evicted, as a deleted one, and starts a new conversation.
        in_use = None if self.sessions_in_use is None else self.sessions_in_use(record.user_id)
        evicted = await self._write("create", self._create_in_thread, record, max_per_user, in_use)
        if isinstance(evicted, Exception):
            return evicted
        self._count_change(1 - len(evicted))
        for old in evicted:
            log.info(
                "session registry: evicted session %r of user %r (least recently used"
                " of %d, last active %s) to make room for %r",
                old.session_id,
                old.user_id,
                max_per_user,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old.last_activity)),
                record.session_id,
            )
            metrics.session_evicted()
        return None

    def _create_in_thread(
        self, record: SessionRecord, max_per_user: int, in_use: Collection[str] | None
    ) -> list[SessionRecord] | TooManySessions | SessionExists:
        """The evicted records, or the refusal: refusals are answers, not failures."""
        try:
            evicted = self.store.create(record, max_per_user, in_use)
        except (TooManySessions, SessionExists) as refusal:
            return refusal
        self._remove_transcripts(evicted)
        return evicted

    def _save_now(self, records: list[SessionRecord]) -> None:
        self.store.save_many(records, wait=False)

    def _delete_in_thread(self, key: SessionKey) -> bool:
        record = self.store.delete(key)
        if record is None:
            return False
        self._remove_transcripts([record])
        return True

    # --- expiry -------------------------------------------------------------

    async def _sweep_chunk(self) -> None:
        assert self.ttl_s is not None
        if self.sweep_cutoff is None:
            self.sweep_cutoff, self.swept = self.wall_clock() - self.ttl_s, 0
        expired = await self._write("expire", self._expire_in_thread, self.sweep_cutoff)
        if not isinstance(expired, StoreUnavailable):
            self.swept += expired
            self._count_change(-expired)
            if expired == EXPIRE_CHUNK:
                return  # more to do after the requests that are waiting
        if self.swept:
            log.info(
                "session registry: expired %d sessions inactive for over %g s",
                self.swept,
                self.ttl_s,
            )
        if self.remove_homes is not None and not isinstance(expired, StoreUnavailable):
            homes = await self._call("homes", self._remove_homes_in_thread, self.sweep_cutoff)
            if isinstance(homes, int) and homes:
                log.info(
                    "session registry: removed the files of %d users with no session left"
                    " for over %g s",
                    homes,
                    self.ttl_s,
                )
        self.sweep_cutoff = None
        self.next_sweep = trio.current_time() + self.sweep_interval

    def _remove_homes_in_thread(self, before: float) -> int:
        assert self.remove_homes is not None
        return self.remove_homes(self.store.user_ids(), before)

    def _expire_in_thread(self, before: float) -> int:
        records = self.store.delete_inactive(before, EXPIRE_CHUNK)
        self._remove_transcripts(records)
        return len(records)

    def _remove_transcripts(self, records: Iterable[SessionRecord]) -> None:
        """In the worker thread: remove the transcripts of ``records``; log what fails."""
        if self.remove_transcripts is None:
            return
        for record in records:
            for claude_id in record.all_claude_session_ids:
                try:
                    self.remove_transcripts(record.user_id, claude_id)
                except OSError as exc:
                    log.error(
                        "session registry: could not remove transcripts %r of %s: %s",
                        claude_id,
                        record.key,
                        exc,
                    )
                except Exception:
                    log.exception("session registry: removing transcripts %r failed", claude_id)

    # --- store calls --------------------------------------------------------

    # --- table calls --------------------------------------------------------

    async def _write(
        self, what: str, function: Callable[[*Ts], T], *args: *Ts
    ) -> T | StoreUnavailable:
        """A table call that writes, in a worker thread: see :meth:`_after_write`."""
        outcome = await self._call(what, function, *args)
        return await self._after_write(what, outcome, function, *args)

    async def _after_write(
        self,
        what: str,
        outcome: T | StoreUnavailable,
        function: Callable[[*Ts], T],
        *args: *Ts,
    ) -> T | StoreUnavailable:
        """Given what a write came back with: its failure or success changes the health.

        On a full table (:class:`StoreFull`), once room is made (``make_room``) and
        the table checkpointed, ``function`` is tried once more in a worker thread.
        """
        if isinstance(outcome, StoreFull) and what != "checkpoint":
            if self.make_room is not None:
                try:
                    await self.make_room()
                except Exception:
                    log.exception("session registry: making room on the disk failed")
            # After a checkpoint the next commits reuse the WAL's space (it is never
            # truncated): measured, a full disk then still takes ~150 new sessions.
            await self._call("checkpoint", self.store.checkpoint)
            outcome = await self._call(what, function, *args)
            if not isinstance(outcome, BaseException):
                log.info("session registry: %s succeeded once room was made", what)
        self._note_write(outcome)
        if what != "checkpoint" and not isinstance(outcome, BaseException):
            self.writes_since_checkpoint += 1
        return outcome

    def _note_write(self, outcome: object) -> None:
        if isinstance(outcome, StoreBusy | SessionMoved):
            pass  # says nothing of the storage: retried (for the lock; without the moved)
        elif isinstance(outcome, StoreUnavailable):
            self._set_health(str(outcome))
        else:  # written, or refused by a table that works
            self._set_health(None)

    async def _call(
        self, what: str, function: Callable[[*Ts], T], *args: *Ts
    ) -> T | StoreUnavailable:
        """Run one table call in a worker thread; every failure comes back as an answer.

        A call that has begun is never abandoned: if the actor is cancelled
        meanwhile, trio waits for the thread and returns its result (Cancelled
        comes at the next checkpoint), so a committed write is answered as such.
        """
        try:
            return await trio.to_thread.run_sync(function, *args)
        except Exception as exc:
            return self._failed(what, exc)

    def _call_here(
        self, what: str, function: Callable[[*Ts], T], *args: *Ts
    ) -> T | StoreUnavailable:
        """Run one short table call on the trio thread; as :meth:`_call` otherwise."""
        try:
            return function(*args)
        except Exception as exc:
            return self._failed(what, exc)

    def _failed(self, what: str, exc: Exception) -> StoreUnavailable:
        if isinstance(exc, StoreBusy):
            return exc
        if isinstance(exc, StoreUnavailable):
            log.error("session registry: %s failed: %s", what, exc)
            return exc
        log.error("session registry: %s raised unexpectedly", what, exc_info=exc)
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        return StoreUnavailable(f"session store {self.store.location}: {what}: {cause}")

    def _set_health(self, reason: str | None) -> None:
        if reason == self.health:
            return
        self.health = reason
        if reason is None:
            log.info("session registry: writes succeed again")
        if self.on_health is not None:
            try:
                self.on_health(reason)
            except Exception:
                log.exception("session registry: on_health failed")


def _unknown(message: Never) -> None:
    """As ``assert_never`` for the type checker (a message type left out of ``_handle`` is
    an error), but at run time a stray object is logged, not allowed to end the actor."""
    log.error("session registry: unknown message %r", message)


def _answer_moved(batch: list[SaveSession], moved: SessionMoved) -> list[SaveSession]:
    """Answer the saves of the sessions another replica holds; the rest of ``batch``."""
    left = []
    for message in batch:
        if message.record.key in moved.keys:
            _answer(message.reply, StoreUnavailable(str(moved)))
        else:
            left.append(message)
    return left


def _answer(reply: trio.MemorySendChannel[T], answer: T) -> None:
    try:
        reply.send_nowait(answer)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the requester went away
