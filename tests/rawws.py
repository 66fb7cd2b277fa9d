"""A WebSocket client spoken by hand, for peers no client library would be: one that never
answers a close frame, keeps sending after it, or stops reading. Real TCP, no mocks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time

TIMEOUT = 5.0
TEXT = 0x1
CLOSE = 0x8


class RawSocket:
    """One client connection past the handshake: it sends what it likes and answers nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, token: str | None = None) -> RawSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        """One masked frame, as a client must send it."""
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: opcode and payload."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(size)

    async def close_frame(self) -> tuple[int, str]:
        """Read up to the server's close frame: its code and reason."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                opcode, payload = await self.frame()
                if opcode == CLOSE:
                    return close_of(payload)

    async def seconds_until_dropped(self) -> float:
        """How long the server keeps the TCP connection once we stop short of answering."""
        start = time.monotonic()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(3 * TIMEOUT):
                while await self.reader.read(1 << 16):
                    pass
        return time.monotonic() - start

    def close(self) -> None:
        self.writer.close()


def close_of(payload: bytes) -> tuple[int, str]:
    """A close frame's code and reason."""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode()
