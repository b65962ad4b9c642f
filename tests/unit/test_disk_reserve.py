"""The disk reserve's ballast: made at start, released when the disk is full, topped up
(no agents; the real-CLI side is tests/real_cli/test_e2e_real_cli_disk.py)."""

from __future__ import annotations

import os

import pytest
import trio

from claude_code_api.actors.registry import serve_registry
from claude_code_api.actors.registry_client import RegistryClient
from claude_code_api.actors.turn import TurnLimits, run_turn
from claude_code_api.agent.protocol import AgentSpec
from claude_code_api.limits import disk_quota, disk_reserve
from claude_code_api.limits.disk_quota import DiskQuota, Watched
from claude_code_api.limits.disk_reserve import BALLAST_NAME, MIB, DiskReserve
from claude_code_api.messages import Job, SessionKey
from claude_code_api.observe import metrics
from claude_code_api.store import SqliteSessionTable, StoreFull, new_session_record
from tests.support.fake_agent import FakeAgents, Finish, Wait
from tests.support.tmpfs import mount_tmpfs, unmount_tmpfs

TIMEOUT = 10
TOTAL = 1000 * MIB


class Disk:
    """What statvfs says of the data directory's filesystem: ``free`` (set by the test) is
    what is free now; a release of the ballast (in tmp_path) adds to it, a top-up takes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path, free: int) -> None:
        self.tmp_path = tmp_path
        self.room = 0
        self.free = free
        for module in (disk_reserve, disk_quota):
            monkeypatch.setattr(module, "free_bytes", lambda path: (self.free, TOTAL))

    @property
    def free(self) -> int:
        return max(0, self.room - held(self.tmp_path))

    @free.setter
    def free(self, free: int) -> None:
        self.room = free + held(self.tmp_path)


def held(tmp_path) -> int:
    """What the ballast holds, in whole MiB (a large file may take a metadata block more)."""
    try:
        return os.stat(tmp_path / BALLAST_NAME).st_blocks * 512 // MIB * MIB
    except FileNotFoundError:
        return 0


def released_total() -> float:
    return metrics.DISK_RESERVE_RELEASED._value.get()


async def test_the_ballast_holds_the_reserve_and_a_full_disk_releases_a_quarter(
    tmp_path, monkeypatch
):
    with trio.fail_after(TIMEOUT):
        disk = Disk(monkeypatch, tmp_path, free=500 * MIB)
        reserve = DiskReserve(tmp_path, 8 * MIB)
        await reserve.fill()
        assert reserve.target == 8 * MIB and held(tmp_path) == 8 * MIB and reserve.whole
        before = released_total()
        disk.free = 0  # agents filled the rest
        assert await reserve.release("a test") == 2 * MIB
        assert held(tmp_path) == 6 * MIB and reserve.held == 6 * MIB and not reserve.whole
        assert released_total() == before + 1
        # Not topped up from the room a release gave (nor from less than a quarter more).
        assert disk.free == 2 * MIB
        await reserve.fill()
        assert held(tmp_path) == 6 * MIB
        disk.free = 3 * MIB
        await reserve.fill()
        assert held(tmp_path) == 7 * MIB  # what is beyond a quarter of the reserve
        disk.free = 400 * MIB  # space was freed
        await reserve.fill()
        assert held(tmp_path) == 8 * MIB and reserve.whole


async def test_the_ballast_is_a_quarter_of_a_small_disk_and_follows_the_setting(
    tmp_path, monkeypatch
):
    with trio.fail_after(TIMEOUT):
        Disk(monkeypatch, tmp_path, free=TOTAL)
        reserve = DiskReserve(tmp_path, 10_000 * MIB)
        await reserve.fill()
        assert reserve.target == TOTAL // 4 and held(tmp_path) == TOTAL // 4
        smaller = DiskReserve(tmp_path, 4 * MIB)  # (restarted with a smaller setting)
        await smaller.fill()
        assert held(tmp_path) == 4 * MIB and smaller.whole


async def test_no_release_when_there_is_room_nor_when_nothing_is_left(tmp_path, monkeypatch):
    with trio.fail_after(TIMEOUT):
        disk = Disk(monkeypatch, tmp_path, free=500 * MIB)
        quota = DiskQuota(
            tmp_path,
            100 * MIB,
            4 * MIB,
            lambda u: tmp_path / u,
            ballast=DiskReserve(tmp_path, 4 * MIB),
        )
        assert quota.ballast is not None
        await quota.ballast.fill()
        assert await quota.make_room() is True  # room already (another release came first)
        assert held(tmp_path) == 4 * MIB
        for left in (3, 2, 1, 0):
            disk.free = 0  # (what each release gave was taken again)
            assert await quota.make_room() is True
            assert held(tmp_path) == left * MIB
        disk.free = 0
        assert await quota.make_room() is False  # nothing left to give


async def test_make_room_stops_the_writing_turns_and_releases_after_their_agents_die(
    tmp_path, monkeypatch
):
    with trio.fail_after(TIMEOUT):
        disk = Disk(monkeypatch, tmp_path, free=500 * MIB)
        quota = DiskQuota(
            tmp_path,
            100 * MIB,
            8 * MIB,
            lambda user: tmp_path / "users" / user,
            ballast=DiskReserve(tmp_path, 8 * MIB),
        )
        assert quota.ballast is not None
        await quota.ballast.fill()
        held_when_killed = []

        def stop_alice(failure) -> None:
            async def kill() -> None:
                await trio.sleep(0.2)  # the agent takes its time to die
                held_when_killed.append(held(tmp_path))
                await quota.after_stop(alice)

            nursery.start_soon(kill)

        alice = Watched("alice", stop_alice)
        bob = Watched("bob", lambda failure: pytest.fail("bob is not filling the disk"))
        async with trio.open_nursery() as nursery:
            for turn in (alice, bob):
                nursery.start_soon(quota.watch, turn)
            await trio.testing.wait_all_tasks_blocked()
            while alice.start is None or bob.start is None:
                await trio.sleep(0.01)
            (tmp_path / "users" / "alice").mkdir(parents=True)
            (tmp_path / "users" / "alice" / "fill").write_bytes(b"x" * 3 * MIB)
            disk.free = 0
            assert await quota.make_room() is True
            assert held_when_killed == [8 * MIB]  # released only once her agent was dead
            assert held(tmp_path) == 6 * MIB
            assert alice.stopped and not bob.stopped
            nursery.cancel_scope.cancel()
        refusal = await quota.refusal("alice")
        assert refusal is not None and refusal.status == 507
        assert await quota.refusal("bob") is None


async def test_a_save_that_finds_the_disk_full_makes_room_and_is_acknowledged(tmp_path):
    with trio.fail_after(TIMEOUT):
        store = SqliteSessionTable(tmp_path / "sessions.sqlite3")
        real_save = store.save_many
        failures = [StoreFull("session store: the disk is full (test)")]

        def save_many(records, *, wait=True):
            if failures:
                raise failures.pop()
            real_save(records, wait=wait)

        store.save_many = save_many  # type: ignore[method-assign]
        asked = []

        async def make_room() -> bool:
            asked.append(True)
            return True

        health = []
        send, receive = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_registry(
                    store,
                    receive,
                    make_room=make_room,
                    on_health=health.append,
                    task_status=task_status,
                )
            )
            client = RegistryClient(send)
            record = new_session_record(SessionKey("bob", "s1"), 1.0)
            await client.save(record)  # acknowledged: it was written
            assert asked == [True] and health == []
            assert await client.load(record.key) == record
            send.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_on_a_full_disk_without_a_reserve_a_checkpoint_lets_new_sessions_be_saved(tmp_path):
    """The WAL is never truncated: after a checkpoint its space takes the next commits."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "8m")
    try:
        with trio.fail_after(TIMEOUT):
            store = SqliteSessionTable(disk / "sessions.sqlite3")
            for n in range(300):  # a WAL of a few hundred commits, as a running service has
                store.save(new_session_record(SessionKey("u", f"old-{n}"), 1.0))
            store.checkpoint()
            for n in range(300):
                store.save(new_session_record(SessionKey("u", f"old-{n}"), 2.0))
            with open(disk / "fill", "wb") as fill:  # an agent took every block left
                with pytest.raises(OSError):
                    while True:
                        fill.write(b"x" * 65536)
                        fill.flush()
            send, receive = trio.open_memory_channel(10)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: serve_registry(store, receive, task_status=task_status)
                )
                client = RegistryClient(send)
                for n in range(50):
                    await client.save(new_session_record(SessionKey("bob", f"new-{n}"), 3.0))
                send.close()
    finally:
        unmount_tmpfs(disk)


async def test_a_ballast_with_holes_is_allocated_again(tmp_path, monkeypatch):
    with trio.fail_after(TIMEOUT):
        Disk(monkeypatch, tmp_path, free=500 * MIB)
        with open(tmp_path / BALLAST_NAME, "wb") as file:
            file.truncate(8 * MIB)  # the right size, but it holds nothing
        reserve = DiskReserve(tmp_path, 8 * MIB)
        await reserve.fill()
        assert held(tmp_path) == 8 * MIB and reserve.whole


async def test_a_turn_that_filled_the_disk_and_ended_has_its_agent_killed_before_the_release(
    tmp_path, monkeypatch
):
    """Faster than the watch: the turn's end finds the disk full. Its agent (and what it
    may have left running) is killed first, then the others get room; its user is refused."""
    with trio.fail_after(TIMEOUT):
        disk = Disk(monkeypatch, tmp_path, free=500 * MIB)
        quota = DiskQuota(
            tmp_path,
            100 * MIB,
            8 * MIB,
            lambda user: tmp_path / "users" / user,
            interval_s=60.0,  # (never measures again within the turn)
            ballast=DiskReserve(tmp_path, 8 * MIB),
        )
        assert quota.ballast is not None
        await quota.ballast.fill()
        agents = FakeAgents(script=lambda prompt: [Wait(0.5), Finish("done")])
        agent = agents(AgentSpec(name="w", home=tmp_path / "users" / "u", ephemeral=False))
        await agent.start(10)
        held_when_closed = []
        close = agent.close

        async def recorded_close(grace: float) -> None:
            held_when_closed.append(held(tmp_path))
            await close(grace=grace)

        agent.close = recorded_close  # type: ignore[method-assign]
        reply_send, _ = trio.open_memory_channel(64)
        now = trio.current_time()
        job = Job(
            id="j",
            user_id="u",
            prompt="fill",
            submitted_at=now,
            deadline=now + 30,
            reply=reply_send,
        )

        async def fill() -> None:
            await trio.sleep(0.2)
            (tmp_path / "users" / "u").mkdir(parents=True, exist_ok=True)
            (tmp_path / "users" / "u" / "fill").write_bytes(b"x" * 3 * MIB)
            disk.free = 0

        limits = TurnLimits(interrupt_grace_s=1.0, max_output_chars=1000, disk=quota)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill)
            outcome = await run_turn(agent, job, worker_id="w", limits=limits)
        assert outcome.ok and not outcome.agent_usable  # answered; the agent is not kept
        assert "killed" in agent.events
        assert held_when_closed == [8 * MIB] and held(tmp_path) == 6 * MIB
        refusal = await quota.refusal("u")
        assert refusal is not None and "disk is full" in refusal.error
