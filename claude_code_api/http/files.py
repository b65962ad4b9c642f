"""``/files``: files into and out of the caller's workspace (where their session agents work).

* ``PUT /files/{path}`` — the body's bytes become the file (directories on the way are
  made); ``{"path", "size"}``. At most ``MAX_FILE_BYTES`` (413), and within the caller's
  disk quota (``USER_DISK_MAX_MB``: 507 naming it) and the service's disk reserve (507).
* ``GET /files/{path}`` — the file's bytes (``application/octet-stream``).
* ``GET /files`` — ``{"files": [{"name", "size", "modified"}], "truncated"}``, every
  regular file, by name (``modified`` in ms since the epoch).
* ``DELETE /files/{path}`` — removes a file, a link (itself) or a directory tree;
  ``{"deleted": true}``.

Only inside the caller's own workspace: a path is relative, with no ``..``; links are
never followed; another user's files cannot be named at all (every path is inside the
caller's workspace). The checks and the walking are :mod:`..workspace_files`'s. A
client error is a 403, 404, 409 or 413, never a 500.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio
from quart import Blueprint, Response, g, jsonify, request

from ..limits.disk_quota import DISK_FULL_STATUS, DiskQuota
from ..store.workspace_files import (
    FileRefused,
    Upload,
    list_files,
    open_for_reading,
    remove,
    workspace_of,
)
from .parsing import BODY_TIMEOUT_S
from .requests import BadRequest

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
MIB = 1024 * 1024


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def files_routes(
    *,
    caller: Callable[[], str],
    data_dir: Path,
    max_file_bytes: int,
    disk: DiskQuota,
    workspaces_dir: Path | None = None,
) -> Blueprint:
    """The ``/files`` routes (module docstring); a :class:`FileRefused` is answered as JSON."""
    routes = Blueprint("files", __name__)
    _reading_routes(routes, caller, data_dir, disk, workspaces_dir)
    _writing_route(routes, caller, data_dir, max_file_bytes, disk, workspaces_dir)

    @routes.app_errorhandler(FileRefused)
    async def refused(exc: FileRefused) -> Response:
        response = jsonify({"error": exc.message})
        response.status_code = exc.status
        return response

    return routes


def _file_path(path: str) -> str:
    """The path as the client sent it (before repeated slashes were merged)."""
    sent = request.scope.get("unmerged_path")
    if isinstance(sent, str):
        rest = sent.lstrip("/")
        if rest.startswith("files/"):
            return rest[len("files/") :]
    return path


def _reading_routes(
    routes: Blueprint,
    caller: Callable[[], str],
    data_dir: Path,
    disk: DiskQuota,
    workspaces_dir: Path | None,
) -> None:
    """``GET /files``, ``GET /files/{path}`` and ``DELETE /files/{path}``."""

    @routes.get("/files")
    async def listing() -> Response:
        user_id = caller()
        workspace = workspace_of(data_dir, user_id, workspaces_dir)
        entries, truncated = await trio.to_thread.run_sync(list_files, workspace)
        files = [
            {"name": e.name, "size": e.size, "modified": round(e.modified * 1000)} for e in entries
        ]
        return jsonify({"files": files, "truncated": truncated})

    @routes.get("/files/<path:path>")
    async def read(path: str) -> Response:
        user_id = caller()
        workspace = workspace_of(data_dir, user_id, workspaces_dir)
        fd, size = await trio.to_thread.run_sync(open_for_reading, workspace, _file_path(path))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    chunk = await trio.to_thread.run_sync(os.read, fd, READ_CHUNK)
                    if not chunk:
                        return
                    yield chunk
            finally:
                os.close(fd)

        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        return Response(chunks(), 200, headers=headers)

    @routes.delete("/files/<path:path>")
    async def delete(path: str) -> Response:
        user_id = caller()
        workspace = workspace_of(data_dir, user_id, workspaces_dir)
        await trio.to_thread.run_sync(remove, workspace, _file_path(path))
        disk.measured.pop(user_id, None)
        return jsonify({"deleted": True})


def _writing_route(
    routes: Blueprint,
    caller: Callable[[], str],
    data_dir: Path,
    max_file_bytes: int,
    disk: DiskQuota,
    workspaces_dir: Path | None,
) -> None:
    """``PUT /files/{path}``: the body becomes the file, or nothing is written.

    Error handling: a body over ``max_file_bytes`` (declared or as it arrives) is a 413,
    one over the caller's quota or into the service's disk reserve a 507, one not
    received in time a 408; the partial upload is removed in every case.
    """

    @routes.put("/files/<path:path>")
    async def write(path: str) -> Response:
        user_id = caller()
        sent = _file_path(path)
        declared = request.content_length
        if declared is not None and declared > max_file_bytes:
            raise _too_large(max_file_bytes)
        used = await disk.usage(user_id, max_age=0)
        if declared is not None and used + declared > disk.limit:
            raise _over_quota(disk, user_id, used, declared)
        workspace = workspace_of(data_dir, user_id, workspaces_dir)
        upload = await trio.to_thread.run_sync(Upload, workspace, sent)
        try:
            await _receive(upload, max_file_bytes, disk, user_id, used)
            g.body_read = True
            if disk.low_on_space():
                raise BadRequest(
                    "the service's disk is full (its reserve, DISK_RESERVE_MB, is kept"
                    " for the service): the file was not written",
                    DISK_FULL_STATUS,
                )
            await trio.to_thread.run_sync(upload.commit)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(upload.abort)
        disk.measured.pop(user_id, None)  # it grew
        log.info("files: user=%s wrote %s (%d bytes)", user_id, sent[:200], upload.size)
        return jsonify({"path": sent, "size": upload.size})


async def _receive(
    upload: Upload, max_file_bytes: int, disk: DiskQuota, user_id: str, used: int
) -> None:
    """Write the request's body into ``upload``, held to the file limit and the quota."""
    body = request.body.__aiter__()
    while True:
        with trio.move_on_after(BODY_TIMEOUT_S) as waited:
            try:
                chunk = await body.__anext__()
            except StopAsyncIteration:
                break
        if waited.cancelled_caught:
            raise BadRequest(f"Request body not received within {BODY_TIMEOUT_S:g} s", 408)
        if upload.size + len(chunk) > max_file_bytes:
            raise _too_large(max_file_bytes)
        if used + upload.size + len(chunk) > disk.limit:
            raise _over_quota(disk, user_id, used, upload.size + len(chunk))
        await trio.to_thread.run_sync(upload.write, chunk)


def _too_large(limit: int) -> BadRequest:
    return BadRequest(f"the file exceeds {limit} bytes (MAX_FILE_BYTES)", 413)


def _over_quota(disk: DiskQuota, user_id: str, used: int, size: int) -> BadRequest:
    return BadRequest(
        f"disk quota exceeded: user {user_id!r} keeps {_mib(used)} of files and this file"
        f" would add {_mib(size)}; the quota (USER_DISK_MAX_MB) is {_mib(disk.limit)}; remove"
        " files from the workspace or delete sessions to free space",
        DISK_FULL_STATUS,
    )
