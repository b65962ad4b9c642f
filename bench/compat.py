"""Benchmark: what the compatible routes and images cost over a plain ``POST /run``.

Prints figures; it is not a test. The real service on 127.0.0.1 with the fake CLI
(``tests/fake_claude.py``), started with the tests' launcher; one request at a time,
the worker warm before each (``/health`` says ready), ``/run`` and the route compared
in alternation so both see the same machine.

    .venv/bin/python -m bench.compat            # about a minute
    .venv/bin/python -m bench.compat --rounds 100

Figures:

1. **Chat completion vs /run**, the same prompt: latency p50/p90 of each and the
   extra of ``POST /v1/chat/completions`` (p50 of the per-round differences); the
   same for ``POST /v1/messages``.
2. **First token of a streamed completion**: the fake writes one text, ``stamp
   <time.monotonic()>`` (one clock for every process): the time from sending the
   request to the first content chunk, and from the agent writing it to the client
   reading it; the same for ``/run``'s first ``text`` event.
3. **The largest image accepted** (``MAX_IMAGE_BYTES``, 5 MiB by default): ``/run``
   with it vs without; the extra is its cost (upload, base64 check, the hand-over to
   the agent's stdin).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path


import httpx
import trio

from bench.stats import QuietMeter, dist, fmt_dist
from tests.harness import AUTH, launch_service, service_env, wait_healthy
from tests.images import png

MODEL = "claude-sonnet-4-6"
PROMPT = "What is 2+2?"


async def timed(call: Callable[[], Awaitable[httpx.Response]]) -> float:
    began = time.perf_counter()
    response = await call()
    took = time.perf_counter() - began
    assert response.status_code == 200, response.text
    return took


async def first_chunk(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, float]:
    """(request sent -> first text, agent wrote it -> client read it), in seconds."""
    began = time.perf_counter()
    found: tuple[float, float] | None = None
    async with client.stream("POST", path, headers=AUTH, json=body) as response:
        async for line in response.aiter_lines():
            if found is not None:
                continue  # read to the end: the run finishes before the next one
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            text = None
            if "choices" in data and data["choices"]:
                text = data["choices"][0]["delta"].get("content")
            elif "text" in data and "runId" not in data:
                text = data["text"]
            if text and text.startswith("stamp "):
                read_at = time.monotonic()
                took = time.perf_counter() - began
                found = took, read_at - float(text.split()[1])
    assert found is not None, "no stamp arrived"
    return found


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        env = service_env(Path(workdir), {"POOL_SIZE": "1"}, record_pids=False)
        async with launch_service(env) as service, service.client() as client:
            await wait_healthy(service, ready=1)

            async def ready() -> None:
                await wait_healthy(service, ready=1, timeout=30)

            run = {"prompt": PROMPT}
            chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
            messages = {**chat, "max_tokens": 100}
            meter = QuietMeter(service.pid)
            times: dict[str, list[float]] = {"run": [], "chat": [], "messages": []}
            extra_chat, extra_messages = [], []
            for number in range(rounds):
                order = ["run", "chat", "messages"]
                if number % 2:
                    order.reverse()
                took: dict[str, float] = {}
                for name in order:
                    await ready()
                    if name == "run":
                        took[name] = await timed(
                            lambda: client.post("/run", headers=AUTH, json=run)
                        )
                    elif name == "chat":
                        took[name] = await timed(
                            lambda: client.post("/v1/chat/completions", headers=AUTH, json=chat)
                        )
                    else:
                        took[name] = await timed(
                            lambda: client.post("/v1/messages", headers=AUTH, json=messages)
                        )
                    times[name].append(took[name])
                extra_chat.append(took["chat"] - took["run"])
                extra_messages.append(took["messages"] - took["run"])
            print(f"## 1. The same prompt, {rounds} rounds, one request at a time (ms)")
            for name, values in times.items():
                print(f"{name:>9}: {fmt_dist('', dist(values))}")
            print(
                f"extra of /v1/chat/completions over /run: p50 {statistics.median(extra_chat) * 1000:.2f} ms"
            )
            print(
                f"extra of /v1/messages over /run: p50 {statistics.median(extra_messages) * 1000:.2f} ms"
            )
            print(meter.report()[0])

            stamp = "[[fake:stamp:1:0]]"
            streams = {
                "/run stream": ("/run", {"prompt": stamp, "stream": True}),
                "chat stream": (
                    "/v1/chat/completions",
                    {**chat, "messages": [{"role": "user", "content": stamp}], "stream": True},
                ),
            }
            print(f"\n## 2. First token of a streamed reply, {rounds} rounds (ms)")
            for name, (path, body) in streams.items():
                firsts, lags = [], []
                for _ in range(rounds):
                    await ready()
                    first, lag = await first_chunk(client, path, body)
                    firsts.append(first)
                    lags.append(lag)
                print(f"{name}: request -> first text {fmt_dist('', dist(firsts))}")
                print(f"{'':>11}  agent wrote it -> client read it {fmt_dist('', dist(lags))}")

            largest = png(size=5 * 1024 * 1024)
            data = base64.b64encode(largest).decode()
            with_image = {"prompt": PROMPT, "images": [{"mediaType": "image/png", "data": data}]}
            url = f"data:image/png;base64,{data}"
            chat_image = {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": PROMPT},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ],
            }
            plain, pictured, chat_pictured = [], [], []
            image_rounds = max(5, rounds // 4)
            for _ in range(image_rounds):
                await ready()
                plain.append(await timed(lambda: client.post("/run", headers=AUTH, json=run)))
                await ready()
                pictured.append(
                    await timed(lambda: client.post("/run", headers=AUTH, json=with_image))
                )
                await ready()
                chat_pictured.append(
                    await timed(
                        lambda: client.post("/v1/chat/completions", headers=AUTH, json=chat_image)
                    )
                )
            print(
                f"\n## 3. The largest image accepted ({len(largest)} bytes), {image_rounds} rounds"
            )
            print(f"/run without: {fmt_dist('', dist(plain))}")
            print(f"/run with it: {fmt_dist('', dist(pictured))}")
            print(f"chat with it (data: URL): {fmt_dist('', dist(chat_pictured))}")
            cost = (statistics.median(pictured) - statistics.median(plain)) * 1000
            print(f"its cost: p50 {cost:.1f} ms")
            print(meter.report()[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    trio.run(main, parser.parse_args().rounds)
