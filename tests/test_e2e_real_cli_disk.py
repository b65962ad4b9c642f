"""One user's agent fills the disk: the real CLI, the real service, a mock model.

DATA_DIR is a 40 MiB tmpfs (mounted here, so as root only). Alice's agent runs
``dd if=/dev/zero of=$HOME/workspace/fill bs=1M count=100`` with its Bash tool;
then bob's next turn in his session, a new session of bob's and ``/health`` must
all still be served: the service's own state (its database, bob's transcripts)
has room kept for it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from claude_code_api.actors.registry import user_workspace
from claude_code_api.demo.mock_messages_api import (
    TextReply,
    ToolUseReply,
    open_mock_api,
    tool_result_text,
)
from tests.harness import run_service, wait_healthy
from tests.real_cli import requires_real_cli, service_overrides

pytestmark = requires_real_cli

AS_ALICE = {"x-api-key": "sk-alice-key"}
AS_BOB = {"x-api-key": "sk-bob-key"}
MIB = 1024 * 1024
FILL = "dd if=/dev/zero of=$HOME/workspace/fill bs=1M count=100; echo dd exited $?"


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # root without CAP_SYS_ADMIN: a container
        pytest.skip(f"cannot mount a small tmpfs as DATA_DIR here: {done.stderr.strip()}")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as DATA_DIR needs root")
async def test_one_user_filling_the_disk_stops_no_one_else(tmp_path):
    data_dir = tmp_path / "data"
    _mount_tmpfs(data_dir, "40m")
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
        subprocess.run(["umount", "-l", str(data_dir)], check=False)
