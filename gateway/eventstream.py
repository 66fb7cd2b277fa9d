"""The fleet event log as Server-Sent Events: one shared feed per process, fanned out.

One feed task reads the log (eventlog.py) for every reader of this process: on one node a
blocking XREAD of the one stream, on a cluster one pipeline per node every `POLL_INTERVAL`
(a wait across slots is not possible), so Redis sees a round trip per batch, never one per
event or per reader. Each batch is parsed and its SSE frames built once; a reader takes the
frames its filters want into its own bounded queue.

A reader that resumes (`Last-Event-ID`, `?after=`) first catches up with reads of its own, in
pages, until it stands exactly where the feed has delivered; then it joins the feed with no
await in between, so no event is missed or sent twice at the join. A live reader is in step
with the feed, so the `id:` of every frame (the position after its event) is shared too.

A reader whose queue fills is cut off: its queued frames, then `event: overflow`, then the
end of the stream. Its last `id:` is where it resumes, losing nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.eventlog import LAST_MS, EventLog, Position, StreamId, format_id, parse_id
from gateway.keys import Keys
from gateway.presence import REDIS_ERRORS
from gateway.store import text

log = logging.getLogger("gateway.eventstream")

READ_COUNT = 1000
FEED_BLOCK_MS = 1000
POLL_INTERVAL = 0.025  # a cluster's partitions cannot be waited on together: polled
IDLE_STOP = 5.0  # seconds without a reader before the feed stops reading
JOIN_READS = 4  # catch-up rounds before the last one holds the feed back
TYPE_CACHE = 100_000  # device id → device type, for `device_type=` filters
# the fleet log's event types, by the stream type a reader asks for
GROUPS = {
    "presence": "presence",
    "state": "state",
    "registered": "registry",
    "deleted": "registry",
    "metadata": "registry",
    "command": "command",
}
TYPES = ("presence", "state", "registry", "command")


class Item:
    """One fleet event as the stream sends it: where it is, what it is about, its JSON."""

    __slots__ = ("data", "device_id", "event_id", "group", "partition", "sid")

    def __init__(self, partition: int, entry_id: str, event_id: str, body: bytes) -> None:
        self.partition = partition
        self.sid: StreamId = parse_id(entry_id)
        self.event_id = event_id
        parsed = orjson.loads(body)
        self.group = GROUPS.get(str(parsed.get("type", "")), "registry")
        self.device_id = str(parsed.get("device_id", ""))
        # the REST pages' JSON: the event with its id first
        self.data = b'{"id":"' + event_id.encode() + b'",' + body[1:]


def frame(item: Item, position: str) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (position.encode(), item.group.encode(), item.data)


def control(event: str, data: dict[str, object]) -> bytes:
    """A frame of the stream's own (`gap`, `overflow`): no `id:`, so a reconnect still
    resumes from the last event sent."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


@dataclass(frozen=True)
class Filter:
    types: frozenset[str] | None = None
    device_type: str | None = None
    prefix: str | None = None

    def wants(self, item: Item, device_type: str | None) -> bool:
        return (
            (self.types is None or item.group in self.types)
            and (self.prefix is None or item.device_id.startswith(self.prefix))
            and (self.device_type is None or device_type == self.device_type)
        )


class Reader:
    """One SSE client: its filter, its bounded queue of frames, and where it stands."""

    def __init__(self, filter_: Filter, after: Position, queue_size: int) -> None:
        self.filter = filter_
        self.position = after  # while catching up; a live reader is at the feed's
        self.last_id: str | None = None  # the `id:` of the last frame queued
        self.queue: collections.deque[bytes] = collections.deque()
        self.queue_size = queue_size
        self.overflowed = False
        self.closed = False
        self.ready = asyncio.Event()  # set when there is something to send
        self.space = asyncio.Event()  # set when the queue has room (catch-up waits on it)
        self.space.set()

    def put(self, data: bytes, event_id: str) -> bool:
        """Queue a frame; False (and cut off) when the queue is full."""
        if self.overflowed:
            return False
        if len(self.queue) >= self.queue_size:
            self.overflowed = True
            self.ready.set()
            return False
        self.queue.append(data)
        self.last_id = event_id
        self.ready.set()
        if len(self.queue) >= self.queue_size:
            self.space.clear()
        return True

    def take(self) -> bytes:
        """Everything queued, as one write."""
        chunk = b"".join(self.queue)
        self.queue.clear()
        self.ready.clear()
        self.space.set()
        return chunk

    def close(self) -> None:
        self.closed = True
        self.ready.set()
        self.space.set()


class EventStream:
    """The feed of one process and its readers."""

    def __init__(
        self, redis: Redis | RedisCluster, keys: Keys, log_: EventLog, max_readers: int
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.log = log_
        self.max_readers = max_readers
        self.readers: set[Reader] = set()
        self._joining = 0
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()  # held while a batch is delivered, or a join's last read
        self._delivered: Position | None = None  # what the feed has delivered up to
        self._delivered_text = ""
        self._types: collections.OrderedDict[str, str | None] = collections.OrderedDict()

    @property
    def count(self) -> int:
        return len(self.readers) + self._joining

    # --- joining ----------------------------------------------------------------
    async def join(self, reader: Reader) -> None:
        """Catch *reader* up from its position to the feed's, then deliver to it live.

        Cancelling is safe: a reader that never joined has nothing to undo. Backpressure: the
        catch-up waits for room in the reader's queue, except in the last round (which holds
        the feed back, so it must not wait on a client): there a full queue cuts it off."""
        self._joining += 1
        self._wanted.set()
        try:
            for attempt in range(JOIN_READS):
                last = attempt == JOIN_READS - 1
                async with self._lock if last else contextlib.nullcontext():
                    target = await self._feed_position()
                    await self._catch_up(reader, target, wait=not last)
                    if reader.closed or reader.overflowed:
                        return
                    if self._delivered == target:  # nothing delivered since the read: join now
                        reader.position = target
                        self.readers.add(reader)
                        return
        finally:
            self._joining -= 1

    def close_all(self) -> None:
        """End every stream (shutdown): each reader's queued events go out first."""
        for reader in list(self.readers):
            reader.close()

    def leave(self, reader: Reader) -> None:
        reader.close()
        self.readers.discard(reader)
        if not self.readers and not self._joining:
            self._wanted.clear()

    async def _catch_up(self, reader: Reader, target: Position, wait: bool) -> None:
        """Events after the reader's position up to *target*, into its queue, page by page;
        the reader's position is then *target* in every partition it had not passed."""
        spans = {
            p: (reader.position[p], target[p])
            for p in range(self.log.partitions)
            if reader.position[p] < target[p]
        }
        while spans and not reader.closed:
            reads = await self.log.ranges(spans, READ_COUNT)
            rows = [(p, entry_id, body) for p, page in reads.items() for entry_id, body in page]
            rows.sort(key=lambda row: (parse_id(text(row[1])), row[0]))
            items = [self._item(p, entry_id, body) for p, entry_id, body in rows]
            types = await self._device_types(items, (reader,))
            for item in items:
                if wait and not reader.space.is_set():
                    await reader.space.wait()
                reader.position = reader.position.advanced(item.partition, item.sid)
                if reader.filter.wants(item, types.get(item.device_id)):
                    position = reader.position.encode()
                    if not reader.put(frame(item, position), position):
                        return
            for partition, page in reads.items():
                if len(page) < READ_COUNT:
                    del spans[partition]
                else:
                    spans[partition] = (parse_id(text(page[-1][0])), spans[partition][1])
        for partition in range(self.log.partitions):
            reader.position = reader.position.advanced(partition, target[partition])

    # --- gaps -----------------------------------------------------------------
    async def gap(self, after: Position) -> dict[str, object] | None:
        """How far events after *after* are gone from the bounded log, or None when none are:
        the oldest event still kept in each partition that was trimmed past *after*."""
        if after.ids == Position.start(self.log.partitions).ids:
            return None
        if not await self.log.trimmed_after(after):
            return None
        oldest: list[str] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.xrange(part.events, "-", "+", count=1)
            replies = await pipe.execute()
        for partition, rows in enumerate(replies):
            if not rows:
                continue
            sid = parse_id(text(rows[0][0]))
            if after[partition] != (0, 0) and after[partition] < sid:
                oldest.append(self.log.event_id(partition, rows[0][0]))
        return {
            "after": after.encode(),
            "first_kept": oldest,
            "detail": "events after this position were trimmed from the fleet log before "
            "they were read; the stream goes on from the oldest event still kept",
        }

    # --- the feed ---------------------------------------------------------------
    async def _feed_position(self) -> Position:
        if self._delivered is None:
            self._delivered = await self.log.position()
            self._delivered_text = self._delivered.encode()
        return self._delivered

    def feed_id(self) -> str:
        """The feed's position as text: where a live reader stands between events."""
        return self._delivered_text

    async def run(self) -> None:
        """Read the log while readers are attached; deliver each batch to every reader."""
        backoff = 0.1
        idle_since: float | None = None
        while True:
            if not self.readers and not self._joining:
                self._wanted.clear()  # a join sets it again
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_STOP:
                    self._delivered = None  # stopped: re-read the end of the log when wanted
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
                items = [
                    self._item(read.partition, entry_id, body)
                    for read in reads
                    for entry_id, body in read.entries
                ]
                types = await self._device_types(items, self.readers)
                backoff = 0.1
            except REDIS_ERRORS as exc:
                log.warning("event stream feed: Redis read failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if items:
                async with self._lock:
                    if self._delivered == position:  # a feed restart meanwhile: read again
                        self._deliver(position, items, types)
            elif self.log.partitions > 1:
                await asyncio.sleep(POLL_INTERVAL)

    def _deliver(self, position: Position, items: Sequence[Item], types: dict[str, str]) -> None:
        """One batch to every live reader: each frame built once, shared by all."""
        readers = list(self.readers)
        for item in items:
            position = position.advanced(item.partition, item.sid)
            encoded = position.encode()
            data: bytes | None = None
            device_type = types.get(item.device_id)
            for reader in readers:
                if reader.filter.wants(item, device_type):
                    data = data or frame(item, encoded)
                    reader.put(data, encoded)
        self._delivered = position
        self._delivered_text = position.encode()
        for reader in readers:
            if reader.overflowed or reader.closed:
                self.readers.discard(reader)

    def _item(self, partition: int, entry_id: bytes, body: dict[bytes, bytes]) -> Item:
        return Item(
            partition,
            text(entry_id),
            self.log.event_id(partition, entry_id),
            body.get(b"event", b"{}"),
        )

    async def _device_types(
        self, items: Sequence[Item], readers: Sequence[Reader] | set[Reader]
    ) -> dict[str, str]:
        """Device types of the batch's devices, when a reader filters by type: one pipeline
        for those not cached (registered events say theirs)."""
        if not any(reader.filter.device_type for reader in readers):
            return {}
        wanted: dict[str, str] = {}
        missing: list[str] = []
        for item in items:
            if item.device_id in wanted:
                continue
            if item.group == "registry" and b'"device_type":"' in item.data:
                device_type = orjson.loads(item.data).get("device_type")
                self._remember(item.device_id, device_type)
            cached = self._types.get(item.device_id)
            if cached is not None:
                wanted[item.device_id] = cached
            elif item.device_id and item.device_id not in missing:
                missing.append(item.device_id)
        if missing:
            field = self.keys.fields.device_type
            async with self.redis.pipeline(transaction=False) as pipe:
                for device_id in missing:
                    pipe.hget(self.keys.state(device_id), field)
                replies = await pipe.execute()
            for device_id, raw in zip(missing, replies, strict=True):
                if raw is not None:
                    wanted[device_id] = text(raw)
                    self._remember(device_id, text(raw))
        return wanted

    def _remember(self, device_id: str, device_type: str | None) -> None:
        if not device_type:
            return
        self._types[device_id] = device_type
        self._types.move_to_end(device_id)
        while len(self._types) > TYPE_CACHE:
            self._types.popitem(last=False)


__all__ = ["LAST_MS", "TYPES", "EventStream", "Filter", "Reader", "control", "format_id", "frame"]
