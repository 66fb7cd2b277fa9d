"""The commands REST API on every backend: what it answers, what it refuses (writing nothing),
pages, safe retries with the caller's own id, roles, retention.

"Writes nothing" is decided by a dump of every key taken before and after the request (on a
cluster, of every primary): equal dumps, equal databases.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from backends import Client, primaries
from commanddevice import Device, post_command
from live import READ_KEY, LiveGateway, live_gateway

from gateway.keys import Keys

PROBLEM = "application/problem+json"
DEEP: dict[str, Any] = {"leaf": 1}
for _ in range(8):
    DEEP = {"n": DEEP}  # nine levels: one more than a state document may have


async def dump(client: Client) -> dict[bytes, bytes | None]:
    """Every key with its serialized value, on the server or on every primary."""
    found: dict[bytes, bytes | None] = {}
    async with primaries(client) as nodes:
        for node in nodes:
            keys = [key async for key in node.scan_iter(count=1000)]
            async with node.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.dump(key)
                values = await pipe.execute()
            found.update(zip(keys, values, strict=True))
    return found


def problem_kind(response: httpx.Response) -> str:
    assert response.headers["content-type"] == PROBLEM, response.text
    return str(response.json()["type"]).rsplit("/", 1)[-1]


@pytest.fixture
async def gw(backend_url: str) -> Any:
    # no fleet-counts sample: it writes a point every 10 s of the wall clock, while these
    # tests compare the whole database before and after each request
    async with live_gateway(backend_url, fleet_sampling=False, command_queue_max=3) as gateway:
        await gateway.register("api-1")
        yield gateway


async def test_refusals_write_nothing(gw: LiveGateway, backend_client: Client) -> None:
    path = "/api/devices/api-1/commands"
    cases: list[tuple[str, str, dict[str, Any] | None, dict[str, str] | None, int, str]] = [
        ("POST", "/api/devices/nobody/commands", {"name": "x"}, None, 404, "device-not-found"),
        ("POST", path, {"name": "a b"}, None, 422, "invalid-request"),
        ("POST", path, {"name": ""}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x" * 65}, None, 422, "invalid-request"),
        ("POST", path, {"params": {}}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "params": [1]}, None, 422, "invalid-state"),
        ("POST", path, {"name": "x", "params": DEEP}, None, 422, "state-too-deep"),
        ("POST", path, {"name": "x", "params": {"b": "x" * 40000}}, None, 413, "state-too-large"),
        ("POST", path, {"name": "x", "params": {"": 1}}, None, 422, "invalid-state-key"),
        ("POST", path, {"name": "x", "timeout": 0.05}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "timeout": 3601}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "timeout": "30"}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "ttl": -1}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "ttl": 604801}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "command_id": "a:b"}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x", "priority": 1}, None, 422, "invalid-request"),
        ("POST", path, {"name": "x"}, {"wait": "61"}, 422, "invalid-request"),
        ("POST", path, {"name": "x"}, {"wait": "-1"}, 422, "invalid-request"),
        ("POST", path, {"name": "x", "ttl": 0}, None, 409, "device-offline"),
        ("GET", path + "/01NOSUCH0000000000000000", None, None, 404, "command-not-found"),
        ("GET", path + "/a:b", None, None, 422, "invalid-request"),
        ("GET", "/api/devices/nobody/commands/x", None, None, 404, "device-not-found"),
        ("GET", path, None, {"status": "open"}, 422, "invalid-request"),
        ("GET", path, None, {"limit": "101"}, 422, "invalid-request"),
        ("GET", path, None, {"cursor": "c12x"}, 400, "invalid-cursor"),
        ("DELETE", path + "/01NOSUCH0000000000000000", None, None, 404, "command-not-found"),
        ("DELETE", "/api/devices/nobody/commands/x", None, None, 404, "device-not-found"),
    ]
    failures = []
    async with gw.client() as http:
        for method, url, body, params, status, kind in cases:
            before = await dump(backend_client)
            response = await http.request(method, url, json=body, params=params)
            after = await dump(backend_client)
            wrong = []
            if response.status_code != status:
                wrong.append(f"status {response.status_code}")
            elif problem_kind(response) != kind:
                wrong.append(f"kind {problem_kind(response)}")
            if after != before:
                wrong.append("Redis changed")
            if wrong:
                failures.append(f"{method} {url} {body} {params}: {wrong}: {response.text[:160]}")
    assert not failures, "\n".join(failures)


async def test_a_full_queue_is_refused_with_429_and_writes_nothing(
    gw: LiveGateway, backend_client: Client
) -> None:
    async with gw.client() as http:
        for index in range(3):
            assert (await post_command(http, "api-1", name=f"n{index}")).status_code == 202
        before = await dump(backend_client)
        refused = await post_command(http, "api-1", name="one-more")
        assert await dump(backend_client) == before
        assert refused.status_code == 429 and problem_kind(refused) == "command-queue-full"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["pending"] == 3
        listed = await http.get("/api/devices/api-1/commands", params={"status": "pending"})
        oldest = listed.json()["items"][-1]["command_id"]
        assert (await http.delete(f"/api/devices/api-1/commands/{oldest}")).status_code == 200
        assert (await post_command(http, "api-1", name="room-now")).status_code == 202


async def test_the_callers_id_makes_a_retry_safe(gw: LiveGateway) -> None:
    async with gw.client() as http:
        body = {"name": "open", "params": {"valve": 3}, "command_id": "order-17"}
        first = await post_command(http, "api-1", **body)
        again = await post_command(http, "api-1", **body)
        assert first.status_code == again.status_code == 202
        assert first.json() == again.json()
        assert first.json()["command_id"] == "order-17"
        other = await post_command(http, "api-1", **{**body, "params": {"valve": 4}})
        assert other.status_code == 409 and problem_kind(other) == "command-exists"
        listed = await http.get("/api/devices/api-1/commands")
        assert [c["command_id"] for c in listed.json()["items"]] == ["order-17"]


async def test_pages_are_newest_first_and_complete(backend_url: str) -> None:
    async with live_gateway(backend_url, command_queue_max=50) as gw:
        token = await gw.register("page-1")
        async with gw.client() as http:
            made = [(await post_command(http, "page-1", name=f"p{i}")).json()["command_id"]
                    for i in range(12)]  # fmt: skip
            async with Device(gw.ws_url, "page-1", token) as device:
                frames = await device.wait_for(12)
                for frame in frames[:7]:  # the oldest seven end, the rest stay pending
                    await device.answer(frame["command_id"])

            async def walk(status: str, limit: int) -> list[str]:
                seen: list[str] = []
                cursor = ""
                while True:
                    params = {"status": status, "limit": str(limit), "cursor": cursor}
                    page = (await http.get("/api/devices/page-1/commands", params=params)).json()
                    assert len(page["items"]) <= limit
                    seen += [item["command_id"] for item in page["items"]]
                    if page["next_cursor"] is None:
                        return seen
                    cursor = page["next_cursor"]

            newest_first = made[::-1]
            for limit in (1, 5, 100):
                assert await walk("all", limit) == newest_first
                assert await walk("pending", limit) == newest_first[:5]
                assert await walk("done", limit) == newest_first[5:]
            one = (await http.get("/api/devices/page-1/commands", params={"limit": "1"})).json()
            item = one["items"][0]
            assert set(item) == {
                "command_id", "name", "params", "status", "created_at", "sent_at",
                "completed_at", "attempts", "result", "error", "timeout", "ttl", "expires_at",
                "deadline",
            }  # fmt: skip


async def test_a_read_only_key_reads_and_never_writes(
    gw: LiveGateway, backend_client: Client
) -> None:
    async with gw.client() as http:
        made = (await post_command(http, "api-1", name="mine")).json()["command_id"]
    async with gw.client(READ_KEY) as http:
        before = await dump(backend_client)
        refused = await post_command(http, "api-1", name="theirs")
        canceled = await http.delete(f"/api/devices/api-1/commands/{made}")
        assert await dump(backend_client) == before
        assert refused.status_code == canceled.status_code == 403
        assert (await http.get(f"/api/devices/api-1/commands/{made}")).status_code == 200
        assert (await http.get("/api/devices/api-1/commands")).status_code == 200


async def test_final_commands_are_kept_for_the_retention_then_removed_by_redis(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url, command_retention=1) as gw:
        token = await gw.register("ret-1")
        async with Device(gw.ws_url, "ret-1", token) as device, gw.client() as http:
            await device.wait_for(1, "welcome")
            made = (await post_command(http, "ret-1", name="short")).json()["command_id"]
            await device.wait_for(1)
            await device.answer(made)
            record = layout.command("ret-1", made)
            assert 0 < await backend_client.pttl(record) <= 1000
            assert 0 < await backend_client.pttl(layout.commands_done("ret-1")) <= 1000
            await asyncio.sleep(1.2)  # the retention: Redis removes the record by itself
            assert not await backend_client.exists(record)
            gone = await http.get(f"/api/devices/ret-1/commands/{made}")
            assert gone.status_code == 404 and problem_kind(gone) == "command-not-found"
            assert (await http.get("/api/devices/ret-1/commands")).json()["items"] == []


async def test_pending_records_are_bounded_in_time_too(
    gw: LiveGateway, backend_client: Client, layout: Keys
) -> None:
    """A pending command's record expires some time after its ttl and timeout could end it:
    a bound on a leak, far past when the due sweep finishes it."""
    async with gw.client() as http:
        made = (await post_command(http, "api-1", name="bounded", ttl=60, timeout=5)).json()
    ttl = await backend_client.ttl(layout.command("api-1", made["command_id"]))
    assert 60 + 5 < ttl <= 60 + 5 + 86400 + 86400


async def test_the_answer_to_a_post_is_what_a_read_shows(gw: LiveGateway) -> None:
    """The answer to a POST is made from what the accepting script wrote, without reading
    the record back: it must be what GET shows right after, queued or sent."""
    token = await gw.register("shown-1")
    async with gw.client() as http:
        body = {"name": "dim", "params": {"to": 0.25, "n": None}, "timeout": 12.5, "ttl": 90}
        queued = await post_command(http, "api-1", **body)
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        read = await http.get(f"/api/devices/api-1/commands/{queued.json()['command_id']}")
        assert queued.json() == read.json()
        async with Device(gw.ws_url, "shown-1", token) as device:
            await device.wait_for(1, "welcome")
            sent = await post_command(http, "shown-1", **body)
            assert sent.status_code == 202 and sent.json()["status"] == "sent"
            read = await http.get(f"/api/devices/shown-1/commands/{sent.json()['command_id']}")
            assert sent.json() == read.json()
            assert sent.json()["sent_at"] == sent.json()["created_at"]
            assert sent.json()["deadline"] is not None


def test_the_openapi_document_describes_the_commands_api() -> None:
    from gateway.app import create_app
    from gateway.config import Settings
    from gateway.openapi import document

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    paths = document(app.app.routes)["paths"]
    base = "/api/devices/{device_id}/commands"
    assert set(paths[base]) == {"get", "post"}
    assert set(paths[base + "/{command_id}"]) == {"get", "delete"}
    post = paths[base]["post"]
    assert {"200", "202", "404", "409", "422", "429"} <= set(post["responses"])
    assert "Location" in post["responses"]["202"]["headers"]
    assert [p["name"] for p in post["parameters"]] == ["device_id", "wait"]
