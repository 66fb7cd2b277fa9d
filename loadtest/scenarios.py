"""The scenarios, and everything a run needs around them: gateways, Redis, registration, progress.

A run: start (or find) the gateways and Redis, register the devices in bulk over the REST API,
spawn worker processes holding the simulated devices, run the scenario while a live table shows
progress, then write a JSON result and plots. Every wait is bounded; everything started is
stopped in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import redis.asyncio as aioredis

from gateway import redisconn
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.store import Store, text
from loadtest import procstat, report
from loadtest.sim import LATENCY_DASHBOARDS, Fleet, WorkerSpec, raise_nofile, stream_key

PER_WORKER = 15_000  # sockets per worker process, under the 20,000 open-files limit
PER_SOURCE = 25_000  # devices per loopback source address (~28,000 ephemeral ports)
PER_GATEWAY = 16_000  # device sockets per gateway process (same open-files limit)
# dashboards per worker process: a batch reaches every dashboard at once, and one process
# reads its dashboards' frames one after another, so fewer per process keeps that queue short
DASHBOARDS_PER_WORKER = 125
REGISTER_CONCURRENCY = 64
PRESENCE = "devices:presence"
EVENTS = "devices:events"
ONLINE = "devices:online"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
INGEST_CONVERGE_S = 10.0


@dataclass
class Options:
    scenario: str
    devices: int
    dashboards: int
    duration: float
    workers: int
    source_addrs: int
    gateway: list[str]
    start_gateways: int
    redis_url: str | None
    heartbeat_interval: float
    heartbeat_timeout: float | None
    offline_grace: float | None
    rate: float
    out: Path
    api_key: str
    connect_concurrency: int
    drop: str
    frame: str
    stalled_dashboard: bool
    live: bool
    command: str
    device_type: str = "loadtest"
    fanout_events: str = "presence"  # fanout: presence transitions in Redis, or device state


# name → defaults applied when the option was not given
DEFAULTS: dict[str, dict[str, Any]] = {
    "idle": {"devices": 1000, "duration": 10.0},
    "connect-storm": {"devices": 1000, "duration": 2.0, "connect_concurrency": 512},
    "ingest": {"devices": 500, "duration": 15.0, "rate": 2000.0},
    "desired-latency": {"devices": 200, "duration": 15.0, "rate": 100.0},
    "fanout": {"devices": 100, "dashboards": 20, "duration": 15.0, "rate": 200.0},
    "offline-lag": {"devices": 200, "duration": 0.0, "heartbeat_timeout": 5.0},
    "reconnect-storm": {
        "devices": 500,
        "duration": 5.0,
        "start_gateways": 2,
        "offline_grace": 10.0,
    },
    "soak": {"devices": 1000, "duration": 600.0},
    "moonshot": {
        "devices": 100_000,
        "duration": 600.0,
        "start_gateways": 7,
        "heartbeat_interval": 30.0,
        "offline_grace": 15.0,
        "rate": 20.0,
        "connect_concurrency": 256,
    },
}
SCENARIOS = tuple(DEFAULTS)


# --- gateways and Redis ---------------------------------------------------------------
def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if not address.is_loopback:
        raise SystemExit(f"loadtest: {url} is not a loopback address; load tests stay on 127/8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """Gateways (started here, or given) sharing one Redis (private valkey, or given)."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="loadtest-"))
        self.redis_url = opts.redis_url
        self.redis_pid: int | None = None
        self.redis_version: str | None = None
        self.embedded: Any = None
        self.ports: list[int] = []
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.base_urls: list[str] = []
        self.started = opts.start_gateways > 0

    @property
    def gateway_pids(self) -> list[int]:
        if self.started:
            return [p.pid for p in self.processes.values() if p.returncode is None]
        pids: list[int] = []
        for port in self.ports:
            pids += procstat.pids_listening(port)
        return sorted(set(pids))

    async def start(self) -> None:
        if self.started and not self.redis_url:
            from gateway.embedded import EmbeddedRedis

            self.embedded = EmbeddedRedis(self.tmp / "redis")
            self.redis_url = await self.embedded.start()
            self.redis_pid = self.embedded.pid
        if self.redis_url:
            check_loopback(self.redis_url.replace("redis://", "http://", 1))
            client = aioredis.Redis.from_url(self.redis_url)
            try:
                info = await client.info("server")
            finally:
                await client.aclose()
            self.redis_version = str(info.get("valkey_version") or info.get("redis_version"))
            pid = int(info.get("process_id", 0))
            if (
                self.redis_pid is None
                and pid
                and await asyncio.to_thread(os.path.isdir, f"/proc/{pid}")
            ):
                self.redis_pid = pid
        if self.started:
            self.ports = [free_port() for _ in range(self.opts.start_gateways)]
            await asyncio.gather(*(self.spawn(i) for i in range(len(self.ports))))
        else:
            for url in self.opts.gateway:
                check_loopback(url)
                self.ports.append(urlsplit(url).port or 80)
        self.base_urls = (
            [f"http://127.0.0.1:{p}" for p in self.ports]
            if self.started
            else [u.rstrip("/") for u in self.opts.gateway]
        )

    def gateway_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "GATEWAY_API_KEY": self.opts.api_key,
                "GATEWAY_LOG_LEVEL": "warning",
                "REDIS_URL": self.redis_url or "",
            }
        )
        if self.opts.heartbeat_timeout is not None:
            env["GATEWAY_HEARTBEAT_TIMEOUT"] = str(self.opts.heartbeat_timeout)
        if self.opts.offline_grace is not None:
            env["GATEWAY_OFFLINE_GRACE"] = str(self.opts.offline_grace)
        return env

    async def spawn(self, index: int) -> None:
        port = self.ports[index]
        log = await asyncio.to_thread(open, self.tmp / f"gateway-{index}.log", "ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--redis-url", self.redis_url or "",
                env=self.gateway_env(), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self.processes[index] = process
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if process.returncode is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"http://127.0.0.1:{port}/readyz")
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.1)
        tail = (self.tmp / f"gateway-{index}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"gateway {index} on port {port} did not become ready:\n{tail}")

    async def stop_gateway(self, index: int) -> None:
        process = self.processes.get(index)
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def close(self) -> None:
        await asyncio.gather(*(self.stop_gateway(i) for i in list(self.processes)))
        if self.embedded is not None:
            await self.embedded.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def metric(self, prefix: str, label: str | None = None) -> float:
        """Sum over every gateway of the Prometheus samples starting with *prefix*."""
        total = 0.0
        async with httpx.AsyncClient(timeout=5) as client:
            for base in self.base_urls:
                with contextlib.suppress(httpx.HTTPError):
                    text = (await client.get(f"{base}/metrics")).text
                    for line in text.splitlines():
                        if line.startswith(prefix) and (label is None or label in line):
                            total += float(line.rsplit(" ", 1)[1])
        return total


# --- the run context --------------------------------------------------------------------
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


class Ctx:
    def __init__(self, opts: Options, cluster: Cluster) -> None:
        self.opts = opts
        self.cluster = cluster
        self.run_id = secrets.token_hex(3)
        self.stem = f"{opts.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.tokens: dict[str, str] = {}
        self.ids: list[str] = []
        self.fleet: Fleet | None = None
        self.redis: aioredis.Redis | None = None
        self.sampler = procstat.Sampler({"gateway": [], "redis": []})
        self.phase = "starting"
        self.progress_key = "handshake_ms"
        self.started = time.monotonic()
        self.result = Result()
        self.presence: Counter[str] = Counter()
        self.presence_log: list[tuple[float, dict[str, Any]]] = []
        self.presence_changed = asyncio.Event()
        self._last_sent = 0
        self._last_tick = time.monotonic()
        self.rate_now = 0.0
        self.extra_row: dict[str, str] = {}
        self.rss_before_connect = 0

    # --- setup ----------------------------------------------------------------
    async def setup(self) -> None:
        await self.cluster.start()
        self.sampler.groups["gateway"] = self.cluster.gateway_pids
        self.sampler.groups["redis"] = [self.cluster.redis_pid] if self.cluster.redis_pid else []
        if self.cluster.redis_url:
            self.redis = aioredis.Redis.from_url(self.cluster.redis_url)

    def need_redis(self) -> aioredis.Redis:
        if self.redis is None:
            raise SystemExit(
                f"loadtest: scenario {self.opts.scenario} reads Redis: give --redis-url "
                "(or use --start-gateways)"
            )
        return self.redis

    async def register(self, count: int) -> None:
        """POST /api/devices for *count* fresh ids, concurrently (bounded), tokens kept."""
        self.phase = f"registering {count}"
        ids = [f"lt-{self.run_id}-{i:06d}" for i in range(count)]
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(ids):
            queue.put_nowait(item)
        headers = {"Authorization": f"Bearer {self.opts.api_key}"}
        failures: Counter[str] = Counter()

        async def register_one(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                index, device_id = queue.get_nowait()
                base = self.cluster.base_urls[index % len(self.cluster.base_urls)]
                body = {"device_id": device_id, "device_type": self.opts.device_type}
                for _attempt in range(5):
                    try:
                        response = await client.post(f"{base}/api/devices", json=body)
                    except httpx.HTTPError as exc:
                        failures[type(exc).__name__] += 1
                        await asyncio.sleep(0.5)
                        continue
                    if response.status_code == 201:
                        self.tokens[device_id] = response.json()["token"]
                        break
                    failures[f"http_{response.status_code}"] += 1
                    if response.status_code < 500 and response.status_code != 429:
                        break
                    await asyncio.sleep(0.5)

        limits = httpx.Limits(max_connections=REGISTER_CONCURRENCY)
        async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as client:
            await asyncio.gather(*(register_one(client) for _ in range(REGISTER_CONCURRENCY)))
        self.ids = [i for i in ids if i in self.tokens]
        if failures:
            self.result.metrics["register_failures"] = sum(failures.values())
        if len(self.ids) < count:
            raise SystemExit(
                f"loadtest: registered only {len(self.ids)}/{count} devices ({dict(failures)})"
            )

    def worker_count(self, sockets: int, dashboards: int = 0) -> int:
        if self.opts.workers > 0:
            return self.opts.workers
        return max(
            1, math.ceil(sockets / PER_WORKER), math.ceil(dashboards / DASHBOARDS_PER_WORKER)
        )

    def source_addrs(self, sockets: int) -> list[str]:
        k = self.opts.source_addrs
        if k < 0:  # auto
            k = math.ceil(sockets / PER_SOURCE) if sockets > PER_SOURCE else 0
        return [f"127.0.0.{2 + i}" for i in range(k)]

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
        devices = self.ids if with_devices else []
        sockets = len(devices) + dashboards + int(stalled)
        workers = self.worker_count(sockets, dashboards)
        sources = self.source_addrs(sockets) or [""]
        gateways = [("127.0.0.1", port) for port in self.cluster.ports]
        if not self.cluster.started:
            gateways = [
                (urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80)
                for u in self.opts.gateway
            ]
        specs = [
            WorkerSpec(
                index=w,
                gateways=gateways,
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
            for w in range(workers)
        ]
        for i, device_id in enumerate(devices):
            specs[i % workers].devices.append(
                (device_id, self.tokens[device_id], i % len(gateways), sources[i % len(sources)])
            )
        sampled_every = max(1, dashboards // LATENCY_DASHBOARDS)
        for j in range(dashboards + int(stalled)):
            stalled_one = j == dashboards
            specs[j % workers].dashboards.append(
                (j % len(gateways), sources[j % len(sources)], stalled_one,
                 not stalled_one and j % sampled_every == 0)
            )  # fmt: skip
        self.phase = f"starting {workers} workers"
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

    def mark(self) -> Mark:
        snap = self.sampler.snapshot()
        return Mark(time.perf_counter(), snap["gateway"].cpu_s, snap["redis"].cpu_s)

    def cost(self, start: Mark, messages: float, prefix: str = "") -> dict[str, float]:
        """CPU-seconds of gateways and Redis between *start* and now, per 1,000 messages."""
        end = self.mark()
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

    def memory(self, prefix: str = "") -> dict[str, float]:
        snap = self.sampler.snapshot()
        return {
            f"{prefix}gateway_rss_mib": round(snap["gateway"].rss_bytes / 2**20, 2),
            f"{prefix}redis_rss_mib": round(snap["redis"].rss_bytes / 2**20, 2),
        }

    async def watch_presence(self, ids: set[str] | None = None) -> Callable[[], Awaitable[None]]:
        """Subscribe to devices:presence; events of *ids* (all: None) are logged with arrival."""
        redis = self.need_redis()
        pubsub = redis.pubsub()
        await pubsub.subscribe(PRESENCE)
        watched = ids

        async def reader() -> None:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                arrived = time.time()
                try:
                    event = orjson.loads(message["data"])
                except orjson.JSONDecodeError:
                    continue
                if watched is not None and event.get("device_id") not in watched:
                    continue
                self.presence[f"{event.get('status')}:{event.get('reason', '?')}"] += 1
                self.presence_log.append((arrived, event))
                self.presence_changed.set()

        task = asyncio.create_task(reader())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

        return stop

    def offline_events(self, since: float = 0.0) -> int:
        return sum(1 for at, e in self.presence_log if at >= since and e.get("status") == "offline")

    # --- progress -------------------------------------------------------------
    def tick(self) -> dict[str, float]:
        fleet = self.fleet
        now = time.monotonic()
        sent = 0
        extra: dict[str, float] = {}
        if fleet is not None:
            sent = fleet.total("sent_payload") + fleet.total("sent_heartbeat")
            extra = {
                "online": fleet.total("online"),
                "sent": sent,
                "errors": sum(fleet.error_totals().values()),
                "dash_events": fleet.total("dashboard_events"),
            }
        self.rate_now = (sent - self._last_sent) / max(now - self._last_tick, 1e-6)
        self._last_sent, self._last_tick = sent, now
        extra["msgs_per_s"] = round(self.rate_now, 1)
        return self.sampler.sample(**extra)

    def table(self) -> Any:
        from rich.table import Table

        fleet = self.fleet
        point = self.sampler.timeline[-1] if self.sampler.timeline else {}
        table = Table(title=f"loadtest {self.opts.scenario} — {self.phase}")
        for column in ("elapsed", "connecting", "online", "msgs/s", "errors", "p99 so far",
                       "gw CPU s", "gw RSS MiB", "redis RSS MiB"):  # fmt: skip
            table.add_column(column, justify="right")
        for column in self.extra_row:
            table.add_column(column, justify="right")
        samples = fleet.samples.get(self.progress_key, []) if fleet else []
        p99 = report.percentile(samples[-20000:], 99) if samples else math.nan
        errors = sum(fleet.error_totals().values()) if fleet else 0
        table.add_row(
            f"{time.monotonic() - self.started:.0f} s",
            str(fleet.total("connecting") if fleet else 0),
            f"{fleet.total('online') if fleet else 0}/{len(self.ids)}",
            f"{self.rate_now:,.0f}",
            str(errors),
            f"{p99:.1f} ({self.progress_key})",
            f"{point.get('gateway_cpu_s', 0):.1f}",
            f"{point.get('gateway_rss_mib', 0):.0f}",
            f"{point.get('redis_rss_mib', 0):.0f}",
            *self.extra_row.values(),
        )
        return table

    async def progress(self) -> None:
        """Sample every second; show the live table (or a line every 5 s without a TTY)."""
        if self.opts.live and sys.stdout.isatty():
            from rich.live import Live

            with Live(self.table(), refresh_per_second=2, transient=False) as live:
                while True:
                    self.tick()
                    live.update(self.table())
                    await asyncio.sleep(1.0)
        else:
            count = 0
            while True:
                point = self.tick()
                if count % 5 == 0 and self.opts.live:
                    print(
                        f"[{point['t']:6.0f}s] {self.phase}: online {point.get('online', 0)}"
                        f"/{len(self.ids)} msgs/s {point.get('msgs_per_s', 0)} "
                        f"errors {point.get('errors', 0)}",
                        flush=True,
                    )
                count += 1
                await asyncio.sleep(1.0)

    # --- plots ------------------------------------------------------------------
    def plot(self, name: str, title: str, keys: list[str], ylabel: str,
             secondary: list[str] | None = None, secondary_label: str = "") -> None:  # fmt: skip
        timeline = self.sampler.timeline
        if len(timeline) < 2:
            return
        xs = [p["t"] for p in timeline]
        series = {k: (xs, [p.get(k, math.nan) for p in timeline]) for k in keys}
        more = {k: (xs, [p.get(k, math.nan) for p in timeline]) for k in secondary or []}
        path = self.opts.out / f"{self.stem}-{name}.png"
        report.plot_series(path, title, series, "seconds", ylabel, more, secondary_label)
        self.result.plots.append(path.name)

    def histogram(self, name: str, title: str, values: list[float], xlabel: str) -> None:
        if not values:
            return
        path = self.opts.out / f"{self.stem}-{name}.png"
        report.plot_histogram(path, title, values, xlabel)
        self.result.plots.append(path.name)

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


# --- scenarios -----------------------------------------------------------------------
async def connect_phase(ctx: Ctx, **fleet_kwargs: Any) -> float:
    """Register, start workers, connect every device; returns the connect time in seconds."""
    await ctx.register(ctx.opts.devices)
    await ctx.start_fleet(**fleet_kwargs)
    ctx.rss_before_connect = ctx.sampler.snapshot()["gateway"].rss_bytes
    started = ctx.go()
    ok = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
    elapsed = time.perf_counter() - started
    assert ctx.fleet is not None
    ctx.result.metrics.update(
        {
            "devices": len(ctx.ids),
            "online_after_connect": ctx.fleet.total("online"),
            "connect_time_s": round(elapsed, 3),
            "all_online": ok,
        }
    )
    ctx.phase = "running"
    return elapsed


async def idle(ctx: Ctx) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    await ctx.register(opts.devices)
    before = ctx.sampler.snapshot()
    await ctx.start_fleet()
    started = ctx.go()
    ok = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
    connect_s = time.perf_counter() - started
    fleet = ctx.fleet
    assert fleet is not None
    mark = ctx.mark()
    await asyncio.sleep(opts.duration)
    after = ctx.sampler.snapshot()
    online = fleet.total("online")
    beats = fleet.total("sent_heartbeat")
    n = max(online, 1)
    per_conn = (after["gateway"].rss_bytes - before["gateway"].rss_bytes) / n / 1024
    redis_per = (after["redis"].rss_bytes - before["redis"].rss_bytes) / n / 1024
    m.update(
        {
            "devices": len(ctx.ids),
            "online": online,
            "all_online": ok,
            "connect_time_s": round(connect_s, 3),
            "connects_per_s": round(online / connect_s, 1),
            "gateway_rss_before_mib": round(before["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_after_mib": round(after["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_per_connection_kib": round(per_conn, 2),
            "redis_rss_per_device_kib": round(redis_per, 2),
            **report.summary(fleet.samples.get("handshake_ms", []), "handshake_ms"),
            **ctx.cost(mark, beats, "idle_"),
        }
    )
    ctx.result.targets += [
        report.at_least("devices online", len(ctx.ids), online, "devices"),
        report.at_most("gateway RSS per connection", 20, round(per_conn, 2), "KiB"),
    ]
    ctx.plot("memory", "idle: RSS", ["gateway_rss_mib", "redis_rss_mib"], "MiB", ["online"],
             "devices online")  # fmt: skip


async def connect_storm(ctx: Ctx) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    await ctx.register(opts.devices)
    await ctx.start_fleet()
    mark = ctx.mark()
    started = ctx.go()
    ok = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
    elapsed = time.perf_counter() - started
    fleet = ctx.fleet
    assert fleet is not None
    welcomed = fleet.total("welcomed")
    cost = ctx.cost(mark, welcomed)
    await asyncio.sleep(opts.duration)
    samples = fleet.samples.get("handshake_ms", [])
    stats = report.summary(samples, "handshake_ms")
    rate = welcomed / elapsed if elapsed else math.nan
    m.update(
        {
            "devices": len(ctx.ids),
            "online": fleet.total("online"),
            "all_online": ok,
            "connect_time_s": round(elapsed, 3),
            "handshakes_per_s": round(rate, 1),
            "connect_concurrency_per_worker": opts.connect_concurrency,
            **stats,
            **cost,
        }
    )
    ctx.result.targets += [
        report.at_least("devices online", len(ctx.ids), fleet.total("online"), "devices"),
        report.at_least("handshake rate", 500, round(rate, 1), "/s"),
        report.at_most("handshake p99", 2000, stats["handshake_ms_p99"], "ms"),
        report.at_most("connect failures", 0, fleet.total("connect_failures"), ""),
    ]
    ctx.histogram("handshake", "connect-storm: handshake → welcome", samples, "ms")


async def ingest(ctx: Ctx) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    n = opts.devices
    interval = n / opts.rate
    if interval < 1 / 40:
        print(f"warning: {opts.rate / n:.0f} msgs/s per device is near the gateway's rate limit")
    in_before = await ctx.cluster.metric("gateway_messages_in_total")
    await connect_phase(ctx, send_interval=interval)
    fleet = ctx.fleet
    assert fleet is not None
    ctx.progress_key = "handshake_ms"
    await asyncio.sleep(1.0)
    snap0 = fleet.snapshot("sent_payload", "sent_heartbeat")
    acks0 = fleet.total("acks")
    mark = ctx.mark()
    await asyncio.sleep(opts.duration)
    snap1 = fleet.snapshot("sent_payload", "sent_heartbeat")
    sent = sum(v1 - v0 for (_, v0), (_, v1) in zip(snap0, snap1, strict=True))
    achieved = fleet.rate(snap0, snap1)
    acks = fleet.total("acks") - acks0
    cost = ctx.cost(mark, sent)
    ctx.phase = "verifying"
    await fleet.stop()
    await asyncio.sleep(0.5)
    in_after = await ctx.cluster.metric("gateway_messages_in_total")
    total_sent = sum(c.get("sent_payload", 0) + c.get("sent_heartbeat", 0) for c in fleet.counters)
    last_seq: dict[str, int] = {}
    for final in fleet.finals.values():
        last_seq.update(final["last_seq"])
    verified, checked, behind = 0, 0, 0
    converged_s: float | None = None
    redis = ctx.redis
    if redis is not None:
        # a saturated gateway still has frames queued when the devices stop: poll until its
        # batches have written the last state of every device (bounded), and say how long
        ids = list(last_seq)[:5000]
        stopped = time.monotonic()
        while True:
            verified, checked, behind = 0, 0, 0
            async with redis.pipeline(transaction=False) as pipe:
                for device_id in ids:
                    pipe.hget(f"device:state:{device_id}", "reported_state")
                stored = await pipe.execute()
            for device_id, raw in zip(ids, stored, strict=True):
                checked += 1
                seq = orjson.loads(raw).get("seq", 0) if raw else 0
                verified += int(seq == last_seq[device_id])
                behind += int(seq < last_seq[device_id])
            if behind == 0 or time.monotonic() - stopped > INGEST_CONVERGE_S:
                break
            await asyncio.sleep(0.5)
        if behind == 0:
            converged_s = round(time.monotonic() - stopped + 0.5, 2)
    m.update(
        {
            "requested_rate": opts.rate,
            "achieved_msgs_per_s": round(achieved, 1),
            "frame": opts.frame,
            "acks": acks,
            "gateway_counted_frames": in_after - in_before,
            "fleet_sent_frames": total_sent,
            "reported_state_checked": checked,
            "reported_state_verified": verified,
            "reported_state_behind": behind,
            "reported_state_converged_after_stop_s": converged_s,
            **cost,
        }
    )
    ctx.result.targets += [
        report.at_least("achieved rate", opts.rate, round(achieved, 1), "msgs/s"),
        report.at_least("gateway counted every frame", total_sent, in_after - in_before, "frames"),
        report.at_least("last reported_state in Redis", checked, verified, "devices"),
    ]
    if opts.frame == "report":
        ctx.result.targets.append(report.at_least("acks", sent * 0.99, acks, "acks"))
    ctx.plot("rate", "ingest: messages/s", ["msgs_per_s"], "msgs/s",
             ["gateway_rss_mib"], "gateway RSS MiB")  # fmt: skip


async def command_load(ctx: Ctx, rate: float, duration: float) -> dict[str, int]:
    """PATCH desired {"probe": t_ns, "seq": k} at *rate*/s for *duration* s, bounded in flight."""
    ids = ctx.ids
    statuses: Counter[str] = Counter()
    gate = asyncio.Semaphore(200)
    headers = {"Authorization": f"Bearer {ctx.opts.api_key}"}
    bases = ctx.cluster.base_urls
    tasks: set[asyncio.Task[None]] = set()

    async def patch(client: httpx.AsyncClient, k: int) -> None:
        device_id = ids[k % len(ids)]
        body = {"state": {"probe": time.time_ns(), "seq": k}}
        try:
            response = await client.patch(
                f"{bases[k % len(bases)]}/api/devices/{device_id}/desired", json=body
            )
            statuses[str(response.status_code)] += 1
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
        finally:
            gate.release()

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(headers=headers, timeout=10, limits=limits) as client:
        start = time.monotonic()
        k = 0
        while time.monotonic() - start < duration:
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            task = asyncio.create_task(patch(client, k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    return dict(statuses)


async def store_command_load(ctx: Ctx, rate: float, duration: float) -> dict[str, int]:
    """Desired changes at *rate*, made the way the API makes them (`Store.patch_section`: the
    compare-and-set script, which publishes on the device's command channel), from this
    process. The HTTP layer in front is measured by bench-api; one Python process cannot both
    drive 1,000 HTTP requests/s and stay out of the latency it measures."""
    assert ctx.cluster.redis_url is not None
    statuses: Counter[str] = Counter()
    ids = ctx.ids
    redis = redisconn.connect(ctx.cluster.redis_url)
    store = Store(redis, Settings(redis_url=ctx.cluster.redis_url))
    gate = asyncio.Semaphore(200)
    tasks: set[asyncio.Task[None]] = set()

    async def change(k: int) -> None:
        try:
            await store.patch_section(
                ids[k % len(ids)], "desired", {"probe": time.time_ns(), "seq": k}
            )
            statuses["200"] += 1
        except Exception as exc:  # counted, never fatal: the lost count says what matters
            statuses[type(exc).__name__] += 1
        finally:
            gate.release()

    try:
        start = time.monotonic()
        k = 0
        while time.monotonic() - start < duration:
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            task = asyncio.create_task(change(k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    finally:
        await redis.aclose()
    return dict(statuses)


async def desired_latency(ctx: Ctx) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    await connect_phase(ctx)
    fleet = ctx.fleet
    assert fleet is not None
    ctx.progress_key = "desired_ms"
    mark = ctx.mark()
    statuses = await store_command_load(ctx, opts.rate, opts.duration)
    sent_ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    await fleet.wait_for(lambda: fleet.total("probes") >= sent_ok, 5.0)
    received = fleet.total("probes")
    cost = ctx.cost(mark, sent_ok)
    samples = fleet.samples.get("desired_ms", [])
    stats = report.summary(samples, "desired_ms")
    stats.update(report.summary(fleet.samples.get("commit_ms", []), "commit_ms"))
    m.update(
        {
            "rate": opts.rate,
            "changes_via": "Store.patch_section (the API's write path, without HTTP)",
            "patches_ok": sent_ok,
            "patch_statuses": ",".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
            "state_updates_received": received,
            "lost": max(0, sent_ok - received),
            **stats,
            **cost,
        }
    )
    ctx.result.targets += [
        report.at_most("lost desired changes", 0, max(0, sent_ok - received), ""),
        report.at_most("desired → device p99", 10, stats["desired_ms_p99"], "ms"),
        report.at_most("non-2xx PATCH", 0, sum(statuses.values()) - sent_ok, ""),
    ]
    ctx.histogram("latency", "desired-latency: PATCH → state_update", samples, "ms")


FANOUT_WARMUP_S = 2.0  # producing before the window opens, so it starts in a steady state
FANOUT_SETTLE_S = 30.0  # at most, after the window closes, for its last batches to arrive
PRODUCER_TICK_S = 0.005
STREAM_READ_S = 2.0  # the fleet stream is counted this often while the window runs


class PresenceProducer:
    """Flips registered devices online and offline at *rate*/s with the gateway's own engine.

    Each transition is one `PresenceEngine.connect` of an offline device (`connected`) or one
    `end` of an online one without grace (`closed`, written by the engine's batched
    `disconnect`), so each writes exactly one presence event to `devices:events` straight into
    Redis: the gateways under test only fan them out. Devices take turns, each online for
    len(ids) / rate seconds under a heartbeat key that outlives the run, so none expires by
    itself and adds an event nobody produced. The rate is kept by a clock, not by sleeps: a
    late tick writes what fell due.
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

    async def run(self) -> None:
        started = time.perf_counter()
        while True:
            due = int((time.perf_counter() - started) * self.rate) - self.done
            if due > 0:
                await self.flip([self.ids[(self.done + i) % len(self.ids)] for i in range(due)])
                self.done += due
            await asyncio.sleep(PRODUCER_TICK_S)

    async def flip(self, ids: list[str]) -> None:
        connecting = [device_id for device_id in ids if device_id not in self.online]
        for device_id in ids:
            if device_id in self.online:
                self.online.discard(device_id)
                self.engine.end(device_id, self.SESSION, "closed")
            else:
                self.online.add(device_id)
        await asyncio.gather(
            *(self.engine.connect(device_id, self.SESSION, "") for device_id in connecting)
        )
        await self.engine.flush()

    async def finish(self) -> None:
        """Take every device it left online offline (after the window: not counted)."""
        online = sorted(self.online)
        for start in range(0, len(online), 500):
            await self.flip(online[start : start + 500])


def _producer_refused(device_id: str, session: str, code: int) -> None:
    raise RuntimeError(f"the producer's own session of {device_id} was refused ({code})")


class WindowCount:
    """The fleet stream's entries with ids in [start_ms, end_ms), counted as they are written.

    The stream keeps only the newest ~100,000 entries (`GATEWAY_EVENTS_MAXLEN`), fewer than a
    long window holds, so it is read while the window runs; `lost` says whether the trim ever
    overtook the reading (the count would then be short, and no dashboard could match it).
    """

    def __init__(self, redis: aioredis.Redis, start_ms: int, end_ms: int) -> None:
        self.redis = redis
        self.end = str(end_ms - 1)  # an end of only milliseconds takes every sequence in it
        self.start = f"{start_ms}-0"
        self.last: str | None = None
        self.count = 0
        self.lost = False

    async def read(self) -> None:
        oldest = await self.redis.xrange(EVENTS, "-", "+", count=1)
        if oldest and stream_key(text(oldest[0][0])) > stream_key(self.last or self.start):
            self.lost = True
        while True:
            start = self.start if self.last is None else f"({self.last}"
            entries = await self.redis.xrange(EVENTS, start, self.end, count=10_000)
            if not entries:
                return
            self.count += len(entries)
            self.last = text(entries[-1][0])
            if len(entries) < 10_000:
                return

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(STREAM_READ_S)
            await self.read()


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def fanout(ctx: Ctx) -> None:
    """D dashboards and a stalled one; presence events at `--rate` (or device state events).

    The window is fixed in stream-id milliseconds (Redis's clock, this machine's) before it
    opens and sent to the workers, so each dashboard counts its in-window events as frames
    arrive, and the stream is counted over exactly the same ids.
    """
    opts, m = ctx.opts, ctx.result.metrics
    redis = ctx.need_redis()
    slow_before = await ctx.cluster.metric("gateway_slow_clients_dropped_total", 'kind="dashboard"')
    producer: PresenceProducer | None = None
    if opts.fanout_events == "presence":
        await ctx.register(opts.devices)
        await ctx.start_fleet(
            dashboards=opts.dashboards, stalled=opts.stalled_dashboard, with_devices=False
        )
        ctx.go()
        m["devices"] = len(ctx.ids)
        producer = PresenceProducer(redis, ctx.ids, opts.rate, opts.duration + 600)
    else:
        await connect_phase(
            ctx,
            send_interval=opts.devices / opts.rate,
            dashboards=opts.dashboards,
            stalled=opts.stalled_dashboard,
        )
    fleet = ctx.fleet
    assert fleet is not None
    # joined, not only connected: the snapshot (with its cursor) has arrived, and the events
    # after the cursor are then all sent as events
    await fleet.wait_for(
        lambda: fleet.total("dashboard_snapshot") >= opts.dashboards, 30 + opts.dashboards / 10
    )
    ctx.phase = f"producing {opts.fanout_events} events"
    ctx.progress_key = "event_ms"
    producing = asyncio.create_task(producer.run()) if producer is not None else None
    start_ms = int((time.time() + FANOUT_WARMUP_S) * 1000)
    end_ms = start_ms + int(opts.duration * 1000)
    low, high = stream_key(f"{start_ms}-0") - 1, stream_key(f"{end_ms}-0") - 1
    fleet.command("window", low=low, high=high)
    stream = WindowCount(redis, start_ms, end_ms)
    await sleep_until(start_ms / 1000)
    ctx.phase = "measuring"
    rss0 = ctx.sampler.snapshot()["gateway"].rss_bytes
    mark = ctx.mark()
    following = asyncio.create_task(stream.follow())
    await sleep_until(end_ms / 1000)
    cost = ctx.cost(mark, 0)
    rss1 = ctx.sampler.snapshot()["gateway"].rss_bytes
    ctx.phase = "settling"
    # until every dashboard has had an event past the window (the producer runs on), so a
    # late event is counted with its real latency rather than missed
    caught_up = await fleet.wait_for(
        lambda: fleet.total("dashboards_past_window") >= opts.dashboards, FANOUT_SETTLE_S
    )
    settle_s = time.perf_counter() - mark.at - cost["window_s"]
    for task in (following, producing):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await stream.read()
    expected = stream.count
    slow_after = await ctx.cluster.metric("gateway_slow_clients_dropped_total", 'kind="dashboard"')
    dashboards_online = fleet.total("dashboards_online")
    await fleet.stop()
    if producer is not None:
        await producer.finish()
    counts: list[int] = []
    max_latency = 0.0
    for final in fleet.finals.values():
        counts += final["dash_counts"]
        max_latency = max(max_latency, final["dash_max_latency_ms"])
    complete = sum(1 for c in counts if c == expected)
    delivered = sum(counts)
    messages = expected + delivered
    cost["messages"] = messages
    for who in ("gateway", "redis"):
        cost[f"{who}_cpu_s_per_1k_msgs"] = round(cost[f"{who}_cpu_s"] * 1000 / max(messages, 1), 5)
    samples = fleet.samples.get("event_ms", [])
    stats = report.summary(samples, "event_ms")
    rss_timeline = [p["gateway_rss_mib"] for p in ctx.sampler.timeline]
    errors = fleet.error_totals()
    rate = round(expected / opts.duration, 1)
    m.update(
        {
            "events": opts.fanout_events,
            "dashboards": opts.dashboards,
            "dashboards_online_at_end": dashboards_online,
            "event_rate": rate,
            "events_in_window": expected,
            "stream_trimmed_before_counted": stream.lost,
            "events_delivered_in_window": delivered,
            "dashboards_with_every_event": complete,
            "min_events_per_dashboard": min(counts) if counts else 0,
            "max_events_per_dashboard": max(counts) if counts else 0,
            "dashboard_frames_out_of_order": errors.get("dashboard_out_of_order", 0),
            "event_ms_max_all_dashboards": round(max_latency, 3),
            "all_past_window_at_stop": caught_up,
            "settle_s": round(settle_s, 3),
            "stalled_dashboard": opts.stalled_dashboard,
            "stalled_dropped_by_gateway": slow_after - slow_before,
            "gateway_rss_growth_mib": round((rss1 - rss0) / 2**20, 2),
            "gateway_rss_max_mib": max(rss_timeline) if rss_timeline else math.nan,
            **stats,
            **cost,
        }
    )
    ctx.result.targets += [
        report.at_least("dashboards with every event", opts.dashboards, complete, "dashboards"),
        report.at_least("events/s produced (stream)", round(0.95 * opts.rate, 1), rate, "/s"),
        report.at_most("event → dashboard p99", 100, stats["event_ms_p99"], "ms"),
        report.at_most("gateway RSS growth in window", 50, m["gateway_rss_growth_mib"], "MiB"),
        report.at_most("frames out of order", 0, m["dashboard_frames_out_of_order"], ""),
    ]
    if opts.stalled_dashboard:
        ctx.result.targets.append(
            report.at_least("stalled dashboard dropped", 1, slow_after - slow_before, "")
        )
    ctx.plot("rss", "fanout: gateway RSS", ["gateway_rss_mib"], "MiB", ["dash_events"],
             "events received (all dashboards)")  # fmt: skip
    ctx.histogram("latency", "fanout: event stream id → dashboard", samples, "ms")


async def offline_lag(ctx: Ctx) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    timeout = opts.heartbeat_timeout or 60.0
    interval = min(opts.heartbeat_interval, timeout / 3)
    await connect_phase(ctx, reconnect=False, heartbeat_interval=interval)
    fleet = ctx.fleet
    assert fleet is not None
    stop_watch = await ctx.watch_presence(set(ctx.ids))
    await asyncio.sleep(interval + 1)
    ctx.phase = f"dropped ({opts.drop}); waiting for offline"
    dropped_at = time.time()
    mark = ctx.mark()
    dropped = await fleet.drop(opts.drop)

    def seen() -> dict[str, float]:
        first: dict[str, float] = {}
        for at, event in ctx.presence_log:
            if at >= dropped_at - 1 and event.get("status") == "offline":
                first.setdefault(str(event.get("device_id")), at)
        return first

    deadline = time.monotonic() + timeout + 12
    while time.monotonic() < deadline and len(seen()) < len(dropped):
        ctx.presence_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.presence_changed.wait(), 0.5)
    offline = seen()
    await stop_watch()
    cost = ctx.cost(mark, len(dropped))
    for mode in ("abort", "silent"):
        after_last = [offline[i] - last for i, (last, how) in dropped.items()
                      if how == mode and i in offline]  # fmt: skip
        if not any(how == mode for _, how in dropped.values()):
            continue
        missed = sum(1 for i, (_, how) in dropped.items() if how == mode and i not in offline)
        stats = report.summary(after_last, f"{mode}_offline_after_last_frame_s")
        lag = report.summary([a - timeout for a in after_last], f"{mode}_lag_past_timeout_s")
        m.update({f"{mode}_devices": sum(1 for _, h in dropped.values() if h == mode),
                  f"{mode}_missed": missed, **stats, **lag})  # fmt: skip
        ctx.result.targets += [
            report.at_most(f"{mode}: missed offline events", 0, missed, ""),
            report.at_most(
                f"{mode}: offline after last frame (max)", timeout + 2,
                stats[f"{mode}_offline_after_last_frame_s_max"], "s",
            ),
        ]  # fmt: skip
        ctx.histogram(f"{mode}-lag", f"offline-lag ({mode}): last frame → offline event",
                      after_last, "s")  # fmt: skip
    m.update({"heartbeat_timeout_s": timeout, "heartbeat_interval_s": interval,
              "dropped": len(dropped), "offline_seen": len(offline), **cost})  # fmt: skip


async def reconnect_storm(ctx: Ctx) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    if not ctx.cluster.started:
        raise SystemExit("loadtest: reconnect-storm restarts a gateway: use --start-gateways G")
    await connect_phase(ctx, rotate=len(ctx.cluster.ports) > 1)
    fleet = ctx.fleet
    assert fleet is not None
    stop_watch = await ctx.watch_presence(set(ctx.ids))
    await asyncio.sleep(1.0)
    ctx.presence.clear()
    reconnects0 = fleet.total("reconnected")
    disconnects0 = fleet.total("disconnects")
    ctx.phase = "restarting gateway 0"
    mark = ctx.mark()
    t_term = time.perf_counter()
    since = time.time()
    old_pid = ctx.cluster.processes[0].pid
    ctx.sampler.retire("gateway", old_pid)
    times: dict[str, float] = {}

    async def restart() -> None:
        await ctx.cluster.stop_gateway(0)
        times["down"] = time.perf_counter()
        await ctx.cluster.spawn(0)
        times["up"] = time.perf_counter()
        ctx.sampler.groups["gateway"] = ctx.cluster.gateway_pids

    restarting = asyncio.create_task(restart())
    n = len(ctx.ids)
    back = await fleet.wait_for(
        lambda: "down" in times and fleet.total("online") >= n and fleet.total("connecting") == 0,
        120,
    )
    t_back = time.perf_counter()
    await restarting
    t_down, t_up = times["down"], times["up"]
    ctx.phase = "settling (false offline check)"
    await asyncio.sleep((opts.offline_grace or 0) + 3 + opts.duration)
    await stop_watch()
    affected = fleet.total("disconnects") - disconnects0
    samples = fleet.samples.get("reconnect_s", [])
    false_offline = ctx.offline_events(since)
    m.update(
        {
            "gateways": len(ctx.cluster.ports),
            "offline_grace_s": opts.offline_grace,
            "gateway_stop_s": round(t_down - t_term, 3),
            "gateway_downtime_s": round(t_up - t_term, 3),
            "all_back": back,
            "all_back_after_sigterm_s": round(t_back - t_term, 3),
            "devices_disconnected": affected,
            "devices_reconnected": fleet.total("reconnected") - reconnects0,
            "false_offline_events": false_offline,
            "presence_events": ",".join(f"{k}:{v}" for k, v in sorted(ctx.presence.items())),
            **report.summary(samples, "reconnect_s"),
            **ctx.cost(mark, affected),
        }
    )
    ctx.result.targets += [
        report.at_least("devices back online", n, fleet.total("online"), "devices"),
        report.at_most("all back after SIGTERM", 30, round(t_back - t_term, 3), "s"),
        report.at_most("false offline events", 0, false_offline, ""),
    ]
    ctx.plot("online", "reconnect-storm: devices online", ["online"], "devices",
             ["gateway_rss_mib"], "gateway RSS MiB")  # fmt: skip


async def soak(ctx: Ctx, commands: bool = False) -> None:
    opts, m = ctx.opts, ctx.result.metrics
    connect_s = await connect_phase(ctx)
    fleet = ctx.fleet
    assert fleet is not None
    n = len(ctx.ids)
    stop_watch = await ctx.watch_presence(set(ctx.ids)) if ctx.redis is not None else None
    since = time.time()
    online_max = fleet.total("online")
    rss0 = ctx.sampler.snapshot()
    beats0 = fleet.total("sent_heartbeat")
    mark = ctx.mark()
    ctx.phase = f"soaking {opts.duration:.0f} s"
    online_min = online_max
    command_task = None
    if commands and opts.rate > 0:
        ctx.progress_key = "desired_ms"
        command_task = asyncio.create_task(command_load(ctx, opts.rate, opts.duration))
    end = time.monotonic() + opts.duration
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        online = fleet.total("online")
        online_max, online_min = max(online_max, online), min(online_min, online)
    statuses = await command_task if command_task is not None else {}
    redis_online = await ctx.redis.scard(ONLINE) if ctx.redis is not None else -1
    if stop_watch is not None:
        await stop_watch()
    rss1 = ctx.sampler.snapshot()
    beats = fleet.total("sent_heartbeat") - beats0
    offline = ctx.offline_events(since)
    per_conn = (rss1["gateway"].rss_bytes - ctx.rss_before_connect) / max(online_max, 1) / 1024
    m.update(
        {
            "connect_time_s": round(connect_s, 3),
            "max_online": online_max,
            "min_online_during_soak": online_min,
            "redis_online_set_at_end": redis_online,
            "offline_events": offline,
            "gateway_rss_before_connect_mib": round(ctx.rss_before_connect / 2**20, 2),
            "gateway_rss_start_mib": round(rss0["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_end_mib": round(rss1["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_per_connection_kib": round(per_conn, 2),
            "redis_rss_end_mib": round(rss1["redis"].rss_bytes / 2**20, 2),
            **ctx.cost(mark, beats),
            **ctx.fleet_metrics(),
        }
    )
    ctx.result.targets += [
        report.at_least("max concurrently online", n, online_max, "devices"),
        report.at_least("min online during soak", n, online_min, "devices"),
        report.at_most("offline events", 0, offline, ""),
    ]
    if commands:
        sent_ok = sum(v for k, v in statuses.items() if k.startswith("2"))
        await fleet.wait_for(lambda: fleet.total("probes") >= sent_ok, 5.0)
        stats = report.summary(fleet.samples.get("desired_ms", []), "command_ms")
        m.update({"commands_ok": sent_ok, "commands_received": fleet.total("probes"), **stats})
        ctx.result.targets.append(
            report.at_most("command p99 while running", 1000, stats["command_ms_p99"], "ms")
        )
        if online_max < n:
            m["limited_by"] = limiting_factor(ctx)
    ctx.plot("online", f"{opts.scenario}: online and RSS", ["online"], "devices",
             ["gateway_rss_mib", "redis_rss_mib"], "MiB")  # fmt: skip


def limiting_factor(ctx: Ctx) -> str:
    """A best guess, from the errors seen, at what stopped more devices coming online."""
    assert ctx.fleet is not None
    errors = ctx.fleet.error_totals()
    if not errors:
        return "no connect errors: time (connect phase timed out) or CPU"
    name, count = errors.most_common(1)[0]
    hints = {
        "EMFILE": "open-files limit (20,000 per process): more workers/gateways",
        "EADDRNOTAVAIL": "ephemeral ports: more --source-addrs",
        "ECONNREFUSED": "a gateway was not accepting (crashed or restarting)",
        "timeout": "handshakes timing out: gateway or Redis CPU saturated",
        "http_503": "gateway refused (draining or Redis unavailable)",
    }
    return f"{name} ×{count}: {hints.get(name, 'see errors in metrics')}"


async def moonshot(ctx: Ctx) -> None:
    await soak(ctx, commands=True)


RUNNERS: dict[str, Callable[[Ctx], Awaitable[None]]] = {
    "idle": idle,
    "connect-storm": connect_storm,
    "ingest": ingest,
    "desired-latency": desired_latency,
    "fanout": fanout,
    "offline-lag": offline_lag,
    "reconnect-storm": reconnect_storm,
    "soak": soak,
    "moonshot": moonshot,
}


def time_budget(opts: Options) -> float:
    """The hard bound of one run: setup and connect allowance plus the scenario's own time."""
    per_device = (opts.devices + opts.dashboards) / 200
    extra = (opts.heartbeat_timeout or 60) + (opts.offline_grace or 0) + 60
    return 120 + per_device + opts.duration * 1.2 + extra


async def run(opts: Options) -> Path:
    """Run one scenario; returns the JSON result path."""
    raise_nofile()
    opts.out.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(opts)
    ctx = Ctx(opts, cluster)
    started_at = report.now_iso()
    progress: asyncio.Task[None] | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(time_budget(opts)):
            await ctx.setup()
            progress = asyncio.create_task(ctx.progress())
            await RUNNERS[opts.scenario](ctx)
    except TimeoutError:
        error = f"run exceeded its time budget of {time_budget(opts):.0f} s"
    finally:
        ctx.phase = "stopping"
        if ctx.fleet is not None and len(ctx.fleet.finals) < len(ctx.fleet.specs):
            await ctx.fleet.stop()
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        if ctx.redis is not None:
            await ctx.redis.aclose()
        await cluster.close()
    result = ctx.result
    if error:
        result.metrics["error"] = error
        result.targets.append(report.target("completed", "within budget", 0, "", False))
    result.metrics.setdefault("devices", len(ctx.ids))
    for key, value in ctx.fleet_metrics().items():
        result.metrics.setdefault(key, value)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    params.pop("command", None)
    params.pop("live", None)
    params["api_key"] = "***"
    document = {
        "scenario": opts.scenario,
        "started_at": started_at,
        "command": opts.command,
        "machine": report.machine(cluster.redis_version),
        "params": params,
        "metrics": result.metrics,
        "targets": result.targets,
        "plots": result.plots,
    }
    return report.write_result(document, opts.out, ctx.stem)
