"""The disk quota's measurement, refusal, watch and file size limit (no agents)."""

from __future__ import annotations

import os

import attrs
import pytest
import trio

from claude_code_api.limits import disk_quota
from claude_code_api.limits.disk_quota import (
    MIB,
    MIN_FILE_SIZE,
    DiskQuota,
    Watched,
    disk_usage,
    file_size_limit,
    remove_abandoned_homes,
)
from claude_code_api.limits.disk_reserve import DiskReserve

TIMEOUT = 10


def _write(path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(b"x" * size)
        file.flush()
        os.fsync(file.fileno())


def test_disk_usage_counts_allocated_bytes_once_and_follows_no_link(tmp_path):
    home = tmp_path / "home"
    _write(home / "workspace" / "a", 100_000)
    os.link(home / "workspace" / "a", home / "hard")  # the same inode: once
    outside = tmp_path / "outside"
    _write(outside / "big", 1_000_000)
    (home / "link").symlink_to(outside)  # not followed
    sparse = home / "sparse"
    with open(sparse, "wb") as file:
        file.truncate(10**9)  # a gigabyte that takes no disk
    used = disk_usage([home, tmp_path / "missing"])
    assert 100_000 <= used < 200_000
    assert disk_usage([home, home]) == used  # a path given twice counts once


def quota(tmp_path, limit=1 * MIB, reserve=0) -> DiskQuota:
    return DiskQuota(tmp_path, limit, reserve, lambda user: tmp_path / "users" / user)


async def test_a_user_at_the_quota_is_refused_naming_it_and_others_are_not(tmp_path):
    with trio.fail_after(TIMEOUT):
        q = quota(tmp_path)
        _write(tmp_path / "users" / "alice" / "workspace" / "f", MIB)
        refusal = await q.refusal("alice")
        assert refusal is not None and refusal.status == 507
        assert "USER_DISK_MAX_MB" in refusal.error and "1.0 MiB" in refusal.error
        assert await q.refusal("bob") is None


async def test_a_workspace_in_workspaces_dir_counts_for_its_user(tmp_path):
    with trio.fail_after(TIMEOUT):
        q = attrs.evolve(quota(tmp_path), workspaces_dir=tmp_path / "w")
        _write(tmp_path / "w" / "alice" / "f", MIB)
        assert await q.refusal("alice") is not None
        assert await q.refusal("bob") is None


async def test_a_one_shot_home_counts_for_its_user_while_it_runs(tmp_path):
    with trio.fail_after(TIMEOUT):
        q = quota(tmp_path)
        worker_home = tmp_path / "workers" / "worker-0" / "abc"
        _write(worker_home / "workspace" / "f", MIB)
        with q.counting("alice", worker_home):
            assert await q.refusal("alice") is not None
            assert await q.refusal("bob") is None
        assert await q.refusal("alice") is None  # not hers any more (and measured again)
        assert q.running == {}


# (Real time: on an autojump clock, time would jump while a walk runs in its thread.)


async def test_watch_stops_the_turn_once_the_user_passes_the_quota(tmp_path):
    with trio.fail_after(TIMEOUT):
        q = attrs.evolve(quota(tmp_path), interval_s=0.05)
        stopped = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(q.watch, Watched("alice", stopped.append))
            await trio.sleep(0.3)
            assert stopped == []
            _write(tmp_path / "users" / "alice" / "f", 2 * MIB)
            await trio.sleep(0.3)
        [failure] = stopped
        assert failure.status == 507 and failure.error.startswith("turn stopped: disk quota")


async def test_watch_stops_a_writing_turn_when_the_disk_is_full(tmp_path, monkeypatch):
    with trio.fail_after(TIMEOUT):
        q = attrs.evolve(quota(tmp_path, limit=100 * MIB, reserve=40 * MIB), interval_s=0.05)
        # Full: less free than a quarter of the reserve (its ballast is not free space).
        monkeypatch.setattr(disk_quota, "free_bytes", lambda path: (5 * MIB, 1000 * MIB))
        stopped = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(q.watch, Watched("alice", stopped.append))
            nursery.start_soon(q.watch, Watched("bob", stopped.append))
            await trio.sleep(0.3)
            assert stopped == []  # full, but alice writes nothing: not hers to stop
            _write(tmp_path / "users" / "bob" / "transcript", 100_000)  # (a turn's worth)
            _write(tmp_path / "users" / "alice" / "f", 2 * MIB)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        [failure] = stopped
        assert failure.status == 507 and "disk is full" in failure.error
        assert "'alice'" in failure.error
        assert set(q.filled) == {"alice"}  # refused new work while the disk is full
        refusal = await q.refusal("alice")
        assert refusal is not None and refusal.status == 507 and "filled it" in refusal.error
        assert await q.refusal("bob") is None
        monkeypatch.setattr(disk_quota, "free_bytes", lambda path: (500 * MIB, 1000 * MIB))
        assert await q.refusal("alice") is None  # room again
        assert q.filled == {}


@pytest.mark.parametrize(
    ("free", "total", "expected"),
    [
        (10_000 * MIB, 20_000 * MIB, 1024 * MIB),  # room: the quota
        # The free space above a quarter of the 256 MiB reserve (its ballast is not free).
        (300 * MIB, 20_000 * MIB, 236 * MIB),
        # A small disk: the reserve is a quarter of it (10 MiB, held), the full mark 2.5 MiB.
        (30 * MIB, 40 * MIB, 27.5 * MIB),
        (60 * MIB, 20_000 * MIB, MIN_FILE_SIZE),  # never below the minimum
    ],
)
def test_file_size_limit(monkeypatch, tmp_path, free, total, expected):
    monkeypatch.setattr(disk_quota, "free_bytes", lambda path: (free, total))
    assert file_size_limit(tmp_path, 1024 * MIB, 256 * MIB) == expected


def test_homes_of_users_without_sessions_are_emptied_after_the_ttl_but_their_claude_md(tmp_path):
    users = tmp_path / "users"
    old = 1_000_000.0

    def home(name: str, *, memory: bool, when: float) -> None:
        _write(users / name / "workspace" / "big", 1000)
        _write(users / name / ".claude" / "projects" / "-w" / "t.jsonl", 10)
        if memory:
            (users / name / ".claude" / "CLAUDE.md").write_text("be brief")
        for path in sorted(users.joinpath(name).rglob("*"), reverse=True) + [users / name]:
            os.utime(path, (when, when), follow_symlinks=False)

    home("gone", memory=False, when=old)
    home("remembered", memory=True, when=old)
    home("has-a-session", memory=False, when=old)
    home("recent", memory=False, when=old + 100)
    (users / "a-link").symlink_to(users / "recent")

    emptied = remove_abandoned_homes(users, {"has-a-session"}, before=old + 50)

    assert emptied == 2
    assert not (users / "gone").exists()
    assert [p.relative_to(users).as_posix() for p in sorted((users / "remembered").rglob("*"))] == [
        "remembered/.claude",
        "remembered/.claude/CLAUDE.md",
    ]
    assert (users / "has-a-session" / "workspace" / "big").exists()
    assert (users / "recent" / "workspace" / "big").exists()
    # Nothing left to remove: a second sweep does nothing.
    assert remove_abandoned_homes(users, {"has-a-session"}, before=old + 50) == 0


async def test_a_turn_that_filled_the_disk_is_found_after_the_reserve_gave_some_back(
    tmp_path, monkeypatch
):
    """The turn ended by itself having filled the disk; the session store's write then
    released a part of the reserve, so free space is above the full mark again. The
    reserve not being whole still says the disk is full: the user is refused."""
    with trio.fail_after(TIMEOUT):
        q = quota(tmp_path, limit=100 * MIB, reserve=40 * MIB)
        q.ballast = DiskReserve(tmp_path, 40 * MIB, target=40 * MIB, held=30 * MIB)
        monkeypatch.setattr(disk_quota, "free_bytes", lambda path: (12 * MIB, 1000 * MIB))
        assert not q.low_on_space()
        turn = Watched("alice", lambda failure: None)
        turn.start = await q.usage("alice")  # measured before the turn, as the turn does
        _write(tmp_path / "users" / "alice" / "f", 2 * MIB)
        assert await q.after_turn(turn) is True
        assert set(q.filled) == {"alice"}
        refusal = await q.refusal("alice")
        assert refusal is not None and "filled it" in refusal.error
        q.ballast.held = q.ballast.target  # whole again: there is room
        assert await q.refusal("alice") is None


async def test_the_watch_keeps_the_measurement_taken_before_the_turn(tmp_path):
    with trio.fail_after(TIMEOUT):
        q = attrs.evolve(quota(tmp_path, limit=100 * MIB), interval_s=0.05)
        turn = Watched("alice", lambda failure: None, start=0)
        _write(tmp_path / "users" / "alice" / "f", 2 * MIB)  # (a fast tool, before the watch)
        with trio.move_on_after(0.2):
            await q.watch(turn)
        assert turn.start == 0
