"""What a run produces besides its devices' frames: desired changes and presence transitions.

Every producer keeps its rate by a clock, not by sleeps (a late tick makes what fell due), and
bounds what it has in flight: one that falls behind catches up in bounded steps and never
grows past its Redis pool or its HTTP connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis

from gateway import redisconn
from gateway.config import Settings
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.store import Store

IN_FLIGHT = 200  # desired changes at once
PRODUCER_TICK_S = 0.005
PRESENCE_IN_FLIGHT = 32  # connect scripts at once, well inside a redis-py pool of 100
PRESENCE_BATCH = 500  # transitions written per step, however far behind the clock


async def paced(
    rate: float, duration: float, make: Callable[[int], Awaitable[None]], in_flight: int
) -> None:
    """`make(k)` for k = 0, 1, … at *rate*/s for *duration* s, at most *in_flight* at once."""
    gate = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int) -> None:
        try:
            await make(k)
        finally:
            gate.release()

    start = time.monotonic()
    k = 0
    while time.monotonic() - start < duration:
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        task = asyncio.create_task(one(k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
    if tasks:
        await asyncio.wait(tasks, timeout=15)


def probe(k: int) -> dict[str, int]:
    """A desired change a simulated device times: when it was made (ns) and its number."""
    return {"probe": time.time_ns(), "seq": k}


@dataclass
class Sent:
    """Desired changes made through the API: counts by status, and which were accepted."""

    statuses: dict[str, int]
    accepted: list[int]  # `seq` of every change answered 2xx; change k went to ids[k % len]

    @property
    def ok(self) -> int:
        return len(self.accepted)


@dataclass
class Delivery:
    """Accepted changes against those the devices received, by `seq`."""

    missing: list[int]  # never received, nor any later change to the same device
    superseded: int  # not received, but a later change to the same device was


def delivery(accepted: list[int], received: set[int], devices: int) -> Delivery:
    """Which accepted changes never reached their device. One not received counts as
    delivered when a later change to the same device was (the device was sent the newer
    desired state instead, which is all a shadow promises)."""
    missing: list[int] = []
    superseded = 0
    latest: dict[int, int] = {}
    for seq in received:
        device = seq % devices
        latest[device] = max(latest.get(device, -1), seq)
    for seq in sorted(accepted):
        if seq in received:
            continue
        if latest.get(seq % devices, -1) > seq:
            superseded += 1
        else:
            missing.append(seq)
    return Delivery(missing, superseded)


async def http_command_load(
    base_urls: list[str], api_key: str, ids: list[str], rate: float, duration: float
) -> Sent:
    """`PATCH /api/devices/{id}/desired` with a probe at *rate*/s; counts by status."""
    statuses: Counter[str] = Counter()
    accepted: list[int] = []
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(headers=headers, timeout=10, limits=limits) as client:

        async def patch(k: int) -> None:
            url = f"{base_urls[k % len(base_urls)]}/api/devices/{ids[k % len(ids)]}/desired"
            try:
                response = await client.patch(url, json={"state": probe(k)})
                statuses[str(response.status_code)] += 1
                if response.is_success:
                    accepted.append(k)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

        await paced(rate, duration, patch, IN_FLIGHT)
    return Sent(dict(statuses), accepted)


async def store_command_load(
    redis_url: str, ids: list[str], rate: float, duration: float
) -> dict[str, int]:
    """Desired changes with a probe at *rate*/s, written the way the API writes them.

    `Store.patch_section` runs the compare-and-set script, which publishes on the device's
    command channel, from this process, without HTTP: the HTTP layer is measured by bench-api,
    and one Python process cannot both drive 1,000 HTTP requests/s and stay out of the latency
    it measures. Counts `200` per change written, else the exception's name.
    """
    statuses: Counter[str] = Counter()
    redis: redisconn.Client
    if redisconn.is_cluster_url(redis_url):
        redis, keys = redisconn.connect_cluster(redis_url), Keys.cluster()
        await redis.initialize()
    else:
        redis, keys = redisconn.connect(redis_url), Keys()
    store = Store(redis, Settings(redis_url=redis_url), keys)

    async def change(k: int) -> None:
        try:
            await store.patch_section(ids[k % len(ids)], "desired", probe(k))
            statuses["200"] += 1
        except Exception as exc:  # counted, never fatal: the lost count says what matters
            statuses[type(exc).__name__] += 1

    try:
        await paced(rate, duration, change, IN_FLIGHT)
    finally:
        await redis.aclose()
    return dict(statuses)


class PresenceProducer:
    """Flips registered devices online and offline at *rate*/s with the gateway's own engine.

    Each transition is one `PresenceEngine.connect` of an offline device (`connected`) or one
    `end` of an online one without grace (`closed`, written by the engine's batched
    `disconnect`), so each writes exactly one presence event to the fleet stream straight into
    Redis: the gateways under test only fan them out. Devices take turns, each online for
    len(ids) / rate seconds under a heartbeat key that outlives the run, so none expires by
    itself and adds an event nobody produced. A producer behind its clock writes what fell due
    in steps of 500, 32 connects in flight; `max_behind` says how far behind it ever was.
    """

    SESSION = "loadtest-producer"

    def __init__(self, redis: aioredis.Redis, ids: list[str], rate: float, ttl_s: float) -> None:
        self.ids = ids
        self.rate = rate
        settings = Settings(heartbeat_timeout=ttl_s, offline_grace=0)
        self.engine = PresenceEngine(
            redis, Store(redis, settings), settings, Metrics(), _producer_refused
        )
        self.online: set[str] = set()
        self.done = 0  # transitions written
        self.max_behind = 0  # transitions due but not yet written, at worst
        self._gate = asyncio.Semaphore(PRESENCE_IN_FLIGHT)

    async def run(self) -> None:
        started = time.perf_counter()
        while True:
            due = int((time.perf_counter() - started) * self.rate) - self.done
            self.max_behind = max(self.max_behind, due)
            if due > 0:
                step = min(due, PRESENCE_BATCH)
                await self.flip([self.ids[(self.done + i) % len(self.ids)] for i in range(step)])
                self.done += step
            await asyncio.sleep(PRODUCER_TICK_S)

    async def flip(self, ids: list[str]) -> None:
        connecting = [device_id for device_id in ids if device_id not in self.online]
        for device_id in ids:
            if device_id in self.online:
                self.online.discard(device_id)
                self.engine.end(device_id, self.SESSION, "closed")
            else:
                self.online.add(device_id)
        await asyncio.gather(*(self._connect(device_id) for device_id in connecting))
        await self.engine.flush()

    async def _connect(self, device_id: str) -> None:
        async with self._gate:
            await self.engine.connect(device_id, self.SESSION, "")

    async def finish(self) -> None:
        """Take every device it left online offline (after the window: not counted)."""
        online = sorted(self.online)
        for start in range(0, len(online), PRESENCE_BATCH):
            await self.flip(online[start : start + PRESENCE_BATCH])


def _producer_refused(device_id: str, session: str, code: int) -> None:
    raise RuntimeError(f"the producer's own session of {device_id} was refused ({code})")
