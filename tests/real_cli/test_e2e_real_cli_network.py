"""A sandboxed agent's network: its own namespace, its bridges, the egress proxy (real CLI).

As in test_e2e_real_cli_escape.py, the mock Messages API makes alice's agent run Bash
commands, and the test reads what they printed. The model calls themselves go through the
agent's model bridge (127.0.0.1:8480 in its namespace, to the service's socket), so every
answer here is one that crossed it.
"""

from __future__ import annotations

import re
import socket
from functools import partial

import pytest
import trio

from tests.real_cli.test_e2e_real_cli_escape import (
    AS_ALICE,
    BUDGET_S,
    agents_service,
    bash_as_alice,
    needs_sandbox,
)
from tests.support.real_cli import requires_real_cli

pytestmark = [requires_real_cli, needs_sandbox]

HOST_SECRET = "the-hosts-own-secret"


def own_address() -> str | None:
    """This machine's address on its way out (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.7", 9))  # (UDP: nothing is sent)
        except OSError:
            return None
        return str(probe.getsockname()[0])


async def serve_secret(stream: trio.SocketStream) -> None:
    async with stream:
        body = HOST_SECRET.encode()
        head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        try:
            await stream.receive_some(65536)
            await stream.send_all(head + body)
        except trio.BrokenResourceError:
            pass


async def test_an_agent_reaches_neither_the_hosts_servers_nor_the_services_port(tmp_path):
    """Not on the host's loopback, not on its own address, not the service; not even
    through the egress proxy with ``AGENT_EGRESS=*``: one-shot and session agents alike."""
    with trio.fail_after(BUDGET_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, serve_secret, 0, host="0.0.0.0")
            )
            port = listeners[0].socket.getsockname()[1]
            targets = [f"127.0.0.1:{port}"]
            if (address := own_address()) is not None:
                targets.append(f"{address}:{port}")
            async with agents_service(tmp_path, AGENT_EGRESS="*") as (api, service, client):
                targets.append(service.url.removeprefix("http://"))
                command = "; ".join(
                    f"curl -s -m 3 --noproxy '*' http://{target}/health; "
                    f"curl -s -m 3 --noproxy '' -p -x http://127.0.0.1:3128 http://{target}/health"
                    for target in targets
                )
                # (Reachable, the host's server answers the secret, the service its health.)
                assert HOST_SECRET in await _on_the_host(command)
                outputs = [
                    await bash_as_alice(client, api, command + "; echo tried"),
                    await bash_as_alice(client, api, command + "; echo tried", sessionId="a"),
                ]
            nursery.cancel_scope.cancel()
    for output in outputs:
        assert "tried" in output, output
        assert HOST_SECRET not in output and '"status"' not in output, output
    refused = re.findall(
        r"egress refused for the agent in (\S+): CONNECT (\S+): (.*)", service.log_text()
    )
    assert {target for _, target, _ in refused} >= set(targets), refused
    assert all(
        "is a loopback address" in why or "address of this host" in why for *_, why in refused
    )


async def _on_the_host(command: str) -> str:
    done = await trio.run_process(["sh", "-c", command], capture_stdout=True, check=False)
    return done.stdout.decode()


async def test_one_shot_and_session_agents_reach_the_model_through_their_bridge(tmp_path):
    command = 'echo "base=$ANTHROPIC_BASE_URL"; grep : /proc/net/dev | cut -d: -f1'
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path) as (api, _service, client):
            outputs = [
                await bash_as_alice(client, api, command),
                await bash_as_alice(client, api, command, sessionId="a"),
            ]
            calls = len(api.model_calls)
    for output in outputs:
        # The model API at the other end of the bridge; only the loopback interface.
        assert output.split() == ["base=http://127.0.0.1:8480", "lo"], output
    assert calls >= 4  # (each run: the tool call, and the answer after its result)


@pytest.mark.parametrize(
    ("egress", "status", "why"),
    [
        ("", 403, "host not allowed by AGENT_EGRESS"),
        # Allowed: the proxy goes on to resolve the name (which does not exist).
        ("*.invalid", 502, "cannot resolve the host"),
    ],
)
@pytest.mark.slow  # over ~9 s on 2 CPUs (scripts/test skips it, .ci/run runs it)
async def test_egress_is_refused_by_default_and_logged_and_allowed_by_agent_egress(
    tmp_path, egress, status, why
):
    command = "curl -sS -m 10 https://pkg.example.invalid/ 2>&1; echo rc=$?"
    with trio.fail_after(BUDGET_S):
        async with agents_service(tmp_path, AGENT_EGRESS=egress) as (api, service, client):
            outputs = [
                await bash_as_alice(client, api, command),
                await bash_as_alice(client, api, command, headers=AS_ALICE, sessionId="a"),
            ]
            log = service.log_text()
    for output in outputs:
        assert f"CONNECT tunnel failed, response {status}" in output, output
    refused = re.findall(
        r"egress refused for the agent in (\S+): CONNECT pkg\.example\.invalid:443: (.*)", log
    )
    homes = [home for home, _ in refused]
    assert len(refused) == 2 and all(reason.startswith(why) for _, reason in refused), log
    # Which agent: the one-shot worker's, then alice's sessions' HOME.
    assert "/workers/worker-0/" in homes[0] and "/users/alice-" in homes[1], homes
