"""The service's reserve on ``DATA_DIR``'s filesystem, held physically by a ballast file.

Why a file and not a threshold: a threshold is a promise the service checks
(every second, per running turn: :mod:`~claude_code_api.limits.disk_quota`), and an agent
writing many files fills a fast disk within that second, reserve included; the
session store then cannot commit and every other user's session turn fails. A
file the service allocated (``DATA_DIR/.reserve``, :data:`BALLAST_NAME`) holds the
reserve whatever agents do: they can only fill the rest. When the rest is full,
the service stops the turns that are writing (:meth:`DiskQuota.make_room
<claude_code_api.limits.disk_quota.DiskQuota.make_room>`) and then gives back a quarter
of the ballast (:meth:`DiskReserve.release`), so its own writes (the session
database, other users' transcripts) have room again; each release is logged and
counted (``disk_reserve_released_total``). :meth:`DiskReserve.serve` tops the
ballast up to its size, from free space beyond one release's worth, every
:data:`TOP_UP_INTERVAL_S` (after an operator or a session's expiry freed space).

The size is ``DISK_RESERVE_MB``, at most a quarter of the filesystem
(:func:`reserve_size`); ``0``: no ballast, no reserve.

Error handling: the ballast is allocated with ``posix_fallocate``; where the
filesystem has none (or it leaves the blocks unallocated, as a compressing one
would with zeros), it is written with incompressible bytes. A ballast that cannot
be made whole (the disk is already full) is logged once and topped up later.
Failing to grow or shrink it is logged, never raised: the service runs on without
(or with less of) its reserve.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import attrs
import trio

from ..observe import metrics

log = logging.getLogger(__name__)

MIB = 1024 * 1024
BALLAST_NAME = ".reserve"
# The reserve is at most this fraction of the filesystem (a small volume keeps room too).
MAX_RESERVE_FRACTION = 0.25
# What one release gives back: this fraction of the reserve (so four releases at most).
RELEASE_FRACTION = 0.25
# How often the ballast is topped up when it is short.
TOP_UP_INTERVAL_S = 5.0
# Grown in steps of this much, so a nearly full disk still gets what fits.
STEP = 4 * MIB
_NOISE = os.urandom(MIB)  # what a filesystem without fallocate is written with


def reserve_size(reserve: int, total: int) -> int:
    """The reserve for a filesystem of ``total`` bytes, asked ``reserve`` (bytes)."""
    return min(reserve, int(total * MAX_RESERVE_FRACTION))


def free_bytes(path: Path) -> tuple[int, int]:
    """``(free, total)`` bytes of the filesystem holding ``path`` (for unprivileged writers)."""
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize


@attrs.define(eq=False)
class Ballast:
    """The file holding the reserve: blocking calls, one at a time (the owner's lock)."""

    path: Path

    def held(self) -> int:
        """Bytes the file holds on disk (0 if there is none)."""
        try:
            return os.stat(self.path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def grow(self, size: int) -> int:
        """Grow (or shrink) the file to hold ``size`` bytes, step by step until the disk is
        full; returns what it holds then. Raises OSError for anything but a full disk."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            current = os.fstat(fd).st_size
            if os.fstat(fd).st_blocks * 512 < min(current, size):
                # Holes (a write cut short by a crash, or zeros a filesystem dropped): the
                # size says more than it holds; allocate it again from the start.
                os.ftruncate(fd, 0)
                current = 0
            if current > size:
                os.ftruncate(fd, size)
                return self.held()
            while current < size:
                step = min(STEP, size - current)
                try:
                    _allocate(fd, current, step)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    os.ftruncate(fd, current)  # (a partial step would look whole)
                    break
                current += step
            return self.held()
        finally:
            os.close(fd)

    def shrink(self, amount: int) -> int:
        """Give ``amount`` bytes back to the filesystem; returns how many it gave."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            before = os.fstat(fd).st_blocks * 512
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - amount))
            return before - os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)


def _allocate(fd: int, offset: int, length: int) -> None:
    before = os.fstat(fd).st_blocks
    try:
        os.posix_fallocate(fd, offset, length)
        if (os.fstat(fd).st_blocks - before) * 512 >= length:
            return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    # No fallocate here, or it allocated nothing: bytes no filesystem compresses away.
    os.lseek(fd, offset, os.SEEK_SET)
    left = length
    while left > 0:
        left -= os.write(fd, _NOISE[: min(left, len(_NOISE))])


@attrs.define(eq=False)
class DiskReserve:
    """The ballast of ``data_dir``'s filesystem and what the service does with it.

    ``asked``: DISK_RESERVE_MB in bytes. Its methods run on the trio thread; the
    file's calls run in worker threads, one at a time (``lock``).
    """

    data_dir: Path
    asked: int
    lock: trio.Lock = attrs.Factory(trio.Lock)
    target: int = 0  # the ballast's size once whole (set by fill(); 0: none)
    held: int = 0  # what it holds now
    releases: int = 0
    _short_logged: bool = False

    @property
    def ballast(self) -> Ballast:
        return Ballast(self.data_dir / BALLAST_NAME)

    @property
    def chunk(self) -> int:
        """What one release gives back, and the free space a full disk is below."""
        return int(self.target * RELEASE_FRACTION)

    @property
    def whole(self) -> bool:
        return self.held >= self.target

    async def fill(self) -> None:
        """Size the ballast for the filesystem and grow it to that size, from free space
        beyond one release's worth."""
        async with self.lock:
            await trio.to_thread.run_sync(self._fill)

    def _fill(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            free, total = free_bytes(self.data_dir)
            self.target = reserve_size(self.asked, total)
            ballast = self.ballast
            self.held = ballast.held()
            if self.held == self.target and self.target:
                return
            if self.target == 0:
                ballast.path.unlink(missing_ok=True)
                self.held = 0
                return
            # Only from space beyond one release's worth: what a release gave stays free.
            room = free - self.chunk
            size = min(self.target, self.held + max(0, room))
            if size <= self.held and self.held <= self.target:
                self._note_short()
                return
            was = self.held
            self.held = ballast.grow(size)
        except OSError as exc:
            log.error("disk reserve: cannot size %s: %s", self.data_dir / BALLAST_NAME, exc)
            return
        if self.whole:
            if self._short_logged or self.releases:
                log.info("disk reserve: whole again (%s)", _mib(self.held))
            self._short_logged = False
        else:
            if self.held > was:
                log.info("disk reserve: topped up to %s of %s", _mib(self.held), _mib(self.target))
            self._note_short()

    def _note_short(self) -> None:
        if not self._short_logged:
            self._short_logged = True
            log.warning(
                "disk reserve: holds %s of %s (DISK_RESERVE_MB): the data directory's"
                " filesystem has no more room; topped up when space is freed",
                _mib(self.held),
                _mib(self.target),
            )

    async def release(self, why: str) -> int | None:
        """Give one chunk of the ballast back to the filesystem if the disk is full (less
        free than a chunk); returns the bytes freed, None if there was room already."""
        async with self.lock:
            free, chunk = self.room()
            if free >= chunk:
                return None  # (another release came first, or space was freed)
            if self.held <= 0 or chunk <= 0:
                log.error(
                    "disk reserve: nothing left to release (%s); free space on the data"
                    " directory's filesystem",
                    why,
                )
                return 0
            try:
                freed = await trio.to_thread.run_sync(self.ballast.shrink, self.chunk)
            except OSError as exc:
                log.error("disk reserve: cannot release a part of it: %s", exc)
                return 0
            self.held = max(0, self.held - freed)
            self.releases += 1
        metrics.disk_reserve_released()
        log.warning(
            "disk reserve: released %s (%s); it holds %s of %s until space is freed",
            _mib(freed),
            why,
            _mib(self.held),
            _mib(self.target),
        )
        return freed

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Make the ballast, then keep it whole: every :data:`TOP_UP_INTERVAL_S`, when short."""
        await self.fill()
        if self.target:
            log.info(
                "disk reserve: %s held in %s for the service's own state",
                _mib(self.held),
                self.data_dir / BALLAST_NAME,
            )
        task_status.started()
        while True:
            await trio.sleep(TOP_UP_INTERVAL_S)
            if not self.whole or self.target == 0:
                await self.fill()

    def room(self) -> tuple[int, int]:
        """``(free, chunk)``: the free space now (0 if unknown) and what a full disk is below."""
        try:
            free, _ = free_bytes(self.data_dir)
        except OSError:
            return 0, self.chunk
        return free, self.chunk


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"
