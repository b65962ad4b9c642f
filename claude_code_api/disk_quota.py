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
  the quota, or when the data directory's filesystem has less free space than
  the service's reserve and this user's usage has grown during the turn.
* **Between two measurements** a single file cannot outgrow the quota, nor eat the
  reserve: every agent starts with ``RLIMIT_FSIZE`` (:meth:`file_size_limit`,
  applied by the launcher) set to the smaller of the quota and the free space
  above the reserve at that moment; a write past it fails (``EFBIG``; the
  writing tool gets ``SIGXFSZ``), the agent lives on.

Why a walk and not the kernel's quotas: project quotas need a filesystem that
has them, mounted with them, and the privileges to set them; a walk works on
any volume. It costs ~3 µs per file and directory (measured: 50 000 files in
0.14 s of one CPU, in a thread), once per interval per user with a turn running.

The reserve (``DISK_RESERVE_MB``, at most a quarter of the filesystem) keeps
the session database, the transcripts of other users' turns and the CLI's own
bookkeeping writable when an agent fills what it may write.

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

from .config import Settings
from .messages import JobFailed
from .sandbox import empty_user_home

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# How often a running turn's user is measured again.
WATCH_INTERVAL_S = 1.0
# A measurement this recent is shared by the user's other turns instead of walking again.
FRESH_S = 0.5
# The smallest RLIMIT_FSIZE an agent gets (the CLI must be able to write its transcript,
# whose lines can be large), even when the filesystem is nearly full.
MIN_FILE_SIZE = 8 * MIB
# The reserve is at most this fraction of the filesystem (a small volume keeps room too).
MAX_RESERVE_FRACTION = 0.25
DISK_FULL_STATUS = 507


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


def free_bytes(path: Path) -> tuple[int, int]:
    """``(free, total)`` bytes of the filesystem holding ``path`` (for unprivileged writers)."""
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


@attrs.define(eq=False)
class DiskQuota:
    """The per-user quota and the service's reserve on ``data_dir``'s filesystem.

    ``home_of(user_id)`` is the user's HOME. Only on the trio thread (the walks
    run in worker threads and touch nothing of this object).
    """

    data_dir: Path
    limit: int  # bytes a user's agents may keep
    reserve: int  # bytes of the filesystem kept free for the service (before the 1/4 cap)
    home_of: Callable[[str], Path]
    interval_s: float = WATCH_INTERVAL_S
    # The ephemeral HOMEs of one-shot agents running for each user: counted with theirs.
    running: dict[str, list[Path]] = attrs.Factory(dict)
    # user -> (trio time, bytes) of the last measurement.
    measured: dict[str, tuple[float, int]] = attrs.Factory(dict)

    def paths(self, user_id: str) -> list[Path]:
        return [self.home_of(user_id), *self.running.get(user_id, ())]

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
        """The 507 for a user at or over the quota, else None. Measures (in a thread)."""
        used = await self.usage(user_id)
        return self.over_quota(user_id, used) if used >= self.limit else None

    def effective_reserve(self, total: int) -> int:
        return min(self.reserve, int(total * MAX_RESERVE_FRACTION))

    @classmethod
    def from_settings(cls, settings: Settings, home_of: Callable[[str], Path]) -> DiskQuota:
        return cls(
            settings.data_dir,
            settings.user_disk_max_mb * MIB,
            settings.disk_reserve_mb * MIB,
            home_of,
        )

    def low_on_space(self) -> bool:
        """Whether the data directory's filesystem has less free space than the reserve."""
        try:
            free, total = free_bytes(self.data_dir)
        except OSError:
            return False
        return free < self.effective_reserve(total)

    async def watch(self, user_id: str, stop_turn: Callable[[JobFailed], None]) -> None:
        """Until cancelled: measure the user every interval; stop the turn when it must.

        ``stop_turn(failure)`` is called once, when the user is over the quota or
        the filesystem is below the reserve and this user's files grew during the
        turn; then this returns. A failure of its own is logged and ends the watch, never
        the turn.
        """
        try:
            await self._watch(user_id, stop_turn)
        except Exception:
            log.exception(
                "disk quota: watching user %r failed; the turn goes on unwatched", user_id
            )

    async def _watch(self, user_id: str, stop_turn: Callable[[JobFailed], None]) -> None:
        start = await self.usage(user_id)
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
                stop_turn(self.over_quota(user_id, used, stopped=True))
                return
            if used > start and self.low_on_space():
                log.warning(
                    "the data directory's filesystem is below the reserve while user %r"
                    " writes (%s, %s more than when the turn began): stopping the turn",
                    user_id,
                    _mib(used),
                    _mib(used - start),
                )
                stop_turn(
                    JobFailed(
                        DISK_FULL_STATUS,
                        "turn stopped: the service's disk is nearly full (its reserve,"
                        " DISK_RESERVE_MB, is kept for the service) and this turn was"
                        f" writing; user {user_id!r} keeps {_mib(used)} of files",
                    )
                )
                return

    def file_size_limit(self) -> int:
        return file_size_limit(self.data_dir, self.limit, self.reserve)


def file_size_limit(data_dir: Path, limit: int, reserve: int) -> int:
    """RLIMIT_FSIZE for an agent starting now: the quota ``limit``, or the free space of
    ``data_dir``'s filesystem above the reserve if smaller (at least :data:`MIN_FILE_SIZE`).
    Blocking (``statvfs``)."""
    try:
        free, total = free_bytes(data_dir)
    except OSError:
        return limit
    room = free - min(reserve, int(total * MAX_RESERVE_FRACTION))
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
    but the user's CLAUDE.md (:func:`~claude_code_api.sandbox.empty_user_home`).
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
