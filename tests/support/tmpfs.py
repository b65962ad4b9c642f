"""A small tmpfs for the tests that fill a disk: mount(2) and umount2(2) through libc.

Not the ``mount``/``umount`` commands: a minimal Debian root filesystem (mmdebstrap's apt
variant, a fresh container) has no ``mount`` package, and the tests crashed there with
FileNotFoundError instead of running. Where root may not mount (a container without
CAP_SYS_ADMIN) the test is skipped, saying why.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount_tmpfs(path: Path, size: str) -> None:
    """A tmpfs of ``size`` (``"8m"``) on ``path`` (made if missing); else skip the test."""
    path.mkdir(parents=True, exist_ok=True)
    target = os.fsencode(path)
    if _libc.mount(b"tmpfs", target, b"tmpfs", 0, f"size={size}".encode()) != 0:
        error = ctypes.get_errno()  # EPERM: root without CAP_SYS_ADMIN, a container
        pytest.skip(f"cannot mount a small tmpfs on {path} here: {os.strerror(error)}")


def unmount_tmpfs(path: Path) -> None:
    """Detach the tmpfs on ``path`` (lazily, as ``umount -l``); nothing if none is there."""
    _libc.umount2(os.fsencode(path), MNT_DETACH)
