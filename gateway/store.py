"""The device store: registry, shadows and history on Redis, for any layout.

Knows nothing of sockets. Every write that must be atomic is one Lua script (scripts.py) on
one device's partition; reads are single commands or one pipeline. Hash-field names and time
units come from the layout (keys.py), so the same code serves the Python and Node.js field
names and the cluster. Pages and counts are `queries.py`'s, fleet events `eventlog.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from gateway import shadow
from gateway.auth import hash_device_token, new_secret, token_matches
from gateway.config import Settings
from gateway.errors import (
    Contention,
    DeviceExists,
    DeviceNotFound,
    InvalidCursor,
    InvalidDeviceId,
    InvalidDeviceType,
    NotConfirmed,
)
from gateway.eventlog import EventLog, Position, merged, parse_id
from gateway.keys import OWN_FIELDS as OWN
from gateway.keys import Fields, Keys, is_device_id, is_device_type
from gateway.lastseen import NO_KEY, refined_last_seen
from gateway.queries import MAX_PAGE, Page, Queries, Status, text
from gateway.scripts import REDIS_ERRORS, Call, KeyOrArg, Scripts, queue, run_each

__all__ = ["MAX_PAGE", "Device", "Page", "Status", "Store", "now_text", "text"]

CAS_ATTEMPTS = 8
HISTORY_WINDOW = 100
REPLICA_WAIT_MS = 500
# how long a primary's replica count (ROLE) is trusted: a new replica is waited for this soon
REPLICA_RECHECK_S = 5.0
log = logging.getLogger("gateway.store")
# the gateway's own fields of the device hash, after the layout's seed fields
OWN_FIELDS = (
    OWN.version, OWN.presence_version, OWN.reported_meta, OWN.desired_meta, OWN.desired_version,
    OWN.reported_version, OWN.desired_sha,
)  # fmt: skip


def now_text(now: float | None = None) -> str:
    """Epoch seconds as the Python classes write them: a decimal string (to the ms)."""
    return f"{time.time() if now is None else now:.3f}"


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


def hash_fields(fields: Fields) -> tuple[str, ...]:
    """Every field a device read takes, the layout's seed fields first."""
    return (
        fields.device_id, fields.device_type, fields.registered_at, fields.status,
        fields.last_seen, fields.reported, fields.desired, fields.metadata, *OWN_FIELDS,
        OWN.session,
    )  # fmt: skip


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
    transport: str | None = None  # how the device is connected now: websocket or mqtt

    @classmethod
    def from_hash(
        cls, values: Sequence[bytes | None], online: bool, millis: bool = False
    ) -> Device:
        """From the values of `hash_fields(...)`, in that order."""
        (device_id, device_type, registered_at, _, last_seen, reported, desired, metadata,
         version, presence_version, reported_meta, desired_meta, desired_version,
         reported_version, _, session) = values  # fmt: skip
        scale = 1000.0 if millis else 1.0
        reported_state = shadow.decode_document(reported)
        desired_state = shadow.decode_document(desired)
        return cls(
            device_id=text(device_id),
            device_type=text(device_type),
            status="online" if online else "offline",
            last_seen=_float(last_seen) / scale,
            registered_at=_float(registered_at) / scale,
            metadata=shadow.decode_document(metadata),
            reported_state=reported_state,
            desired_state=desired_state,
            version=_int(version),
            presence_version=_int(presence_version),
            reported_meta=shadow.decode_stamps(reported_meta, reported_state),
            desired_meta=shadow.decode_stamps(desired_meta, desired_state),
            desired_version=_int(desired_version),
            reported_version=_int(reported_version),
            transport=transport_of(text(session, "")) if online else None,
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
            "transport": self.transport,
        }


def transport_of(session: str) -> str | None:
    """How a device's current session is connected, from its id (MQTT sessions are
    `mqtt:...`); None when it has none (another program's heartbeats, a lingering end)."""
    if not session:
        return None
    return "mqtt" if session.startswith("mqtt:") else "websocket"


def _require_id(device_id: str) -> None:
    if not is_device_id(device_id):
        raise InvalidDeviceId(
            f"device_id must be 1–128 characters of A-Z a-z 0-9 . _ -; got {device_id[:140]!r}",
        )


class Store:
    """Device registry, shadows and history in one layout (one node or a cluster)."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        settings: Settings,
        keys: Keys | None = None,
        scripts: Scripts | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = keys or Keys.single(settings.key_prefix, settings.seed_schema)
        self.scripts = scripts or Scripts(self.keys)
        self.fields = self.keys.fields
        self.hash_fields = hash_fields(self.fields)
        self.queries = Queries(redis, self.keys, self.scripts, settings.ttl_ms)
        self.events = EventLog(redis, self.keys)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._replicas: dict[str, tuple[int, float]] = {}  # node name → (replicas, read at)
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
        call = self.register_call(
            device_id, device_type, encoded, hash_device_token(token), time.time()
        )
        created = await call.script(self.redis, call.keys, call.args)
        if not created:
            raise DeviceExists(device_id)
        device = await self.get(device_id)
        assert device is not None
        return device, token

    def register_call(
        self,
        device_id: str,
        device_type: str,
        encoded_metadata: bytes,
        token_hash: str,
        now: float,
    ) -> Call:
        """register.lua's call for a valid device (bulk loaders pipeline these)."""
        k, part = self.keys, self.keys.of(device_id)
        keys = [
            k.state(device_id), part.registered, part.type_set(device_type), part.index,
            part.index_type(device_type), part.offline_seen, part.types, part.retired_versions,
            part.events,
        ]  # fmt: skip
        args: list[KeyOrArg] = [
            device_id, device_type, now_text(now), encoded_metadata, token_hash,
            self.settings.events_maxlen,
        ]  # fmt: skip
        return Call(self.scripts.register, keys, args)

    async def get(self, device_id: str) -> Device | None:
        """The device, or None when its hash has no `device_id` (what "registered" means).

        A desired state another program wrote since the gateway last did is counted first
        (see `_patch_section`), so the versions read here are ones a precondition may use.
        """
        _require_id(device_id)
        values, expires_at = await self._read(device_id)
        if values[0] is None:
            return None
        desired, desired_meta, known = values[6], values[11], values[14]
        if shadow.written_elsewhere(desired, text(known) if known else None, bool(desired_meta)):
            with contextlib.suppress(DeviceNotFound, Contention):  # gone or busy: read as is
                await self.patch_section(device_id, "desired", {})
            values, expires_at = await self._read(device_id)
            if values[0] is None:
                return None
        device = Device.from_hash(values, expires_at != NO_KEY, self.fields.millis)
        seen = refined_last_seen(device.last_seen, expires_at, self.settings.ttl_ms, time.time())
        return device if seen == device.last_seen else dataclasses.replace(device, last_seen=seen)

    async def _read(self, device_id: str) -> tuple[list[bytes | None], int]:
        """The device hash's fields and its heartbeat's expiry, epoch ms (NO_KEY: offline)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.state(device_id), self.hash_fields)
            pipe.pexpiretime(self.keys.heartbeat(device_id))
            values, expires_at = await pipe.execute()
        return values, int(expires_at)

    async def require(self, device_id: str) -> Device:
        device = await self.get(device_id)
        if device is None:
            raise DeviceNotFound(device_id)
        return device

    async def delete(self, device_id: str) -> None:
        """Deregister; a live session is kicked (1008) through the control channel."""
        _require_id(device_id)
        k, part = self.keys, self.keys.of(device_id)
        for _ in range(CAS_ATTEMPTS):
            fields = [self.fields.device_id, self.fields.device_type]
            known, raw_type = await self.redis.hmget(k.state(device_id), fields)
            device_type = text(raw_type)
            if known is None or not device_type:
                raise DeviceNotFound(device_id)
            result = await self.scripts.deregister(
                self.redis,
                [
                    k.state(device_id),
                    k.heartbeat(device_id),
                    k.history(device_id),
                    part.registered,
                    part.online,
                    part.index,
                    part.index_online,
                    part.offline_seen,
                    part.online_seen,
                    part.online_by_type,
                    part.retired_versions,
                    part.events,
                    part.type_set(device_type),
                    part.index_type(device_type),
                    part.types,
                    part.presence_channel,
                    part.control_channel,
                    k.commands_pending(device_id),
                    k.commands_done(device_id),
                    part.commands_due,
                    part.commands_counts,
                    part.commands_channel,
                ],
                [
                    device_id,
                    device_type,
                    now_text(),
                    self.settings.events_maxlen,
                    k.command_base(device_id),
                ],
            )
            if result == 1:
                return
            if result == 0:
                raise DeviceNotFound(device_id)
        raise Contention("the device changed type while being deleted")

    async def rotate_token(self, device_id: str) -> str:
        _require_id(device_id)
        token = new_secret()
        done = await self.scripts.rotate_token(
            self.redis,
            [self.keys.state(device_id), self.keys.of(device_id).control_channel],
            [device_id, hash_device_token(token)],
        )
        if not done:
            raise DeviceNotFound(device_id)
        return token

    async def check_token(self, device_id: str, token: str) -> tuple[bool, str | None]:
        """(device exists, token hash if *token* is its current token)."""
        fields = [self.fields.device_id, OWN.token_hash]
        stored = await self.redis.hmget(self.keys.state(device_id), fields)
        exists = stored[0] is not None
        if exists and token_matches(stored[1], token):
            return True, text(stored[1])
        return exists, None

    async def desired_states(self, device_ids: Sequence[str]) -> list[tuple[bytes | None, int]]:
        """(desired state, shadow version) of each device, in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for device_id in device_ids:
                pipe.hmget(self.keys.state(device_id), [self.fields.desired, OWN.version])
            replies = await pipe.execute()
        return [(desired, _int(version)) for desired, version in replies]

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
        field = self.fields.section(section)
        # metadata keeps no stamps: its "meta" field is one no device hash holds
        meta_field = {"desired": OWN.desired_meta, "reported": OWN.reported_meta}.get(section, "")
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.001 * 2**attempt))
            raw, raw_meta, exists, known = await self.redis.hmget(
                k.state(device_id), [field, meta_field, self.fields.device_id, OWN.desired_sha]
            )
            if exists is None:
                raise DeviceNotFound(device_id)
            call, merged_section = self.section_call(
                device_id, section, raw, raw_meta, known, document_patch, time.time(),
                expected_version, expected_section_version,
            )  # fmt: skip
            reply = await self._write_confirmed(device_id, call)
            code, version, desired_version, reported_version, *stale = reply
            versions = shadow.Versions(int(version), int(desired_version), int(reported_version))
            if code in (0, 1):
                return versions, merged_section
            if code == -1:
                raise DeviceNotFound(device_id)
            if code == -2:
                expected = (expected_version, expected_section_version)
                raise _conflict(text(stale[0]), versions, *expected)
        raise Contention(f"the {section} state kept changing; try again")

    def section_call(
        self,
        device_id: str,
        section: Literal["desired", "reported", "metadata"],
        raw: bytes | str | None,
        raw_meta: bytes | str | None,
        known: bytes | str | None,
        document_patch: shadow.Document,
        now: float,
        expected_version: int | None = None,
        expected_section_version: int | None = None,
    ) -> tuple[Call, shadow.Document]:
        """section_write.lua's call merging a valid patch into the section as read (*raw*,
        its stamps *raw_meta*, `desired_sha` *known*), and the section it writes."""
        k = self.keys
        current = shadow.decode_document(raw)
        merged_section = shadow.merge(current, document_patch)
        encoded = shadow.check_size(merged_section, self.limits)
        unchanged = raw is not None and shadow.same(merged_section, current)
        known_hash = text(known) if known else None
        elsewhere = section == "desired" and shadow.written_elsewhere(
            raw, known_hash, raw_meta is not None
        )
        # another program's write is a write of the whole section: every leaf stamped now
        base = shadow.stamp(current, now) if elsewhere else shadow.decode_stamps(raw_meta, current)
        stamps = shadow.merge_stamps(base, document_patch, now)
        keys = [k.state(device_id), k.history(device_id), k.of(device_id).events,
                k.commands(device_id)]  # fmt: skip
        args = [
            device_id,
            section,
            shadow.section_hash(raw),
            "" if expected_version is None else expected_version,
            "" if expected_section_version is None else expected_section_version,
            encoded,
            shadow.section_hash(encoded),
            shadow.encode_stamps(stamps),
            now_text(now),
            self.settings.history_maxlen,
            self.settings.events_maxlen,
            "1" if unchanged else "",
            known_hash or "",
            "1" if elsewhere else "",
            shadow.encode_stamps(base),
            shadow.encode(current),
        ]
        return Call(self.scripts.section_write, keys, args), merged_section

    async def _write_confirmed(self, device_id: str, call: Call) -> Any:
        """Run section_write.lua; on a cluster shard with replicas, answer a write (code 1)
        only once a replica has it, so a failover right after the answer cannot lose an
        accepted change. WAIT counts the writes of its own connection: it goes in one pipeline
        with the script, which a cluster pipeline sends to the node on one connection."""
        primary = await self._primary_with_replica(device_id)
        if primary is None:
            return await call.script(self.redis, call.keys, call.args)
        for _attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                queue(pipe, call)
                pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS, target_nodes=primary)
                reply, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(reply, NoScriptError):
                break
            await self.redis.script_load(call.script.source)
        if isinstance(reply, Exception):
            raise reply
        if reply[0] != 1:
            return reply  # nothing written: nothing to confirm
        if isinstance(acked, Exception):  # the primary went away after the write
            raise NotConfirmed(
                "the change was written, but its primary failed before a replica confirmed "
                "it: send it again"
            ) from acked
        if int(acked) < 1 or self._primary_of(device_id) is not primary:
            # no replica in time, or the slot moved and the write was sent on elsewhere
            log.warning(
                "no replica of %s confirmed a write within %d ms: a failover now could lose it",
                primary.name,
                REPLICA_WAIT_MS,
            )
        return reply

    async def write_confirmed(self, device_id: str, call: Call) -> Any:
        """Run a write script on *device_id*'s partition that answers `{1, ...}` when it wrote;
        on a cluster shard with replicas, answered only once a replica has it (see
        `_write_confirmed`). For writes other modules own (commands)."""
        return await self._write_confirmed(device_id, call)

    async def write_many_confirmed(self, calls: Sequence[tuple[str, Call]]) -> list[Any]:
        """Every call's reply or exception, in order: one pipeline per node; on a cluster, a
        node with replicas gets `WAIT 1` at the end of its pipeline (its own connection), so
        what the replies say was written survives a failover. *calls* pair each call with a
        device of its partition (where it runs)."""
        if not isinstance(self.redis, RedisCluster):
            return await run_each(self.redis, [call for _, call in calls], 4)
        by_node: dict[str, list[int]] = {}
        nodes: dict[str, ClusterNode | None] = {}
        for index, (device_id, _) in enumerate(calls):
            primary = await self._primary_with_replica(device_id)
            name = primary.name if primary is not None else ""
            by_node.setdefault(name, []).append(index)
            nodes[name] = primary
        results: list[Any] = [None] * len(calls)
        for name, indexes in by_node.items():
            group = [calls[i][1] for i in indexes]
            primary = nodes[name]
            if primary is None:
                replies = await run_each(self.redis, group, 4)
            else:
                replies = await self._pipeline_confirmed(primary, group)
            for index, reply in zip(indexes, replies, strict=True):
                results[index] = reply
        return results

    async def _pipeline_confirmed(self, primary: ClusterNode, calls: Sequence[Call]) -> list[Any]:
        """The calls and `WAIT 1` in one pipeline on *primary* (its scripts loaded again and
        the missing calls re-sent, still with their WAIT, when it answers NOSCRIPT: a
        promoted replica may never have seen them)."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _attempt in range(2):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for index in todo:
                        queue(pipe, calls[index])
                    pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS, target_nodes=primary)
                    *got, acked = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                for index in todo:
                    replies[index] = exc
                return replies
            if not isinstance(acked, Exception) and int(acked) < 1:
                log.warning(
                    "no replica of %s confirmed a write within %d ms: a failover now could lose it",
                    primary.name,
                    REPLICA_WAIT_MS,
                )
            missing = []
            for index, reply in zip(todo, got, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(index)
                elif isinstance(acked, Exception) and not isinstance(reply, Exception):
                    replies[index] = NotConfirmed(
                        "written, but its primary failed before a replica confirmed it"
                    )
                else:
                    replies[index] = reply
            if not missing:
                break
            for script in {calls[index].script for index in missing}:
                await self.redis.script_load(script.source)
            todo = missing
        for index in todo:
            if replies[index] is None:
                replies[index] = NoScriptError("the script was missing again after its load")
        return replies

    async def _primary_with_replica(self, device_id: str) -> ClusterNode | None:
        """The cluster primary serving *device_id*'s slot, if it has a replica to wait for.

        Asked of the primary itself (`ROLE`, at most every few seconds): a cluster's slot
        table leaves out replicas that have not yet received a write, so a client that read it
        on a quiet cluster would never learn of them."""
        primary = self._primary_of(device_id)
        if primary is None:
            return None
        count, read_at = self._replicas.get(primary.name, (0, -math.inf))
        if time.monotonic() - read_at > REPLICA_RECHECK_S:
            try:
                role = await self.redis.execute_command("ROLE", target_nodes=primary)
            except REDIS_ERRORS:
                return primary  # cannot tell: wait (the write itself will say if it is down)
            count = len(role[2]) if text(role[0]) == "master" else 0
            self._replicas[primary.name] = (count, time.monotonic())
        return primary if count else None

    def _primary_of(self, device_id: str) -> ClusterNode | None:
        if not isinstance(self.redis, RedisCluster):
            return None
        slot = key_slot(self.keys.state(device_id).encode())
        nodes = self.redis.nodes_manager.slots_cache.get(slot)
        return nodes[0] if nodes else None

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
        """Newest first; *before* is the event id to continue below.

        The history is a list, newest first, bounded by GATEWAY_HISTORY_MAXLEN; a page after
        *before* reads from the start in windows until it passes *before*: bounded by that
        length, whatever was added since.
        """
        await self.require(device_id)
        key = self.keys.history(device_id)
        partition = self.keys.partition(device_id)
        after = self.events.entry_of(before, partition) if before is not None else None
        items: list[dict[str, Any]] = []
        start = 0
        window = max(limit, HISTORY_WINDOW)
        while len(items) < limit and start < self.settings.history_maxlen:
            rows = cast(list[bytes], await self.redis.lrange(key, start, start + window - 1))
            for raw in rows[: self.settings.history_maxlen - start]:
                event = _history_event(raw, device_id)
                entry = parse_id(event["id"])
                if after is None or entry < after:
                    event["id"] = self.events.event_id(partition, event["id"])
                    items.append(event)
                    if len(items) == limit:
                        break
            if len(rows) < window:
                break
            start += window
        return items, items[-1]["id"] if len(items) == limit else None

    async def events_after(
        self, after: str, limit: int, kinds: frozenset[str] | None = None
    ) -> tuple[list[dict[str, Any]], str | None, bool]:
        """Fleet events after a position, oldest first: (events, the position after the last
        event read, gap). Reads at most *limit* events (per partition on a cluster, of which
        the oldest *limit* are kept).

        `gap` is true when events after *after* were already trimmed from the bounded log:
        the caller must start over from a fresh snapshot.
        """
        position = self.events.decode(after)
        gap = await self.events.trimmed_after(position)
        rows = merged(await self.events.read(position, limit), limit)
        items = []
        for partition, entry_id, body in rows:
            position = position.advanced(partition, parse_id(text(entry_id)))
            items.append(_event(self.events.event_id(partition, entry_id), body))
        if kinds is not None:
            items = [item for item in items if item.get("type") in kinds]
        return items, position.encode() if rows else None, gap

    async def position(self) -> Position:
        """Where the fleet event log ends now: a snapshot's cursor."""
        return await self.events.position()

    async def last_event_id(self) -> str:
        """The current position as text (a stream id on one node)."""
        return (await self.events.position()).encode()

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
        """One page of devices; see `Queries.page`."""
        return await self.queries.page(
            status=status,
            device_type=device_type,
            stale_seconds=stale_seconds,
            include_state=include_state,
            limit=limit,
            cursor=cursor,
        )

    async def stats(self) -> dict[str, Any]:
        return await self.queries.stats()

    # --- reconciliation with other writers ----------------------------------
    async def adopt(self, ids: Sequence[str]) -> int:
        """Index devices that other programs (the seed's classes) registered or heartbeated.

        Only hashes with `device_id` are devices: an id another program only heartbeated is
        left out of every index, so the list, the stats and every endpoint agree on it. Those
        programs exist only on one node (their writes cross slots on a cluster).
        """
        ids = [device_id for device_id in ids if is_device_id(device_id)]
        if not ids or self.keys.partitions != 1:
            return 0
        k, part = self.keys, self.keys.part(0)
        fields = [self.fields.device_id, self.fields.device_type]
        async with self.redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hmget(k.state(device_id), fields)
            types = [text(t) if known else "" for known, t in await pipe.execute()]
        keys = [
            part.index, part.offline_seen, part.types, part.index_online, part.online_seen,
            part.online_by_type,
        ]  # fmt: skip
        args: list[str] = []
        for device_id, device_type in zip(ids, types, strict=True):
            if is_device_type(device_type):
                keys += [
                    k.state(device_id),
                    k.heartbeat(device_id),
                    part.type_set(device_type),
                    part.index_type(device_type),
                ]
                args += [device_id, device_type]
        if not args:
            return 0
        return int(await self.scripts.adopt(self.redis, keys, args))


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


def _event(event_id: str, body: dict[bytes, bytes]) -> dict[str, Any]:
    event = orjson.loads(body.get(b"event", b"{}"))
    event["id"] = event_id
    return dict(event)


SECTIONS = {"r": "reported", "d": "desired", "m": "metadata"}


def _history_event(raw: bytes, device_id: str) -> dict[str, Any]:
    """A history entry as the API shows it, spelt out from the compact array the scripts push
    (`record` in _lib.lua): `[log id, "p", status, version, reason]`,
    `[log id, "s", section letter, version, state, external?]` or `[log id, "m", metadata]`.
    The device id is its key's; the time is its log id's (Redis's clock at the write)."""
    try:
        entry = orjson.loads(raw)
        event_id, kind, *rest = entry
        event: dict[str, Any] = {"id": event_id, "type": "", "device_id": device_id,
                                 "timestamp": parse_id(event_id)[0] / 1000}  # fmt: skip
        if kind == "p":
            status, version, reason = rest
            event |= {"type": "presence", "status": status, "version": version, "reason": reason}
        elif kind == "s":
            section, version, state, *external = rest
            event |= {"type": "state", "section": SECTIONS[section], "version": version,
                      "state": state} | ({"external": True} if external else {})  # fmt: skip
        else:
            (metadata,) = rest
            event |= {"type": "metadata", "metadata": metadata}
        return event
    except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError, InvalidCursor):
        return {"id": "0-0", "type": "unreadable", "device_id": device_id}
