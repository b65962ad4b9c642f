"""Small valid images for the tests and benchmarks, made here (no files checked in)."""

from __future__ import annotations

import base64
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png(width: int = 1, height: int = 1, *, size: int | None = None) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` red pixels; ``size``: padded to exactly
    that many bytes with a text chunk (readers skip it)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
    end = _chunk(b"IEND", b"")
    if size is not None:
        padding = size - len(head) - len(end) - 12 - len(b"Comment\x00")
        assert padding >= 0, f"a {width}x{height} PNG needs more than {size} bytes"
        head += _chunk(b"tEXt", b"Comment\x00" + b"x" * padding)
    return head + end


# A 1x1 baseline JPEG (the smallest common form), and a 1x1 GIF.
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////////////////////"
    "////////////////////////////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/a"
    "AAgBAQABPxA="
)
GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{b64(data)}"
