"""Subscribers for tests: the presence feed with every event's arrival time, and a listener that
collects what was published on some channels.

"Nothing more arrived" is decided by ordering, never by sleeping: `settle()` publishes a
sentinel on every connection and waits for each to come back. On a cluster, channels are
sharded: each is subscribed (SSUBSCRIBE) on the primary that owns it, one connection per
primary, so order holds per connection (per partition, hence per device), not across them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
from backends import Client, layout_of
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.keys import Keys

SENTINEL_TYPE = "test_sentinel"
LISTEN_TIMEOUT = 10.0
Message = tuple[str, dict[str, Any]]
POLL = 0.02


class _Link:
    """One subscribing connection and the channel its sentinels go to."""

    def __init__(
        self, pubsub: PubSub, publisher: aioredis.Redis, channel: str, sharded: bool
    ) -> None:
        self.pubsub = pubsub
        self.publisher = publisher
        self.channel = channel
        self.sharded = sharded

    async def publish(self, data: bytes) -> None:
        command = "SPUBLISH" if self.sharded else "PUBLISH"
        await self.publisher.execute_command(command, self.channel, data)


class Subscription:
    """*channels* subscribed on one node, or each on its primary of a cluster; messages are
    queued as (arrival time, channel, data) by one reader task per connection."""

    def __init__(self, client: Client, channels: Iterable[str]) -> None:
        self.client = client
        self.channels = list(dict.fromkeys(channels))
        self.queue: asyncio.Queue[tuple[float, str, bytes]] = asyncio.Queue()
        self._links: list[_Link] = []
        self._own: list[aioredis.Redis] = []  # per-primary clients, closed with the subscription
        self._tasks: list[asyncio.Task[None]] = []
        self._marks: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> Subscription:
        try:
            if isinstance(self.client, RedisCluster):
                await self._open_sharded(self.client)
            else:
                await self._open(self.client, self.channels, sharded=False)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _open_sharded(self, cluster: RedisCluster) -> None:
        by_node: dict[str, list[str]] = {}
        nodes = {}
        for channel in self.channels:
            node = cluster.get_node_from_key(channel)
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(channel)
        for name, channels in by_node.items():
            node = nodes[name]
            own = aioredis.Redis(host=node.host, port=node.port, socket_timeout=LISTEN_TIMEOUT)
            self._own.append(own)
            await self._open(own, channels, sharded=True)

    async def _open(self, client: aioredis.Redis, channels: list[str], sharded: bool) -> None:
        pubsub = client.pubsub()
        if sharded:  # one SSUBSCRIBE per slot: a sharded subscription never crosses slots
            by_slot: dict[int, list[str]] = {}
            for channel in channels:
                by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
            for same_slot in by_slot.values():
                await pubsub.ssubscribe(*same_slot)
        else:
            await pubsub.subscribe(*channels)
        confirmed = 0
        while confirmed < len(channels):
            message = await pubsub.get_message(timeout=LISTEN_TIMEOUT)
            assert message is not None, "no subscribe confirmation"
            confirmed += message["type"] in ("subscribe", "ssubscribe")
        link = _Link(pubsub, client, channels[0], sharded)
        self._links.append(link)
        self._tasks.append(asyncio.create_task(self._read(link)))

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for link in self._links:
            await link.pubsub.aclose()  # type: ignore[no-untyped-call]
        for own in self._own:
            await own.aclose()

    async def _read(self, link: _Link) -> None:
        while True:
            message = await link.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message["type"] not in ("message", "smessage"):
                continue
            data: bytes = message["data"]
            if data.startswith(b'{"type":"' + SENTINEL_TYPE.encode()):
                self._marks.pop(orjson.loads(data)["nonce"], asyncio.Event()).set()
                continue
            channel = message["channel"].decode()
            self.queue.put_nowait((time.monotonic(), channel, data))

    async def settle(self) -> None:
        """Return once everything published before this call has been queued."""
        arrivals = []
        for link in self._links:
            nonce = os.urandom(8).hex()
            arrived = self._marks[nonce] = asyncio.Event()
            await link.publish(orjson.dumps({"type": SENTINEL_TYPE, "nonce": nonce}))
            arrivals.append(arrived.wait())
        await asyncio.wait_for(asyncio.gather(*arrivals), LISTEN_TIMEOUT)

    def taken(self) -> list[tuple[float, str, bytes]]:
        """Everything queued so far, removed from the queue."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class Feed:
    """Every presence event of every partition, with the time it arrived."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.events: list[tuple[float, dict[str, Any]]] = []

    async def run(self) -> None:
        while True:
            arrived, _, data = await self.subscription.queue.get()
            self.events.append((arrived, orjson.loads(data)))
            self.subscription.queue.task_done()

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
        await self.subscription.settle()
        await self.subscription.queue.join()  # and the feed task has taken all of it


@contextlib.asynccontextmanager
async def presence_feed(client: Client, keys: Keys | None = None) -> AsyncIterator[Feed]:
    """The presence channel of every partition of *keys* (by default the client's layout)."""
    keys = keys or layout_of(client)
    channels = [part.presence_channel for part in keys.parts]
    async with Subscription(client, channels) as subscription:
        feed = Feed(subscription)
        task = asyncio.create_task(feed.run())
        try:
            yield feed
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Listener:
    """A real pub/sub subscription; `drain()` returns everything published before now.

    With no channels: the presence and control channels of every partition of *keys* (by
    default the client's layout).
    """

    def __init__(self, client: Client, *channels: str, keys: Keys | None = None) -> None:
        self.keys = keys or layout_of(client)
        self.presence_channels = {part.presence_channel for part in self.keys.parts}
        self.control_channels = {part.control_channel for part in self.keys.parts}
        wanted = channels or [*sorted(self.presence_channels), *sorted(self.control_channels)]
        self.subscription = Subscription(client, wanted)

    async def __aenter__(self) -> Listener:
        await self.subscription.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.subscription.__aexit__()

    async def next(self) -> Message:
        """The next message, waiting at most LISTEN_TIMEOUT."""
        _, channel, data = await asyncio.wait_for(self.subscription.queue.get(), LISTEN_TIMEOUT)
        return channel, orjson.loads(data)

    async def drain(self) -> list[Message]:
        """(channel, JSON body) of every message published so far, in order per connection."""
        await self.subscription.settle()
        return [(channel, orjson.loads(data)) for _, channel, data in self.subscription.taken()]

    async def presence(self) -> list[dict[str, Any]]:
        return [body for channel, body in await self.drain() if channel in self.presence_channels]

    async def control(self) -> list[dict[str, Any]]:
        return [body for channel, body in await self.drain() if channel in self.control_channels]
