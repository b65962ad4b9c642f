"""Request bodies and JSON replies: how long a body may take, parsing it, writing JSON.

A body may take :data:`BODY_TIMEOUT_S` to arrive (then 408). A body with images is
up to ``max_body_bytes`` (~28 MiB with the defaults): decoding its JSON and checking
each image's base64 takes ~2 ms per MiB of CPU, which on the event loop would stall
every other request and stream for as long. Such a body is parsed in a worker
thread; a small one (almost every request) right here, where a thread hop would cost
more than the parse. Replies written without Quart's ``jsonify`` are written as it
writes them (:func:`json_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import trio

# Quart's default BODY_TIMEOUT: how long a request body may take to arrive.
BODY_TIMEOUT_S = 60.0
# Bodies above this are parsed in a worker thread (~2 ms of parsing and more).
LARGE_BODY_BYTES = 1024 * 1024

T = TypeVar("T")


async def parse_body(body: bytes, parse: Callable[[bytes], T]) -> T:
    """``parse(body)``, in a worker thread when ``body`` is large; its exceptions propagate."""
    if len(body) <= LARGE_BODY_BYTES:
        return parse(body)
    return await trio.to_thread.run_sync(parse, body)


def json_bytes(value: Any, *, sort_keys: bool = True) -> bytes:
    """JSON as Quart's ``jsonify`` writes it: sorted keys, compact, ASCII, a final newline.

    ``sort_keys=False`` keeps the keys in their order (a run's result: see README)."""
    return (json.dumps(value, sort_keys=sort_keys, separators=(",", ":")) + "\n").encode()
