#!/usr/bin/env python3
"""Hypercorn on trio with nothing behind it: the HTTP server's own cost.

bench_pool's in-run baseline for ``GET /health`` and ``POST /run``: the same
server, configured as the service configures it (no access log here), answering
every request with a constant JSON body once it has read the request's body. What
the service adds to a request is its time minus this one's.

    python bench/bare_http.py     # logs "listening on http://127.0.0.1:PORT" to stderr

Benchmarks start it with :func:`serving`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

if TYPE_CHECKING:
    from tests.support.harness import RunningService

BODY = b'{"status":"healthy"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def main() -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        (bound,) = await nursery.start(
            lambda task_status: serve(app, config, task_status=task_status)
        )
        print(f"listening on {bound}", file=sys.stderr, flush=True)


@asynccontextmanager
async def serving(
    env: Mapping[str, str], start_timeout_s: float = 30.0
) -> AsyncIterator[RunningService]:
    """This server, started with the tests' launcher (``env``: a service's, for its paths)."""
    from tests.support.harness import ROOT, launch_process

    async with launch_process(
        [sys.executable, str(Path(__file__).resolve())],
        env,
        cwd=ROOT,
        data_dir=Path(env["DATA_DIR"]),
        url_in=lambda line: line.split()[-1] if line.startswith("listening on ") else None,
        start_timeout_s=start_timeout_s,
    ) as bare:
        yield bare


if __name__ == "__main__":
    trio.run(main)
