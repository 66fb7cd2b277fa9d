"""The seed document's own classes beside the gateway: its heartbeats and desired states count.

The seed's code runs exactly as written (sync redis-py, in a thread so the gateway in this
event loop keeps serving); the gateway must detect, version and deliver what it writes.
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from live import LiveGateway, live_gateway
from presence_feed import presence_feed
from websockets.asyncio.client import ClientConnection, connect

pytestmark = pytest.mark.seed

TIMEOUT = 5.0


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def device_doc(gw: LiveGateway, device_id: str) -> dict[str, Any]:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_seed_heartbeats_count_and_expire_through_the_gateway(
    seed: types.SimpleNamespace, redis_url: str, redis_client: aioredis.Redis
) -> None:
    timeout = 2
    settings = {"heartbeat_timeout": 10.0, "sweep_interval": 0.5}
    async with live_gateway(redis_url, **settings) as gw, presence_feed(redis_client) as feed:
        with redis.Redis.from_url(redis_url) as sync_client:
            manager = seed.DeviceStateManager(sync_client)
            manager.heartbeat_timeout = timeout
            await asyncio.to_thread(manager.register_device, "seed-1", "thermo")
            for n in range(3):
                await asyncio.to_thread(manager.device_heartbeat, "seed-1", {"n": n})
                await asyncio.sleep(timeout * 0.4)
            last_beat = time.monotonic()
            doc = await device_doc(gw, "seed-1")
            assert doc["status"] == "online"
            assert doc["reported_state"] == {"n": 2}
            # the seed announced online itself (unversioned); the gateway adds nothing to it
            offline = await feed.wait("seed-1", "offline", within=timeout + 2)
            went = time.monotonic() - last_beat
        assert went <= timeout + 2
        assert offline["reason"] == "expired"
        assert isinstance(offline["version"], int) and offline["version"] > 0
        await asyncio.sleep(settings["sweep_interval"] * 3)
        await feed.settle()
        assert len(feed.of("seed-1", "offline")) == 1, feed.events
        doc = await device_doc(gw, "seed-1")
        assert doc["status"] == "offline"
        assert not await redis_client.sismember("devices:online", "seed-1")


async def test_seed_set_desired_state_reaches_the_socket(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    async with live_gateway(redis_url) as gw:
        with redis.Redis.from_url(redis_url) as sync_client:
            manager = seed.DeviceStateManager(sync_client)
            await asyncio.to_thread(manager.register_device, "seed-2", "lamp")
            # a device the seed registered gets its first token from the gateway
            async with gw.client() as http:
                issued = await http.post("/api/devices/seed-2/token")
            assert issued.status_code == 200, issued.text
            token = issued.json()["token"]
            async with connect(
                f"{gw.ws_url}/ws/devices/seed-2",
                additional_headers={"Authorization": f"Bearer {token}"},
            ) as ws:
                welcome = await receive(ws)
                assert welcome["type"] == "welcome"
                await ws.send(
                    orjson.dumps(
                        {"type": "report", "reported_state": {"power": "off"}, "id": 1}
                    ).decode()
                )
                assert (await receive(ws))["type"] == "ack"
                await asyncio.to_thread(manager.set_desired_state, "seed-2", {"power": "on"})
                update = await receive(ws)
                delta = await receive(ws)
            seed_view = await asyncio.to_thread(manager.get_state_delta, "seed-2")
        assert seed_view["delta"] == {"power": {"desired": "on", "reported": "off"}}
        assert update["type"] == "state_update"
        assert update["desired_state"] == {"power": "on"}
        assert isinstance(update["timestamp"], float)
        assert delta["type"] == "delta"
        assert delta["delta"] == {"power": {"desired": "on", "reported": "off"}}
