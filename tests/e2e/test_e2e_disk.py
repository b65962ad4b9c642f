"""End to end: the per-user disk quota, on the real server with the fake CLI.

The fake CLI runs a Bash tool call (``[[fake:bash]]``) through the service's
launcher, so the RLIMIT_FSIZE it sets applies as it would to the real CLI's tools
(what the real CLI's agents can do is tested in test_e2e_real_cli_disk.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.support.harness import API_KEY, run_service

ALICE = {"x-api-key": "key-alice", "Content-Type": "application/json"}
BOB = {"x-api-key": "key-bob", "Content-Type": "application/json"}
ENV = {
    "API_KEYS": f"{API_KEY},alice:key-alice,bob:key-bob",
    "USER_DISK_MAX_MB": "3",
    "AGENT_SANDBOX": "off",
    "INTERRUPT_GRACE_MS": "1000",
}
MIB = 1024 * 1024


async def run(client: httpx.AsyncClient, prompt: str, headers=ALICE, **fields) -> httpx.Response:
    return await client.post("/run", json={"prompt": prompt, **fields}, headers=headers)


async def test_one_file_stops_at_the_quota_then_the_user_gets_507_and_others_do_not(tmp_path):
    with trio.fail_after(90):
        async with run_service(tmp_path, env=ENV) as service:
            workspace = service.data_dir / "users"
            async with service.client() as client:
                fill = await run(
                    client,
                    "[[fake:bash]] dd if=/dev/zero of=$HOME/workspace/fill bs=1M count=10; ls -l"
                    " $HOME/workspace/fill",
                    sessionId="s",
                )
                # dd was stopped at the quota (RLIMIT_FSIZE): 3 MiB, not 10.
                [fill_file] = list(workspace.rglob("fill"))
                assert fill_file.stat().st_size == 3 * MIB, fill.text
                # Alice is over her quota now: new work is refused, naming it.
                for fields in ({"sessionId": "s"}, {"sessionId": "another"}, {}):
                    refused = await run(client, "hello", **fields)
                    assert refused.status_code == 507, refused.text
                    assert "USER_DISK_MAX_MB" in refused.json()["error"]
                    assert "3.0 MiB" in refused.json()["error"]
                # Bob is served, in a session and one-shot.
                assert (await run(client, "hi", BOB, sessionId="s")).status_code == 200
                assert (await run(client, "hi", BOB)).status_code == 200
                # Alice frees space (deleting her session keeps the workspace: it is
                # removed only after SESSION_TTL_MS with no session left).
                fill_file.unlink()
                assert (await run(client, "hello", sessionId="s")).status_code == 200


@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_turn_that_passes_the_quota_is_stopped(tmp_path):
    many_files = (
        "[[fake:bash]] for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do"
        " dd if=/dev/zero of=$HOME/workspace/f$i bs=512k count=1 2>/dev/null; sleep 0.2; done"
    )
    with trio.fail_after(90):
        async with run_service(tmp_path, env=ENV) as service:
            async with service.client() as client:
                for fields in ({"sessionId": "s"}, {}):  # a session turn, a one-shot
                    stopped = await run(client, many_files, **fields)
                    assert stopped.status_code == 507, stopped.text
                    assert "turn stopped: disk quota exceeded" in stopped.json()["error"]
                    if fields:
                        # Stopped before its 20 files (4 s of writing), and for good: the
                        # agent was killed with its tools (here after 10 files: 5 MiB).
                        def written() -> list[Path]:
                            return [
                                path
                                for path in (service.data_dir / "users").rglob("f*")
                                if path.is_file() and path.parent.name == "workspace"
                            ]

                        files = written()
                        await trio.sleep(2)
                        assert written() == files and 6 <= len(files) < 20, files
                        for path in files:  # the session's files stay: free them
                            path.unlink()
                await service.wait_logged("over the disk quota")
                # The one-shot's ephemeral HOME is gone with its agent.
                assert (await run(client, "hi", BOB)).status_code == 200
