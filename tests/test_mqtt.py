"""MQTT devices end to end: a private Mosquitto (password file, per-device ACL), real MQTT
clients as devices, real gateways bridging it into Redis. Presence is read back from the fleet
log (each event exactly once, in order), shadow and commands through the REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from backends import Client, connect
from live import LiveGateway, live_gateway
from mosquitto import GATEWAY_PASSWORD, GATEWAY_USER, Mosquitto
from mqttdevice import MqttDevice

from gateway.client import DeviceClient, DeviceRejected
from gateway.keys import Keys
from gateway.redisconn import is_cluster_url

DEVICES = [f"m{i}" for i in range(1, 41)] + ["ghost", "intruder"]
Event = dict[str, Any]


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Mosquitto]:
    """A broker of the test's own: nothing retained from another test, and it may be killed."""
    server = Mosquitto(DEVICES, tmp_path / "mosquitto").start()
    yield server
    server.kill()


@contextlib.asynccontextmanager
async def mqtt_gateway(redis_url: str, broker: Mosquitto, **overrides: Any) -> AsyncIterator[LiveGateway]:
    async with live_gateway(
        redis_url,
        mqtt_url=broker.url,
        mqtt_username=GATEWAY_USER,
        mqtt_password=GATEWAY_PASSWORD,
        **overrides,
    ) as gw:
        await until(lambda: gw.gateway.mqtt is not None and gw.gateway.mqtt.connected)
        yield gw


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def presence(client: Client, layout: Keys, device_id: str) -> list[tuple[str, str]]:
    """(status, reason) of the device's presence events in the fleet log, oldest first."""
    rows = await client.xrange(layout.of(device_id).events, "-", "+")
    events = [orjson.loads(body[b"event"]) for _, body in rows]
    return [
        (e["status"], e["reason"])
        for e in events
        if e["type"] == "presence" and e["device_id"] == device_id
    ]


async def until_presence(
    client: Client, layout: Keys, device_id: str, expected: list[tuple[str, str]]
) -> None:
    deadline = time.monotonic() + 10
    while (found := await presence(client, layout, device_id)) != expected:
        if time.monotonic() > deadline or len(found) > len(expected):
            raise AssertionError(f"{device_id}: presence {found}, expected {expected}")
        await asyncio.sleep(0.02)


async def device(gw: LiveGateway, device_id: str) -> dict[str, Any]:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def dropped(gw: LiveGateway, reason: str) -> float:
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'gateway_mqtt_dropped_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Client]:
    client = await connect(redis_url)
    yield client
    await client.aclose()


LAYOUT = Keys()


async def test_online_and_offline_by_status_and_by_will(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m1")
        await gw.register("m2")
        first = await MqttDevice(broker.port, "m1").connect()
        await until_presence(redis, LAYOUT, "m1", [("online", "connected")])
        assert (await device(gw, "m1"))["status"] == "online"
        await first.goodbye()
        await until_presence(
            redis, LAYOUT, "m1", [("online", "connected"), ("offline", "mqtt_offline")]
        )
        second = await MqttDevice(broker.port, "m2").connect()
        await until_presence(redis, LAYOUT, "m2", [("online", "connected")])
        await second.drop()  # no DISCONNECT: the broker publishes the Will
        await until_presence(
            redis, LAYOUT, "m2", [("online", "connected"), ("offline", "mqtt_will")]
        )
        assert (await device(gw, "m2"))["status"] == "offline"


async def test_a_stale_offline_after_a_newer_online_changes_nothing(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m3")
        old = await MqttDevice(broker.port, "m3", session="old").connect()
        await until_presence(redis, LAYOUT, "m3", [("online", "connected")])
        # the device reconnected (a new session) before the broker noticed the old connection
        # was gone: the old one's Will arrives after the new one's online
        await old.publish("status", old.status("online", session="new"), retain=True)
        await until_presence(
            redis, LAYOUT, "m3", [("online", "connected"), ("online", "replaced")]
        )
        await old.publish("status", old.status("offline", will=True, session="old"))
        await old.publish("status", old.status("offline", session="old"))
        await old.report({"after": "stale offline"})  # handled after both offlines
        await until(lambda: True)
        deadline = time.monotonic() + 5
        while (await device(gw, "m3"))["reported_state"] != {"after": "stale offline"}:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await device(gw, "m3"))["status"] == "online"
        assert await presence(redis, LAYOUT, "m3") == [("online", "connected"), ("online", "replaced")]
        assert await dropped(gw, "stale_session") >= 2
        await old.publish("status", old.status("offline", session="new"))
        await until_presence(
            redis,
            LAYOUT,
            "m3",
            [("online", "connected"), ("online", "replaced"), ("offline", "mqtt_offline")],
        )
        await old.close()
