"""The fleet event log read backwards: the newest events at or before a position.

A dashboard that loads shows the latest presence events at once, then live ones. Its snapshot
carries the position it reflects; reading back from that position gives exactly the events up
to it, and live delivery sends exactly those after it, so the log has no gap and no duplicate
at the join. The page after that continues from `next`, a position just before the oldest
event read, until there is nothing older.

On a cluster each partition's stream is read backwards and the reads are merged newest first
by stream id (roughly time: the ids come from different servers), refilling a partition when
its buffer runs out, so the order within each partition is exact and nothing is skipped. Every
call reads at most `budget` entries however sparse the kinds asked for, so a page may come back
short while older events remain: only a `None` position means the end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from gateway.eventlog import LAST_MS, ZERO, Entries, EventLog, Position, StreamId, format_id
from gateway.eventlog import parse_id as parse_stream_id

BUDGET = 5000  # entries read per call, at most
MIN_CHUNK = 16


def before(sid: StreamId) -> StreamId:
    """The greatest stream id below *sid* (ZERO below the first): an inclusive upper bound
    that leaves *sid* out. No real entry has a sequence near LAST_MS."""
    ms, seq = sid
    if seq:
        return ms, seq - 1
    return (ms - 1, LAST_MS - 1) if ms else ZERO


@dataclass
class _Partition:
    """One partition's side of the merge: what was read and not yet taken, and where to go on."""

    number: int
    upto: StreamId  # inclusive bound of the next read; also where a page continues
    buffer: deque[tuple[StreamId, bytes, dict[bytes, bytes]]] = field(default_factory=deque)
    drained: bool = False  # the last read came back short: nothing older is left

    @property
    def done(self) -> bool:
        return self.upto == ZERO or (self.drained and not self.buffer)


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]  # newest first
    next: Position | None  # where the next (older) page starts; None at the oldest kept


class Backlog:
    """Reads of the per-partition fleet streams, newest first; cost bounded by the budget."""

    def __init__(self, events: EventLog, budget: int = BUDGET) -> None:
        self.events = events
        self.budget = budget

    async def latest(self, upto: Position, limit: int, kinds: frozenset[str] | None = None) -> Page:
        """Up to *limit* events of *kinds* (every kind: None) at or before *upto*, newest first."""
        parts = [_Partition(number, upto[number]) for number in range(self.events.partitions)]
        # a sparse filter reads further for each event it keeps
        wanted = limit if kinds is None else 4 * limit
        chunk = max(MIN_CHUNK, min(wanted, self.budget // len(parts)))
        items: list[dict[str, Any]] = []
        read = 0
        while len(items) < limit:
            empty = [p for p in parts if not p.buffer and not p.drained and p.upto != ZERO]
            if empty:
                if read and read + chunk * len(empty) > self.budget:
                    break  # the budget is spent: the page ends where the merge stands
                read += await self._refill(empty, chunk)
            # newest first, and only while every partition that may still hold newer entries
            # has its next one in view: a buffer that runs dry is refilled before going on
            while len(items) < limit:
                live = [p for p in parts if p.buffer]
                if not live:
                    break
                head = max(live, key=lambda p: (p.buffer[0][0], p.number))
                sid, entry_id, body = head.buffer.popleft()
                head.upto = before(sid)
                event = orjson.loads(body.get(b"event", b"{}"))
                if kinds is None or event.get("type") in kinds:
                    event["id"] = self.events.event_id(head.number, entry_id)
                    items.append(event)
                if not head.buffer and not head.drained:
                    break
            if not any(p.buffer or not p.done for p in parts):
                break
        for part in parts:
            if part.drained and not part.buffer:
                part.upto = ZERO
        if all(part.upto == ZERO for part in parts):
            return Page(items, None)
        return Page(items, Position(tuple(part.upto for part in parts)))

    async def _refill(self, parts: list[_Partition], chunk: int) -> int:
        """Read the next *chunk* older entries of each partition given (one pipeline)."""
        keys = self.events.keys
        async with self.events.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.xrevrange(
                    keys.part(part.number).events, format_id(part.upto), "-", count=chunk
                )
            replies = await pipe.execute()
        count = 0
        for part, rows in zip(parts, replies, strict=True):
            entries = cast(Entries, rows or [])
            count += len(entries)
            part.drained = len(entries) < chunk
            for entry_id, body in entries:
                text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                part.buffer.append((parse_stream_id(text), entry_id, body))
        return count
