"""A small server-sent-events reader over an httpx streaming response, for tests and benchmarks.

It parses what a browser's ``EventSource`` would (``id:``, ``event:``, ``data:``
lines, a blank line ending an event, ``:`` comments) and keeps what a test
wants to check: each event's id, name, decoded JSON data and when it arrived
(``time.monotonic()``), and the comment lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx

TERMINAL = ("result", "error")


@attrs.frozen
class Event:
    id: str | None
    name: str
    data: Any  # the JSON of its data lines
    at: float  # time.monotonic() when its last line arrived


@attrs.define
class Comments:
    lines: list[str] = attrs.Factory(list)


async def events(
    response: httpx.Response, comments: Comments | None = None
) -> AsyncIterator[Event]:
    """Every event of ``response`` as it arrives (the caller may stop early)."""
    fields: dict[str, list[str]] = {}
    async for line in response.aiter_lines():
        if line == "":
            if fields:
                data = "\n".join(fields.get("data", []))
                yield Event(
                    id=(fields.get("id") or [None])[-1],
                    name=(fields.get("event") or ["message"])[-1],
                    data=json.loads(data) if data else None,
                    at=time.monotonic(),
                )
            fields = {}
        elif line.startswith(":"):
            if comments is not None:
                comments.lines.append(line)
        else:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


async def read_all(response: httpx.Response, comments: Comments | None = None) -> list[Event]:
    """Every event up to the end of the stream (which must end after its terminal one)."""
    return [event async for event in events(response, comments)]


async def stream_run(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> tuple[httpx.Response, list[Event]]:
    """POST /run with ``stream: true``; the response (read) and its events."""
    async with client.stream("POST", "/run", headers=headers, json={**body, "stream": True}) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r, await read_all(r)
        await r.aread()
        return r, []
