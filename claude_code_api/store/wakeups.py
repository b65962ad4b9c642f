"""Wake-ups between replicas: PostgreSQL's NOTIFY/LISTEN on two channels.

* :data:`HANDOVER_CHANNEL`: :class:`HandOverRequest`, "please release this session",
  addressed to the replica holding its lease (every replica hears it; only the
  addressee's listener delivers it).
* :data:`RELEASED_CHANNEL`: :class:`Released`, "this session's lease is free", sent by
  :meth:`~.leases.LeaseTable.release` in the releasing transaction.

Payloads are JSON. A session is named by its key's digest (:func:`.leases.key_digest`, in
hex), never by its ids: a user id of any length or content fits, and the 8000-byte limit of
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

import json
import logging
import time
from collections.abc import Callable
from typing import Any, LiteralString

import attrs
import psycopg
import trio

from .database import Database, DatabaseUnavailable

log = logging.getLogger(__name__)

HANDOVER_CHANNEL = "cca_handover"
RELEASED_CHANNEL = "cca_released"
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
class Resumed:
    """The listener is connected again: wake-ups sent meanwhile are lost; re-check."""


Notification = HandOverRequest | Released
Wakeup = HandOverRequest | Released | Resumed

_LISTEN: tuple[LiteralString, ...] = (f"LISTEN {HANDOVER_CHANNEL}", f"LISTEN {RELEASED_CHANNEL}")


def encode(wakeup: Notification) -> tuple[str, str]:
    """The channel and payload for ``wakeup``.

    Error handling: ``ValueError`` if the payload would not fit in NOTIFY."""
    if isinstance(wakeup, HandOverRequest):
        channel, fields = HANDOVER_CHANNEL, {"holder": wakeup.holder, "key": wakeup.digest}
    else:
        channel, fields = RELEASED_CHANNEL, {"key": wakeup.digest}
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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on both channels and send to ``wakeups`` every :class:`Released`, every
    :class:`HandOverRequest` addressed to ``owner``, and :class:`Resumed` after each
    reconnection; started once listening. Runs until cancelled or ``wakeups``' receiver
    is closed; closes ``wakeups`` on the way out. See the module docstring for failures.
    """
    async with wakeups:
        listening = _Listening(task_status)
        while True:
            try:
                await trio.to_thread.run_sync(_listen, url, owner, listening.now, wakeups)
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
    listening: Callable[[], bool],
    wakeups: trio.MemorySendChannel[Wakeup],
) -> None:
    """In a worker thread: connect, LISTEN, tell ``listening`` (and the consumer, after a
    reconnection), then deliver until the connection fails (psycopg's OperationalError),
    the consumer is gone (trio.BrokenResourceError) or the calling task is cancelled
    (trio.Cancelled, seen within :data:`POLL_S`)."""
    with psycopg.connect(url, autocommit=True, **CONNECT_PARAMETERS) as connection:
        for statement in _LISTEN:
            connection.execute(statement)
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
    return not isinstance(wakeup, HandOverRequest) or wakeup.holder == owner
