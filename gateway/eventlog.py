"""The fleet event log: one bounded Redis stream per partition, and positions across them.

Every presence, state and registry change is appended to its partition's stream inside the
script that makes it, so the log is exactly the sequence of changes, in order per device. A
*position* says how far a reader has got in every partition; it is what snapshots, dashboards
and `GET /api/presence/events` resume from. On one node there is one partition and a position
is a plain stream id (`1764038400123-0`); on a cluster it is an opaque token. Either way it is
the gateway's to interpret: a position it did not issue is an `InvalidCursor`.

Event ids: a stream id on one node; `<partition>:<stream id>` on a cluster, since stream ids of
different partitions come from different servers and do not order against each other.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.errors import InvalidCursor
from gateway.keys import Keys

StreamId = tuple[int, int]
ZERO: StreamId = (0, 0)
POSITION_PREFIX = "p1."
MAX_POSITION_TEXT = 4096
LAST_MS = 2**63  # far past any real stream id; ids beyond it cannot be read after
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def parse_id(value: str) -> StreamId:
    """`ms-seq` (or `ms`) as numbers; InvalidCursor for anything else, and for ids no stream
    reaches (Redis refuses to read after its very last id)."""
    ms, _, seq = value.partition("-")
    if not ms.isdigit() or not (seq == "" or seq.isdigit()) or len(value) > 41:
        raise InvalidCursor(f"not a stream id: {value[:48]!r}")
    sid = int(ms), int(seq or 0)
    if sid[0] >= LAST_MS or sid[1] >= LAST_MS:
        raise InvalidCursor(f"not a stream id this gateway issued: {value[:48]!r}")
    return sid


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Position:
    """How far a reader has got in each partition's stream."""

    ids: tuple[StreamId, ...]

    @classmethod
    def start(cls, partitions: int) -> Position:
        return cls((ZERO,) * partitions)

    def __getitem__(self, partition: int) -> StreamId:
        return self.ids[partition]

    def advanced(self, partition: int, sid: StreamId) -> Position:
        """This position with *partition* moved to *sid* (never back)."""
        if sid <= self.ids[partition]:
            return self
        ids = list(self.ids)
        ids[partition] = sid
        return Position(tuple(ids))

    def covers(self, other: Position) -> bool:
        """True when this position is at or past *other* in every partition."""
        return all(mine >= theirs for mine, theirs in zip(self.ids, other.ids, strict=True))

    def encode(self) -> str:
        if len(self.ids) == 1:
            return format_id(self.ids[0])
        base = min((ms for ms, _ in self.ids if ms), default=0)
        numbers = [len(self.ids), base]
        for ms, seq in self.ids:
            numbers += [ms - base + 1 if ms else 0, seq]
        packed = b"".join(_varint(number) for number in numbers)
        return POSITION_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str, partitions: int) -> Position:
        """A position this gateway issued, for a log of *partitions* partitions."""
        if partitions == 1:
            return cls((ZERO if value == "0" else parse_id(value),))
        if value in ("0", "0-0"):
            return cls.start(partitions)
        if not value.startswith(POSITION_PREFIX) or len(value) > MAX_POSITION_TEXT:
            raise InvalidCursor("not a position this gateway issued")
        try:
            raw = base64.urlsafe_b64decode(value[len(POSITION_PREFIX) :] + "==")
            numbers = list(_varints(raw))
        except (binascii.Error, ValueError) as exc:
            raise InvalidCursor("not a position this gateway issued") from exc
        if len(numbers) != 2 + 2 * partitions or numbers[0] != partitions:
            raise InvalidCursor("a position for another number of partitions")
        base = numbers[1]
        pairs = zip(numbers[2::2], numbers[3::2], strict=True)
        return cls(tuple((ms + base - 1 if ms else 0, seq) for ms, seq in pairs))


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _varints(raw: bytes) -> Iterable[int]:
    number, shift = 0, 0
    for byte in raw:
        number |= (byte & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")
        if not byte & 0x80:
            yield number
            number, shift = 0, 0
    if shift:
        raise ValueError("truncated varint")


@dataclass(frozen=True, slots=True)
class Read:
    """Entries read from one partition's stream, oldest first."""

    partition: int
    entries: Entries


class EventLog:
    """Reads of the per-partition fleet streams; every call's cost is bounded by its count."""

    def __init__(self, redis: Redis | RedisCluster, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.partitions = keys.partitions

    def event_id(self, partition: int, entry_id: bytes | str) -> str:
        entry = _text(entry_id)
        return entry if self.partitions == 1 else f"{partition}:{entry}"

    def entry_of(self, event_id: str, partition: int | None = None) -> StreamId:
        """The stream id an `event_id` names (its partition prefix, on a cluster, dropped);
        InvalidCursor for anything else, and for an event of another partition than
        *partition* (when given)."""
        if self.partitions > 1:
            prefix, _, entry = event_id.partition(":")
            if not prefix.isdigit() or int(prefix) >= self.partitions:
                raise InvalidCursor(f"not an event id: {event_id[:48]!r}")
            if partition is not None and int(prefix) != partition:
                raise InvalidCursor(f"not an event of this device: {event_id[:48]!r}")
            event_id = entry
        return parse_id(event_id)

    def decode(self, value: str) -> Position:
        return Position.decode(value, self.partitions)

    async def position(self) -> Position:
        """The newest id ever written in each partition, trimmed or not (XINFO's last id)."""
        return Position(tuple(last for _, last in await self._bounds()))

    async def _bounds(self) -> list[tuple[StreamId | None, StreamId]]:
        """(oldest id kept or None, newest id ever written) of each partition's stream."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.xinfo_stream(part.events)
            replies = await pipe.execute(raise_on_error=False)
        bounds: list[tuple[StreamId | None, StreamId]] = []
        for reply in replies:
            if isinstance(reply, ResponseError):  # no stream: nothing was ever written there
                bounds.append((None, ZERO))
            elif isinstance(reply, Exception):
                raise reply
            else:
                first = reply.get("first-entry")
                oldest = parse_id(_text(first[0])) if first else None
                bounds.append((oldest, parse_id(_text(reply.get("last-generated-id") or b"0-0"))))
        return bounds

    async def trimmed_after(self, after: Position) -> bool:
        """True when an event after *after* may be gone: the bounded stream was trimmed past
        it (or emptied) while newer events were written."""
        for partition, (oldest, newest) in enumerate(await self._bounds()):
            mine = after[partition]
            if mine == ZERO or mine >= newest:
                continue
            if oldest is None or mine < oldest:
                return True
        return False

    async def read(self, after: Position, count: int, block_ms: int | None = None) -> list[Read]:
        """Up to *count* entries per partition after *after*. One node blocks up to *block_ms*
        for news (a single stream may be waited on); a cluster answers at once, one pipeline
        per node (a wait across slots is not possible)."""
        if self.partitions == 1:
            key = self.keys.part(0).events
            reply: Any = await self.redis.xread(
                {key: format_id(after[0])}, count=count, block=block_ms
            )
            entries = cast(Entries, reply[0][1]) if reply else []
            return [Read(0, entries)] if entries else []
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.xrange(part.events, f"({format_id(after[part.number])}", "+", count=count)
            replies = await pipe.execute()
        return [Read(p, cast(Entries, rows)) for p, rows in enumerate(replies) if rows]

    async def ranges(
        self, spans: dict[int, tuple[StreamId, StreamId]], count: int
    ) -> dict[int, Entries]:
        """Per partition, its entries after *after* up to *upto* inclusive (`spans[p]`), at
        most *count*: one pipeline (on a cluster, one per node, sent together)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition, (after, upto) in spans.items():
                key = self.keys.part(partition).events
                pipe.xrange(key, f"({format_id(after)}", format_id(upto), count=count)
            replies = await pipe.execute()
        return {p: cast(Entries, rows or []) for p, rows in zip(spans, replies, strict=True)}


def merged(reads: Sequence[Read], limit: int) -> list[tuple[int, bytes, dict[bytes, bytes]]]:
    """Entries of several partitions in stream-id order (roughly time order across servers),
    at most *limit*; each partition's own order is kept exactly."""
    rows = [(r.partition, entry_id, body) for r in reads for entry_id, body in r.entries]
    rows.sort(key=lambda row: (parse_id(_text(row[1])), row[0]))
    return rows[:limit]


def event_body(body: dict[bytes, bytes]) -> bytes:
    return body.get(b"event", b"{}")
