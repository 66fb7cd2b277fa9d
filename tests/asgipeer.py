"""An in-memory ASGI peer for one WebSocket: no server, no socket.

Starlette's TestClient does the same: a `WebSocket` over a receive queue and a send callable.
This peer records what the app sends, can stall frames (a peer that stopped reading) or fail
them (a peer that went away), and stands in for the server's protocol object, so the gateway's
abort of a stalled connection reaches `transport.abort()` here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Message
from starlette.websockets import WebSocket

from gateway import compat

SETTLE_TIMEOUT = 1.0  # what a passing check waits is microseconds; a failing one stops here


class Transport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


class Peer:
    """The server side of one accepted socket."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.transport = Transport()
        self.reading = asyncio.Event()  # cleared: frames wait, as they would for a full TCP window
        self.reading.set()
        self.gone = False  # True: every send fails, as uvicorn's does once the peer is gone
        self.waiting = 0  # frames held up by a peer that stopped reading
        self.refused = 0  # sends that failed because the peer was gone
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()

    async def receive(self) -> Message:
        return await self._inbox.get()

    async def send(self, message: Message) -> None:
        if self.gone:
            self.refused += 1
            raise OSError("connection reset by peer")
        if message["type"] == "websocket.send" and not self.reading.is_set():
            self.waiting += 1
            try:
                await self.reading.wait()
            finally:
                self.waiting -= 1
        self.messages.append(message)

    @property
    def frames(self) -> list[str | bytes]:
        """What the app sent as data frames, in order."""
        sent = [m for m in self.messages if m["type"] == "websocket.send"]
        return [m["text"] if "text" in m else m["bytes"] for m in sent]

    @property
    def closes(self) -> list[tuple[int, str]]:
        return [(m["code"], m["reason"]) for m in self.messages if m["type"] == "websocket.close"]

    @property
    def after_accept(self) -> list[Message]:
        return [m for m in self.messages if m["type"] != "websocket.accept"]


async def accepted(peer: Peer) -> WebSocket:
    """A Starlette WebSocket over *peer*, accepted as an endpoint would."""
    scope = {"type": "websocket", "path": "/ws", "headers": [], compat.RAW_SEND: peer.send}
    websocket: WebSocket = WebSocket(scope, peer.receive, peer.send)
    peer._inbox.put_nowait({"type": "websocket.connect"})
    await websocket.accept()
    return websocket


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until *condition* holds (a few iterations when all is well).

    The conditions are plain state of the code under test, with no event to wait on: each
    turn of the loop lets its tasks run once.
    """
    async with asyncio.timeout(SETTLE_TIMEOUT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)
