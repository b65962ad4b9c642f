"""Wake-ups between replicas: PostgreSQL's NOTIFY/LISTEN.

* :data:`HANDOVER_CHANNEL`: :class:`HandOverRequest`, "please release this session",
  addressed to the replica holding its lease (every replica hears it; only the
  addressee's listener delivers it).
* :data:`RELEASED_CHANNEL`: :class:`Released`, "this session's lease is free", sent by
  :meth:`~.leases.LeaseTable.release` in the releasing transaction.
* :data:`CANCEL_CHANNEL`: :class:`CancelRequest`, "please cancel this run of yours",
  addressed to the replica running it (``DELETE /runs/{runId}`` sent to another one).
* :data:`CANCELLED_CHANNEL`: :class:`CancelReply`, whether it was, addressed to the asker.
* :data:`MEMORY_CHANNEL`: :class:`MemoryChanged`, "this user's CLAUDE.md was saved", sent
  by :func:`.shared_memory.save` in the saving transaction, heard by every replica.

The session leases listen on the first two (:data:`SESSION_CHANNELS`), the runs across
replicas on the next two (:data:`RUN_CHANNELS`), the users' CLAUDE.md on the last
(:data:`MEMORY_CHANNELS`), each on a connection of its own.

Payloads are JSON. A session is named by its key's digest (:func:`.leases.key_digest`, in
hex), never by its ids, and a run's user likewise (:func:`user_digest`): a user id of any
length or content fits, and the 8000-byte limit of
NOTIFY's payload is never reached by user data (ids are hashed, not refused). Only an
absurd owner id (ours, :func:`.leases.new_owner`) could pass it: :func:`notify_in` refuses
it with ``ValueError``.

A wake-up is a hint, not a record: one sent while a listener is disconnected is lost. After
reconnecting, the listener delivers :class:`Resumed` so that its consumer re-checks what it
waits for; a replica waiting for a lease also retries when the holder's lease expires.

Resource handling: :func:`serve_wakeups` owns one connection of its own (outside the
pool), used by one worker thread for as long as it runs; it closes it on the way out.

Error handling: :func:`serve_wakeups` raises :class:`~.database.DatabaseUnavailable` if
its first connection fails (as :func:`~.database.open_database` does); after that, a lost
connection is retried every :data:`RETRY_S` until it is back, logged once when lost and
once when listening again. Cancelling it stops it within :data:`POLL_S`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, LiteralString

import attrs
import psycopg
import psycopg.sql
import trio

from .database import Database, DatabaseUnavailable

log = logging.getLogger(__name__)

HANDOVER_CHANNEL = "cca_handover"
RELEASED_CHANNEL = "cca_released"
CANCEL_CHANNEL = "cca_cancel"
CANCELLED_CHANNEL = "cca_cancelled"
MEMORY_CHANNEL = "cca_memory"
# NOTIFY refuses a payload of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7999
# How often the listener's thread looks whether it was cancelled, and its longest wait.
POLL_S = 0.2
# A round trip on the listening connection this often: a silently dead link is noticed.
HEARTBEAT_S = 5.0
# Between two attempts to reconnect while the database is away.
RETRY_S = 0.5
# libpq's parameters for the listener's connection: found fast, and given up fast when the
# network goes silent.
CONNECT_PARAMETERS: dict[str, Any] = {
    "connect_timeout": 5,
    "application_name": "claude-code-api wake-ups",
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


@attrs.frozen
class HandOverRequest:
    """To ``holder``: please release the session whose key digest is ``digest`` (hex)."""

    holder: str
    digest: str


@attrs.frozen
class Released:
    """The lease of the session whose key digest is ``digest`` (hex) was released."""

    digest: str


@attrs.frozen
class CancelRequest:
    """To ``owner``: please cancel run ``run_id`` if it is of the user whose
    :func:`user_digest` is ``user``; answer ``asker`` with ``request``."""

    owner: str
    run_id: str
    user: str
    asker: str
    request: str


@attrs.frozen
class CancelReply:
    """To ``asker``: the run of its :class:`CancelRequest` ``request`` was cancelled or not."""

    asker: str
    request: str
    cancelled: bool


@attrs.frozen
class MemoryChanged:
    """The CLAUDE.md of the user whose :func:`user_digest` is ``user`` was saved as its
    ``generation``-th version, by replica ``origin``."""

    user: str
    generation: int
    origin: str


def user_digest(user_id: str) -> str:
    """How a wake-up names a user: SHA-256 (hex) of the id, escaped as no ``str`` fails."""
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen
class Resumed:
    """The listener is connected again: wake-ups sent meanwhile are lost; re-check."""


Notification = HandOverRequest | Released | CancelRequest | CancelReply | MemoryChanged
Wakeup = Notification | Resumed

SESSION_CHANNELS: tuple[LiteralString, ...] = (HANDOVER_CHANNEL, RELEASED_CHANNEL)
RUN_CHANNELS: tuple[LiteralString, ...] = (CANCEL_CHANNEL, CANCELLED_CHANNEL)
MEMORY_CHANNELS: tuple[LiteralString, ...] = (MEMORY_CHANNEL,)


def encode(wakeup: Notification) -> tuple[str, str]:
    """The channel and payload for ``wakeup``.

    Error handling: ``ValueError`` if the payload would not fit in NOTIFY."""
    fields: dict[str, str | bool | int]
    match wakeup:
        case HandOverRequest(holder, digest):
            channel, fields = HANDOVER_CHANNEL, {"holder": holder, "key": digest}
        case Released(digest):
            channel, fields = RELEASED_CHANNEL, {"key": digest}
        case CancelRequest(owner, run_id, user, asker, request):
            channel = CANCEL_CHANNEL
            fields = {"owner": owner, "run": run_id, "user": user, "asker": asker}
            fields["request"] = request
        case CancelReply(asker, request, cancelled):
            channel = CANCELLED_CHANNEL
            fields = {"asker": asker, "request": request, "cancelled": cancelled}
        case MemoryChanged(user, generation, origin):
            channel = MEMORY_CHANNEL
            fields = {"user": user, "generation": generation, "origin": origin}
    payload = json.dumps(fields)
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a wake-up's payload over {MAX_PAYLOAD_BYTES} bytes: {payload[:80]}…")
    return channel, payload


def decode(channel: str, payload: str) -> Notification | None:
    """The wake-up a notification carries, or None (logged) if it is not one of ours."""
    try:
        fields = json.loads(payload)
        if channel == HANDOVER_CHANNEL:
            return HandOverRequest(str(fields["holder"]), str(fields["key"]))
        if channel == RELEASED_CHANNEL:
            return Released(str(fields["key"]))
        if channel == CANCEL_CHANNEL:
            return CancelRequest(
                *(str(fields[name]) for name in ("owner", "run", "user", "asker", "request"))
            )
        if channel == CANCELLED_CHANNEL:
            cancelled = fields["cancelled"]
            if isinstance(cancelled, bool):
                return CancelReply(str(fields["asker"]), str(fields["request"]), cancelled)
        if channel == MEMORY_CHANNEL:
            generation = fields["generation"]
            if isinstance(generation, int) and not isinstance(generation, bool):
                return MemoryChanged(str(fields["user"]), generation, str(fields["origin"]))
    except (ValueError, TypeError, KeyError):
        pass
    log.warning("wake-ups: ignored a notification on %s: %.200r", channel, payload)
    return None


def notify_in(connection: psycopg.Connection, wakeup: Notification) -> None:
    """Send ``wakeup`` when ``connection``'s transaction commits (never if it rolls back).

    Error handling: ``ValueError`` from :func:`encode`; else as ``connection.execute``."""
    connection.execute("SELECT pg_notify(%s, %s)", encode(wakeup))


async def notify(database: Database, wakeup: Notification) -> None:
    """Send ``wakeup`` now, through the pool (a transaction of its own).

    Error handling: :class:`~.database.DatabaseUnavailable`; ``ValueError`` from :func:`encode`."""
    await database.run(lambda connection: notify_in(connection, wakeup))


async def serve_wakeups(
    url: str,
    owner: str,
    wakeups: trio.MemorySendChannel[Wakeup],
    *,
    channels: tuple[LiteralString, ...] = SESSION_CHANNELS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``channels`` and send to ``wakeups`` every :class:`Released`, every
    other wake-up addressed to ``owner``, and :class:`Resumed` after each
    reconnection; started once listening. Runs until cancelled or ``wakeups``' receiver
    is closed; closes ``wakeups`` on the way out. See the module docstring for failures.
    """
    async with wakeups:
        listening = _Listening(task_status)
        while True:
            try:
                await trio.to_thread.run_sync(_listen, url, owner, channels, listening.now, wakeups)
            except trio.BrokenResourceError:
                return  # no one reads the wake-ups any more
            except psycopg.OperationalError as exc:
                listening.lost(exc)
            await trio.sleep(RETRY_S)


@attrs.define
class _Listening:
    """The listener's connection state, as its log and its ``started()`` tell it."""

    task_status: trio.TaskStatus[None]
    started: bool = False
    down: bool = False

    def now(self) -> bool:
        """Listening (again); True if after a reconnection."""
        if not self.started:
            self.started = True
            self.task_status.started()
            return False
        if self.down:
            self.down = False
            log.info("wake-ups: listening again")
        return True

    def lost(self, exc: psycopg.OperationalError) -> None:
        reason = str(exc).strip() or type(exc).__name__
        if not self.started:
            raise DatabaseUnavailable(reason) from exc
        if not self.down:
            self.down = True
            first_line = reason.splitlines()[0]
            log.warning("wake-ups: lost the database (%s); reconnecting", first_line)


def _listen(
    url: str,
    owner: str,
    channels: tuple[LiteralString, ...],
    listening: Callable[[], bool],
    wakeups: trio.MemorySendChannel[Wakeup],
) -> None:
    """In a worker thread: connect, LISTEN, tell ``listening`` (and the consumer, after a
    reconnection), then deliver until the connection fails (psycopg's OperationalError),
    the consumer is gone (trio.BrokenResourceError) or the calling task is cancelled
    (trio.Cancelled, seen within :data:`POLL_S`)."""
    with psycopg.connect(url, autocommit=True, **CONNECT_PARAMETERS) as connection:
        for channel in channels:
            connection.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        if trio.from_thread.run_sync(listening):
            trio.from_thread.run(wakeups.send, Resumed())
        next_beat = time.monotonic() + HEARTBEAT_S
        while True:
            trio.from_thread.check_cancelled()
            for note in connection.notifies(timeout=POLL_S):
                wakeup = decode(note.channel, note.payload)
                if wakeup is not None and _for(owner, wakeup):
                    trio.from_thread.run(wakeups.send, wakeup)
            if time.monotonic() >= next_beat:
                connection.execute("SELECT 1")
                next_beat = time.monotonic() + HEARTBEAT_S


def _for(owner: str, wakeup: Notification) -> bool:
    match wakeup:
        case HandOverRequest(holder=addressee) | CancelRequest(owner=addressee):
            return addressee == owner
        case CancelReply(asker=addressee):
            return addressee == owner
        case _:
            return True
