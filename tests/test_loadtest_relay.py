"""The gateway's own relay latency, which the load test scrapes beside its client-side figures.

`gateway_relay_seconds{kind}` times a relayed message from the moment it is read off Redis to
its frame written to the socket: a command published on a device's channel (`command`), and
a fleet event batched out to a dashboard (`dashboard`). A real gateway, real sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as aioredis
from live import ADMIN_KEY, LiveGateway, live_gateway
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 5.0


async def relay_count(gw: LiveGateway, kind: str) -> float:
    async with gw.client() as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_relay_seconds_count" and sample.labels["kind"] == kind:
                return float(sample.value)
    return 0.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """The frame is on the wire a moment before its write is counted: poll, bounded."""
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        assert time.monotonic() < deadline, f"not within {TIMEOUT} s: {what}"
        await asyncio.sleep(0.02)


async def next_frame(ws: ClientConnection, kind: str) -> dict[str, object]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame: dict[str, object] = orjson.loads(await ws.recv())
            if frame.get("type") == kind:
                return frame


async def test_a_relayed_command_is_counted(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("relay-1", "relay")
        async with connect(
            f"{gw.ws_url}/ws/devices/relay-1",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=TIMEOUT,
        ) as ws:
            await next_frame(ws, "welcome")
            assert await relay_count(gw, "command") == 0
            redis = aioredis.Redis.from_url(redis_url)
            try:
                command = {"type": "state_update", "desired_state": {"on": True}, "timestamp": 1}
                await redis.publish("device:relay-1:commands", orjson.dumps(command))
            finally:
                await redis.aclose()
            await next_frame(ws, "state_update")

            async def counted() -> bool:
                return await relay_count(gw, "command") == 1

            await eventually(counted, "the relayed command was counted once")


async def test_an_event_batched_out_to_a_dashboard_is_counted(redis_url: str) -> None:
    async with (
        live_gateway(redis_url) as gw,
        connect(f"{gw.ws_url}/ws/dashboard?token={ADMIN_KEY}", open_timeout=TIMEOUT) as dashboard,
    ):
        await next_frame(dashboard, "snapshot")
        assert await relay_count(gw, "dashboard") == 0
        await gw.register("relay-2", "relay")  # a registry event in the fleet stream
        await next_frame(dashboard, "events")

        async def counted() -> bool:
            return await relay_count(gw, "dashboard") >= 1

        await eventually(counted, "the dashboard's batch was counted")
