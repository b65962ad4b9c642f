"""A session's local Claude transcript and its copy in PostgreSQL, kept by the service.

The CLI writes a conversation to its config dir, ``projects/<project key>/<uuid>.jsonl``,
and its subagents' to ``projects/<project key>/<uuid>/subagents/**/agent-*.jsonl`` (with a
``.meta.json`` beside each). ``<project key>`` is the agent's working directory as a slug
(:func:`claude_agent_sdk.project_key_for_directory`), the same on every replica as long as
the working directory's path is (``WORKSPACES_DIR``). :class:`TranscriptMirror` keeps the
:class:`~.transcripts.PostgresTranscriptStore` (keyed by that project key and the uuid) in
step with those files, without the SDK's ``session_store`` option (which would resume from
a temporary config dir under the service's TMPDIR, out of a sandboxed agent's sight):

* :meth:`~TranscriptMirror.mirror`, after each turn and before it is answered: the lines
  the CLI added since the last mirror, the subagents' too (a ``.meta.json`` as the SDK's
  ``agent_metadata`` entry, whenever it changed). What ``--resume`` reads is the
  transcript and the subagents' transcripts; the large tool results the CLI keeps beside
  them (``<uuid>/tool-results/``) are not mirrored: the transcript holds their preview.
* :meth:`~TranscriptMirror.materialise`, before an agent starts with ``--resume``: the
  stored transcript replaces the local one (missing: another replica ran the session;
  stale: it moved away and back). The store holds every acknowledged turn, so it wins;
  what only the local file holds is a turn answered 503. A store with nothing for the
  session leaves the local files alone (a session older than ``DATABASE_URL``).
* :meth:`~TranscriptMirror.delete_blocking`: the stored transcript, for a deleted session.

Resource handling: :func:`open_transcript_mirror` makes one on the database at a URL,
whose pool it opens (and whose schema it brings up to date) at its first use, so that a
database down at start-up delays nothing but the first session turn; its ``close``
closes the pool. A mirror owns the byte offsets up to which this process mirrored each file
(in memory: after a restart, the next :meth:`materialise` sets them again). The files are
the agent's: everything under the config dir is reached through directory descriptors
that never follow a link (an agent could make ``projects`` a link to another user's
files), and what it writes it gives to ``owner`` (``AGENT_UID``), mode 0600 (directories
0700), as the CLI makes them.

Error handling: the database not answering is
:class:`~claude_code_api.store.StoreUnavailable` (the session answers 503 "session store
unavailable: ..."); a file that cannot be read or written is OSError. A line that is not
JSON is skipped with a warning; a last line without its newline waits for the next mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar, cast

import attrs
import trio
from claude_agent_sdk import project_key_for_directory
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from .database import Database, DatabaseUnavailable, make_pool
from .errors import StoreUnavailable
from .schema import migrate
from .transcripts import PostgresTranscriptStore, delete_transcript

log = logging.getLogger(__name__)

T = TypeVar("T")

SUBAGENTS = "subagents"
META_SUFFIX = ".meta.json"
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.frozen
class Conversation:
    """Where one Claude session's transcript lives: the agent's config dir and cwd."""

    config_dir: Path
    cwd: Path
    claude_session_id: str

    @property
    def project_key(self) -> str:
        return project_key_for_directory(str(self.cwd))

    def key(self, subpath: str | None = None) -> SessionKey:
        key: SessionKey = {"project_key": self.project_key, "session_id": self.claude_session_id}
        if subpath:
            key["subpath"] = subpath
        return key


@attrs.frozen
class _Batch:
    """Entries read from one file, and the offset (or meta digest) once they are stored."""

    subpath: str | None
    entries: list[SessionStoreEntry]
    mark: tuple[str, int | str]


class TranscriptMirror:
    """Mirrors sessions' local transcripts into PostgreSQL and back; see the module docstring.

    ``database`` gives the database (blocking: called in worker threads; it may raise
    :class:`DatabaseUnavailable`). ``owner``: (uid, gid) what it writes is given to (None:
    the service's own user).
    """

    def __init__(
        self, database: Callable[[], Database], owner: tuple[int, int] | None = None
    ) -> None:
        self._database = database
        self._owner = owner
        # (project dir, path inside it) -> bytes mirrored, or a meta file's digest. Changed
        # on the trio thread only, but read in worker threads: dropped under the lock.
        self._marks: dict[tuple[str, str], int | str] = {}
        self._lock = threading.Lock()

    async def _store(self) -> PostgresTranscriptStore:
        try:
            return PostgresTranscriptStore(await trio.to_thread.run_sync(self._database))
        except DatabaseUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def mirror(self, config_dir: Path, cwd: Path, claude_session_id: str) -> None:
        """Append what the CLI wrote since the last mirror to the store; then remember it."""
        conversation = Conversation(config_dir, cwd, claude_session_id)
        batches = await trio.to_thread.run_sync(self._read_new, conversation)
        store = await self._store() if any(batch.entries for batch in batches) else None
        for batch in batches:
            if batch.entries:
                key = conversation.key(batch.subpath)
                assert store is not None
                await _unavailable_as_store(store.append(key, batch.entries))
            with self._lock:
                self._marks[(str(_project_dir(conversation)), batch.mark[0])] = batch.mark[1]

    async def materialise(self, config_dir: Path, cwd: Path, claude_session_id: str) -> bool:
        """Replace the local transcript with the stored one (if any); whether it did."""
        conversation = Conversation(config_dir, cwd, claude_session_id)
        key, store = conversation.key(), await self._store()
        main = await _unavailable_as_store(store.load(key))
        if not main:
            return False
        subkeys = await _unavailable_as_store(store.list_subkeys(key))
        files = {f"{conversation.claude_session_id}.jsonl": main}
        for subpath in subkeys:
            entries = await _unavailable_as_store(store.load(conversation.key(subpath)))
            files.update(_subagent_files(conversation.claude_session_id, subpath, entries or []))
        written = await trio.to_thread.run_sync(self._write, conversation, files)
        self._forget(conversation)
        project = str(_project_dir(conversation))
        with self._lock:
            self._marks.update({(project, name): mark for name, mark in written.items()})
        return True

    def delete_blocking(self, config_dir: Path, cwd: Path, claude_session_id: str) -> None:
        """Delete the stored transcript (subagents' too). Blocking: from a worker thread."""
        conversation = Conversation(config_dir, cwd, claude_session_id)
        try:
            delete_transcript(self._database(), conversation.key())
        except DatabaseUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        self._forget(conversation)

    def _forget(self, conversation: Conversation) -> None:
        """Drop the marks of the conversation's files (its main transcript and its dir)."""
        project, uuid = str(_project_dir(conversation)), conversation.claude_session_id
        with self._lock:
            for mark in [k for k in self._marks if k[0] == project and k[1].startswith(uuid)]:
                del self._marks[mark]

    # --- in worker threads -------------------------------------------------------------

    def _read_new(self, conversation: Conversation) -> list[_Batch]:
        """What each of the conversation's files holds beyond its mark (unchanged: nothing)."""
        project = str(_project_dir(conversation))
        batches: list[_Batch] = []
        with _opened_project(conversation) as project_fd:
            if project_fd is None:
                return batches
            main = f"{conversation.claude_session_id}.jsonl"
            for name, subpath in [(main, None), *_subagent_names(project_fd, conversation)]:
                with self._lock:
                    mark = self._marks.get((project, name), 0)
                batch = _read_file(project_fd, name, subpath, mark)
                if batch is not None:
                    batches.append(batch)
        return batches

    def _write(
        self, conversation: Conversation, files: dict[str, list[SessionStoreEntry]]
    ) -> dict[str, int | str]:
        """Write ``files`` (paths in the project dir) in place of the local ones; their marks."""
        marks: dict[str, int | str] = {}
        with _opened_project(conversation, make=self._owner or True) as project_fd:
            assert project_fd is not None
            for name, entries in files.items():
                data = _file_bytes(name, entries)
                _replace_file(project_fd, name, data, self._owner)
                marks[name] = _meta_digest(data) if name.endswith(META_SUFFIX) else len(data)
        return marks


class OnDemandDatabase:
    """The database at ``url``: its pool opened, and its schema brought up to date, at the
    first call (again after a failed one). Blocking: call it from worker threads.

    Resource handling: owns the pool; :meth:`close` closes it. Error handling:
    :class:`DatabaseUnavailable` when the database does not answer."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._database: Database | None = None
        self._closed = False

    def __call__(self) -> Database:
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable("the service is stopping")
            if self._database is None:
                pool = make_pool(self._url)
                pool.open()  # (connects in the background; the migration waits for one)
                try:
                    Database(pool).call(migrate)
                except BaseException:
                    pool.close()
                    raise
                self._database = Database(pool)
            return self._database

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._database is not None:
                self._database.close_pool()
                self._database = None


def open_transcript_mirror(
    url: str, owner: tuple[int, int] | None
) -> tuple[TranscriptMirror, Callable[[], None]]:
    """A mirror on the database at ``url`` (opened at its first use), and what closes it."""
    database = OnDemandDatabase(url)
    return TranscriptMirror(database, owner), database.close


async def _unavailable_as_store(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except DatabaseUnavailable as exc:
        raise StoreUnavailable(str(exc)) from exc


def _project_dir(conversation: Conversation) -> Path:
    return conversation.config_dir / "projects" / conversation.project_key


@contextmanager
def _opened_project(
    conversation: Conversation, make: tuple[int, int] | bool = False
) -> Iterator[int | None]:
    """The project dir, opened without following links (None: missing and not ``make``).

    ``make``: create what is missing from the config dir down (the HOME above it is the
    service's), given to the (uid, gid) when one is given.
    """
    opened: list[int] = []
    home = conversation.config_dir.parent
    try:
        if make and not home.is_dir():  # (a replica that never ran this user's agents)
            home.parent.mkdir(parents=True, exist_ok=True)
            _make_directory(
                os.open(home.parent, os.O_DIRECTORY | os.O_CLOEXEC), home.name, make, close=True
            )
        opened.append(os.open(home, os.O_DIRECTORY | os.O_CLOEXEC))
        for name in (conversation.config_dir.name, "projects", conversation.project_key):
            if make:
                _make_directory(opened[-1], name, make)
            try:
                opened.append(_open_directory(name, opened[-1]))
            except FileNotFoundError:
                if make:
                    raise
                yield None
                return
        yield opened[-1]
    finally:
        for fd in opened:
            os.close(fd)


def _open_directory(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NO_FOLLOW, dir_fd=dir_fd)


def _make_directory(
    dir_fd: int, name: str, owner: tuple[int, int] | bool, *, close: bool = False
) -> None:
    """Make ``name`` in ``dir_fd`` (0700, given to ``owner`` if a (uid, gid)) if missing."""
    try:
        os.mkdir(name, DIRECTORY_MODE, dir_fd=dir_fd)
        if isinstance(owner, tuple):
            os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        pass
    finally:
        if close:
            os.close(dir_fd)


def _subagent_names(project_fd: int, conversation: Conversation) -> Iterator[tuple[str, str]]:
    """(path in the project dir, store subpath) of each subagent transcript and meta file."""
    try:
        fd = _open_directory(conversation.claude_session_id, project_fd)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        walked = list(os.fwalk(SUBAGENTS, dir_fd=fd, follow_symlinks=False))
    finally:
        os.close(fd)
    for directory, _, names, _ in sorted(walked):
        for name in sorted(names):
            relative = f"{conversation.claude_session_id}/{directory}/{name}"
            stem = relative.removesuffix(".jsonl").removesuffix(META_SUFFIX)
            if name.endswith(".jsonl") or name.endswith(META_SUFFIX):
                yield relative, stem.removeprefix(f"{conversation.claude_session_id}/")


def _read_file(project_fd: int, name: str, subpath: str | None, mark: int | str) -> _Batch | None:
    """The new entries of the file ``name`` (a regular file, not followed) past ``mark``."""
    try:
        fd = os.open(name, os.O_RDONLY | _NO_FOLLOW, dir_fd=project_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        if name.endswith(META_SUFFIX):
            data = file.read()
            digest = _meta_digest(data)
            if digest == mark:
                return None
            meta = _json(data, name)
            entry = {**meta, "type": "agent_metadata"} if isinstance(meta, dict) else None
            entries = [cast(SessionStoreEntry, entry)] if entry else []
            return _Batch(subpath, entries, (name, digest))
        offset = mark if isinstance(mark, int) else 0
        if os.fstat(file.fileno()).st_size < offset:  # rewritten: again (uuids dedupe)
            offset = 0
        file.seek(offset)
        data = file.read()
    complete = data[: data.rfind(b"\n") + 1]
    parsed = (_json(line, name) for line in complete.splitlines() if line.strip())
    entries = [cast(SessionStoreEntry, entry) for entry in parsed if entry is not None]
    return _Batch(subpath, entries, (name, offset + len(complete)))


def _json(data: bytes, name: str) -> object | None:
    try:
        return cast(object, json.loads(data))
    except ValueError:
        log.warning("transcript %s: a line that is not JSON was not mirrored", name)
        return None


def _meta_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _subagent_files(
    session_id: str, subpath: str, entries: list[SessionStoreEntry]
) -> Iterable[tuple[str, list[SessionStoreEntry]]]:
    """The files of one stored subagent transcript: its JSONL and its last metadata."""
    parts = subpath.split("/")
    if not subpath or any(part in ("", ".", "..") for part in parts) or parts[0] != SUBAGENTS:
        log.warning("stored transcript %s: subpath %r skipped", session_id, subpath)
        return []
    meta = [e for e in entries if e.get("type") == "agent_metadata"]
    lines = [e for e in entries if e.get("type") != "agent_metadata"]
    files = [(f"{session_id}/{subpath}.jsonl", lines)]
    if meta:
        last = {k: v for k, v in meta[-1].items() if k != "type"}
        files.append((f"{session_id}/{subpath}{META_SUFFIX}", [cast(SessionStoreEntry, last)]))
    return files


def _file_bytes(name: str, entries: list[SessionStoreEntry]) -> bytes:
    if name.endswith(META_SUFFIX):
        return json.dumps(entries[0]).encode()
    return b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)


def _replace_file(project_fd: int, name: str, data: bytes, owner: tuple[int, int] | None) -> None:
    """Write ``name`` (under the project dir; its directories made) anew, atomically."""
    *directories, base = name.split("/")
    opened = [project_fd]
    try:
        for directory in directories:
            _make_directory(opened[-1], directory, owner or False)
            opened.append(_open_directory(directory, opened[-1]))
        temporary = f".{base}.materialising"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NO_FOLLOW
        fd = os.open(temporary, flags, FILE_MODE, dir_fd=opened[-1])
        try:
            os.fchmod(fd, FILE_MODE)
            if owner is not None:
                os.fchown(fd, *owner)
            with os.fdopen(os.dup(fd), "wb") as file:
                file.write(data)
        finally:
            os.close(fd)
        os.replace(temporary, base, src_dir_fd=opened[-1], dst_dir_fd=opened[-1])
    finally:
        for fd in opened[1:]:
            os.close(fd)
