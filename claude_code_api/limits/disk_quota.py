"""Each user's disk quota, and the room the service keeps for its own state.

What a user's agents keep is measured, not trusted: the user's HOME
(``DATA_DIR/users/<user>``: workspace, transcripts, whatever their tools left)
plus the ephemeral HOMEs of that user's one-shot agents while they run
(``DATA_DIR/workers/...``). :class:`DiskQuota` owns that bookkeeping:

* **Before work** (a one-shot job or a session turn reaching its agent),
  :meth:`DiskQuota.refusal` measures the user (a walk in a worker thread, shared
  by the user's turns when it is recent) and answers a user at or over
  ``USER_DISK_MAX_MB`` with a 507 naming the quota.
* **During a turn**, :meth:`DiskQuota.watch` measures the user again every
  :data:`WATCH_INTERVAL_S` and stops the turn (507) as soon as the user is over
  the quota, or when the data directory's filesystem is full (less free space
  than a quarter of the reserve: :meth:`DiskQuota.low_on_space`) and this user's
  files grew during the turn by more than :data:`GROWTH_SLACK`. A turn that ended
  by itself is checked once more (:meth:`DiskQuota.after_turn`): many files fill a
  fast disk within one interval.
* **Between two measurements** a single file cannot outgrow the quota, nor the
  free space: every agent starts with ``RLIMIT_FSIZE`` (:meth:`file_size_limit`,
  applied by the launcher) set to the smaller of the quota and the free space
  above the full mark at that moment; a write past it fails (``EFBIG``; the
  writing tool gets ``SIGXFSZ``), the agent lives on.

Why a walk and not the kernel's quotas: project quotas need a filesystem that
has them, mounted with them, and the privileges to set them; a walk works on
any volume. It costs ~3 µs per file and directory (measured: 50 000 files in
0.14 s of one CPU, in a thread), once per interval per user with a turn running.

The reserve (``DISK_RESERVE_MB``, at most a quarter of the filesystem) is held by
a file (:mod:`~claude_code_api.limits.disk_reserve`): agents can only fill the rest, however
fast. When they have, the turns writing are stopped first, their agents killed (also
the agent of a turn that filled the disk and ended by itself, with whatever it left
running), and then a quarter of the reserve is released (:meth:`DiskQuota.after_stop`;
:meth:`DiskQuota.make_room` for the session store, whose write found the disk full),
so the session database, the transcripts of other users' turns and the CLI's own
bookkeeping stay writable. The user whose agents
filled the disk is refused new work (507) until there is room again.

Error handling: a file that vanishes or cannot be read during a walk is
skipped; the walk never raises for what agents do to their directories. Links
are never followed (an agent could point one at the whole disk).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio

from ..agent.sandbox import empty_user_home
from ..config.settings import Settings
from ..messages import JobFailed
from .disk_reserve import RELEASE_FRACTION, DiskReserve, free_bytes, reserve_size

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# How often a running turn's user is measured again.
WATCH_INTERVAL_S = 1.0
# A measurement this recent is shared by the user's other turns instead of walking again.
FRESH_S = 0.5
# The smallest RLIMIT_FSIZE an agent gets (the CLI must be able to write its transcript,
# whose lines can be large), even when the filesystem is nearly full.
MIN_FILE_SIZE = 8 * MIB
DISK_FULL_STATUS = 507
# A turn whose user grew by less than this while the disk was full is not the one filling
# it (a turn's transcript takes kilobytes).
GROWTH_SLACK = 1 * MIB
# How long the release of the reserve waits for the agents it stopped to be killed.
KILL_WAIT_S = 5.0


def disk_usage(paths: Iterable[Path]) -> int:
    """Bytes allocated on disk under ``paths`` (``st_blocks``), links not followed.

    Each inode is counted once (hard links), directories included. Missing
    paths count 0. Blocking: run it in a worker thread.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in paths:
        for entry_stat in _walk(path):
            key = (entry_stat.st_dev, entry_stat.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += entry_stat.st_blocks * 512
    return total


def _walk(top: Path) -> Iterator[os.stat_result]:
    try:
        top_stat = os.lstat(top)
    except OSError:
        return
    yield top_stat
    if not stat.S_ISDIR(top_stat.st_mode):
        return
    stack = [os.fspath(top)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        entry_stat = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    yield entry_stat
                    if stat.S_ISDIR(entry_stat.st_mode):
                        stack.append(entry.path)
        except OSError:
            continue


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


@attrs.define(eq=False)
class DiskQuota:
    """The per-user quota and the service's reserve on ``data_dir``'s filesystem.

    ``home_of(user_id)`` is the user's HOME; ``workspaces_dir`` (``WORKSPACES_DIR``), where
    users' workspaces are when not in their HOMEs: counted with them. Only on the trio thread (the walks
    run in worker threads and touch nothing of this object).
    """

    data_dir: Path
    limit: int  # bytes a user's agents may keep
    reserve: int  # bytes of the filesystem kept free for the service (before the 1/4 cap)
    home_of: Callable[[str], Path]
    interval_s: float = WATCH_INTERVAL_S
    workspaces_dir: Path | None = None
    # The ephemeral HOMEs of one-shot agents running for each user: counted with theirs.
    running: dict[str, list[Path]] = attrs.Factory(dict)
    # user -> (trio time, bytes) of the last measurement.
    measured: dict[str, tuple[float, int]] = attrs.Factory(dict)
    # The file holding the reserve (None: no reserve); its keeper runs in the service's tree.
    ballast: DiskReserve | None = None
    # The turns being watched now.
    turns: set[Watched] = attrs.Factory(set)
    # user -> bytes: users whose agents filled the disk, refused new work while it is full.
    filled: dict[str, int] = attrs.Factory(dict)

    def paths(self, user_id: str) -> list[Path]:
        home = self.home_of(user_id)
        workspace = [] if self.workspaces_dir is None else [self.workspaces_dir / home.name]
        return [home, *workspace, *self.running.get(user_id, ())]

    @contextmanager
    def counting(self, user_id: str, home: Path | None) -> Iterator[None]:
        """Around a turn: ``home`` (a one-shot agent's) counts for ``user_id`` while inside;
        after it, the user's last measurement is stale (the turn may have written)."""
        try:
            if home is None or home == self.home_of(user_id):
                yield
                return
            homes = self.running.setdefault(user_id, [])
            homes.append(home)
            try:
                yield
            finally:
                homes.remove(home)
                if not homes:
                    del self.running[user_id]
        finally:
            self.measured.pop(user_id, None)

    async def usage(self, user_id: str, *, max_age: float = FRESH_S) -> int:
        """The user's bytes now (a measurement younger than ``max_age`` s is reused)."""
        now = trio.current_time()
        last = self.measured.get(user_id)
        if last is not None and now - last[0] < max_age:
            return last[1]
        # abandon_on_cancel: the walk only reads; a turn that ends must not wait for it.
        used = await trio.to_thread.run_sync(
            disk_usage, self.paths(user_id), abandon_on_cancel=True
        )
        self.measured[user_id] = (trio.current_time(), used)
        if len(self.measured) > 10_000:  # users come and go: keep it bounded
            self.measured.pop(next(iter(self.measured)))
        return used

    def over_quota(self, user_id: str, used: int, *, stopped: bool = False) -> JobFailed:
        what = "turn stopped: " if stopped else ""
        return JobFailed(
            DISK_FULL_STATUS,
            f"{what}disk quota exceeded: user {user_id!r} keeps {_mib(used)} of files, the"
            f" quota (USER_DISK_MAX_MB) is {_mib(self.limit)}; remove files from the"
            " workspace or delete sessions to free space",
        )

    async def refusal(self, user_id: str) -> JobFailed | None:
        """The 507 for a user at or over the quota, or whose agents filled the disk while it
        is still full; else None. Measures (in a thread)."""
        if user_id in self.filled:
            if self.full():
                return self.filled_by(user_id, self.filled[user_id])
            del self.filled[user_id]  # there is room again
        used = await self.usage(user_id)
        return self.over_quota(user_id, used) if used >= self.limit else None

    def filled_by(self, user_id: str, used: int, *, stopped: bool = False) -> JobFailed:
        what = "turn stopped: " if stopped else ""
        return JobFailed(
            DISK_FULL_STATUS,
            f"{what}the service's disk is full: user {user_id!r}'s agents filled it (they keep"
            f" {_mib(used)} of files); remove files from the workspace or delete sessions to"
            " free space: until there is room again, this user's new work is refused"
            " (the service keeps DISK_RESERVE_MB for its own state)",
        )

    def effective_reserve(self, total: int) -> int:
        return reserve_size(self.reserve, total)

    def margin(self, total: int) -> int:
        """Free space below which the filesystem counts as full: a quarter of the reserve
        (what one release of the ballast gives back)."""
        return int(self.effective_reserve(total) * RELEASE_FRACTION)

    @classmethod
    def from_settings(cls, settings: Settings, home_of: Callable[[str], Path]) -> DiskQuota:
        reserve = settings.disk_reserve_mb * MIB
        return cls(
            settings.data_dir,
            settings.user_disk_max_mb * MIB,
            reserve,
            home_of,
            workspaces_dir=settings.workspaces_dir,
            ballast=DiskReserve(settings.data_dir, reserve) if reserve else None,
        )

    def low_on_space(self) -> bool:
        """Whether the data directory's filesystem is full: less free space than
        :meth:`margin` (the reserve's ballast is not free space: agents cannot have it)."""
        try:
            free, total = free_bytes(self.data_dir)
        except OSError:
            return False
        return free < self.margin(total)

    def full(self) -> bool:
        """Full, or so recently that the reserve has not been made whole again."""
        return self.low_on_space() or (self.ballast is not None and not self.ballast.whole)

    async def watch(self, turn: Watched) -> None:
        """Until cancelled: measure the turn's user every interval; stop the turn when it must.

        ``turn.stop(failure)`` is called once, when the user is over the quota or the
        filesystem is full (:meth:`low_on_space`) and this user's files grew during the
        turn by more than :data:`GROWTH_SLACK` (the user is then refused new work while
        the disk stays full); then this returns. Its caller kills the agent and calls
        :meth:`after_stop`. A failure of its own is logged and ends the watch, never
        the turn.
        """
        self.turns.add(turn)
        try:
            await self._watch(turn)
        except Exception:
            log.exception(
                "disk quota: watching user %r failed; the turn goes on unwatched", turn.user_id
            )
        finally:
            self.turns.discard(turn)

    async def _watch(self, turn: Watched) -> None:
        user_id = turn.user_id
        if turn.start is None:  # (its caller measures it before the turn, as it should)
            turn.start = await self.usage(user_id)
        while True:
            await trio.sleep(self.interval_s)
            used = await self.usage(user_id, max_age=self.interval_s / 2)
            if used > self.limit:
                log.warning(
                    "user %r is over the disk quota (%s of %s): stopping the turn",
                    user_id,
                    _mib(used),
                    _mib(self.limit),
                )
                turn.stopped = True
                turn.stop(self.over_quota(user_id, used, stopped=True))
                return
            if self._filling(turn, used) and self.low_on_space():
                self._stop_filler(turn, used)
                return

    def _filling(self, turn: Watched, used: int) -> bool:
        return turn.start is not None and used - turn.start > GROWTH_SLACK

    def _stop_filler(self, turn: Watched, used: int) -> None:
        self.filled[turn.user_id] = used
        turn.stopped = True
        log.warning(
            "the data directory's filesystem is full while user %r writes (%s, %s more than"
            " when the turn began): stopping the turn; the user's new work is refused until"
            " there is room again",
            turn.user_id,
            _mib(used),
            _mib(used - (turn.start or 0)),
        )
        turn.stop(self.filled_by(turn.user_id, used, stopped=True))

    async def after_turn(self, turn: Watched) -> bool:
        """After a turn that ended by itself: whether it filled the disk (faster than a
        watch's interval). Its user is then refused new work; its caller kills the agent
        (with whatever it left running) and calls :meth:`after_stop`."""
        # full(), not low_on_space(): the turn may have filled the disk and the session
        # store's write (make_room) given back a part of the reserve before this looks.
        if turn.start is None or not self.full():
            return False
        used = await self.usage(turn.user_id, max_age=0)
        if not self._filling(turn, used):
            return False
        self.filled[turn.user_id] = used
        turn.stopped = True
        log.warning(
            "the data directory's filesystem is full after a turn of user %r (%s, %s more"
            " than when it began); the user's new work is refused until there is room again",
            turn.user_id,
            _mib(used),
            _mib(used - turn.start),
        )
        return True

    async def after_stop(self, turn: Watched) -> None:
        """After a turn stopped by :meth:`watch` (or found by :meth:`after_turn`) had its
        agent killed: if the disk is full, room for the others."""
        try:
            await self._release(f"user {turn.user_id!r}'s turn, stopped, filled the disk")
        finally:
            turn.killed.set()

    async def make_room(self) -> bool:
        """The disk is full (the session store could not write): stop the turns that are
        writing, wait for their agents to be killed, then release a part of the reserve.
        Whether the write is worth trying again."""
        stopping = []
        for turn in list(self.turns):
            used = await self.usage(turn.user_id, max_age=0)
            if not turn.stopped and self._filling(turn, used):
                self._stop_filler(turn, used)
                stopping.append(turn)
        with trio.move_on_after(KILL_WAIT_S):
            for turn in stopping:
                await turn.killed.wait()
        writers = ", ".join(sorted({repr(t.user_id) for t in stopping})) or "no running turn"
        return await self._release(f"the session store found the disk full; stopped: {writers}")

    async def _release(self, why: str) -> bool:
        """Release a part of the reserve if the disk is full; whether there is room now."""
        if self.ballast is None:
            return False
        freed = await self.ballast.release(why)
        return freed is None or freed > 0

    def file_size_limit(self) -> int:
        return file_size_limit(self.data_dir, self.limit, self.reserve)


@attrs.define(eq=False)
class Watched:
    """One turn under :meth:`DiskQuota.watch`: whose, how to stop it, what it began with."""

    user_id: str
    stop: Callable[[JobFailed], None]
    start: int | None = None  # the user's bytes when the turn began (None: not measured yet)
    stopped: bool = False
    killed: trio.Event = attrs.Factory(trio.Event)  # its agent is dead (after a stop)


def file_size_limit(data_dir: Path, limit: int, reserve: int) -> int:
    """RLIMIT_FSIZE for an agent starting now: the quota ``limit``, or the free space of
    ``data_dir``'s filesystem above the full mark (a quarter of the reserve, whose ballast
    is not free space) if smaller (at least :data:`MIN_FILE_SIZE`). Blocking (``statvfs``)."""
    try:
        free, total = free_bytes(data_dir)
    except OSError:
        return limit
    room = free - int(reserve_size(reserve, total) * RELEASE_FRACTION)
    return max(min(limit, room), min(MIN_FILE_SIZE, limit))


def home_last_changed(home: Path) -> float:
    """When ``home`` last changed at its top levels: the newest mtime of the HOME, its
    workspace, its config dir, ``projects`` and each project directory (where a
    removed transcript leaves its mark). Links are not followed. Blocking."""
    config = home / ".claude"
    paths = [home, home / "workspace", config, config / "projects"]
    try:
        paths += [config / "projects" / name for name in os.listdir(config / "projects")]
    except OSError:
        pass
    latest = 0.0
    for path in paths:
        try:
            latest = max(latest, os.lstat(path).st_mtime)
        except OSError:
            continue
    return latest or time.time()


def remove_abandoned_homes(users_dir: Path, kept: Collection[str], before: float) -> int:
    """Empty the HOMEs in ``users_dir`` not named in ``kept`` and unchanged since ``before``.

    ``kept``: the directory names of users who have a session. What goes is everything
    but the user's CLAUDE.md (:func:`~claude_code_api.agent.sandbox.empty_user_home`).
    Returns how many were emptied; what cannot be removed is logged. Blocking.
    """
    try:
        names = os.listdir(users_dir)
    except FileNotFoundError:
        return 0
    emptied = 0
    for name in names:
        home = users_dir / name
        if name in kept or not home.is_dir() or home.is_symlink():
            continue
        if home_last_changed(home) >= before:
            continue
        if not any(entry != ".claude" for entry in os.listdir(home)) and not any(
            entry != "CLAUDE.md" for entry in _names(home / ".claude")
        ):
            continue  # nothing but a CLAUDE.md already
        try:
            empty_user_home(home)
            emptied += 1
        except OSError as exc:
            log.error("could not remove the files of %s (no session left): %s", home, exc)
    return emptied


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []
