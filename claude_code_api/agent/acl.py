"""POSIX ACLs, just enough to let one OS user pass through a directory.

A root service's agents run as ``AGENT_UID``. Without the sandbox they reach their
HOMEs under ``DATA_DIR`` and the Claude Code CLI by their real paths, and a clone of
the service under ``/root`` (mode 0700, the usual place as root in a fresh container
or VM) is out of their reach. Rather than opening such a directory to everyone (a
mode change), the service gives that one user search permission on it (``--x``:
passing through to a known name, not listing it) with an ACL entry, as
``setfacl -m u:UID:x DIR`` would; ``setfacl -x u:UID DIR`` takes it back.

The ACL travels as the ``system.posix_acl_access`` extended attribute in the kernel's
binary form (``linux/posix_acl_xattr.h``): a little-endian u32 version (2), then
entries of (u16 tag, u16 permissions, u32 id). Written through os.setxattr, so no
``acl`` package is needed.

Error handling: :func:`grant_search` raises OSError where the filesystem keeps no
ACLs (``EOPNOTSUPP``) or the caller may not change the directory's ACL.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
SEARCH = 0o1
NO_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def read_acl(path: Path) -> list[tuple[int, int, int]]:
    """``path``'s ACL entries (tag, permissions, id); its mode's three when it has none."""
    try:
        data = os.getxattr(path, XATTR)
    except OSError:  # none set (ENODATA), or no ACLs on this filesystem
        mode = stat.S_IMODE(os.stat(path).st_mode)
        return [
            (USER_OBJ, mode >> 6 & 7, NO_ID),
            (GROUP_OBJ, mode >> 3 & 7, NO_ID),
            (OTHER, mode & 7, NO_ID),
        ]
    (version,) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise OSError(f"{path}: ACL version {version} is not understood")
    count = (len(data) - _HEADER.size) // _ENTRY.size
    return [_ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size) for i in range(count)]


def user_may_search(path: Path, uid: int) -> bool:
    """Whether ``path``'s ACL gives ``uid`` (not its owner) search permission by a named entry."""
    entries = read_acl(path)
    mask = next((perms for tag, perms, _ in entries if tag == MASK), 7)
    return any(tag == USER and id_ == uid and perms & mask & SEARCH for tag, perms, id_ in entries)


def grant_search(path: Path, uid: int) -> None:
    """Give ``uid`` search permission on the directory ``path`` (``setfacl -m u:UID:x``).

    Keeps every other entry; the mask (which then shows as the mode's group bits) gains
    search too, so the named entry takes effect, but the owning group's own entry is
    left as it was. Blocking. Raises OSError (see the module docstring).
    """
    entries = [e for e in read_acl(path) if not (e[0] == USER and e[2] == uid)]
    perms = {tag: p for tag, p, _ in entries if tag in (USER_OBJ, GROUP_OBJ, OTHER)}
    mask = next((p for tag, p, _ in entries if tag == MASK), perms[GROUP_OBJ])
    entries = [e for e in entries if e[0] != MASK]
    entries += [(USER, SEARCH, uid), (MASK, mask | SEARCH, NO_ID)]
    entries.sort(key=lambda e: (e[0], e[2]))  # the kernel wants them ordered
    data = _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)
    os.setxattr(path, XATTR, data)
