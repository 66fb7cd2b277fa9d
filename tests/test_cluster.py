"""The gateway on a real Valkey Cluster (3 primaries, 3 replicas): the same REST, device and
dashboard behaviour as on one node, with every transition in one slot."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import websockets
from live import LiveGateway, live_gateway
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.client import DeviceClient
from gateway.keys import Keys
from gateway.redisconn import CLUSTER_CONCURRENCY, connect_cluster

TIMEOUT = 10.0


@pytest.fixture
async def gw(cluster_url: str) -> Any:
    async with live_gateway(cluster_url, heartbeat_timeout=3, sweep_interval=0.2) as gateway:
        yield gateway


@pytest.fixture
async def cluster(cluster_url: str) -> Any:
    client = connect_cluster(cluster_url)
    await client.initialize()
    yield client
    await client.aclose()


async def test_the_cluster_layout_is_detected_and_used(
    gw: LiveGateway, cluster: RedisCluster
) -> None:
    keys = gw.gateway.keys
    assert keys.sharded and keys.partitions == 64
    await gw.register("c-1")
    assert await cluster.exists(keys.state("c-1")) == 1
    assert await cluster.exists("device:state:c-1") == 0  # no single-node names on a cluster
    slots = {key_slot(name.encode()) for name in (keys.state("c-1"), keys.of("c-1").registered)}
    assert len(slots) == 1


async def test_a_device_connects_reports_and_gets_desired_changes_live(gw: LiveGateway) -> None:
    token = await gw.register("c-2")
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_desired(desired: dict[str, Any], delta: dict[str, Any]) -> None:
        got.put_nowait(desired)

    async with DeviceClient(gw.ws_url, "c-2", token, on_desired=on_desired) as device:
        assert await device.report({"t": 21}) >= 1
        async with gw.client() as client:
            reply = await client.patch("/api/devices/c-2/desired", json={"state": {"t": 22}})
            assert reply.status_code == 200, reply.text
            async with asyncio.timeout(TIMEOUT):
                assert await got.get() == {"t": 22}
            device_view = (await client.get("/api/devices/c-2")).json()
        assert device_view["status"] == "online"
        assert device_view["reported_state"] == {"t": 21}
        assert device_view["desired_state"] == {"t": 22}


async def test_pages_and_stats_cover_every_partition_once(gw: LiveGateway) -> None:
    ids = [f"p-{n:03d}" for n in range(150)]
    await asyncio.gather(*(gw.register(d, "alpha" if n % 2 else "beta") for n, d in enumerate(ids)))
    async with gw.client() as client:
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 17, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/api/devices", params=params)).json()
            seen += [item["device_id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == ids
        stats = (await client.get("/api/stats")).json()
    assert stats["registered"] == 150 and stats["online"] == 0
    assert stats["by_type"]["alpha"]["registered"] == 75


async def test_one_session_per_device_across_processes(cluster_url: str) -> None:
    async with live_gateway(cluster_url) as first, live_gateway(cluster_url) as second:
        token = await first.register("c-3")
        headers = {"Authorization": f"Bearer {token}"}
        old = await websockets.connect(f"{first.ws_url}/ws/devices/c-3", additional_headers=headers)
        assert orjson.loads(await old.recv())["type"] == "welcome"
        new = await websockets.connect(
            f"{second.ws_url}/ws/devices/c-3", additional_headers=headers
        )
        assert orjson.loads(await new.recv())["type"] == "welcome"
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await old.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
        await new.close()


async def test_a_silent_device_goes_offline_once(gw: LiveGateway) -> None:
    token = await gw.register("c-4")
    async with open_dashboard(gw) as ws:
        snapshot = orjson.loads(await ws.recv())
        assert snapshot["type"] == "snapshot"
        headers = {"Authorization": f"Bearer {token}"}
        device = await websockets.connect(f"{gw.ws_url}/ws/devices/c-4", additional_headers=headers)
        await device.recv()
        started = time.monotonic()
        events = await presence_events(ws, "c-4", 2, within=TIMEOUT)  # online, then offline
        assert [e["status"] for e in events] == ["online", "offline"]
        assert events[1]["reason"] == "expired" and events[1]["version"] > events[0]["version"]
        assert time.monotonic() - started < 3 + 2.5
        await device.close()


def open_dashboard(gw: LiveGateway) -> Any:
    from live import ADMIN_KEY

    return websockets.connect(
        f"{gw.ws_url}/ws/dashboard?token={ADMIN_KEY}", origin=websockets.Origin(gw.base_url)
    )


async def presence_events(
    ws: Any, device_id: str, count: int, within: float
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while len(found) < count:
            frame = orjson.loads(await ws.recv())
            if frame["type"] != "events":
                continue
            assert frame["cursor"].startswith("p1.")
            found += [
                e for e in frame["events"]
                if e["type"] == "presence" and e["device_id"] == device_id
            ]  # fmt: skip
    return found


async def test_dashboards_resume_across_partitions_without_gap(gw: LiveGateway) -> None:
    tokens = {d: await gw.register(d) for d in (f"r-{n}" for n in range(8))}
    async with open_dashboard(gw) as ws:
        cursor = orjson.loads(await ws.recv())["cursor"]
    for device_id, token in tokens.items():  # each connects and leaves: two events each
        async with DeviceClient(gw.ws_url, device_id, token):
            pass
    async with open_dashboard(gw) as ws:
        orjson.loads(await ws.recv())
        await ws.send(orjson.dumps({"type": "resume", "after": cursor}).decode())
        replayed: list[dict[str, Any]] = []
        async with asyncio.timeout(TIMEOUT):
            while len([e for e in replayed if e["type"] == "presence"]) < 16:
                frame = orjson.loads(await ws.recv())
                if frame["type"] == "events":
                    replayed += frame["events"]
    # the replay may arrive after a live batch with newer events: order by presence version
    by_device: dict[str, list[str]] = {}
    presence = sorted((e for e in replayed if e["type"] == "presence"), key=lambda e: e["version"])
    for event in presence:
        by_device.setdefault(event["device_id"], []).append(event["status"])
    assert by_device == {d: ["online", "offline"] for d in tokens}
    assert len({e["id"] for e in replayed}) == len(replayed)  # no duplicate


async def test_keys_of_a_partition_stay_in_its_slot_on_the_server(cluster: RedisCluster) -> None:
    keys = Keys.cluster()
    node = cluster.get_node_from_key(keys.part(5).online)
    assert node is cluster.get_node_from_key(keys.part(5).events)


async def test_command_connections_stay_bounded_and_fall_back_after_a_burst(
    cluster_url: str, cluster: RedisCluster
) -> None:
    """However many commands wait, each node sees at most CLUSTER_CONCURRENCY (+2 for the
    client's topology reads) of a process's connections; once idle, trimming leaves one."""
    name = "bound-test"
    burst = connect_cluster(cluster_url, client_name=name)
    await burst.initialize()

    async def ours_per_node() -> list[int]:
        counts = []
        for node in cluster.get_primaries():
            listed: Any = await cluster.execute_command("CLIENT LIST", target_nodes=node)
            counts.append(sum(1 for client in listed if client.get("name") == name))
        return counts

    try:
        # many more waiting than may run: each a script of ~20 ms, on every node
        keys = [f"{{{i}}}bound" for i in range(300)]
        await asyncio.gather(
            *(burst.eval("redis.call('SET', KEYS[1], 1) return 1", 1, key) for key in keys)
        )
        during = await ours_per_node()
        assert all(1 <= count <= CLUSTER_CONCURRENCY + 2 for count in during), during
        assert await burst.trim_idle() > 0
        assert await ours_per_node() == [1] * len(during)
    finally:
        await burst.aclose()
