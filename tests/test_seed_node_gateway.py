"""A gateway with `GATEWAY_SEED_SCHEMA=node` beside the document's Node.js classes.

The mirror of test_api_seed.py and test_seed_ws.py: the REST API, device sockets and presence
events of a real gateway, while the classes run exactly as the document writes them in a node
process of their own. Last, what a gateway with the default (Python) field names makes of
data the Node.js classes wrote.
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from conftest import ADMIN_KEY, GatewayFactory
from live import LiveGateway, live_gateway
from presence_feed import presence_feed
from seedcode import NodeSeed
from websockets.asyncio.client import ClientConnection, connect

from gateway.config import ConfigError, from_env

pytestmark = pytest.mark.seed

TIMEOUT = 5.0
NODE = {"seed_schema": "node"}


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def device_doc(gw: LiveGateway, device_id: str) -> dict[str, Any]:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def first_token(gw: LiveGateway, device_id: str) -> str:
    async with gw.client() as http:
        issued = await http.post(f"/api/devices/{device_id}/token")
    assert issued.status_code == 200, issued.text
    return str(issued.json()["token"])


def device_socket(gw: LiveGateway, device_id: str, token: str) -> Any:
    return connect(
        f"{gw.ws_url}/ws/devices/{device_id}",
        additional_headers={"Authorization": f"Bearer {token}"},
    )


# --- the REST API (test_api_seed.py) ----------------------------------------------------------
async def test_node_registered_device_is_online_through_the_api(
    node_seed: NodeSeed, redis_url: str
) -> None:
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        before = time.time()
        await node_seed.call("manager", "registerDevice", "node-1", "thermo", {"site": "north"})
        await node_seed.call("manager", "deviceHeartbeat", "node-1", {"temp": 19.5})

        response = await client.get("/api/devices/node-1")
        assert response.status_code == 200, response.text
        device = response.json()
        assert device["status"] == "online"
        assert device["device_type"] == "thermo"
        assert device["metadata"] == {"site": "north"}
        assert device["reported_state"] == {"temp": 19.5}
        # the classes write milliseconds; the API speaks epoch seconds whatever the schema
        assert before - 0.01 <= device["last_seen"] <= time.time() + 0.01
        assert before - 0.01 <= device["registered_at"] <= device["last_seen"]

        # once indexed (the sweep does this; here directly) it shows in the bulk queries too
        await gw.gateway.store.adopt(["node-1"])
        page = (await client.get("/api/devices", params={"status": "online"})).json()
        assert [item["device_id"] for item in page["items"]] == ["node-1"]
        assert page["items"][0]["last_seen"] == device["last_seen"]
        stats = (await client.get("/api/stats")).json()
        assert stats["registered"] == 1 and stats["online"] == 1


async def test_node_reads_what_the_api_writes(node_seed: NodeSeed, redis_url: str) -> None:
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        for device_id in ("api-1", "api-2"):
            response = await client.post(
                "/api/devices",
                json={"device_id": device_id, "device_type": "valve", "metadata": {"line": 3}},
            )
            assert response.status_code == 201
        response = await client.patch(
            "/api/devices/api-1/desired",
            json={"state": {"open": True, "flow": {"max": 12, "unit": "l/min"}}},
        )
        assert response.status_code == 200, response.text

        before = time.time()
        await node_seed.call("manager", "deviceHeartbeat", "api-1", {"open": False})
        state = await node_seed.call("manager", "getDeviceState", "api-1")
        delta = await node_seed.call("manager", "getStateDelta", "api-1")
        online = await node_seed.call("manager", "getOnlineDevices")
        offline = await node_seed.call("manager", "getOfflineDevices")

        assert state is not None
        assert state["deviceId"] == "api-1"
        assert state["status"] == "online"
        assert state["desiredState"] == {"open": True, "flow": {"max": 12, "unit": "l/min"}}
        assert state["reportedState"] == {"open": False}
        assert state["metadata"] == {"line": 3}
        assert before * 1000 - 1 <= state["lastSeen"] <= time.time() * 1000 + 1

        # the classes compare with `!==`: an object never equals another, so `flow` differs
        assert delta["deviceId"] == "api-1" and delta["inSync"] is False
        assert delta["delta"] == {
            "open": {"desired": True, "reported": False},
            "flow": {"desired": {"max": 12, "unit": "l/min"}},
        }
        assert (online, offline) == (["api-1"], ["api-2"])
        never = await node_seed.call("manager", "getDeviceState", "api-2")
        assert (never["status"], never["lastSeen"], never["reportedState"]) == ("offline", 0, {})

        # and the API agrees with what the classes wrote
        ours = (await client.get("/api/devices/api-1/delta")).json()
        assert ours["delta"]["open"] == {"desired": True, "reported": False}
        assert ours["delta"]["flow"] == {
            "max": {"desired": 12, "reported": None},
            "unit": {"desired": "l/min", "reported": None},
        }


async def test_node_desired_state_shows_merged_in_the_api(
    node_seed: NodeSeed, redis_url: str
) -> None:
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        response = await client.post(
            "/api/devices", json={"device_id": "m-1", "device_type": "lamp"}
        )
        assert response.status_code == 201
        first = await client.patch(
            "/api/devices/m-1/desired", json={"state": {"brightness": 40, "color": "warm"}}
        )
        assert first.status_code == 200

        written = await node_seed.call(
            "manager", "setDesiredState", "m-1", {"brightness": 80, "on": True}
        )
        assert written["desiredState"] == {"brightness": 80, "color": "warm", "on": True}

        device = (await client.get("/api/devices/m-1")).json()
        assert device["desired_state"] == {"brightness": 80, "color": "warm", "on": True}

        # our next merge builds on the classes' write rather than overwriting it
        after = await client.patch("/api/devices/m-1/desired", json={"state": {"color": None}})
        assert after.status_code == 200, after.text
        assert after.json()["desired_state"] == {"brightness": 80, "on": True}
        state = await node_seed.call("manager", "getDeviceState", "m-1")
        assert state["desiredState"] == {"brightness": 80, "on": True}


async def test_node_registered_device_gets_its_first_token(
    node_seed: NodeSeed, redis_url: str
) -> None:
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        await node_seed.call("manager", "registerDevice", "legacy-1", "meter")
        assert await gw.gateway.store.check_token("legacy-1", "anything") == (True, None)
        response = await client.post("/api/devices/legacy-1/token")
        assert response.status_code == 200, response.text
        token = response.json()["token"]
        exists, digest = await gw.gateway.store.check_token("legacy-1", token)
        assert exists and digest is not None
        # and the id is taken: registering it again through the API is refused
        again = await client.post(
            "/api/devices", json={"device_id": "legacy-1", "device_type": "meter"}
        )
        assert again.status_code == 409, again.text


async def test_a_node_desired_write_moves_the_versions_and_is_recorded(
    node_seed: NodeSeed, redis_url: str
) -> None:
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        response = await client.post("/api/devices", json={"device_id": "fw-1", "device_type": "t"})
        assert response.status_code == 201
        first = await client.patch("/api/devices/fw-1/desired", json={"state": {"a": 1}})
        assert (first.json()["version"], first.json()["desired_version"]) == (1, 1)

        await node_seed.call("manager", "setDesiredState", "fw-1", {"b": 2})

        # an edit based on what was read before the other program's write is refused
        for precondition in ({"version": 1}, {"desired_version": 1}):
            stale = await client.patch(
                "/api/devices/fw-1/desired", json={"state": {"c": 3}, **precondition}
            )
            assert stale.status_code == 409, (precondition, stale.text)
        device = (await client.get("/api/devices/fw-1")).json()
        assert device["desired_state"] == {"a": 1, "b": 2}
        assert (device["version"], device["desired_version"]) == (2, 2)
        # the write counts as a write of the whole section: every leaf is stamped anew
        stamps = device["shadow_metadata"]["desired"]
        assert set(stamps) == {"a", "b"} and stamps["a"]["timestamp"] == stamps["b"]["timestamp"]
        history = (await client.get("/api/devices/fw-1/history")).json()["items"]
        newest = history[0]
        assert (newest["type"], newest["section"], newest["version"]) == ("state", "desired", 2)
        assert newest["state"] == {"a": 1, "b": 2} and newest["external"] is True

        # read after the write, the version is current
        fresh = await client.patch(
            "/api/devices/fw-1/desired", json={"state": {"c": 3}, "desired_version": 2}
        )
        assert fresh.status_code == 200, fresh.text
        assert (fresh.json()["version"], fresh.json()["desired_version"]) == (3, 3)
        assert fresh.json()["desired_state"] == {"a": 1, "b": 2, "c": 3}
        # and the gateway's own write is not taken for another program's
        again = (await client.get("/api/devices/fw-1")).json()
        assert (again["version"], again["desired_version"]) == (3, 3)


async def test_a_node_registered_device_counts_the_node_desired_writes(
    node_seed: NodeSeed, redis_url: str
) -> None:
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        await node_seed.call("manager", "registerDevice", "fw-2", "meter")
        before = (await client.get("/api/devices/fw-2")).json()
        assert (before["version"], before["desired_version"]) == (0, 0)
        await node_seed.call("manager", "setDesiredState", "fw-2", {"on": True})
        stale = await client.patch(
            "/api/devices/fw-2/desired", json={"state": {"on": False}, "version": 0}
        )
        assert stale.status_code == 409, stale.text
        after = (await client.get("/api/devices/fw-2")).json()
        assert (after["version"], after["desired_version"], after["desired_state"]) == (
            1,
            1,
            {"on": True},
        )


async def test_a_node_reported_write_is_counted_only_by_the_next_report(
    node_seed: NodeSeed, redis_url: str
) -> None:
    """The documented limit: the heartbeat path does not hash documents."""
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        response = await client.post("/api/devices", json={"device_id": "fw-3", "device_type": "t"})
        assert response.status_code == 201
        await node_seed.call("manager", "deviceHeartbeat", "fw-3", {"temp": 1})
        device = (await client.get("/api/devices/fw-3")).json()
        assert device["reported_state"] == {"temp": 1}
        assert (device["version"], device["reported_version"]) == (0, 0)


# --- heartbeats, sockets and presence (test_seed_ws.py) ----------------------------------------
async def test_node_heartbeats_count_and_expire_through_the_gateway(
    node_seed: NodeSeed, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """A device heartbeated only by `deviceHeartbeat` goes offline through the gateway with one
    versioned event, while the Node.js OfflineDetector runs beside it and announces its own
    (unversioned) offline: the gateway never publishes a second one."""
    timeout = 2
    settings = {"heartbeat_timeout": 10.0, "sweep_interval": 0.5, **NODE}
    async with live_gateway(redis_url, **settings) as gw, presence_feed(redis_client) as feed:
        await node_seed.set("manager", "heartbeatTimeout", timeout)
        await node_seed.call("detector", "start")
        await node_seed.subscribe(redis_client)
        await node_seed.call("manager", "registerDevice", "node-1", "thermo")
        for n in range(3):
            await node_seed.call("manager", "deviceHeartbeat", "node-1", {"n": n})
            await asyncio.sleep(timeout * 0.4)
        last_beat = time.monotonic()
        doc = await device_doc(gw, "node-1")
        assert doc["status"] == "online"
        assert doc["reported_state"] == {"n": 2}
        offline = await feed.wait("node-1", "offline", within=timeout + 2)
        went = time.monotonic() - last_beat
        assert went <= timeout + 2
        assert offline["reason"] == "expired" and offline["deviceId"] == "node-1"
        assert isinstance(offline["version"], int) and offline["version"] > 0
        await asyncio.sleep(settings["sweep_interval"] * 3)
        await feed.settle()
        assert len(feed.of("node-1", "offline")) == 1, feed.events
        await node_seed.settle(redis_client)
        doc = await device_doc(gw, "node-1")
    assert doc["status"] == "offline"
    assert not await redis_client.sismember("devices:online", "node-1")
    # what the Node.js subscriber saw: the classes' own online and offline, the gateway's one
    presence = [e for e in node_seed.events if e["type"] == "presence"]  # not the feed's marks
    seen = [(e["deviceId"], e["status"], e.get("version")) for e in presence]
    assert sorted(seen, key=str) == sorted(
        [("node-1", "online", None), ("node-1", "offline", None), ("node-1", "offline", 1)],
        key=str,
    )
    state = await node_seed.call("manager", "getDeviceState", "node-1")
    assert (state["status"], state["reportedState"]) == ("offline", {"n": 2})


async def test_node_set_desired_state_reaches_the_socket(
    node_seed: NodeSeed, redis_url: str
) -> None:
    async with live_gateway(redis_url, **NODE) as gw:
        await node_seed.call("manager", "registerDevice", "node-2", "lamp")
        # a device the classes registered gets its first token from the gateway, and connects
        token = await first_token(gw, "node-2")
        async with device_socket(gw, "node-2", token) as ws:
            welcome = await receive(ws)
            assert welcome["type"] == "welcome"
            await ws.send(
                orjson.dumps(
                    {"type": "report", "reported_state": {"power": "off"}, "id": 1}
                ).decode()
            )
            assert (await receive(ws))["type"] == "ack"
            state = await node_seed.call("manager", "getDeviceState", "node-2")
            assert (state["status"], state["reportedState"]) == ("online", {"power": "off"})
            before_ms = time.time() * 1000
            await node_seed.call("manager", "setDesiredState", "node-2", {"power": "on"})
            update = await receive(ws)
            delta = await receive(ws)
            node_view = await node_seed.call("manager", "getStateDelta", "node-2")
            # the write is counted like any other program's (versions, history, `external`)
            doc = await device_doc(gw, "node-2")
        assert node_view["delta"] == {"power": {"desired": "on", "reported": "off"}}
        # relayed exactly as the classes published it, then the delta in the gateway's form
        assert update["type"] == "state_update"
        assert update["desiredState"] == {"power": "on"}
        assert isinstance(update["timestamp"], int) and update["timestamp"] >= before_ms - 1
        assert delta["type"] == "delta"
        assert delta["delta"] == {"power": {"desired": "on", "reported": "off"}}
        assert (doc["desired_state"], doc["desired_version"]) == ({"power": "on"}, 1)
        async with gw.client() as http:
            history = (await http.get("/api/devices/node-2/history")).json()["items"]
        assert any(
            item.get("section") == "desired" and item.get("external") is True for item in history
        ), history


async def test_node_subscribers_receive_the_gateway_presence_events(
    node_seed: NodeSeed, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """`subscribeToPresence` callbacks read `event.deviceId`: every transition the gateway
    publishes carries it beside `device_id`, with the same version and reason."""
    async with live_gateway(redis_url, **NODE) as gw:
        await node_seed.subscribe(redis_client)
        async with gw.client() as http:
            created = await http.post("/api/devices", json={"device_id": "d1", "device_type": "t"})
        assert created.status_code == 201
        token = created.json()["token"]
        async with device_socket(gw, "d1", token) as ws:
            assert (await receive(ws))["type"] == "welcome"
            state = await node_seed.call("manager", "getDeviceState", "d1")
            assert state["status"] == "online"
            assert await node_seed.call("manager", "getOnlineDevices") == ["d1"]
        await node_seed.wait_events(2)
        await node_seed.settle(redis_client)
    brief = [(e["deviceId"], e["status"], e["version"], e["reason"]) for e in node_seed.events]
    assert brief == [("d1", "online", 1, "connected"), ("d1", "offline", 2, "closed")]
    assert all(e["device_id"] == e["deviceId"] for e in node_seed.events)
    assert await node_seed.call("manager", "getOfflineDevices") == ["d1"]


# --- one schema per Redis -------------------------------------------------------------------
async def test_a_python_schema_gateway_does_not_see_node_devices(
    node_seed: NodeSeed, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Pointed at devices the Node.js classes wrote, a gateway with the default field names
    keeps serving its own, and neither lists nor serves theirs (no `device_id` field). The
    heartbeat keys are shared, though: it announces their expiry, in its own names only; and
    registering such an id through it replaces the classes' record."""
    settings = {"heartbeat_timeout": 10.0, "sweep_interval": 0.2}
    async with (
        live_gateway(redis_url, **settings) as gw,
        gw.client() as client,
        presence_feed(redis_client) as feed,
    ):
        await node_seed.set("manager", "heartbeatTimeout", 1)
        await node_seed.call("manager", "registerDevice", "n-1", "thermo", {"a": 1})
        await node_seed.call("manager", "deviceHeartbeat", "n-1", {"t": 1})
        await gw.gateway.presence.sweep()
        for path in ("/api/devices/n-1", "/api/devices/n-1/delta", "/api/devices/n-1/history"):
            response = await client.get(path)
            assert response.status_code == 404, (path, response.text)
        assert (await client.post("/api/devices/n-1/token")).status_code == 404
        patched = await client.patch("/api/devices/n-1/desired", json={"state": {"x": 1}})
        assert patched.status_code == 404, patched.text
        assert (await client.get("/api/devices")).json()["items"] == []
        stats = (await client.get("/api/stats")).json()
        assert (stats["registered"], stats["online"], stats["by_type"]) == (0, 0, {})
        created = await client.post("/api/devices", json={"device_id": "g-1", "device_type": "t"})
        assert created.status_code == 201
        listed = (await client.get("/api/devices")).json()["items"]
        assert [item["device_id"] for item in listed] == ["g-1"]

        offline = await feed.wait("n-1", "offline", within=TIMEOUT)
        assert "deviceId" not in offline and offline["reason"] == "expired"
        await feed.settle()
        assert len(feed.of("n-1", "offline")) == 1
        state = await node_seed.call("manager", "getDeviceState", "n-1")
        assert (state["status"], state["reportedState"], state["metadata"]) == (
            "offline",
            {"t": 1},
            {"a": 1},
        )

        again = await client.post("/api/devices", json={"device_id": "n-1", "device_type": "t"})
        assert again.status_code == 201, again.text
        assert await node_seed.call("manager", "getDeviceState", "n-1") is None
        assert (await client.get("/readyz")).status_code == 200


async def test_a_node_schema_gateway_does_not_see_python_devices(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    """The other way round: the Python classes' devices have no `deviceId` field."""
    async with live_gateway(redis_url, **NODE) as gw, gw.client() as client:
        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await asyncio.to_thread(manager.register_device, "py-1", "thermo")
            await asyncio.to_thread(manager.device_heartbeat, "py-1", {"t": 1})
        await gw.gateway.presence.sweep()
        assert (await client.get("/api/devices/py-1")).status_code == 404
        assert (await client.get("/api/devices")).json()["items"] == []
        assert (await client.get("/api/stats")).json()["registered"] == 0


def test_the_schema_is_read_from_the_environment() -> None:
    assert from_env({"GATEWAY_SEED_SCHEMA": "node"}).seed_schema == "node"
    assert from_env({}).seed_schema == "python"
    with pytest.raises(ConfigError, match=r"GATEWAY_SEED_SCHEMA.*python, node.*'nodejs'"):
        from_env({"GATEWAY_SEED_SCHEMA": "nodejs"})


async def test_gateway_serve_with_the_node_schema(
    node_seed: NodeSeed, redis_url: str, gateway_factory: GatewayFactory
) -> None:
    """`GATEWAY_SEED_SCHEMA=node` in the environment of `gateway serve`, as deployed."""
    gateway = gateway_factory(redis_url, GATEWAY_SEED_SCHEMA="node")
    await node_seed.call("manager", "registerDevice", "env-1", "meter", {"k": 1})
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=headers) as client:
        response = await client.get("/api/devices/env-1")
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"k": 1}
    assert "single node, node field names" in gateway.log_text()
