"""MQTT messages into Redis in ticks: heartbeats and reported patches, never a round trip each.

A message names its device, not its session (the broker authenticated the device; its status
`online` took the session). Any gateway process may receive any message of a device (shared
subscriptions spread them), so this does not keep a device's document as a WebSocket session
does: each tick merges the patches it gathered onto the document it last saw for the device,
and mqtt_batch.lua writes it only if nobody wrote in between (compare-and-set on the
reported version); otherwise the script answers with the current document and the patches are
merged onto that at the next tick. A patch that finds no MQTT session current is held for
`HOLD_NO_SESSION` seconds: the device's `online` may be on its way through another process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import shadow
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.presence import CHUNKS_IN_FLIGHT
from gateway.scripts import Call, KeyOrArg, run_each
from gateway.store import Store, now_text
from gateway.ticks import run_ticks

log = logging.getLogger("gateway.mqtt")

CHUNK = 500
MAX_PENDING_DEVICES = 100_000  # devices gathered for one tick; more messages are dropped
MAX_PATCHES = 64  # patches of one device waiting for a tick
MAX_CONFLICTS = 20  # ticks a device's patches are merged again before they are dropped
HOLD_NO_SESSION = 1.0  # seconds a patch waits for the device's `online` to land
DOCUMENTS_CACHED = 100_000  # devices whose last-seen reported document is kept

# mqtt_batch.lua codes
WRITTEN, RESUMED, NO_SESSION, UNKNOWN, CONFLICT = 1, 2, -1, 0, -2

DropCallback = Callable[[str, str], None]  # (reason, detail)


@dataclass
class _Pending:
    first_at: float
    seen_at: float
    patches: list[tuple[shadow.Document, float]] = field(default_factory=list)
    conflicts: int = 0


@dataclass(slots=True)
class _Document:
    reported_version: int
    reported: shadow.Document
    stamps: shadow.Document


class Ingest:
    """One per process. Start `run()` in a task; stop by cancelling."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        store: Store,
        settings: Settings,
        metrics: Metrics,
        on_drop: DropCallback,
        on_no_session: Callable[[str], None],
    ) -> None:
        self.redis = redis
        self.store = store
        self.keys = store.keys
        self.settings = settings
        self.metrics = metrics
        self.on_drop = on_drop
        self.on_no_session = on_no_session
        self._pending: dict[str, _Pending] = {}
        self._documents: OrderedDict[str, _Document] = OrderedDict()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    # --- what the bridge hands over ------------------------------------------------
    def beat(self, device_id: str, seen_at: float | None = None) -> bool:
        """Note a sign of life for the next tick; False when the tick is full (dropped)."""
        return self._entry(device_id, time.time() if seen_at is None else seen_at) is not None

    def report(self, device_id: str, patch: shadow.Document) -> bool:
        """A reported merge patch (also a sign of life), written at the next tick in order."""
        now = time.time()
        entry = self._entry(device_id, now)
        if entry is None:
            return False
        if len(entry.patches) >= MAX_PATCHES:
            self.on_drop("queue_full", f"{device_id}: over {MAX_PATCHES} patches waiting")
            return False
        entry.patches.append((patch, now))
        return True

    def _entry(self, device_id: str, seen_at: float) -> _Pending | None:
        entry = self._pending.get(device_id)
        if entry is None:
            if len(self._pending) >= MAX_PENDING_DEVICES:
                self.on_drop("queue_full", f"{device_id}: over {MAX_PENDING_DEVICES} devices")
                return None
            entry = self._pending[device_id] = _Pending(seen_at, seen_at)
        else:
            entry.seen_at = max(entry.seen_at, seen_at)
        self._wake.set()
        return entry

    def forget(self, device_id: str) -> None:
        """The device's document is no longer known here (deleted, another session)."""
        self._documents.pop(device_id, None)

    # --- the tick ------------------------------------------------------------------
    async def run(self) -> None:
        await run_ticks(self._wake, self.flush, self.settings.batch_interval, "MQTT tick")

    async def flush(self) -> None:
        """Write everything gathered; what must wait (a conflict, a session not there yet, a
        failed call) goes back in front of what arrived meanwhile."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        now = time.time()
        items = list(pending.items())
        grouped: dict[int, list[tuple[str, _Pending]]] = {}
        for device_id, entry in items:
            grouped.setdefault(self.keys.partition(device_id), []).append((device_id, entry))
        calls: list[Call] = []
        chunks: list[list[tuple[str, _Pending, tuple[_Document, bytes] | None]]] = []
        settings = self.settings
        for partition, entries in grouped.items():
            part = self.keys.part(partition)
            head: list[str] = [
                part.online, part.index_online, part.online_seen, part.offline_seen,
                part.online_by_type, part.events, part.presence_channel,
            ]  # fmt: skip
            for start in range(0, len(entries), CHUNK):
                chunk = []
                keys = list(head)
                args: list[KeyOrArg] = [
                    now_text(now), settings.ttl_ms, settings.history_maxlen, settings.events_maxlen,
                ]  # fmt: skip
                for device_id, entry in entries[start : start + CHUNK]:
                    k = self.keys
                    keys += [k.state(device_id), k.heartbeat(device_id), k.history(device_id)]
                    merged = self._merged(device_id, entry)
                    if not entry.patches:
                        expected, reported, meta = "", b"", b""
                    elif merged is None:
                        expected, reported, meta = "?", b"", b""
                    else:
                        document, encoded = merged
                        expected = str(self._documents[device_id].reported_version)
                        reported, meta = encoded, shadow.encode_stamps(document.stamps)
                    args += [device_id, f"{entry.seen_at:.3f}", expected, reported, meta]
                    chunk.append((device_id, entry, merged))
                chunks.append(chunk)
                calls.append(Call(self.store.scripts.mqtt_batch, keys, args))
        with self.metrics.redis_latency.labels("mqtt_batch").time():
            results = await run_each(self.redis, calls, CHUNKS_IN_FLIGHT)
        failure: BaseException | None = None
        for chunk, reply in zip(chunks, results, strict=True):
            if isinstance(reply, BaseException):
                failure = failure or reply
                for device_id, entry, _ in chunk:
                    self._put_back(device_id, entry)
                continue
            for index, (device_id, entry, merged) in enumerate(chunk):
                self._settle(device_id, entry, merged, reply[5 * index : 5 * index + 5], now)
        if failure is not None:
            raise failure

    def _merged(self, device_id: str, entry: _Pending) -> tuple[_Document, bytes] | None:
        """The device's document with the entry's patches merged on, or None when the
        document it starts from is not known here yet. A patch that would make the document
        too large is dropped (as a WebSocket `report` would be refused)."""
        if not entry.patches:
            return None
        known = self._documents.get(device_id)
        if known is None:
            return None
        reported, stamps = known.reported, known.stamps
        kept: list[tuple[shadow.Document, float]] = []
        for patch, at in entry.patches:
            merged = shadow.merge(reported, patch)
            try:
                shadow.check_size(merged, self.store.limits)
            except shadow.ShadowError as exc:
                self.on_drop("oversize", f"{device_id}: {exc.detail}")
                continue
            reported, stamps = merged, shadow.merge_stamps(stamps, patch, at)
            kept.append((patch, at))
        entry.patches = kept
        if not kept:
            return None
        return _Document(known.reported_version, reported, stamps), orjson.dumps(reported)

    def _settle(
        self,
        device_id: str,
        entry: _Pending,
        merged: tuple[_Document, bytes] | None,
        reply: list[Any],
        now: float,
    ) -> None:
        code, _version, reported_version = int(reply[0]), int(reply[1]), int(reply[2])
        if code == RESUMED:
            self.metrics.transitions.labels("online", "resumed").inc()
        if code in (WRITTEN, RESUMED):
            if merged is not None:
                document, _ = merged
                document.reported_version = reported_version
                self._remember(device_id, document)
            return
        if code == CONFLICT:
            raw, raw_meta = reply[3], reply[4]
            reported = shadow.decode_document(raw)
            self._remember(
                device_id,
                _Document(reported_version, reported, shadow.decode_stamps(raw_meta, reported)),
            )
            entry.conflicts += 1
            if entry.conflicts > MAX_CONFLICTS:
                self.on_drop("conflict", f"{device_id}: patches dropped after many conflicts")
                return
            self._put_back(device_id, entry, renewed=True)
            return
        self.forget(device_id)
        if code == UNKNOWN:
            self.on_drop("unregistered", f"no registered device {device_id!r}")
            return
        # no MQTT session current: wait a little for an `online` handled elsewhere
        if entry.patches and now - entry.first_at < HOLD_NO_SESSION:
            self._put_back(device_id, entry)
            return
        self.on_no_session(device_id)
        self.on_drop("no_session", f"{device_id}: no MQTT session online (send status first)")

    def _remember(self, device_id: str, document: _Document) -> None:
        self._documents[device_id] = document
        self._documents.move_to_end(device_id)
        while len(self._documents) > DOCUMENTS_CACHED:
            self._documents.popitem(last=False)

    def _put_back(self, device_id: str, old: _Pending, renewed: bool = False) -> None:
        """Back for the next tick, in front of what arrived since."""
        newer = self._pending.get(device_id)
        if renewed:  # its heartbeat was written; only the patches wait
            old.seen_at = newer.seen_at if newer is not None else old.seen_at
        if newer is not None:
            old.patches.extend(newer.patches)
            old.seen_at = max(old.seen_at, newer.seen_at)
            del old.patches[: max(0, len(old.patches) - MAX_PATCHES)]
        self._pending[device_id] = old
        self._wake.set()
