"""A subscriber to `devices:presence` for tests: every event with its arrival time.

`settle()` publishes a sentinel and waits for it to come back, so "nothing more arrived"
is decided by ordering on the channel, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis

PRESENCE = "devices:presence"
CONTROL = "gateway:control"
SENTINEL = b"__test_sentinel__"
LISTEN_TIMEOUT = 10.0
Message = tuple[str, dict[str, Any]]
TIMEOUT = 5.0
POLL = 0.02


class Feed:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.marks: dict[str, asyncio.Event] = {}

    async def run(self) -> None:
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                event = orjson.loads(message["data"])
                if event.get("type") == "test_sentinel":
                    self.marks.pop(event["nonce"], asyncio.Event()).set()
                else:
                    self.events.append((time.monotonic(), event))

    def of(self, device_id: str, status: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for _, e in self.events
            if e.get("device_id") == device_id and status in (None, e.get("status"))
        ]

    def first(self, device_id: str, status: str) -> float:
        """When the first event of *status* for the device arrived (monotonic clock)."""
        return next(
            t
            for t, e in self.events
            if e.get("device_id") == device_id and e.get("status") == status
        )

    async def wait(self, device_id: str, status: str, within: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while not (found := self.of(device_id, status)):
            assert time.monotonic() < deadline, f"no {status} for {device_id}: {self.events}"
            await asyncio.sleep(POLL)
        return found[0]

    async def wait_all(self, ids: list[str], status: str, within: float) -> None:
        deadline = time.monotonic() + within
        while missing := [i for i in ids if not self.of(i, status)]:
            assert time.monotonic() < deadline, f"no {status} within {within} s for {missing}"
            await asyncio.sleep(POLL)

    async def settle(self) -> None:
        nonce = os.urandom(8).hex()
        arrived = self.marks[nonce] = asyncio.Event()
        await self.client.publish(PRESENCE, orjson.dumps({"type": "test_sentinel", "nonce": nonce}))
        await asyncio.wait_for(arrived.wait(), TIMEOUT)


@contextlib.asynccontextmanager
async def presence_feed(client: aioredis.Redis) -> AsyncIterator[Feed]:
    feed = Feed(client)
    await feed.pubsub.subscribe(PRESENCE)
    confirmation = await feed.pubsub.get_message(timeout=TIMEOUT)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    task = asyncio.create_task(feed.run())
    try:
        yield feed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await feed.pubsub.aclose()  # type: ignore[no-untyped-call]


class Listener:
    """A real pub/sub subscription; `drain()` returns everything published before now."""

    def __init__(self, client: aioredis.Redis, *channels: str) -> None:
        self.client = client
        self.channels = channels or (PRESENCE, CONTROL)
        self.pubsub = client.pubsub()

    async def __aenter__(self) -> Listener:
        await self.pubsub.subscribe(*self.channels)
        confirmed = 0
        while confirmed < len(self.channels):
            message = await self.pubsub.get_message(timeout=LISTEN_TIMEOUT)
            assert message is not None, "no subscribe confirmation"
            confirmed += message["type"] == "subscribe"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def next(self) -> Message:
        """The next message, waiting at most LISTEN_TIMEOUT."""
        async with asyncio.timeout(LISTEN_TIMEOUT):
            while True:
                message = await self.pubsub.get_message(timeout=LISTEN_TIMEOUT)
                if message is not None and message["type"] == "message":
                    return message["channel"].decode(), orjson.loads(message["data"])

    async def drain(self) -> list[Message]:
        """(channel, JSON body) of every message published so far, in order."""
        await self.client.publish(self.channels[0], SENTINEL)
        received: list[Message] = []
        async with asyncio.timeout(LISTEN_TIMEOUT):
            while True:
                message = await self.pubsub.get_message(timeout=LISTEN_TIMEOUT)
                if message is None or message["type"] != "message":
                    continue
                if message["data"] == SENTINEL:
                    return received
                received.append((message["channel"].decode(), orjson.loads(message["data"])))

    async def presence(self) -> list[dict[str, Any]]:
        return [body for channel, body in await self.drain() if channel == PRESENCE]
