"""A fake Claude OAuth token endpoint on 127.0.0.1, for tests.

It records every request body (JSON) and answers what the test set: a grant of
fresh tokens (each one numbered, so rotation shows), an error status, or no
answer at all (``hang``). HTTP/1.1 parsed just enough for what httpx sends.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio


@attrs.define(eq=False)
class FakeTokenEndpoint:
    """Serve with ``await nursery.start(endpoint.serve)``; then ``endpoint.url``."""

    # What to answer: None grants tokens; (status, body) answers that; "hang" never answers.
    answer: tuple[int, Any] | str | None = None
    expires_in: int = 3600
    scope: str | None = "user:inference user:profile"
    rotate: bool = True  # grant a new refresh token with every answer
    delay_s: float = 0.0  # how long it takes to answer (a request arrives, then it waits)
    requests: list[dict[str, Any]] = attrs.Factory(list)
    issued: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/oauth/token"

    def grant(self) -> dict[str, Any]:
        self.issued += 1
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": f"access-{self.issued}",
            "expires_in": self.expires_in,
        }
        if self.rotate:
            body["refresh_token"] = f"refresh-{self.issued}"
        if self.scope is not None:
            body["scope"] = self.scope
        return body

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += await stream.receive_some(65536)
            self.requests.append(json.loads(body or b"null"))
            if self.answer == "hang":
                await trio.sleep_forever()
            await trio.sleep(self.delay_s)
            status, reply = (200, self.grant()) if self.answer is None else self.answer
            payload = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
            await stream.send_all(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(payload), payload)
            )
