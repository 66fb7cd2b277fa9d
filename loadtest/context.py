"""One run's context: its options and processes, its devices and fleet, what it measured.

A scenario (`loadtest/scenarios/`) drives a run through it: register devices, start the
worker fleet, wait until they are online, mark the start of a window and read what the window
cost, watch presence events. Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import redisconn
from gateway.eventlog import EventLog, parse_id
from gateway.keys import Keys
from loadtest import generator, layout, procstat
from loadtest.cluster import Cluster
from loadtest.options import Options
from loadtest.registration import register
from loadtest.sim import Fleet, WorkerSpec

TAIL_POLL_S = 0.05
TAIL_COUNT = 1000  # entries per partition and read
TAIL_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass
class Result:
    metrics: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


@dataclass
class Mark:
    at: float
    gateway_cpu: float
    redis_cpu: float
    generator: generator.Readings


class Ctx:
    def __init__(self, opts: Options, cluster: Cluster, generator_cores: int) -> None:
        self.opts = opts
        self.cluster = cluster
        # the gateways a run starts use no key prefix
        self.keys = Keys.cluster() if opts.cluster else Keys()
        self.run_id = secrets.token_hex(3)
        self.stem = f"{opts.result_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.tokens: dict[str, str] = {}
        self.ids: list[str] = []
        self.fleet: Fleet | None = None
        self.redis: redisconn.Client | None = None
        self.sampler = procstat.Sampler({"gateway": [], "redis": []})
        self.load = generator.GeneratorLoad(generator_cores)
        self.phase = "starting"
        self.progress_key = "handshake_ms"  # the latency the live view shows a p99 of
        self.started = time.monotonic()
        self.result = Result()
        self.presence: Counter[str] = Counter()
        self.presence_log: list[tuple[float, dict[str, Any]]] = []
        self.presence_changed = asyncio.Event()
        self.rss_before_connect = 0

    # --- setup ----------------------------------------------------------------
    async def setup(self) -> None:
        await self.cluster.start()
        self.sampler.groups["gateway"] = self.cluster.gateway_pids
        self.sampler.groups["redis"] = self.cluster.redis_pids
        url = self.cluster.redis_url
        if url and redisconn.is_cluster_url(url):
            client = redisconn.connect_cluster(url)
            await client.initialize()
            self.redis = client
        elif url:
            self.redis = aioredis.Redis.from_url(url)

    def need_redis(self) -> redisconn.Client:
        if self.redis is None:
            raise SystemExit(
                f"loadtest: scenario {self.opts.scenario} reads Redis: give --redis-url "
                "(or use --start-gateways)"
            )
        return self.redis

    async def register(self, count: int) -> None:
        """*count* fresh devices registered through the API; their ids and tokens kept."""
        self.phase = f"registering {count}"
        ids = [f"lt-{self.run_id}-{i:06d}" for i in range(count)]
        self.tokens, failures = await register(
            self.cluster.base_urls, self.opts.api_key, ids, self.opts.device_type
        )
        self.ids = [i for i in ids if i in self.tokens]
        if failures:
            self.result.metrics["register_failures"] = sum(failures.values())
        if len(self.ids) < count:
            raise SystemExit(
                f"loadtest: registered only {len(self.ids)}/{count} devices ({dict(failures)})"
            )

    async def start_fleet(
        self,
        send_interval: float = 0.0,
        dashboards: int = 0,
        stalled: bool = False,
        reconnect: bool = True,
        rotate: bool = False,
        heartbeat_interval: float | None = None,
        with_devices: bool = True,
    ) -> Fleet:
        """Worker processes holding the registered devices (and dashboards), not yet connecting."""
        template = WorkerSpec(
            index=0,
            gateways=layout.gateway_addresses(self.opts, self.cluster.ports),
            devices=[],
            dashboards=[],
            api_key=self.opts.api_key,
            heartbeat_interval=heartbeat_interval or self.opts.heartbeat_interval,
            send_interval=send_interval,
            frame=self.opts.frame,
            connect_concurrency=self.opts.connect_concurrency,
            reconnect=reconnect,
            rotate_on_reconnect=rotate,
        )
        devices = [(i, self.tokens[i]) for i in self.ids] if with_devices else []
        specs = layout.worker_specs(self.opts, template, devices, dashboards, stalled)
        self.phase = f"starting {len(specs)} workers"
        self.fleet = Fleet(specs)
        await self.fleet.start()
        return self.fleet

    def go(self) -> float:
        assert self.fleet is not None
        self.phase = "connecting"
        self.fleet.command("go")
        return time.perf_counter()

    async def wait_online(self, count: int, within: float, stall: float = 30.0) -> bool:
        """Until *count* devices are online; gives up after *within* or *stall* s of no gain."""
        fleet = self.fleet
        assert fleet is not None
        deadline = time.monotonic() + within
        best, best_at = -1, time.monotonic()
        while time.monotonic() < deadline:
            online = fleet.total("online")
            if online >= count:
                return True
            if online > best:
                best, best_at = online, time.monotonic()
            elif time.monotonic() - best_at > stall:
                return False
            await fleet.wait_for(lambda: fleet.total("online") >= count, 1.0)
        return fleet.total("online") >= count

    # --- what a window cost -----------------------------------------------------
    def mark(self) -> Mark:
        snap = self.sampler.snapshot()
        workers = self.fleet.pids if self.fleet is not None else {}
        return Mark(
            time.perf_counter(), snap["gateway"].cpu_s, snap["redis"].cpu_s, generator.read(workers)
        )

    def cost(self, start: Mark, messages: float, prefix: str = "") -> dict[str, float]:
        """CPU-seconds of gateways and Redis between *start* and now, per 1,000 messages.

        The generator's own CPU over the same window is kept too (`self.load`), to judge
        whether it kept up.
        """
        end = self.mark()
        self.load.observe(start.generator, end.generator, end.at - start.at)
        gateway_cpu = end.gateway_cpu - start.gateway_cpu
        redis_cpu = end.redis_cpu - start.redis_cpu
        per = 1000 / messages if messages else math.nan
        return {
            f"{prefix}window_s": round(end.at - start.at, 3),
            f"{prefix}messages": messages,
            f"{prefix}gateway_cpu_s": round(gateway_cpu, 3),
            f"{prefix}redis_cpu_s": round(redis_cpu, 3),
            f"{prefix}gateway_cpu_s_per_1k_msgs": round(gateway_cpu * per, 5),
            f"{prefix}redis_cpu_s_per_1k_msgs": round(redis_cpu * per, 5),
            f"{prefix}gateway_cpu_util": round(gateway_cpu / max(end.at - start.at, 1e-9), 3),
        }

    async def online_in_redis(self) -> int:
        """Devices Redis counts online: the seed's online set on one node, the online
        indexes of every partition on a cluster (which has no fleet-wide set)."""
        redis = self.need_redis()
        if isinstance(redis, aioredis.Redis):
            return int(await redis.scard(self.keys.online))
        async with redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.zcard(part.index_online)
            return sum(int(count) for count in await pipe.execute())

    # --- presence events ----------------------------------------------------------
    async def watch_presence(self, ids: set[str] | None = None) -> Callable[[], Awaitable[None]]:
        """Subscribe to the presence channel; events of *ids* (all: None) are logged on arrival.

        On a cluster the presence channel is sharded per partition and a failover drops
        what was published meanwhile, so the events are read from every partition's fleet
        log instead (`tail_events`), timed by their stream id.
        """
        redis = self.need_redis()
        if not isinstance(redis, aioredis.Redis):
            return await self.tail_events(redis, ids)
        pubsub = redis.pubsub()
        await pubsub.subscribe(self.keys.presence_channel)

        async def reader() -> None:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self._presence_event(time.time(), message["data"], ids)

        task = asyncio.create_task(reader())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

        return stop

    async def tail_events(
        self, redis: redisconn.Client, ids: set[str] | None
    ) -> Callable[[], Awaitable[None]]:
        """Presence events of *ids* read from every partition's fleet log, from now on.

        Every `TAIL_POLL_S` each partition's stream is read after the position reached
        (one pipeline per node), so nothing written is missed while a node fails over: a
        read that fails is made again. Each event is timed by its stream id, Redis's clock
        when the script wrote and published it.
        """
        log = EventLog(redis, self.keys)
        position = await log.position()
        failed = 0

        async def drain() -> None:
            nonlocal position
            while True:
                reads = await log.read(position, TAIL_COUNT)
                for read in reads:
                    for entry_id, body in read.entries:
                        sid = parse_id(entry_id.decode())
                        position = position.advanced(read.partition, sid)
                        data = body.get(b"event", b"")
                        # the scripts write an event's type first: no need to parse the rest
                        if data.startswith(b'{"type":"presence"'):
                            self._presence_event(sid[0] / 1000, data, ids)
                if all(len(read.entries) < TAIL_COUNT for read in reads):
                    return

        async def reader() -> None:
            nonlocal failed
            while True:
                try:
                    await drain()
                except TAIL_ERRORS:
                    failed += 1  # a node failing over: the same position is read again
                await asyncio.sleep(TAIL_POLL_S)

        task = asyncio.create_task(reader())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(*TAIL_ERRORS):
                await drain()  # what was written up to now
            self.result.metrics["event_log_reads_failed"] = failed

        return stop

    def _presence_event(self, arrived: float, data: bytes, ids: set[str] | None) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if ids is not None and event.get("device_id") not in ids:
            return
        self.presence[f"{event.get('status')}:{event.get('reason', '?')}"] += 1
        self.presence_log.append((arrived, event))
        self.presence_changed.set()

    def offline_events(self, since: float = 0.0) -> int:
        return sum(1 for at, e in self.presence_log if at >= since and e.get("status") == "offline")

    def fleet_metrics(self) -> dict[str, Any]:
        fleet = self.fleet
        if fleet is None:
            return {}
        metrics: dict[str, Any] = {
            "connect_failures": fleet.total("connect_failures"),
            "disconnects": fleet.total("disconnects"),
            "errors_total": sum(fleet.error_totals().values()),
        }
        for name, count in fleet.error_totals().most_common(5):
            metrics[f"error_{name}"] = count
        for code, count in fleet.close_totals().items():
            metrics[f"close_{code}"] = count
        return metrics
