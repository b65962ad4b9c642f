"""Where a user's files live under the data directory.

Pure path arithmetic: nothing here creates, reads or checks a directory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^a-z0-9_-]+")
SLUG_MAX = 32
DIGEST_HEX = 32


def user_workspace(data_dir: Path, user_id: str) -> Path:
    """The directory a user's sessions run in: ``data_dir / "users" / <name>``. Not created here.

    ``<name>`` is ``<slug>-<digest>``: ``digest`` is the first 32 hex digits
    (128 bits) of the SHA-256 of the exact user id (UTF-8, lone surrogates
    included), and ``slug`` a readable hint for operators: the id lowercased,
    every run of characters outside ``[a-z0-9_-]`` replaced by ``_``, leading
    ``-``/``_`` stripped (so it never looks like a command-line option), cut
    to 32 characters. An id with nothing readable gets just ``<digest>``.

    Why this shape and not the id itself or a slug alone:

    * Distinct ids never share a directory: the name ends in a fixed-width
      digest, so equal names mean equal digests, i.e. a SHA-256 collision. The
      slug is lossy on purpose ("Alice", "alice" and "al ice" all read
      ``alice``/``al_ice``) and cannot collide anything by itself; case-
      insensitive filesystems cannot merge two users either, the digest is lowercase hex.
    * No id escapes ``data_dir/users``: the name is one path component of
      ``[a-z0-9_-]`` only, never empty, ``.`` or ``..``, no ``/`` or NUL, at
      most 65 characters, whatever the id (``../``, absolute paths, unicode,
      megabytes long).
    """
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_HEX]
    slug = _UNSAFE.sub("_", user_id.lower()).lstrip("-_")[:SLUG_MAX]
    name = f"{slug}-{digest}" if slug else digest
    return Path(data_dir) / "users" / name


def user_cwd(data_dir: Path, workspaces_dir: Path | None, user_id: str) -> Path:
    """Where a user's session agents work, and what ``/files`` serves. Not created here.

    ``workspaces_dir / <name>`` (``WORKSPACES_DIR``, the same ``<name>`` as
    :func:`user_workspace`'s), else ``user_workspace(...) / "workspace"``. Absolute: the
    agent's transcripts are filed under it, and must be found under it on every replica.
    """
    home = user_workspace(data_dir, user_id)
    if workspaces_dir is None:
        return (home / "workspace").absolute()
    return (Path(workspaces_dir) / home.name).absolute()
