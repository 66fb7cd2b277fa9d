"""`gateway migrate`: the steps from the stored layout to this release's, over every key.

Each step walks every primary with `SCAN … MATCH … TYPE … COUNT batch` (bounded work per
round trip, never a whole-fleet command) and runs the step's script on each key found, one
atomic call per key, pipelined. A dry run (the default) runs the same scripts in counting
mode: it writes nothing, says what would change, and takes about as long as applying would.
With `apply`, where each node's scan has got to is kept in Redis after every batch
(`gateway:layout:migration`, with the node's run id: a cursor means nothing to a restarted or
promoted node, whose scan then starts over); killed at any point, a run started again goes
on from there, and since every script is idempotent the end is the same as one clean run's.
The version is written when every node's scan of a step has ended. Cancelling stops between
batches; what was written stays written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from gateway.keys import Keys, device_key_patterns, device_of_key, layout_migration, layout_version
from gateway.migrate import layout
from gateway.migrate.steps import Step, after
from gateway.scripts import Call, Scripts

Client = Redis | RedisCluster
Say = Callable[[str], None]
DEFAULT_BATCH = 500
REPORT_EVERY = 2.0  # seconds between progress lines


class MigrateRefused(RuntimeError):
    """The migration cannot run as asked: one line saying why and what to do."""


@dataclass
class StepResult:
    step: Step
    examined: int = 0  # keys of the step's kind found
    changed: int = 0  # keys the step converted (or would)
    fields: int = 0  # what the scripts counted (fields moved, …)
    seconds: float = 0.0
    resumed: bool = False
    nodes: dict[str, int] = field(default_factory=dict)  # keys examined per node


@dataclass
class Outcome:
    found: int | None  # the stored layout before (None: nothing the gateway wrote)
    final: int | None
    steps: list[StepResult]


@dataclass
class _Tally:
    """One node's scan of one step: where it is and what it found."""

    cursor: int = 0
    examined: int = 0
    changed: int = 0
    fields: int = 0
    done: bool = False
    resumed: bool = False


class Migration:
    """One run of `gateway migrate` against one deployment (prefix) on a node or a cluster."""

    def __init__(
        self, client: Client, keys: Keys, *, apply: bool, batch: int = DEFAULT_BATCH,
        say: Say = print,
    ) -> None:  # fmt: skip
        if batch < 1:
            raise ValueError("the batch is at least 1 key")
        self.client = client
        self.keys = keys
        self.apply = apply
        self.batch = batch
        self.say = say
        self.scripts = Scripts(keys)
        self._run_ids: dict[str, str] = {}

    async def run(self) -> Outcome:
        found = await layout.stored(self.client, self.keys)
        if found is None:
            self.say(
                "nothing to upgrade: the gateway has not written to this Redis yet (its "
                f"first start writes stored layout {layout.CURRENT})"
            )
            return Outcome(None, None, [])
        if found > layout.CURRENT:
            raise MigrateRefused(layout.newer(found))
        steps = after(found)
        if not steps:
            self.say(f"stored layout {found}: up to date, nothing to do")
            return Outcome(found, found, [])
        self.say(
            f"stored layout {found} → {layout.CURRENT}: {len(steps)} step(s)"
            + ("" if self.apply else " (dry run: nothing is written; --apply upgrades)")
        )
        results: list[StepResult] = []
        current = found
        for step in steps:
            if self.apply and not step.rolling:
                await self.refuse_if_served()
            result = await self.run_step(step)
            results.append(result)
            if self.apply:
                await self.client.set(layout_version(self.keys), step.version)
                await self._forget(step)
                current = step.version
            self.say(self.describe(result))
        if self.apply:
            self.say(f"stored layout is now {current}")
        else:
            total = sum(r.seconds for r in results)
            self.say(
                f"estimate: --apply runs the same scripts and writes, about {total:.1f} s at "
                "this Redis' current load; it can be stopped and run again at any point"
            )
        return Outcome(found, current, results)

    # --- one step --------------------------------------------------------------------
    async def run_step(self, step: Step) -> StepResult:
        result = StepResult(step)
        started = time.perf_counter()
        last_report = started
        for name, node in self.nodes():
            tally = await self._resume(step, name, node)
            result.resumed |= tally.resumed
            while not tally.done:
                tally.cursor, found = await self._scan(node, tally.cursor, step)
                device_keys = [key for key in found if device_of_key(self.keys, step.kind, key)]
                tally.examined += len(device_keys)
                if device_keys:
                    script = getattr(self.scripts, step.script)
                    flag = "1" if self.apply else ""
                    calls = [Call(script, [key], [flag, *step.args]) for key in device_keys]
                    counts = [int(count) for count in await Scripts.run_many(self.client, calls)]
                    tally.changed += sum(1 for count in counts if count > 0)
                    tally.fields += sum(counts)
                tally.done = tally.cursor == 0
                if self.apply:
                    await self._save(step, name, node, tally)
                    if not step.rolling and not tally.done:
                        await self.refuse_if_served()
                now = time.perf_counter()
                if now - last_report >= REPORT_EVERY:
                    last_report = now
                    examined = result.examined + tally.examined
                    self.say(f"  … {examined:,} keys examined on {len(result.nodes) + 1} "
                             f"node(s) so far")  # fmt: skip
            result.nodes[name] = tally.examined
            result.examined += tally.examined
            result.changed += tally.changed
            result.fields += tally.fields
        result.seconds = time.perf_counter() - started
        return result

    def describe(self, result: StepResult) -> str:
        step = result.step
        verb = "converted" if self.apply else "would convert"
        again = " (went on from an interrupted run)" if result.resumed else ""
        return (
            f"step {step.version}: {step.title}\n"
            f"  {result.examined:,} {step.kind} keys examined, {verb} {result.changed:,} "
            f"({result.fields:,} changes), {result.seconds:.1f} s{again}"
        )

    # --- nodes, scans, progress -----------------------------------------------------
    def nodes(self) -> list[tuple[str, ClusterNode | None]]:
        if isinstance(self.client, RedisCluster):
            primaries = sorted(self.client.get_primaries(), key=lambda node: node.name)
            return [(node.name, node) for node in primaries]
        return [("node", None)]

    async def _scan(
        self, node: ClusterNode | None, cursor: int, step: Step
    ) -> tuple[int, list[str]]:
        pattern = device_key_patterns(self.keys)[step.kind]
        if node is None:
            assert isinstance(self.client, Redis)
            reply: Any = await self.client.scan(
                cursor, match=pattern, count=self.batch, _type=step.redis_type
            )
        else:
            assert isinstance(self.client, RedisCluster)
            command = ("SCAN", cursor, "MATCH", pattern, "COUNT", self.batch, "TYPE",
                       step.redis_type)  # fmt: skip
            reply = await self.client.execute_command(*command, target_nodes=node)
            cursors, names = reply  # redis-py's cluster client gives cursors by node name
            (next_cursor,) = cursors.values()
            return int(next_cursor), [n.decode() if isinstance(n, bytes) else n for n in names]
        next_cursor, names = reply
        return int(next_cursor), [n.decode() if isinstance(n, bytes) else n for n in names]

    async def _run_id(self, node: ClusterNode | None) -> str:
        """The node's run id: a new one after every restart (and another on a promoted
        replica), when a SCAN cursor of before means nothing."""
        name = "node" if node is None else node.name
        if name in self._run_ids:
            return self._run_ids[name]
        if node is None:
            info: Any = await self.client.info("server")
        else:
            assert isinstance(self.client, RedisCluster)
            info = await self.client.info("server", target_nodes=node)
        self._run_ids[name] = str(info.get("run_id", ""))
        return self._run_ids[name]

    async def _forget(self, step: Step) -> None:
        """Drop a finished step's progress (nodes that failed over since included)."""
        name = layout_migration(self.keys)
        prefix = f"{step.version} "
        stale = [f for f in (_text(raw) for raw in await self.client.hkeys(name))
                 if f.startswith(prefix)]  # fmt: skip
        if stale:
            await self.client.hdel(name, *stale)

    async def _resume(self, step: Step, name: str, node: ClusterNode | None) -> _Tally:
        """Where this node's scan got to in an interrupted run (none: from the start)."""
        if not self.apply:
            return _Tally()
        raw = await self.client.hget(layout_migration(self.keys), f"{step.version} {name}")
        if raw is None:
            return _Tally()
        run_id, *numbers = _text(raw).split()
        if run_id != await self._run_id(node):
            return _Tally()  # restarted or promoted since: its cursor means nothing now
        cursor, examined, changed, moved, done = (int(number) for number in numbers)
        return _Tally(cursor, examined, changed, moved, bool(done), resumed=True)

    async def _save(self, step: Step, name: str, node: ClusterNode | None, tally: _Tally) -> None:
        numbers = (tally.cursor, tally.examined, tally.changed, tally.fields, int(tally.done))
        value = " ".join([await self._run_id(node), *(str(number) for number in numbers)])
        await self.client.hset(layout_migration(self.keys), f"{step.version} {name}", value)

    # --- the guard ------------------------------------------------------------------
    async def listeners(self) -> int:
        """Subscriptions to the gateway's control channels: every running gateway process
        listens to its deployment's (on a cluster, of each partition it holds devices of)."""
        if isinstance(self.client, RedisCluster):
            total = 0
            for part in self.keys.parts:
                node = self.client.get_node_from_key(part.control_channel)
                reply = await self.client.execute_command(
                    "PUBSUB", "SHARDNUMSUB", part.control_channel, target_nodes=node
                )
                total += int(reply[1])
            return total
        counts = await self.client.pubsub_numsub(self.keys.parts[0].control_channel)
        return sum(int(count) for _, count in counts)

    async def refuse_if_served(self) -> None:
        count = await self.listeners()
        if count:
            raise MigrateRefused(
                f"{count} gateway process subscription(s) to this deployment's control channel: "
                "gateway processes still serve this data, and this step renames what they read "
                "and write; stop every gateway process, then run `gateway migrate --apply` "
                "again (it goes on where it stopped)"
            )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
