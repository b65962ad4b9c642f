"""Wake-ups on real PostgreSQL: NOTIFY reaches a listener on another connection, the listener
delivers what is addressed to it, survives losing the database, and stops promptly."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import pytest
import trio

from claude_code_api.messages import SessionKey
from claude_code_api.store import wakeups as wakeups_module
from claude_code_api.store.database import Database, DatabaseUnavailable, open_database
from claude_code_api.store.leases import Lease, LeaseTable, key_digest
from claude_code_api.store.wakeups import (
    HandOverRequest,
    Released,
    Resumed,
    Wakeup,
    notify,
    serve_wakeups,
)
from tests.postgres.support import TIMEOUT, Databases, TcpLink, admin_execute

ME = "replica-1"
DIGEST = "ab" * 32


async def listen(
    nursery: trio.Nursery, url: str, owner: str = ME
) -> trio.MemoryReceiveChannel[Wakeup]:
    send, receive = trio.open_memory_channel[Wakeup](0)
    await nursery.start(serve_wakeups, url, owner, send)
    return receive


def terminate_listener(url: str) -> int:
    """Terminate the listener's server process (found by its application_name); how many."""
    rows = admin_execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = %s",
        (urlsplit(url).path.lstrip("/"), wakeups_module.CONNECT_PARAMETERS["application_name"]),
    )
    return int(rows[0][0])  # type: ignore[call-overload]


async def test_a_notification_reaches_a_listener_within_a_second(
    shared_url: str, database: Database, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        received = await listen(nursery, shared_url)
        sent = trio.current_time()
        await notify(database, HandOverRequest(ME, DIGEST))
        with trio.fail_after(1):
            assert await received.receive() == HandOverRequest(ME, DIGEST)
        assert trio.current_time() - sent < 1


async def test_only_hand_overs_addressed_to_the_listener_are_delivered(
    shared_url: str, database: Database, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        received = await listen(nursery, shared_url)
        await notify(database, HandOverRequest("replica-2", DIGEST))
        await notify(database, Released(DIGEST))  # NOTIFY keeps the order of commits
        assert await received.receive() == Released(DIGEST)


async def test_a_release_announces_itself(
    shared_url: str, database: Database, nursery: trio.Nursery
) -> None:
    key = SessionKey("alice\x00" + "x" * 10_000, "s-1")  # ids of any length fit
    table = LeaseTable(database)
    with trio.fail_after(TIMEOUT):
        received = await listen(nursery, shared_url)
        lease = await trio.to_thread.run_sync(table.acquire, key, ME, 30.0)
        assert isinstance(lease, Lease)
        assert await trio.to_thread.run_sync(table.release, lease)
        assert await received.receive() == Released(key_digest(key).hex())


async def test_an_owner_id_too_long_for_notify_is_refused(database: Database) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="7999 bytes"):
        await notify(database, HandOverRequest("o" * 8000, DIGEST))


async def test_the_listener_reconnects_after_its_backend_is_terminated(
    shared_url: str, database: Database, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        received = await listen(nursery, shared_url)
        assert await trio.to_thread.run_sync(terminate_listener, shared_url) == 1
        # Listening again, it says so: what was sent meanwhile must be re-checked.
        assert await received.receive() == Resumed()
        await notify(database, Released(DIGEST))
        assert await received.receive() == Released(DIGEST)


async def test_a_long_outage_is_logged_once_and_the_return_once(
    databases: Databases,
    link: TcpLink,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=wakeups_module.__name__)
    name = databases.create().rpartition("/")[2]
    with trio.fail_after(TIMEOUT):
        received = await listen(nursery, link.url(name))
        link.cut()
        await trio.sleep(10 * wakeups_module.RETRY_S)  # many failed attempts to reconnect
        link.restore()
        assert await received.receive() == Resumed()
        async with open_database(link.url(name)) as database:
            await notify(database, Released(DIGEST))
        assert await received.receive() == Released(DIGEST)
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2, said
    assert said[0].startswith("wake-ups: lost the database (") and "\n" not in said[0]
    assert said[1] == "wake-ups: listening again"


async def test_cancelling_the_listener_stops_it_promptly(shared_url: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            received = await listen(nursery, shared_url)
            await trio.sleep(0.5)
            cancelled = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled < 2 * wakeups_module.POLL_S + 0.5
        # It closed its channel on the way out.
        with pytest.raises(trio.EndOfChannel):
            await received.receive()


async def test_no_database_at_start_fails_the_start(nursery: trio.Nursery) -> None:
    with trio.socket.socket() as unused:  # a port nobody listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with trio.fail_after(TIMEOUT), pytest.raises(DatabaseUnavailable):
        await listen(nursery, f"postgresql://postgres@127.0.0.1:{port}/test")
