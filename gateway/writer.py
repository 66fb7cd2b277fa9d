"""Per-socket bounded send queue; the only caller of send.

Fan-out enqueues and never awaits a socket. A sender task exists only while frames are
queued, so an idle socket costs no task. A queue that fills means the peer cannot keep up:
it is dropped (4408), never buffered without limit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram
from starlette.websockets import WebSocket

from gateway import compat, disconnect

log = logging.getLogger("gateway.writer")
CLOSE_TIMEOUT = 2.0


class Relay:
    """A relayed message's arrival (`time.perf_counter()`), observed once its frame is written."""

    __slots__ = ("histogram", "since")

    def __init__(self, since: float, histogram: Histogram) -> None:
        self.since = since
        self.histogram = histogram

    def written(self) -> None:
        self.histogram.observe(time.perf_counter() - self.since)


class Writer:
    __slots__ = (
        "_closing",
        "_queue",
        "_task",
        "closed",
        "limit",
        "on_overflow",
        "sent",
        "websocket",
    )

    def __init__(
        self, websocket: WebSocket, limit: int, on_overflow: Callable[[], None] | None = None
    ) -> None:
        self.websocket = websocket
        self.limit = limit
        self.on_overflow = on_overflow
        # made on first use: most device sockets are idle, and an empty deque costs 600 bytes
        self._queue: collections.deque[tuple[bytes, Relay | None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.closed = False
        self.sent = 0

    def send(self, frame: bytes, relay: Relay | None = None) -> bool:
        """Queue a frame; False (and the socket dropped) when the queue is full.

        A *relay* is told when the frame has been written to the socket.
        """
        if self.closed:
            return False
        if self._queue is None:
            self._queue = collections.deque()
        if len(self._queue) >= self.limit:
            self.close(disconnect.TOO_SLOW)
            if self.on_overflow:
                self.on_overflow()
            return False
        self._queue.append((frame, relay))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return True

    async def _drain(self) -> None:
        try:
            while self._queue:
                frame, relay = self._queue.popleft()
                # relayed command messages are anyone's bytes: text when they are UTF-8,
                # else passed on as they are, in a binary frame
                message: dict[str, Any]
                try:
                    message = {"type": "websocket.send", "text": frame.decode()}
                except UnicodeDecodeError:
                    message = {"type": "websocket.send", "bytes": frame}
                await self.websocket.send(message)
                self.sent += 1
                if relay is not None:
                    relay.written()
        except Exception:  # the peer went away: the reader sees the disconnect and cleans up
            self._queue = None
        finally:
            self._task = None
            if not self._queue:
                self._queue = None

    def close(self, close: disconnect.Close) -> None:
        """Close once: queued frames are dropped; a stalled peer is aborted, not awaited."""
        if self.closed:
            return
        self.closed = True
        if close.code == disconnect.TOO_SLOW.code:
            self._queue = None
            if self._task is not None:
                self._task.cancel()
        self._closing = asyncio.create_task(self._close(close))

    async def _close(self, close: disconnect.Close) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self._task is not None:  # frames queued before the close go first
                    await asyncio.wait([self._task])
                await self.websocket.close(close.code, close.reason)
        except TimeoutError:
            compat.abort(self.websocket)
        except Exception:  # already closed or gone: nothing left to tell the peer
            compat.abort(self.websocket)

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await asyncio.wait([self._closing])
