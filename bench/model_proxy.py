"""What the model proxy adds to a turn: the real bundled CLI against the mock Messages API.

Prints figures; it is not a test. Two warm CLI processes (conversations) in this process's
trio loop: one talks to the mock directly, the other through a :class:`ModelProxy` (in this
process, as in the service) that puts the mock's key on. Rounds alternate between them, so
a busy moment of the machine hits both alike. Per turn (one model call each, streamed):

* **first token**: from sending the prompt to the first text delta the CLI relays
  (``include_partial_messages``);
* **CPU**: this process's CPU time during the turn (the mock, the SDK's client and, for
  the proxied one, the proxy); the difference of the medians is the proxy's CPU per call.

Then the hop alone, without the CLI's own noise: an HTTP client's streamed model call,
time to the answer's first byte, straight to the mock and through the proxy (``--calls``).

    .venv/bin/python -m bench.model_proxy [--turns 60]

As root it sets ``IS_SANDBOX=1`` (the CLI refuses bypassPermissions otherwise).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio
from claude_agent_sdk import ClaudeSDKClient, ResultMessage
from claude_agent_sdk.types import StreamEvent

from bench.stats import dist, fmt_dist, machine_lines, section
from claude_code_api.agent.protocol import Charge
from claude_code_api.demo.mock_messages_api import open_mock_api
from claude_code_api.limits.usage import UsageLedger
from claude_code_api.proxy.model import ModelProxy, UpstreamCredential
from tests.support.real_cli import (
    MOCK_API_KEY,
    CliDirs,
    open_real_cli,
    real_cli_options,
)


async def turn(client: ClaudeSDKClient, prompt: str) -> tuple[float, float]:
    """(seconds to the first text delta, CPU seconds of this process) of one turn."""
    began, cpu = time.perf_counter(), time.process_time()
    first: float | None = None
    await client.query(prompt)
    async for message in client.receive_messages():
        if first is None and isinstance(message, StreamEvent):
            if message.event.get("type") == "content_block_delta":
                first = time.perf_counter() - began
        if isinstance(message, ResultMessage):
            break
    assert first is not None, "no text delta: is include_partial_messages on?"
    return first, time.process_time() - cpu


async def first_bytes(url: str, key: str, calls: int) -> tuple[list[float], list[float]]:
    """(seconds to the first byte, CPU seconds of this process) of ``calls`` streamed calls."""
    import httpx

    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    firsts, cpus = [], []
    async with httpx.AsyncClient(base_url=url, headers={"x-api-key": key}) as client:
        for _ in range(calls + 5):
            began, cpu = time.perf_counter(), time.process_time()
            async with client.stream("POST", "/v1/messages", json=body) as response:
                first = None
                async for _chunk in response.aiter_raw():
                    first = first or time.perf_counter() - began
            firsts.append(first or 0.0)
            cpus.append(time.process_time() - cpu)
    return firsts[5:], cpus[5:]


async def main(turns: int, calls: int) -> None:
    section("what the model proxy adds to a turn (real CLI, mock Messages API)")
    for line in machine_lines():
        print(line)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        async with open_mock_api(expected_key=MOCK_API_KEY) as api, trio.open_nursery() as nursery:
            ledger = UsageLedger()
            proxy = ModelProxy(
                root / "run",
                api.url,
                UpstreamCredential.from_environment({"ANTHROPIC_API_KEY": MOCK_API_KEY}),
                ledger,
            )
            await nursery.start(proxy.serve)
            token, grant = proxy.grants.register("bench")
            grant.charge = Charge("bench", "bench-run")
            direct = real_cli_options(
                api, CliDirs.create(root / "direct"), include_partial_messages=True
            )
            proxied = real_cli_options(
                api,
                CliDirs.create(root / "proxied"),
                env=proxy.env(token),
                include_partial_messages=True,
            )
            figures: dict[str, tuple[list[float], list[float]]] = {
                "direct": ([], []),
                "proxied": ([], []),
            }
            async with open_real_cli(direct) as to_mock, open_real_cli(proxied) as to_proxy:
                for client in (to_mock, to_proxy):
                    await turn(client, "warm up")
                for n in range(turns):
                    order = [("direct", to_mock), ("proxied", to_proxy)]
                    for name, client in order if n % 2 == 0 else order[::-1]:
                        first, cpu = await turn(client, f"turn {n}")
                        figures[name][0].append(first)
                        figures[name][1].append(cpu)
            direct_hop = await first_bytes(api.url, MOCK_API_KEY, calls)
            proxied_hop = await first_bytes(proxy.address(in_netns=False), token, calls)
            nursery.cancel_scope.cancel()
            await proxy.aclose()
    assert api.wrong_keys == []
    for name, (firsts, _cpus) in figures.items():
        print(fmt_dist(f"first token, {name}", dist(firsts)))
    for name, (_firsts, cpus) in figures.items():
        print(fmt_dist(f"CPU here per turn, {name}", dist(cpus)))
    added = dist(figures["proxied"][0])["p50"] - dist(figures["direct"][0])["p50"]
    cpu = dist(figures["proxied"][1])["p50"] - dist(figures["direct"][1])["p50"]
    p99 = dist(figures["proxied"][0])["p99"] - dist(figures["direct"][0])["p99"]
    print(
        f"the proxy adds: first token p50 {added:+.2f} ms, p99 {p99:+.2f} ms;"
        f" CPU per model call {cpu:+.2f} ms"
    )
    print(fmt_dist("HTTP first byte, direct", dist(direct_hop[0])))
    print(fmt_dist("HTTP first byte, proxied", dist(proxied_hop[0])))
    hop = dist(proxied_hop[0])["p50"] - dist(direct_hop[0])["p50"]
    hop99 = dist(proxied_hop[0])["p99"] - dist(direct_hop[0])["p99"]
    hop_cpu = dist(proxied_hop[1])["p50"] - dist(direct_hop[1])["p50"]
    print(f"the hop adds: first byte p50 {hop:+.2f} ms, p99 {hop99:+.2f} ms; CPU {hop_cpu:+.2f} ms")
    spend, _ = ledger.take_run("bench-run")
    print(f"the proxy counted {spend.calls if spend else 0} model calls")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=60, help="turns per CLI (default 60)")
    parser.add_argument("--calls", type=int, default=300, help="HTTP calls each (default 300)")
    arguments = parser.parse_args()
    if os.geteuid() == 0:
        os.environ["IS_SANDBOX"] = "1"
    trio.run(main, arguments.turns, arguments.calls)
