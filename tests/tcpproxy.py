"""A small asyncio TCP proxy for fault tests: pause and resume traffic, delay replies, cut links.

    async with TcpProxy("127.0.0.1", redis_port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"   # point the gateway here
        proxy.pause()          # bytes stop flowing both ways (connections stay open: a stall)
        proxy.resume()         # everything held back flows again, in order
        proxy.reply_delay = 0.3  # every upstream → client chunk waits this long (a slow link)
        await proxy.cut()      # abort every live connection (a network partition, RST)

Each direction of each connection is one pump task that forwards chunks strictly in order, so
a delay or a pause never reorders bytes: what a client reads is exactly what the server wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK = 1 << 16


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.reply_delay = 0.0  # seconds each upstream → client chunk is held
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def pause(self) -> None:
        """Stop forwarding in both directions; connections stay open (a stall, not a drop)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def cut(self) -> None:
        """Abort every live connection (both sides see a reset); new ones are still accepted."""
        links = list(self._links)
        for link in links:
            link.abort()
        for link in links:
            for task in link.tasks:
                task.cancel()
            for task in link.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def aclose(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, 0.0, link)),
            asyncio.create_task(self._pump(up_reader, writer, None, link)),
        ]

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        delay: float | None,
        link: _Link,
    ) -> None:
        """Forward chunks in order; *delay* None means "use the current reply_delay"."""
        try:
            while True:
                chunk = await source.read(CHUNK)
                if not chunk:
                    break
                wait = self.reply_delay if delay is None else delay
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # one side ended: end the whole link, like a real middlebox losing its state
            self._links.discard(link)
            link.abort()
