"""Faults on real processes: Redis killed and restarted, unreachable, stalled, pub/sub killed;
a gateway killed beside another; a device that stops reading.

Recovery times are measured and printed (run with `-s` to see them); they are asserted only
against generous functional bounds. docs/reliability.md records the figures of a real run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from live import ADMIN_KEY, READ_KEY, LiveGateway, live_gateway
from servers import RedisServer
from tcpproxy import TcpProxy
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.embedded import find_free_port

TIMEOUT = 5.0
POLL = 0.05
PRESENCE = "devices:presence"
EVENTS = "devices:events"
REPO_ROOT = Path(__file__).resolve().parents[1]

Event = dict[str, Any]


def report(name: str, **figures: float | int | str) -> None:
    """Print a measured figure so `pytest -s` shows it (docs/reliability.md quotes these)."""
    parts = ", ".join(
        f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in figures.items()
    )
    print(f"\n[measured] {name}: {parts}", flush=True)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api(base_url: str, key: str = ADMIN_KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers=bearer(key), timeout=15)


async def register(http: httpx.AsyncClient, device_id: str, device_type: str = "sensor") -> str:
    response = await http.post(
        "/api/devices", json={"device_id": device_id, "device_type": device_type}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = TIMEOUT
) -> float:
    """Poll until *check* holds; returns how long it took."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, f"not within {within} s: {what}"
        await asyncio.sleep(POLL)
    return time.monotonic() - start


async def status_of(http: httpx.AsyncClient, path: str) -> int:
    try:
        return (await http.get(path, timeout=2)).status_code
    except httpx.HTTPError:
        return 0


class Device:
    """A device socket that keeps every frame it receives and, when asked, sends heartbeats."""

    def __init__(self, device_id: str, ws: ClientConnection) -> None:
        self.device_id = device_id
        self.ws = ws
        self.frames: list[Event] = []
        self.received_at: list[float] = []
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._beater: asyncio.Task[None] | None = None
        self.sent = 0

    @classmethod
    async def open(cls, ws_url: str, device_id: str, token: str) -> Device:
        ws = await connect(
            f"{ws_url}/ws/devices/{device_id}", additional_headers=bearer(token), open_timeout=10
        )
        device = cls(device_id, ws)
        await device.wait_for(lambda f: f["type"] == "welcome")
        return device

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(dict(orjson.loads(raw)))
                self.received_at.append(time.monotonic())
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def beat_every(self, interval: float) -> None:
        async def beat() -> None:
            while True:
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.send(b'{"type":"heartbeat"}'.decode())
                    self.sent += 1
                await asyncio.sleep(interval)

        self._beater = asyncio.create_task(beat())

    async def wait_for(self, match: Callable[[Event], bool], within: float = TIMEOUT) -> Event:
        async with asyncio.timeout(within):
            while True:
                for frame in self.frames:
                    if match(frame):
                        return frame
                if self.closed.is_set():
                    raise AssertionError(f"{self.device_id} closed ({self.ws.close_code})")
                await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        for task in (self._beater, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)


class PresenceFeed:
    """Every presence event on `devices:presence`, resubscribing whenever the connection dies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[Event] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PresenceFeed:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(PRESENCE)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self.events.append(dict(orjson.loads(message["data"])))
            except (aioredis.RedisError, OSError):
                self.subscribed.clear()
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()

    def of(self, device_id: str, status: str | None = None) -> list[Event]:
        return [
            e
            for e in self.events
            if e.get("device_id") == device_id and (status is None or e.get("status") == status)
        ]


async def stream_presence_after(client: aioredis.Redis, after: str) -> list[Event]:
    """Presence events recorded in the fleet stream after *after* (the durable record)."""
    rows = await client.xrange(EVENTS, f"({after}", "+")
    events = [dict(orjson.loads(body[b"event"])) for _, body in rows]
    return [e for e in events if e.get("type") == "presence"]


async def last_stream_id(client: aioredis.Redis) -> str:
    rows = await client.xrevrange(EVENTS, "+", "-", count=1)
    return rows[0][0].decode() if rows else "0-0"


# --- Redis kill -9 and AOF restart ------------------------------------------------------


async def test_redis_kill_9_and_aof_restart_loses_nothing(
    fresh_redis: RedisServer, gateway_factory: Any
) -> None:
    gw = gateway_factory(fresh_redis.url, heartbeat_timeout="5", sweep_interval="0.5")
    ids = [f"k9-{n}" for n in range(10)]
    redis_client = aioredis.Redis.from_url(fresh_redis.url, socket_connect_timeout=1)
    devices: list[Device] = []
    async with api(gw.base_url) as http, PresenceFeed(fresh_redis.url) as feed:
        tokens = {device_id: await register(http, device_id) for device_id in ids}
        for n, device_id in enumerate(ids):
            response = await http.patch(
                f"/api/devices/{device_id}/desired", json={"state": {"level": n, "mode": "a"}}
            )
            assert response.status_code == 200, response.text
        old_token = tokens[ids[0]]
        rotated = await http.post(f"/api/devices/{ids[0]}/token")
        assert rotated.status_code == 200
        tokens[ids[0]] = rotated.json()["token"]
        for device_id in ids:
            device = await Device.open(gw.ws_url, device_id, tokens[device_id])
            devices.append(device)
            await device.ws.send(
                orjson.dumps(
                    {"type": "report", "id": "r1", "reported_state": {"fw": device_id}}
                ).decode()
            )
        for device in devices:
            await device.wait_for(lambda f: f["type"] == "ack")
            device.beat_every(0.5)
        before = {}
        for device_id in ids:
            body = (await http.get(f"/api/devices/{device_id}")).json()
            history = (await http.get(f"/api/devices/{device_id}/history?limit=500")).json()
            before[device_id] = (body, history["items"])
        registered_before = await redis_client.smembers("devices:registered")
        stream_mark = await last_stream_id(redis_client)
        # appendfsync everysec: give the AOF time to reach the disk before the crash
        await asyncio.sleep(1.6)

        fresh_redis.kill()
        killed_at = time.monotonic()
        await eventually(
            lambda: _is_status(http, "/readyz", 503), "readyz 503 with Redis down", TIMEOUT
        )
        down_detected = time.monotonic() - killed_at
        assert await status_of(http, "/healthz") == 200
        # longer than the heartbeat timeout: every heartbeat key's TTL runs out meanwhile
        await asyncio.sleep(6.0)
        for device in devices:
            assert not device.closed.is_set(), f"{device.device_id} closed while Redis was down"
            await device.ws.send('{"type":"heartbeat"}')  # they can still send frames
        api_down = await http.get(f"/api/devices/{ids[1]}")
        assert api_down.status_code == 503, api_down.text
        assert api_down.headers["content-type"].startswith("application/problem+json")

        restarted_at = time.monotonic()
        fresh_redis.start()
        await redis_client.aclose()  # its pooled connections died with the server
        redis_client = aioredis.Redis.from_url(fresh_redis.url, socket_connect_timeout=1)
        await eventually(lambda: _is_status(http, "/readyz", 200), "readyz back", 30)
        ready_after = time.monotonic() - restarted_at

        # writes accepted as soon as the gateway says it is ready (a load balancer sends them)
        for n, device_id in enumerate(ids):
            response = await http.patch(
                f"/api/devices/{device_id}/desired", json={"state": {"after": n}}
            )
            assert response.status_code == 200, response.text
        missed = []
        for n, device in enumerate(devices):
            try:
                await device.wait_for(
                    lambda f, n=n: (
                        f["type"] == "state_update"  # type: ignore[misc]
                        and f["desired_state"].get("after") == n
                    ),
                    within=10 if not missed else 0.5,
                )
            except TimeoutError:
                missed.append(device.device_id)
        # the gateway resubscribed: a desired change now reaches every device
        await eventually(lambda: _subscribed(redis_client, ids), "resubscribed", 15)
        for n, device_id in enumerate(ids):
            response = await http.patch(
                f"/api/devices/{device_id}/desired", json={"state": {"again": n}}
            )
            assert response.status_code == 200, response.text
        for n, device in enumerate(devices):
            await device.wait_for(
                lambda f, n=n: (
                    f["type"] == "state_update"  # type: ignore[misc]
                    and f["desired_state"].get("again") == n
                )
            )
        commands_after = time.monotonic() - restarted_at

        # the devices, which kept sending, are online; give offline detection every chance
        await asyncio.sleep(5 + 2 + 1)
        for device in devices:
            assert not device.closed.is_set(), device.device_id

        for device_id in ids:
            body = (await http.get(f"/api/devices/{device_id}")).json()
            old_body, old_history = before[device_id]
            assert body["status"] == "online", body
            assert body["registered_at"] == old_body["registered_at"]
            assert body["reported_state"] == old_body["reported_state"]
            assert body["desired_state"] == {
                **old_body["desired_state"],
                "after": ids.index(device_id),
                "again": ids.index(device_id),
            }
            history = (await http.get(f"/api/devices/{device_id}/history?limit=500")).json()
            kept = {item["id"]: item for item in history["items"]}
            for item in old_history:
                assert kept.get(item["id"]) == item, f"{device_id} lost history {item}"
        assert await redis_client.smembers("devices:registered") == registered_before
        stats = (await http.get("/api/stats")).json()
        assert (stats["registered"], stats["online"]) == (10, 10), stats

        offline_stream = [
            e
            for e in await stream_presence_after(redis_client, stream_mark)
            if e["status"] == "offline"
        ]
        offline_feed = [e for e in feed.events if e.get("status") == "offline"]
        assert offline_stream == [], offline_stream
        assert offline_feed == [], offline_feed

        # the rotated token survived: the old one is refused, the new one accepted
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"{gw.ws_url}/ws/devices/{ids[0]}", additional_headers=bearer(old_token)
            ):
                pass
        assert refused.value.response.status_code == 403
        await devices[0].aclose()
        again = await Device.open(gw.ws_url, ids[0], tokens[ids[0]])
        await again.aclose()
        report(
            "redis kill -9 + AOF restart",
            readyz_503_after_kill_s=down_detected,
            down_for_s=restarted_at - killed_at,
            readyz_200_after_restart_s=ready_after,
            commands_delivered_after_restart_s=commands_after,
            offline_events=len(offline_stream),
            presence_after_kill=",".join(
                f"{e['device_id']}:{e['status']}:{e['reason']}"
                for e in await stream_presence_after(redis_client, stream_mark)
            )
            or "none",
            desired_changes_never_delivered=len(missed),
        )
        # a desired change accepted right after /readyz turned 200 (before the pub/sub
        # connection was back) must still reach the device: the re-sync after the reconnect
        # exists for exactly this
        assert missed == [], f"never told of the desired change made after recovery: {missed}"
    for device in devices[1:]:
        await device.aclose()
    await redis_client.aclose()


async def _is_status(http: httpx.AsyncClient, path: str, status: int) -> bool:
    return await status_of(http, path) == status


# --- Redis unreachable at start ---------------------------------------------------------


async def test_redis_unreachable_at_start_then_ready(tmp_path: Path) -> None:
    redis_port = find_free_port()
    http_port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "REDIS_URL"}
    env.update(GATEWAY_API_KEY=ADMIN_KEY, GATEWAY_READ_API_KEYS=READ_KEY, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "gateway.log"
    process = _start_gateway(http_port, redis_port, env, log_path)
    server = RedisServer("valkey", data_dir=tmp_path / "late", port=redis_port)
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with api(base) as http:
            await eventually(lambda: _is_status(http, "/healthz", 200), "healthz", 15)
            assert await status_of(http, "/readyz") == 503
            response = await http.post("/api/devices", json={"device_id": "x", "device_type": "t"})
            assert response.status_code == 503, response.text

            def retried() -> int:
                return log_path.read_text(errors="replace").count("retrying in")

            await eventually(_sync(lambda: retried() >= 3), "log says it retries", 10)
            assert process.poll() is None
            started = time.monotonic()
            server.start()
            await eventually(lambda: _is_status(http, "/readyz", 200), "ready", 15)
            ready_after = time.monotonic() - started
            token = await register(http, "late-1")
            device = await Device.open(f"ws://127.0.0.1:{http_port}", "late-1", token)
            assert (await http.get("/api/devices/late-1")).json()["status"] == "online"
            await device.aclose()
            report("redis unreachable at start", ready_after_redis_up_s=ready_after,
                   retries_logged=retried())  # fmt: skip
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        server.stop()


def _start_gateway(
    http_port: int, redis_port: int, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """`python -m gateway serve` without waiting for readiness (Redis is not there yet)."""
    command = [
        sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
        "--port", str(http_port), "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )


def _sync(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


# --- pub/sub connection killed ------------------------------------------------------------


async def test_client_kill_pubsub_desired_changes_still_arrive(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    async with live_gateway(redis_url) as gw, api(gw.base_url) as http:
        ids = [f"ps-{n}" for n in range(5)]
        devices = [await Device.open(gw.ws_url, i, await register(http, i)) for i in ids]
        mark = await last_stream_id(client)
        reconnects = gw.gateway.broker.reconnects
        # the kill and the changes in one transaction: nobody is subscribed when they are
        # published, so only the re-send after the reconnect can tell the devices
        async with client.pipeline(transaction=True) as pipe:
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            for n, device_id in enumerate(ids):
                desired = {"setpoint": n, "round": 1}
                pipe.hset(f"device:state:{device_id}", "desired_state", orjson.dumps(desired))
                pipe.publish(
                    f"device:{device_id}:commands",
                    orjson.dumps({"type": "state_update", "desired_state": desired}),
                )
            await pipe.execute()
        started = time.monotonic()
        for n, device in enumerate(devices):
            frame = await device.wait_for(
                lambda f, n=n: (
                    f["type"] == "state_update"  # type: ignore[misc]
                    and f["desired_state"] == {"setpoint": n, "round": 1}
                )
            )
            assert frame.get("resync") is True
        resent_after = time.monotonic() - started
        assert gw.gateway.broker.reconnects > reconnects

        # killed again, and this time the API writes right after: delivered one way or another
        await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        for device_id in ids:
            response = await http.patch(
                f"/api/devices/{device_id}/desired", json={"state": {"round": 2}}
            )
            assert response.status_code == 200
        for device in devices:
            await device.wait_for(
                lambda f: f["type"] == "state_update" and f["desired_state"].get("round") == 2
            )
        # and resubscribed: a plain publish (the seed's way) reaches every device again
        await eventually(lambda: _subscribed(client, ids), "device channels resubscribed")
        for device_id in ids:
            await client.publish(f"device:{device_id}:commands", b'{"type":"ping-3"}')
        for device in devices:
            await device.wait_for(lambda f: f["type"] == "ping-3")
        presence = await stream_presence_after(client, mark)
        assert [e for e in presence if e["status"] == "offline"] == []
        for device in devices:
            assert not device.closed.is_set()
            await device.aclose()
        report("CLIENT KILL TYPE pubsub", resent_after_s=resent_after)
    await client.aclose()


async def _subscribed(client: aioredis.Redis, ids: list[str]) -> bool:
    try:
        counts = await client.pubsub_numsub(*[f"device:{i}:commands" for i in ids])
    except aioredis.ConnectionError:
        return False
    return all(count >= 1 for _, count in counts)


# --- a stalled link between gateway and Redis ----------------------------------------------


@contextlib.asynccontextmanager
async def proxied_gateway(redis_url: str, **settings: Any) -> AsyncIterator[
    tuple[LiveGateway, TcpProxy]
]:  # fmt: skip
    host_port = redis_url.split("://", 1)[1].split("/", 1)
    host, port = host_port[0].rsplit(":", 1)
    async with TcpProxy(host, int(port)) as proxy:
        proxied = f"redis://127.0.0.1:{proxy.port}/{host_port[1] if len(host_port) > 1 else 0}"
        async with live_gateway(proxied, **settings) as gw:
            yield gw, proxy


async def test_stall_between_gateway_and_redis_loses_no_presence(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    async with (
        proxied_gateway(redis_url, heartbeat_timeout=3.0, sweep_interval=0.5) as (gw, proxy),
        api(gw.base_url) as http,
        PresenceFeed(redis_url) as feed,
    ):
        ids = [f"st-{n}" for n in range(5)]
        devices = [await Device.open(gw.ws_url, i, await register(http, i)) for i in ids]
        for device in devices:
            device.beat_every(0.5)
        await asyncio.sleep(0.5)
        mark = await last_stream_id(client)

        proxy.pause()
        paused_at = time.monotonic()
        in_flight = asyncio.create_task(http.get(f"/api/devices/{ids[0]}"))
        await asyncio.sleep(4.0)  # longer than the heartbeat timeout: Redis expires the keys
        assert not in_flight.done(), "the API answered through a paused link?"
        proxy.resume()
        response = await asyncio.wait_for(in_flight, 10)
        in_flight_latency = time.monotonic() - paused_at
        assert response.status_code == 200, response.text
        # the in-flight request got ITS answer, not another request's
        assert response.json()["device_id"] == ids[0]
        resumed_at = time.monotonic()
        await eventually(lambda: _is_status(http, f"/api/devices/{ids[1]}", 200), "API back")
        api_back = time.monotonic() - resumed_at

        await asyncio.sleep(3.0 + 2.0)  # a whole timeout + slack after the stall
        for device_id, device in zip(ids, devices, strict=True):
            assert not device.closed.is_set()
            body = (await http.get(f"/api/devices/{device_id}")).json()
            assert body["status"] == "online", body
        presence = await stream_presence_after(client, mark)
        offline = [e for e in presence if e["status"] == "offline"]
        assert offline == [], offline
        assert [e for e in feed.events if e.get("status") == "offline"] == []
        # no "online again" either: nothing ever looked offline to the rest of the system
        assert [e for e in presence if e.get("reason") == "resumed"] == []
        for device in devices:
            await device.aclose()
        report(
            "4 s stall gateway↔Redis (timeout 3 s)",
            in_flight_request_s=in_flight_latency,
            api_back_after_resume_s=api_back,
            offline_events=len(offline),
            presence_events=len(presence),
        )
    await client.aclose()


async def test_cancelled_redis_call_never_leaves_a_stale_reply(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    values = {f"stale:{n}": f"value-{n}".encode() for n in range(12)}
    await client.mset(values)
    async with proxied_gateway(redis_url) as (gw, proxy):
        redis = gw.gateway.redis
        proxy.reply_delay = 0.1  # each reply (reconnect handshakes too) is held this long
        cancelled = 0
        names = list(values)
        for n in range(0, len(names) - 1, 2):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(redis.get(names[n]), 0.02)
            cancelled += 1
            # each following call must get its own reply, never the cancelled call's
            assert await redis.get(names[n + 1]) == values[names[n + 1]]
        proxy.reply_delay = 0.0
        # concurrent calls over the pool after all those cancellations: every one its own value
        replies = await asyncio.gather(*(redis.get(name) for name in names))
        assert replies == [values[name] for name in names]
        async with redis.pipeline(transaction=False) as pipe:
            for name in reversed(names):
                pipe.get(name)
            assert await pipe.execute() == [values[name] for name in reversed(names)]
        # a cancelled pipeline too
        proxy.reply_delay = 0.1
        with contextlib.suppress(TimeoutError):
            async with redis.pipeline(transaction=False) as pipe:
                pipe.get(names[0]).get(names[1])
                await asyncio.wait_for(pipe.execute(), 0.02)
        assert await redis.get(names[2]) == values[names[2]]
        proxy.reply_delay = 0.0
        report("cancelled calls through a slow link", cancelled=cancelled + 1)
    await client.delete(*values)
    await client.aclose()


# --- a gateway killed beside another -------------------------------------------------------


async def test_gateway_kill_9_devices_move_to_the_survivor(
    redis_url: str, gateway_factory: Any
) -> None:
    settings = {"heartbeat_timeout": "3", "sweep_interval": "0.5"}
    doomed = gateway_factory(redis_url, **settings)
    survivor = gateway_factory(redis_url, **settings)
    client = aioredis.Redis.from_url(redis_url)
    async with api(survivor.base_url) as http, PresenceFeed(redis_url) as feed:
        on_doomed = [f"gk-a{n}" for n in range(4)]
        on_survivor = [f"gk-b{n}" for n in range(4)]
        abandoned = "gk-gone"  # on the doomed gateway and never reconnects
        tokens = {i: await register(http, i) for i in [*on_doomed, *on_survivor, abandoned]}
        devices = {i: await Device.open(doomed.ws_url, i, tokens[i]) for i in on_doomed}
        devices |= {i: await Device.open(survivor.ws_url, i, tokens[i]) for i in on_survivor}
        gone = await Device.open(doomed.ws_url, abandoned, tokens[abandoned])
        for device in devices.values():
            device.beat_every(0.5)
        await asyncio.sleep(0.5)

        doomed.kill()
        killed_at = time.monotonic()
        for device_id in on_doomed:
            await asyncio.wait_for(devices[device_id].closed.wait(), TIMEOUT)
            await devices[device_id].aclose()
        noticed = time.monotonic() - killed_at
        # the client reconnects elsewhere, as firmware would
        for device_id in on_doomed:
            devices[device_id] = await Device.open(survivor.ws_url, device_id, tokens[device_id])
            devices[device_id].beat_every(0.5)
        reconnected = time.monotonic() - killed_at

        async def abandoned_offline() -> bool:
            return bool(feed.of(abandoned, "offline"))

        await eventually(abandoned_offline, "the abandoned device goes offline", 3 + 2 + 2)
        detected = time.monotonic() - killed_at
        await asyncio.sleep(3 + 2)  # a whole timeout more: nothing else may happen

        for device_id in [*on_doomed, *on_survivor, abandoned]:
            events = feed.of(device_id)
            versions = [e["version"] for e in events]
            assert versions == sorted(set(versions)), (device_id, events)
            statuses = [e["status"] for e in events]
            # no transition twice in a row: each one published once
            assert all(a != b for a, b in itertools.pairwise(statuses)) or all(
                e.get("reason") == "replaced" for e in events[1:] if e["status"] == "online"
            ), (device_id, events)
        for device_id in on_survivor:
            assert [e["status"] for e in feed.of(device_id)] == ["online"], feed.of(device_id)
        for device_id in on_doomed:
            events = feed.of(device_id)
            assert len(feed.of(device_id, "offline")) <= 1, events
            assert events[-1]["status"] == "online", events
            body = (await http.get(f"/api/devices/{device_id}")).json()
            assert body["status"] == "online"
        gone_events = feed.of(abandoned)
        assert [(e["status"], e["reason"]) for e in gone_events] == [
            ("online", "connected"),
            ("offline", "expired"),
        ], gone_events
        report(
            "gateway kill -9 (2 instances, timeout 3 s)",
            sockets_saw_close_s=noticed,
            all_reconnected_s=reconnected,
            abandoned_offline_s=detected,
            moved_reasons=",".join(
                sorted({e["reason"] for i in on_doomed for e in feed.of(i)[1:]})
            ),
        )
        for device in devices.values():
            await device.aclose()
        await gone.aclose()
    await client.aclose()


# --- a device that stops reading -----------------------------------------------------------


async def _stalled_socket(gw: LiveGateway, device_id: str, token: str) -> socket.socket:
    """Completes the handshake, then never reads again (tiny receive buffer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    request = (
        f"GET /ws/devices/{device_id} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    async with asyncio.timeout(TIMEOUT):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _transport_of(send: Any) -> asyncio.Transport | None:
    """The uvicorn transport behind an ASGI send callable (Starlette wraps it in closures)."""
    for _ in range(5):
        owner = getattr(send, "__self__", None)
        if owner is not None and hasattr(owner, "transport"):
            return cast(asyncio.Transport, owner.transport)
        cells = [cell.cell_contents for cell in getattr(send, "__closure__", None) or ()]
        send = next((c for c in cells if callable(c)), None)
        if send is None:
            return None
    return None


def _buffered_bytes(gw: LiveGateway, device_id: str) -> int:
    """Bytes waiting in the transport of the device's server-side socket (0 once it is gone)."""
    session = gw.gateway.hub.sessions.get(device_id)
    if session is None:
        return 0
    transport = _transport_of(getattr(session.websocket, "_send", None))
    return int(transport.get_write_buffer_size()) if transport is not None else 0


async def test_stalled_device_is_dropped_and_others_keep_their_latency(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    async with (
        live_gateway(redis_url, send_queue_size=64) as gw,
        api(gw.base_url) as http,
        PresenceFeed(redis_url) as feed,
    ):
        ids = [f"lat-{n}" for n in range(5)]
        devices = [await Device.open(gw.ws_url, i, await register(http, i)) for i in ids]
        stalled = await _stalled_socket(gw, "stall-1", await register(http, "stall-1"))
        try:
            blob = orjson.dumps({"type": "blob", "data": "z" * 16_000})
            latencies: list[float] = []
            dropped_at: float | None = None
            started = time.monotonic()
            for n in range(200):
                if dropped_at is None:
                    for _ in range(5):
                        await client.publish("device:stall-1:commands", blob)
                sent = time.monotonic()
                stamp = orjson.dumps({"type": "probe", "n": n, "sent": sent})
                for device_id in ids:
                    await client.publish(f"device:{device_id}:commands", stamp)
                if dropped_at is None and feed.of("stall-1", "offline"):
                    dropped_at = time.monotonic() - started
                await asyncio.sleep(0.01)
            for device in devices:
                for n in range(200):
                    frame = await device.wait_for(
                        lambda f, n=n: f["type"] == "probe" and f["n"] == n  # type: ignore[misc]
                    )
                    index = device.frames.index(frame)
                    latencies.append(device.received_at[index] - frame["sent"])
            with contextlib.suppress(AssertionError):
                await eventually(
                    _sync(lambda: bool(feed.of("stall-1", "offline"))), "stalled device dropped"
                )
            if dropped_at is None and feed.of("stall-1", "offline"):
                dropped_at = time.monotonic() - started
            buffered = _buffered_bytes(gw, "stall-1")
            stalled_session = gw.gateway.hub.sessions.get("stall-1")
            writer_state = (
                "gone"
                if stalled_session is None
                else f"closed={stalled_session.writer.closed},reason={stalled_session.close_reason}"
            )
            latencies.sort()
            p50 = statistics.median(latencies)
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            report(
                "stalled device among 5 healthy ones",
                dropped_after_s=dropped_at if dropped_at is not None else "never",
                stalled_socket_buffered_bytes=buffered,
                stalled_writer=writer_state,
                probes=len(latencies),
                p50_ms=p50 * 1000,
                p99_ms=p99 * 1000,
                max_ms=latencies[-1] * 1000,
            )
            assert p99 < 1.0, f"p99 command latency {p99:.3f} s while a peer stalled"
            for device_id, device in zip(ids, devices, strict=True):
                assert not device.closed.is_set()
                assert feed.of(device_id, "offline") == []
            offline = feed.of("stall-1", "offline")
            assert [e["reason"] for e in offline] == ["slow_consumer"], (
                f"a device that never reads was not dropped ({writer_state}); the gateway still "
                f"holds its socket, {buffered} bytes in the write buffer"
            )
        finally:
            stalled.close()
            for device in devices:
                await device.aclose()
    await client.aclose()
