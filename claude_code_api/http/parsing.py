"""Parsing a large request body off the event loop.

A body with images is up to ``max_body_bytes`` (~28 MiB with the defaults): decoding
its JSON and checking each image's base64 takes ~2 ms per MiB of CPU, which on the
event loop would stall every other request and stream for as long. Such a body is
parsed in a worker thread; a small one (almost every request) right here, where a
thread hop would cost more than the parse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

# Bodies above this are parsed in a worker thread (~2 ms of parsing and more).
LARGE_BODY_BYTES = 1024 * 1024

T = TypeVar("T")


async def parse_body(body: bytes, parse: Callable[[bytes], T]) -> T:
    """``parse(body)``, in a worker thread when ``body`` is large; its exceptions propagate."""
    if len(body) <= LARGE_BODY_BYTES:
        return parse(body)
    return await trio.to_thread.run_sync(parse, body)
