"""The device WebSocket (contract §5) end to end: real uvicorn, real sockets, every backend
(each single-node engine and the cluster).

Presence is observed the way any other service would: a subscription to `devices:presence`
(on a cluster, to every partition's presence channel). "Exactly once" is decided by sentinels
the test publishes after the fact, never by sleeping and hoping; every wait is bounded by a
multiple of TIMEOUT or by a deadline from the contract.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from backends import Client, node_of, publish
from live import LiveGateway, live_gateway
from presence_feed import Feed
from presence_feed import presence_feed as shared_presence_feed
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.keys import Keys

TIMEOUT = 5.0  # the one bound every wait here is a multiple of
POLL = 0.02

Event = dict[str, Any]


# --- helpers ------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def rest(gw: LiveGateway, method: str, path: str, body: Any = None) -> Any:
    async with gw.client() as http:
        response = await http.request(method, path, json=body)
    assert response.status_code < 300, (response.status_code, response.text)
    return response.json() if response.content else None


async def device_doc(gw: LiveGateway, device_id: str) -> dict[str, Any]:
    return dict(await rest(gw, "GET", f"/api/devices/{device_id}"))


def open_device(gw: LiveGateway, device_id: str, token: str, **kwargs: Any) -> connect:
    return connect(
        f"{gw.ws_url}/ws/devices/{device_id}",
        additional_headers=bearer(token),
        open_timeout=TIMEOUT,
        **kwargs,
    )


async def receive(ws: ClientConnection, within: float = TIMEOUT) -> Event:
    raw = await asyncio.wait_for(ws.recv(), within)
    return dict(orjson.loads(raw))


async def receive_type(ws: ClientConnection, kind: str) -> Event:
    """The next frame of *kind*, skipping others (bounded)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = await receive(ws)
            if frame.get("type") == kind:
                return frame


async def connected(gw: LiveGateway, device_id: str, token: str, **kwargs: Any) -> ClientConnection:
    """An open device socket whose welcome frame has been read."""
    ws = await open_device(gw, device_id, token, **kwargs)
    welcome = await receive(ws)
    assert welcome["type"] == "welcome", welcome
    return ws


async def close_code(ws: ClientConnection, within: float = TIMEOUT) -> int | None:
    """Read until the gateway closes the socket; the close code it sent."""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = TIMEOUT
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(POLL * 5)


async def dump(client: Client) -> dict[bytes, Any]:
    """Every key with its type and content (TTLs left out: they tick)."""
    snapshot: dict[bytes, Any] = {}
    async for key in client.scan_iter(count=1000):
        raw_kind: bytes | str = await client.type(key)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
        if kind == "string":
            value: Any = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            value = kind
        snapshot[key] = (kind, value)
    return snapshot


class PresenceFeed:
    """Everything published on every partition's presence channel, with the time it arrived
    (in order per device: a device's events share its partition's channel)."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    def of(self, device_id: str, status: str | None = None) -> list[Event]:
        return self.feed.of(device_id, status)

    def timed(self, device_id: str, status: str) -> list[tuple[float, Event]]:
        return [
            (t, e)
            for t, e in self.feed.events
            if e.get("device_id") == device_id and e.get("status") == status
        ]

    async def wait(
        self, device_id: str, status: str, count: int = 1, within: float = TIMEOUT
    ) -> list[Event]:
        deadline = time.monotonic() + within
        while len(found := self.of(device_id, status)) < count:
            assert time.monotonic() < deadline, (
                f"{device_id}: wanted {count} {status} events within {within} s, "
                f"got {self.of(device_id)}"
            )
            await asyncio.sleep(POLL)
        return found

    async def settle(self) -> None:
        """Return once everything published before this call has been read."""
        await self.feed.settle()


@contextlib.asynccontextmanager
async def presence_feed(client: Client) -> AsyncIterator[PresenceFeed]:
    async with shared_presence_feed(client) as feed:
        yield PresenceFeed(feed)


async def metric_samples(gw: LiveGateway) -> dict[str, list[Any]]:
    async with gw.client(None) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = list(family.samples)
    return families


def sample(families: dict[str, list[Any]], name: str, **labels: str) -> float:
    """The value of the one sample called *name* with *labels* (0 when absent)."""
    for family in families.values():
        for s in family:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# --- handshake ----------------------------------------------------------------------


async def refused_status(url: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, additional_headers=headers, open_timeout=TIMEOUT):
            pass
    return int(caught.value.response.status_code)


async def test_refused_handshakes_write_nothing(backend_url: str, backend_client: Client) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("hs-1")
        other_token = await gw.register("hs-2")
        base = f"{gw.ws_url}/ws/devices"
        before = await dump(backend_client)
        cases: list[tuple[str, dict[str, str] | None, int]] = [
            (f"{base}/hs-1", None, 401),
            (f"{base}/hs-1", {"Authorization": "Bearer "}, 401),
            (f"{base}/hs-1", {"Authorization": f"Basic {token}"}, 401),
            (f"{base}/hs-1", bearer("not-the-token"), 403),
            (f"{base}/hs-1", bearer(other_token), 403),
            (f"{base}/hs-1?token=wrong", None, 403),
            (f"{base}/nobody", bearer(token), 404),
            (f"{base}/a:b", bearer(token), 404),
            (f"{base}/a*", bearer(token), 404),
            (f"{base}/a%3Ab", bearer(token), 404),
            (f"{base}/a%20b", bearer(token), 404),
            (f"{base}/a%2Ab", bearer(token), 404),
            (f"{base}/{'x' * 129}", bearer(token), 404),
        ]
        for url, headers, status in cases:
            assert await refused_status(url, headers) == status, url
        assert await dump(backend_client) == before
        assert not gw.gateway.hub.sessions
        families = await metric_samples(gw)
        assert sample(families, "gateway_handshakes_refused_total", status="404") == 7


async def test_query_token_and_128_character_id(backend_url: str) -> None:
    longest = "d" * 128
    async with live_gateway(backend_url) as gw:
        token = await gw.register(longest)
        async with connect(f"{gw.ws_url}/ws/devices/{longest}?token={token}") as ws:
            welcome = await receive(ws)
            assert welcome["type"] == "welcome"
            assert welcome["device_id"] == longest
        assert (await device_doc(gw, longest))["device_id"] == longest


async def test_open_socket_keeps_no_handshake_state(backend_url: str) -> None:
    """An accepted socket drops its upgrade request (headers, token) and keeps working."""
    async with live_gateway(backend_url) as gw:
        token = await gw.register("h-1")
        ws = await connect(
            f"{gw.ws_url}/ws/devices/h-1?token={token}",
            additional_headers={"X-Probe": "x" * 512},
            open_timeout=TIMEOUT,
        )
        assert (await receive(ws))["type"] == "welcome"
        session = gw.gateway.hub.sessions["h-1"]
        scope = session.websocket.scope
        for key in ("headers", "query_string", "raw_path", "subprotocols", "extensions"):
            assert key not in scope, key
        assert "_headers" not in vars(session.websocket)
        assert "_query_params" not in vars(session.websocket)
        server_protocol = scope["gateway.raw_send"].__self__
        assert server_protocol.request is None
        assert server_protocol.response is None
        assert token not in repr(scope)
        # nothing on the server side keeps the request headers (the client's copy is its own)
        kept = [
            headers
            for headers in gc.get_objects()
            if type(headers) is Headers and "X-Probe" in headers
            and headers is not ws.request.headers
        ]  # fmt: skip
        assert kept == []
        # the session goes on as before: frames in, acks out, a clean close
        await ws.send(text({"type": "report", "reported_state": {"a": 1}, "id": "r"}))
        ack = await receive_type(ws, "ack")
        assert ack["id"] == "r"
        await ws.close()
        assert ws.close_code == 1000

        async def offline() -> bool:
            return (await device_doc(gw, "h-1"))["status"] == "offline"

        await eventually(offline, "clean close is offline")


# --- welcome ------------------------------------------------------------------------


async def test_welcome_frame_shape(backend_url: str) -> None:
    async with live_gateway(backend_url, heartbeat_timeout=7) as gw:
        token = await gw.register("w-1")
        async with open_device(gw, "w-1", token) as ws:
            welcome = await receive(ws)
        assert {
            "type",
            "device_id",
            "session",
            "heartbeat_timeout",
            "desired_state",
            "delta",
            "version",
        } <= welcome.keys()
        assert welcome["type"] == "welcome"
        assert welcome["device_id"] == "w-1"
        assert isinstance(welcome["session"], str) and welcome["session"]
        assert welcome["heartbeat_timeout"] == 7
        assert welcome["desired_state"] == {}
        assert welcome["delta"] == {}
        assert isinstance(welcome["version"], int)


async def test_desired_change_while_offline_arrives_in_welcome(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("w-2")
        async with open_device(gw, "w-2", token) as ws:
            await receive(ws)
            await ws.send(
                orjson.dumps({"type": "report", "reported_state": {"led": "off"}, "id": 1}).decode()
            )
            await receive_type(ws, "ack")
        changed = await rest(
            gw, "PATCH", "/api/devices/w-2/desired", {"state": {"led": "on", "fan": {"speed": 2}}}
        )
        async with open_device(gw, "w-2", token) as ws:
            welcome = await receive(ws)
        assert welcome["desired_state"] == {"led": "on", "fan": {"speed": 2}}
        assert welcome["delta"] == {
            "led": {"desired": "on", "reported": "off"},
            "fan": {"speed": {"desired": 2, "reported": None}},
        }
        assert welcome["version"] == changed["version"]


# --- device frames ------------------------------------------------------------------


def text(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


async def test_heartbeat_report_and_get(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("f-1")
        async with open_device(gw, "f-1", token) as ws:
            await receive(ws)
            await ws.send(text({"type": "heartbeat", "reported_state": {"t": 1, "u": 2}}))

            async def reported_is(expected: dict[str, Any]) -> bool:
                return bool((await device_doc(gw, "f-1"))["reported_state"] == expected)

            await eventually(lambda: reported_is({"t": 1, "u": 2}), "first heartbeat stored")
            # a heartbeat's reported_state replaces the document (the seed's device_heartbeat)
            await ws.send(text({"type": "heartbeat", "reported_state": {"t": 3}}))
            await eventually(lambda: reported_is({"t": 3}), "heartbeat replaced reported")
            seen_before = (await device_doc(gw, "f-1"))["last_seen"]
            # last_seen moves at most once a second: a beat in a later second moves it
            await asyncio.sleep(1.05)
            await ws.send(text({"type": "heartbeat"}))

            async def seen_moved() -> bool:
                return bool((await device_doc(gw, "f-1"))["last_seen"] > seen_before)

            await eventually(seen_moved, "bare heartbeat renewed last_seen")
            assert await reported_is({"t": 3})
            version_before = (await device_doc(gw, "f-1"))["version"]

            # a report merges (null deletes) and is acked with the new shadow version
            await ws.send(
                text({"type": "report", "reported_state": {"u": 5, "t": None}, "id": "r1"})
            )
            ack = await receive_type(ws, "ack")
            assert ack == {"type": "ack", "id": "r1", "version": ack["version"]}
            assert ack["version"] > version_before
            assert await reported_is({"u": 5})

            await ws.send(text({"type": "get", "id": 9}))
            shadow = await receive_type(ws, "shadow")
            assert shadow["id"] == 9
            assert shadow["reported_state"] == {"u": 5}
            assert shadow["desired_state"] == {}
            assert shadow["version"] == ack["version"]


async def test_get_right_after_report_sees_the_report(backend_url: str) -> None:
    """Frames of one device are answered in order: a `get` sent after a `report` reflects it."""
    async with live_gateway(backend_url) as gw:
        token = await gw.register("f-2")
        async with open_device(gw, "f-2", token) as ws:
            await receive(ws)
            await ws.send(text({"type": "report", "reported_state": {"x": 1}, "id": "a"}))
            await ws.send(text({"type": "get", "id": "b"}))
            frames = [await receive(ws), await receive(ws)]
        shadow = next(f for f in frames if f["type"] == "shadow")
        ack = next(f for f in frames if f["type"] == "ack")
        assert shadow["reported_state"] == {"x": 1}, frames
        assert shadow["version"] >= ack["version"], frames


async def test_bad_frames_get_error_frames_and_write_nothing(backend_url: str) -> None:
    async with live_gateway(backend_url, malformed_tolerance=50) as gw:
        token = await gw.register("f-3")
        async with open_device(gw, "f-3", token) as ws:
            await receive(ws)
            await ws.send(text({"type": "report", "reported_state": {"keep": 1}, "id": 0}))
            version = (await receive_type(ws, "ack"))["version"]
            bad: list[tuple[str | bytes, str]] = [
                ("not json", "invalid_json"),
                ("[1, 2]", "invalid_frame"),
                (text({"type": "reboot"}), "unknown_type"),
                (text({"type": 5}), "invalid_frame"),
                (text({"type": "heartbeat", "reported_state": "hot"}), "invalid_state"),
                (text({"type": "report", "reported_state": [1], "id": "r"}), "invalid_state"),
                (text({"type": "report", "id": "r2"}), "invalid_frame"),
                (text({"type": "get", "id": True}), "invalid_frame"),
                (b'{"type":"heartbeat","reported_state":{"keep":2}}', "binary_frame"),
            ]
            for frame, code in bad:
                await ws.send(frame)
                error = await receive(ws)
                assert error["type"] == "error", (frame, error)
                assert error["code"] == code, (frame, error)
                assert isinstance(error["message"], str) and error["message"]
            await ws.send(text({"type": "report", "reported_state": [1], "id": "r"}))
            assert (await receive(ws))["id"] == "r"
            # a state over the section limit (yet under the frame limit) is refused, not stored
            big = {"type": "report", "reported_state": {"blob": "x" * 40_000}, "id": "big"}
            await ws.send(text(big))
            error = await receive(ws)
            assert (error["code"], error["id"]) == ("state_too_large", "big")
            await ws.send(text({"type": "get"}))
            shadow = await receive_type(ws, "shadow")
        assert shadow["reported_state"] == {"keep": 1}
        assert shadow["version"] == version
        stored = await device_doc(gw, "f-3")
        assert (stored["reported_state"], stored["version"]) == ({"keep": 1}, version)


async def test_error_frames_echo_every_readable_id(backend_url: str) -> None:
    async with live_gateway(backend_url, malformed_tolerance=50) as gw:
        token = await gw.register("f-7")
        async with open_device(gw, "f-7", token) as ws:
            await receive(ws)
            bad: list[tuple[dict[str, Any], str, Any]] = [
                ({"type": "reboot", "id": "u1"}, "unknown_type", "u1"),
                ({"id": 17}, "invalid_frame", 17),
                ({"type": 5, "id": "t1"}, "invalid_frame", "t1"),
                ({"type": "heartbeat", "reported_state": "hot", "id": "h1"}, "invalid_state", "h1"),
                ({"type": "reboot", "id": True}, "unknown_type", None),
                ({"type": "reboot", "id": "x" * 65}, "unknown_type", None),
            ]
            for frame, code, request_id in bad:
                await ws.send(text(frame))
                error = await receive(ws)
                assert (error["type"], error["code"]) == ("error", code), (frame, error)
                assert error.get("id") == request_id, (frame, error)
                assert ("id" in error) == (request_id is not None), (frame, error)


async def test_malformed_beyond_tolerance_closes_4400(backend_url: str) -> None:
    tolerance = 10
    async with live_gateway(backend_url, malformed_tolerance=tolerance) as gw:
        token = await gw.register("f-4")
        async with open_device(gw, "f-4", token) as ws:
            await receive(ws)
            for index in range(tolerance):
                await ws.send(b"\x00binary" if index % 2 else "{broken")
                assert (await receive(ws))["type"] == "error"
            with contextlib.suppress(ConnectionClosed):
                await ws.send("{one too many")
            assert await close_code(ws) == 4400
        assert (await device_doc(gw, "f-4"))["reported_state"] == {}


async def test_frame_over_64_kib_closes_1009(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("f-5")
        async with open_device(gw, "f-5", token, max_size=None) as ws:
            await receive(ws)
            huge = text({"type": "heartbeat", "reported_state": {"blob": "y" * 70_000}})
            with contextlib.suppress(ConnectionClosed):
                await ws.send(huge)
            assert await close_code(ws) == 1009
        assert (await device_doc(gw, "f-5"))["reported_state"] == {}


async def test_flood_is_refused_then_closed_4429(backend_url: str) -> None:
    burst = 5
    async with live_gateway(backend_url, rate_limit=0.5, rate_burst=burst) as gw:
        token = await gw.register("f-6")
        async with open_device(gw, "f-6", token) as ws:
            await receive(ws)
            with contextlib.suppress(ConnectionClosed):
                for n in range(40):
                    await ws.send(text({"type": "heartbeat", "reported_state": {"n": n}}))
            frames: list[Event] = []
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        frames.append(orjson.loads(await ws.recv()))
            assert ws.close_code == 4429
        codes = [f.get("code") for f in frames if f["type"] == "error"]
        assert codes and set(codes) == {"rate_limited"}, frames
        assert len(codes) <= burst

        async def settled() -> bool:
            return bool((await device_doc(gw, "f-6"))["status"] == "offline")

        await eventually(settled, "flooding device offline")
        # only the frames inside the burst were taken: the refused ones wrote nothing
        assert (await device_doc(gw, "f-6"))["reported_state"] == {"n": burst - 1}


# --- presence -----------------------------------------------------------------------


async def test_connect_is_online_and_clean_close_is_one_offline(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("p-1")
        ws = await connected(gw, "p-1", token)
        online = (await feed.wait("p-1", "online"))[0]
        assert (online["reason"], online["type"]) == ("connected", "presence")
        assert isinstance(online["version"], int) and isinstance(online["timestamp"], int | float)
        assert (await device_doc(gw, "p-1"))["status"] == "online"
        assert await backend_client.exists(layout.heartbeat("p-1"))
        assert await backend_client.zscore(layout.of("p-1").index_online, "p-1") == 0
        seed_set = await backend_client.sismember(layout.of("p-1").online, "p-1")
        assert seed_set == layout.seed_sets  # the seed document's set: on one node only
        await ws.close()
        offline = (await feed.wait("p-1", "offline"))[0]
        assert offline["reason"] == "closed"
        assert offline["version"] > online["version"]
        await asyncio.sleep(gw.gateway.settings.sweep_interval * 2)
        await feed.settle()
        assert [e["status"] for e in feed.of("p-1")] == ["online", "offline"]
        assert (await device_doc(gw, "p-1"))["status"] == "offline"
        assert not await backend_client.exists(layout.heartbeat("p-1"))
        assert not await backend_client.sismember(layout.of("p-1").online, "p-1")
        assert await backend_client.zscore(layout.of("p-1").index_online, "p-1") is None


async def test_aborted_tcp_connection_is_connection_lost(
    backend_url: str, backend_client: Client
) -> None:
    settings = {"ws_ping_interval": 0.5, "ws_ping_timeout": 0.5, "heartbeat_timeout": 10}
    async with live_gateway(backend_url, **settings) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("p-2")
        ws = await connected(gw, "p-2", token)
        await feed.wait("p-2", "online")
        ws.transport.abort()  # no close frame: the peer just vanishes
        offline = (await feed.wait("p-2", "offline", within=10 + 2))[0]
        assert offline["reason"] == "connection_lost"
        await feed.settle()
        assert len(feed.of("p-2", "offline")) == 1


async def test_unresponsive_tcp_peer_is_connection_lost(
    backend_url: str, backend_client: Client
) -> None:
    """A peer that stops reading (half-open TCP) fails the pings and is dropped."""
    settings = {"ws_ping_interval": 0.5, "ws_ping_timeout": 0.5, "heartbeat_timeout": 10}
    async with live_gateway(backend_url, **settings) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("p-3")
        ws = await connected(gw, "p-3", token, ping_interval=None)
        await feed.wait("p-3", "online")
        ws.transport.pause_reading()  # pings are never answered; nothing is sent either
        try:
            offline = (await feed.wait("p-3", "offline", within=10 + 2))[0]
        finally:
            ws.transport.abort()
        assert offline["reason"] == "connection_lost"


async def test_silent_device_expires_within_timeout_plus_two(
    backend_url: str, backend_client: Client
) -> None:
    timeout = 3.0
    settings = {
        "heartbeat_timeout": timeout,
        "ws_ping_interval": 0.5,
        "ws_ping_timeout": 0.5,
        "sweep_interval": 0.1,  # frequent sweeps must never stretch a silent device's life
    }
    async with live_gateway(backend_url, **settings) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("p-4")
        started = time.monotonic()
        ws = await connected(gw, "p-4", token)
        # pings and pongs flow the whole time: they keep TCP honest, not the device online
        offline = await feed.wait("p-4", "offline", within=timeout + 2)
        went = feed.timed("p-4", "offline")[0][0] - started
        assert offline[0]["reason"] == "expired"
        assert went >= timeout - 0.5, went
        assert ws.state.name == "OPEN"
        # the socket is still there: its next frame brings the device back
        await ws.send(text({"type": "heartbeat"}))
        back = (await feed.wait("p-4", "online", count=2))[1]
        assert back["reason"] == "resumed"
        assert back["version"] > offline[0]["version"]
        await ws.close()
        await feed.wait("p-4", "offline", count=2)
        await feed.settle()
        assert [e["status"] for e in feed.of("p-4")] == ["online", "offline", "online", "offline"]


async def test_device_sending_within_each_timeout_never_goes_offline(
    backend_url: str, backend_client: Client
) -> None:
    timeout = 2.0
    settings = {"heartbeat_timeout": timeout, "sweep_interval": 0.5}
    frames: list[str | bytes] = [
        text({"type": "heartbeat"}),
        text({"type": "report", "reported_state": {"n": 1}}),
        b"binary counts as activity",
        text({"type": "get"}),
        "not json counts too",
        text({"type": "heartbeat", "reported_state": {"n": 2}}),
    ]
    async with live_gateway(backend_url, **settings) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("p-5")
        async with open_device(gw, "p-5", token) as ws:
            await receive(ws)
            for frame in frames:  # 6 frames × 0.9 timeout: several timeouts in all
                await asyncio.sleep(timeout * 0.9)
                await ws.send(frame)
            await asyncio.sleep(timeout * 0.5)
            await feed.settle()
            assert feed.of("p-5", "offline") == []
            assert [e["reason"] for e in feed.of("p-5")] == ["connected"]
            assert (await device_doc(gw, "p-5"))["status"] == "online"


async def test_heartbeats_of_many_devices_are_batched(backend_url: str) -> None:
    count = 200
    async with live_gateway(backend_url) as gw:
        ids = [f"b-{i:03d}" for i in range(count)]
        tokens = [(await gw.gateway.store.register(i, "bulk", {}))[1] for i in ids]
        sockets: list[ClientConnection] = []
        for start in range(0, count, 50):  # a few handshakes at a time: see the storm test
            sockets += await asyncio.gather(
                *(connected(gw, ids[n], tokens[n]) for n in range(start, start + 50))
            )
        try:
            await asyncio.gather(
                *(
                    ws.send(text({"type": "report", "reported_state": {"i": n}, "id": n}))
                    for n, ws in enumerate(sockets)
                )
            )
            acks = await asyncio.gather(*(receive_type(ws, "ack") for ws in sockets))
            assert [a["id"] for a in acks] == list(range(count))
            families = await metric_samples(gw)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        ticks = sample(families, "gateway_heartbeat_batch_size_count")
        written = sample(families, "gateway_heartbeat_batch_size_sum")
        single = sample(families, "gateway_heartbeat_batch_size_bucket", le="1.0")
        assert written >= count
        assert ticks < count, (ticks, written)
        assert single < ticks, "no tick held more than one device"


async def test_reconnect_storm_is_admitted(backend_url: str) -> None:
    """A fleet reconnecting at once (after a restart) is admitted, not refused with 503."""
    count = 200
    async with live_gateway(backend_url) as gw:
        ids = [f"storm-{i:03d}" for i in range(count)]
        tokens = [(await gw.gateway.store.register(i, "bulk", {}))[1] for i in ids]
        results = await asyncio.gather(
            *(connected(gw, i, t) for i, t in zip(ids, tokens, strict=True)),
            return_exceptions=True,
        )
        sockets = [r for r in results if isinstance(r, ClientConnection)]
        refused = [r for r in results if not isinstance(r, ClientConnection)]
        await asyncio.gather(*(ws.close() for ws in sockets))
        assert refused == [], f"{len(refused)} of {count} refused, e.g. {refused[0]!r}"


# --- one session per device ---------------------------------------------------------


async def test_second_connection_replaces_the_first(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("s-1")
        first = await connected(gw, "s-1", token)
        await feed.wait("s-1", "online")
        second = await connected(gw, "s-1", token)
        assert await close_code(first) == 4409
        replaced = (await feed.wait("s-1", "online", count=2))[1]
        assert replaced["reason"] == "replaced"
        # the old session ended after the new one started: that must not offline the device
        await asyncio.sleep(gw.gateway.settings.sweep_interval * 2)
        await feed.settle()
        assert feed.of("s-1", "offline") == []
        assert (await device_doc(gw, "s-1"))["status"] == "online"
        assert await backend_client.exists(layout.heartbeat("s-1"))
        # the new session is the live one: it still works
        await second.send(text({"type": "report", "reported_state": {"ok": True}, "id": 1}))
        assert (await receive_type(second, "ack"))["id"] == 1
        await second.close()
        assert (await feed.wait("s-1", "offline"))[0]["reason"] == "closed"


# --- commands -----------------------------------------------------------------------


async def test_desired_patch_reaches_the_socket(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("c-1")
        async with open_device(gw, "c-1", token) as ws:
            await receive(ws)
            await ws.send(text({"type": "report", "reported_state": {"led": "off"}, "id": 1}))
            await receive_type(ws, "ack")
            changed = await rest(gw, "PATCH", "/api/devices/c-1/desired", {"state": {"led": "on"}})
            update = await receive(ws)
            delta = await receive(ws)
        assert update["type"] == "state_update"
        assert update["desired_state"] == {"led": "on"}
        assert isinstance(update["timestamp"], int | float)
        assert delta == {
            "type": "delta",
            "delta": {"led": {"desired": "on", "reported": "off"}},
            "version": changed["version"],
        }


async def test_anything_published_on_the_command_channel_arrives_as_is(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("c-2")
        async with open_device(gw, "c-2", token) as ws:
            await receive(ws)
            channel = layout.commands("c-2")
            custom = b'{"type":"reboot","after": 5}'
            assert await publish(backend_client, channel, custom) == 1  # the gateway listens
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == custom.decode()
            await publish(backend_client, channel, b"plain words")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "plain words"
            seed_style = b'{"type": "state_update", "desired_state": {"a": 1}, "timestamp": 1.5}'
            await publish(backend_client, channel, seed_style)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == seed_style.decode()
            delta = await receive(ws)
            assert delta["type"] == "delta"
            assert delta["delta"] == {"a": {"desired": 1, "reported": None}}


async def test_non_utf8_command_reaches_the_socket(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    """Whatever is published reaches the socket: bytes that are not text go as a binary frame."""
    async with live_gateway(backend_url) as gw:
        token = await gw.register("c-3")
        async with open_device(gw, "c-3", token) as ws:
            await receive(ws)
            payload = b"\xff\xfe\x00firmware"
            await publish(backend_client, layout.commands("c-3"), payload)
            await publish(backend_client, layout.commands("c-3"), b"after")
            received = [
                await asyncio.wait_for(ws.recv(), TIMEOUT),
                await asyncio.wait_for(ws.recv(), TIMEOUT),
            ]
        assert received == [payload, "after"]


async def _raw_handshake(gw: LiveGateway, device_id: str, token: str) -> socket.socket:
    """A TCP socket that completes the WebSocket handshake and then never reads again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/devices/{device_id} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    async with asyncio.timeout(TIMEOUT):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _drained_to_eof(sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT * 2):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 1 << 16)
            except ConnectionError:
                return True
            if not chunk:
                return True


async def test_slow_consumer_is_dropped_and_others_keep_working(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with (
        live_gateway(backend_url, send_queue_size=32) as gw,
        presence_feed(backend_client) as feed,
    ):
        slow_token = await gw.register("slow-1")
        fine_token = await gw.register("fine-1")
        fine = await connected(gw, "fine-1", fine_token)
        sock = await _raw_handshake(gw, "slow-1", slow_token)
        try:
            await feed.wait("slow-1", "online")
            payload = orjson.dumps({"type": "blob", "data": "z" * 16_000})
            for _ in range(1000):
                await publish(backend_client, layout.commands("slow-1"), payload)
                if feed.of("slow-1", "offline"):
                    break
            offline = (await feed.wait("slow-1", "offline", within=TIMEOUT * 2))[0]
            assert offline["reason"] == "slow_consumer"
            assert await _drained_to_eof(sock)
        finally:
            sock.close()
        families = await metric_samples(gw)
        assert sample(families, "gateway_slow_clients_dropped_total", kind="device") == 1
        # the gateway stays healthy for everyone else
        await fine.send(text({"type": "get", "id": "still"}))
        assert (await receive_type(fine, "shadow"))["id"] == "still"
        await rest(gw, "PATCH", "/api/devices/fine-1/desired", {"state": {"go": 1}})
        assert (await receive_type(fine, "state_update"))["desired_state"] == {"go": 1}
        assert feed.of("fine-1", "offline") == []
        await fine.close()


# --- policy closes ------------------------------------------------------------------


async def test_token_rotation_closes_the_session_1008(
    backend_url: str, backend_client: Client
) -> None:
    async with live_gateway(backend_url) as gw, presence_feed(backend_client) as feed:
        old = await gw.register("t-1")
        ws = await connected(gw, "t-1", old)
        rotated = await rest(gw, "POST", "/api/devices/t-1/token")
        assert await close_code(ws) == 1008
        offline = await feed.wait("t-1", "offline")
        assert len(offline) == 1
        assert await refused_status(f"{gw.ws_url}/ws/devices/t-1", bearer(old)) == 403
        again = await connected(gw, "t-1", rotated["token"])
        await again.close()


async def test_deleting_the_device_closes_the_session_1008(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("t-2")
        assert await backend_client.exists(layout.state("t-2"))
        ws = await connected(gw, "t-2", token)
        await feed.wait("t-2", "online")
        async with gw.client() as http:
            assert (await http.delete("/api/devices/t-2")).status_code == 204
        assert await close_code(ws) == 1008
        offline = (await feed.wait("t-2", "offline"))[0]
        assert offline["reason"] == "deleted"
        await asyncio.sleep(gw.gateway.settings.sweep_interval * 2)
        await feed.settle()
        assert len(feed.of("t-2", "offline")) == 1
        assert await refused_status(f"{gw.ws_url}/ws/devices/t-2", bearer(token)) == 404
        assert not await backend_client.exists(layout.state("t-2"))


# --- offline grace ------------------------------------------------------------------


async def test_offline_grace(backend_url: str, backend_client: Client) -> None:
    grace = 2.0
    settings = {"offline_grace": grace, "sweep_interval": 0.5}
    async with live_gateway(backend_url, **settings) as gw, presence_feed(backend_client) as feed:
        token = await gw.register("g-1")
        ws = await connected(gw, "g-1", token)
        await feed.wait("g-1", "online")
        await ws.close()
        await asyncio.sleep(0.3)
        ws = await connected(gw, "g-1", token)  # back within 1 s: nobody sees a flap
        await asyncio.sleep(grace + 1)
        await feed.settle()
        assert [e["status"] for e in feed.of("g-1")] == ["online"]
        assert (await device_doc(gw, "g-1"))["status"] == "online"

        await ws.close()
        closed_at = time.monotonic()
        offline = await feed.wait("g-1", "offline", within=grace + 2)
        went = feed.timed("g-1", "offline")[0][0] - closed_at
        assert offline[0]["reason"] == "closed"
        assert went >= grace - 0.5, went
        await asyncio.sleep(gw.gateway.settings.sweep_interval * 2)
        await feed.settle()
        assert [e["status"] for e in feed.of("g-1")] == ["online", "offline"]


# --- pub/sub resync -----------------------------------------------------------------


async def test_desired_change_while_pubsub_reconnects_is_resent(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("r-1")
        async with open_device(gw, "r-1", token) as ws:
            await receive(ws)
            reconnects = gw.gateway.broker.reconnects
            desired = orjson.dumps({"mode": "eco"})
            # the kill and the change in one transaction: no subscriber can see a publish, so
            # only the re-sync after the reconnect can tell the device (on a cluster: on the
            # node that holds the device, whose pub/sub link the gateway loses)
            async with (
                node_of(backend_client, layout.state("r-1")) as node,
                node.pipeline(transaction=True) as pipe,
            ):
                pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                pipe.hset(layout.state("r-1"), "desired_state", desired)
                publish_command = "SPUBLISH" if layout.sharded else "PUBLISH"
                pipe.execute_command(publish_command, layout.commands("r-1"), b'{"type":"lost"}')
                killed, _, _ = await pipe.execute()
            assert killed >= 1
            update = await receive_type(ws, "state_update")
            assert update["desired_state"] == {"mode": "eco"}
            delta = await receive(ws)
            assert delta["type"] == "delta"
            assert delta["delta"] == {"mode": {"desired": "eco", "reported": None}}
            assert gw.gateway.broker.reconnects > reconnects
            # and the device's channel is subscribed again
            await rest(gw, "PATCH", "/api/devices/r-1/desired", {"state": {"mode": "boost"}})
            update = await receive_type(ws, "state_update")
            assert update["desired_state"] == {"mode": "boost"}


# --- metrics ------------------------------------------------------------------------


async def test_metrics_describe_the_sockets(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("m-1")
        ws = await connected(gw, "m-1", token)
        await ws.send(text({"type": "heartbeat"}))
        await ws.send(text({"type": "report", "reported_state": {"a": 1}, "id": 1}))
        await receive_type(ws, "ack")
        await ws.send(text({"type": "get"}))
        await receive_type(ws, "shadow")
        await ws.send("oops")
        await receive_type(ws, "error")
        live = await metric_samples(gw)
        await ws.close()

        async def gone() -> bool:
            families = await metric_samples(gw)
            return sample(families, "gateway_presence_transitions_total", status="offline") >= 1

        await eventually(gone, "offline transition counted")
        after = await metric_samples(gw)
    assert sample(live, "gateway_devices_connected") == 1
    assert sample(after, "gateway_devices_connected") == 0
    for kind in ("heartbeat", "report", "get"):
        assert sample(live, "gateway_messages_in_total", type=kind) == 1, kind
    for kind in ("welcome", "ack", "shadow", "error"):
        assert sample(live, "gateway_messages_out_total", kind=kind) == 1, kind
    assert sample(live, "gateway_frames_rejected_total", code="invalid_json") == 1
    assert sample(live, "gateway_heartbeat_batch_size_count") >= 1
    assert sample(live, "gateway_redis_seconds_count", op="connect") == 1
    assert sample(live, "gateway_redis_seconds_count", op="heartbeat_batch") >= 1
    assert (
        sample(live, "gateway_presence_transitions_total", status="online", reason="connected") == 1
    )
    assert (
        sample(after, "gateway_presence_transitions_total", status="offline", reason="closed") == 1
    )
    assert "gateway_slow_clients_dropped" in after
