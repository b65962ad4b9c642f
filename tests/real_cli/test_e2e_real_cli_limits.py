"""One user's agent cannot take the host's memory or processes from the others (real CLI).

As in test_e2e_real_cli_escape: the mock Messages API answers a model call with a
Bash tool call, the real bundled Claude Code CLI runs it inside the service's
launcher, and the test reads what it printed from the next model call. Here the
mock answers by what it is asked (:func:`by_prompt`), so that alice's and bob's
requests can run at the same time.

Figures (AGENT_TMP_MB, processes reached, bob's turn time) are printed: run with
``-s`` to see them.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import trio

from claude_code_api.agent.limits import plan_limits
from claude_code_api.demo.mock_messages_api import RecordedRequest, Step, TextReply, ToolUseReply
from claude_code_api.store.user_paths import user_workspace
from tests.real_cli.test_e2e_real_cli_escape import (
    AS_ALICE,
    AS_BOB,
    CGROUPS_REASON,
    agents_service,
    bash_as_alice,
    needs_sandbox,
)
from tests.support.harness import wait_healthy
from tests.support.real_cli import requires_real_cli

pytestmark = requires_real_cli

BUDGET_S = 150
needs_cgroups = pytest.mark.skipif(
    CGROUPS_REASON is not None, reason=f"no cgroups for agents here: {CGROUPS_REASON}"
)
# Without cgroups, the process bound is RLIMIT_NPROC where it bounds one agent alone.
PROCS_BOUNDED = (
    CGROUPS_REASON is None
    or plan_limits(
        tmp_mb=None, memory_mb=2048, max_procs=512, data_dir=Path("."), bwrap=shutil.which("bwrap")
    ).nproc
)


def by_prompt(commands: dict[str, str]):
    """The mock's answer: a prompt in ``commands`` runs its Bash command; else an echo.

    A call that carries a tool's result is answered ``done``.
    """

    def answer(request: RecordedRequest) -> Step:
        if request.tool_results():
            return TextReply("done")
        prompt = request.last_user_text()
        if prompt in commands:
            return ToolUseReply("Bash", {"command": commands[prompt]})
        return TextReply(f"echo: {prompt}")

    return answer


@needs_sandbox
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_an_agents_tmp_and_dev_shm_are_sized_and_dev_is_read_only(tmp_path):
    """Without a size, bwrap's tmpfs take half the host's RAM each (11.8 GiB on a 24 GiB host).

    What an agent writes there is RAM until its sandbox ends. Both tmpfs must show
    AGENT_TMP_MB, a write past it must fail, and /dev (a tmpfs too) be read-only.
    """
    command = (
        'python3 -c "import os; [print(p, os.statvfs(p).f_blocks * os.statvfs(p).f_frsize >> 20)'
        " for p in ('/tmp', '/dev/shm')]\"; "
        "head -c 100M /dev/zero > /tmp/fill 2>/dev/null; echo wrote $(stat -c %s /tmp/fill); "
        "rm -f /tmp/fill; head -c 100M /dev/zero > /dev/shm/fill 2>/dev/null; "
        "echo wrote $(stat -c %s /dev/shm/fill); rm -f /dev/shm/fill; "
        "touch /dev/x 2>/dev/null && echo dev-writable; echo checked"
    )
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path, AGENT_TMP_MB="64") as (api, _service, client):
            outputs = [
                await bash_as_alice(client, api, command),
                await bash_as_alice(client, api, command, sessionId="a"),
            ]
    for output in outputs:
        print(output)
        sizes = dict(re.findall(r"^(/tmp|/dev/shm) (\d+)$", output, re.MULTILINE))
        assert set(sizes) == {"/tmp", "/dev/shm"}, output
        assert all(int(size) <= 64 for size in sizes.values()), output
        written = [int(n) for n in re.findall(r"^wrote (\d+)$", output, re.MULTILINE)]
        assert len(written) == 2 and all(n <= 64 << 20 for n in written), output
        assert "checked" in output and "dev-writable" not in output, output


@needs_cgroups
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_an_agent_past_its_memory_limit_is_killed_and_its_request_answers_502(tmp_path):
    """An agent allocating past AGENT_MEMORY_MB is killed; bob and alice's next request live on.

    The CLI itself takes ~200 MiB: a 1 GiB string passes a 512 MiB limit. Without a
    limit it is allocated, and the request answers 200.
    """
    hog = "python3 -c \"b = b'x' * (1 << 30); print('allocated', len(b))\""
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path, AGENT_MEMORY_MB="512") as (api, service, client):
            api.default = by_prompt({"hog": hog})
            for fields in ({}, {"sessionId": "s"}):
                reply = await client.post(
                    "/run", json={"prompt": "hog", **fields}, headers=AS_ALICE
                )
                assert reply.status_code == 502, reply.text
                assert "AGENT_MEMORY_MB=512" in reply.json()["error"], reply.text
                print("alice:", reply.status_code, reply.json()["error"])
            for headers in (AS_BOB, AS_ALICE):
                reply = await client.post("/run", json={"prompt": "hello"}, headers=headers)
                assert reply.status_code == 200, reply.text
                assert reply.json()["output"] == "echo: hello"
            reply = await client.post(
                "/run", json={"prompt": "hello", "sessionId": "s"}, headers=AS_ALICE
            )
            assert reply.status_code == 200, reply.text
            assert (await client.get("/health")).status_code == 200
            assert "Traceback" not in service.log_text()


@needs_sandbox
@pytest.mark.skipif(not PROCS_BOUNDED, reason="no pids cgroup, and RLIMIT_NPROC bounds no agent")
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_a_fork_bomb_reaches_agent_max_procs_and_bob_is_served_meanwhile(tmp_path):
    """A bounded fork bomb (128 background sleeps) stops at AGENT_MAX_PROCS=64.

    The processes are counted in the agent's own pid namespace (/proc, from the
    process that forked: no fork is left to run ``ps``) and written to alice's
    session workspace. While alice's agent holds them, bob's one-shot is answered. Without
    the bound all 128 run. Alice's agent may die of its own bomb (the CLI aborts
    when it cannot start a thread): her request then answers 502 naming the bound.
    """
    # Python, not a shell loop: bash retries a refused fork for ~15 s each time.
    bomb = (
        'python3 -c "import os, subprocess\n'
        "for _ in range(128):\n"
        "    try: subprocess.Popen(['sleep', '15'])\n"
        "    except OSError: break\n"
        "n = sum(name.isdigit() for name in os.listdir('/proc'))\n"
        "open('processes', 'w').write(str(n))\""
    )
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path, AGENT_MAX_PROCS="64", POOL_SIZE="2") as (
            api,
            service,
            client,
        ):
            await wait_healthy(service, ready=2, timeout=60)
            api.default = by_prompt({"bomb": bomb})
            counted = user_workspace(service.data_dir, "alice") / "workspace" / "processes"
            alice: list[httpx.Response] = []

            async def alice_bombs() -> None:
                bombing = {"prompt": "bomb", "sessionId": "b"}
                alice.append(await client.post("/run", json=bombing, headers=AS_ALICE))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice_bombs)
                while not counted.exists() or not counted.read_text().strip():
                    await trio.sleep(0.05)
                began = time.monotonic()
                reply = await client.post("/run", json={"prompt": "hello"}, headers=AS_BOB)
                bob_s = time.monotonic() - began
                assert reply.status_code == 200, reply.text
                assert reply.json()["output"] == "echo: hello"
                assert bob_s < 10, "the bomb's sleeps (15 s) no longer held alice's bound"
            processes = int(counted.read_text())
    print(f"alice's agent reached {processes} processes; bob's turn took {bob_s:.2f}s")
    print("alice:", alice[0].status_code, alice[0].text)
    assert 16 <= processes <= 64  # (16: the loop did run)
    if alice[0].status_code != 200:
        assert alice[0].status_code == 502 and "AGENT_MAX_PROCS=64" in alice[0].text
