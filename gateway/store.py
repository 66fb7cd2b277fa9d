"""The device store: registry, shadows, history, pages and stats on Redis.

Knows nothing of sockets. Every write that must be atomic is one Lua script (scripts.py);
reads are single commands or one pipeline. Page cost is bounded by the page, never by the
fleet, and stats come from maintained sets and counters, never from a scan.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import random
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gateway import shadow
from gateway.auth import hash_token, new_secret, token_matches
from gateway.config import Settings
from gateway.errors import (
    Contention,
    DeviceExists,
    DeviceNotFound,
    InvalidCursor,
    InvalidDeviceId,
    InvalidDeviceType,
    InvalidRequest,
)
from gateway.keys import Keys, is_device_id, is_device_type
from gateway.scripts import SCRIPTS

Status = Literal["online", "offline"]
MAX_PAGE = 1000
CAS_ATTEMPTS = 8
FIELDS = (
    "device_id",
    "device_type",
    "registered_at",
    "status",
    "last_seen",
    "reported_state",
    "desired_state",
    "metadata",
    "version",
    "presence_version",
    "reported_meta",
    "desired_meta",
    "desired_version",
    "reported_version",
    "desired_sha",
)


PAGE_FIELDS = ("device_id", "device_type", "last_seen", "version")
PAGE_FIELDS_WITH_STATE = (*PAGE_FIELDS, "metadata", "reported_state", "desired_state")


def now_text(now: float | None = None) -> str:
    """Epoch seconds as the seed writes them: a decimal string."""
    return f"{time.time() if now is None else now:.6f}"


def text(value: bytes | str | None, default: str = "") -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else value


def _float(value: bytes | str | None) -> float:
    try:
        return float(text(value, "0") or 0)
    except ValueError:
        return 0.0


def _int(value: bytes | str | None) -> int:
    try:
        return int(text(value, "0") or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class Device:
    """A device as the API shows it: the seed's DeviceState fields plus the gateway's own."""

    device_id: str
    device_type: str
    status: Status
    last_seen: float
    registered_at: float
    metadata: shadow.Document
    reported_state: shadow.Document
    desired_state: shadow.Document
    version: int
    presence_version: int
    reported_meta: shadow.Document
    desired_meta: shadow.Document
    desired_version: int = 0
    reported_version: int = 0

    @classmethod
    def from_hash(cls, values: Sequence[bytes | None], online: bool) -> Device:
        raw = dict(zip(FIELDS, values, strict=True))
        return cls(
            device_id=text(raw["device_id"]),
            device_type=text(raw["device_type"]),
            status="online" if online else "offline",
            last_seen=_float(raw["last_seen"]),
            registered_at=_float(raw["registered_at"]),
            metadata=shadow.decode_document(raw["metadata"]),
            reported_state=shadow.decode_document(raw["reported_state"]),
            desired_state=shadow.decode_document(raw["desired_state"]),
            version=_int(raw["version"]),
            presence_version=_int(raw["presence_version"]),
            reported_meta=shadow.decode_document(raw["reported_meta"]),
            desired_meta=shadow.decode_document(raw["desired_meta"]),
            desired_version=_int(raw["desired_version"]),
            reported_version=_int(raw["reported_version"]),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_type": self.device_type,
            "status": self.status,
            "last_seen": self.last_seen,
            "version": self.version,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "desired_version": self.desired_version,
            "reported_version": self.reported_version,
            "registered_at": self.registered_at,
            "presence_version": self.presence_version,
            "metadata": self.metadata,
            "reported_state": self.reported_state,
            "desired_state": self.desired_state,
            "delta": shadow.delta(self.desired_state, self.reported_state),
            "shadow_metadata": {"desired": self.desired_meta, "reported": self.reported_meta},
        }


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def _require_id(device_id: str) -> None:
    if not is_device_id(device_id):
        raise InvalidDeviceId(
            f"device_id must be 1–128 characters of A-Z a-z 0-9 . _ -; got {device_id[:140]!r}",
        )


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


class Store:
    """Device registry and shadows on one Redis database."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.limits = shadow.Limits(
            settings.max_section_bytes, settings.max_depth, settings.max_key_length
        )

    # --- registry ---------------------------------------------------------
    async def register(
        self, device_id: str, device_type: str, metadata: shadow.Document
    ) -> tuple[Device, str]:
        """Register a device and return it with its first token (shown once, stored hashed)."""
        _require_id(device_id)
        if not is_device_type(device_type):
            raise InvalidDeviceType(
                "device_type must be 1–64 characters of A-Z a-z 0-9 . _ -; "
                f"got {device_type[:80]!r}",
            )
        encoded = shadow.check_size(shadow.validate_patch(metadata, self.limits), self.limits)
        token = new_secret()
        k = self.keys
        created = await SCRIPTS.register(
            self.redis,
            [
                k.state(device_id),
                k.registered,
                k.type_set(device_type),
                k.index,
                k.index_type(device_type),
                k.seen,
                k.types,
                k.retired_versions,
                k.events,
            ],
            [
                device_id,
                device_type,
                now_text(),
                encoded,
                hash_token(token),
                self.settings.events_maxlen,
            ],
        )
        if not created:
            raise DeviceExists(device_id)
        device = await self.get(device_id)
        assert device is not None
        return device, token

    async def get(self, device_id: str) -> Device | None:
        """The device, or None when its hash has no `device_id` (what "registered" means).

        A desired state another program wrote since the gateway last did is counted first
        (see `_patch_section`), so the versions read here are ones a precondition may use.
        """
        _require_id(device_id)
        values, online = await self._read(device_id)
        if values[0] is None:
            return None
        raw = dict(zip(FIELDS, values, strict=True))
        known = raw["desired_sha"]
        stamped = raw["desired_meta"] is not None
        if shadow.written_elsewhere(raw["desired_state"], text(known) if known else None, stamped):
            with contextlib.suppress(
                DeviceNotFound, Contention
            ):  # deleted or contended: read as is
                await self.patch_section(device_id, "desired", {})
            values, online = await self._read(device_id)
            if values[0] is None:
                return None
        return Device.from_hash(values, bool(online))

    async def _read(self, device_id: str) -> tuple[list[bytes | None], int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.state(device_id), FIELDS)
            pipe.exists(self.keys.heartbeat(device_id))
            values, online = await pipe.execute()
        return values, int(online)

    async def require(self, device_id: str) -> Device:
        device = await self.get(device_id)
        if device is None:
            raise DeviceNotFound(device_id)
        return device

    async def delete(self, device_id: str) -> None:
        """Deregister; a live session is kicked (1008) through the control channel."""
        _require_id(device_id)
        k = self.keys
        for _ in range(CAS_ATTEMPTS):
            fields = ["device_id", "device_type"]
            known, raw_type = await self.redis.hmget(k.state(device_id), fields)
            device_type = text(raw_type)
            if known is None or not device_type:
                raise DeviceNotFound(device_id)
            result = await SCRIPTS.deregister(
                self.redis,
                [
                    k.state(device_id),
                    k.heartbeat(device_id),
                    k.history(device_id),
                    k.registered,
                    k.online,
                    k.index,
                    k.index_online,
                    k.seen,
                    k.online_seen,
                    k.online_by_type,
                    k.retired_versions,
                    k.events,
                    k.type_set(device_type),
                    k.index_type(device_type),
                    k.types,
                    k.presence_channel,
                    k.control_channel,
                ],
                [device_id, device_type, now_text(), self.settings.events_maxlen],
            )
            if result == 1:
                return
            if result == 0:
                raise DeviceNotFound(device_id)
        raise Contention("the device changed type while being deleted")

    async def rotate_token(self, device_id: str) -> str:
        _require_id(device_id)
        token = new_secret()
        done = await SCRIPTS.rotate_token(
            self.redis,
            [self.keys.state(device_id), self.keys.control_channel],
            [device_id, hash_token(token)],
        )
        if not done:
            raise DeviceNotFound(device_id)
        return token

    async def check_token(self, device_id: str, token: str) -> tuple[bool, str | None]:
        """(device exists, token hash if *token* is its current token)."""
        stored = await self.redis.hmget(self.keys.state(device_id), ["device_id", "token_hash"])
        exists = stored[0] is not None
        if exists and token_matches(stored[1], token):
            return True, text(stored[1])
        return exists, None

    # --- shadow -----------------------------------------------------------
    async def patch_section(
        self,
        device_id: str,
        section: Literal["desired", "reported", "metadata"],
        patch: object,
        expected_version: int | None = None,
        expected_section_version: int | None = None,
    ) -> tuple[shadow.Versions, shadow.Document]:
        """Merge *patch* into a section atomically; returns (versions after, new section).

        Compare-and-set against the section as read, so concurrent writers (other gateways,
        the seed's `set_desired_state`) are never overwritten. A stale *expected_version*
        (whole shadow) or *expected_section_version* (this section's) raises VersionConflict.
        A desired state another program wrote since the gateway last did counts as a change of
        its own first. A desired change is published to the device at once.
        """
        _require_id(device_id)
        document_patch = shadow.validate_patch(patch, self.limits)
        # writers in this process queue per device instead of colliding; other processes
        # and other programs are still caught by the compare-and-set
        lock = self._locks.get(device_id)
        if lock is None:
            lock = self._locks[device_id] = asyncio.Lock()
        async with lock:
            return await self._patch_section(
                device_id, section, document_patch, expected_version, expected_section_version
            )

    async def _patch_section(
        self,
        device_id: str,
        section: Literal["desired", "reported", "metadata"],
        document_patch: shadow.Document,
        expected_version: int | None,
        expected_section_version: int | None,
    ) -> tuple[shadow.Versions, shadow.Document]:
        k = self.keys
        field = "metadata" if section == "metadata" else f"{section}_state"
        meta_field = f"{section}_meta"
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.001 * 2**attempt))
            raw, raw_meta, exists, known = await self.redis.hmget(
                k.state(device_id), [field, meta_field, "device_id", "desired_sha"]
            )
            if exists is None:
                raise DeviceNotFound(device_id)
            now = time.time()
            current = shadow.decode_document(raw)
            merged = shadow.merge(current, document_patch)
            encoded = shadow.check_size(merged, self.limits)
            unchanged = raw is not None and shadow.same(merged, current)
            known_hash = text(known) if known else None
            elsewhere = section == "desired" and shadow.written_elsewhere(
                raw, known_hash, raw_meta is not None
            )
            # another program's write is a write of the whole section: every leaf stamped now
            base = shadow.stamp(current, now) if elsewhere else shadow.decode_document(raw_meta)
            stamps = shadow.merge_stamps(base, document_patch, now)
            code, version, desired_version, reported_version, *stale = await SCRIPTS.section_write(
                self.redis,
                [k.state(device_id), k.history(device_id), k.events, k.commands(device_id)],
                [
                    device_id,
                    section,
                    shadow.section_hash(raw),
                    "" if expected_version is None else expected_version,
                    "" if expected_section_version is None else expected_section_version,
                    encoded,
                    shadow.section_hash(encoded),
                    orjson.dumps(stamps),
                    now_text(now),
                    self.settings.history_maxlen,
                    self.settings.events_maxlen,
                    "1" if unchanged else "",
                    known_hash or "",
                    "1" if elsewhere else "",
                    orjson.dumps(base),
                    shadow.encode(current),
                ],
            )
            versions = shadow.Versions(int(version), int(desired_version), int(reported_version))
            if code in (0, 1):
                return versions, merged
            if code == -1:
                raise DeviceNotFound(device_id)
            if code == -2:
                expected = (expected_version, expected_section_version)
                raise _conflict(text(stale[0]), versions, *expected)
        raise Contention(f"the {section} state kept changing; try again")

    async def delta(self, device_id: str) -> dict[str, Any]:
        device = await self.require(device_id)
        difference = shadow.delta(device.desired_state, device.reported_state)
        return {
            "device_id": device_id,
            "in_sync": not difference,
            "delta": difference,
            "version": device.version,
        }

    # --- history and events -------------------------------------------------
    async def history(
        self, device_id: str, limit: int, before: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; *before* is the stream id to continue below."""
        await self.require(device_id)
        top = f"({before}" if before else "+"
        entries = await self._stream_range(self.keys.history(device_id), top, "-", limit, True)
        items = [_event(entry_id, body) for entry_id, body in entries]
        return items, items[-1]["id"] if len(items) == limit else None

    async def events_after(
        self, after: str, limit: int, kinds: frozenset[str] | None = None
    ) -> tuple[list[dict[str, Any]], str | None, bool]:
        """Fleet events after a stream id, oldest first: (events, last id read, gap).

        `gap` is true when *after* is older than the oldest event kept, so some were trimmed:
        the caller must start over from a fresh snapshot.
        """
        gap = False
        if after not in ("0", "0-0"):
            info = await self.redis.xrange(self.keys.events, "-", "+", count=1)
            if info and _stream_id_lt(after, text(info[0][0])):
                gap = True
        entries = await self._stream_range(self.keys.events, f"({after}", "+", limit, False)
        items = [_event(entry_id, body) for entry_id, body in entries]
        last = items[-1]["id"] if items else None
        if kinds is not None:
            items = [item for item in items if item.get("type") in kinds]
        return items, last, gap

    async def last_event_id(self) -> str:
        """The id of the newest event ever written, even when trimming left the stream empty."""
        try:
            info = await self.redis.xinfo_stream(self.keys.events)
        except ResponseError:  # no stream yet: nothing was ever written
            return "0-0"
        return text(info.get("last-generated-id") or b"0-0")

    async def _stream_range(
        self, key: str, start: str, end: str, count: int, reverse: bool
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            if reverse:
                rows = await self.redis.xrevrange(key, start, end, count=count)
            else:
                rows = await self.redis.xrange(key, start, end, count=count)
            return cast(list[tuple[bytes, dict[bytes, bytes]]], rows or [])
        except Exception as exc:  # an id Redis cannot parse
            if "Invalid stream ID" in str(exc):
                raise InvalidCursor("not a stream id this API issued") from exc
            raise

    # --- pages and stats ----------------------------------------------------
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
        if stale_seconds is not None:
            ids, next_state = await self._stale_ids(status, stale_seconds, limit, state)
        else:
            ids, next_state = await self._indexed_ids(status, device_type, limit, state)
        items = await self._describe(ids, include_state)
        if stale_seconds is not None:
            # the hash is the truth: other writers (the seed) renew last_seen, not our index
            cutoff = time.time() - stale_seconds
            items = [
                item
                for item in items
                if item["last_seen"] < cutoff
                and (status is None or item["status"] == status)
                and (device_type is None or item["device_type"] == device_type)
            ]
        return Page(items, encode_cursor(next_state) if next_state else None)

    async def _indexed_ids(
        self, status: Status | None, device_type: str | None, limit: int, state: dict[str, Any]
    ) -> tuple[list[str], dict[str, Any] | None]:
        k = self.keys
        after = state.get("after")
        if after is not None and not is_device_id(after):
            raise InvalidCursor("cursor is not one this API issued")
        if device_type is not None:
            walk, mode = (
                k.index_type(device_type),
                {None: "all", "online": "in", "offline": "out"}[status],
            )
        elif status == "online":
            walk, mode = k.index_online, "all"
        else:
            walk, mode = k.index, "out" if status == "offline" else "all"
        result = await SCRIPTS.page(
            self.redis,
            [walk, k.index_online],
            ["(" + after if after else "-", limit, max(limit * 10, 2000), mode],
        )
        next_after = text(result[0])
        ids = [text(item) for item in result[1:]]
        return ids, ({"after": next_after} if next_after else None)

    async def _stale_ids(
        self, status: Status | None, stale_seconds: float, limit: int, state: dict[str, Any]
    ) -> tuple[list[str], dict[str, Any] | None]:
        if stale_seconds < 0:
            raise InvalidRequest("stale_seconds must be ≥ 0")
        cutoff = time.time() - stale_seconds
        key = self.keys.online_seen if status == "online" else self.keys.seen
        score = state.get("score", "-inf")
        skip = state.get("skip", 0)
        if not isinstance(skip, int) or skip < 0 or not isinstance(score, int | float | str):
            raise InvalidCursor("cursor is not one this API issued")
        rows = cast(
            list[tuple[bytes, float]],
            await self.redis.zrangebyscore(
                key, score, f"({cutoff}", start=skip, num=limit, withscores=True
            ),
        )
        ids = [text(member) for member, _ in rows]
        if len(rows) < limit:
            return ids, None
        last_score = rows[-1][1]
        ties = sum(1 for _, s in rows if s == last_score)
        if last_score == score:
            ties += skip
        return ids, {"score": last_score, "skip": ties}

    async def _describe(self, ids: list[str], include_state: bool) -> list[dict[str, Any]]:
        if not ids:
            return []
        fields = PAGE_FIELDS_WITH_STATE if include_state else PAGE_FIELDS
        rows = await SCRIPTS.describe(
            self.redis,
            [*map(self.keys.state, ids), *map(self.keys.heartbeat, ids)],
            fields,
        )
        items = []
        for row in rows:
            if row[0] is None:
                continue  # deleted between the index read and now
            item: dict[str, Any] = {
                "device_id": text(row[0]),
                "device_type": text(row[1]),
                "status": "online" if row[-1] else "offline",
                "last_seen": _float(row[2]),
                "version": _int(row[3]),
            }
            if include_state:
                item["metadata"] = shadow.decode_document(row[4])
                item["reported_state"] = shadow.decode_document(row[5])
                item["desired_state"] = shadow.decode_document(row[6])
            items.append(item)
        return items

    async def stats(self) -> dict[str, Any]:
        """Counts of the devices the list holds: O(number of types), never O(fleet)."""
        k = self.keys
        reply = await SCRIPTS.stats(
            self.redis, [k.index, k.index_online, k.types, k.online_by_type], [k.index_type("")]
        )
        registered, online = int(reply[0]), int(reply[1])
        by_type = {}
        for index in range(2, len(reply), 3):
            count, online_count = int(reply[index + 1]), max(int(reply[index + 2]), 0)
            if not count:
                continue  # only devices other programs wrote, none indexed yet
            by_type[text(reply[index])] = {
                "registered": count,
                "online": online_count,
                "offline": max(count - online_count, 0),
            }
        return {
            "registered": registered,
            "online": online,
            "offline": max(registered - online, 0),
            "by_type": dict(sorted(by_type.items())),
        }

    # --- reconciliation with other writers ----------------------------------
    async def adopt(self, ids: Sequence[str]) -> int:
        """Index devices that other programs (the seed's classes) registered or heartbeated.

        Only hashes with `device_id` are devices: an id another program only heartbeated is
        left out of every index, so the list, the stats and every endpoint agree on it.
        """
        ids = [device_id for device_id in ids if is_device_id(device_id)]
        if not ids:
            return 0
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hmget(k.state(device_id), ["device_id", "device_type"])
            types = [text(t) if known else "" for known, t in await pipe.execute()]
        keys = [k.index, k.seen, k.types, k.index_online, k.online_seen, k.online_by_type]
        args: list[str] = []
        for device_id, device_type in zip(ids, types, strict=True):
            if is_device_type(device_type):
                keys += [
                    k.state(device_id),
                    k.heartbeat(device_id),
                    k.type_set(device_type),
                    k.index_type(device_type),
                ]
                args += [device_id, device_type]
        if not args:
            return 0
        return int(await SCRIPTS.adopt(self.redis, keys, args))


def _conflict(
    stale: str,
    versions: shadow.Versions,
    expected_version: int | None,
    expected_section_version: int | None,
) -> shadow.VersionConflict:
    if stale == "version":
        return shadow.VersionConflict(expected_version or 0, versions.version, "version", versions)
    field: shadow.Precondition = (
        "reported_version" if stale == "reported_version" else ("desired_version")
    )
    current = versions.reported if field == "reported_version" else versions.desired
    return shadow.VersionConflict(expected_section_version or 0, current, field, versions)


def _event(entry_id: bytes | str, body: dict[bytes, bytes]) -> dict[str, Any]:
    event = orjson.loads(body.get(b"event", b"{}"))
    event["id"] = text(entry_id)
    return dict(event)


def _stream_id_lt(left: str, right: str) -> bool:
    def parts(value: str) -> tuple[int, int]:
        ms, _, seq = value.partition("-")
        return int(ms), int(seq or 0)

    try:
        return parts(left) < parts(right)
    except ValueError as exc:
        raise InvalidCursor(f"not a stream id: {left[:40]!r}") from exc
