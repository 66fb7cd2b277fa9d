"""Commands on Redis: accept, read, page, cancel, finish with results, expire what is due.

Knows nothing of sockets. Every change is one Lua script on the device's partition
(gateway/lua/command_*.lua, helpers in _commands.lua), so any number of gateway processes may
act on one command and it still changes status once, in order, and never after it is final.
Results and due commands come in batches (one script call per partition and chunk); what
accepts or finishes a command waits for a replica on a cluster, as desired changes do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.commands.model import (
    DEFAULT_TIMEOUT,
    DONE_MAX,
    RECORD_SLACK,
    Command,
    NewCommand,
    seconds_text,
)
from gateway.errors import (
    CommandExists,
    CommandFinished,
    CommandNotFound,
    CommandQueueFull,
    DeviceNotFound,
    DeviceOffline,
    InvalidCursor,
)
from gateway.keys import Partition, is_command_id
from gateway.scripts import Call, KeyOrArg
from gateway.shadow import decode_document
from gateway.store import Store, now_text, text

CHUNK = 200  # results or due commands per script call
DUE_BATCH = 500  # due commands read per partition and sweep
PAGE_ROUNDS = 4  # reads per page when records that expired leave holes in the done set
CURSOR_PREFIX = "c"

Listing = Literal["pending", "done", "all"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """What accepting a command left: its status and, when it was sent, its deadline."""

    command_id: str
    status: str
    created_at: float
    deadline: float | None
    attempts: int
    created: bool  # False: a repeated request for a command that exists
    pending: int  # the device's pending commands after this one

    def shown(self, command: NewCommand) -> Command:
        """The command just made (`created`), as a read of its record would show it then,
        built from what the script wrote and answered: no second round trip to Redis."""
        sent = self.status == "sent"
        return Command(
            command_id=self.command_id,
            name=command.name,
            params=decode_document(command.params),
            status=self.status,
            created_at=self.created_at,
            sent_at=self.created_at if sent else None,
            completed_at=None,
            attempts=self.attempts,
            result=None,
            error=None,
            timeout=float(seconds_text(command.timeout)) or DEFAULT_TIMEOUT,
            ttl=float(seconds_text(command.ttl)),
            deadline=self.deadline,
            seq=0,
        )


@dataclass(frozen=True, slots=True)
class ResultIn:
    """A result a device sent, for `finish`."""

    device_id: str
    command_id: str
    status: str
    result: bytes
    error: str | None


@dataclass(frozen=True, slots=True)
class Finished:
    """What a result did: code 1 finished the command, 0 unknown (or never sent), -1 final
    already (`status` is its final one)."""

    code: int
    status: str
    created_at: float | None
    sent_at: float | None


def _float(value: object) -> float | None:
    raw = text(value) if isinstance(value, bytes | str) else ""
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


class CommandQueue:
    """The device command queues in one layout; see the module docstring."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys
        self.scripts = store.scripts
        self.settings = store.settings

    # --- accept ---------------------------------------------------------------------
    async def create(
        self, device_id: str, command: NewCommand, now: float | None = None
    ) -> Accepted:
        """Accept a command: sent at once to the device's live session, else queued. Raises
        DeviceNotFound, CommandQueueFull, CommandExists, DeviceOffline; each refusal writes
        nothing."""
        k, part = self.keys, self.keys.of(device_id)
        settings = self.settings
        command_id = command.command_id
        keys = [
            k.state(device_id), k.heartbeat(device_id), k.commands_pending(device_id),
            k.commands_done(device_id), k.command(device_id, command_id), k.commands(device_id),
            *part.command_keys,
        ]  # fmt: skip
        args: list[KeyOrArg] = [
            device_id, command_id, command.name, command.params, seconds_text(command.timeout),
            seconds_text(command.ttl), now_text(now), settings.command_queue_max,
            settings.events_maxlen, settings.command_retention_s + RECORD_SLACK,
        ]  # fmt: skip
        call = Call(self.scripts.command_create, keys, args)
        reply = await self.store.write_confirmed(device_id, call)
        code = int(reply[0])
        if code == -1:
            raise DeviceNotFound(device_id)
        if code == -2:
            raise CommandQueueFull(device_id, int(reply[1]))
        if code == -3:
            raise CommandExists(command_id)
        if code == -4:
            raise DeviceOffline(device_id)
        if code == 2:
            existing = await self.require(device_id, command_id)
            return Accepted(
                command_id, existing.status, existing.created_at, existing.deadline,
                existing.attempts, created=False, pending=0,
            )  # fmt: skip
        return Accepted(
            command_id=command_id,
            status=text(reply[1]),
            created_at=_float(reply[2]) or 0.0,
            deadline=_float(reply[3]),
            attempts=int(reply[4]),
            created=True,
            pending=int(reply[5]),
        )

    # --- read -----------------------------------------------------------------------
    async def get(self, device_id: str, command_id: str) -> Command | None:
        """The command, or None; DeviceNotFound when the device is not registered."""
        if not is_command_id(command_id):
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(self.keys.state(device_id), self.store.fields.device_id)
            pipe.hgetall(self.keys.command(device_id, command_id))
            known, record = await pipe.execute()
        if not known:
            raise DeviceNotFound(device_id)
        return Command.from_record(command_id, record) if record else None

    async def require(self, device_id: str, command_id: str) -> Command:
        command = await self.get(device_id, command_id)
        if command is None:
            raise CommandNotFound(device_id, command_id)
        return command

    async def page(
        self, device_id: str, listing: Listing, limit: int, cursor: str | None
    ) -> tuple[list[Command], str | None]:
        """The device's commands, newest first, from the pending set, the done set or both.

        A page reads at most `limit` + 1 entries of each set per round, and a few rounds when
        records that expired leave holes in the done set (those entries are dropped)."""
        below = _decode_cursor(cursor)
        k = self.keys
        sets = {
            "pending": [k.commands_pending(device_id)],
            "done": [k.commands_done(device_id)],
            "all": [k.commands_pending(device_id), k.commands_done(device_id)],
        }[listing]
        found: list[Command] = []
        more = False
        for _ in range(PAGE_ROUNDS):
            entries, more = await self._entries(device_id, sets, below, limit + 1 - len(found))
            if not entries:
                break
            commands, missing = await self._records(device_id, entries)
            found += commands
            below = entries[-1][1]
            if missing:
                await self.redis.zrem(k.commands_done(device_id), *missing)
            if len(found) >= limit or not more:
                break
        page = found[:limit]
        following = len(found) > limit or (more and len(found) == limit)
        return page, _encode_cursor(page[-1].seq) if following and page else None

    async def _entries(
        self, device_id: str, sets: list[str], below: float | None, count: int
    ) -> tuple[list[tuple[str, float]], bool]:
        """(command id, seq) newest first below *below*, merged over *sets*; whether any set
        had more."""
        top = f"({below:.0f}" if below is not None else "+inf"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(self.keys.state(device_id), self.store.fields.device_id)
            for key in sets:
                pipe.zrevrangebyscore(key, top, "-inf", start=0, num=count, withscores=True)
            known, *replies = await pipe.execute()
        if not known:
            raise DeviceNotFound(device_id)
        merged = sorted(
            ((text(member), float(score)) for reply in replies for member, score in reply),
            key=lambda entry: -entry[1],
        )
        more = any(len(reply) == count for reply in replies)
        return merged[:count], more or len(merged) > count

    async def _records(
        self, device_id: str, entries: list[tuple[str, float]]
    ) -> tuple[list[Command], list[str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for command_id, _ in entries:
                pipe.hgetall(self.keys.command(device_id, command_id))
            records = await pipe.execute()
        commands = [
            Command.from_record(command_id, record)
            for (command_id, _), record in zip(entries, records, strict=True)
            if record
        ]
        missing = [cid for (cid, _), record in zip(entries, records, strict=True) if not record]
        return commands, missing

    # --- cancel ---------------------------------------------------------------------
    async def cancel(self, device_id: str, command_id: str) -> Command:
        """Cancel a command that is not final; CommandFinished when it is."""
        if not is_command_id(command_id):
            raise CommandNotFound(device_id, command_id)
        k, part = self.keys, self.keys.of(device_id)
        keys = [
            *part.command_keys, k.commands_pending(device_id), k.commands_done(device_id),
            k.command(device_id, command_id), k.commands(device_id),
        ]  # fmt: skip
        args: list[KeyOrArg] = [*self._finish_args(), device_id, command_id]
        call = Call(self.scripts.command_cancel, keys, args)
        reply = await self.store.write_confirmed(device_id, call)
        code = int(reply[0])
        if code == 0:
            await self.get(device_id, command_id)  # DeviceNotFound when the device is gone
            raise CommandNotFound(device_id, command_id)
        if code == -1:
            raise CommandFinished(command_id, text(reply[1]))
        return await self.require(device_id, command_id)

    # --- results, due commands, re-sync ----------------------------------------------
    def _finish_args(self) -> list[KeyOrArg]:
        settings = self.settings
        return [now_text(), settings.command_retention_s, DONE_MAX, settings.events_maxlen]

    def _grouped(self, device_ids: Sequence[str]) -> dict[int, list[int]]:
        """Indexes of *device_ids* by partition, in order."""
        groups: dict[int, list[int]] = {}
        for index, device_id in enumerate(device_ids):
            groups.setdefault(self.keys.partition(device_id), []).append(index)
        return groups

    def _calls(
        self,
        device_ids: Sequence[str],
        script: Any,
        per_item: Any,
    ) -> tuple[list[tuple[str, Call]], list[list[int]]]:
        """One call per partition and chunk: (its routing device, call) and the indexes it
        covers. *per_item(index)* gives an item's (keys, args)."""
        calls: list[tuple[str, Call]] = []
        covered: list[list[int]] = []
        for partition, indexes in self._grouped(device_ids).items():
            part: Partition = self.keys.part(partition)
            for start in range(0, len(indexes), CHUNK):
                chunk = indexes[start : start + CHUNK]
                keys, args = list(part.command_keys), self._finish_args()
                for index in chunk:
                    item_keys, item_args = per_item(index)
                    keys += item_keys
                    args += item_args
                calls.append((device_ids[chunk[0]], Call(script, keys, args)))
                covered.append(chunk)
        return calls, covered

    async def finish(self, results: Sequence[ResultIn]) -> list[Finished | BaseException]:
        """Apply device results, one call per partition and chunk; per result what it did, or
        the failure of its call (nothing of that call was confirmed)."""
        k = self.keys

        def item(index: int) -> tuple[list[str], list[KeyOrArg]]:
            r = results[index]
            keys = [
                k.commands_pending(r.device_id), k.commands_done(r.device_id),
                k.command(r.device_id, r.command_id), k.commands(r.device_id),
            ]  # fmt: skip
            error = orjson.dumps(r.error) if r.error is not None else b""
            return keys, [r.device_id, r.command_id, r.status, r.result, error]

        ids = [r.device_id for r in results]
        calls, covered = self._calls(ids, self.scripts.command_result, item)
        replies = await self.store.write_many_confirmed(calls)
        out: list[Finished | BaseException] = [RuntimeError("not run")] * len(results)
        for chunk, reply in zip(covered, replies, strict=True):
            for position, index in enumerate(chunk):
                if isinstance(reply, BaseException):
                    out[index] = reply
                    continue
                code, status, created, sent = reply[position]
                out[index] = Finished(int(code), text(status), _float(created), _float(sent))
        return out

    async def expire(self, due: Sequence[tuple[str, str]]) -> list[tuple[str, int, bool] | None]:
        """Act on commands whose due time may have come: per command (status after, epoch ms
        it is due next or 0 for never, whether this call changed it), or None when its call
        failed (try again later)."""
        k = self.keys

        def item(index: int) -> tuple[list[str], list[KeyOrArg]]:
            device_id, command_id = due[index]
            keys = [
                k.state(device_id), k.heartbeat(device_id), k.commands_pending(device_id),
                k.commands_done(device_id), k.command(device_id, command_id),
                k.commands(device_id),
            ]  # fmt: skip
            return keys, [device_id, command_id]

        calls, covered = self._calls([d for d, _ in due], self.scripts.command_expire, item)
        replies = await self.store.write_many_confirmed(calls)
        out: list[tuple[str, int, bool] | None] = [None] * len(due)
        for chunk, reply in zip(covered, replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            for position, index in enumerate(chunk):
                status, due_ms, changed = reply[position]
                out[index] = (text(status), int(due_ms), bool(changed))
        return out

    async def claim(self, sessions: Sequence[tuple[str, str]]) -> list[list[bytes]]:
        """Send each live session its device's pending commands again (after this process
        may have missed messages); per session the frames, oldest first."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for device_id, _ in sessions:
                pipe.exists(k.commands_pending(device_id))
            pending = await pipe.execute()
        wanted = [s for s, has in zip(sessions, pending, strict=True) if has]
        if not wanted:
            return [[] for _ in sessions]

        def item(index: int) -> tuple[list[str], list[KeyOrArg]]:
            device_id, session = wanted[index]
            keys = [
                k.state(device_id), k.commands_pending(device_id), k.commands_done(device_id),
                k.commands(device_id),
            ]  # fmt: skip
            return keys, [device_id, session, k.command_base(device_id)]

        calls, covered = self._calls([d for d, _ in wanted], self.scripts.command_claim, item)
        replies = await self.store.write_many_confirmed(calls)
        frames: dict[tuple[str, str], list[bytes]] = {}
        for chunk, reply in zip(covered, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            for position, index in enumerate(chunk):
                frames[wanted[index]] = [bytes(frame) for frame in reply[position]]
        return [frames.get(session, []) for session in sessions]

    async def due_heads(self, cutoff: float) -> list[tuple[str, str]]:
        """Pending commands due by *cutoff* (epoch seconds), a bounded head per partition."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.zrangebyscore(
                    part.commands_due, "-inf", int(cutoff * 1000), start=0, num=DUE_BATCH
                )
            heads = await pipe.execute()
        due: list[tuple[str, str]] = []
        for head in heads:
            for member in head:
                device_id, slash, command_id = text(member).partition("/")
                if slash:
                    due.append((device_id, command_id))
        return due

    async def counts(self) -> dict[str, int]:
        """Pending commands of the whole fleet by status (queued, sent)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.hgetall(part.commands_counts)
            replies = await pipe.execute()
        totals = {"queued": 0, "sent": 0}
        for reply in replies:
            for status, count in reply.items():
                name = text(status)
                if name in totals:
                    totals[name] += int(count)
        return totals


def _encode_cursor(seq: int) -> str:
    return f"{CURSOR_PREFIX}{seq}"


def _decode_cursor(cursor: str | None) -> float | None:
    if not cursor:
        return None
    digits = cursor[len(CURSOR_PREFIX) :]
    if not cursor.startswith(CURSOR_PREFIX) or not digits.isdigit() or len(digits) > 19:
        raise InvalidCursor("not a cursor of this device's commands")
    return float(digits)
