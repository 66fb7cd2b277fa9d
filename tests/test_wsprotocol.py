"""The WebSocket protocol's read back-pressure, on a real uvicorn server and a real client.

An app that stops reading must stop the socket being read (bounded unread messages); an app
that keeps up must never pause it, and every message must arrive in order either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
import websockets

from gateway.embedded import find_free_port
from gateway.wsprotocol import READ_HIGH_WATER, WebSocketProtocol

MESSAGES = 200


class Probe:
    """An ASGI app that accepts one socket and reads only when told to."""

    def __init__(self) -> None:
        self.protocol: WebSocketProtocol | None = None
        self.reading = asyncio.Event()
        self.received: list[str] = []
        self.pauses = 0
        self.done = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.protocol = receive.__self__  # the connection's protocol object
        pause = self.protocol.transport.pause_reading

        def counted_pause() -> None:
            self.pauses += 1
            pause()

        self.protocol.transport.pause_reading = counted_pause
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            await self.reading.wait()
            message = await receive()
            if message["type"] != "websocket.receive":
                break
            self.received.append(message["text"])
            if len(self.received) == MESSAGES:
                self.done.set()


@contextlib.asynccontextmanager
async def serving(app: Probe) -> AsyncIterator[int]:
    port = find_free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", ws=WebSocketProtocol
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # the server failed to start: say why
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_a_stalled_app_pauses_reading_at_the_high_water_mark() -> None:
    app = Probe()
    async with serving(app) as port, websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        for n in range(MESSAGES):
            await ws.send(f"m{n}")
        await asyncio.sleep(0.3)  # the server has read what the kernel gave it, then paused
        assert app.protocol is not None
        assert not app.protocol.transport.is_reading()
        # one read may carry several frames, all queued before the pause takes effect
        assert READ_HIGH_WATER <= app.protocol.queue.qsize() < MESSAGES
        app.reading.set()
        await asyncio.wait_for(app.done.wait(), 5)
        assert app.received == [f"m{n}" for n in range(MESSAGES)]
        assert app.protocol.transport.is_reading()


async def test_an_app_that_keeps_up_is_never_paused() -> None:
    app = Probe()
    app.reading.set()
    async with serving(app) as port, websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        for n in range(MESSAGES):
            await ws.send(f"m{n}")
            await asyncio.sleep(0)  # one frame at a time, as a device sends them
        await asyncio.wait_for(app.done.wait(), 5)
        assert app.received == [f"m{n}" for n in range(MESSAGES)]
        assert app.pauses == 0
