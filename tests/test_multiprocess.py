"""Several real gateway processes on one Redis: commands, takeover, crashes and restarts.

Each gateway is a `python -m gateway serve` subprocess; devices are real WebSocket clients in
this test's event loop. Blocking process calls (SIGTERM waits, SIGKILL) run in a thread so the
clients keep reading meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from conftest import GatewayFactory, GatewayProcess
from live import ADMIN_KEY
from presence_feed import presence_feed
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 5.0
HEARTBEAT_TIMEOUT = 3.0
# uvicorn re-raises SIGTERM after its graceful shutdown: killed-by-signal is a clean stop
STOPPED = (0, -signal.SIGTERM)
FLEET = {"heartbeat_timeout": str(HEARTBEAT_TIMEOUT), "sweep_interval": "0.5"}


# --- helpers ------------------------------------------------------------------------


def api(gateway: GatewayProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gateway.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )


async def register(gateway: GatewayProcess, *ids: str) -> list[str]:
    tokens = []
    async with api(gateway) as http:
        for device_id in ids:
            response = await http.post(
                "/api/devices", json={"device_id": device_id, "device_type": "meter"}
            )
            assert response.status_code == 201, response.text
            tokens.append(str(response.json()["token"]))
    return tokens


async def attach(gateway: GatewayProcess, device_id: str, token: str) -> ClientConnection:
    ws = await connect(
        f"{gateway.ws_url}/ws/devices/{device_id}",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    )
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert welcome["type"] == "welcome", welcome
    return ws


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def close_code(ws: ClientConnection, within: float = TIMEOUT) -> int | None:
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


async def keep_alive(sockets: list[ClientConnection], seconds: float) -> None:
    """Send a frame from every socket well within each heartbeat timeout, for *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.gather(*(ws.send('{"type":"heartbeat"}') for ws in sockets))
        await asyncio.sleep(HEARTBEAT_TIMEOUT / 3)


async def close_all(sockets: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


# --- commands and sessions across processes -----------------------------------------


async def test_desired_change_through_one_process_reaches_a_device_on_another(
    gateway_factory: GatewayFactory, redis_url: str
) -> None:
    a = gateway_factory(redis_url, **FLEET)
    b = gateway_factory(redis_url, **FLEET)
    (token,) = await register(a, "mp-1")
    ws = await attach(b, "mp-1", token)
    try:
        async with api(a) as http:
            response = await http.patch(
                "/api/devices/mp-1/desired", json={"state": {"valve": "open"}}
            )
        assert response.status_code == 200, response.text
        update = await receive(ws)
        delta = await receive(ws)
    finally:
        await ws.close()
    assert update["type"] == "state_update"
    assert update["desired_state"] == {"valve": "open"}
    assert delta["type"] == "delta"
    assert delta["delta"] == {"valve": {"desired": "open", "reported": None}}
    assert delta["version"] == response.json()["version"]


async def test_takeover_across_processes_closes_the_old_socket_without_offline(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: aioredis.Redis
) -> None:
    a = gateway_factory(redis_url, **FLEET)
    b = gateway_factory(redis_url, **FLEET)
    (token,) = await register(a, "mp-2")
    async with presence_feed(redis_client) as feed:
        on_a = await attach(a, "mp-2", token)
        on_b = await attach(b, "mp-2", token)
        try:
            assert await close_code(on_a) == 4409
            # the old session's late end (on A) must not take the device offline
            await keep_alive([on_b], HEARTBEAT_TIMEOUT + 1)
            await on_b.send('{"type":"get","id":"alive"}')
            assert (await receive(on_b))["id"] == "alive"
            await feed.settle()
            assert [e["reason"] for e in feed.of("mp-2")] == ["connected", "replaced"]
        finally:
            await on_b.close()
        async with api(b) as http:
            assert (await http.get("/api/devices/mp-2")).json()["status"] == "offline"


# --- crashes --------------------------------------------------------------------------


async def _crash_detected(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: aioredis.Redis, count: int,
    keyspace_notifications: bool,
) -> None:  # fmt: skip
    a = gateway_factory(redis_url, **FLEET)
    b = gateway_factory(redis_url, **FLEET)
    if not keyspace_notifications:
        # the gateways enabled notifications at start; a managed Redis may not have them
        await redis_client.config_set("notify-keyspace-events", "")
    ids = [f"crash-{n:02d}" for n in range(count)]
    tokens = await register(b, *ids)
    sockets = [await attach(a, i, t) for i, t in zip(ids, tokens, strict=True)]
    try:
        async with presence_feed(redis_client) as feed:
            await asyncio.gather(*(ws.send('{"type":"heartbeat"}') for ws in sockets))
            await asyncio.sleep(0.2)
            killed_at = time.monotonic()
            await asyncio.to_thread(a.kill)
            await feed.wait_all(ids, "offline", within=HEARTBEAT_TIMEOUT + 2)
            latest = max(feed.first(i, "offline") for i in ids) - killed_at
            assert latest <= HEARTBEAT_TIMEOUT + 2, latest
            # a few more sweeps: nobody may publish any of them again
            await asyncio.sleep(1.5)
            await feed.settle()
            for device_id in ids:
                offline = feed.of(device_id, "offline")
                assert len(offline) == 1, (device_id, offline)
                assert offline[0]["reason"] == "expired"
                assert isinstance(offline[0]["version"], int)
        assert await redis_client.scard("devices:online") == 0
    finally:
        await close_all(sockets)


async def test_kill_9_of_a_gateway_offlines_its_devices_once(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await _crash_detected(gateway_factory, redis_url, redis_client, 20, True)


async def test_sweep_alone_detects_without_keyspace_notifications(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await _crash_detected(gateway_factory, redis_url, redis_client, 5, False)


# --- graceful shutdown ------------------------------------------------------------------


async def test_sigterm_closes_1012_and_offlines_with_gateway_shutdown(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: aioredis.Redis
) -> None:
    a = gateway_factory(redis_url, **FLEET)
    ids = [f"down-{n}" for n in range(5)]
    tokens = await register(a, *ids)
    sockets = [await attach(a, i, t) for i, t in zip(ids, tokens, strict=True)]
    async with presence_feed(redis_client) as feed:
        stopping = asyncio.create_task(asyncio.to_thread(a.terminate))
        codes = await asyncio.gather(*(close_code(ws, TIMEOUT * 2) for ws in sockets))
        assert await stopping in STOPPED, a.log_text()
        assert codes == [1012] * len(ids)
        await feed.wait_all(ids, "offline", within=TIMEOUT)
        await feed.settle()
        for device_id in ids:
            assert [e["reason"] for e in feed.of(device_id, "offline")] == ["gateway_shutdown"]


async def test_reconnect_within_grace_to_another_gateway_never_shows_offline(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: aioredis.Redis
) -> None:
    grace = 3.0
    settings = {**FLEET, "offline_grace": str(grace)}
    a = gateway_factory(redis_url, **settings)
    b = gateway_factory(redis_url, **settings)
    ids = ["move-1", "move-2"]
    tokens = await register(a, *ids)
    sockets = [await attach(a, i, t) for i, t in zip(ids, tokens, strict=True)]
    async with presence_feed(redis_client) as feed:
        stopping = asyncio.create_task(asyncio.to_thread(a.terminate))
        assert await asyncio.gather(*(close_code(ws) for ws in sockets)) == [1012, 1012]
        moved = [await attach(b, i, t) for i, t in zip(ids, tokens, strict=True)]
        assert await stopping in STOPPED, a.log_text()
        try:
            await keep_alive(moved, grace + 2)
            await feed.settle()
            for device_id in ids:
                assert feed.of(device_id) == [], feed.of(device_id)
            async with api(b) as http:
                for device_id in ids:
                    doc = (await http.get(f"/api/devices/{device_id}")).json()
                    assert doc["status"] == "online", doc
        finally:
            await close_all(moved)
