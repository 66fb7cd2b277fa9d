"""Cross-node delivery on a Valkey/Redis Cluster: sharded pub/sub, one connection per primary.

A device's command channel and its partition's control and probe channels share the
partition's hash tag, so they live in one slot: a partition's subscriptions go to the primary
that owns that slot, in one `SSUBSCRIBE` per 1,000 channels. Every primary's connection also
listens to its node's keyspace `expired` events (notifications are per node).

Sharded channels move with their slot. The server says so (an unsolicited `sunsubscribe`) when
a slot migrates; a dead primary drops its connection; and so that no subscription is ever
silently dead, every partition with local devices is probed: this process publishes on its own
probe channel there every few seconds and must hear itself. Each of these makes the broker
converge again: refresh the topology, one link per primary, every partition on its owner.
Devices of a partition placed again are re-synced (`on_resubscribed`): whatever was published
while nobody listened is read back from Redis and sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from gateway.broker import Deliveries, Resubscribed
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.redisconn import NO_RETRY

log = logging.getLogger("gateway.broker")

SUBSCRIBE_CHUNK = 1000
PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 3.0
TOPOLOGY_CHECK = 10.0
BACKOFF_MIN = 0.1
# a topology read is cheap and a failover's replica is promoted within seconds: retry at
# least twice a second, so devices get their changes soon after the promotion
MAX_BACKOFF = 0.5
READ_TIMEOUT = 1.0
CONFIRM_TIMEOUT = 5.0
# RedisClusterException is no RedisError: a topology read in the middle of a failover raises
# it (no reachable node, slots not covered), and it must be retried like any other failure
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


@dataclass
class _Link:
    """One pub/sub connection to one primary and the task that reads it."""

    node: str
    client: Redis
    pubsub: PubSub
    reader: asyncio.Task[None] | None = None
    partitions: set[int] = field(default_factory=set)


class ClusterBroker:
    """The cluster's counterpart of `Broker`: the same calls, the same handlers."""

    def __init__(
        self,
        cluster: RedisCluster,
        keys: Keys,
        deliveries: Deliveries,
        on_resubscribed: Resubscribed,
        probe_interval: float = PROBE_INTERVAL,
        metrics: Metrics | None = None,
    ) -> None:
        self.cluster = cluster
        self.keys = keys
        self.deliveries = deliveries
        self.on_resubscribed = on_resubscribed
        self.probe_interval = probe_interval
        self.metrics = metrics or Metrics()
        self.process = secrets.token_hex(6)
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._wanted: dict[int, set[str]] = {}  # partition → local devices
        self._live: dict[int, set[str]] = {}  # partition → device channels subscribed
        self._placed: dict[int, str] = {}  # partition → the node its channels are on
        self._lost: set[int] = set()  # partitions that lost their subscriptions: re-sync
        # placed partitions whose last SSUBSCRIBE (its probe channel) the server confirmed
        self._confirmed: set[int] = set()
        self._confirmation = asyncio.Event()
        self._links: dict[str, _Link] = {}
        self._changed: set[int] = set()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._probes: dict[int, tuple[str, float]] = {}  # partition → (nonce, deadline)
        self._nonces = itertools.count(1)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._expired = keys.expired_channel(0).encode()
        self._controls = {part.control_channel.encode() for part in keys.parts}
        self._probe_names = {
            part.probe_channel(self.process).encode(): part.number for part in keys.parts
        }

    # --- what the device endpoint calls -------------------------------------------------
    def subscribe_device(self, device_id: str) -> asyncio.Future[None]:
        """Listen to the device's command channel; the future resolves once it is live."""
        partition = self.keys.partition(device_id)
        self._wanted.setdefault(partition, set()).add(device_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if device_id in self._live.get(partition, ()):
            waiter.set_result(None)
        else:
            self._waiters.setdefault(device_id, []).append(waiter)
            self._mark(partition)
        return waiter

    def unsubscribe_device(self, device_id: str) -> None:
        partition = self.keys.partition(device_id)
        self._wanted.get(partition, set()).discard(device_id)
        for waiter in self._waiters.pop(device_id, []):  # nobody waits for it any more
            if not waiter.done():
                waiter.set_result(None)
        self._mark(partition)

    def _mark(self, partition: int) -> None:
        if not self._changed:
            self._events.put_nowait(("changed", None))
        self._changed.add(partition)

    # --- the supervisor ---------------------------------------------------------------
    async def run(self) -> None:
        """Keep every wanted subscription live on the right node until cancelled.

        Nothing else ends it: an error nobody expected is logged, every link dropped and the
        whole placement made again (every local device re-synced). A broker that ended
        quietly would leave the process's devices without any change, Redis holding them."""
        try:
            while True:
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._timers())
                        await self._supervise()
                except Exception:
                    log.exception("cluster pub/sub failed; placing every subscription again")
                    self.reconnects += 1
                    self.metrics.resubscriptions.labels("broker_failed").inc()
                    self.connected.clear()
                    await self._drop_links(set(self._links))
                    await asyncio.sleep(MAX_BACKOFF)
        finally:
            await self._drop_links(set(self._links))

    async def aclose(self) -> None:
        """Close every pub/sub connection (`run` does too when it is cancelled)."""
        await self._drop_links(set(self._links))

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        retry_at: float | None = loop.time()  # when to converge next; None: converged
        while True:
            if retry_at is not None and loop.time() >= retry_at:
                try:
                    done = await self._converge()
                except REDIS_ERRORS as exc:
                    log.warning("cluster pub/sub: %s; trying again in %.1f s", exc, backoff)
                    done = False
                if done:
                    retry_at, backoff = None, BACKOFF_MIN
                    self.connected.set()
                else:
                    retry_at, backoff = loop.time() + backoff, min(backoff * 2, MAX_BACKOFF)
            wait = None if retry_at is None else max(0.0, retry_at - loop.time())
            try:
                async with asyncio.timeout(wait):
                    kind, detail = await self._events.get()
            except TimeoutError:
                continue
            # an event never cancels a convergence still due (a device that connects in the
            # middle of a failover must not leave the dead node's partitions unplaced); one
            # that needs it converges at once, unless a retry is already scheduled
            if await self._handle(kind, detail) and retry_at is None:
                retry_at = loop.time()

    async def _handle(self, kind: str, detail: Any) -> bool:
        """Apply one event; True when the whole placement must be converged again."""
        if kind == "changed":
            partitions, self._changed = self._changed, set()
            try:
                return not await self._place_all(partitions)
            except REDIS_ERRORS as exc:
                log.warning("cluster pub/sub: subscribing failed (%s)", exc)
                return True
        self.reconnects += 1
        self.metrics.resubscriptions.labels(kind).inc()
        if kind == "link_failed":
            log.warning("cluster pub/sub: connection to %s lost", detail)
            await self._drop_links({detail})
        elif kind == "probe_missed":
            log.warning("cluster pub/sub: no probe came back in partition(s) %s", detail)
            await self._drop_links({self._placed[p] for p in detail if p in self._placed})
        else:  # moved (the server dropped our channels of a slot), or the topology changed
            log.info("cluster pub/sub: %s: partitions %s", kind, detail)
            for partition in detail:
                self._forget(partition)
        return True

    async def _converge(self) -> bool:
        """Topology, links, placement; True when every wanted partition is live."""
        await self.cluster.nodes_manager.initialize()
        primaries = {node.name: node for node in self.cluster.get_primaries()}
        await self._drop_links(set(self._links) - set(primaries))
        for name, node in primaries.items():
            if name not in self._links:
                try:
                    await self._open_link(name, node)
                except REDIS_ERRORS as exc:
                    log.warning("cluster pub/sub: cannot reach %s (%s)", name, exc)
        return await self._place_all(set(self._wanted) | set(self._placed) | self._lost)

    async def _place_all(self, partitions: set[int]) -> bool:
        complete = True
        replaced: set[int] = set()
        for partition in sorted(partitions):
            placed = await self._place(partition)
            if placed is None:
                complete = False
            elif partition in self._lost and partition in self._placed:
                replaced.add(partition)
        resync = set().union(*(self._wanted.get(p, set()) for p in replaced))
        if not resync:
            self._lost -= replaced
            return complete
        # the re-sync reads desired states: only once the server confirmed the channels, or
        # a change made between that read and the subscription would be neither read nor sent
        if not await self._until_confirmed(replaced):
            log.warning("cluster pub/sub: partitions %s not confirmed in time", sorted(replaced))
            for partition in replaced - self._confirmed:
                self._forget(partition)  # subscribed afresh, then re-synced, next time
            return False
        self._lost -= replaced
        log.info("cluster pub/sub: re-syncing %d devices whose channels moved", len(resync))
        try:
            await self.on_resubscribed(resync)
        except BaseException:
            self._lost |= replaced  # not re-synced: the next convergence tries again
            raise
        return complete

    async def _until_confirmed(self, partitions: set[int]) -> bool:
        """Wait until the server confirmed every one of *partitions*' subscriptions."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIRM_TIMEOUT
        while not partitions <= self._confirmed:
            self._confirmation.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._confirmation.wait()
            except TimeoutError:
                return partitions <= self._confirmed
        return True

    async def _place(self, partition: int) -> bool | None:
        """One partition's subscriptions in line with its wanted devices, on its owner.

        Returns True when it was (re)placed on a node, False when only devices changed or
        nothing is wanted, None when its owner cannot be reached now.
        """
        wanted = self._wanted.get(partition, set())
        owner = self._owner(partition) if wanted else None
        placed = self._placed.get(partition)
        if placed is not None and placed != owner:
            await self._unplace(partition, placed)
            placed = None
        if owner is None:
            return False
        link = self._links.get(owner)
        if link is None:
            self._lost.add(partition)
            return None
        part = self.keys.part(partition)
        live = self._live.setdefault(partition, set())
        fresh = placed is None
        new = sorted(wanted - live)
        gone = sorted(live - wanted)
        names = [self.keys.commands(device_id) for device_id in new]
        if fresh:
            names += [part.control_channel, part.probe_channel(self.process)]
            # placed before anything is sent: the reader may see the confirmation at once
            self._placed[partition] = owner
            link.partitions.add(partition)
        try:
            for start in range(0, len(names), SUBSCRIBE_CHUNK):
                await link.pubsub.ssubscribe(*names[start : start + SUBSCRIBE_CHUNK])
            for start in range(0, len(gone), SUBSCRIBE_CHUNK):
                chunk = gone[start : start + SUBSCRIBE_CHUNK]
                await link.pubsub.sunsubscribe(*[self.keys.commands(d) for d in chunk])
        except BaseException:
            if fresh:
                self._forget(partition)  # half subscribed: placed afresh next time
            raise
        live.update(new)
        live.difference_update(gone)
        return fresh

    async def _unplace(self, partition: int, node: str) -> None:
        """Leave a partition's channels on *node* (best effort: it may be gone)."""
        live = self._live.get(partition, set())
        part = self.keys.part(partition)
        link = self._links.get(node)
        self._forget(partition)
        if link is None:
            return
        names = [self.keys.commands(d) for d in live]
        names += [part.control_channel, part.probe_channel(self.process)]
        with contextlib.suppress(*REDIS_ERRORS):
            for start in range(0, len(names), SUBSCRIBE_CHUNK):
                await link.pubsub.sunsubscribe(*names[start : start + SUBSCRIBE_CHUNK])

    def _forget(self, partition: int) -> None:
        """Its subscriptions are gone: place it afresh and re-sync its devices."""
        node = self._placed.pop(partition, None)
        link = self._links.get(node) if node else None
        if link is not None:
            link.partitions.discard(partition)
        self._live.pop(partition, None)
        self._probes.pop(partition, None)
        self._confirmed.discard(partition)
        if self._wanted.get(partition):
            self._lost.add(partition)

    def _owner(self, partition: int) -> str:
        slot = key_slot(self.keys.part(partition).base.encode())
        return str(self.cluster.nodes_manager.get_node_from_slot(slot).name)

    # --- links ------------------------------------------------------------------------
    async def _open_link(self, name: str, node: Any) -> None:
        """A pub/sub connection to one node, listening to its expired events; it never
        reconnects by itself (after a failover it would reach the wrong node)."""
        kwargs = dict(node.connection_kwargs) | {"retry": NO_RETRY}
        client = Redis.from_pool(ConnectionPool(connection_class=node.connection_class, **kwargs))
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._expired)
        except BaseException:
            await client.aclose()
            raise
        link = _Link(name, client, pubsub)
        link.reader = asyncio.create_task(self._read(link), name=f"pub/sub {name}")
        self._links[name] = link

    async def _drop_links(self, names: Collection[str]) -> None:
        for name in list(names):
            link = self._links.pop(name, None)
            if link is None:
                continue
            for partition in list(link.partitions):
                self._forget(partition)
            if link.reader is not None:
                link.reader.cancel()
            with contextlib.suppress(Exception):
                await link.pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await link.client.aclose()

    # --- timers -----------------------------------------------------------------------
    async def _timers(self) -> None:
        """Probe every `probe_interval`; compare placement with the topology now and then.

        Nothing may end this loop but cancellation: without it a silent subscription would
        never be found."""
        checked = time.monotonic()
        while True:
            await asyncio.sleep(self.probe_interval / 2)
            now = time.monotonic()
            missed = sorted(p for p, (_, deadline) in self._probes.items() if deadline < now)
            for partition in missed:
                self._probes.pop(partition, None)
            if missed:
                self._events.put_nowait(("probe_missed", missed))
            try:
                await self._send_probes()
                if now - checked > TOPOLOGY_CHECK:
                    checked = now
                    await self._check_topology()
            except REDIS_ERRORS as exc:
                log.debug("cluster pub/sub: probe or topology check failed: %s", exc)
            except Exception:
                log.exception("cluster pub/sub: probe or topology check failed")

    async def _send_probes(self) -> None:
        for partition, node in list(self._placed.items()):
            if partition in self._probes or node not in self._links:
                continue
            nonce = f"{next(self._nonces)}"
            channel = self.keys.part(partition).probe_channel(self.process)
            # its deadline runs from when it was sent: a publish that waited on a failover
            # elsewhere (the calls before it) must not count against this partition's node
            self._probes[partition] = (nonce, math.inf)
            try:
                await self.cluster.execute_command("SPUBLISH", channel, nonce)
            finally:
                if self._probes.get(partition, ("", 0.0))[0] == nonce:
                    deadline = time.monotonic() + self.probe_interval + PROBE_TIMEOUT
                    self._probes[partition] = (nonce, deadline)

    async def _check_topology(self) -> None:
        await self.cluster.nodes_manager.initialize()
        wrong = sorted(p for p, node in self._placed.items() if node != self._owner(p))
        primaries = {node.name for node in self.cluster.get_primaries()}
        if wrong or primaries != set(self._links):
            self._events.put_nowait(("topology", wrong))

    # --- reading ----------------------------------------------------------------------
    async def _read(self, link: _Link) -> None:
        try:
            while True:
                message = await link.pubsub.get_message(timeout=READ_TIMEOUT)
                if message is not None:
                    self._dispatch(link, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection failed: the supervisor converges again
            log.debug("pub/sub link %s failed: %s", link.node, exc)
            self._events.put_nowait(("link_failed", link.node))

    def _dispatch(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel: bytes = message["channel"]
        try:
            if kind == "smessage":
                self._on_shard_message(channel, message["data"])
            elif kind == "message" and channel == self._expired:
                device_id = self.keys.device_from_heartbeat(message["data"].decode())
                if device_id is not None:
                    self.deliveries.on_expired(device_id)
            elif kind == "ssubscribe" and channel in self._probe_names:
                # a placement's last channel: everything sent before it is confirmed too
                partition = self._probe_names[channel]
                if self._placed.get(partition) == link.node:
                    self._confirmed.add(partition)
                    self._confirmation.set()
            elif kind == "ssubscribe":
                device_id = self.keys.device_from_commands(channel.decode())
                for waiter in self._waiters.pop(device_id or "", []):
                    if not waiter.done():
                        waiter.set_result(None)
            elif kind == "sunsubscribe" and channel in link.pubsub.shard_channels:
                # not asked for: its slot moved to another node
                link.pubsub.shard_channels.pop(channel, None)
                moved = sorted(p for p in link.partitions if self._has_channel(p, channel))
                self._events.put_nowait(("moved", moved))
        except Exception:  # one bad message must never stop delivery to everyone else
            log.exception("failed to dispatch a message on %r", channel[:80])

    def _has_channel(self, partition: int, channel: bytes) -> bool:
        return key_slot(channel) == key_slot(self.keys.part(partition).base.encode())

    def _on_shard_message(self, channel: bytes, data: bytes) -> None:
        if channel in self._controls:
            self.deliveries.on_control(data)
            return
        partition = self._probe_names.get(channel)
        if partition is not None:
            expected = self._probes.get(partition)
            if expected is not None and expected[0] == data.decode(errors="replace"):
                del self._probes[partition]
            return
        device_id = self.keys.device_from_commands(channel.decode())
        if device_id is not None:
            self.deliveries.on_command(device_id, data)
