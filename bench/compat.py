"""What the compatible routes and images cost over a plain ``POST /run``.

The service with the fake CLI, one request at a time, the worker warm before each, the
routes in alternation: 1. a chat completion and ``/v1/messages`` against ``/run`` (the
extra: p50 of the per-round differences); 2. the first content of a streamed reply, from
the request and from the agent writing it (a ``CLOCK_MONOTONIC`` stamp); 3. ``/run``
with the largest image accepted against without (``bench/README.md``).

    .venv/bin/python -m bench.compat --rounds 100
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from typing import Any

import httpx
import trio

from bench.service import AUTH, PROMPT, bench_env, workdir
from bench.stats import QuietMeter, dist, fmt_dist
from tests.support.harness import RunningService, launch_service, wait_healthy
from tests.support.images import png

MODEL = "claude-sonnet-4-6"


async def timed_post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> float:
    """The seconds a POST that must answer 200 took."""
    started = time.perf_counter()
    response = await client.post(path, headers=AUTH, json=body)
    took = time.perf_counter() - started
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


def chat_body(content: Any, **more: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **more}


async def routes(service: RunningService, client: httpx.AsyncClient, rounds: int) -> None:
    """1: the same prompt on /run, a chat completion and /v1/messages, in alternation."""
    bodies = {
        "run": ("/run", {"prompt": PROMPT}),
        "chat": ("/v1/chat/completions", chat_body(PROMPT)),
        "messages": ("/v1/messages", chat_body(PROMPT, max_tokens=100)),
    }
    times: dict[str, list[float]] = {name: [] for name in bodies}
    for number in range(rounds):
        for name in list(bodies)[:: -1 if number % 2 else 1]:
            await wait_healthy(service, ready=1, timeout=30)
            path, body = bodies[name]
            times[name].append(await timed_post(client, path, body))
    print(f"## 1. The same prompt, {rounds} rounds, one request at a time (ms)")
    for name, values in times.items():
        print(f"{name:>9}: {fmt_dist('', dist(values))}")
    for name, path in (("chat", "/v1/chat/completions"), ("messages", "/v1/messages")):
        extra = [a - b for a, b in zip(times[name], times["run"], strict=True)]
        print(f"extra of {path} over /run: p50 {statistics.median(extra) * 1000:.2f} ms")


async def first_tokens(service: RunningService, client: httpx.AsyncClient, rounds: int) -> None:
    """2: the first content of a streamed reply, from the request and from the agent."""
    stamp = "[[fake:stamp:1:0]]"
    streams = {
        "/run stream": ("/run", {"prompt": stamp, "stream": True}),
        "chat stream": ("/v1/chat/completions", chat_body(stamp, stream=True)),
    }
    print(f"\n## 2. First token of a streamed reply, {rounds} rounds (ms)")
    for name, (path, body) in streams.items():
        firsts, lags = [], []
        for _ in range(rounds):
            await wait_healthy(service, ready=1, timeout=30)
            first, lag = await first_chunk(client, path, body)
            firsts.append(first)
            lags.append(lag)
        print(f"{name}: request -> first text {fmt_dist('', dist(firsts))}")
        print(f"{'':>11}  agent wrote it -> client read it {fmt_dist('', dist(lags))}")


async def largest_image(service: RunningService, client: httpx.AsyncClient, rounds: int) -> None:
    """3: /run with the largest image accepted against without, and a chat with it."""
    largest = png(size=5 * 1024 * 1024)
    data = base64.b64encode(largest).decode()
    image_url = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    bodies = {
        "/run without": ("/run", {"prompt": PROMPT}),
        "/run with it": (
            "/run",
            {"prompt": PROMPT, "images": [{"mediaType": "image/png", "data": data}]},
        ),
        "chat with it (data: URL)": (
            "/v1/chat/completions",
            chat_body([{"type": "text", "text": PROMPT}, image_url]),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in bodies}
    image_rounds = max(5, rounds // 4)
    for _ in range(image_rounds):
        for name, (path, body) in bodies.items():
            await wait_healthy(service, ready=1, timeout=30)
            times[name].append(await timed_post(client, path, body))
    print(f"\n## 3. The largest image accepted ({len(largest)} bytes), {image_rounds} rounds")
    for name, values in times.items():
        print(f"{name}: {fmt_dist('', dist(values))}")
    cost = statistics.median(times["/run with it"]) - statistics.median(times["/run without"])
    print(f"its cost: p50 {cost * 1000:.1f} ms")


async def main(rounds: int) -> None:
    with workdir("bench-compat-") as where:
        env = bench_env(where, {"POOL_SIZE": "1"})
        async with launch_service(env) as service, service.client() as client:
            await wait_healthy(service, ready=1)
            meter = QuietMeter(service.pid)
            await routes(service, client, rounds)
            print(meter.report()[0])
            await first_tokens(service, client, rounds)
            await largest_image(service, client, rounds)
            print(meter.report()[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    trio.run(main, parser.parse_args().rounds)
