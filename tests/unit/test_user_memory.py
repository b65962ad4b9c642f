"""A user's CLAUDE.md: its storage, the PUT body's rules, and its way to a one-shot agent.

Storage tests use a real temporary directory (blocking calls, as the service runs
them in a thread). The worker test uses the in-memory fake agent on trio's
autojump clock: what memory each agent was handed is in ``FakeAgent.memories``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from claude_code_api.actors.stopping import StopSignal
from claude_code_api.actors.turn import TurnLimits
from claude_code_api.actors.worker import WorkerConfig, serve_worker
from claude_code_api.agent.protocol import AgentSpec
from claude_code_api.http.requests import BadRequest, parse_user_claude_request
from claude_code_api.messages import Job, RunResult, WorkerReady, WorkerStarting
from claude_code_api.store.user_memory import (
    MAX_READ_BYTES,
    MAX_SAVED_BYTES,
    UserMemoryError,
    memory_reminder,
    read_user_memory,
    save_user_memory,
    user_memory_path,
)
from claude_code_api.store.user_paths import user_workspace
from tests.support.fake_agent import FakeAgents

# --- storage ---------------------------------------------------------------------------


def test_a_user_without_a_claude_md_reads_empty(tmp_path):
    assert read_user_memory(tmp_path, "alice") == ""
    assert not (tmp_path / "users").exists()  # reading creates nothing


def test_a_saved_claude_md_is_the_session_agents_user_memory_file(tmp_path):
    save_user_memory(tmp_path, "alice", "Always answer in French.\nÉté ✓\n")
    home = user_workspace(tmp_path, "alice")
    path = AgentSpec(name="s", home=home, ephemeral=False).config_dir / "CLAUDE.md"
    assert user_memory_path(tmp_path, "alice") == path
    assert path.read_text(encoding="utf-8") == "Always answer in French.\nÉté ✓\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_user_memory(tmp_path, "alice") == "Always answer in French.\nÉté ✓\n"
    assert read_user_memory(tmp_path, "bob") == ""  # each user their own


def test_saving_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    save_user_memory(tmp_path, "alice", "first")
    path = user_memory_path(tmp_path, "alice")
    before = os.stat(path).st_ino
    save_user_memory(tmp_path, "alice", "second")
    # A new file renamed over the old one: a reader holding the old one sees it whole.
    assert os.stat(path).st_ino != before
    assert read_user_memory(tmp_path, "alice") == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["CLAUDE.md"]


def test_saving_empty_content_removes_the_file(tmp_path):
    save_user_memory(tmp_path, "alice", "something")
    save_user_memory(tmp_path, "alice", "")
    assert not user_memory_path(tmp_path, "alice").exists()
    assert read_user_memory(tmp_path, "alice") == ""
    save_user_memory(tmp_path, "bob", "")  # nothing to remove: nothing created either
    assert not user_workspace(tmp_path, "bob").exists()


def test_a_symlink_planted_by_the_users_agent_is_never_followed(tmp_path):
    save_user_memory(tmp_path, "bob", "BOB'S SECRET")
    bob_file = user_memory_path(tmp_path, "bob")
    alice_config = user_memory_path(tmp_path, "alice").parent
    # Alice's agent (it owns her HOME) makes her CLAUDE.md a link to bob's...
    alice_config.mkdir(parents=True)
    (alice_config / "CLAUDE.md").symlink_to(bob_file)
    with pytest.raises(UserMemoryError, match="CLAUDE.md is a symlink"):
        read_user_memory(tmp_path, "alice")
    # ...saving replaces the link itself, never bob's file through it.
    save_user_memory(tmp_path, "alice", "mine")
    assert bob_file.read_text() == "BOB'S SECRET"
    assert read_user_memory(tmp_path, "alice") == "mine"
    # ...or makes her whole .claude a link to bob's.
    for child in alice_config.iterdir():
        child.unlink()
    alice_config.rmdir()
    alice_config.symlink_to(bob_file.parent)
    with pytest.raises(UserMemoryError, match=".claude is not a directory"):
        read_user_memory(tmp_path, "alice")
    with pytest.raises(UserMemoryError, match=".claude is not a directory"):
        save_user_memory(tmp_path, "alice", "overwrite bob?")
    assert bob_file.read_text() == "BOB'S SECRET"


def test_a_fifo_or_a_directory_in_its_place_fails_at_once(tmp_path):
    config = user_memory_path(tmp_path, "alice").parent
    config.mkdir(parents=True)
    os.mkfifo(config / "CLAUDE.md")  # a read would block forever
    with pytest.raises(UserMemoryError, match="not a regular file"):
        read_user_memory(tmp_path, "alice")
    (config / "CLAUDE.md").unlink()
    (config / "CLAUDE.md").mkdir()
    with pytest.raises(UserMemoryError, match="is a directory"):
        save_user_memory(tmp_path, "alice", "x")


def test_what_an_agent_wrote_is_read_back_bounded_and_decoded(tmp_path):
    path = user_memory_path(tmp_path, "alice")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"ok \xff\xfe " + b"x" * (MAX_READ_BYTES + 10))
    text = read_user_memory(tmp_path, "alice")
    assert text.startswith("ok \ufffd\ufffd x")
    assert len(text) == MAX_READ_BYTES  # each undecodable byte one replacement character


def test_text_that_is_not_unicode_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        save_user_memory(tmp_path, "alice", "lone \ud800 surrogate")
    assert not user_workspace(tmp_path, "alice").exists()


def test_the_reminder_holds_the_content_in_a_system_reminder_block():
    block = memory_reminder("Always answer in French.\n\n")
    assert block.startswith("<system-reminder>\n") and block.endswith("\n</system-reminder>")
    assert "CLAUDE.md" in block and "Always answer in French.\n</system-reminder>" in block


# --- the PUT body ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{}", 400, "content: required"),
        (b'{"content": null}', 400, "content: required"),
        (b'{"content": 5}', 400, "content: expected a string, got number"),
        (b'{"content": ["a"]}', 400, "content: expected a string, got array"),
        (b'{"content": "\\ud800"}', 400, "content: not valid Unicode"),
        (b"[]", 400, "Request body must be a JSON object"),
        (b"", 400, "Request body is empty"),
    ],
)
def test_a_put_body_that_is_not_content_string_is_a_400_naming_the_field(body, status, message):
    with pytest.raises(BadRequest) as refused:
        parse_user_claude_request(body, max_bytes=MAX_SAVED_BYTES)
    assert refused.value.status == status
    assert refused.value.message.startswith(message)


def test_content_over_100_kib_of_utf8_is_a_413():
    limit = MAX_SAVED_BYTES
    assert limit == 100 * 1024
    assert parse_user_claude_request(f'{{"content": "{"x" * limit}"}}'.encode(), max_bytes=limit)
    with pytest.raises(BadRequest) as refused:
        parse_user_claude_request(f'{{"content": "{"x" * (limit + 1)}"}}'.encode(), max_bytes=limit)
    assert (refused.value.status, refused.value.message) == (
        413,
        "content: exceeds 102400 bytes (100 KiB)",
    )
    # Counted in bytes: 51201 two-byte characters are over, though fewer characters.
    with pytest.raises(BadRequest):
        parse_user_claude_request(f'{{"content": "{"é" * 51201}"}}'.encode(), max_bytes=limit)
    assert parse_user_claude_request(b'{"content": ""}', max_bytes=limit) == ""


# --- a pre-warmed worker -----------------------------------------------------------------


def one_shot(job_id: str, user_id: str, memory: str | None):
    reply_send, reply_receive = trio.open_memory_channel(64)
    now = trio.current_time()
    job = Job(
        id=job_id,
        user_id=user_id,
        prompt=f"prompt of {user_id}",
        submitted_at=now,
        deadline=now + 60,
        reply=reply_send,
        memory=memory,
    )
    return job, reply_receive


async def test_a_warm_worker_hands_each_job_only_its_own_users_memory(autojump_clock, nursery):
    with trio.fail_after(100):
        agents = FakeAgents()
        send, messages = trio.open_memory_channel(0)
        config = WorkerConfig(warmup_timeout_s=30, turn=TurnLimits(2.0, 1000))
        nursery.start_soon(serve_worker, "w", config, send, agents, Path("/homes"), StopSignal())
        replies = []
        for job_id, user, memory in [
            ("1", "alice", "ALICE"),
            ("2", "bob", None),
            ("3", "carol", "C"),
        ]:
            assert await messages.receive() == WorkerStarting("w")
            offer = await messages.receive()
            assert isinstance(offer, WorkerReady)
            # The agent was warm before the job (and its user) was known.
            assert agents.made[-1].events == ["start"]
            job, reply = one_shot(job_id, user, memory)
            offer.inbox.send_nowait(job)
            replies.append(reply)
            async for event in reply:
                if isinstance(event, RunResult):
                    assert event.success
            await messages.receive()  # WorkerFinished
        assert [agent.memories for agent in agents.made[:3]] == [["ALICE"], [None], ["C"]]
