"""Bad requests get their specific problem, and leave Redis exactly as it was.

Each case is sent to a gateway holding a small fleet; a full dump of the database (every key's
`DUMP`, plus `DBSIZE`) taken before and after must be identical.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis
from live import ADMIN_KEY, READ_KEY, LiveGateway, live_gateway

PROBLEM = "application/problem+json"
NO_KEY = ""
BAD_ID_129 = "x" * 129
DEEP: dict[str, Any] = {"leaf": 1}
for _ in range(8):
    DEEP = {"n": DEEP}  # nine levels of objects: one more than the limit


@dataclass
class Case:
    method: str
    path: str
    status: int
    kind: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    key: str = ADMIN_KEY
    parameter: str | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.params or ''} → {self.status} {self.kind}"


async def database_dump(client: aioredis.Redis) -> tuple[int, dict[bytes, bytes | None]]:
    """Every key with its serialized value: equal dumps mean nothing was written."""
    keys = [key async for key in client.scan_iter(count=1000)]
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.dump(key)
        values = await pipe.execute()
    return int(await client.dbsize()), dict(zip(keys, values, strict=True))


@pytest.fixture
async def fleet(redis_url: str) -> AsyncIterator[LiveGateway]:
    """A gateway with a few devices, one with a desired state, one online."""
    # no fleet-counts sample: it writes a point every 10 s of the wall clock, while these
    # tests compare the whole database before and after each request
    async with live_gateway(redis_url, fleet_sampling=False) as gw:
        store = gw.gateway.store
        await store.register("dev-1", "thermo", {"room": "lab"})
        await store.register("dev-2", "lamp", {})
        await store.patch_section("dev-1", "desired", {"temp": 20})
        yield gw


async def send(gw: LiveGateway, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.key:
        headers["Authorization"] = f"Bearer {case.key}"
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        return await client.request(
            case.method,
            case.path,
            json=case.json,
            content=case.content,
            headers=headers,
            params=case.params,
        )


async def check_cases(gw: LiveGateway, redis_client: aioredis.Redis, cases: list[Case]) -> None:
    failures: list[str] = []
    for case in cases:
        before = await database_dump(redis_client)
        response = await send(gw, case)
        after = await database_dump(redis_client)
        problem = response.json() if response.headers.get("content-type") == PROBLEM else None
        wrong = []
        if response.status_code != case.status:
            wrong.append(f"status {response.status_code}")
        if problem is None:
            wrong.append(f"content-type {response.headers.get('content-type')}")
        else:
            if problem.get("type") != f"https://presence-gateway.dev/problems/{case.kind}":
                wrong.append(f"type {problem.get('type')}")
            if problem.get("status") != case.status or not problem.get("title"):
                wrong.append("status/title fields")
            sent = response.request.url.raw_path.partition(b"?")[0].decode()
            if problem.get("instance") != sent:
                wrong.append(f"instance {problem.get('instance')}")
            if case.parameter is not None and problem.get("parameter") != case.parameter:
                wrong.append(f"parameter {problem.get('parameter')}")
            if "Traceback" in response.text:
                wrong.append("a stack trace")
        if after != before:
            wrong.append("Redis changed")
        if wrong:
            failures.append(f"{case}: {', '.join(wrong)}: {response.text[:200]}")
    assert not failures, "\n".join(failures)


BAD_IDS = ["a:b", "a*", "a b", BAD_ID_129, "a?b", "a[b]"]


async def test_bad_device_ids_in_paths(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    cases: list[Case] = []
    for bad in BAD_IDS:
        path = f"/api/devices/{quote(bad, safe='')}"
        cases += [
            Case("GET", path, 422, "invalid-device-id"),
            Case("PATCH", path, 422, "invalid-device-id", json={"metadata": {"a": 1}}),
            Case("DELETE", path, 422, "invalid-device-id"),
            Case("PATCH", path + "/desired", 422, "invalid-device-id", json={"state": {"a": 1}}),
            Case("GET", path + "/delta", 422, "invalid-device-id"),
            Case("GET", path + "/history", 422, "invalid-device-id"),
            Case("POST", path + "/token", 422, "invalid-device-id"),
        ]
    await check_cases(fleet, redis_client, cases)


async def test_bad_registrations(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    path = "/api/devices"
    cases = [
        Case("POST", path, 422, "invalid-device-id", json={"device_id": bad, "device_type": "t"})
        for bad in [*BAD_IDS, ""]
    ]
    cases += [
        Case(
            "POST",
            path,
            422,
            "invalid-device-type",
            json={"device_id": "new-1", "device_type": bad},
        )
        for bad in ["t:x", "t*", "t t", "t" * 65, ""]
    ]
    cases += [
        Case(
            "POST", path, 422, "invalid-request", json={"device_type": "t"}, parameter="device_id"
        ),
        Case(
            "POST",
            path,
            422,
            "invalid-request",
            json={"device_id": "new-1"},
            parameter="device_type",
        ),
        Case(
            "POST",
            path,
            422,
            "invalid-request",
            json={"device_id": 5, "device_type": "t"},
            parameter="device_id",
        ),
        Case(
            "POST",
            path,
            422,
            "invalid-request",
            json={"device_id": "n", "device_type": None},
            parameter="device_type",
        ),
        Case(
            "POST",
            path,
            422,
            "invalid-state",
            json={"device_id": "n", "device_type": "t", "metadata": "x"},
            parameter="metadata",
        ),
        Case(
            "POST",
            path,
            422,
            "invalid-state",
            json={"device_id": "n", "device_type": "t", "metadata": [1]},
            parameter="metadata",
        ),
        Case(
            "POST",
            path,
            422,
            "invalid-request",
            json={"device_id": "n", "device_type": "t", "token": "mine"},
            parameter="token",
        ),
        Case(
            "POST",
            path,
            422,
            "state-too-deep",
            json={"device_id": "n", "device_type": "t", "metadata": DEEP},
        ),
        Case(
            "POST",
            path,
            413,
            "state-too-large",
            json={"device_id": "n", "device_type": "t", "metadata": {"b": "x" * 40_000}},
        ),
        Case("POST", path, 409, "device-exists", json={"device_id": "dev-1", "device_type": "t"}),
    ]
    await check_cases(fleet, redis_client, cases)


async def test_malformed_and_mistyped_bodies(
    fleet: LiveGateway, redis_client: aioredis.Redis
) -> None:
    json_header = {"Content-Type": "application/json"}
    targets = [
        ("POST", "/api/devices"),
        ("PATCH", "/api/devices/dev-1"),
        ("PATCH", "/api/devices/dev-1/desired"),
    ]
    cases: list[Case] = []
    for method, path in targets:
        for raw in [b"{", b"{'a': 1}", b"", b"   ", b"\xff\xfe", b'{"a": 1} x', b"NaN"]:
            cases.append(Case(method, path, 400, "invalid-json", content=raw, headers=json_header))
        for value in [b"[]", b'"x"', b"1", b"null", b"true"]:
            cases.append(
                Case(
                    method,
                    path,
                    422,
                    "invalid-request",
                    content=value,
                    headers=json_header,
                    parameter="body",
                )
            )
        cases += [
            Case(
                method,
                path,
                415,
                "unsupported-media-type",
                content=b"{}",
                headers={"Content-Type": "text/plain"},
            ),
            Case(method, path, 415, "unsupported-media-type", content=b"{}"),
            Case(
                method,
                path,
                415,
                "unsupported-media-type",
                content=b"a=1",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
        ]
    await check_cases(fleet, redis_client, cases)


async def test_bad_shadow_writes(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    desired = "/api/devices/dev-1/desired"
    meta = "/api/devices/dev-1"
    cases = [
        Case("PATCH", desired, 422, "invalid-request", json={}, parameter="state"),
        Case("PATCH", desired, 422, "invalid-state", json={"state": [1]}, parameter="state"),
        Case("PATCH", desired, 422, "invalid-state", json={"state": None}, parameter="state"),
        Case("PATCH", desired, 422, "invalid-state", json={"state": "on"}, parameter="state"),
        Case(
            "PATCH",
            desired,
            422,
            "invalid-request",
            json={"state": {}, "version": "1"},
            parameter="version",
        ),
        Case(
            "PATCH",
            desired,
            422,
            "invalid-request",
            json={"state": {}, "version": True},
            parameter="version",
        ),
        Case(
            "PATCH",
            desired,
            422,
            "invalid-request",
            json={"state": {}, "version": -1},
            parameter="version",
        ),
        Case(
            "PATCH",
            desired,
            422,
            "invalid-request",
            json={"state": {}, "version": 1.5},
            parameter="version",
        ),
        Case(
            "PATCH",
            desired,
            422,
            "invalid-request",
            json={"state": {}, "extra": 1},
            parameter="extra",
        ),
        Case("PATCH", desired, 413, "state-too-large", json={"state": {"b": "x" * 33_000}}),
        Case(
            "PATCH",
            desired,
            413,
            "state-too-large",
            json={"state": {f"k{i}": "x" * 100 for i in range(400)}},
        ),
        Case("PATCH", desired, 422, "state-too-deep", json={"state": DEEP}),
        Case("PATCH", desired, 422, "state-too-deep", json={"state": {"a": [[[[[[[[[1]]]]]]]]]}}),
        Case("PATCH", desired, 422, "invalid-state-key", json={"state": {"": 1}}),
        Case("PATCH", desired, 422, "invalid-state-key", json={"state": {"k" * 129: 1}}),
        Case("PATCH", desired, 409, "version-conflict", json={"state": {"a": 1}, "version": 0}),
        Case("PATCH", meta, 422, "invalid-request", json={}, parameter="metadata"),
        Case("PATCH", meta, 422, "invalid-state", json={"metadata": 3}, parameter="metadata"),
        Case(
            "PATCH",
            meta,
            422,
            "invalid-request",
            json={"metadata": {}, "device_type": "x"},
            parameter="device_type",
        ),
        Case("PATCH", meta, 422, "state-too-deep", json={"metadata": DEEP}),
        Case("PATCH", meta, 413, "state-too-large", json={"metadata": {"b": "x" * 33_000}}),
    ]
    await check_cases(fleet, redis_client, cases)


async def test_oversize_bodies(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    huge = b'{"state": {"b": "' + b"x" * (300 * 1024) + b'"}}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 16 * 1024):
            yield huge[start : start + 16 * 1024]

    json_header = {"Content-Type": "application/json"}
    cases = [
        Case(
            "PATCH",
            "/api/devices/dev-1/desired",
            413,
            "body-too-large",
            content=huge,
            headers=json_header,
        ),
        Case("POST", "/api/devices", 413, "body-too-large", content=huge, headers=json_header),
        Case(
            "PATCH", "/api/devices/dev-1", 413, "body-too-large", content=huge, headers=json_header
        ),
    ]
    await check_cases(fleet, redis_client, cases)

    # no Content-Length: the limit holds on what is read
    before = await database_dump(redis_client)
    async with fleet.client() as client:
        response = await client.patch(
            "/api/devices/dev-1/desired", content=chunks(), headers=json_header
        )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["type"].endswith("/body-too-large")
    assert await database_dump(redis_client) == before


async def test_unknown_devices(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    path = "/api/devices/ghost"
    cases = [
        Case("GET", path, 404, "device-not-found"),
        Case("PATCH", path, 404, "device-not-found", json={"metadata": {"a": 1}}),
        Case("DELETE", path, 404, "device-not-found"),
        Case("PATCH", path + "/desired", 404, "device-not-found", json={"state": {"a": 1}}),
        Case(
            "PATCH",
            path + "/desired",
            404,
            "device-not-found",
            json={"state": {"a": 1}, "version": 0},
        ),
        Case("GET", path + "/delta", 404, "device-not-found"),
        Case("GET", path + "/history", 404, "device-not-found"),
        Case("POST", path + "/token", 404, "device-not-found"),
    ]
    await check_cases(fleet, redis_client, cases)


async def test_missing_and_wrong_keys(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/api/devices", None),
        ("POST", "/api/devices", {"device_id": "n-1", "device_type": "t"}),
        ("GET", "/api/devices/dev-1", None),
        ("PATCH", "/api/devices/dev-1", {"metadata": {"a": 1}}),
        ("DELETE", "/api/devices/dev-1", None),
        ("PATCH", "/api/devices/dev-1/desired", {"state": {"a": 1}}),
        ("GET", "/api/devices/dev-1/delta", None),
        ("GET", "/api/devices/dev-1/history", None),
        ("POST", "/api/devices/dev-1/token", None),
        ("GET", "/api/presence/events", None),
        ("GET", "/api/stats", None),
    ]
    cases: list[Case] = []
    for method, path, body in requests:
        cases += [
            Case(method, path, 401, "unauthorized", json=body, key=NO_KEY),
            Case(method, path, 401, "unauthorized", json=body, key="not-a-key"),
            Case(
                method,
                path,
                401,
                "unauthorized",
                json=body,
                key=NO_KEY,
                headers={"Authorization": f"Basic {ADMIN_KEY}"},
            ),
        ]
        if method != "GET":
            cases.append(Case(method, path, 403, "forbidden", json=body, key=READ_KEY))
    await check_cases(fleet, redis_client, cases)

    async with httpx.AsyncClient(base_url=fleet.base_url) as client:
        missing = await client.get("/api/stats")
        wrong = await client.get("/api/stats", headers={"Authorization": "Bearer nope"})
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "invalid_token" not in missing.headers["www-authenticate"]
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]


async def test_bad_query_parameters(fleet: LiveGateway, redis_client: aioredis.Redis) -> None:
    devices = "/api/devices"
    history = "/api/devices/dev-1/history"
    events = "/api/presence/events"
    bad: list[tuple[str, dict[str, Any], str]] = [
        (devices, {"colour": "red"}, "colour"),
        (devices, {"status": "maybe"}, "status"),
        (devices, {"status": ""}, "status"),
        (devices, {"limit": "0"}, "limit"),
        (devices, {"limit": "1001"}, "limit"),
        (devices, {"limit": "ten"}, "limit"),
        (devices, {"limit": "-5"}, "limit"),
        (devices, {"limit": "2.5"}, "limit"),
        (devices, {"stale_seconds": "-1"}, "stale_seconds"),
        (devices, {"stale_seconds": "nan"}, "stale_seconds"),
        (devices, {"stale_seconds": "inf"}, "stale_seconds"),
        (devices, {"stale_seconds": "soon"}, "stale_seconds"),
        (devices, {"include_state": "maybe"}, "include_state"),
        (devices, {"type": "a:b"}, "type"),
        (devices, {"type": "*"}, "type"),
        (devices, {"type": ""}, "type"),
        (devices, {"limit": ["5", "6"]}, "limit"),
        (history, {"limit": "0"}, "limit"),
        (history, {"limit": "501"}, "limit"),
        (history, {"before": "abc"}, "before"),
        (history, {"after": "0-0"}, "after"),
        # `after` is an opaque position: only its shape is checked here
        (events, {"after": ""}, "after"),
        (events, {"after": "a b"}, "after"),
        (events, {"after": "1/2"}, "after"),
        (events, {"after": "x" * 2049}, "after"),
        (events, {"limit": "0"}, "limit"),
        (events, {"before": "0"}, "before"),
        ("/api/stats", {"verbose": "1"}, "verbose"),
        ("/api/devices/dev-1", {"fields": "all"}, "fields"),
    ]
    cases = [
        Case("GET", path, 422, "invalid-request", params=params, parameter=name)
        for path, params, name in bad
    ]
    cases += [
        Case("GET", devices, 400, "invalid-cursor", params={"cursor": "not-a-cursor"}),
        Case("GET", devices, 400, "invalid-cursor", params={"cursor": "W10"}),  # "[]"
        Case("GET", devices, 400, "invalid-cursor", params={"cursor": "x" * 2000}),
        # well formed, but no position this gateway issued
        Case("GET", events, 400, "invalid-cursor", params={"after": "yesterday"}),
        Case("GET", events, 400, "invalid-cursor", params={"after": "1-2-3"}),
        Case(
            "GET",
            events,
            400,
            "invalid-cursor",
            params={"after": "18446744073709551615-18446744073709551615"},
        ),
        Case("GET", events, 400, "invalid-cursor", params={"after": "x" * 2048}),
    ]
    await check_cases(fleet, redis_client, cases)


async def test_problem_details_name_the_field(fleet: LiveGateway) -> None:
    async with fleet.client() as client:
        response = await client.patch("/api/devices/dev-1/desired", json={"state": [1]})
        assert "state" in response.json()["detail"] and "array" in response.json()["detail"]
        response = await client.get("/api/devices", params={"limit": "0"})
        assert "limit" in response.json()["detail"] and "1–1000" in response.json()["detail"]
        response = await client.get("/api/devices", params={"colour": "red"})
        assert "colour" in response.json()["detail"]
        deep = await client.patch("/api/devices/dev-1/desired", json={"state": DEEP})
        assert deep.json()["path"].startswith("n.n.n")
        # each refusal says what the field must be, and what arrived
        expected = {
            ("POST", "/api/devices", '{"device_id": 5, "device_type": "t"}'): (
                "device_id must be 1–128 characters of A-Z a-z 0-9 . _ -, got number"
            ),
            ("POST", "/api/devices", '{"device_id": "a:b", "device_type": "t"}'): (
                "device_id must be 1–128 characters of A-Z a-z 0-9 . _ -, got 'a:b'"
            ),
            ("POST", "/api/devices", '{"device_type": "t"}'): "device_id is required",
            ("POST", "/api/devices", '{"device_id": "n", "device_type": "t", "x": 1}'): (
                "unknown field 'x'; expected device_id, device_type, metadata"
            ),
            ("PATCH", "/api/devices/dev-1/desired", '{"state": {}, "version": -1}'): (
                "version must be an integer ≥ 0, got -1"
            ),
            ("GET", "/api/presence/events?after=a%20b", ""): "1–2048 characters",
            ("GET", "/api/devices/dev-1/history?limit=501", ""): (
                "limit must be an integer 1–500, got '501'"
            ),
            ("GET", "/api/devices?stale_seconds=inf", ""): (
                "stale_seconds must be a number ≥ 0 (seconds), got 'inf'"
            ),
            ("GET", "/api/devices?status=null", ""): (
                "status must be one of offline|online, got 'null'"
            ),
            ("GET", "/api/devices/a:b", ""): "device_id must be 1–128 characters",
        }
        json_header = {"Content-Type": "application/json"}
        for (method, path, body), words in expected.items():
            response = await client.request(method, path, content=body, headers=json_header)
            assert words in response.json()["detail"], (method, path, response.text)


async def test_a_client_leaving_mid_body_is_no_error(
    fleet: LiveGateway, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Headers and part of a body, then the socket closes: nothing is written, and the log
    gets no error (there is no one left to answer), only a debug line."""
    caplog.set_level(logging.DEBUG, logger="gateway.api")
    before = await database_dump(redis_client)
    part = b'{"device_id": "half-1", "device_type": "t", "metadata": {"pad": "xxxx'
    targets = [("POST", "/api/devices"), ("PATCH", "/api/devices/dev-1/desired"),
               ("POST", "/api/session")]  # fmt: skip
    for method, path in targets:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{fleet.port}\r\n"
            f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(part) + 1000}\r\n\r\n"
        )
        _, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
        writer.write(head.encode() + part)
        await writer.drain()
        await asyncio.sleep(0.1)  # the endpoint is waiting for the rest of the body now
        writer.close()
        await writer.wait_closed()

    def answered() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.api"]

    for _ in range(250):  # five seconds at most
        if len(answered()) >= len(targets):
            break
        await asyncio.sleep(0.02)
    assert len(answered()) == len(targets), caplog.text
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud]
    assert await database_dump(redis_client) == before
    async with fleet.client() as client:  # and the gateway answers the next client as ever
        assert (await client.get("/api/devices/dev-1")).status_code == 200
