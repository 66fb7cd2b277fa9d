"""The gateway's running parts, wired once per process and shared by every endpoint.

The data layout is decided when Redis first answers: a `redis+cluster://` URL, or a plain URL
that turns out to point at a cluster node, runs the cluster layout; anything else the
single-node layout with the configured field names. Until Redis answers, the HTTP server is up
and every part that needs Redis answers "unavailable" (503, a refused handshake), so a gateway
started before its Redis serves as soon as Redis does.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import disconnect, redisconn
from gateway.auth import ApiKeys, hash_token, new_secret
from gateway.broker import Broker, DeviceChannels
from gateway.broker_cluster import ClusterBroker
from gateway.commands.queue import CommandQueue
from gateway.commands.service import CommandService
from gateway.config import Settings
from gateway.dashboards import DashboardHub, close_all
from gateway.device_session import SessionContext
from gateway.eventstream import EventStream
from gateway.hub import RESYNC_CHUNK, DeviceHub
from gateway.keys import Keys, generated_admin_key
from gateway.metrics import Metrics
from gateway.migrate import layout as stored_layout
from gateway.presence import REDIS_ERRORS, PresenceEngine
from gateway.scripts import Scripts
from gateway.store import Store
from gateway.timeseries import FleetSeries
from gateway.webhooks.delivery import WebhookWorker
from gateway.webhooks.store import WebhookStore

log = logging.getLogger("gateway")

REDIS_SOCKET_TIMEOUT = 5.0
STOP_TASKS_WITHIN = 5.0  # seconds a cancelled background task gets before it is left behind
RECANCEL_EVERY = 0.5
REASSERT_HOLD = 3.0  # seconds without sweeping after a reconnect: every process re-asserts first


class NotReady(RedisConnectionError):
    """Redis has not answered yet: the parts that need it do not exist."""


@dataclass(frozen=True)
class Core:
    """Everything that needs Redis, built once its layout is known."""

    redis: Redis | RedisCluster
    keys: Keys
    db: int
    store: Store
    presence: PresenceEngine
    dashboards: DashboardHub
    broker: Broker | ClusterBroker
    sessions: SessionContext
    pubsub_redis: Redis | None  # one node: a client of its own that never reconnects silently
    fleet: FleetSeries  # the fleet-counts series: sampled by one process per step
    commands: CommandService
    channels: DeviceChannels  # counted device-channel subscriptions (sockets, waiting callers)


class Gateway:
    """Owns the Redis clients and every background task of one process."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("settings.redis_url must be set (the CLI starts an embedded server)")
        self.settings = settings
        self.metrics = Metrics()
        self.api_keys = ApiKeys.of(
            [settings.api_key] if settings.api_key else [], settings.read_api_keys
        )
        self.hub = DeviceHub(settings.heartbeat_timeout)
        self.notifications = False
        self.draining = False
        self.started = asyncio.Event()
        self._core: Core | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        # set when the stored layout is not this release's: the process must not serve
        self.refused = asyncio.Event()
        self.refusal: str | None = None
        self.mqtt: Any = None  # the MQTT bridge (gateway.mqtt.bridge.MqttBridge) with a URL
        self.event_stream: EventStream | None = None  # the SSE feed, once Redis answered
        self.webhooks: WebhookStore | None = None  # webhook endpoints, once Redis answered

    # --- the parts, once Redis answered -----------------------------------------
    @property
    def core(self) -> Core:
        if self._core is None:
            raise NotReady("the gateway has not reached Redis yet")
        return self._core

    @property
    def redis(self) -> Redis | RedisCluster:
        return self.core.redis

    @property
    def keys(self) -> Keys:
        return self.core.keys

    @property
    def db(self) -> int:
        return self.core.db

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def presence(self) -> PresenceEngine:
        return self.core.presence

    @property
    def dashboards(self) -> DashboardHub:
        return self.core.dashboards

    @property
    def broker(self) -> Broker | ClusterBroker:
        return self.core.broker

    @property
    def sessions(self) -> SessionContext:
        return self.core.sessions

    @property
    def commands(self) -> CommandService:
        return self.core.commands

    @property
    def channels(self) -> DeviceChannels:
        return self.core.channels

    # --- start and stop ---------------------------------------------------------
    async def start(self) -> None:
        """Start in the background: the HTTP server answers (readyz false) while Redis is away."""
        self._tasks.append(asyncio.create_task(self._start(), name="gateway-start"))

    async def _start(self) -> None:
        url = self.settings.redis_url or ""
        delay = 0.1
        while True:
            try:
                core = await self._build()
                try:
                    await stored_layout.ensure(core.redis, core.keys)
                    await core.store.scripts.load(core.redis)
                    self._core = core
                    await self._ensure_admin_key()
                except BaseException:
                    self._core = None
                    await _close_clients(core)
                    raise
                break
            except stored_layout.LayoutRefused as exc:
                log.error("%s", exc)
                self.refusal = str(exc)
                self.refused.set()
                return
            except Exception as exc:  # Redis not there yet: keep trying, say why
                log.warning(
                    "Redis at %s not usable yet (%s); retrying in %.1f s",
                    _safe_url(url),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        core = self.core
        layout = f"cluster, {core.keys.partitions} partitions" if core.keys.sharded else (
            f"single node, {core.keys.schema} field names, db {core.db}"
        )  # fmt: skip
        log.info("using Redis at %s (%s)", _safe_url(url), layout)
        if core.db and not self.settings.key_prefix:
            log.warning(
                "Redis database %d is selected but no GATEWAY_KEY_PREFIX is set: pub/sub channels "
                "are shared by every database of a server, so deployments on other databases of "
                "this Redis see this one's presence events and commands; set GATEWAY_KEY_PREFIX to "
                "isolate it",
                core.db,
            )
        await self.on_redis_ready()
        self.started.set()

    async def _build(self) -> Core:
        """Detect the layout and make every part that needs Redis."""
        settings = self.settings
        url = settings.redis_url or ""
        cluster = await redisconn.detect_cluster(url)
        redis: Redis | RedisCluster
        pubsub_redis: Redis | None = None
        if cluster:
            if settings.seed_schema != "python":
                log.warning("GATEWAY_SEED_SCHEMA applies to one node only; a cluster has its own")
            keys = Keys.cluster(settings.key_prefix, settings.cluster_partitions)
            cluster_client = redisconn.connect_cluster(url)
            try:
                await cluster_client.initialize()
            except BaseException:
                await cluster_client.aclose()
                raise
            redis, db = cluster_client, 0
        else:
            keys = Keys.single(settings.key_prefix, settings.seed_schema)
            single = redisconn.connect(url)
            redis = single
            db = int(single.connection_pool.connection_kwargs.get("db", 0) or 0)
            # pub/sub gets its own client that never reconnects behind the broker's back: the
            # broker must see every drop, so it can re-send what was published meanwhile
            pubsub_redis = redisconn.connect(url, max_connections=4, retry=redisconn.NO_RETRY)
        scripts = Scripts(keys)
        store = Store(redis, settings, keys, scripts)
        presence = PresenceEngine(
            redis,
            store,
            settings,
            self.metrics,
            self.hub.stale,
            db,
            local_active=self.hub.active_session,
        )
        commands = CommandService(CommandQueue(store), self.hub, settings, self.metrics)
        deliveries = _Deliveries(self.hub, presence, commands)
        broker: Broker | ClusterBroker
        if isinstance(redis, RedisCluster):
            broker = ClusterBroker(
                redis, keys, deliveries, self.resync_devices, settings.pubsub_probe_interval,
                self.metrics,
            )  # fmt: skip
        else:
            assert pubsub_redis is not None
            broker = Broker(pubsub_redis, keys, db, deliveries, self.resync_devices, self.metrics)
        sessions = SessionContext(
            presence=presence,
            read_shadow=store.get,
            commands=commands,
            metrics=self.metrics,
            limits=store.limits,
            heartbeat_timeout=settings.heartbeat_timeout,
            max_frame_bytes=settings.max_frame_bytes,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            malformed_tolerance=settings.malformed_tolerance,
            send_queue_size=settings.send_queue_size,
        )
        dashboards = DashboardHub(store.events, settings, self.metrics)
        fleet = FleetSeries(redis, keys, store.stats, settings.fleet_sample_interval)
        return Core(
            redis, keys, db, store, presence, dashboards, broker, sessions, pubsub_redis, fleet,
            commands, DeviceChannels(broker),
        )  # fmt: skip

    async def on_redis_ready(self) -> None:
        """Start the parts that need Redis: detection, the tick, the pub/sub connections."""
        core = self.core
        self.notifications = await core.presence.enable_notifications()
        self.spawn(core.presence.run(), "presence")
        self.spawn(core.broker.run(), "broker")
        self.spawn(core.dashboards.run(), "dashboards")
        self.spawn(core.commands.run(), "commands")
        self.event_stream = EventStream(
            core.redis, core.keys, core.store.events, self.settings.events_stream_max_readers
        )
        self.spawn(self.event_stream.run(), "event-stream")
        self.webhooks = WebhookStore(core.redis, core.keys, self.settings.webhook_max_endpoints)
        worker = WebhookWorker(
            core.redis, core.keys, self.webhooks, core.store.events, self.settings, self.metrics
        )
        self.spawn(worker.run(), "webhooks")
        if self.settings.fleet_sampling:
            self.spawn(core.fleet.run(), "fleet-series")
        if isinstance(core.redis, redisconn.GatewayCluster):
            self.spawn(core.redis.trim_idle_forever(), "cluster-pool-trim")
        await asyncio.wait_for(core.broker.connected.wait(), REDIS_SOCKET_TIMEOUT)
        if self.settings.mqtt_url:
            from gateway.mqtt.bridge import MqttBridge  # only with MQTT configured

            self.mqtt = MqttBridge(
                self.settings, self.hub, core.presence, core.store, core.commands,
                core.channels, self.metrics,
            )  # fmt: skip
            self.spawn(self.mqtt.run(), "mqtt")

    async def resync_devices(self, device_ids: Collection[str] | None) -> None:
        """After subscriptions were lost and restored (Redis restarted, a failover, a slot
        moved): re-assert the presence of the local devices concerned before any process
        sweeps, then re-send desired states that moved while no message could arrive."""
        core = self.core
        sessions = self.hub.resync_targets(device_ids)
        if device_ids is None:
            core.presence.hold_sweep(REASSERT_HOLD)
        core.presence.reassert(
            (session.device_id, *live)
            for session in sessions
            if (live := self.hub.active_session(session.device_id)) is not None
        )
        resent = 0
        for start in range(0, len(sessions), RESYNC_CHUNK):
            chunk = sessions[start : start + RESYNC_CHUNK]
            seen = [session.desired_seen for session in chunk]  # before the read: see resync_one
            try:
                states = await core.store.desired_states([s.device_id for s in chunk])
            except REDIS_ERRORS as exc:
                # the broker reconnects (with backoff) and calls this again: nothing is skipped
                log.warning("re-sync after reconnect failed: %s", exc)
                raise
            for session, mark, (desired, version) in zip(chunk, seen, states, strict=True):
                if self.hub.resync_one(session, desired, version, mark):
                    resent += 1
        if resent:
            log.info("re-sent desired state to %d devices after reconnect", resent)
        try:
            commands = await core.commands.resync([(s.device_id, s.session) for s in sessions])
        except REDIS_ERRORS as exc:
            log.warning("re-sending commands after reconnect failed: %s", exc)
            raise
        if commands:
            log.info("re-sent %d pending commands after reconnect", commands)

    async def _ensure_admin_key(self) -> None:
        """With no admin key configured, one is generated at the first start and printed once
        (only its hash is kept); `--new-admin-key` replaces it."""
        if self.settings.api_key:
            return
        redis = self.core.redis
        name = generated_admin_key(self.core.keys)
        key = new_secret()
        if self.settings.new_admin_key:
            await redis.set(name, hash_token(key))
            self._announce_admin_key(key, "replaced the admin API key")
        elif await redis.set(name, hash_token(key), nx=True):
            what = "no GATEWAY_API_KEY configured: generated an admin API key"
            self._announce_admin_key(key, what)
        else:
            log.info(
                "admin API key: the one generated and printed at the first start (only its hash "
                "is kept); lost it? `gateway serve --new-admin-key` prints a new one"
            )
        stored = await redis.get(name)
        if stored:
            digest = stored.decode() if isinstance(stored, bytes) else str(stored)
            self.api_keys = ApiKeys(self.api_keys.admin | {digest}, self.api_keys.read)

    def _announce_admin_key(self, key: str, what: str) -> None:
        # printed, never logged: the one time anyone sees this key
        url = self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}/"
        print(
            f"\n  {what} (shown once, keep it):\n"
            f"    {key}\n"
            f"  Dashboard: {url}  (sign in with this key)\n"
            f"  Lost it? `gateway serve --new-admin-key` prints a new one.\n",
            file=sys.stderr,
            flush=True,
        )

    async def drain(self) -> None:
        """Before uvicorn closes sockets: end every local session, then close them with 1012.

        With an offline grace the sessions linger, so devices that reconnect to another
        instance within it never show offline; without, each goes offline `gateway_shutdown`.
        """
        self.draining = True
        if self._core is None:
            return
        close_all(self._core.dashboards)
        if self.event_stream is not None:
            self.event_stream.close_all()  # SSE clients reconnect elsewhere with Last-Event-ID
        # MQTT devices stay connected to their broker: their sessions are not ended here
        sessions = [s for s in self.hub.sessions.values() if not s.session.startswith("mqtt:")]
        if not sessions:
            return
        try:
            await self._core.presence.end_now(
                [(s.device_id, s.session) for s in sessions],
                "gateway_shutdown",
                self.settings.offline_grace,
            )
        except REDIS_ERRORS as exc:
            log.warning("could not end %d sessions before shutdown: %s", len(sessions), exc)
        for session in sessions:
            session.close(disconnect.RESTARTING)
        await asyncio.sleep(0.05)

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        """Cancel every background task and close the Redis clients, within a bound.

        A cancellation can be lost (a `wait_for` whose inner wait finished at that instant
        swallows it on Python 3.11), so a task still running is cancelled again every
        `RECANCEL_EVERY` s; one that outlives `STOP_TASKS_WITHIN` is logged with where it is
        stuck and left behind: the process stops whatever one task does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TASKS_WITHIN
        pending = {task for task in self._tasks if not task.done()}
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(
                pending, timeout=min(RECANCEL_EVERY, deadline - loop.time())
            )
        for task in pending:
            log.error(
                "task %s did not stop within %.0f s of being cancelled; left behind at %s",
                task.get_name(), STOP_TASKS_WITHIN, _awaiting(task),
            )  # fmt: skip
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: each task reported its own failure when it ended
        if self._core is not None:
            try:
                async with asyncio.timeout(STOP_TASKS_WITHIN):
                    await _close_clients(self._core)
            except TimeoutError:
                log.error("closing the Redis clients took over %.0f s; left", STOP_TASKS_WITHIN)


class _Deliveries:
    """What the broker delivers, to whom: the gateway's own command messages to the command
    service, every other command-channel message and kicks to the hub, expiries to the
    presence engine."""

    def __init__(self, hub: DeviceHub, presence: PresenceEngine, commands: CommandService) -> None:
        self.relay = hub.on_command
        self.commands = commands.on_message
        self.on_control = hub.on_control
        self.on_expired = presence.note_expired

    def on_command(self, device_id: str, data: bytes) -> None:
        # the scripts write the gateway's own messages with this exact start
        if data.startswith(b'{"type":"command'):
            self.commands(device_id, data)
        else:
            self.relay(device_id, data)


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended: its chain of awaits, outermost first."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " → ".join(where) or "(no frame)"


async def _close_clients(core: Core) -> None:
    if isinstance(core.broker, ClusterBroker):
        await core.broker.aclose()
    await core.redis.aclose()
    if core.pubsub_redis is not None:
        await core.pubsub_redis.aclose()


def _safe_url(url: str) -> str:
    """The URL without its password: credentials never reach a log."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
