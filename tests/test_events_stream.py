"""`GET /api/events/stream` against a real gateway process: resume with `Last-Event-ID` on one
node and on the 3+3 cluster, filters, refusals, a gap after the log was trimmed, and a slow
reader cut off with `event: overflow`, then resumed with nothing lost or repeated.

Events are made through the REST API (registrations, desired-state writes), or, for volume,
appended to the fleet log directly as another writer's script would.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from backends import Client, connect
from conftest import ADMIN_KEY, READ_KEY, GatewayFactory, GatewayProcess

from gateway.keys import Keys
from gateway.redisconn import is_cluster_url

STREAM = "/api/events/stream"
WAIT = 10.0


@dataclass
class Sse:
    """One server-sent event as a client sees it."""

    event: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


def parse(block: str) -> Sse:
    sse = Sse()
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            sse.comments.append(value)
        elif name == "event":
            sse.event = value
        elif name == "id":
            sse.id = value
        elif name == "data":
            sse.data = f"{sse.data}\n{value}" if sse.data else value
    return sse


async def events(response: httpx.Response) -> AsyncIterator[Sse]:
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield parse(block)


async def collect(
    gw: GatewayProcess,
    count: int,
    *,
    params: dict[str, str] | None = None,
    last_id: str | None = None,
    key: str = READ_KEY,
) -> list[Sse]:
    """The first *count* events (keep-alives and ids without data left out)."""
    headers = {"Authorization": f"Bearer {key}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    got: list[Sse] = []
    async with (
        httpx.AsyncClient(base_url=gw.base_url, timeout=WAIT) as http,
        asyncio.timeout(WAIT),
        http.stream("GET", STREAM, params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for sse in events(response):
            if sse.data:
                got.append(sse)
            if len(got) == count:
                return got
    return got


async def register(gw: GatewayProcess, *device_ids: str, device_type: str = "thermo") -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=WAIT) as http:
        for device_id in device_ids:
            body = {"device_id": device_id, "device_type": device_type}
            response = await http.post("/api/devices", json=body)
            assert response.status_code == 201, response.text


async def desire(gw: GatewayProcess, device_id: str, state: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=WAIT) as http:
        response = await http.patch(f"/api/devices/{device_id}/desired", json={"state": state})
        assert response.status_code == 200, response.text


def devices(got: list[Sse]) -> list[str]:
    return [sse.json["device_id"] for sse in got]


@pytest.fixture(params=["single", "cluster"])
def any_url(request: pytest.FixtureRequest, valkey_engine: Any) -> str:
    """The shared Valkey server emptied, or the shared cluster emptied."""
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    with valkey_engine.sync_client() as client:
        client.flushall()
        client.config_set("notify-keyspace-events", "Ex")
    return str(valkey_engine.url)


async def test_resume_with_last_event_id_continues_exactly_after_it(
    any_url: str, gateway_factory: GatewayFactory
) -> None:
    gw = gateway_factory(any_url)
    await register(gw, "r-1", "r-2", "r-3")
    first = await collect(gw, 3, params={"after": "0"})
    assert sorted(devices(first)) == ["r-1", "r-2", "r-3"]
    assert all(sse.event == "registry" and sse.json["type"] == "registered" for sse in first)
    assert all(sse.json["id"] and sse.id for sse in first)
    # the REST page shows the same JSON
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=WAIT) as http:
        page = await http.get(
            "/api/presence/events",
            params={"after": "0"},
            headers={"Authorization": f"Bearer {READ_KEY}"},
        )
    assert page.status_code == 200
    await register(gw, "r-4", "r-5")
    resumed = await collect(gw, 4, last_id=first[0].id)
    assert devices(resumed)[:2] == devices(first)[1:]
    assert sorted(devices(resumed)[2:]) == ["r-4", "r-5"]
    # `?after=` does the same, and the header wins over it
    again = await collect(gw, 2, params={"after": first[1].id or ""}, last_id=first[2].id)
    assert sorted(devices(again)) == ["r-4", "r-5"]

    # live: a stream opened now sees what happens next, and its ids resume it
    async def live() -> list[Sse]:
        return await collect(gw, 2)

    reading = asyncio.create_task(live())
    await asyncio.sleep(0.5)
    await desire(gw, "r-1", {"on": True})
    await desire(gw, "r-2", {"on": False})
    got = await reading
    assert [sse.event for sse in got] == ["state", "state"]
    assert devices(got) == ["r-1", "r-2"]
    assert await collect(gw, 1, last_id=got[0].id) == got[1:]


async def test_filters_and_refusals(valkey_engine: Any, gateway_factory: GatewayFactory) -> None:
    with valkey_engine.sync_client() as client:
        client.flushall()
    gw = gateway_factory(valkey_engine.url)
    await register(gw, "lamp-1", "lamp-2", device_type="lamp")
    await register(gw, "fan-1", device_type="fan")
    for device_id in ("lamp-1", "fan-1", "lamp-2"):
        await desire(gw, device_id, {"level": 1})
    state = await collect(gw, 3, params={"after": "0", "types": "state"})
    assert devices(state) == ["lamp-1", "fan-1", "lamp-2"]
    typed = await collect(gw, 2, params={"after": "0", "types": "state", "device_type": "lamp"})
    assert devices(typed) == ["lamp-1", "lamp-2"]
    prefixed = await collect(gw, 2, params={"after": "0", "device_prefix": "fan"})
    assert [sse.event for sse in prefixed] == ["registry", "state"]
    assert devices(prefixed) == ["fan-1", "fan-1"]
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=WAIT) as http:
        for params, kind in (
            ({"types": "presence,bogus"}, "invalid-request"),
            ({"types": ""}, "invalid-request"),
            ({"device_type": "no spaces"}, "invalid-request"),
            ({"device_prefix": "a/b"}, "invalid-request"),
            ({"after": "not-a-position"}, "invalid-cursor"),
            ({"colour": "red"}, "invalid-request"),
        ):
            response = await http.get(STREAM, params=params)
            assert response.headers["content-type"] == "application/problem+json", params
            assert response.json()["type"].endswith(kind), (params, response.text)
            assert response.status_code == (400 if kind == "invalid-cursor" else 422)
        response = await http.get(STREAM, headers={"Last-Event-ID": "12-x"})
        assert response.status_code == 400
        response = await http.get(STREAM, headers={"Authorization": ""})
        assert response.status_code == 401


async def test_a_trimmed_position_starts_with_a_gap_event(
    valkey_engine: Any, gateway_factory: GatewayFactory
) -> None:
    with valkey_engine.sync_client() as client:
        client.flushall()
    gw = gateway_factory(valkey_engine.url)
    await register(gw, "g-1", "g-2", "g-3")
    first = await collect(gw, 3, params={"after": "0"})
    redis = await connect(valkey_engine.url)
    try:
        await redis.xtrim(Keys().part(0).events, maxlen=1, approximate=False)
    finally:
        await redis.aclose()
    got: list[Sse] = []
    headers = {"Authorization": f"Bearer {READ_KEY}", "Last-Event-ID": first[0].id or ""}
    async with (
        httpx.AsyncClient(base_url=gw.base_url, timeout=WAIT) as http,
        asyncio.timeout(WAIT),
        http.stream("GET", STREAM, headers=headers) as response,
    ):
        async for sse in events(response):
            if sse.data:
                got.append(sse)
            if len(got) == 2:
                break
    assert got[0].event == "gap"
    assert got[0].id is None
    assert got[0].json["after"] == first[0].id
    assert got[0].json["first_kept"] == [first[2].json["id"]]
    assert got[1].event == "registry" and got[1].json["device_id"] == "g-3"


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (what arrived of it)."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return body


async def test_a_slow_reader_is_cut_off_with_overflow_and_resumes_without_loss(
    any_url: str, gateway_factory: GatewayFactory
) -> None:
    gw = gateway_factory(any_url, events_stream_queue="20")
    client: Client = await connect(any_url)
    layout = Keys.cluster() if is_cluster_url(any_url) else Keys()
    total = 3000
    # a reader with a tiny receive window that reads nothing for a while
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        request = (
            f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {READ_KEY}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        await asyncio.sleep(0.5)  # joined the live feed
        filler = "x" * 400
        async with client.pipeline(transaction=False) as pipe:
            for index in range(total):
                device_id = f"s-{index % 50}"
                body = {"type": "presence", "device_id": device_id, "status": "online",
                        "timestamp": 1.0, "seq": index, "pad": filler}  # fmt: skip
                pipe.xadd(layout.of(device_id).events, {"event": orjson.dumps(body)})
            await pipe.execute()
        await asyncio.sleep(1.0)
        raw = b""
        async with asyncio.timeout(WAIT):
            while b"event: overflow" not in raw or not raw.endswith(b"0\r\n\r\n"):
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, "the stream ended without an overflow event"
                raw += chunk
    finally:
        sock.close()
        await client.aclose()
    blocks = [parse(block) for block in _dechunk(raw).decode().split("\n\n") if block]
    cut = [sse for sse in blocks if sse.data]
    assert cut[-1].event == "overflow"
    seen = [sse.json["seq"] for sse in cut[:-1]]
    assert len(seen) < total
    resume = cut[-1].json["resume_after"]
    assert resume == cut[-2].id
    rest = await collect(gw, total - len(seen), last_id=resume)
    foreign = [(sse.event, sse.data[:200]) for sse in rest if "seq" not in sse.json]
    assert not foreign, f"events this test did not write: {foreign}"
    seen += [sse.json["seq"] for sse in rest]
    assert sorted(seen) == list(range(total)), "an event was lost or sent twice"
    # per device, in the order written
    for device in range(50):
        mine = [seq for seq in seen if seq % 50 == device]
        assert mine == sorted(mine)


async def test_a_graceful_shutdown_ends_open_streams(
    valkey_engine: Any, gateway_factory: GatewayFactory
) -> None:
    with valkey_engine.sync_client() as client:
        client.flushall()
    gw = gateway_factory(valkey_engine.url)
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    async with (
        httpx.AsyncClient(base_url=gw.base_url, timeout=WAIT) as http,
        http.stream("GET", STREAM, headers=headers) as response,
    ):
        assert response.status_code == 200
        stopping = asyncio.get_running_loop().run_in_executor(None, gw.terminate)
        async with asyncio.timeout(WAIT):
            async for _ in response.aiter_bytes():
                pass  # ends when the gateway closes the stream
        assert await stopping == 0
