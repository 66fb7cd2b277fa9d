"""The REST API beside the seed document's own classes, on one Redis (contract §2)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import redis
from live import live_gateway

pytestmark = pytest.mark.seed

T = TypeVar("T")


async def blocking(call: Callable[..., T], *args: Any) -> T:
    """Run a seed call (sync redis-py) off the loop that serves the gateway."""
    return await asyncio.to_thread(call, *args)


async def test_seed_registered_device_is_online_through_the_api(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.register_device, "seed-1", "thermo", {"site": "north"})
            await blocking(manager.device_heartbeat, "seed-1", {"temp": 19.5})

        response = await client.get("/api/devices/seed-1")
        assert response.status_code == 200, response.text
        device = response.json()
        assert device["status"] == "online"
        assert device["device_type"] == "thermo"
        assert device["metadata"] == {"site": "north"}
        assert device["reported_state"] == {"temp": 19.5}
        assert device["last_seen"] > 0

        # once indexed (the sweep does this; here directly) it shows in the bulk queries too
        await gw.gateway.store.adopt(["seed-1"])
        page = (await client.get("/api/devices", params={"status": "online"})).json()
        assert [item["device_id"] for item in page["items"]] == ["seed-1"]
        stats = (await client.get("/api/stats")).json()
        assert stats["registered"] == 1 and stats["online"] == 1


async def test_seed_reads_what_the_api_writes(seed: types.SimpleNamespace, redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
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

        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.device_heartbeat, "api-1", {"open": False})
            state = await blocking(manager.get_device_state, "api-1")
            delta = await blocking(manager.get_state_delta, "api-1")
            bulk = seed.BulkStateQuery(sync)
            by_type = await blocking(bulk.get_devices_by_type, "valve", True)

        assert state is not None
        assert state.device_id == "api-1"
        assert state.status.value == "online"
        assert state.desired_state == {"open": True, "flow": {"max": 12, "unit": "l/min"}}
        assert state.reported_state == {"open": False}
        assert state.metadata == {"line": 3}

        assert delta["device_id"] == "api-1" and delta["in_sync"] is False
        assert delta["delta"] == {
            "open": {"desired": True, "reported": False},
            "flow": {"desired": {"max": 12, "unit": "l/min"}, "reported": None},
        }

        rows = {row["device_id"]: row for row in by_type}
        assert set(rows) == {"api-1", "api-2"}
        assert rows["api-1"]["status"] == "online" and rows["api-1"]["reported_state"] == {
            "open": False
        }
        assert rows["api-2"]["status"] == "offline" and rows["api-2"]["reported_state"] == {}

        # and the API agrees with what the seed wrote
        ours = (await client.get("/api/devices/api-1/delta")).json()
        assert ours["delta"]["open"] == {"desired": True, "reported": False}
        assert ours["delta"]["flow"] == {
            "max": {"desired": 12, "reported": None},
            "unit": {"desired": "l/min", "reported": None},
        }


async def test_seed_desired_state_shows_merged_in_the_api(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        response = await client.post(
            "/api/devices", json={"device_id": "m-1", "device_type": "lamp"}
        )
        assert response.status_code == 201
        first = await client.patch(
            "/api/devices/m-1/desired", json={"state": {"brightness": 40, "color": "warm"}}
        )
        assert first.status_code == 200

        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.set_desired_state, "m-1", {"brightness": 80, "on": True})

        device = (await client.get("/api/devices/m-1")).json()
        assert device["desired_state"] == {"brightness": 80, "color": "warm", "on": True}

        # our next merge builds on the seed's write rather than overwriting it
        after = await client.patch("/api/devices/m-1/desired", json={"state": {"color": None}})
        assert after.status_code == 200, after.text
        assert after.json()["desired_state"] == {"brightness": 80, "on": True}
        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            state = await blocking(manager.get_device_state, "m-1")
        assert state is not None and state.desired_state == {"brightness": 80, "on": True}


async def test_seed_registered_device_gets_its_first_token(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        with redis.Redis.from_url(redis_url) as sync:
            await blocking(seed.DeviceStateManager(sync).register_device, "legacy-1", "meter")
        assert await gw.gateway.store.check_token("legacy-1", "anything") == (True, None)
        response = await client.post("/api/devices/legacy-1/token")
        assert response.status_code == 200, response.text
        token = response.json()["token"]
        exists, digest = await gw.gateway.store.check_token("legacy-1", token)
        assert exists and digest is not None


async def test_a_seed_desired_write_moves_the_versions_and_is_recorded(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        response = await client.post("/api/devices", json={"device_id": "fw-1", "device_type": "t"})
        assert response.status_code == 201
        first = await client.patch("/api/devices/fw-1/desired", json={"state": {"a": 1}})
        assert (first.json()["version"], first.json()["desired_version"]) == (1, 1)

        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.set_desired_state, "fw-1", {"b": 2})

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


async def test_a_seed_registered_device_counts_the_seeds_desired_writes(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.register_device, "fw-2", "meter")
        before = (await client.get("/api/devices/fw-2")).json()
        assert (before["version"], before["desired_version"]) == (0, 0)
        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.set_desired_state, "fw-2", {"on": True})
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


async def test_a_seed_reported_write_is_counted_only_by_the_next_report(
    seed: types.SimpleNamespace, redis_url: str
) -> None:
    """The documented limit: the heartbeat path does not hash documents."""
    async with live_gateway(redis_url) as gw, gw.client() as client:
        response = await client.post("/api/devices", json={"device_id": "fw-3", "device_type": "t"})
        assert response.status_code == 201
        with redis.Redis.from_url(redis_url) as sync:
            manager = seed.DeviceStateManager(sync)
            await blocking(manager.device_heartbeat, "fw-3", {"temp": 1})
        device = (await client.get("/api/devices/fw-3")).json()
        assert device["reported_state"] == {"temp": 1}
        assert (device["version"], device["reported_version"]) == (0, 0)
