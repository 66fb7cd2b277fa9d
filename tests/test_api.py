"""The REST API's happy paths (contract §4), end to end over HTTP against real Redis engines."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from live import READ_KEY, LiveGateway, live_gateway
from servers import RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import openapi
from gateway.app import create_app
from gateway.config import Settings
from gateway.endpoints import api
from gateway.keys import OWN_FIELDS
from gateway.presence import PresenceEngine

PROBLEM = "application/problem+json"


def presence(gw: LiveGateway) -> PresenceEngine:
    """The gateway's own presence transitions, driven directly (no socket needed)."""
    g = gw.gateway
    return PresenceEngine(g.redis, g.store, g.settings, g.metrics, lambda *_: None, g.db)


async def connect(gw: LiveGateway, ids: list[str]) -> None:
    engine = presence(gw)
    for device_id in ids:
        welcome = await engine.connect(device_id, uuid.uuid4().hex, "")
        assert welcome is not None, device_id


async def go_offline(gw: LiveGateway, ids: list[str]) -> None:
    """A lapsed heartbeat, as the expiry detectors see it."""
    await gw.gateway.redis.delete(*(gw.gateway.keys.heartbeat(i) for i in ids))
    assert await presence(gw).expire(ids) == len(ids)


async def register(
    client: httpx.AsyncClient,
    device_id: str,
    device_type: str = "thermo",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"device_id": device_id, "device_type": device_type}
    if metadata is not None:
        body["metadata"] = metadata
    response = await client.post("/api/devices", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def register_many(gw: LiveGateway, count: int, types: tuple[str, ...]) -> list[str]:
    """Many devices quickly, through the store (the API path is covered elsewhere)."""
    ids = [f"dev-{index:04d}" for index in range(count)]
    for index, device_id in enumerate(ids):
        await gw.gateway.store.register(device_id, types[index % len(types)], {})
    return ids


async def walk(client: httpx.AsyncClient, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a paginated listing, and how many pages it took."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/api/devices", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= int(params.get("limit", 100))
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
        assert pages < 1000, "pagination never ended"


def ids_of(items: list[dict[str, Any]]) -> list[str]:
    return [item["device_id"] for item in items]


async def test_register_get_patch_delete(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        created = await register(client, "lamp-1", "lamp", {"room": "hall", "floor": 1})
        assert created["token"]
        assert created["device_id"] == "lamp-1" and created["device_type"] == "lamp"
        assert created["status"] == "offline" and created["metadata"] == {
            "room": "hall",
            "floor": 1,
        }

        response = await client.get("/api/devices/lamp-1")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        device = response.json()
        assert "token" not in device
        for field in (
            "device_id",
            "status",
            "reported_state",
            "desired_state",
            "last_seen",
            "metadata",
            "device_type",
            "registered_at",
            "version",
        ):
            assert field in device, field
        assert device["registered_at"] > 0 and device["version"] == 0

        response = await client.patch(
            "/api/devices/lamp-1", json={"metadata": {"room": None, "owner": "ana"}}
        )
        assert response.status_code == 200, response.text
        assert response.json()["metadata"] == {"floor": 1, "owner": "ana"}

        response = await client.delete("/api/devices/lamp-1")
        assert response.status_code == 204 and response.content == b""
        assert (await client.get("/api/devices/lamp-1")).status_code == 404
        assert not await gw.gateway.redis.exists(gw.gateway.keys.state("lamp-1"))


async def test_register_answers_with_location_and_refuses_duplicates(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        response = await client.post(
            "/api/devices", json={"device_id": "a.b_c-1", "device_type": "t"}
        )
        assert response.status_code == 201
        assert response.headers["location"] == "/api/devices/a.b_c-1"
        assert (await client.get(response.headers["location"])).json()["device_id"] == "a.b_c-1"

        again = await client.post(
            "/api/devices", json={"device_id": "a.b_c-1", "device_type": "other"}
        )
        assert again.status_code == 409
        assert again.headers["content-type"] == PROBLEM
        assert again.json()["type"].endswith("/device-exists")
        assert (await client.get("/api/devices/a.b_c-1")).json()["device_type"] == "t"


async def test_read_key_reads(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as admin, gw.client(READ_KEY) as reader:
        await register(admin, "r-1")
        assert (await reader.get("/api/devices/r-1")).status_code == 200
        assert (await reader.get("/api/devices")).json()["items"][0]["device_id"] == "r-1"
        assert (await reader.get("/api/stats")).json()["registered"] == 1
        assert (await reader.get("/api/devices/r-1/delta")).status_code == 200
        assert (await reader.get("/api/devices/r-1/history")).status_code == 200
        assert (await reader.get("/api/presence/events")).status_code == 200


async def test_desired_merges_and_reports_delta(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "hvac-1", "hvac")
        response = await client.patch(
            "/api/devices/hvac-1/desired",
            json={"state": {"temp": 21, "fan": {"speed": 2, "mode": "auto"}, "led": True}},
        )
        assert response.status_code == 200, response.text
        first = response.json()
        assert first["device_id"] == "hvac-1" and first["version"] == 1
        assert first["delta"] == {
            "temp": {"desired": 21, "reported": None},
            "fan": {
                "speed": {"desired": 2, "reported": None},
                "mode": {"desired": "auto", "reported": None},
            },
            "led": {"desired": True, "reported": None},
        }

        # the device reports part of it; the delta keeps only what still differs
        await gw.gateway.store.patch_section(
            "hvac-1", "reported", {"temp": 21, "fan": {"speed": 1, "mode": "auto"}}
        )
        response = await client.patch(
            "/api/devices/hvac-1/desired",
            json={"state": {"led": None, "fan": {"speed": 3}}, "version": 2},
        )
        assert response.status_code == 200, response.text
        second = response.json()
        assert second["version"] == 3
        assert second["desired_state"] == {"temp": 21, "fan": {"speed": 3, "mode": "auto"}}
        assert second["delta"] == {"fan": {"speed": {"desired": 3, "reported": 1}}}

        delta = (await client.get("/api/devices/hvac-1/delta")).json()
        assert delta["device_id"] == "hvac-1" and delta["in_sync"] is False
        assert delta["delta"] == second["delta"] and delta["version"] == 3

        device = (await client.get("/api/devices/hvac-1")).json()
        assert device["desired_state"] == second["desired_state"]
        assert device["version"] == 3


async def test_stale_version_conflicts_and_writes_nothing(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "v-1")
        ok = await client.patch("/api/devices/v-1/desired", json={"state": {"a": 1}, "version": 0})
        assert ok.status_code == 200 and ok.json()["version"] == 1
        stale = await client.patch(
            "/api/devices/v-1/desired", json={"state": {"a": 2}, "version": 0}
        )
        assert stale.status_code == 409
        assert stale.headers["content-type"] == PROBLEM
        problem = stale.json()
        assert problem["type"].endswith("/version-conflict")
        assert problem["current_version"] == 1 and problem["expected_version"] == 0
        assert problem["instance"] == "/api/devices/v-1/desired"
        assert (await client.get("/api/devices/v-1")).json()["desired_state"] == {"a": 1}


async def test_token_rotation_returns_a_new_token(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        first = (await register(client, "tok-1"))["token"]
        response = await client.post("/api/devices/tok-1/token")
        assert response.status_code == 200, response.text
        second = response.json()
        assert second["device_id"] == "tok-1" and second["token"] not in ("", first)
        store = gw.gateway.store
        assert await store.check_token("tok-1", first) == (True, None)
        exists, digest = await store.check_token("tok-1", second["token"])
        assert exists and digest
        third = (await client.post("/api/devices/tok-1/token")).json()["token"]
        assert third != second["token"]
        assert (await store.check_token("tok-1", second["token"]))[1] is None


async def test_pagination_walks_every_device_once(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        ids = await register_many(gw, 250, ("alpha", "beta"))
        online = ids[::3]
        await connect(gw, online)

        everything, pages = await walk(client, limit=100)
        assert sorted(ids_of(everything)) == ids and pages == 3
        assert len(set(ids_of(everything))) == len(everything)

        up, _ = await walk(client, status="online", limit=100)
        assert sorted(ids_of(up)) == sorted(online)
        assert all(item["status"] == "online" for item in up)

        down, _ = await walk(client, status="offline", limit=100)
        assert sorted(ids_of(down)) == sorted(set(ids) - set(online))
        assert all(item["status"] == "offline" for item in down)

        alpha, _ = await walk(client, type="alpha", limit=100)
        assert sorted(ids_of(alpha)) == ids[::2]
        alpha_up, _ = await walk(client, type="alpha", status="online", limit=7)
        assert sorted(ids_of(alpha_up)) == sorted(set(ids[::2]) & set(online))
        beta_down, _ = await walk(client, type="beta", status="offline", limit=33)
        assert sorted(ids_of(beta_down)) == sorted(set(ids[1::2]) - set(online))


async def test_page_items_with_and_without_state(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "s-1", metadata={"k": "v"})
        await client.patch("/api/devices/s-1/desired", json={"state": {"x": 1}})
        plain = (await client.get("/api/devices")).json()["items"][0]
        assert set(plain) == {"device_id", "device_type", "status", "last_seen", "version"}
        full = (await client.get("/api/devices", params={"include_state": "true"})).json()
        item = full["items"][0]
        assert item["desired_state"] == {"x": 1} and item["metadata"] == {"k": "v"}
        assert item["reported_state"] == {}
        assert full["next_cursor"] is None
        default = (await client.get("/api/devices", params={"include_state": "false"})).json()
        assert set(default["items"][0]) == set(plain)


async def test_stale_pages(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        ids = await register_many(gw, 30, ("alpha", "beta"))
        fresh = ids[:10]
        await connect(gw, fresh)  # seen now; the other 20 were never seen
        never_seen = set(ids) - set(fresh)

        stale, _ = await walk(client, stale_seconds=3600, limit=7)
        assert sorted(ids_of(stale)) == sorted(never_seen)
        assert len(stale) == len(never_seen)

        stale_alpha, _ = await walk(client, stale_seconds=3600, type="alpha", limit=4)
        assert sorted(ids_of(stale_alpha)) == sorted(never_seen & set(ids[::2]))

        stale_online, _ = await walk(client, stale_seconds=3600, status="online", limit=5)
        assert stale_online == []

        # once the fresh devices go offline they are still seen recently: not stale
        await go_offline(gw, fresh)
        stale_offline, _ = await walk(client, stale_seconds=3600, status="offline", limit=6)
        assert sorted(ids_of(stale_offline)) == sorted(never_seen)


async def test_history_newest_first_with_pagination(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "h-1")
        for value in range(5):
            response = await client.patch("/api/devices/h-1/desired", json={"state": {"n": value}})
            assert response.status_code == 200
        await connect(gw, ["h-1"])

        response = await client.get("/api/devices/h-1/history")
        assert response.status_code == 200
        history = response.json()
        assert history["next_before"] is None
        kinds = [(item["type"], item.get("state", {}).get("n")) for item in history["items"]]
        assert kinds == [("presence", None)] + [("state", n) for n in range(4, -1, -1)]
        assert history["items"][0]["status"] == "online"
        assert history["items"][0]["reason"] == "connected"

        seen: list[str] = []
        before: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"before": before} if before else {})}
            page = (await client.get("/api/devices/h-1/history", params=params)).json()
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            before = page["next_before"]
            if before is None:
                break
        assert seen == [item["id"] for item in history["items"]]


async def test_presence_events_after_an_id(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register_many(gw, 3, ("alpha",))
        await connect(gw, ["dev-0000", "dev-0001"])
        await client.patch("/api/devices/dev-0000/desired", json={"state": {"on": True}})
        await go_offline(gw, ["dev-0000"])

        response = await client.get("/api/presence/events")
        assert response.status_code == 200
        events = response.json()
        assert events["gap"] is False
        got = [(e["device_id"], e["status"], e["reason"]) for e in events["items"]]
        assert got == [
            ("dev-0000", "online", "connected"),
            ("dev-0001", "online", "connected"),
            ("dev-0000", "offline", "expired"),
        ]
        assert all(e["type"] == "presence" for e in events["items"])
        assert events["last_id"] == events["items"][-1]["id"]

        after_first = await client.get(
            "/api/presence/events", params={"after": events["items"][0]["id"]}
        )
        assert [e["id"] for e in after_first.json()["items"]] == [
            e["id"] for e in events["items"][1:]
        ]

        nothing = (
            await client.get("/api/presence/events", params={"after": events["last_id"]})
        ).json()
        assert nothing["items"] == [] and nothing["last_id"] == events["last_id"]

        # a small limit still moves forward, over the non-presence events too
        cursor, walked = "0-0", []
        for _ in range(100):
            page = (
                await client.get("/api/presence/events", params={"after": cursor, "limit": 1})
            ).json()
            walked += [e["id"] for e in page["items"]]
            if page["last_id"] == cursor:
                break
            cursor = page["last_id"]
        assert walked == [e["id"] for e in events["items"]]


async def test_stats_counts(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        empty = (await client.get("/api/stats")).json()
        assert empty == {"registered": 0, "online": 0, "offline": 0, "by_type": {}}
        for index in range(3):
            await register(client, f"a-{index}", "alpha")
        for index in range(2):
            await register(client, f"b-{index}", "beta")
        await connect(gw, ["a-0", "b-0", "b-1"])
        stats = (await client.get("/api/stats")).json()
        assert stats == {
            "registered": 5,
            "online": 3,
            "offline": 2,
            "by_type": {
                "alpha": {"registered": 3, "online": 1, "offline": 2},
                "beta": {"registered": 2, "online": 2, "offline": 0},
            },
        }
        await client.delete("/api/devices/b-1")
        stats = (await client.get("/api/stats")).json()
        assert stats["registered"] == 4 and stats["online"] == 2
        assert stats["by_type"]["beta"] == {"registered": 1, "online": 1, "offline": 0}


async def test_openapi_documents_every_route_of_the_app(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client(None) as anonymous:
        response = await anonymous.get("/openapi.json")
        assert response.status_code == 200
        document = response.json()
        app_routes = gw.server.config.app.app.routes
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    http_routes = [r for r in app_routes if isinstance(r, Route) and "{rest:path}" not in r.path]
    assert {"/api/session", "/healthz", "/readyz", "/metrics"} <= {r.path for r in http_routes}
    for route in http_routes:
        for method in (route.methods or set()) - {"HEAD"}:
            assert method.lower() in paths.get(route.path, {}), (method, route.path)
            operation = paths[route.path][method.lower()]
            assert any(status.startswith("2") for status in operation["responses"])
            if route.path.startswith("/api/") and operation.get("security") != []:
                assert "401" in operation["responses"], (route.path, method)
    assert paths["/metrics"]["get"]["responses"]["200"]["content"].keys() == {
        "text/plain; version=0.0.4"
    }
    login = paths["/api/session"]["post"]
    assert login["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/LoginRequest"
    )
    # every $ref resolves
    schemas = document["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in document["components"][section], ref
    assert "Problem" in schemas


def test_a_route_that_declares_no_operation_is_refused(redis_url: str) -> None:
    """The document is built from the route table: an undeclared route cannot go missing."""
    routes = create_app(Settings(redis_url=redis_url)).app.routes

    async def undeclared(request: Request) -> Response:
        return Response()

    openapi.document(routes)  # the app as it is declares every route
    with pytest.raises(LookupError, match="/api/extra"):
        openapi.document([*routes, Route("/api/extra", undeclared)])
    # nor can an endpoint declare other path parameters than its route has
    with pytest.raises(LookupError, match=re.escape("/api/other/{name}")):
        openapi.document([Route("/api/other/{name}", api.get_device)])


@pytest.mark.parametrize("path", ["/api/nothing", "/api/devices/x/unknown"])
async def test_unknown_api_paths_are_problems(redis_url: str, path: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        response = await client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["type"].endswith("/not-found")


async def test_wrong_method_is_405_problem_with_allow(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        response = await client.put("/api/devices/x", json={})
        assert response.status_code == 405
        assert response.headers["content-type"] == PROBLEM
        assert set(response.headers["allow"].split(", ")) >= {"GET", "PATCH", "DELETE"}
        assert response.json()["type"].endswith("/method-not-allowed")
        stats = await client.delete("/api/stats")
        assert stats.status_code == 405 and "GET" in stats.headers["allow"]


async def test_redis_down_is_a_503_problem(fresh_redis: RedisServer) -> None:
    async with live_gateway(fresh_redis.url) as gw, gw.client() as client:
        await register(client, "d-1")
        fresh_redis.kill()
        response = await client.get("/api/devices/d-1")
        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["type"].endswith("/redis-unavailable")
        assert "Traceback" not in response.text
        fresh_redis.restart()
        assert (await client.get("/api/devices/d-1")).status_code == 200


async def test_exception_handlers_make_problems_outside_the_api(tmp_path: Path) -> None:
    """What create_app wires: the static mount's 404 and 405 become problems too."""
    (tmp_path / "index.html").write_text("<html></html>")

    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internals")

    app = Starlette(
        routes=[Route("/boom", boom), Mount("/", StaticFiles(directory=tmp_path, html=True))],
        exception_handlers=api.exception_handlers(),
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/")).status_code == 200
        missing = await client.get("/no/such/page")
        assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
        assert missing.json()["type"].endswith("/not-found")
        assert missing.json()["instance"] == "/no/such/page"
        wrong = await client.post("/index.html")
        assert wrong.status_code == 405 and wrong.headers["content-type"] == PROBLEM
        assert wrong.json()["type"].endswith("/method-not-allowed")
        failed = await client.get("/boom")
        assert failed.status_code == 500 and failed.headers["content-type"] == PROBLEM
        assert "secret" not in failed.text


async def test_a_state_or_metadata_that_is_not_an_object_is_invalid_state(
    redis_url: str,
) -> None:
    async with live_gateway(redis_url) as gw, gw.client() as client:
        await register(client, "is-1")
        attempts = [
            ("PATCH", "/api/devices/is-1/desired", "state", {"state": value})
            for value in ([1], "on", None, 3)
        ] + [
            ("PATCH", "/api/devices/is-1", "metadata", {"metadata": [1]}),
            ("POST", "/api/devices", "metadata", {"device_id": "is-2", "device_type": "t",
                                                   "metadata": "x"}),
        ]  # fmt: skip
        for method, path, field, body in attempts:
            response = await client.request(method, path, json=body)
            assert response.status_code == 422, (body, response.text)
            problem = response.json()
            assert problem["type"].endswith("/invalid-state"), problem
            assert problem["parameter"] == field
        missing = await client.patch("/api/devices/is-1/desired", json={})
        assert missing.json()["type"].endswith("/invalid-request")
        assert (await client.get("/api/devices/is-2")).status_code == 404


async def test_a_hash_without_device_id_is_no_device_anywhere(redis_url: str) -> None:
    """Another program wrote `device:state:ghost` without `device_id` (e.g. a heartbeat for an
    id never registered): every endpoint agrees it does not exist."""
    async with live_gateway(redis_url) as gw, gw.client() as client:
        g = gw.gateway
        await register(client, "real-1")
        key = g.keys.state("ghost")
        await g.redis.hset(key, mapping={"status": "online", "last_seen": "1", "device_type": "t"})
        await g.redis.set(g.keys.heartbeat("ghost"), "1", ex=60)
        await g.redis.sadd(g.keys.online, "ghost")
        await g.redis.sadd(g.keys.registered, "ghost")
        await g.store.adopt(["ghost"])  # what the sweep does with ids it finds in those sets

        token = await client.post("/api/devices/ghost/token")
        assert token.status_code == 404, token.text
        assert not await g.redis.hexists(key, OWN_FIELDS.token_hash)
        for method, path, body in [
            ("GET", "/api/devices/ghost", None),
            ("PATCH", "/api/devices/ghost", {"metadata": {"a": 1}}),
            ("PATCH", "/api/devices/ghost/desired", {"state": {"a": 1}}),
            ("GET", "/api/devices/ghost/delta", None),
            ("GET", "/api/devices/ghost/history", None),
            ("DELETE", "/api/devices/ghost", None),
        ]:
            response = await client.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
        listed = (await client.get("/api/devices")).json()["items"]
        assert [item["device_id"] for item in listed] == ["real-1"]
        stats = (await client.get("/api/stats")).json()
        assert (stats["registered"], stats["online"], stats["offline"]) == (1, 0, 1)
        assert stats["by_type"] == {"thermo": {"registered": 1, "online": 0, "offline": 1}}

        # and the id is free to register; the leftovers are not taken for its state
        created = await client.post("/api/devices", json={"device_id": "ghost", "device_type": "u"})
        assert created.status_code == 201, created.text
        assert created.json()["device_type"] == "u" and created.json()["last_seen"] == 0


async def test_session_tells_the_role_of_the_credential(redis_url: str) -> None:
    async with (
        live_gateway(redis_url) as gw,
        gw.client() as admin,
        gw.client(READ_KEY) as reader,
        gw.client(None) as anonymous,
    ):
        assert (await admin.get("/api/session")).json() == {"role": "admin"}
        assert (await reader.get("/api/session")).json() == {"role": "read"}
        missing = await anonymous.get("/api/session")
        assert missing.status_code == 401 and missing.json()["type"].endswith("/unauthorized")
        login = await anonymous.post("/api/session", json={"api_key": READ_KEY})
        assert login.status_code == 204
        cookie = {"Cookie": f"gateway_session={login.cookies['gateway_session']}"}
        assert (await anonymous.get("/api/session", headers=cookie)).json() == {"role": "read"}
