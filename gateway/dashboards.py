"""Dashboards: one fleet-event feed per process, fanned out in coalesced batches.

The feed is a blocking XREAD on the fleet stream (`devices:events`), so every event carries
its stream id and a dashboard that reconnects can resume exactly where it left off. Batches
are throttled, not ticked: an event that follows a quiet interval goes out at once, and the
events behind it are gathered until one batch interval (50 ms by default) has passed since
that batch. So a dashboard gets at most one `events` frame per interval (≤ 20/s), and no
event waits longer than one interval for its batch. The frame is shared by every dashboard
that wants everything. Each dashboard has a bounded send queue: one that cannot keep up is
closed (4408), never buffered without limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway import disconnect
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.presence import REDIS_ERRORS
from gateway.store import Store, text
from gateway.writer import Relay, Writer

log = logging.getLogger("gateway.dashboards")

READ_COUNT = 1000
FRAME_EVENTS = 1000
MAX_REPLAY = 50_000
JOIN_READS = 5
FEED_BLOCK_MS = 1000

StreamId = tuple[int, int]


def parse_id(value: str) -> StreamId:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


class Event:
    """One fleet event: its stream id, what it is about, and its JSON with the id inside."""

    __slots__ = ("device_id", "id", "kind", "raw", "section", "sid")

    def __init__(self, entry_id: str, body: bytes) -> None:
        self.id = entry_id
        self.sid = parse_id(entry_id)
        parsed = orjson.loads(body)
        self.kind = str(parsed.get("type", ""))
        self.device_id = str(parsed.get("device_id", ""))
        self.section = str(parsed.get("section", "")).encode()
        self.raw = b'{"id":"' + entry_id.encode() + b'",' + body[1:]


def events_from(entries: Any) -> list[Event]:
    """Events from an XRANGE/XREAD reply: `[(id, {b"event": json}), ...]`."""
    return [Event(text(entry_id), fields.get(b"event", b"{}")) for entry_id, fields in entries]


def frame(events: Sequence[Event]) -> bytes:
    return b'{"type":"events","events":[' + b",".join(e.raw for e in events) + b"]}"


class Dashboard:
    """One dashboard socket: its filters, its position in the stream, its writer."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.types: frozenset[str] | None = None
        self.ids: frozenset[str] | None = None
        self.after: StreamId = (0, 0)
        self.after_id = "0-0"

    @property
    def unfiltered(self) -> bool:
        return self.types is None and self.ids is None

    def wants(self, event: Event) -> bool:
        return (
            event.sid > self.after
            and (self.types is None or event.kind in self.types)
            and (self.ids is None or event.device_id in self.ids)
        )

    def send_events(self, events: Sequence[Event], relay: Relay | None = None) -> None:
        for start in range(0, len(events), FRAME_EVENTS):
            if not self.writer.send(frame(events[start : start + FRAME_EVENTS]), relay):
                return


class DashboardHub:
    def __init__(self, redis: Redis, store: Store, settings: Settings, metrics: Metrics) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.dashboards: set[Dashboard] = set()
        self._tick: list[Event] = []
        self._tick_since = 0.0  # when the oldest event of the tick was read off Redis
        self._arrived = asyncio.Event()  # set whenever the feed adds to the tick
        self._position = "$"
        self._delivered: StreamId = (0, 0)

    # --- membership -----------------------------------------------------------
    async def join(self, dashboard: Dashboard, cursor: str) -> None:
        """Start live delivery after *cursor* (the snapshot's), with nothing lost in between.

        The replay is read until it reaches what the feed has already delivered to others:
        an event delivered while a read was in flight is then in the replay.
        """
        replay: list[Event] = []
        position = cursor
        for _ in range(JOIN_READS):
            replay += await self._range(position, "+", MAX_REPLAY)
            position = replay[-1].id if replay else cursor
            if self._delivered <= parse_id(position):
                break
        # no await from here on: the feed cannot slip an event between the read and the join
        dashboard.after = parse_id(position)
        dashboard.after_id = position
        self.dashboards.add(dashboard)
        self.metrics.dashboards_connected.set(len(self.dashboards))
        if replay:
            dashboard.send_events([e for e in replay if _filtered_in(dashboard, e)])

    def leave(self, dashboard: Dashboard) -> None:
        self.dashboards.discard(dashboard)
        self.metrics.dashboards_connected.set(len(self.dashboards))

    async def replay(self, dashboard: Dashboard, after: str) -> bool:
        """Send the events between *after* and the dashboard's position; False if trimmed."""
        if parse_id(after) >= dashboard.after:
            return True
        oldest = await self.redis.xrange(self.store.keys.events, "-", "+", count=1)
        if not oldest:  # emptied by trimming: whatever came after *after* is gone
            return False
        if parse_id(after) < parse_id(text(oldest[0][0])):
            return False
        events = await self._range(after, dashboard.after_id, MAX_REPLAY)
        if len(events) >= MAX_REPLAY:
            return False
        dashboard.send_events([e for e in events if _filtered_in(dashboard, e)])
        return True

    async def _range(self, after: str, end: str, limit: int) -> list[Event]:
        """Events after *after* up to *end* inclusive, at most about *limit*."""
        events: list[Event] = []
        start = f"({after}"
        while len(events) < limit:
            entries = await self.redis.xrange(self.store.keys.events, start, end, count=READ_COUNT)
            if not entries:
                break
            events += events_from(entries)
            start = f"({events[-1].id}"
            if len(entries) < READ_COUNT:
                break
        return events

    # --- the feed -------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._feed())
            group.create_task(self._flush_loop())

    async def _feed(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self._position == "$":
                    self._position = await self.store.last_event_id()
                reply = await self.redis.xread(
                    {self.store.keys.events: self._position}, count=READ_COUNT, block=FEED_BLOCK_MS
                )
                backoff = 0.1
            except REDIS_ERRORS as exc:
                log.warning("dashboard feed: Redis read failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for _, entries in reply or []:  # type: ignore[str-unpack]
                events = events_from(entries)
                if events:
                    self._position = events[-1].id
                    if not self._tick:
                        self._tick_since = time.perf_counter()
                    self._tick += events
                    self._arrived.set()

    async def _flush_loop(self) -> None:
        """Deliver the tick at most once per interval, at once when the last batch is older.

        A fixed ticker would hold a lone event for up to a whole interval; throttling from the
        previous batch bounds the frame rate just as well without that wait.
        """
        interval = self.settings.dashboard_batch_interval
        loop = asyncio.get_running_loop()
        last = -math.inf
        while True:
            await self._arrived.wait()
            wait = last + interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # cleared only now: whatever arrives from here on is in the next batch and wakes it
            self._arrived.clear()
            events, self._tick = self._tick, []
            last = loop.time()
            if events:
                self.deliver(events, Relay(self._tick_since, self.metrics.relay_dashboard))

    def deliver(self, events: list[Event], relay: Relay | None = None) -> None:
        """One coalesced batch to every dashboard; a shared frame for those that want all.

        *relay* times each dashboard's frames from the batch's oldest event read off Redis.
        """
        self._delivered = max(self._delivered, events[-1].sid)
        events = coalesce(events)
        shared: list[bytes] | None = None
        for dashboard in list(self.dashboards):
            if dashboard.writer.closed:
                self.leave(dashboard)
                continue
            if dashboard.unfiltered and events[0].sid > dashboard.after:
                if shared is None:
                    shared = [
                        frame(events[i : i + FRAME_EVENTS])
                        for i in range(0, len(events), FRAME_EVENTS)
                    ]
                for data in shared:
                    if not dashboard.writer.send(data, relay):
                        break
            else:
                wanted = [e for e in events if dashboard.wants(e)]
                if wanted:
                    dashboard.send_events(wanted, relay)
            if events[-1].sid > dashboard.after:
                dashboard.after, dashboard.after_id = events[-1].sid, events[-1].id
            self.metrics.out("dashboard").inc()


def coalesce(events: list[Event]) -> list[Event]:
    """Keep only the last state event per device and section within a batch.

    A state event carries the whole section, so the last one says everything the earlier
    ones did: at high report rates a dashboard gets each device's latest state once per batch.
    Presence and registry events are all kept, in order.
    """
    last: dict[tuple[str, bytes], int] = {}
    for index, event in enumerate(events):
        if event.kind == "state":
            last[(event.device_id, event.section)] = index
    if len(last) == sum(1 for e in events if e.kind == "state"):
        return events
    keep = set(last.values())
    return [e for i, e in enumerate(events) if e.kind != "state" or i in keep]


def _filtered_in(dashboard: Dashboard, event: Event) -> bool:
    return (dashboard.types is None or event.kind in dashboard.types) and (
        dashboard.ids is None or event.device_id in dashboard.ids
    )


def close_all(hub: DashboardHub) -> None:
    for dashboard in list(hub.dashboards):
        dashboard.writer.close(disconnect.RESTARTING)
