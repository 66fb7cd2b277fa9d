"""Commands through faults: the gateway holding the socket killed with -9, Redis restarted
from its AOF, a cluster primary killed under load. What must hold each time: every command the
API accepted ends `succeeded` (the devices answer everything they get), and no device runs a
command twice (they dedupe by id, as the contract asks of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from backends import busiest_primary
from commanddevice import Device, post_command
from conftest import ADMIN_KEY, GatewayFactory
from live import live_gateway
from servers import RedisServer
from tcpproxy import TcpProxy

from gateway.client import DeviceClient
from gateway.devcluster import LocalCluster

SETTLE = 30.0
FAILOVER_WITHIN = 15.0


class Handlers:
    """Every device's command handler, counting runs per command id."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}

    async def __call__(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        self.runs[params["id"]] = self.runs.get(params["id"], 0) + 1
        await asyncio.sleep(0.01)
        return {"ran": params["id"]}


class Sender:
    """Posts commands with its own ids; a refusal (503 while Redis is away) is sent again with
    the same id until accepted, so retries never make a second command."""

    def __init__(self, http: httpx.AsyncClient, device_ids: list[str]) -> None:
        self.http = http
        self.device_ids = device_ids
        self.accepted: dict[str, str] = {}  # command id → device id
        self.refused = 0
        self.attempts: dict[str, int] = {}  # of each succeeded command, as settle read it

    async def send(self, index: int) -> None:
        device_id = self.device_ids[index % len(self.device_ids)]
        command_id = f"cmd-{index:05d}"
        body = {"name": "work", "params": {"id": command_id}, "command_id": command_id,
                "ttl": 600}  # fmt: skip
        for _ in range(100):
            try:
                response = await self.http.post(f"/api/devices/{device_id}/commands", json=body)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 202:
                self.accepted[command_id] = device_id
                return
            self.refused += 1
            await asyncio.sleep(0.1)
        pytest.fail(f"{command_id} was never accepted")

    async def run(self, stop: asyncio.Event, every: float = 0.02) -> None:
        index = 0
        while not stop.is_set():
            await self.send(index)
            index += 1
            await asyncio.sleep(every)

    async def unfinished(self) -> dict[str, str]:
        """Accepted commands not `succeeded` yet, with their status."""
        left: dict[str, str] = {}
        for command_id, device_id in self.accepted.items():
            reply = await self.http.get(f"/api/devices/{device_id}/commands/{command_id}")
            status = reply.json().get("status") if reply.status_code == 200 else reply.status_code
            if status != "succeeded":
                left[command_id] = str(status)
            else:
                self.attempts[command_id] = reply.json()["attempts"]
        return left

    def summary(self) -> str:
        again = sum(1 for count in self.attempts.values() if count > 1)
        return (f"{len(self.accepted)} accepted, {self.refused} refusals sent again, "
                f"{again} sent more than once")  # fmt: skip

    async def settle(self, within: float = SETTLE) -> dict[str, str]:
        deadline = time.monotonic() + within
        while True:
            left = await self.unfinished()
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.3)


async def register(http: httpx.AsyncClient, device_id: str) -> str:
    reply = await http.post("/api/devices", json={"device_id": device_id, "device_type": "t"})
    assert reply.status_code == 201, reply.text
    return str(reply.json()["token"])


async def test_kill_9_of_the_gateway_holding_the_socket_loses_no_command(
    redis_url: str, gateway_factory: GatewayFactory
) -> None:
    holder = gateway_factory(redis_url, heartbeat_timeout="5")
    other = gateway_factory(redis_url, heartbeat_timeout="5")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    handlers = Handlers()
    async with (
        httpx.AsyncClient(base_url=other.base_url, headers=headers, timeout=10) as http,
        TcpProxy("127.0.0.1", holder.port) as proxy,
    ):
        token = await register(http, "k9-1")
        device = DeviceClient(f"ws://127.0.0.1:{proxy.port}", "k9-1", token,
                              on_command=handlers, backoff_min=0.05, backoff_max=0.3)  # fmt: skip
        sender = Sender(http, ["k9-1"])
        async with device:
            for index in range(10):
                await sender.send(index)
            holder.kill()  # with commands in flight on its socket
            proxy.target_port = other.port
            await proxy.cut()
            for index in range(10, 20):
                await sender.send(index)
            left = await sender.settle()
    print(f"\n[measured] {sender.summary()}")
    assert not left, f"accepted commands that never succeeded: {left}"
    assert handlers.runs == {command_id: 1 for command_id in sender.accepted}


async def test_a_redis_restart_from_its_aof_loses_no_command(fresh_redis: RedisServer) -> None:
    handlers = Handlers()
    async with live_gateway(fresh_redis.url, heartbeat_timeout=5) as gw, gw.client() as http:
        away_token = await register(http, "aof-away")
        live_token = await register(http, "aof-live")
        queued = [
            (await post_command(http, "aof-away", name="q", params={"id": f"q{i}"})).json()
            for i in range(10)
        ]
        sender = Sender(http, ["aof-live"])
        stop = asyncio.Event()
        async with DeviceClient(gw.ws_url, "aof-live", live_token, on_command=handlers,
                                backoff_min=0.05, backoff_max=0.3):  # fmt: skip
            sending = asyncio.create_task(sender.run(stop))
            await asyncio.sleep(0.5)
            fresh_redis.restart()  # SIGTERM: the AOF is flushed, then loaded again
            await asyncio.sleep(2)
            stop.set()
            await sending
            left = await sender.settle()
        async with Device(gw.ws_url, "aof-away", away_token) as device:
            frames = await device.wait_for(10)
            assert [f["command_id"] for f in frames] == [c["command_id"] for c in queued]
    print(f"\n[measured] {sender.summary()}")
    assert not left, f"accepted commands that never succeeded: {left}"
    assert handlers.runs == {command_id: 1 for command_id in sender.accepted}
    assert len(sender.accepted) > 20


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(tmp_path / "cluster") as local:
        yield local


async def test_a_cluster_primary_killed_under_load_loses_no_command(
    cluster: LocalCluster,
) -> None:
    handlers = Handlers()
    ids = [f"cl-{n:02d}" for n in range(12)]
    async with (
        live_gateway(cluster.url, heartbeat_timeout=6, sweep_interval=0.5) as gw,
        gw.client() as http,
        contextlib.AsyncExitStack() as devices,
    ):
        for device_id in ids:
            token = await register(http, device_id)
            client = DeviceClient(
                gw.ws_url, device_id, token, on_command=handlers, backoff_min=0.05,
                backoff_max=0.5,
            )  # fmt: skip
            await devices.enter_async_context(client)
        sender = Sender(http, ids)
        stop = asyncio.Event()
        sending = asyncio.create_task(sender.run(stop, every=0.01))
        await asyncio.sleep(2)
        victim = await busiest_primary(cluster, ids)
        cluster.kill(victim)
        took = await cluster.wait_promoted(victim, FAILOVER_WITHIN)
        assert took is not None, "the lost primary's replica was not promoted"
        await asyncio.sleep(2)
        stop.set()
        await sending
        left = await sender.settle()
    print(f"\n[measured] {sender.summary()}; replica promoted {took:.1f} s after kill -9")
    assert not left, f"accepted commands that never succeeded: {left}"
    assert handlers.runs == {command_id: 1 for command_id in sender.accepted}
