"""Cross-node delivery on one Redis: the one pub/sub connection of this process, supervised.

It listens to the control channel, the keyspace `expired` events of the URL's database, and
the command channel of every locally connected device (never to the fleet's presence channel:
dashboards read the event log). redis-py's PubSub does not reconnect by itself: when the
connection drops, this module reconnects with backoff, subscribes everything again and calls
`on_resubscribed`, so the hub can re-send what may have been published while nobody listened.
A cluster has its own broker (broker_cluster.py) with the same calls and handlers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.keys import Keys
from gateway.metrics import Metrics

log = logging.getLogger("gateway.broker")

SUBSCRIBE_CHUNK = 1000
MAX_BACKOFF = 5.0


class Deliveries(Protocol):
    """What a broker calls; each must return fast (enqueue, never await a socket)."""

    def on_command(self, device_id: str, data: bytes) -> None: ...
    def on_control(self, data: bytes) -> None: ...
    def on_expired(self, device_id: str) -> None: ...


# (device ids whose messages may have been lost; None: every local device)
Resubscribed = Callable[[Collection[str] | None], Awaitable[None]]


class DeviceSubscriber(Protocol):
    """A broker's device subscriptions (`Broker`, `ClusterBroker`)."""

    def subscribe_device(self, device_id: str) -> asyncio.Future[None]: ...
    def unsubscribe_device(self, device_id: str) -> None: ...


class DeviceChannels:
    """Counted interest in device command channels, over either broker.

    A device's channel is wanted by its live socket and, meanwhile, by callers waiting for
    one of its commands to finish: it stays subscribed until the last of them lets go. Every
    `subscribe` is paired with one `unsubscribe`.
    """

    def __init__(self, broker: DeviceSubscriber) -> None:
        self.broker = broker
        self._wanted: dict[str, int] = {}

    def subscribe(self, device_id: str) -> asyncio.Future[None]:
        """Listen to the device's channel; the future resolves once it is live."""
        self._wanted[device_id] = self._wanted.get(device_id, 0) + 1
        return self.broker.subscribe_device(device_id)

    def unsubscribe(self, device_id: str) -> None:
        left = self._wanted.get(device_id, 0) - 1
        if left > 0:
            self._wanted[device_id] = left
            return
        self._wanted.pop(device_id, None)
        self.broker.unsubscribe_device(device_id)


class Broker:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        db: int,
        deliveries: Deliveries,
        on_resubscribed: Resubscribed,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.metrics = metrics or Metrics()
        self.keys = keys
        self.deliveries = deliveries
        self.on_resubscribed = on_resubscribed
        part = keys.part(0)
        self.base_channels = [part.control_channel, keys.expired_channel(db)]
        self.expired_channel = keys.expired_channel(db).encode()
        self.control_channel = part.control_channel.encode()
        self._devices: set[str] = set()
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._live: set[str] = set()
        self._changed = asyncio.Event()
        self._pubsub: PubSub | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0

    # --- subscriptions, batched --------------------------------------------
    def subscribe_device(self, device_id: str) -> asyncio.Future[None]:
        """Listen to the device's command channel; the future resolves once it is live, so a
        desired state read after it can miss no change published before."""
        self._devices.add(device_id)
        self._to_unsubscribe.discard(device_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if device_id in self._live:
            waiter.set_result(None)
            return waiter
        self._waiters.setdefault(device_id, []).append(waiter)
        self._to_subscribe.add(device_id)
        self._changed.set()
        return waiter

    def unsubscribe_device(self, device_id: str) -> None:
        self._devices.discard(device_id)
        self._live.discard(device_id)
        for waiter in self._waiters.pop(device_id, []):  # nobody waits for it any more
            if not waiter.done():
                waiter.set_result(None)
        self._to_subscribe.discard(device_id)
        self._to_unsubscribe.add(device_id)
        self._changed.set()

    async def _apply_changes(self, pubsub: PubSub) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            subscribe, self._to_subscribe = self._to_subscribe, set()
            unsubscribe, self._to_unsubscribe = self._to_unsubscribe, set()
            for chunk in _chunks([self.keys.commands(d) for d in subscribe]):
                await pubsub.subscribe(*chunk)
            for chunk in _chunks([self.keys.commands(d) for d in unsubscribe]):
                await pubsub.unsubscribe(*chunk)

    # --- the supervised loop -------------------------------------------------
    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff whenever the connection fails."""
        backoff = 0.1
        first = True
        while True:
            pubsub = self.redis.pubsub()
            self._pubsub = pubsub
            self._live.clear()
            try:
                await pubsub.subscribe(*self.base_channels)
                # every device channel is listened to again before the re-sync reads desired
                # states: a change published in between is then either read or delivered
                self._to_subscribe.clear()
                for chunk in _chunks([self.keys.commands(d) for d in self._devices]):
                    await pubsub.subscribe(*chunk)
                self.connected.set()
                if not first:
                    self.reconnects += 1
                    self.metrics.resubscriptions.labels("link_failed").inc()
                    log.info("pub/sub reconnected; resubscribed %d devices", len(self._devices))
                    await self.on_resubscribed(None)
                first = False
                backoff = 0.1
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._apply_changes(pubsub))
                    group.create_task(self._listen(pubsub))
            except* Exception as group_error:
                self.connected.clear()
                log.warning(
                    "pub/sub connection lost (%s); reconnecting in %.1f s",
                    group_error.exceptions[0],
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                self.connected.clear()
                self._pubsub = None
                await _close_quietly(pubsub)

    async def _listen(self, pubsub: PubSub) -> None:
        # get_message with a timeout instead of listen(): it raises when the connection drops
        # instead of ending quietly, so the supervisor above always notices.
        while True:
            if not pubsub.subscribed:
                await asyncio.sleep(0.01)
                continue
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            if message.get("type") == "message":
                self._dispatch(message)
            elif message.get("type") == "subscribe":
                self._confirmed(message["channel"])

    def _confirmed(self, channel: bytes) -> None:
        device_id = self.keys.device_from_commands(channel.decode())
        if device_id is None or device_id not in self._devices:
            # unsubscribed since this SUBSCRIBE went out: an UNSUBSCRIBE follows it, so the
            # channel is not live, and the device's next session must subscribe again
            return
        self._live.add(device_id)
        for waiter in self._waiters.pop(device_id, []):
            if not waiter.done():
                waiter.set_result(None)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel: bytes = message["channel"]
        data: bytes = message["data"]
        try:
            if channel == self.expired_channel:
                device_id = self.keys.device_from_heartbeat(data.decode())
                if device_id is not None:
                    self.deliveries.on_expired(device_id)
            elif channel == self.control_channel:
                self.deliveries.on_control(data)
            else:
                device_id = self.keys.device_from_commands(channel.decode())
                if device_id is not None:
                    self.deliveries.on_command(device_id, data)
        except Exception:  # one bad message must never stop delivery to everyone else
            log.exception("failed to dispatch a message on %r", channel[:80])


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + SUBSCRIBE_CHUNK] for i in range(0, len(items), SUBSCRIBE_CHUNK)]


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    except Exception:  # the connection is already broken; nothing to release cleanly
        log.debug("closing a broken pub/sub connection failed", exc_info=True)
