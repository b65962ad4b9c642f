"""Files in a user's workspace, by relative path, never outside it: for ``/files``.

The workspace is the directory a user's session agents work in,
``DATA_DIR/users/<user>/workspace`` (:func:`workspace_of`). Its agents control
everything inside it, so whatever they made of it — a directory swapped for a
link to another user's workspace or to ``/``, a file replaced by a FIFO —
must not make the service read, write or remove anything elsewhere. So every
operation walks the path one component at a time through directory descriptors
opened with ``O_NOFOLLOW`` (as :mod:`.sandbox` removes files), never by
resolving a path and checking it afterwards (which a swap between the check and
the use defeats):

* a path is a list of plain names (:func:`parse_path`): no ``..``, ``.``, empty
  component, NUL or absolute path — else :class:`FileRefused` 403;
* a link anywhere on the way, the last name included, is refused (403), not followed;
* only regular files are read; a write goes to a temporary file in the target
  directory, renamed over the name once complete (a link there is replaced, not
  followed).

New files and directories are owned like the directory they are made in when the
service runs as root (agents may run as another uid: see :func:`_own_like`).

Every function here blocks: run it in a worker thread. Errors a client causes are
:class:`FileRefused` with the HTTP status to answer (403, 404, 409); anything else is
an ``OSError`` (a full or broken disk).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from .user_paths import user_cwd

MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255
# Entries GET /files lists at most (it says when there were more).
MAX_LISTED = 10_000
TEMPORARY_PREFIX = ".upload-"


class FileRefused(Exception):
    """A request about a file that cannot be served: answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class Entry:
    """A file of a workspace, as ``GET /files`` lists it."""

    name: str  # its path relative to the workspace, with "/"
    size: int
    modified: float  # seconds since the epoch


def workspace_of(data_dir: Path, user_id: str, workspaces_dir: Path | None = None) -> Path:
    """Where ``user_id``'s session agents work (their ``AgentSpec.cwd``)."""
    return user_cwd(data_dir, workspaces_dir, user_id)


def parse_path(path: str) -> list[str]:
    """The names of a relative path inside a workspace; 403 for one that leaves it or is bad."""
    if not path or len(path) > MAX_PATH_CHARS:
        raise FileRefused(403, f"path: expected 1 to {MAX_PATH_CHARS} characters")
    if path.startswith("/"):
        raise FileRefused(
            403, "path: absolute paths are not allowed (paths are relative to your workspace)"
        )
    if "\0" in path:
        raise FileRefused(403, "path: must not contain NUL")
    names = path.split("/")
    for name in names:
        if name in ("", ".", ".."):
            raise FileRefused(
                403,
                "path: '..', '.' and empty names are not allowed (paths stay inside your workspace)",
            )
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise FileRefused(403, "path: not valid Unicode text") from None
        if size > MAX_NAME_BYTES:
            raise FileRefused(403, f"path: a name exceeds {MAX_NAME_BYTES} bytes")
    return names


def _open_directory(name: str | Path, dir_fd: int | None, shown: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileRefused(404, f"{shown}: not found") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            is_link = _is_link(name, dir_fd)
            if is_link:
                raise FileRefused(403, f"{shown}: is a link (links are not followed)") from None
            raise FileRefused(404, f"{shown}: not a directory") from None
        raise


def _is_link(name: str | Path, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextmanager
def _workspace_fd(workspace: Path, *, create: bool) -> Iterator[int]:
    """A descriptor of the workspace directory (made when ``create``; 404 when absent)."""
    home = workspace.parent
    if create:
        # The user's HOME is the service's own path; made private, as an agent's start makes
        # it (which, as root, then gives it whole to AGENT_UID: see sandbox._make_home).
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            home.mkdir(0o700)
        except FileExistsError:
            pass
    try:
        home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise FileRefused(404, "not found (your workspace is empty)") from None
    try:
        if create:
            try:
                os.mkdir(workspace.name, 0o700, dir_fd=home_fd)
                _own_like(home_fd, workspace.name)
            except FileExistsError:
                pass
        fd = _open_directory(workspace.name, home_fd, "workspace")
    finally:
        os.close(home_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _parent_fd(workspace: Path, names: list[str], *, create: bool) -> Iterator[int]:
    """A descriptor of the directory holding ``names[-1]``, walked without following links."""
    with _workspace_fd(workspace, create=create) as root:
        fd = os.dup(root)
        try:
            for depth, name in enumerate(names[:-1]):
                shown = "/".join(names[: depth + 1])
                if create:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                        _own_like(fd, name)
                    except FileExistsError:
                        pass
                try:
                    inner = _open_directory(name, fd, shown)
                except FileRefused as refused:
                    if create and refused.status == 404:
                        raise FileRefused(409, f"{shown}: a file is in the way") from None
                    raise
                os.close(fd)
                fd = inner
            yield fd
        finally:
            os.close(fd)


def _own_like(dir_fd: int, name: str) -> None:
    """Give ``name`` (in ``dir_fd``) the owner of that directory, when running as root.

    A root service's agents run as ``AGENT_UID``, and a user's HOME is theirs (an agent's
    start gives it to them whole, :func:`~claude_code_api.agent.sandbox._make_home`): a file the
    service writes into a workspace must then be theirs too, as the rest of it is. Without
    root, or when the owners already match, nothing to do. (A HOME this module makes before
    any agent ran is root's until that first start gives it away.)
    """
    if os.geteuid() != 0:
        return
    parent = os.fstat(dir_fd)
    own = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if (own.st_uid, own.st_gid) != (parent.st_uid, parent.st_gid):
        os.chown(name, parent.st_uid, parent.st_gid, dir_fd=dir_fd, follow_symlinks=False)


def open_for_reading(workspace: Path, path: str) -> tuple[int, int]:
    """``(descriptor, size)`` of the regular file at ``path``; the caller closes it.

    403 for a link on the way, 404 for nothing there or not a regular file.
    """
    names = parse_path(path)
    with _parent_fd(workspace, names, create=False) as parent:
        try:
            fd = os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
        except FileNotFoundError:
            raise FileRefused(404, f"{path}: not found") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileRefused(403, f"{path}: is a link (links are not followed)") from None
            raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise FileRefused(404, f"{path}: {kind}")
    return fd, info.st_size


class Upload:
    """A file being written: a temporary file beside its name, renamed over it by :meth:`commit`.

    Blocking methods; :meth:`abort` (idempotent) removes the temporary file.
    """

    def __init__(self, workspace: Path, path: str) -> None:
        self.path = path
        self.names = parse_path(path)
        if self.names[-1].startswith(TEMPORARY_PREFIX):
            raise FileRefused(
                403, f"path: names starting with {TEMPORARY_PREFIX!r} are the service's"
            )
        self._temporary = f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
        self._fd: int | None = None
        self._parent: int | None = None
        self.size = 0
        with _parent_fd(workspace, self.names, create=True) as parent:
            self._parent = os.dup(parent)
        try:
            self._fd = os.open(
                self._temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                0o644,
                dir_fd=self._parent,
            )
            _own_like(self._parent, self._temporary)
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def commit(self) -> None:
        """Put the file in place (a file or link there is replaced; a directory: 409)."""
        assert self._fd is not None and self._parent is not None
        os.close(self._fd)
        self._fd = None
        try:
            os.rename(
                self._temporary, self.names[-1], src_dir_fd=self._parent, dst_dir_fd=self._parent
            )
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise FileRefused(409, f"{self.path}: is a directory") from None
            raise
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._parent is not None:
            try:
                os.unlink(self._temporary, dir_fd=self._parent)
            except FileNotFoundError:
                pass
            os.close(self._parent)
            self._parent = None


def remove(workspace: Path, path: str) -> None:
    """Remove the file, link (itself) or directory tree at ``path``; 404 if nothing is there."""
    names = parse_path(path)
    with _parent_fd(workspace, names, create=False) as parent:
        try:
            mode = os.stat(names[-1], dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            raise FileRefused(404, f"{path}: not found") from None
        if stat.S_ISDIR(mode):
            # By descriptors: a directory inside swapped for a link is not followed.
            shutil.rmtree(names[-1], dir_fd=parent)
        else:
            os.unlink(names[-1], dir_fd=parent)


def list_files(workspace: Path, limit: int = MAX_LISTED) -> tuple[list[Entry], bool]:
    """The regular files of the workspace (links and special files skipped), by name.

    ``(entries, truncated)``: at most ``limit`` entries. An empty or absent workspace
    lists nothing.
    """
    entries: list[Entry] = []
    try:
        context = _workspace_fd(workspace, create=False)
        root = context.__enter__()
    except FileRefused:
        return [], False
    try:
        truncated = _walk(root, "", entries, limit)
    finally:
        context.__exit__(None, None, None)
    entries.sort(key=lambda entry: entry.name)
    return entries, truncated


def _walk(dir_fd: int, prefix: str, entries: list[Entry], limit: int) -> bool:
    """Add the files under ``dir_fd`` to ``entries``; True when ``limit`` cut the walk."""
    for name in sorted(os.listdir(dir_fd)):
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        shown = f"{prefix}{name}"
        if stat.S_ISREG(info.st_mode):
            if name.startswith(TEMPORARY_PREFIX):
                continue
            if len(entries) >= limit:
                return True
            entries.append(Entry(shown, info.st_size, info.st_mtime))
        elif stat.S_ISDIR(info.st_mode):
            try:
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError:
                continue  # swapped or gone meanwhile: not listed
            try:
                if _walk(inner, f"{shown}/", entries, limit):
                    return True
            finally:
                os.close(inner)
    return False
