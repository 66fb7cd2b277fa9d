"""Per-section shadow versions over HTTP: `desired_version` and `reported_version` beside the
whole-shadow `version`, so a device's own reports never conflict with a desired-state edit."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
from live import LiveGateway, live_gateway
from websockets.asyncio.client import ClientConnection, connect

from gateway.keys import OWN_FIELDS

TIMEOUT = 5.0


async def register(client: httpx.AsyncClient, device_id: str) -> str:
    response = await client.post("/api/devices", json={"device_id": device_id, "device_type": "t"})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def open_device(gw: LiveGateway, device_id: str, token: str) -> connect:
    return connect(
        f"{gw.ws_url}/ws/devices/{device_id}",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    )


async def receive_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame: dict[str, Any] = orjson.loads(await ws.recv())
            if frame["type"] == kind:
                return frame


async def report(ws: ClientConnection, state: dict[str, Any], request_id: int) -> int:
    """A `report` frame, answered once it is written: returns the shadow version it made."""
    await ws.send(
        orjson.dumps({"type": "report", "reported_state": state, "id": request_id}).decode()
    )
    ack = await receive_type(ws, "ack")
    assert ack["id"] == request_id
    version: int = ack["version"]
    return version


async def versions(client: httpx.AsyncClient, device_id: str) -> tuple[int, int, int]:
    device = (await client.get(f"/api/devices/{device_id}")).json()
    return device["version"], device["desired_version"], device["reported_version"]


async def test_reports_move_reported_version_and_never_conflict_with_an_edit(
    redis_url: str,
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        token = await register(client, "sv-1")
        assert await versions(client, "sv-1") == (0, 0, 0)
        async with open_device(gw, "sv-1", token) as device:
            await receive_type(device, "welcome")
            for index in range(3):
                await report(device, {"temp": 20 + index}, index)
            assert await versions(client, "sv-1") == (3, 0, 3)

            # an editor that loaded desired_version 0 before the reports still applies
            edit = await client.patch(
                "/api/devices/sv-1/desired", json={"state": {"target": 22}, "desired_version": 0}
            )
            assert edit.status_code == 200, edit.text
            body = edit.json()
            assert (body["version"], body["desired_version"], body["reported_version"]) == (4, 1, 3)
            assert body["desired_state"] == {"target": 22}
            assert (await receive_type(device, "state_update"))["desired_state"] == {"target": 22}

            # a heartbeat carrying a changed document moves the reported section too
            await device.send(
                orjson.dumps({"type": "heartbeat", "reported_state": {"temp": 9}}).decode()
            )
            await device.send(orjson.dumps({"type": "get", "id": "g"}).decode())
            await receive_type(device, "shadow")
            assert await versions(client, "sv-1") == (5, 1, 4)

        # the whole-shadow version read before a report is stale; desired_version is not
        stale = await client.patch(
            "/api/devices/sv-1/desired", json={"state": {"target": 23}, "version": 4}
        )
        assert stale.status_code == 409
        problem = stale.json()
        assert (problem["parameter"], problem["expected_version"]) == ("version", 4)
        assert (problem["current_version"], problem["current_desired_version"]) == (5, 1)
        fresh = await client.patch(
            "/api/devices/sv-1/desired",
            json={"state": {"target": 23}, "version": 5, "desired_version": 1},
        )
        assert fresh.status_code == 200, fresh.text
        assert (fresh.json()["version"], fresh.json()["desired_version"]) == (6, 2)


async def test_a_stale_desired_version_conflicts_once_and_writes_nothing(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "sv-2")
        first = await client.patch("/api/devices/sv-2/desired", json={"state": {"a": 1}})
        assert first.json()["desired_version"] == 1
        stale = await client.patch(
            "/api/devices/sv-2/desired", json={"state": {"a": 2}, "desired_version": 0}
        )
        assert stale.status_code == 409
        problem = stale.json()
        assert problem["type"].endswith("/version-conflict")
        assert problem["parameter"] == "desired_version"
        assert (problem["expected_desired_version"], problem["current_desired_version"]) == (0, 1)
        assert problem["current_version"] == 1
        # the detail says it once
        assert problem["detail"].count("1") == 1 and problem["detail"].count("0") == 1
        assert (await client.get("/api/devices/sv-2")).json()["desired_state"] == {"a": 1}
        assert await versions(client, "sv-2") == (1, 1, 0)

        for bad in ("1", True, -1, 1.5):
            refused = await client.patch(
                "/api/devices/sv-2/desired", json={"state": {}, "desired_version": bad}
            )
            assert refused.status_code == 422, bad
            assert refused.json()["parameter"] == "desired_version"


async def test_devices_without_section_versions_read_as_zero(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "sv-3")
        await client.patch("/api/devices/sv-3/desired", json={"state": {"a": 1}})
        key = gw.gateway.keys.state("sv-3")
        # as a device written before section versions existed
        await gw.gateway.redis.hdel(key, OWN_FIELDS.desired_version, OWN_FIELDS.reported_version)
        assert await versions(client, "sv-3") == (1, 0, 0)
        edit = await client.patch(
            "/api/devices/sv-3/desired", json={"state": {"b": 2}, "desired_version": 0}
        )
        assert edit.status_code == 200, edit.text
        assert await versions(client, "sv-3") == (2, 1, 0)
