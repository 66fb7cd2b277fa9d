"""The brokers' dispatch and subscription bookkeeping, fed the messages redis-py would hand them.

No connection is made: the Redis clients are built and never used, and each message is the
dict `PubSub.get_message` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.broker import Broker
from gateway.broker_cluster import ClusterBroker, _Link
from gateway.keys import Keys

pytestmark = pytest.mark.unit

PARTITIONS = 4


class Deliveries:
    """What the hub and presence engine would be told, in order."""

    def __init__(self, failing: str = "") -> None:
        self.calls: list[tuple[str, Any]] = []
        self.failing = failing

    def on_command(self, device_id: str, data: bytes) -> None:
        if device_id == self.failing:
            raise RuntimeError("a handler bug")
        self.calls.append(("command", (device_id, data)))

    def on_control(self, data: bytes) -> None:
        self.calls.append(("control", data))

    def on_expired(self, device_id: str) -> None:
        self.calls.append(("expired", device_id))


class Resyncs:
    def __init__(self) -> None:
        self.calls: list[Collection[str] | None] = []

    async def __call__(self, device_ids: Collection[str] | None) -> None:
        self.calls.append(device_ids)


def message(kind: str, channel: str | bytes, data: bytes | int = 1) -> dict[str, Any]:
    name = channel.encode() if isinstance(channel, str) else channel
    return {"type": kind, "pattern": None, "channel": name, "data": data}


# --- one node ------------------------------------------------------------------


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis()  # never connected
    yield client
    await client.aclose()


def broker_for(redis: Redis, deliveries: Deliveries, keys: Keys | None = None) -> Broker:
    return Broker(redis, keys or Keys(), 3, deliveries, Resyncs())


async def test_each_message_goes_to_its_handler(redis: Redis) -> None:
    deliveries = Deliveries()
    broker = broker_for(redis, deliveries)
    broker._dispatch(message("message", "device:d1:commands", b'{"type":"state_update"}'))
    broker._dispatch(message("message", "gateway:control", b'{"op":"kick"}'))
    broker._dispatch(message("message", "__keyevent@3__:expired", b"device:heartbeat:d2"))
    assert deliveries.calls == [
        ("command", ("d1", b'{"type":"state_update"}')),
        ("control", b'{"op":"kick"}'),
        ("expired", "d2"),
    ]


@pytest.mark.parametrize(
    ("channel", "data"),
    [
        ("__keyevent@3__:expired", b"device:state:d1"),  # another key of ours expiring
        ("__keyevent@3__:expired", b"session:abc"),  # another program's key
        ("device:../x:commands", b"{}"),  # not a device id
        ("other:device:d1:commands", b"{}"),  # another prefix's device
    ],
)
async def test_messages_that_are_not_ours_are_dropped(
    redis: Redis, channel: str, data: bytes
) -> None:
    deliveries = Deliveries()
    broker = broker_for(redis, deliveries)
    broker._dispatch(message("message", channel, data))
    assert deliveries.calls == []


async def test_a_failing_handler_does_not_stop_delivery(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    deliveries = Deliveries(failing="bad")
    broker = broker_for(redis, deliveries)
    with caplog.at_level(logging.ERROR, "gateway.broker"):
        broker._dispatch(message("message", "device:bad:commands", b"x"))
        broker._dispatch(message("message", "device:good:commands", b"y"))
    assert deliveries.calls == [("command", ("good", b"y"))]
    assert "failed to dispatch" in caplog.text


async def test_a_subscribe_future_resolves_on_the_confirmation_and_at_once_if_already_live(
    redis: Redis,
) -> None:
    broker = broker_for(redis, Deliveries())
    first = broker.subscribe_device("d1")
    second = broker.subscribe_device("d1")  # a second session before the first is live
    assert not first.done() and not second.done()
    broker._confirmed(b"gateway:control")  # other channels' confirmations are not its
    assert not first.done()
    broker._confirmed(b"device:d1:commands")
    assert first.done() and second.done()
    assert broker.subscribe_device("d1").done()
    assert not broker.subscribe_device("d2").done()


async def test_unsubscribing_releases_whoever_waits(redis: Redis) -> None:
    broker = broker_for(redis, Deliveries())
    waiting = broker.subscribe_device("d1")
    broker.unsubscribe_device("d1")
    assert waiting.done()
    assert not broker.subscribe_device("d1").done()  # live again only once confirmed again


async def test_a_confirmation_read_after_unsubscribing_does_not_make_the_device_live(
    redis: Redis,
) -> None:
    # SUBSCRIBE went out, the session ended at once (UNSUBSCRIBE went out too), and only then
    # was the first confirmation read: the channel is not subscribed any more, so the next
    # session of this device must subscribe again, not be told it is live.
    broker = broker_for(redis, Deliveries())
    broker.subscribe_device("d1")
    broker.unsubscribe_device("d1")
    broker._confirmed(b"device:d1:commands")
    assert not broker.subscribe_device("d1").done()
    assert broker._to_subscribe == {"d1"}  # and SUBSCRIBE goes out again


# --- a cluster -------------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=7000)  # never connected
    yield client
    await client.aclose()


@pytest.fixture
async def link(redis: Redis) -> AsyncIterator[_Link]:
    pubsub = redis.pubsub()
    yield _Link("127.0.0.1:7000", redis, pubsub)
    await pubsub.aclose()  # type: ignore[no-untyped-call]


KEYS = Keys.cluster(partitions=PARTITIONS)


def device_in(partition: int) -> str:
    return next(d for d in (f"dev{n}" for n in range(1000)) if KEYS.partition(d) == partition)


def cluster_broker(
    cluster: RedisCluster, deliveries: Deliveries, probe_interval: float = 5.0
) -> ClusterBroker:
    return ClusterBroker(cluster, KEYS, deliveries, Resyncs(), probe_interval)


async def test_cluster_messages_go_to_their_handlers(cluster: RedisCluster, link: _Link) -> None:
    deliveries = Deliveries()
    broker = cluster_broker(cluster, deliveries)
    d1 = device_in(1)
    broker._dispatch(link, message("smessage", KEYS.commands(d1), b"cmd"))
    broker._dispatch(link, message("smessage", KEYS.part(3).control_channel, b"kick"))
    broker._dispatch(
        link, message("message", "__keyevent@0__:expired", KEYS.heartbeat(d1).encode())
    )
    broker._dispatch(link, message("smessage", KEYS.part(2).probe_channel("someone-else"), b"1"))
    broker._dispatch(link, message("smessage", Keys().commands("d1"), b"unsharded name"))
    assert deliveries.calls == [
        ("command", (d1, b"cmd")),
        ("control", b"kick"),
        ("expired", d1),
    ]


async def test_a_probe_heard_back_is_settled_and_a_stale_nonce_is_not(
    cluster: RedisCluster, link: _Link
) -> None:
    broker = cluster_broker(cluster, Deliveries())
    own = KEYS.part(2).probe_channel(broker.process)
    deadline = time.monotonic() + 60
    broker._probes[2] = ("7", deadline)  # what _send_probes records as it publishes "7"
    broker._dispatch(link, message("smessage", own, b"6"))  # an earlier probe, late
    assert 2 in broker._probes
    broker._dispatch(link, message("smessage", own, b"7"))
    assert 2 not in broker._probes


async def test_a_probe_not_heard_by_its_deadline_is_reported_missed(
    cluster: RedisCluster, link: _Link
) -> None:
    broker = cluster_broker(cluster, Deliveries(), probe_interval=0.004)
    overdue = time.monotonic() - 0.001
    broker._probes[1] = ("1", overdue)
    broker._probes[3] = ("2", overdue)
    broker._dispatch(link, message("smessage", KEYS.part(3).probe_channel(broker.process), b"2"))
    timers = asyncio.create_task(broker._timers())
    try:
        assert await asyncio.wait_for(broker._events.get(), 0.5) == ("probe_missed", [1])
    finally:
        timers.cancel()
    assert broker._probes == {}


async def test_an_unsolicited_sunsubscribe_reports_its_partition_moved(
    cluster: RedisCluster, link: _Link
) -> None:
    broker = cluster_broker(cluster, Deliveries())
    link.partitions.update({0, 2})
    channel = KEYS.commands(device_in(2)).encode()
    link.pubsub.shard_channels[channel] = None  # subscribed, as ssubscribe leaves it
    broker._dispatch(link, message("sunsubscribe", channel, 0))
    assert broker._events.get_nowait() == ("moved", [2])
    assert channel not in link.pubsub.shard_channels
    # one we asked for: redis-py has already dropped it from shard_channels
    broker._dispatch(link, message("sunsubscribe", KEYS.commands(device_in(0)), 0))
    assert broker._events.empty()


async def test_a_cluster_subscribe_future_resolves_on_its_confirmation(
    cluster: RedisCluster, link: _Link
) -> None:
    broker = cluster_broker(cluster, Deliveries())
    d1, d2 = device_in(1), device_in(3)
    first, other = broker.subscribe_device(d1), broker.subscribe_device(d2)
    assert broker._events.get_nowait() == ("changed", None)  # one wake-up for the lot
    assert broker._events.empty()
    broker._dispatch(link, message("ssubscribe", KEYS.part(1).control_channel, 1))
    assert not first.done()
    broker._dispatch(link, message("ssubscribe", KEYS.commands(d1), 2))
    assert first.done() and not other.done()
    broker.unsubscribe_device(d2)
    assert other.done()


async def test_a_moved_partition_is_forgotten_and_its_devices_resubscribed(
    cluster: RedisCluster,
) -> None:
    broker = cluster_broker(cluster, Deliveries())
    device = device_in(2)
    # what placing partition 2 on a node leaves behind
    broker._wanted[2] = {device}
    broker._live[2] = {device}
    broker._placed[2] = "127.0.0.1:7000"
    assert broker.subscribe_device(device).done()
    assert await broker._handle("moved", [2])  # the placement must converge again
    assert not broker.subscribe_device(device).done()
    assert 2 in broker._lost  # its devices are re-synced once placed again
    assert (
        broker.metrics.registry.get_sample_value(
            "gateway_pubsub_resubscriptions_total", {"reason": "moved"}
        )
        == 1
    )
