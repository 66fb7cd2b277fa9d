"""Admission control on real sockets: the handshake deadline, the process and per-address
limits, and that devices and dashboards already connected never notice any of it.

The live gateway runs in the test's event loop; the hostile connections are raw non-blocking
sockets on the same loop, watched with `add_reader`, so a thousand of them cost one task.
Admission control does not touch Redis, so these run against one engine only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from live import ADMIN_KEY, LiveGateway, live_gateway
from servers import skip_or_fail
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from gateway import admission
from gateway.admission import Admission, derived_limit, fd_limit
from gateway.config import ConfigError, Settings, from_env
from gateway.metrics import Metrics

TIMEOUT = 5.0
SLACK = 1.0  # every pending connection is closed by its deadline plus this
EARLY = 0.05  # and none before its deadline, less this (clock granularity)
ONE_ENGINE = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


# --- raw client sockets -------------------------------------------------------------------


class RawClients:
    """Raw sockets: when each connected, what it received, when the gateway closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.socks: list[socket.socket] = []
        self.connected_at: list[float] = []
        self.received: list[bytearray] = []
        self.closed_at: dict[int, float] = {}

    async def open(self, first: bytes = b"", source: str = "127.0.0.1") -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        started = time.monotonic()  # before the gateway can have accepted it
        await self.loop.sock_connect(sock, ("127.0.0.1", self.port))
        index = len(self.socks)
        self.socks.append(sock)
        self.connected_at.append(started)
        self.received.append(bytearray())
        if first:
            sock.send(first)  # small: fits the empty send buffer, never blocks
        self.loop.add_reader(sock.fileno(), self._readable, index)
        return index

    def _readable(self, index: int) -> None:
        sock = self.socks[index]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.received[index] += data
            return
        self.closed_at[index] = time.monotonic()
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def drip(self, rest: bytes, step: int) -> None:
        """Byte *step* of *rest* (then "a"s) to every socket still open, without blocking."""
        byte = rest[step : step + 1] or b"a"
        for index, sock in enumerate(self.socks):
            if index not in self.closed_at and sock.fileno() != -1:
                with contextlib.suppress(OSError):  # closed: the reader records when
                    sock.send(byte)

    def open_indexes(self) -> list[int]:
        return [i for i in range(len(self.socks)) if i not in self.closed_at]

    async def wait_closed(self, indexes: list[int], within: float) -> None:
        async def closed() -> bool:
            return all(i in self.closed_at for i in indexes)

        await until(closed, within)

    def lived(self, index: int) -> float:
        return self.closed_at[index] - self.connected_at[index]

    def close(self, index: int) -> None:
        sock = self.socks[index]
        if sock.fileno() != -1:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            self.closed_at.setdefault(index, time.monotonic())

    def close_all(self) -> None:
        for index in range(len(self.socks)):
            self.close(index)


async def refused_at_once(raw: RawClients, source: str = "127.0.0.1") -> bytes:
    """Connect; the gateway must answer and close within a second. Returns what it sent."""
    index = await raw.open(source=source)
    await raw.wait_closed([index], SLACK)
    assert raw.lived(index) < SLACK
    return bytes(raw.received[index])


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """A soft RLIMIT_NOFILE with room for both ends of a thousand sockets, and the rest."""
    needed = 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        skip_or_fail(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise `ulimit -Hn`")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def welcomed(gw: LiveGateway, device_id: str, token: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(
        f"{gw.ws_url}/ws/devices/{device_id}", additional_headers=bearer(token), **kwargs
    )
    assert (await next_frame(ws))["type"] == "welcome"
    return ws


async def next_frame(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def frame_of_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        frame = await next_frame(ws)
        if frame["type"] == kind:
            return frame


async def reports_and_gets_desired(
    http: httpx.AsyncClient, ws: ClientConnection, device: str
) -> None:
    """The device's whole life in small: a report acked, a desired change received."""
    await ws.send(orjson.dumps({"type": "report", "id": "r", "reported_state": {"t": 1}}).decode())
    assert (await frame_of_type(ws, "ack"))["id"] == "r"
    response = await http.patch(f"/api/devices/{device}/desired", json={"state": {"on": device}})
    assert response.status_code == 200, response.text
    assert (await frame_of_type(ws, "state_update"))["desired_state"]["on"] == device


async def sees_event_of(dashboard: ClientConnection, device_id: str) -> None:
    while True:
        frame = await frame_of_type(dashboard, "events")
        if any(event.get("device_id") == device_id for event in frame["events"]):
            return


async def still_open(ws: ClientConnection) -> None:
    await ws.send('{"type":"get","id":"alive"}')
    assert (await frame_of_type(ws, "shadow"))["id"] == "alive"


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name}{labels} not in /metrics"
    return float(found.group(1))


async def metrics(http: httpx.AsyncClient) -> str:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return response.text


async def until(condition: Callable[[], Awaitable[bool]], within: float = TIMEOUT) -> None:
    """Poll *condition* until it holds; fail after *within* seconds."""
    give_up = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < give_up, f"{condition.__name__}: not within {within} s"
        await asyncio.sleep(0.02)


async def gauge_becomes(http: httpx.AsyncClient, name: str, expected: float) -> None:
    async def reached() -> bool:
        return metric(await metrics(http), name) == expected

    await until(reached)


def upgrade_head(device_id: str, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws/devices/{device_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n"
    ).encode()  # the blank line that ends the head is the caller's to send, or not


# --- the deadline -------------------------------------------------------------------------


@ONE_ENGINE
@pytest.mark.usefixtures("many_descriptors")
async def test_a_thousand_slowloris_connections_are_closed_at_the_deadline_while_devices_work(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    count, deadline = 1000, 2.0
    async with live_gateway(redis_url, handshake_timeout=deadline) as gw, gw.client() as http:
        tokens = {name: await gw.register(name, "t") for name in ("adm-before", "adm-during")}
        before = await welcomed(gw, "adm-before", tokens["adm-before"])
        dashboard = await connect(f"{gw.ws_url}/ws/dashboard?token={ADMIN_KEY}", max_size=None)
        assert (await next_frame(dashboard))["type"] == "snapshot"
        raw = RawClients(gw.port)
        for _ in range(count):
            await raw.open(b"GET /ws/devices/adm-during HT")

        async def drip_every_second() -> None:
            for step in itertools.count():
                await asyncio.sleep(1.0)
                raw.drip(b"TP/1.1\r\nHost: x\r\nX-Slow: ", step)

        dripper = asyncio.create_task(drip_every_second())
        try:
            # while every one of them is pending, a device connects, reports, gets a change
            await gauge_becomes(http, "gateway_connections_pending", count)
            started = time.monotonic()
            during = await welcomed(gw, "adm-during", tokens["adm-during"])
            await reports_and_gets_desired(http, during, "adm-during")
            device_seconds = time.monotonic() - started

            await raw.wait_closed(list(range(count)), deadline + SLACK + 3.0)
            lived = sorted(raw.lived(i) for i in range(count))
            span = max(raw.closed_at.values()) - raw.connected_at[0]
            connecting = raw.connected_at[-1] - raw.connected_at[0]
            assert lived[0] >= deadline - EARLY, lived[:5]
            assert lived[-1] <= deadline + SLACK, lived[-5:]

            # the sockets connected before and during the attack never noticed it
            await sees_event_of(dashboard, "adm-during")
            await still_open(before)
            await still_open(during)
            await reports_and_gets_desired(http, before, "adm-before")
            text = await metrics(http)
            assert metric(text, "gateway_handshake_timeouts_total") == count
            assert metric(text, "gateway_connections_pending") == 0
            assert metric(text, "gateway_connections_limit") == derived_limit(fd_limit() or 0)

            # one summary line for all of them, none per connection
            async def summary_logged() -> bool:
                return any(r.name == "gateway.admission" for r in caplog.records)

            await until(summary_logged, admission.LOG_INTERVAL + TIMEOUT)
            lines = [r.getMessage() for r in caplog.records if r.name == "gateway.admission"]
            assert len(lines) == 1, lines
            assert (
                f"{count} connections closed for not sending a complete request within 2 s"
                in lines[0]
            )
        finally:
            dripper.cancel()
            raw.close_all()
        await before.close()
        await during.close()
        await dashboard.close()
    print(
        f"\n[measured] slowloris: {count} partial handshakes (deadline {deadline:g} s) closed "
        f"{lived[0]:.3f}–{lived[-1]:.3f} s after connecting (median {lived[count // 2]:.3f}), "
        f"the last {span:.3f} s after the first connected (connecting took {connecting:.3f} s); "
        f"meanwhile a device connected, reported and got a desired change in "
        f"{device_seconds * 1000:.0f} ms; log: {lines[0]!r}",
        flush=True,
    )


@ONE_ENGINE
async def test_half_open_requests_and_upgrades_are_closed_at_the_deadline(redis_url: str) -> None:
    deadline = 1.5
    async with live_gateway(redis_url, handshake_timeout=deadline) as gw, gw.client() as http:
        token = await gw.register("adm-half", "t")
        body = b'{"device_id": "adm-stalled", "device_type": "t"}'
        attempts = {
            "silent": b"",
            "request line only": b"GET /ws/devices/adm-half HTTP/1.1\r\n",
            "upgrade head without its blank line": upgrade_head("adm-half", token),
            "kept alive, then a stalled second request": (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo"
            ),
            "body stalled": (
                b"POST /api/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + http.headers["Authorization"].split()[1].encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body[:20]
            ),
            "refused at once, then its body stalled": (
                b"POST /api/devices HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{"
            ),
        }
        raw = RawClients(gw.port)
        try:
            for first in attempts.values():
                await raw.open(first)
            # a device that completed its upgrade at the same time is never touched
            device = await welcomed(gw, "adm-half", token)
            await raw.wait_closed(list(range(len(attempts))), deadline + SLACK + 3.0)
            lived = {name: raw.lived(i) for i, name in enumerate(attempts)}
            for name, seconds in lived.items():
                assert deadline - EARLY <= seconds <= deadline + SLACK, (name, seconds)
            answered = {name: bytes(raw.received[i]) for i, name in enumerate(attempts)}
            assert answered["kept alive, then a stalled second request"].startswith(
                b"HTTP/1.1 200 "
            )
            assert answered["refused at once, then its body stalled"].startswith(b"HTTP/1.1 401 ")
            await asyncio.sleep(deadline)
            await still_open(device)
            assert (await http.get("/api/devices/adm-stalled")).status_code == 404
            text = await metrics(http)
            assert metric(text, "gateway_handshake_timeouts_total") == len(attempts)
            assert metric(text, "gateway_connections_pending") == 0
        finally:
            raw.close_all()
        await device.close()
    spread = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in lived.items())
    print(f"\n[measured] half-open, deadline {deadline:g} s: closed after {spread}", flush=True)


# --- the limits ---------------------------------------------------------------------------


@ONE_ENGINE
async def test_connections_over_the_limit_are_refused_at_once_and_the_rest_is_served(
    redis_url: str,
) -> None:
    limit = 12
    async with (
        live_gateway(redis_url, max_connections=limit, handshake_timeout=60) as gw,
        gw.client() as http,
    ):
        token = await gw.register("adm-cap", "t")
        spare_token = await gw.register("adm-spare", "t")
        device = await welcomed(gw, "adm-cap", token)
        await gauge_becomes(
            http, "gateway_connections_open", 2
        )  # this kept-alive client and the device
        raw = RawClients(gw.port)
        try:
            idle = [await raw.open() for _ in range(limit - 2)]
            await gauge_becomes(http, "gateway_connections_open", limit)

            answers = [await refused_at_once(raw) for _ in range(5)]
            assert all(a.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") for a in answers)
            started = time.monotonic()
            with pytest.raises(InvalidStatus) as refused:
                await welcomed(gw, "adm-spare", spare_token)
            assert refused.value.response.status_code == 503
            device_refused_in = time.monotonic() - started
            async with gw.client() as fresh:
                assert (await fresh.get("/healthz")).status_code == 503

            # everything already connected is served: the API, the device, Redis behind them
            assert (await http.get("/api/stats")).status_code == 200
            await reports_and_gets_desired(http, device, "adm-cap")
            text = await metrics(http)
            assert metric(text, "gateway_connections_refused_total", '{limit="process"}') == 7
            assert metric(text, "gateway_connections_limit") == limit
            assert metric(text, "gateway_connections_open") == limit

            # the limit is not sticky: room made, a device connects
            raw.close(idle[0])
            await gauge_becomes(http, "gateway_connections_open", limit - 1)
            spare = await welcomed(gw, "adm-spare", spare_token)
            await still_open(spare)
            await spare.close()
        finally:
            raw.close_all()
        await device.close()
    print(
        f"\n[measured] limit {limit}: over it, raw connections got a 503 and a close, a device "
        f"handshake its 503 in {device_refused_in * 1000:.1f} ms",
        flush=True,
    )


@ONE_ENGINE
async def test_pending_connections_per_address_are_limited(redis_url: str) -> None:
    per_address = 3
    async with (
        live_gateway(redis_url, max_pending_per_address=per_address, handshake_timeout=60) as gw,
        gw.client() as http,
    ):
        tokens = {name: await gw.register(name, "t") for name in ("adm-a", "adm-b", "adm-c")}
        # connections that completed their request do not count: this client, a device
        assert (await http.get("/api/stats")).status_code == 200
        device = await welcomed(gw, "adm-a", tokens["adm-a"])
        raw = RawClients(gw.port)
        try:
            pending = [await raw.open(b"GET / HTTP/1.1\r\n") for _ in range(per_address)]
            assert (await refused_at_once(raw)).startswith(b"HTTP/1.1 503")
            with pytest.raises(InvalidStatus):
                await welcomed(gw, "adm-b", tokens["adm-b"])
            # another host is not held back by this one
            other = await raw.open(b"GET / HTTP/1.1\r\n", source="127.0.0.2")
            elsewhere = await welcomed(gw, "adm-b", tokens["adm-b"], local_addr=("127.0.0.2", 0))
            await still_open(elsewhere)
            assert other in raw.open_indexes()
            text = await metrics(http)
            assert metric(text, "gateway_connections_refused_total", '{limit="address"}') == 2
            assert metric(text, "gateway_connections_pending") == per_address + 1

            # a pending connection that goes away makes room for its address
            raw.close(pending[0])
            await gauge_becomes(http, "gateway_connections_pending", per_address)
            again = await welcomed(gw, "adm-c", tokens["adm-c"])
            await still_open(again)
            await again.close()
            await elsewhere.close()
        finally:
            raw.close_all()
        await device.close()


# --- settings -----------------------------------------------------------------------------


def test_settings_come_from_the_environment() -> None:
    settings = from_env(
        {
            "GATEWAY_HANDSHAKE_TIMEOUT": "2.5",
            "GATEWAY_MAX_CONNECTIONS": "5000",
            "GATEWAY_MAX_PENDING_PER_ADDRESS": "64",
        }
    )
    assert settings.handshake_timeout == 2.5
    assert settings.max_connections == 5000
    assert settings.max_pending_per_address == 64
    defaults = Settings()
    assert (defaults.handshake_timeout, defaults.max_connections) == (5.0, 0)
    assert defaults.max_pending_per_address == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_HANDSHAKE_TIMEOUT", "0"),
        ("GATEWAY_HANDSHAKE_TIMEOUT", "301"),
        ("GATEWAY_HANDSHAKE_TIMEOUT", "soon"),
        ("GATEWAY_MAX_CONNECTIONS", "-1"),
        ("GATEWAY_MAX_CONNECTIONS", "many"),
        ("GATEWAY_MAX_PENDING_PER_ADDRESS", "-5"),
    ],
)
def test_bad_values_are_refused_by_their_variable_name(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        from_env({variable: value})


def test_the_default_limit_keeps_descriptors_back_from_connections() -> None:
    assert derived_limit(20_000) == 18_000  # a tenth kept back
    assert derived_limit(1024) == 1024 - 128  # at least 128
    assert derived_limit(1_048_576) == 1_048_576 - 4096  # at most 4,096
    metrics = Metrics()
    assert Admission(Settings(), metrics, fds=20_000).max_connections == 18_000
    assert Admission(Settings(max_connections=500), metrics, fds=20_000).max_connections == 500


def test_a_limit_above_the_descriptor_limit_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.admission"):
        Admission(Settings(max_connections=50_000), Metrics(), fds=20_000)
    assert "GATEWAY_MAX_CONNECTIONS=50000 is above" in caplog.text
