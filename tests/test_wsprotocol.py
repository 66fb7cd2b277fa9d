"""The gateway's WebSocket protocol on a real uvicorn server and real clients.

Read back-pressure: an app that stops reading must stop the socket being read (bounded
unread messages); an app that keeps up must never pause it, and every message must arrive in
order either way. Closing: a refused handshake is no error, and a peer that never answers a
close frame is dropped after `CLOSE_TIMEOUT`, not kept for uvicorn's 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
import websockets
from rawws import RawSocket
from websockets.exceptions import InvalidStatus

from gateway.embedded import find_free_port
from gateway.wsprotocol import CLOSE_TIMEOUT, READ_HIGH_WATER, WebSocketProtocol

MESSAGES = 200


async def lifespan(receive: Any, send: Any) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


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
            await lifespan(receive, send)
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


async def refuser(scope: Any, receive: Any, send: Any) -> None:
    """Denies every handshake with a JSON 403, as Starlette's `send_denial_response` does."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    assert (await receive())["type"] == "websocket.connect"
    headers = [(b"content-type", b"application/json")]
    await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": b'{"detail":"no"}'})


async def closer(scope: Any, receive: Any, send: Any) -> None:
    """Accepts, then closes with 4429 at once, and returns."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 4429, "reason": "rate_limited"})


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[int]:
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


async def test_a_denied_handshake_logs_no_error() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    logger = logging.getLogger("uvicorn.error")
    async with serving(refuser) as port:
        logger.addHandler(handler)  # after the server's start: its logging set-up drops handlers
        try:
            for _ in range(3):
                with pytest.raises(InvalidStatus) as denied:
                    async with websockets.connect(f"ws://127.0.0.1:{port}"):
                        pass
                assert denied.value.response.status_code == 403
                assert denied.value.response.body == b'{"detail":"no"}'
            await asyncio.sleep(0.2)  # the app calls have returned
        finally:
            logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == []


async def test_a_peer_that_never_answers_a_close_is_dropped_after_the_close_timeout() -> None:
    async with serving(closer) as port:
        peer = await RawSocket.open(port, "/")
        try:
            assert await peer.close_frame() == (4429, "rate_limited")
            assert await peer.seconds_until_dropped() < CLOSE_TIMEOUT + 2
        finally:
            peer.close()


async def test_a_peer_that_answers_the_close_is_let_go_at_once() -> None:
    async with serving(closer) as port, websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(ws.wait_closed(), CLOSE_TIMEOUT + 2)
        assert ws.close_code == 4429
        assert loop.time() - start < CLOSE_TIMEOUT / 2
