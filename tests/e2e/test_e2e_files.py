"""End to end: ``/files`` puts files into the caller's workspace and takes them out, never more.

The real service, the real SDK, the fake CLI (whose ``[[fake:bash]]`` runs a shell
command in the session's working directory: the agent's view of the workspace).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from claude_code_api.store.workspace_files import workspace_of
from tests.support.harness import for_one_test, shared_service
from tests.support.raw_http import RawConnection, close_all

ALICE = {"x-api-key": "key-alice"}
BOB = {"x-api-key": "key-bob"}
MAX_FILE_BYTES = 1_500_000


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    env = {
        "API_KEYS": "alice:key-alice,bob:key-bob",
        "MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        "USER_DISK_MAX_MB": "4",
    }
    with shared_service(tmp_path_factory.mktemp("files"), env=env) as service:
        yield service


@pytest.fixture
async def service(shared):
    yield await for_one_test(shared)
    await close_all()


def workspace(service, user: str) -> Path:
    return workspace_of(service.data_dir, user)


async def test_put_get_list_delete(service):
    with trio.fail_after(30):
        async with service.client() as client:
            put = await client.put("/files/notes/today.txt", headers=ALICE, content=b"hello\n")
            assert (put.status_code, put.json()) == (200, {"path": "notes/today.txt", "size": 6})
            got = await client.get("/files/notes/today.txt", headers=ALICE)
            assert got.status_code == 200 and got.content == b"hello\n"
            assert got.headers["content-type"] == "application/octet-stream"
            await client.put("/files/a.bin", headers=ALICE, content=bytes(range(256)) * 4)
            listed = (await client.get("/files", headers=ALICE)).json()
            assert [(f["name"], f["size"]) for f in listed["files"]] == [
                ("a.bin", 1024),
                ("notes/today.txt", 6),
            ]
            assert listed["truncated"] is False
            assert all(isinstance(f["modified"], int) for f in listed["files"])
            # Replaced whole.
            await client.put("/files/a.bin", headers=ALICE, content=b"x")
            assert (await client.get("/files/a.bin", headers=ALICE)).content == b"x"
            for path in ("a.bin", "notes"):
                deleted = await client.delete(f"/files/{path}", headers=ALICE)
                assert deleted.json() == {"deleted": True}
            missing = await client.get("/files/a.bin", headers=ALICE)
            assert missing.status_code == 404 and "not found" in missing.json()["error"]
            assert (await client.delete("/files/a.bin", headers=ALICE)).status_code == 404
            assert (await client.get("/files", headers=ALICE)).json()["files"] == []
            assert (await client.get("/files", headers={"x-api-key": "wrong"})).status_code == 401
            assert (await client.put("/files/x", content=b"x")).status_code == 401


async def test_the_agent_sees_an_upload_and_its_own_files_can_be_downloaded(service):
    with trio.fail_after(30):
        async with service.client() as client:
            await client.put("/files/input.csv", headers=ALICE, content=b"a,b\n1,2\n")
            body = {
                "prompt": "[[fake:bash]] cat input.csv && printf done > out.txt",
                "sessionId": "files",
            }
            reply = await client.post("/run", headers=ALICE, json=body)
            assert reply.status_code == 200, reply.text
            assert "a,b\n1,2" in reply.json()["output"]
            got = await client.get("/files/out.txt", headers=ALICE)
            assert (got.status_code, got.content) == (200, b"done")
            # Bob has neither: his paths are in his own workspace.
            assert (await client.get("/files/out.txt", headers=BOB)).status_code == 404
            assert (await client.get("/files", headers=BOB)).json()["files"] == []
            for path in ("input.csv", "out.txt"):
                await client.delete(f"/files/{path}", headers=ALICE)
            await client.request("DELETE", "/session", headers=ALICE, json={"sessionId": "files"})


@pytest.mark.parametrize(
    "target",
    [
        "/files/../x",
        "/files/a/../../x",
        "/files/%2e%2e/x",
        "/files/a/%2E%2E/%2e%2e/users",
        "/files//etc/passwd",
        "/files/%2Fetc%2Fpasswd",
        "/files/a//b",
        "/files/./a",
        "/files/a%00b",
    ],
)
async def test_paths_that_leave_the_workspace_are_403(service, target):
    with trio.fail_after(30):
        for method in ("GET", "PUT", "DELETE"):
            connection = await RawConnection.open(service.url)
            await connection.request(method, target, headers=ALICE, body=b"x")
            response = await connection.response()
            assert response is not None
            assert response.status in (403, 404), (method, target, response)
            if response.status == 404:  # never matched the route at all
                assert response.json() == {"error": "Not found"}
            else:
                assert "path:" in response.json()["error"]
            await connection.aclose()
    assert not (service.data_dir / "users" / "x").exists()


async def test_links_are_never_followed(service):
    with trio.fail_after(30):
        async with service.client() as client:
            await client.put("/files/mine.txt", headers=BOB, content=b"bob's secret")
            await client.put("/files/seed", headers=ALICE, content=b"")
            home = workspace(service, "alice")
            bobs = workspace(service, "bob")
            os.symlink(bobs, home / "to-bob")
            os.symlink(bobs / "mine.txt", home / "bob-file")
            os.symlink("/etc", home / "etc")
            for path in ("to-bob/mine.txt", "bob-file", "etc/hostname"):
                got = await client.get(f"/files/{path}", headers=ALICE)
                assert got.status_code == 403, (path, got.text)
                assert "is a link" in got.json()["error"]
            put = await client.put("/files/to-bob/mine.txt", headers=ALICE, content=b"owned")
            assert put.status_code == 403
            # Writing over a link replaces the link itself; deleting one removes only it.
            put = await client.put("/files/bob-file", headers=ALICE, content=b"alice's")
            assert put.status_code == 200
            assert not (home / "bob-file").is_symlink()
            deleted = await client.delete("/files/to-bob", headers=ALICE)
            assert deleted.status_code == 200
            assert (bobs / "mine.txt").read_bytes() == b"bob's secret"
            listed = [
                f["name"] for f in (await client.get("/files", headers=ALICE)).json()["files"]
            ]
            assert listed == ["bob-file", "seed"]  # the link to /etc is not listed
            # A FIFO is no file to read (and must not hang the request).
            os.mkfifo(home / "pipe")
            assert (await client.get("/files/pipe", headers=ALICE)).status_code == 404
            # The workspace itself swapped for a link: nothing is served through it.
            os.rename(home, home.with_name("workspace.real"))
            os.symlink(bobs, home)
            try:
                got = await client.get("/files/mine.txt", headers=ALICE)
                assert got.status_code == 403
                assert (await client.get("/files", headers=ALICE)).json()["files"] == []
                put = await client.put("/files/mine.txt", headers=ALICE, content=b"x")
                assert put.status_code == 403
            finally:
                os.unlink(home)
                os.rename(home.with_name("workspace.real"), home)
            for path in ("bob-file", "seed", "etc", "pipe"):
                assert (await client.delete(f"/files/{path}", headers=ALICE)).status_code == 200
            await client.delete("/files/mine.txt", headers=BOB)


async def test_file_size_and_disk_quota(service):
    with trio.fail_after(30):
        async with service.client() as client:
            big = await client.put(
                "/files/big.bin", headers=ALICE, content=b"x" * (MAX_FILE_BYTES + 1)
            )
            assert big.status_code == 413
            assert (
                big.json()["error"] == f"the file exceeds {MAX_FILE_BYTES} bytes (MAX_FILE_BYTES)"
            )

            async def chunked():
                for _ in range(MAX_FILE_BYTES // 100_000 + 1):
                    yield b"y" * 100_000

            big = await client.put("/files/big.bin", headers=ALICE, content=chunked())
            assert big.status_code == 413
            statuses = []
            for number in range(4):
                put = await client.put(
                    f"/files/part{number}", headers=ALICE, content=b"z" * 1_400_000
                )
                statuses.append(put.status_code)
            assert statuses == [200, 200, 507, 507]
            assert "disk quota exceeded" in put.json()["error"]
            assert "USER_DISK_MAX_MB" in put.json()["error"]
            # Nothing half-written is left behind.
            names = [f["name"] for f in (await client.get("/files", headers=ALICE)).json()["files"]]
            assert names == ["part0", "part1"]
            assert sorted(os.listdir(workspace(service, "alice"))) == ["part0", "part1"]
            for name in names:
                await client.delete(f"/files/{name}", headers=ALICE)
            ok = await client.put("/files/part2", headers=ALICE, content=b"z" * 1_400_000)
            assert ok.status_code == 200
            await client.delete("/files/part2", headers=ALICE)
