"""Users' CLAUDE.md in PostgreSQL, one replica's side (:class:`SharedMemory`): the HOME's
file brought up to date from the table, the database failing never failing a read, and
the wake-up another replica's save sends."""

from __future__ import annotations

import logging
import math
import socket

import trio

from claude_code_api.actors.shared_memory import SharedMemory
from claude_code_api.messages import DispatcherMessage, UserMemoryChanged
from claude_code_api.store.transcript_mirror import OnDemandDatabase
from claude_code_api.store.user_memory import read_user_memory, save_user_memory
from claude_code_api.store.wakeups import MemoryChanged, decode, encode, user_digest
from tests.postgres.support import TIMEOUT


def memory(url: str, tmp_path, owner: str):
    send, receive = trio.open_memory_channel[DispatcherMessage](math.inf)
    database = OnDemandDatabase(url)
    return SharedMemory(database, url, owner, tmp_path / owner, send), receive, database


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql://127.0.0.1:{port}/none"


def test_memory_wake_ups_round_trip_naming_the_user_by_digest():
    changed = MemoryChanged(user_digest("alice\ud800" + "x" * 10_000), 7, "a")
    assert decode(*encode(changed)) == changed
    assert len(encode(changed)[1]) < 200
    assert decode("cca_memory", '{"user": "u", "generation": "7", "origin": "a"}') is None


async def test_a_save_on_one_replica_is_brought_into_the_others_home_once(tmp_path, fresh_url):
    with trio.fail_after(TIMEOUT * 2):
        a, _, close_a = memory(fresh_url, tmp_path, "a")
        b, b_told, close_b = memory(fresh_url, tmp_path, "b")
        try:
            assert await b.load("alice") == ""
            await a.save("alice", "Answer in French.\x00")
            assert read_user_memory(tmp_path / "a", "alice") == "Answer in French.\x00"
            assert await b.load("alice") == "Answer in French.\x00"
            assert read_user_memory(tmp_path / "b", "alice") == "Answer in French.\x00"
            # B had seen alice: her sessions there are restarted (a missed wake-up's case).
            assert b_told.receive_nowait() == UserMemoryChanged("alice")
            # Unchanged: the file is not rewritten (what B's own HOME holds is read).
            save_user_memory(tmp_path / "b", "alice", "edited here")
            assert await b.load("alice") == "edited here"
            await a.save("alice", "")
            assert await b.load("alice") == ""
            assert read_user_memory(tmp_path / "b", "alice") == ""
        finally:
            close_a.close()
            close_b.close()


async def test_a_user_never_saved_in_the_database_keeps_the_homes_own(tmp_path, fresh_url):
    with trio.fail_after(TIMEOUT):
        b, _, database = memory(fresh_url, tmp_path, "b")
        try:
            save_user_memory(tmp_path / "b", "bob", "from before the database")
            assert await b.load("bob") == "from before the database"
        finally:
            database.close()


async def test_the_database_down_a_read_uses_the_homes_file_logged_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "claude_code_api.actors.shared_memory")
    with trio.fail_after(TIMEOUT * 2):
        b, _, database = memory(closed_port_url(), tmp_path, "b")
        try:
            save_user_memory(tmp_path / "b", "alice", "Answer in French.")
            assert await b.load("alice") == "Answer in French."
            # Known down: the next read does not wait for the database.
            began = trio.current_time()
            assert await b.load("alice") == "Answer in French."
            assert trio.current_time() - began < 1.0
            await b.before_session("alice")  # never fails a session's start
        finally:
            database.close()
    warnings = [r for r in caplog.records if "the database failed" in r.getMessage()]
    assert len(warnings) == 1


async def test_the_listener_starts_at_once_with_no_database_and_keeps_trying(
    tmp_path, caplog, nursery
):
    caplog.set_level(logging.WARNING, "claude_code_api.actors.shared_memory")
    b, _, database = memory(closed_port_url(), tmp_path, "b")
    try:
        with trio.fail_after(TIMEOUT):
            cancel = trio.CancelScope()
            with trio.fail_after(1.0):
                await nursery.start(lambda task_status: _serve(b, cancel, task_status))
            await trio.sleep(2.5)  # a few attempts
            cancel.cancel()
    finally:
        database.close()
    warnings = [r for r in caplog.records if "not listening for saves" in r.getMessage()]
    assert len(warnings) == 1


async def _serve(memory: SharedMemory, cancel: trio.CancelScope, task_status) -> None:
    with cancel:
        await memory.serve(task_status=task_status)
