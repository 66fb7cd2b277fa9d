"""The MQTT bridge: one broker connection per gateway process, kept up with backoff.

Every process subscribes through MQTT 5 shared subscriptions (`$share/<group>/...`), so each
message a device publishes is handled by exactly one process of the deployment. A status
`online` takes the device's session (mqtt_connect.lua, then connect.lua: the same transition as
a WebSocket connect) and the process that took it publishes the device's commands and desired
state from then on; `offline` ends it through the same fenced disconnect. The broker lost:
the bridge reconnects with backoff and declares no device offline (devices whose messages stop
arriving expire after the heartbeat timeout, as any silent device does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
import time
import urllib.parse
from typing import Any

import aiomqtt

from gateway import disconnect
from gateway.broker import DeviceChannels
from gateway.commands.queue import ResultIn
from gateway.commands.service import CommandService
from gateway.config import Settings, StartupError, option_name
from gateway.hub import DeviceHub
from gateway.keys import OWN_FIELDS
from gateway.metrics import Metrics
from gateway.mqtt import codec
from gateway.mqtt.codec import Dropped, Kind, Topics
from gateway.mqtt.ingest import Ingest
from gateway.mqtt.session import MqttSession
from gateway.presence import REDIS_ERRORS, PresenceEngine, connect_call
from gateway.store import Store, text

log = logging.getLogger("gateway.mqtt")

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
PROBE_TIMEOUT = 5.0
KEEPALIVE = 30
SUBSCRIBE_WAIT = 2.0
PUBLISHERS = 4  # publishing lanes; a device's messages always take the same one, in order
OUTGOING_MAX = 10_000  # messages waiting per lane while the broker is away
MAX_STATUS_DEVICES = 10_000  # devices with a status being handled at once
MAX_STATUS_WAITING = 8  # statuses of one device waiting their turn
RECONCILE_INTERVAL = 2.0  # how often held sessions are checked against the device hash
DROP_LOG_INTERVAL = 10.0
DESIRED_BATCH = 100


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an mqtt:// or mqtts:// URL (checked by the settings)."""
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "mqtts"
    return parts.hostname or "", parts.port or (8883 if tls else 1883), tls


def safe_url(url: str) -> str:
    host, port, tls = broker_address(url)
    return f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"


def make_client(settings: Settings, identifier: str) -> aiomqtt.Client:
    assert settings.mqtt_url is not None
    host, port, tls = broker_address(settings.mqtt_url)
    parts = urllib.parse.urlsplit(settings.mqtt_url)
    username = settings.mqtt_username or (
        urllib.parse.unquote(parts.username) if parts.username else None
    )
    password = settings.mqtt_password or (
        urllib.parse.unquote(parts.password) if parts.password else None
    )
    return aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=ssl.create_default_context() if tls else None,
        keepalive=KEEPALIVE,
        timeout=PROBE_TIMEOUT,
    )


async def probe(settings: Settings) -> None:
    """Connect once at start-up: a wrong address or credentials is one line naming the flag."""
    assert settings.mqtt_url is not None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            async with make_client(settings, f"gateway-probe-{secrets.token_hex(4)}"):
                pass
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        raise StartupError(
            f"{option_name('mqtt_url')}: cannot connect to the MQTT broker at "
            f"{safe_url(settings.mqtt_url)} ({str(exc) or type(exc).__name__}); start it, or "
            "check the address and GATEWAY_MQTT_USERNAME / GATEWAY_MQTT_PASSWORD"
        ) from None


class DropLog:
    """Dropped messages: counted at once, logged at most once per interval with a sample."""

    def __init__(self, metrics: Metrics, interval: float = DROP_LOG_INTERVAL) -> None:
        self.metrics = metrics
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._logged = -interval

    def __call__(self, reason: str, detail: str) -> None:
        self.metrics.mqtt_dropped.labels(reason).inc()
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged < self.interval:
            return
        self._logged = now
        counts = ", ".join(f"{name}: {count}" for name, count in sorted(self._counts.items()))
        self._counts.clear()
        log.warning("dropped MQTT messages (%s); latest: %s", counts, detail[:200])


class MqttBridge:
    """One per process. Start `run()` in a task; stop by cancelling."""

    def __init__(
        self,
        settings: Settings,
        hub: DeviceHub,
        presence: PresenceEngine,
        store: Store,
        commands: CommandService,
        channels: DeviceChannels,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.presence = presence
        self.store = store
        self.commands = commands
        self.channels = channels
        self.metrics = metrics
        self.topics = Topics(settings.mqtt_topic_prefix)
        self.dropped = DropLog(metrics)
        self.ingest = Ingest(
            presence.redis, store, settings, metrics, self.dropped, self._no_session
        )
        self.identifier = f"gateway-{secrets.token_hex(6)}"
        self.max_payload = settings.max_frame_bytes
        self.connected = False
        self.error: str | None = "not connected yet"
        self.connects = 0
        self._lanes: list[asyncio.Queue[tuple[str, bytes, bool]]] = [
            asyncio.Queue(OUTGOING_MAX) for _ in range(PUBLISHERS)
        ]
        self._in_hand: list[tuple[str, bytes, bool] | None] = [None] * PUBLISHERS
        self._desired: dict[str, None] = {}
        self._desired_wake = asyncio.Event()
        self._statuses: dict[str, list[codec.Status]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- readiness ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        assert self.settings.mqtt_url is not None
        held = sum(1 for s in self.hub.sessions.values() if isinstance(s, MqttSession))
        return {
            "connected": self.connected,
            "broker": safe_url(self.settings.mqtt_url),
            "error": self.error,
            "sessions": held,
        }

    # --- running -----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._connection_loop())
                group.create_task(self.ingest.run())
                group.create_task(self._desired_loop())
                group.create_task(self._reconcile_loop())
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _connection_loop(self) -> None:
        delay = BACKOFF_MIN
        assert self.settings.mqtt_url is not None
        where = safe_url(self.settings.mqtt_url)
        while True:
            try:
                async with make_client(self.settings, self.identifier) as client:
                    await client.subscribe(
                        [(topic, 1) for topic in self.topics.subscriptions(self.share_group)]
                    )
                    self.connected, self.error = True, None
                    self.connects += 1
                    self.metrics.mqtt_connected.set(1)
                    log.info("MQTT bridge connected to %s as %s", where, self.identifier)
                    delay = BACKOFF_MIN
                    self._republish_all()
                    async with asyncio.TaskGroup() as group:
                        for lane in range(PUBLISHERS):
                            group.create_task(self._publish_loop(client, lane))
                        group.create_task(self._receive_loop(client))
            except* (aiomqtt.MqttError, OSError) as group_error:
                self.error = str(group_error.exceptions[0]) or "connection lost"
                if self.connected:
                    log.warning("MQTT bridge lost %s (%s); reconnecting", where, self.error)
                elif self.connects == 0:
                    log.warning("MQTT broker %s not reachable (%s); retrying", where, self.error)
            finally:
                self.connected = False
                self.metrics.mqtt_connected.set(0)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    @property
    def share_group(self) -> str:
        return self.settings.mqtt_share_group

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.handle(message.topic.value, _payload(message.payload), message.retain)
        raise aiomqtt.MqttError("the broker closed the connection")

    async def _publish_loop(self, client: aiomqtt.Client, lane: int) -> None:
        queue = self._lanes[lane]
        while True:
            item = self._in_hand[lane]
            if item is None:
                item = self._in_hand[lane] = await queue.get()
            topic, payload, retain = item
            await client.publish(topic, payload, qos=1, retain=retain)
            self._in_hand[lane] = None
            self.metrics.mqtt_published.labels(topic.rsplit("/", 1)[-1]).inc()

    def _enqueue(self, device_id: str, topic: str, payload: bytes, retain: bool) -> None:
        lane = self._lanes[hash(device_id) % PUBLISHERS]
        try:
            lane.put_nowait((topic, payload, retain))
        except asyncio.QueueFull:
            self.dropped("outgoing_full", f"{device_id}: {topic} not published (broker away?)")

    # --- incoming ------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the broker; never awaits (status work runs in its own task)."""
        try:
            device_id, kind = self.topics.parse(topic)
            self.metrics.mqtt_messages.labels(kind.value).inc()
            if kind is Kind.STATUS:
                self._status(device_id, codec.parse_status(payload, self.max_payload, retained))
                return
            if kind is Kind.REPORTED:
                patch = codec.parse_reported(payload, self.store.limits, self.max_payload)
                self._touch(device_id)
                self.ingest.report(device_id, patch)
                return
            result = codec.parse_result(payload, self.store.limits, self.max_payload)
        except Dropped as exc:
            self.dropped(exc.reason, f"{topic[:120]}: {exc}")
            return
        self._touch(device_id)
        self.ingest.beat(device_id)
        self.commands.submit(
            ResultIn(device_id, result.command_id, result.status, result.result, result.error)
        )

    def _touch(self, device_id: str) -> None:
        local = self.hub.sessions.get(device_id)
        if isinstance(local, MqttSession):
            local.last_activity = time.time()

    def _status(self, device_id: str, status: codec.Status) -> None:
        """Statuses of one device are handled in order, one at a time: an `offline` never
        overtakes the `online` before it in this process."""
        waiting = self._statuses.get(device_id)
        if waiting is not None:
            if len(waiting) >= MAX_STATUS_WAITING:
                del waiting[0]  # only the latest statuses matter
                self.dropped("queue_full", f"{device_id}: statuses coming faster than handled")
            waiting.append(status)
            return
        if len(self._statuses) >= MAX_STATUS_DEVICES:
            self.dropped("queue_full", f"{device_id}: too many statuses in progress")
            return
        self._statuses[device_id] = [status]
        task = asyncio.get_running_loop().create_task(self._statuses_of(device_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _statuses_of(self, device_id: str) -> None:
        waiting = self._statuses[device_id]
        try:
            while waiting:
                status = waiting.pop(0)
                try:
                    if status.online:
                        await self._online(device_id, status)
                    else:
                        await self._offline(device_id, status)
                except REDIS_ERRORS as exc:
                    self.dropped("unavailable", f"{device_id}: status not handled ({exc})")
        finally:
            del self._statuses[device_id]

    async def _online(self, device_id: str, status: codec.Status) -> None:
        session_id = status.session_id
        local = self.hub.sessions.get(device_id)
        if isinstance(local, MqttSession) and local.session == session_id:
            if not status.retained:
                local.last_activity = time.time()
                self.ingest.beat(device_id)  # a repeated status: a heartbeat
            return
        session = MqttSession(self, device_id, session_id)
        self.hub.add(session)
        listening = self.channels.subscribe(device_id)
        try:
            # the command channel is live before the desired state is read (as for a socket)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUBSCRIBE_WAIT):
                    await listening
            call = connect_call(self.store, device_id, session_id, "", time.time())
            with self.metrics.redis_latency.labels("mqtt_connect").time():
                reply = await self.store.scripts.mqtt_connect(
                    self.presence.redis, call.keys, call.args
                )
        except BaseException:
            session.close(disconnect.RESTARTING)
            raise
        code = int(reply[0])
        if code != 1:
            session.close(disconnect.REPLACED)
            if code == 2:  # current already (taken by this status through another process)
                if not status.retained:
                    self.ingest.beat(device_id)
            else:
                self.dropped("unregistered", f"status online for unregistered {device_id!r}")
            return
        session.taken = True
        reason = text(reply[6])
        if reason:
            self.metrics.transitions.labels("online", reason).inc()
        self.publish_desired(device_id)
        frames = [bytes(frame) for frame in reply[7]]
        for frame in frames:
            self.publish_command(device_id, frame)
        self.commands.sent(device_id, frames)

    async def _offline(self, device_id: str, status: codec.Status) -> None:
        session_id = status.session_id
        local = self.hub.sessions.get(device_id)
        if isinstance(local, MqttSession) and local.session == session_id:
            local.close(disconnect.NORMAL)
        code = await self.presence.end(device_id, session_id, status.reason)
        if code == 0:
            # an older session's offline (a Will that raced a reconnect, a late delivery):
            # the fence in the device hash kept the newer session
            self.metrics.mqtt_dropped.labels("stale_session").inc()

    def _no_session(self, device_id: str) -> None:
        local = self.hub.sessions.get(device_id)
        if isinstance(local, MqttSession):
            local.close(disconnect.REPLACED)

    # --- outgoing ------------------------------------------------------------------------
    def publish_command(self, device_id: str, frame: bytes) -> None:
        self._enqueue(device_id, self.topics.commands(device_id), frame, False)

    def publish_desired(self, device_id: str) -> None:
        """Publish the device's current desired state (retained), read fresh, soon."""
        self._desired[device_id] = None
        self._desired_wake.set()

    def release(self, session: MqttSession) -> None:
        self.hub.remove(session)
        self.channels.unsubscribe(session.device_id)

    def _republish_all(self) -> None:
        for session in list(self.hub.sessions.values()):
            if isinstance(session, MqttSession):
                self.publish_desired(session.device_id)

    async def _desired_loop(self) -> None:
        while True:
            await self._desired_wake.wait()
            self._desired_wake.clear()
            while self._desired:
                ids = list(self._desired)[:DESIRED_BATCH]
                for device_id in ids:
                    del self._desired[device_id]
                try:
                    devices = await asyncio.gather(*(self.store.get(d) for d in ids))
                except REDIS_ERRORS as exc:
                    log.warning("reading desired states for MQTT devices failed: %s", exc)
                    for device_id in ids:
                        self._desired.setdefault(device_id, None)
                    await asyncio.sleep(0.5)
                    continue
                for device_id, device in zip(ids, devices, strict=True):
                    if device is None:
                        continue
                    payload = codec.desired_payload(
                        device.desired_state, device.reported_state, device.desired_version
                    )
                    self._enqueue(device_id, self.topics.desired(device_id), payload, True)

    async def _reconcile_loop(self) -> None:
        """Release held sessions no longer current (ended through another process)."""
        field = OWN_FIELDS.session
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            # a session whose `online` is still being written is not checked yet
            held = [s for s in self.hub.sessions.values() if isinstance(s, MqttSession) and s.taken]
            self.metrics.mqtt_sessions.set(len(held))
            for start in range(0, len(held), 1000):
                chunk = held[start : start + 1000]
                try:
                    async with self.presence.redis.pipeline(transaction=False) as pipe:
                        for session in chunk:
                            pipe.hget(self.store.keys.state(session.device_id), field)
                        current = await pipe.execute()
                except REDIS_ERRORS as exc:
                    log.warning("checking MQTT sessions failed: %s", exc)
                    break
                for session, raw in zip(chunk, current, strict=True):
                    if raw is None or text(raw) != session.session:
                        session.close(disconnect.REPLACED)


def _payload(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()
