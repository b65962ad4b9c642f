"""Each user's CLAUDE.md: where it lives, reading and saving it, and handing it to an agent.

A user's CLAUDE.md is ``<their HOME>/.claude/CLAUDE.md``, their HOME being
``DATA_DIR/users/<name>`` (:func:`~claude_code_api.store.user_paths.user_workspace`).
That is the Claude config dir (``CLAUDE_CONFIG_DIR``) of their session agents,
so the Claude Code CLI loads it itself, as *user memory*, when a session's
process starts (it reads CLAUDE.md files only then; see
``tests/REAL_CLI_FINDINGS.md``). A one-shot agent is warmed before its user is
known, in a home of its own: it gets the file's content with the prompt instead,
as :func:`memory_reminder` shapes it — the same kind of ``<system-reminder>``
block before the prompt in which the CLI hands the model the CLAUDE.md files it
loaded.

Error handling: the user's session agents may write anything into their HOME,
a symlink or a FIFO where ``.claude`` or ``CLAUDE.md`` should be included. So
both are opened without following symlinks, only a regular file is read, and a
read never blocks on a FIFO; what cannot be used raises :class:`UserMemoryError`
(an ``OSError``) naming the problem. Every function here does blocking I/O:
run it in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from pathlib import Path

from .user_paths import user_workspace

log = logging.getLogger(__name__)

FILENAME = "CLAUDE.md"
CONFIG_DIR = ".claude"  # AgentSpec.config_dir, relative to the HOME
# Largest CLAUDE.md a client may save (PUT /user-claude), in UTF-8 bytes.
MAX_SAVED_BYTES = 100 * 1024
# Largest CLAUDE.md read back: a session agent may have written a bigger one itself.
MAX_READ_BYTES = 1024 * 1024


class UserMemoryError(OSError):
    """The user's CLAUDE.md cannot be read or saved (what is in its place, or the disk)."""

    def __init__(self, reason: str, code: int = errno.EIO) -> None:
        super().__init__(code, reason)

    def __str__(self) -> str:
        return str(self.strerror)


def user_home(data_dir: Path, user_id: str) -> Path:
    return user_workspace(data_dir, user_id)


def user_memory_path(data_dir: Path, user_id: str) -> Path:
    """Where ``user_id``'s CLAUDE.md lives (for logs and docs; I/O goes through the functions)."""
    return user_home(data_dir, user_id) / CONFIG_DIR / FILENAME


def read_user_memory(data_dir: Path, user_id: str) -> str:
    """``user_id``'s CLAUDE.md, or "" when they have none. Blocking.

    Undecodable bytes (written by an agent) are replaced; a file over
    ``MAX_READ_BYTES`` is cut there, with a warning in the log.
    """
    config_fd = _open_config_dir(user_home(data_dir, user_id), create=False)
    if config_fd is None:
        return ""
    try:
        try:
            fd = os.open(FILENAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=config_fd)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise _refusal(exc, f"{CONFIG_DIR}/{FILENAME}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserMemoryError(f"{CONFIG_DIR}/{FILENAME} is not a regular file")
            data = _read_at_most(fd, MAX_READ_BYTES + 1)
        finally:
            os.close(fd)
    finally:
        os.close(config_fd)
    if len(data) > MAX_READ_BYTES:
        log.warning("user %s: CLAUDE.md is over %d bytes; cut there", user_id, MAX_READ_BYTES)
        data = data[:MAX_READ_BYTES]
    return data.decode("utf-8", errors="replace")


def save_user_memory(data_dir: Path, user_id: str, content: str) -> None:
    """Replace ``user_id``'s CLAUDE.md with ``content`` atomically ("" removes it). Blocking.

    Written to a new file beside it, flushed to disk, then renamed over it, so a
    reader (or a crash) sees the old content or the new, never a mix. Raises
    ``UnicodeEncodeError`` for text that is not valid Unicode (lone surrogates).
    """
    data = content.encode("utf-8")
    config_fd = _open_config_dir(user_home(data_dir, user_id), create=bool(data))
    if config_fd is None:
        return  # nothing to remove
    try:
        if not data:
            try:
                os.unlink(FILENAME, dir_fd=config_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _refusal(exc, f"{CONFIG_DIR}/{FILENAME}") from exc
        else:
            _write_new(config_fd, data)
        os.fsync(config_fd)  # the rename (or removal) itself
    finally:
        os.close(config_fd)


def memory_reminder(content: str) -> str:
    """The context block a one-shot agent gets before the prompt, holding the user's CLAUDE.md.

    Shaped as Claude Code hands the model the CLAUDE.md files it loads itself:
    a ``<system-reminder>`` text block, in the first user message, ahead of the
    prompt (a block of its own, so a prompt that is a slash command stays one).
    """
    return (
        "<system-reminder>\n"
        "The user's own instructions follow: the contents of their CLAUDE.md"
        " (~/.claude/CLAUDE.md, the user's private global instructions for all projects)."
        " Adhere to them; they take precedence over default behavior.\n\n"
        f"{content.rstrip()}\n"
        "</system-reminder>"
    )


def _open_config_dir(home: Path, *, create: bool) -> int | None:
    """A descriptor of ``home/.claude``, never through a symlink; None if it is absent.

    ``home`` is the service's own path; what is inside it the user's agents control.
    """
    if create:
        home.mkdir(parents=True, exist_ok=True)
    try:
        home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        if create:
            try:
                os.mkdir(CONFIG_DIR, 0o700, dir_fd=home_fd)
            except FileExistsError:
                pass
        try:
            return os.open(CONFIG_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _refusal(exc, CONFIG_DIR) from exc
    finally:
        os.close(home_fd)


def _write_new(config_fd: int, data: bytes) -> None:
    temporary = f".{FILENAME}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=config_fd
    )
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, FILENAME, src_dir_fd=config_fd, dst_dir_fd=config_fd)
    except BaseException as exc:
        try:
            os.unlink(temporary, dir_fd=config_fd)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, UserMemoryError):
            raise _refusal(exc, f"{CONFIG_DIR}/{FILENAME}") from exc
        raise


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _refusal(exc: OSError, what: str) -> UserMemoryError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        reason = f"{what} is not a directory" if what == CONFIG_DIR else f"{what} is a symlink"
    elif exc.errno == errno.EISDIR:
        reason = f"{what} is a directory"
    else:
        reason = f"{what}: {exc.strerror or exc}"
    return UserMemoryError(reason, exc.errno or errno.EIO)
