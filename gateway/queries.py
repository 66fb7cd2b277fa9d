"""Bulk queries: device pages and fleet counts, their cost bounded by the page, not the fleet.

Pages walk the gateway's indexes (lexicographic by id, or by last seen for stale queries) one
partition after another: on one node that is the whole fleet in id order; on a cluster, the
fleet in partition order, then id order within each. A page examines at most a fixed budget
of ids however sparse its filter, so a page may come back short while more follow; only a
`None` cursor means the end. Counts come from maintained indexes and counters, one script per
partition, all partitions at once.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import shadow
from gateway.errors import InvalidCursor, InvalidDeviceType, InvalidRequest
from gateway.keys import OWN_FIELDS, Keys, Partition, is_device_id, is_device_type
from gateway.lastseen import NO_KEY, refined_last_seen
from gateway.scripts import Call, Scripts

Status = Literal["online", "offline"]
MAX_PAGE = 1000
MIN_BUDGET = 2000
PREFIX_END = "\x7f"  # above every character an id may hold: closes a prefix's range
FILTER_CHUNK = 512  # ids read at once when a second index filters them


def encode_cursor(parts: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidCursor("cursor is not one this API issued") from exc
    if not isinstance(value, dict):
        raise InvalidCursor("cursor is not one this API issued")
    return value


def text(value: bytes | str | None, default: str = "") -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else value


def number(value: bytes | str | None) -> float:
    try:
        return float(text(value, "0") or 0)
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


class Queries:
    """Pages and counts over every partition of one layout."""

    def __init__(
        self, redis: Redis | RedisCluster, keys: Keys, scripts: Scripts, ttl_ms: int
    ) -> None:
        self.redis = redis
        self.ttl_ms = ttl_ms
        self.keys = keys
        self.scripts = scripts
        f = keys.fields
        self.summary_fields = (f.device_id, f.device_type, f.last_seen, OWN_FIELDS.version)
        self.state_fields = (*self.summary_fields, f.metadata, f.reported, f.desired)
        self.seen_scale = 1000.0 if f.millis else 1.0

    async def page(
        self,
        *,
        status: Status | None = None,
        device_type: str | None = None,
        stale_seconds: float | None = None,
        include_state: bool = False,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of devices; cost bounded by the page (and a scan budget), not the fleet."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be 1–{MAX_PAGE}, got {limit}")
        if device_type is not None and not is_device_type(device_type):
            raise InvalidDeviceType(f"not a device type: {device_type[:80]!r}")
        state = decode_cursor(cursor) if cursor else {}
        partition = state.get("p", 0)
        if not isinstance(partition, int) or not 0 <= partition < self.keys.partitions:
            raise InvalidCursor("cursor is not one this API issued")
        if stale_seconds is not None:
            ids, next_state = await self._stale_ids(status, stale_seconds, limit, state)
        else:
            ids, next_state = await self._indexed_ids(status, device_type, limit, state)
        items = await self.describe(ids, include_state)
        if stale_seconds is not None:
            # the hash is the truth: other writers renew last_seen, not the gateway's index
            cutoff = time.time() - stale_seconds
            items = [
                item
                for item in items
                if item["last_seen"] < cutoff
                and (status is None or item["status"] == status)
                and (device_type is None or item["device_type"] == device_type)
            ]
        return Page(items, encode_cursor(next_state) if next_state else None)

    async def search(
        self,
        prefix: str,
        *,
        status: Status | None = None,
        device_type: str | None = None,
        include_state: bool = False,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of the devices whose id starts with *prefix* (case-sensitive), filtered
        and ordered as `page`'s: a lexicographic range of the same indexes, partition after
        partition, within the same budget of ids examined."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be 1–{MAX_PAGE}, got {limit}")
        if not is_device_id(prefix):
            raise InvalidRequest(f"a prefix is 1–128 of A-Z a-z 0-9 . _ -, got {prefix[:140]!r}")
        if device_type is not None and not is_device_type(device_type):
            raise InvalidDeviceType(f"not a device type: {device_type[:80]!r}")
        state = decode_cursor(cursor) if cursor else {}
        partition, after = state.get("p", 0), state.get("after")
        if not isinstance(partition, int) or not 0 <= partition < self.keys.partitions:
            raise InvalidCursor("cursor is not one this API issued")
        if after is not None and not is_device_id(after):
            raise InvalidCursor("cursor is not one this API issued")
        ids, next_state = await self._prefix_ids(
            prefix, status, device_type, limit, partition, after
        )
        items = await self.describe(ids, include_state)
        return Page(items, encode_cursor(next_state) if next_state is not None else None)

    async def _prefix_ids(
        self,
        prefix: str,
        status: Status | None,
        device_type: str | None,
        limit: int,
        partition: int,
        after: str | None,
    ) -> tuple[list[str], dict[str, Any] | None]:
        budget = max(limit * 10, MIN_BUDGET)
        high = f"({prefix}{PREFIX_END}"
        ids: list[str] = []
        while partition < self.keys.partitions:
            walk, filter_by, mode = self._walk(self.keys.part(partition), status, device_type)
            start = f"({after}" if after is not None and after >= prefix else f"[{prefix}"
            want = min(budget, limit - len(ids) if mode == "all" else FILTER_CHUNK)
            rows = [text(member) for member in
                    await self.redis.zrangebylex(walk, start, high, start=0, num=want)]  # fmt: skip
            budget -= len(rows)
            kept = rows
            if mode != "all" and rows:
                scores = await self.redis.zmscore(filter_by, rows)
                kept = [i for i, score in zip(rows, scores, strict=True)
                        if (score is not None) == (mode == "in")]  # fmt: skip
            room = limit - len(ids)
            if len(kept) >= room:  # the page is full: go on after its last id
                ids += kept[:room]
                return ids, _cursor(partition, after=ids[-1])
            ids += kept
            if len(rows) < want:  # this partition's range ended
                partition, after = partition + 1, None
            else:
                after = rows[-1]
            if budget <= 0:
                break
        if partition >= self.keys.partitions:
            return ids, None
        return ids, _cursor(partition, after=after) if after is not None else {"p": partition}

    async def _indexed_ids(
        self, status: Status | None, device_type: str | None, limit: int, state: dict[str, Any]
    ) -> tuple[list[str], dict[str, Any] | None]:
        partition, after = state.get("p", 0), state.get("after")
        if after is not None and not is_device_id(after):
            raise InvalidCursor("cursor is not one this API issued")
        budget = max(limit * 10, MIN_BUDGET)
        ids: list[str] = []
        while partition < self.keys.partitions:
            walk, filter_by, mode = self._walk(self.keys.part(partition), status, device_type)
            result = await self.scripts.page(
                self.redis,
                [walk, filter_by],
                ["(" + after if after else "-", limit - len(ids), budget, mode],
            )
            next_after, examined = text(result[0]), int(result[1])
            ids += [text(item) for item in result[2:]]
            budget -= examined
            if next_after:  # the page filled, or the budget ran out inside this partition
                return ids, _cursor(partition, after=next_after)
            partition, after = partition + 1, None
            if len(ids) >= limit or budget <= 0:
                break
        if partition >= self.keys.partitions:
            return ids, None
        return ids, _cursor(partition)

    @staticmethod
    def _walk(
        part: Partition, status: Status | None, device_type: str | None
    ) -> tuple[str, str, str]:
        """(index to walk, index to filter by, page.lua's mode) for a query."""
        if device_type is not None:
            mode = {None: "all", "online": "in", "offline": "out"}[status]
            return part.index_type(device_type), part.index_online, mode
        if status == "online":
            return part.index_online, part.index_online, "all"
        return part.index, part.index_online, "out" if status == "offline" else "all"

    async def _stale_ids(
        self, status: Status | None, stale_seconds: float, limit: int, state: dict[str, Any]
    ) -> tuple[list[str], dict[str, Any] | None]:
        """Walk the last-seen indexes below the cutoff, oldest first: the offline index, the
        online one, or both merged. An online device's score trails its frames by under a
        second, never leads them: a candidate is checked against its hash, none is missed.

        The cursor holds the last score returned and, per index, how many members with that
        score were returned already (ties are ordered by index, then by id)."""
        if stale_seconds < 0:
            raise InvalidRequest("stale_seconds must be ≥ 0")
        cutoff = time.time() - stale_seconds
        indexes = {None: (0, 1), "offline": (0,), "online": (1,)}[status]
        partition = state.get("p", 0)
        score = state.get("score", "-inf")
        skips = [state.get("skip0", 0), state.get("skip1", 0)]
        if not all(isinstance(skip, int) and skip >= 0 for skip in skips) or not isinstance(
            score, int | float | str
        ):
            raise InvalidCursor("cursor is not one this API issued")
        ids: list[str] = []
        while partition < self.keys.partitions:
            part = self.keys.part(partition)
            want = limit - len(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in indexes:
                    key = part.online_seen if index else part.offline_seen
                    pipe.zrangebyscore(
                        key, score, f"({cutoff}", start=skips[index], num=want, withscores=True
                    )
                replies = await pipe.execute()
            rows = sorted(
                (float(seen), index, text(member))
                for index, reply in zip(indexes, replies, strict=True)
                for member, seen in reply
            )[:want]
            ids += [member for _, _, member in rows]
            if len(rows) == want:
                last = rows[-1][0]
                cursor = _cursor(partition, score=last)
                for index in indexes:
                    ties = sum(1 for seen, i, _ in rows if seen == last and i == index)
                    cursor[f"skip{index}"] = ties + (skips[index] if last == score else 0)
                return ids, cursor
            partition, score, skips = partition + 1, "-inf", [0, 0]
        return ids, None

    async def describe(self, ids: list[str], include_state: bool) -> list[dict[str, Any]]:
        """The listed fields of each device, in the order given; one script per partition."""
        if not ids:
            return []
        fields = self.state_fields if include_state else self.summary_fields
        by_partition: dict[int, list[str]] = defaultdict(list)
        for device_id in ids:
            by_partition[self.keys.partition(device_id)].append(device_id)
        groups = list(by_partition.values())
        calls = [
            Call(
                self.scripts.describe,
                [*map(self.keys.state, group), *map(self.keys.heartbeat, group)],
                fields,
            )
            for group in groups
        ]
        replies = await Scripts.run_many(self.redis, calls)
        rows = {device_id: row for group, reply in zip(groups, replies, strict=True)
                for device_id, row in zip(group, reply, strict=True)}  # fmt: skip
        items = []
        now = time.time()
        for device_id in ids:
            row = rows[device_id]
            expires_at = int(row[-1])
            online = expires_at != NO_KEY
            if row[0] is None:
                continue  # deleted between the index read and now
            item: dict[str, Any] = {
                "device_id": text(row[0]),
                "device_type": text(row[1]),
                "status": "online" if online else "offline",
                "last_seen": refined_last_seen(
                    number(row[2]) / self.seen_scale, expires_at, self.ttl_ms, now
                ),
                "version": int(number(row[3])),
            }
            if include_state:
                item["metadata"] = shadow.decode_document(row[4])
                item["reported_state"] = shadow.decode_document(row[5])
                item["desired_state"] = shadow.decode_document(row[6])
            items.append(item)
        return items

    async def stats(self) -> dict[str, Any]:
        """Counts of the devices the list holds: O(partitions × types), never O(fleet)."""
        calls = [
            Call(
                self.scripts.stats,
                [part.index, part.index_online, part.types, part.online_by_type],
                [part.index_type("")],
            )
            for part in self.keys.parts
        ]
        registered = online = 0
        by_type: dict[str, dict[str, int]] = {}
        for reply in await Scripts.run_many(self.redis, calls):
            registered += int(reply[0])
            online += int(reply[1])
            for index in range(2, len(reply), 3):
                count, online_count = int(reply[index + 1]), max(int(reply[index + 2]), 0)
                if not count:
                    continue  # only devices other programs wrote, none indexed yet
                counts = by_type.setdefault(text(reply[index]), {"registered": 0, "online": 0})
                counts["registered"] += count
                counts["online"] += online_count
        for counts in by_type.values():
            counts["offline"] = max(counts["registered"] - counts["online"], 0)
        return {
            "registered": registered,
            "online": online,
            "offline": max(registered - online, 0),
            "by_type": dict(sorted(by_type.items())),
        }


def _cursor(partition: int, **state: Any) -> dict[str, Any]:
    """A page cursor; the partition is left out on one node, where it is always 0."""
    return ({"p": partition} if partition else {}) | state
