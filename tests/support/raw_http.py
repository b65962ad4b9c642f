"""A raw HTTP/1.1 client for tests that need to see the connection itself.

httpx hides what these tests check: whether the server kept a connection open,
closed it, or answered bytes a well-behaved client would never send. Responses
are parsed just enough for the service's own answers (which always carry
``Content-Length``).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio

_open: set[RawConnection] = set()


async def close_all() -> None:
    """Close every connection still open (a test's teardown)."""
    while _open:
        with trio.CancelScope(shield=True):
            await _open.pop().stream.aclose()


@attrs.frozen
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class RawConnection:
    """One TCP connection to the service; send bytes, read whole responses.

    Every connection opened is remembered until closed, so a test's leftovers
    can be closed after it (:func:`close_all`) instead of left to the GC.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        connection = cls(await trio.open_tcp_stream(host.strip("[]"), int(port)))
        _open.add(connection)
        return connection

    async def aclose(self) -> None:
        _open.discard(self)
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def _receive(self) -> bool:
        """Read more into the buffer; False at end of stream or reset."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset by the peer
            return False
        self._buffer += data
        return bool(data)

    async def response(self) -> RawResponse | None:
        """The next whole response, or None if the server closed the connection first."""
        while b"\r\n\r\n" not in self._buffer:
            if not await self._receive():
                assert not self._buffer, f"connection closed mid-response: {self._buffer!r}"
                return None
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            assert await self._receive(), "connection closed mid-body"
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return RawResponse(int(status_line.split()[1]), headers, body)

    async def wait_closed(self) -> None:
        """Wait until the server closes the connection; it must send nothing more."""
        while await self._receive():
            pass
        assert not self._buffer, f"unexpected bytes before close: {self._buffer!r}"
