"""One user's agent fills the disk: the real CLI, the real service, a mock model.

DATA_DIR is a 40 MiB tmpfs (mounted here, so as root only). Alice's agent runs
``dd if=/dev/zero of=$HOME/workspace/fill bs=1M count=100`` with its Bash tool, or
writes 8 MiB files in a loop until the disk is full (faster than the quota's watch
measures); then bob's next turn in his session, a new session of bob's and
``/health`` must all still be served: the service's own state (its database, bob's
transcripts) has room kept for it (the reserve's ballast file).
"""

from __future__ import annotations

import os

import pytest
import trio

from claude_code_api.demo.mock_messages_api import (
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from claude_code_api.store.user_paths import user_workspace
from tests.support.harness import run_service, wait_healthy
from tests.support.real_cli import requires_real_cli, service_overrides
from tests.support.tmpfs import mount_tmpfs, unmount_tmpfs

pytestmark = requires_real_cli

AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}
MIB = 1024 * 1024
FILL = "dd if=/dev/zero of=$HOME/workspace/fill bs=1M count=100; echo dd exited $?"
# Many files, each within RLIMIT_FSIZE: bounded (12 x 8 MiB), it ends at ENOSPC, faster
# than the quota's watch measures (the end of the turn finds the disk full).
FILL_MANY = (
    "i=0; while [ $i -lt 12 ]; do i=$((i+1));"
    " dd if=/dev/zero of=$HOME/workspace/many-$i bs=1M count=8 2>/dev/null || break; done;"
    " echo wrote $i files"
)
# The same, writing on at ENOSPC (bounded: 40 tries, 6 s at least): the watch stops it.
FILL_ON = (
    "i=0; while [ $i -lt 40 ]; do i=$((i+1));"
    " dd if=/dev/zero of=$HOME/workspace/many-$i bs=1M count=8 2>/dev/null; sleep 0.15; done;"
    " echo wrote $i files"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as DATA_DIR needs root")
async def test_one_user_filling_the_disk_stops_no_one_else(tmp_path):
    data_dir = tmp_path / "data"
    mount_tmpfs(data_dir, "40m")
    try:
        with trio.fail_after(240):
            async with open_mock_api() as api:
                env = service_overrides(api.url, tmp_path, POOL_SIZE="1")
                async with run_service(tmp_path, env=env) as service:
                    assert service.data_dir == data_dir
                    await wait_healthy(service, ready=1, timeout=60)
                    async with service.client(timeout=90) as client:

                        async def run(headers, **fields):
                            reply = await client.post(
                                "/run", json={"prompt": "go", **fields}, headers=headers
                            )
                            return reply

                        first = await run(AS_BOB, sessionId="bob-1")
                        assert first.status_code == 200, first.text

                        api.enqueue(ToolUseReply("Bash", {"command": FILL}), TextReply("done"))
                        filled = await run(AS_ALICE, sessionId="alice-1")
                        # Answered: dd was stopped (its file hit the agent's RLIMIT_FSIZE),
                        # or the turn was stopped for writing into the reserve (507).
                        assert filled.status_code in (200, 507), filled.text
                        fill = user_workspace(data_dir, "alice") / "workspace" / "fill"
                        size = fill.stat().st_size
                        print(f"alice's file stopped at {size / MIB:.1f} MiB", end=" ")
                        if filled.status_code == 200:
                            printed = tool_result_text(api.model_calls[-1].tool_results()[0])
                            assert "dd exited 0" not in printed, printed
                        assert size < 40 * MIB
                        vfs = os.statvfs(data_dir)
                        print(f"(free after: {vfs.f_bavail * vfs.f_frsize / MIB:.1f} MiB)")

                        again = await run(AS_BOB, sessionId="bob-1")
                        assert again.status_code == 200, again.text
                        assert again.json()["success"] is True, again.text
                        fresh = await run(AS_BOB, sessionId="bob-2")
                        assert fresh.status_code == 200, fresh.text
                        assert fresh.json()["success"] is True, fresh.text
                        print(
                            f"bob's turns after the fill: {again.json()['durationMs']} ms"
                            f" (his session), {fresh.json()['durationMs']} ms (a new one)"
                        )
                        health = await client.get("/health")
                        assert health.status_code == 200, health.text
                        status = (await client.get("/status", headers=AS_BOB)).json()
                        assert {s["id"]: s["turns"] for s in status["sessions"]} == {
                            "bob-1": 2,
                            "bob-2": 1,
                        }
    finally:
        unmount_tmpfs(data_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as DATA_DIR needs root")
@pytest.mark.parametrize(
    ("command", "statuses"),
    [(FILL_MANY, (200, 507)), (FILL_ON, (507,))],
    ids=["until-full", "writing-on"],
)
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_one_user_filling_the_disk_with_many_files_stops_no_one_else(
    tmp_path, command, statuses
):
    data_dir = tmp_path / "data"
    mount_tmpfs(data_dir, "40m")
    try:
        with trio.fail_after(240):
            async with open_mock_api() as api:
                env = service_overrides(api.url, tmp_path, POOL_SIZE="1")
                async with run_service(tmp_path, env=env) as service:
                    await wait_healthy(service, ready=1, timeout=60)
                    async with service.client(timeout=90) as client:

                        async def run(headers, **fields):
                            return await client.post(
                                "/run", json={"prompt": "go", **fields}, headers=headers
                            )

                        first = await run(AS_BOB, sessionId="bob-1")
                        assert first.status_code == 200, first.text
                        assert (data_dir / ".reserve").stat().st_blocks * 512 == 10 * MIB

                        api.enqueue(ToolUseReply("Bash", {"command": command}), TextReply("ok"))
                        filled = await run(AS_ALICE, sessionId="alice-1")
                        assert filled.status_code in statuses, filled.text
                        if filled.status_code == 507:
                            assert "disk is full" in filled.json()["error"], filled.text
                        workspace = user_workspace(data_dir, "alice") / "workspace"
                        kept = sum(path.stat().st_size for path in workspace.glob("many-*"))
                        vfs = os.statvfs(data_dir)
                        print(
                            f"alice kept {kept / MIB:.1f} MiB in files of 8 MiB; HTTP"
                            f" {filled.status_code}; free after:"
                            f" {vfs.f_bavail * vfs.f_frsize / MIB:.1f} MiB",
                            end=" ",
                        )
                        assert kept > 20 * MIB  # she did fill it

                        again = await run(AS_BOB, sessionId="bob-1")
                        assert again.status_code == 200, again.text
                        assert again.json()["success"] is True, again.text
                        fresh = await run(AS_BOB, sessionId="bob-2")
                        assert fresh.status_code == 200, fresh.text
                        assert fresh.json()["success"] is True, fresh.text
                        health = await client.get("/health")
                        assert health.status_code == 200, health.text
                        status = (await client.get("/status", headers=AS_BOB)).json()
                        assert {s["id"]: s["turns"] for s in status["sessions"]} == {
                            "bob-1": 2,
                            "bob-2": 1,
                        }
                        # Alice's new work is refused while the disk she filled stays full.
                        for fields in ({"sessionId": "alice-1"}, {"sessionId": "alice-2"}, {}):
                            refused = await run(AS_ALICE, **fields)
                            assert refused.status_code == 507, refused.text
                            assert "disk is full" in refused.json()["error"], refused.text
                        scrape = (await client.get("/metrics")).text
                        released = [
                            line
                            for line in scrape.splitlines()
                            if line.startswith("claude_code_api_disk_reserve_released_total ")
                        ]
                        print(f"({released[0]})")
                        assert float(released[0].split()[1]) >= 1
                        # Once her files are gone, the reserve is whole again and she works.
                        for path in workspace.glob("many-*"):
                            path.unlink()
                        with trio.fail_after(30):
                            while (data_dir / ".reserve").stat().st_blocks * 512 < 10 * MIB:
                                await trio.sleep(0.2)
                        back = await run(AS_ALICE, sessionId="alice-2")
                        assert back.status_code == 200, back.text
    finally:
        unmount_tmpfs(data_dir)
