"""The gateway's running parts, wired once per app and shared by every endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

from redis.asyncio import Redis

from gateway import disconnect, redisconn
from gateway.auth import ApiKeys, hash_token, new_secret
from gateway.broker import Broker, Handlers
from gateway.config import Settings
from gateway.dashboards import DashboardHub, close_all
from gateway.hub import RESYNC_CHUNK, DeviceHub
from gateway.keys import Keys, generated_admin_key
from gateway.metrics import Metrics
from gateway.presence import REDIS_ERRORS, PresenceEngine
from gateway.scripts import SCRIPTS
from gateway.store import Store

log = logging.getLogger("gateway")

REDIS_SOCKET_TIMEOUT = 5.0
REASSERT_HOLD = 3.0  # seconds without sweeping after a reconnect: every process re-asserts first


class Gateway:
    """Owns the Redis client and every background task of one process."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("settings.redis_url must be set (the CLI starts an embedded server)")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis: Redis = redisconn.connect(settings.redis_url)
        self.db = int(self.redis.connection_pool.connection_kwargs.get("db", 0) or 0)
        self.metrics = Metrics()
        self.store = Store(self.redis, settings)
        self.api_keys = ApiKeys.of(
            [settings.api_key] if settings.api_key else [], settings.read_api_keys
        )
        self.hub = DeviceHub(settings.heartbeat_timeout)
        self.presence = PresenceEngine(
            self.redis,
            self.store,
            settings,
            self.metrics,
            self.hub.stale,
            self.db,
            local_active=self.hub.active_session,
        )
        self.hub.expired_sink = _ExpiredSink(self.presence)
        self.dashboards = DashboardHub(self.redis, self.store, settings, self.metrics)
        # pub/sub gets its own client that never reconnects behind the broker's back: the broker
        # must see every drop, so it can re-send what was published while nobody listened
        self.pubsub_redis: Redis = redisconn.connect(
            settings.redis_url, max_connections=4, retry=redisconn.NO_RETRY
        )
        self.broker = Broker(self.pubsub_redis, self.keys, self.db, self.hub, self.resync_devices)
        self.notifications = False
        self.draining = False
        self.started = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """Start in the background: the HTTP server answers (readyz false) while Redis is away."""
        self._tasks.append(asyncio.create_task(self._start(), name="gateway-start"))

    async def _start(self) -> None:
        delay = 0.1
        while True:
            try:
                await SCRIPTS.load(self.redis)
                await self._ensure_admin_key()
                break
            except Exception as exc:  # Redis not there yet: keep trying, say why
                log.warning(
                    "Redis at %s not usable yet (%s); retrying in %.1f s",
                    _safe_url(self.settings.redis_url or ""),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.info("using Redis at %s (db %d)", _safe_url(self.settings.redis_url or ""), self.db)
        if self.db and not self.settings.key_prefix:
            log.warning(
                "Redis database %d is selected but no GATEWAY_KEY_PREFIX is set: pub/sub channels "
                "are shared by every database of a server, so deployments on other databases of "
                "this Redis see this one's presence events and commands; set GATEWAY_KEY_PREFIX to "
                "isolate it",
                self.db,
            )
        await self.on_redis_ready()
        self.started.set()

    async def on_redis_ready(self) -> None:
        """Start the parts that need Redis: detection, the tick, the pub/sub connection."""
        self.notifications = await self.presence.enable_notifications()
        self.spawn(self.presence.run(), "presence")
        self.spawn(self.broker.run(), "broker")
        self.spawn(self.dashboards.run(), "dashboards")
        await asyncio.wait_for(self.broker.connected.wait(), REDIS_SOCKET_TIMEOUT)

    async def resync_devices(self) -> None:
        """After the pub/sub connection came back (Redis may have restarted): re-assert the
        presence of local devices before any process sweeps, then re-send desired states that
        moved while no message could arrive."""
        self.presence.hold_sweep(REASSERT_HOLD)
        self.presence.reassert(
            (device_id, *live)
            for device_id in list(self.hub.sessions)
            if (live := self.hub.active_session(device_id)) is not None
        )
        sessions = self.hub.resync_targets()
        resent = 0
        for start in range(0, len(sessions), RESYNC_CHUNK):
            chunk = sessions[start : start + RESYNC_CHUNK]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for session in chunk:
                        pipe.hmget(self.keys.state(session.device_id), ["desired_state", "version"])
                    replies = await pipe.execute()
            except REDIS_ERRORS as exc:
                # the broker reconnects (with backoff) and calls this again: nothing is skipped
                log.warning("re-sync after reconnect failed: %s", exc)
                raise
            for session, (desired, version) in zip(chunk, replies, strict=True):
                if self.hub.resync_one(session, desired, int(version or 0)):
                    resent += 1
        if resent:
            log.info("re-sent desired state to %d devices after reconnect", resent)

    async def _ensure_admin_key(self) -> None:
        """With no admin key configured, one is generated at the first start and printed once
        (only its hash is kept); `--new-admin-key` replaces it."""
        if self.settings.api_key:
            return
        name = generated_admin_key(self.keys)
        key = new_secret()
        if self.settings.new_admin_key:
            await self.redis.set(name, hash_token(key))
            self._announce_admin_key(key, "replaced the admin API key")
        elif await self.redis.set(name, hash_token(key), nx=True):
            self._announce_admin_key(
                key, "no GATEWAY_API_KEY configured: generated an admin API key"
            )
        else:
            log.info(
                "admin API key: the one generated and printed at the first start (only its hash "
                "is kept); lost it? `gateway serve --new-admin-key` prints a new one"
            )
        stored = await self.redis.get(name)
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
        close_all(self.dashboards)
        sessions = list(self.hub.sessions.values())
        if not sessions:
            return
        try:
            await self.presence.end_now(
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.redis.aclose()
        await self.pubsub_redis.aclose()


def _safe_url(url: str) -> str:
    """The URL without its password: credentials never reach a log."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


class _ExpiredSink(Handlers):
    def __init__(self, presence: PresenceEngine) -> None:
        self.presence = presence

    def on_expired(self, device_id: str) -> None:
        self.presence.note_expired(device_id)
