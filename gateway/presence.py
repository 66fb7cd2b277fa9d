"""The presence engine: sessions, batched heartbeats, disconnects and offline detection.

Every transition is one Lua script (connect, heartbeat_batch, disconnect, expire) on one
device's partition, so any number of gateway processes, the seed's classes and any number of
detectors can run side by side and each transition is still published once. Frames never cost
a Redis round trip each: the engine gathers them per device and writes one tick (≤ 20 ms) with
one script call per partition and chunk, several in flight. A partition whose write fails
(its node is failing over) is written again at the next tick; the others are not held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.commands.model import DONE_MAX
from gateway.config import Settings
from gateway.keys import Partition
from gateway.lastseen import step_of
from gateway.metrics import Metrics
from gateway.scripts import Call, KeyOrArg, run_each
from gateway.store import Store, now_text, text

log = logging.getLogger("gateway.presence")

CHUNK = 500  # devices per script call: keeps each call well under a millisecond or two
CHUNKS_IN_FLIGHT = 4
LATE = 1.0  # seconds: an older frame renews only what is left of its TTL
TRIM_INTERVAL = 30.0
SWEEP_BATCH = 1000
RECONCILE_COUNT = 200
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

# heartbeat_batch result codes
WRITTEN, RESUMED, STALE, UNKNOWN = 1, 2, -1, 0

StaleCallback = Callable[[str, str, int], None]
# (session id, wall time of its last frame) of a device's live local socket, if that frame
# came clearly within the heartbeat timeout
ActiveLookup = Callable[[str], tuple[str, float] | None]


@dataclass(frozen=True)
class Welcome:
    """What `connect` read atomically with taking the session: the device's starting point."""

    presence_version: int
    desired: bytes
    reported: bytes
    version: int
    reported_meta: bytes
    reason: str
    commands: tuple[bytes, ...] = ()  # the device's pending commands, now sent to this session


class Revoked(Exception):
    """The token was rotated between the handshake check and the connect."""


@dataclass
class _Beat:
    session: str
    seen_at: float
    reported: bytes | None = None
    reported_meta: bytes = b"{}"
    waiters: list[asyncio.Future[int]] = field(default_factory=list)


@dataclass
class _End:
    reason: str
    waiters: list[asyncio.Future[int]] = field(default_factory=list)


class PresenceEngine:
    """Owns every presence write of this process. Start `run()` in a task; stop by cancelling."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        store: Store,
        settings: Settings,
        metrics: Metrics,
        on_stale: StaleCallback,
        db: int = 0,
        local_active: ActiveLookup | None = None,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.keys = store.keys
        self.scripts = store.scripts
        self.metrics = metrics
        self.on_stale = on_stale
        self.local_active = local_active or (lambda device_id: None)
        self.db = db
        self._sweep_held_until = 0.0
        self._beats: dict[str, _Beat] = {}
        # (session, index step) this process last wrote to each live local device's last
        # seen: a beat in the same step renews the TTL alone (see gateway/lastseen.py)
        self._indexed: dict[str, tuple[str, int]] = {}
        self._ends: dict[tuple[str, str], _End] = {}
        self._expired: set[str] = set()
        self._wake = asyncio.Event()
        self._online_cursor = 0
        self._registered_cursor = 0

    # --- transitions --------------------------------------------------------
    async def connect(self, device_id: str, session: str, token_hash: str) -> Welcome | None:
        """Take the device's one session; None for an unknown device. Raises Revoked."""
        now = time.time()
        call = connect_call(self.store, device_id, session, token_hash, now)
        with self.metrics.redis_latency.labels("connect").time():
            reply = await call.script(self.redis, call.keys, call.args)
        if reply[0] == 1:
            self._note_index(device_id, session, now)
        if reply[0] == 0:
            return None
        if reply[0] == -1:
            raise Revoked(device_id)
        reason = reply[6].decode() if isinstance(reply[6], bytes) else str(reply[6])
        if reason:
            self.metrics.transitions.labels("online", reason).inc()
        commands = tuple(bytes(frame) for frame in reply[7])
        return Welcome(int(reply[1]), reply[2], reply[3], int(reply[4]), reply[5], reason, commands)

    def beat(
        self,
        device_id: str,
        session: str,
        reported: bytes | None = None,
        reported_meta: bytes = b"{}",
        ack: bool = False,
        seen_at: float | None = None,
    ) -> asyncio.Future[int] | None:
        """Note activity (and the latest full reported document) for the next tick.

        Never awaits Redis. With *ack*, returns a future for the shadow version written.
        *seen_at* (default now) in the past renews only the TTL left since then.
        """
        when = time.time() if seen_at is None else seen_at
        pending = self._beats.get(device_id)
        if pending is None or pending.session != session:
            if pending is not None:  # a newer session took over within the tick
                _settle(pending.waiters, STALE)
            pending = self._beats[device_id] = _Beat(session, when)
        else:
            pending.seen_at = max(pending.seen_at, when)
        if reported is not None:
            pending.reported, pending.reported_meta = reported, reported_meta
        self._wake.set()
        if not ack:
            return None
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending.waiters.append(waiter)
        return waiter

    def end(self, device_id: str, session: str, reason: str) -> asyncio.Future[int]:
        """Queue the end of a session for the next tick, after its pending heartbeat."""
        pending = self._ends.setdefault((device_id, session), _End(reason))
        self._forget_index(device_id, session)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending.waiters.append(waiter)
        self._wake.set()
        return waiter

    def note_expired(self, device_id: str) -> None:
        """A keyspace notification said this heartbeat key expired."""
        self._expired.add(device_id)
        self._wake.set()

    @staticmethod
    def _offline_keys(part: Partition) -> list[str]:
        """The partition's keys every offline-capable script (disconnect, expire) takes first."""
        return [
            part.online, part.index_online, part.online_seen, part.offline_seen,
            part.online_by_type, part.events, part.presence_channel,
        ]  # fmt: skip

    def _by_partition(self, device_ids: Iterable[str]) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = {}
        for device_id in device_ids:
            grouped.setdefault(self.keys.partition(device_id), []).append(device_id)
        return grouped

    # --- the tick -----------------------------------------------------------
    async def run(self) -> None:
        """Flush ticks and sweep until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._flush_loop())
            group.create_task(self._sweep_loop())

    async def _flush_loop(self) -> None:
        # a tick gathers for one interval; when frames kept arriving while the previous tick
        # was being written, the next starts one interval after that one started, so under
        # load Redis is not left idle for an interval after every tick that took long
        loop = asyncio.get_running_loop()
        interval = self.settings.batch_interval
        backoff = 0.0
        tick_started = 0.0
        while True:
            busy = self._wake.is_set()
            await self._wake.wait()
            delay = backoff or (tick_started + interval - loop.time() if busy else interval)
            if delay > 0:
                await asyncio.sleep(delay)
            tick_started = loop.time()
            self._wake.clear()
            try:
                await self.flush()
                backoff = 0.0
            except REDIS_ERRORS as exc:
                backoff = min(max(backoff * 2, 0.05), 1.0)
                log.warning("presence flush failed (%s); retrying in %.2f s", exc, backoff)
                self._wake.set()

    async def flush(self) -> None:
        """Write everything gathered: heartbeats first, then ends, then expiries.

        All three are taken at the same instant: a session's last frames and its end arrive in
        that order, so an end taken later than the beats could overtake frames that came in
        while the beats were being written, and clear the session they still needed.
        """
        beats, self._beats = self._beats, {}
        ends, self._ends = self._ends, {}
        expired, self._expired = self._expired, set()
        try:
            await self._write_beats(beats)
        except BaseException:
            # the failed partitions' beats are back; their ends must not overtake them
            for key, value in ends.items():
                self._ends.setdefault(key, value)
            self._expired |= expired
            raise
        try:
            await self._write_ends(ends, self.settings.offline_grace)
        except BaseException:
            self._expired |= expired
            raise
        try:
            await self.expire(expired)
        except BaseException:
            self._expired |= expired
            raise

    def _restore_beats(self, beats: dict[str, _Beat]) -> None:
        """Put back a failed tick; what arrived since is newer and wins."""
        for device_id, old in beats.items():
            newer = self._beats.get(device_id)
            if newer is None:
                self._beats[device_id] = old
            elif newer.session == old.session:
                newer.waiters[:0] = old.waiters
                if newer.reported is None:
                    newer.reported, newer.reported_meta = old.reported, old.reported_meta
            else:
                _settle(old.waiters, STALE)

    async def _write_beats(self, beats: dict[str, _Beat]) -> None:
        """Per partition and chunk, one heartbeat_batch call for bare beats and one
        report_batch call for beats with a reported document; the beats of a call that failed
        are put back (re-raising after the rest were written)."""
        if not beats:
            return
        self.metrics.batch_size.observe(len(beats))
        now = time.time()
        calls: list[Call] = []
        chunks: list[list[tuple[str, _Beat]]] = []
        for partition, ids in self._by_partition(beats).items():
            part = self.keys.part(partition)
            for reporting in (False, True):
                group = [d for d in ids if (beats[d].reported is not None) == reporting]
                # the scripts take beats with the tick's own TTL first, late re-asserts after
                group.sort(key=lambda d: now - beats[d].seen_at > LATE)
                for start in range(0, len(group), CHUNK):
                    chunk = [(d, beats[d]) for d in group[start : start + CHUNK]]
                    chunks.append(chunk)
                    calls.append(self._beat_call(part, chunk, now, reporting))
        with self.metrics.redis_latency.labels("heartbeat_batch").time():
            results = await run_each(self.redis, calls, CHUNKS_IN_FLIGHT)
        failure: BaseException | None = None
        for chunk, call, reply in zip(chunks, calls, results, strict=True):
            if isinstance(reply, BaseException):
                failure = failure or reply
                self._restore_beats(dict(chunk))
            elif call.script is self.scripts.report_batch:
                self._settle_beats(chunk, reply[0::2], reply[1::2])
            else:
                self._settle_beats(chunk, reply, [0] * len(chunk))
        if failure is not None:
            raise failure

    def _beat_call(
        self, part: Partition, chunk: list[tuple[str, _Beat]], now: float, reporting: bool
    ) -> Call:
        k = self.keys
        ttl = self.settings.ttl_ms
        keys = [
            part.online, part.index_online, part.online_seen, part.offline_seen,
            part.online_by_type, part.events, part.presence_channel,
        ]  # fmt: skip
        plain = sum(1 for _, beat in chunk if now - beat.seen_at <= LATE)
        args: list[KeyOrArg] = [
            now_text(now), ttl, self.settings.history_maxlen, self.settings.events_maxlen, plain,
        ]  # fmt: skip
        for index, (device_id, beat) in enumerate(chunk):
            keys += [k.state(device_id), k.heartbeat(device_id), k.history(device_id)]
            args += [device_id, beat.session, self._seen_arg(device_id, beat)]
            if reporting:
                args += [beat.reported or b"", beat.reported_meta]
            if index >= plain:
                # a renewal for a frame seen long ago (re-asserted after Redis returned) gets
                # only the TTL left since that frame
                args.append(max(1, ttl - int((now - beat.seen_at) * 1000)))
        script = self.scripts.report_batch if reporting else self.scripts.heartbeat_batch
        return Call(script, keys, args)

    def _seen_arg(self, device_id: str, beat: _Beat) -> str:
        """The beat's time when it moves the device's last seen (a later index step than this
        session last wrote), else '' (the TTL alone is renewed)."""
        indexed = self._indexed.get(device_id)
        if (
            indexed is not None
            and indexed[0] == beat.session
            and step_of(beat.seen_at) <= indexed[1]
        ):
            return ""
        return f"{beat.seen_at:.3f}"

    def _settle_beats(
        self, chunk: list[tuple[str, _Beat]], codes: list[Any], versions: list[Any]
    ) -> None:
        for (device_id, beat), code_raw, version_raw in zip(chunk, codes, versions, strict=True):
            code, version = int(code_raw), int(version_raw)
            if code == RESUMED:
                self.metrics.transitions.labels("online", "resumed").inc()
            if code in (STALE, UNKNOWN):
                self._forget_index(device_id, beat.session)
                self.on_stale(device_id, beat.session, code)
            else:
                self._note_index(device_id, beat.session, beat.seen_at)
            _settle(beat.waiters, version if code > 0 else code)

    def _note_index(self, device_id: str, session: str, seen_at: float) -> None:
        indexed = self._indexed.get(device_id)
        step = step_of(seen_at)
        if indexed is None or indexed[0] != session or step > indexed[1]:
            self._indexed[device_id] = (session, step)

    def _forget_index(self, device_id: str, session: str) -> None:
        indexed = self._indexed.get(device_id)
        if indexed is not None and indexed[0] == session:
            del self._indexed[device_id]

    async def _write_ends(self, ends: dict[tuple[str, str], _End], grace: float) -> None:
        """One disconnect call per partition and chunk; failed ones are put back and raised."""
        if not ends:
            return
        k = self.keys
        items = list(ends.items())
        grouped: dict[int, list[tuple[tuple[str, str], _End]]] = {}
        for key, end in items:
            grouped.setdefault(self.keys.partition(key[0]), []).append((key, end))
        calls: list[Call] = []
        chunks: list[list[tuple[tuple[str, str], _End]]] = []
        now = now_text()
        for partition, entries in grouped.items():
            head = self._offline_keys(self.keys.part(partition))
            for start in range(0, len(entries), CHUNK):
                chunk = entries[start : start + CHUNK]
                keys = list(head)
                args: list[Any] = [
                    now,
                    int(grace * 1000),
                    self.settings.ttl_ms,
                    self.settings.history_maxlen,
                    self.settings.events_maxlen,
                ]
                for (device_id, session), end in chunk:
                    keys += [k.state(device_id), k.heartbeat(device_id), k.history(device_id)]
                    args += [device_id, session, end.reason]
                chunks.append(chunk)
                calls.append(Call(self.scripts.disconnect, keys, args))
        with self.metrics.redis_latency.labels("disconnect").time():
            results = await run_each(self.redis, calls, CHUNKS_IN_FLIGHT)
        failure: BaseException | None = None
        for chunk, reply in zip(chunks, results, strict=True):
            if isinstance(reply, BaseException):
                failure = failure or reply
                for key, end in chunk:
                    self._ends.setdefault(key, end)
                continue
            for index, (_, end) in enumerate(chunk):
                code = int(reply[index])
                if code == 1:
                    self.metrics.transitions.labels("offline", end.reason).inc()
                _settle(end.waiters, code)
        if failure is not None:
            raise failure

    async def end_now(self, sessions: Iterable[tuple[str, str]], reason: str, grace: float) -> None:
        """End many sessions at once (shutdown), flushing their last heartbeats first."""
        sessions = list(sessions)
        await self._write_beats_for(sessions)
        loop = asyncio.get_running_loop()
        ends = {key: _End(reason, [loop.create_future()]) for key in sessions}
        await self._write_ends(ends, grace)

    async def _write_beats_for(self, sessions: Iterable[tuple[str, str]]) -> None:
        wanted = {device_id for device_id, _ in sessions}
        mine = {d: b for d, b in self._beats.items() if d in wanted}
        for device_id in mine:
            del self._beats[device_id]
        await self._write_beats(mine)

    async def expire(self, device_ids: Iterable[str]) -> int:
        """Offline every listed device whose heartbeat key is gone; returns how many went.

        A device whose socket is here and sent a frame within the timeout is not silent: its
        key was lost (Redis restarted, or stalled past the TTL), so it is renewed instead.
        """
        ids: list[str] = []
        active: list[tuple[str, tuple[str, float]]] = []
        for device_id in device_ids:
            live = self.local_active(device_id)
            if live is None:
                ids.append(device_id)
            else:
                active.append((device_id, live))
        if active:
            async with self.redis.pipeline(transaction=False) as pipe:
                for device_id, _ in active:
                    pipe.exists(self.keys.heartbeat(device_id))
                present = await pipe.execute()
            for (device_id, (session, last_frame)), exists in zip(active, present, strict=True):
                if not exists:  # lost, not lapsed: renew what is left since its last frame
                    self.beat(device_id, session, seen_at=last_frame)
        if not ids:
            return 0
        k = self.keys
        calls: list[Call] = []
        now = now_text()
        for partition, group in self._by_partition(ids).items():
            head = self._offline_keys(self.keys.part(partition))
            for start in range(0, len(group), CHUNK):
                chunk = group[start : start + CHUNK]
                keys = list(head)
                for device_id in chunk:
                    keys += [k.state(device_id), k.heartbeat(device_id), k.history(device_id)]
                settings = self.settings
                args: list[Any] = [
                    now, settings.history_maxlen, settings.events_maxlen, settings.ttl_ms, *chunk,
                ]  # fmt: skip
                calls.append(Call(self.scripts.expire, keys, args))
        with self.metrics.redis_latency.labels("expire").time():
            results = await run_each(self.redis, calls, CHUNKS_IN_FLIGHT)
        went = 0
        failure: BaseException | None = None
        for reply in results:
            if isinstance(reply, BaseException):
                failure = failure or reply
                continue
            went += sum(1 for version in reply if int(version) > 0)
        if went:
            self.metrics.transitions.labels("offline", "expired").inc(went)
        if failure is not None:
            raise failure
        return went

    # --- the sweep ----------------------------------------------------------
    def hold_sweep(self, seconds: float) -> None:
        """Pause the sweep, so every process can re-assert its devices after Redis returns."""
        self._sweep_held_until = time.monotonic() + seconds

    def reassert(self, sessions: Iterable[tuple[str, str, float]]) -> None:
        """Renew live sessions at the next tick (after Redis came back), from their last frame."""
        for device_id, session, last_frame in sessions:
            self.beat(device_id, session, seen_at=last_frame)

    async def _sweep_loop(self) -> None:
        trimmed = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            if time.monotonic() - trimmed > TRIM_INTERVAL:
                trimmed = time.monotonic()
                release_free_memory()
            if time.monotonic() < self._sweep_held_until:
                continue
            try:
                await self.sweep()
            except REDIS_ERRORS as exc:
                log.warning("offline sweep failed: %s", exc)

    async def sweep(self) -> int:
        """Catch what notifications missed; cost bounded by the stale heads, never the fleet.

        Each partition's last-seen index yields its online devices not renewed within the
        timeout. On one node, a bounded step of SSCAN over the seed's online and registered
        sets also adopts devices written by other programs, so a device the seed heartbeats
        is indexed and expired like the gateway's own.
        """
        cutoff = time.time() - self.settings.heartbeat_timeout
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.zrangebyscore(part.online_seen, "-inf", cutoff, start=0, num=SWEEP_BATCH)
            heads = await pipe.execute()
        ids = [text(member) for head in heads for member in head]
        if self.keys.sharded:
            return await self.expire(ids)
        part = self.keys.part(0)
        self._online_cursor, online = await self.redis.sscan(
            part.online, self._online_cursor, count=RECONCILE_COUNT
        )
        foreign = [text(member) for member in online]
        self._registered_cursor, registered = await self.redis.sscan(
            part.registered, self._registered_cursor, count=RECONCILE_COUNT
        )
        await self.store.adopt(foreign + [text(member) for member in registered])
        return await self.expire(ids + foreign)

    # --- keyspace notifications ---------------------------------------------
    async def enable_notifications(self) -> bool:
        """Add `E` and `x` to notify-keyspace-events, keeping every flag already set: on the
        one node, or on every primary of a cluster (notifications are per node).

        Managed Redis often forbids CONFIG: then the sweep alone detects, and we say so.
        """
        try:
            if isinstance(self.redis, RedisCluster):
                for node in self.redis.get_primaries():
                    await _enable_expired_events(self.redis, node)
            else:
                await _enable_expired_events(self.redis, None)
            return True
        except RedisError as exc:
            log.warning(
                "cannot enable keyspace notifications (%s); the sweep alone detects offline "
                "devices, within %.1f s of the timeout",
                exc,
                self.settings.sweep_interval,
            )
            return False


async def _enable_expired_events(redis: Redis | RedisCluster, node: Any) -> None:
    options: dict[str, Any] = {} if node is None else {"target_nodes": node}
    reply: Any = await redis.config_get("notify-keyspace-events", **options)
    if node is not None and isinstance(reply, dict) and node.name in reply:
        reply = reply[node.name]  # some versions answer per node
    current = reply.get("notify-keyspace-events", "") if isinstance(reply, dict) else ""
    flags = current.decode() if isinstance(current, bytes) else str(current)
    has_expired = "x" in flags or "A" in flags
    missing = ("" if "E" in flags else "E") + ("" if has_expired else "x")
    if missing:
        await redis.config_set("notify-keyspace-events", flags + missing, **options)


def _libc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return lambda: None

    def release() -> None:
        trim(0)

    return release


release_free_memory = _libc_trim()
"""Give the heap's free pages back to the system.

A connect storm allocates and frees handshake buffers between the long-lived objects of
thousands of sockets; glibc keeps those holes, so RSS stays at the storm's peak. Trimming
every half minute returns them (a few milliseconds per call)."""


def connect_call(
    store: Store,
    device_id: str,
    session: str,
    token_hash: str,
    now: float,
    ttl_ms: int | None = None,
) -> Call:
    """connect.lua's call: *session* takes the device (bulk loaders pipeline these)."""
    k, part = store.keys, store.keys.of(device_id)
    settings = store.settings
    keys = [
        k.state(device_id), k.heartbeat(device_id), k.history(device_id), part.online,
        part.index_online, part.online_seen, part.offline_seen, part.online_by_type, part.events,
        part.presence_channel, part.control_channel, k.commands_pending(device_id),
        k.commands_done(device_id), k.commands(device_id), part.commands_due,
        part.commands_counts, part.commands_channel,
    ]  # fmt: skip
    args: list[KeyOrArg] = [
        device_id, session, now_text(now), ttl_ms or settings.ttl_ms, settings.history_maxlen,
        settings.events_maxlen, token_hash, k.command_base(device_id),
        settings.command_retention_s, DONE_MAX,
    ]  # fmt: skip
    return Call(store.scripts.connect, keys, args)


def _settle(waiters: list[asyncio.Future[int]], value: int) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(value)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
