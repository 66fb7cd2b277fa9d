"""Dashboards: one fleet-event feed per process, fanned out in coalesced batches.

The feed reads the fleet event log (eventlog.py) after its position, so every event carries
its id and every `events` frame the position after it (`cursor`): a dashboard that reconnects
resumes exactly where it left off. On one node the feed waits on the stream (a blocking
XREAD); on a cluster it polls every partition at once, one pipeline per node. It runs only
while a dashboard is attached: a process without one reads no fleet traffic at all.

Batches are throttled, not ticked: an event that follows a quiet interval goes out at once,
and the events behind it are gathered until one batch interval (50 ms by default) has passed
since that batch. So a dashboard gets at most one `events` frame per interval (≤ 20/s), and no
event waits longer than one interval for its batch. The frame is shared by every dashboard that
wants everything and is in step with the feed. Each dashboard has a bounded send queue: one
that cannot keep up is closed (4408), never buffered without limit.

If the log goes backwards (a Redis restart or a failover lost its newest events, which some
dashboards may already have shown), the dashboards are closed (1012): resuming from a
position the log no longer reaches gets a fresh snapshot, never a silent hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence

import orjson

from gateway import disconnect
from gateway.config import Settings
from gateway.eventlog import EventLog, Position, StreamId, parse_id
from gateway.metrics import Metrics
from gateway.presence import REDIS_ERRORS
from gateway.store import text
from gateway.writer import Relay, Writer

__all__ = ["Dashboard", "DashboardHub", "Event", "close_all", "coalesce", "parse_id"]

log = logging.getLogger("gateway.dashboards")

READ_COUNT = 1000
FRAME_EVENTS = 1000
MAX_REPLAY = 50_000
JOIN_READS = 5
FEED_BLOCK_MS = 1000
POLL_INTERVAL = 0.025  # a cluster's partitions cannot be waited on together: polled
IDLE_STOP = 5.0  # seconds without a dashboard before the feed stops reading


class Event:
    """One fleet event: its partition and stream id, what it is about, its JSON with its id."""

    __slots__ = ("device_id", "id", "kind", "partition", "raw", "section", "sid")

    def __init__(self, partition: int, entry_id: str, event_id: str, body: bytes) -> None:
        self.partition = partition
        self.id = event_id
        self.sid: StreamId = parse_id(entry_id)
        parsed = orjson.loads(body)
        self.kind = str(parsed.get("type", ""))
        self.device_id = str(parsed.get("device_id", ""))
        self.section = str(parsed.get("section", "")).encode()
        self.raw = b'{"id":"' + event_id.encode() + b'",' + body[1:]


def frame(events: Sequence[Event], cursor: Position, replay: bool = False) -> bytes:
    """An `events` frame; `cursor` is the position after it. A replay (events from before the
    dashboard's snapshot, sent on `resume`) says so: its events are history, already reflected
    in the snapshot, and its cursor is not where live delivery stands."""
    head = (
        b'{"type":"events","replay":true,"cursor":"' if replay else b'{"type":"events","cursor":"'
    )
    return (
        head + cursor.encode().encode() + b'","events":[' + b",".join(e.raw for e in events) + b"]}"
    )


class Dashboard:
    """One dashboard socket: its filters, its position in the log, its writer."""

    def __init__(self, writer: Writer, after: Position) -> None:
        self.writer = writer
        self.types: frozenset[str] | None = None
        self.ids: frozenset[str] | None = None
        self.after = after  # what it has been sent up to
        self.snapshot = after  # what its latest snapshot reflects

    @property
    def unfiltered(self) -> bool:
        return self.types is None and self.ids is None

    def new(self, event: Event) -> bool:
        return event.sid > self.after[event.partition]

    def filtered_in(self, event: Event) -> bool:
        return (self.types is None or event.kind in self.types) and (
            self.ids is None or event.device_id in self.ids
        )

    def send_events(
        self, events: Sequence[Event], relay: Relay | None = None, replay: bool = False
    ) -> None:
        """Frames of the events this dashboard wants, each with the position after it; the
        dashboard's position moves past every event given, sent or filtered out."""
        position = self.after
        wanted: list[Event] = []
        for event in events:
            position = position.advanced(event.partition, event.sid)
            if self.filtered_in(event):
                wanted.append(event)
            if len(wanted) == FRAME_EVENTS:
                if not self.writer.send(frame(wanted, position, replay), relay):
                    return
                wanted = []
        self.after = position
        if wanted:
            self.writer.send(frame(wanted, position, replay), relay)


class DashboardHub:
    def __init__(self, log_: EventLog, settings: Settings, metrics: Metrics) -> None:
        self.log = log_
        self.settings = settings
        self.metrics = metrics
        self.dashboards: set[Dashboard] = set()
        self._tick: list[Event] = []
        self._tick_since = 0.0  # when the oldest event of the tick was read off Redis
        self._arrived = asyncio.Event()  # set whenever the feed adds to the tick
        self._wanted = asyncio.Event()  # set while dashboards are attached
        self._position: Position | None = None  # the feed's, while it runs
        self._delivered: Position | None = None  # what every batch so far went up to
        self._started = asyncio.Lock()
        self._joining = 0  # joins in progress: the feed keeps its position for them
        self._held = asyncio.Lock()  # taken by a join's last read: no batch goes out meanwhile

    # --- membership -----------------------------------------------------------
    async def join(self, dashboard: Dashboard) -> None:
        """Start live delivery after the dashboard's position (its snapshot's), with nothing
        lost in between: the replay is read until it reaches what the feed has delivered, so an
        event delivered while a read was in flight is then in the replay.

        In a burst the reads may keep falling behind the batches (on a cluster a read takes a
        round trip per partition, and the first partitions read are the stalest): the last read
        holds the batches back, so it reaches past everything delivered.
        """
        self._joining += 1
        self._wanted.set()
        try:
            delivered = await self._feed_position()
            replay: list[Event] = []
            position = dashboard.after
            for attempt in range(JOIN_READS):
                last = attempt == JOIN_READS - 1
                async with self._held if last else contextlib.nullcontext():
                    fresh = await self._events_after(position, None)
                    replay += fresh
                    for event in fresh:
                        position = position.advanced(event.partition, event.sid)
                    if last or position.covers(self._delivered or delivered):
                        # no await from here on: no batch can go out between read and join
                        self.dashboards.add(dashboard)
                        self.metrics.dashboards_connected.set(len(self.dashboards))
                        dashboard.send_events(replay)
                        dashboard.after = position
                        return
        finally:
            self._joining -= 1

    def leave(self, dashboard: Dashboard) -> None:
        self.dashboards.discard(dashboard)
        self.metrics.dashboards_connected.set(len(self.dashboards))
        if not self.dashboards and not self._joining:
            self._wanted.clear()

    async def replay(self, dashboard: Dashboard, after: Position) -> bool:
        """Send the events between *after* and the dashboard's snapshot (those after it come
        live); False when some are gone (trimmed, or the log went back past *after*): a fresh
        snapshot is due."""
        snapshot = dashboard.snapshot
        if after.covers(snapshot):
            return (await self.log.position()).covers(after)
        if await self.log.trimmed_after(after):
            return False
        events = await self._events_after(after, snapshot)
        if len(events) >= MAX_REPLAY:
            return False
        mine = dashboard.after
        dashboard.after = after
        dashboard.send_events([e for e in events if e.sid > after[e.partition]], replay=True)
        dashboard.after = mine
        return True

    async def _events_after(self, after: Position, upto: Position | None) -> list[Event]:
        """Events after *after* (up to *upto* inclusive, else to the end), about MAX_REPLAY at
        most, each partition's in order."""
        events: list[Event] = []
        spans = {
            partition: (after[partition], upto[partition] if upto is not None else (2**63, 0))
            for partition in range(self.log.partitions)
        }
        spans = {p: (start, end) for p, (start, end) in spans.items() if start < end}
        # every partition read at once (one round trip per node), again for those with more
        while spans and len(events) < MAX_REPLAY:
            reads = await self.log.ranges(spans, READ_COUNT)
            for partition, rows in reads.items():
                fresh = self._events(partition, rows)
                events += fresh
                if len(rows) < READ_COUNT:
                    del spans[partition]
                else:
                    spans[partition] = (fresh[-1].sid, spans[partition][1])
        return events

    def _events(
        self, partition: int, rows: Sequence[tuple[bytes, dict[bytes, bytes]]]
    ) -> list[Event]:
        return [
            Event(partition, text(entry_id), self.log.event_id(partition, entry_id),
                  body.get(b"event", b"{}"))
            for entry_id, body in rows
        ]  # fmt: skip

    # --- the feed -------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._feed())
            group.create_task(self._flush_loop())

    async def _feed_position(self) -> Position:
        """The feed's position, read from the log when the feed (re)starts."""
        async with self._started:
            if self._position is None:
                self._position = await self.log.position()
                self._delivered = self._position
            return self._position

    async def _feed(self) -> None:
        backoff = 0.1
        idle_since: float | None = None
        while True:
            if not self.dashboards and not self._joining:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_STOP:
                    self._position = self._delivered = None  # stop: re-read when wanted again
                    await self._wanted.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_STOP):
                            await self._wanted.wait()
                continue
            idle_since = None
            try:
                position = await self._feed_position()
                reads = await self.log.read(position, READ_COUNT, FEED_BLOCK_MS)
                backoff = 0.1
            except REDIS_ERRORS as exc:
                log.warning("dashboard feed: Redis read failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self._check_rollback()
                continue
            got = False
            for read in reads:
                events = self._events(read.partition, read.entries)
                if not events:
                    continue
                got = True
                position = position.advanced(read.partition, events[-1].sid)
                if not self._tick:
                    self._tick_since = time.perf_counter()
                self._tick += events
            if self._position is not None:
                self._position = position
            if got:
                self._arrived.set()
            elif self.log.partitions > 1:
                await asyncio.sleep(POLL_INTERVAL)

    async def _check_rollback(self) -> None:
        """After Redis failed: did the log lose events the feed had already read?"""
        if self._position is None:
            return
        with contextlib.suppress(*REDIS_ERRORS):
            now = await self.log.position()
            if now.covers(self._position):
                return
            log.warning("the fleet event log lost its newest events; dashboards start over")
            self._position = self._delivered = None
            self._tick = []
            close_all(self, disconnect.RESTARTING)

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
            async with self._held:  # not while a join's last read is in flight
                # cleared only now: whatever arrives from here on is in the next batch and wakes it
                self._arrived.clear()
                events, self._tick = self._tick, []
                last = loop.time()
                if events:
                    self.deliver(events, Relay(self._tick_since, self.metrics.relay_dashboard))

    def deliver(self, events: list[Event], relay: Relay | None = None) -> None:
        """One coalesced batch to every dashboard; a shared frame for those that want all
        and are in step with the feed.

        *relay* times each dashboard's frames from the batch's oldest event read off Redis.
        """
        before = self._delivered
        after = before or Position.start(self.log.partitions)
        for event in events:
            after = after.advanced(event.partition, event.sid)
        self._delivered = after
        events = coalesce(events)
        shared: list[bytes] | None = None
        for dashboard in list(self.dashboards):
            if dashboard.writer.closed:
                self.leave(dashboard)
                continue
            if dashboard.unfiltered and dashboard.after == before and len(events) <= FRAME_EVENTS:
                if shared is None:
                    shared = [frame(events, after)]
                for data in shared:
                    dashboard.writer.send(data, relay)
                dashboard.after = after
            else:
                dashboard.send_events([e for e in events if dashboard.new(e)], relay)
                dashboard.after = _max(dashboard.after, after)
            self.metrics.out("dashboard").inc()


def _max(left: Position, right: Position) -> Position:
    return Position(tuple(max(a, b) for a, b in zip(left.ids, right.ids, strict=True)))


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


def close_all(hub: DashboardHub, close: disconnect.Close = disconnect.RESTARTING) -> None:
    for dashboard in list(hub.dashboards):
        dashboard.writer.close(close)
