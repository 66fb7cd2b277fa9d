"""Faults on a real Valkey Cluster, under load: a primary killed, slots moved, a subscription
gone silent. Each test starts its own cluster (3 primaries, 3 replicas) so it can break it.

What must hold: the killed primary's replica takes over; no device is reported offline; every
desired change the API accepted reaches its device (re-sent where pub/sub lost it); dashboards
get every event, or an explicit fresh start, never a silent hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from live import ADMIN_KEY, LiveGateway, live_gateway
from redis.crc import key_slot

from gateway.client import DeviceClient
from gateway.config import Settings
from gateway.devcluster import LocalCluster, Node
from gateway.embedded import valkey_executable
from gateway.keys import Keys
from gateway.redisconn import connect_cluster
from gateway.scripts import Scripts
from gateway.store import REPLICA_WAIT_MS, Store

DEVICES = 24
HEARTBEAT_TIMEOUT = 6.0
FAILOVER_WITHIN = 15.0
SETTLE = 15.0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(tmp_path / "cluster") as local:
        yield local


@pytest.fixture
async def gw(cluster: LocalCluster) -> AsyncIterator[LiveGateway]:
    async with live_gateway(
        cluster.url, heartbeat_timeout=HEARTBEAT_TIMEOUT, sweep_interval=0.5
    ) as gateway:
        yield gateway


class Fleet:
    """Devices that heartbeat every second and keep what desired states they were sent."""

    def __init__(self, gw: LiveGateway) -> None:
        self.gw = gw
        self.desired: dict[str, dict[str, Any]] = {}
        self.clients: list[DeviceClient] = []

    async def start(self, count: int) -> None:
        async with self.gw.client() as api:
            for n in range(count):
                device_id = f"f-{n:03d}"
                reply = await api.post(
                    "/api/devices", json={"device_id": device_id, "device_type": "meter"}
                )
                assert reply.status_code == 201, reply.text
                client = DeviceClient(
                    self.gw.ws_url, device_id, reply.json()["token"], heartbeat_fraction=1 / 6,
                    on_desired=self._recorder(device_id), backoff_min=0.05, backoff_max=0.5,
                )  # fmt: skip
                await client.__aenter__()
                self.clients.append(client)

    def _recorder(self, device_id: str) -> Any:
        def on_desired(desired: dict[str, Any], delta: dict[str, Any]) -> None:
            self.desired[device_id] = desired

        return on_desired

    async def stop(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))


class Changes:
    """Desired changes made through the API in a loop, each a new key, retried until accepted."""

    def __init__(self, api: httpx.AsyncClient, device_ids: list[str]) -> None:
        self.api = api
        self.device_ids = device_ids
        self.accepted: dict[str, set[str]] = {d: set() for d in device_ids}
        self.refused = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            device_id = self.device_ids[n % len(self.device_ids)]
            key = f"k{n}"
            while True:
                try:
                    reply = await self.api.patch(
                        f"/api/devices/{device_id}/desired", json={"state": {key: n}}
                    )
                    if reply.status_code == 200:
                        self.accepted[device_id].add(key)
                        break
                    # 503 while the failover runs: made later, not lost
                    assert reply.status_code == 503, reply.text
                    self.refused += 1
                except httpx.HTTPError:
                    self.refused += 1
                await asyncio.sleep(0.05)
            n += 1
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()


class Watcher:
    """A dashboard that records every event and every fresh start."""

    def __init__(self, gw: LiveGateway) -> None:
        self.gw = gw
        self.events: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.closes: list[int] = []

    async def run(self) -> None:
        url = f"{self.gw.ws_url}/ws/dashboard?token={ADMIN_KEY}"
        cursor: str | None = None
        while True:
            try:
                async with websockets.connect(
                    url, origin=websockets.Origin(self.gw.base_url)
                ) as ws:
                    async for raw in ws:
                        frame = orjson.loads(raw)
                        if frame["type"] == "snapshot":
                            self.snapshots.append(frame)
                            if cursor is not None:
                                await ws.send(
                                    orjson.dumps({"type": "resume", "after": cursor}).decode()
                                )
                            cursor = frame["cursor"]
                        elif frame["type"] == "events":
                            self.events += frame["events"]
                            if not frame.get("replay"):
                                cursor = frame["cursor"]
            except websockets.ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else 1006)
            except OSError:
                self.closes.append(1006)
            await asyncio.sleep(0.1)

    def offline(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "presence" and e["status"] == "offline"]


async def busiest_primary(cluster: LocalCluster, device_ids: list[str]) -> Node:
    """The primary that holds the most of the devices' partitions."""
    client = connect_cluster(cluster.url)
    await client.initialize()
    try:
        from gateway.keys import Keys

        keys = Keys.cluster()
        counts: dict[str, int] = {}
        for device_id in device_ids:
            node = client.get_node_from_key(keys.state(device_id))
            counts[node.name] = counts.get(node.name, 0) + 1
    finally:
        await client.aclose()
    name = max(counts, key=lambda n: counts[n])
    return next(node for node in cluster.nodes if node.address == name)


async def wait_failover(cluster: LocalCluster, lost: Node) -> float:
    """Seconds until the other nodes count a full set of primaries again and serve every
    slot (the lost node is never asked: it may be hung)."""
    took = await cluster.wait_promoted(lost, FAILOVER_WITHIN)
    if took is None:
        pytest.fail("the lost primary's replica was not promoted")
    return took


async def test_a_primary_killed_under_load_loses_nothing(
    cluster: LocalCluster, gw: LiveGateway
) -> None:
    fleet = Fleet(gw)
    await fleet.start(DEVICES)
    watcher = Watcher(gw)
    watching = asyncio.create_task(watcher.run())
    async with gw.client() as api:
        changes = Changes(api, [c.device_id for c in fleet.clients])
        changing = asyncio.create_task(changes.run())
        try:
            await asyncio.sleep(2)
            victim = await busiest_primary(cluster, changes.device_ids)
            cluster.kill(victim)
            took = await wait_failover(cluster, victim)
            print(f"\n[measured] replica promoted {took:.1f} s after kill -9")
            await asyncio.sleep(3)
        finally:
            changes.stop()
            await changing
        # every accepted change, before, during and after, reaches its device
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            missing = {
                d: keys - set(fleet.desired.get(d, {})) for d, keys in changes.accepted.items()
            }
            if not any(missing.values()):
                break
            await asyncio.sleep(0.2)
        stored = {
            d: (await api.get(f"/api/devices/{d}")).json()["desired_state"]
            for d in changes.device_ids
        }
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    await fleet.stop()
    lost_in_redis = {d: keys - set(stored[d]) for d, keys in changes.accepted.items()}
    assert not any(lost_in_redis.values()), f"accepted changes lost by Redis: {lost_in_redis}"
    assert not any(missing.values()), f"accepted changes that never reached the device: {missing}"
    accepted = sum(len(keys) for keys in changes.accepted.values())
    print(f"[measured] {accepted} changes accepted, {changes.refused} refused during failover")
    assert watcher.offline() == [], "a device was reported offline by the failover"
    # the dashboard saw every presence event once, or was told to start over
    ids = [e["id"] for e in watcher.events]
    assert len(ids) == len(set(ids)) or len(watcher.snapshots) > 1


async def node_id(node: Node) -> str:
    async with node.client() as client:
        return str((await client.execute_command("CLUSTER", "MYID")).decode())  # type: ignore[no-untyped-call]


async def test_slots_moved_under_load_lose_nothing(cluster: LocalCluster, gw: LiveGateway) -> None:
    fleet = Fleet(gw)
    await fleet.start(DEVICES)
    watcher = Watcher(gw)
    watching = asyncio.create_task(watcher.run())
    source, target = cluster.nodes[0], cluster.nodes[1]
    async with gw.client() as api:
        changes = Changes(api, [c.device_id for c in fleet.clients])
        changing = asyncio.create_task(changes.run())
        try:
            await asyncio.sleep(1)
            cli = Path(valkey_executable()).with_name("valkey-cli")
            moving = await asyncio.create_subprocess_exec(
                str(cli), "--cluster", "reshard", source.address,
                "--cluster-from", await node_id(source), "--cluster-to", await node_id(target),
                "--cluster-slots", "3000", "--cluster-yes",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await moving.communicate()
            assert moving.returncode == 0, output.decode()[-2000:]
            await asyncio.sleep(3)
        finally:
            changes.stop()
            await changing
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            missing = {
                d: keys - set(fleet.desired.get(d, {})) for d, keys in changes.accepted.items()
            }
            if not any(missing.values()):
                break
            await asyncio.sleep(0.2)
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    await fleet.stop()
    assert not any(missing.values()), f"accepted changes that never reached the device: {missing}"
    moved = gw.gateway.broker.reconnects
    print(f"\n[measured] 3000 slots moved; broker re-placed subscriptions {moved} time(s)")
    assert watcher.offline() == []


async def test_a_subscription_gone_silent_is_found_by_its_probe(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A primary that hangs (SIGSTOP) keeps its connections open and silent: only the probe
    (or the topology check) can tell its subscriptions are dead once its replica took over."""
    async with live_gateway(
        cluster.url, heartbeat_timeout=HEARTBEAT_TIMEOUT, sweep_interval=0.5,
        pubsub_probe_interval=0.5,
    ) as gw:  # fmt: skip
        fleet = Fleet(gw)
        await fleet.start(DEVICES)
        victim = await busiest_primary(cluster, [c.device_id for c in fleet.clients])
        assert victim.process is not None
        victim.process.send_signal(signal.SIGSTOP)
        try:
            took = await wait_failover(cluster, victim)
            async with gw.client() as api:
                changes = Changes(api, [c.device_id for c in fleet.clients])
                changing = asyncio.create_task(changes.run())
                await asyncio.sleep(2)
                changes.stop()
                await changing
            deadline = time.monotonic() + SETTLE
            while time.monotonic() < deadline:
                missing = {
                    d: keys - set(fleet.desired.get(d, {})) for d, keys in changes.accepted.items()
                }
                if not any(missing.values()):
                    break
                await asyncio.sleep(0.2)
            assert not any(missing.values()), f"changes lost after the hang: {missing}"
            found = {
                reason: gw.gateway.metrics.registry.get_sample_value(
                    "gateway_pubsub_resubscriptions_total", {"reason": reason}
                )
                for reason in ("probe_missed", "topology", "link_failed", "moved")
            }
            assert (found["probe_missed"] or 0) + (found["topology"] or 0) >= 1, found
            print(f"\n[measured] hung primary replaced after {took:.1f} s; found by {found}")
        finally:
            victim.process.send_signal(signal.SIGCONT)
            await fleet.stop()


async def test_an_accepted_desired_change_waited_for_a_replica_of_its_own_write(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """WAIT counts the writes of the connection it runs on. Sent on its own, it may run on
    another of the process's connections and return at once; sent with the write, a replica
    that has not got the write holds the answer back (and the gateway says so)."""
    client = connect_cluster(cluster.url)
    await client.initialize()
    keys = Keys.cluster()
    store = Store(client, Settings(), keys, Scripts(keys))
    try:
        await store.register("w-1", "meter", {})
        primary = client.get_node_from_key(keys.state("w-1"))
        async with next(n for n in cluster.nodes if n.port == primary.port).client() as direct:
            role = await direct.execute_command("ROLE")  # type: ignore[no-untyped-call]
        replica_port = int(role[2][0][1])
        # idle connections to that primary: a command on its own takes any one of them
        await asyncio.gather(
            *(client.execute_command("PING", target_nodes=primary) for _ in range(6))
        )
        await store.patch_section("w-1", "desired", {"a": 1})  # a replica confirms at once
        assert "no replica" not in caplog.text
        stopped = next(node for node in cluster.nodes if node.port == replica_port)
        assert stopped.process is not None
        stopped.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            await store.patch_section("w-1", "desired", {"a": 2})
            waited = time.monotonic() - started
        finally:
            stopped.process.send_signal(signal.SIGCONT)
        assert waited >= REPLICA_WAIT_MS / 1000 * 0.9, waited
        assert f"no replica of {primary.name} confirmed a write" in caplog.text
        assert (await store.require("w-1")).desired_state == {"a": 2}
    finally:
        await client.aclose()


async def test_a_resync_read_before_a_newer_change_arrived_never_takes_it_back(
    cluster_url: str,
) -> None:
    """A re-sync reads the desired states after the channels are live again; a change
    published right after that read is delivered by pub/sub while the re-sync still runs, so
    the state it read is older than the one the device holds by the time it is sent. Sent,
    it took the newest change back (the device kept the older state, its last changes lost,
    with Redis holding them all)."""
    async with live_gateway(cluster_url, heartbeat_timeout=HEARTBEAT_TIMEOUT) as gw:
        token = await gw.register("rs-1")
        got: list[dict[str, Any]] = []
        both = asyncio.Event()

        def on_desired(desired: dict[str, Any], delta: dict[str, Any]) -> None:
            got.append(desired)
            if desired == {"a": 1, "b": 2}:
                both.set()

        async with DeviceClient(gw.ws_url, "rs-1", token, on_desired=on_desired) as device:
            async with gw.client() as api:
                reply = await api.patch("/api/devices/rs-1/desired", json={"state": {"a": 1}})
                assert reply.status_code == 200, reply.text
                # what a re-sync notes and reads, an instant before the next change is made
                session = gw.gateway.hub.sessions["rs-1"]
                seen = session.desired_seen
                read = await gw.gateway.core.store.desired_states(["rs-1"])
                reply = await api.patch("/api/devices/rs-1/desired", json={"state": {"b": 2}})
                assert reply.status_code == 200, reply.text
            await asyncio.wait_for(both.wait(), 5)
            # the re-sync now sends what it read: nothing, as the device has newer
            assert not gw.gateway.hub.resync_one(session, *read[0], seen)
            await asyncio.sleep(0.3)
            assert device.desired == {"a": 1, "b": 2}
            assert got[-1] == {"a": 1, "b": 2}
            # a state really missed (its message lost) is still sent
            session.desired = {"a": 1}
            seen = session.desired_seen
            fresh = await gw.gateway.core.store.desired_states(["rs-1"])
            assert gw.gateway.hub.resync_one(session, *fresh[0], seen)
            await wait_for_desired(got, {"a": 1, "b": 2}, 2)


async def test_a_device_connecting_mid_failover_does_not_stop_the_broker_converging(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the dead primary's replica is not promoted yet, the broker retries placing that
    node's partitions. A subscription made meanwhile (a device connecting to another node)
    ended those retries: the partitions stayed unsubscribed, their devices got nothing
    until a periodic topology check happened to notice (here: never)."""
    from gateway import broker_cluster

    monkeypatch.setattr(broker_cluster, "TOPOLOGY_CHECK", 3600.0)
    async with live_gateway(
        cluster.url, heartbeat_timeout=HEARTBEAT_TIMEOUT, sweep_interval=0.5
    ) as gw:  # fmt: skip
        fleet = Fleet(gw)
        await fleet.start(12)
        ids = [c.device_id for c in fleet.clients]
        victim = await busiest_primary(cluster, ids)
        broker = gw.gateway.broker
        assert isinstance(broker, broker_cluster.ClusterBroker)
        client = connect_cluster(cluster.url)
        await client.initialize()
        keys = Keys.cluster()
        try:
            on_victim = [d for d in ids if node_of(client, keys, d) == victim.address]
            elsewhere = next(
                f"late-{n}"
                for n in range(1000)
                if node_of(client, keys, f"late-{n}") != victim.address
            )
        finally:
            await client.aclose()
        cluster.kill(victim)
        # the broker noticed: the dead node's partitions wait for their new owner
        await until(lambda: bool(broker._lost), 5)
        token = await gw.register(elsewhere)  # its key lives on a node still up
        async with DeviceClient(gw.ws_url, elsewhere, token, backoff_min=0.05, backoff_max=0.5):
            await wait_failover(cluster, victim)
            async with gw.client() as api:
                target = on_victim[0]
                while True:
                    reply = await api.patch(
                        f"/api/devices/{target}/desired", json={"state": {"after": 1}}
                    )
                    if reply.status_code == 200:
                        break
                    assert reply.status_code == 503, reply.text
                    await asyncio.sleep(0.05)
            await until(lambda: "after" in fleet.desired.get(target, {}), 8)
            assert "after" in fleet.desired.get(target, {}), (
                f"a change after the failover never reached {target}; still lost: {broker._lost}"
            )
        await fleet.stop()


def node_of(client: Any, keys: Keys, device_id: str) -> str:
    """The address of the primary that holds *device_id*'s shadow."""
    return str(client.get_node_from_key(keys.state(device_id)).name)


async def until(condition: Any, within: float) -> None:
    """Poll *condition* until it holds or *within* seconds pass (the caller asserts)."""
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def wait_for_desired(
    got: list[dict[str, Any]], wanted: dict[str, Any], within: float
) -> None:
    await until(lambda: bool(got) and got[-1] == wanted, within)
    assert got[-1] == wanted


async def test_a_topology_read_that_fails_with_a_cluster_error_does_not_end_the_broker(
    cluster: LocalCluster,
) -> None:
    """redis-py raises RedisClusterException, no RedisError, when no node reports every slot
    covered (as in a failover seen halfway). The broker took only RedisErrors for failures
    to retry: this one ended it, quietly, and with it every subscription of the process:
    every device got nothing more while Redis held every change."""
    async with live_gateway(
        cluster.url, heartbeat_timeout=HEARTBEAT_TIMEOUT, sweep_interval=0.5
    ) as gw:  # fmt: skip
        fleet = Fleet(gw)
        await fleet.start(6)
        keys = Keys.cluster()
        used = {key_slot(part.base.encode()) for part in keys.parts}
        owner = (await cluster.primary_nodes())[0]
        async with owner.client() as direct:
            ranges = await direct.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            mine = next(r for r in ranges if int(r[2][1]) == owner.port)
            slot = -1
            for candidate in range(int(mine[0]), int(mine[1]) + 1):
                if candidate in used:
                    continue
                count = await direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", candidate)  # type: ignore[no-untyped-call]
                if count == 0:
                    slot = candidate
                    break
        live = [n for n in cluster.nodes if n.pid is not None]
        for node in live:  # no node reports that slot any more
            async with node.client() as client:
                await client.execute_command("CLUSTER", "DELSLOTS", slot)  # type: ignore[no-untyped-call]
        try:
            for node in live:  # the broker's links drop: it reads the topology again, and fails
                async with node.client() as client:
                    await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
            await asyncio.sleep(2)
        finally:
            async with owner.client() as client:
                await client.execute_command("CLUSTER", "ADDSLOTS", slot)  # type: ignore[no-untyped-call]
        await cluster.wait_healthy()
        async with gw.client() as api:
            for client in fleet.clients:
                reply = await api.patch(
                    f"/api/devices/{client.device_id}/desired", json={"state": {"back": 1}}
                )
                assert reply.status_code == 200, reply.text
        ids = [c.device_id for c in fleet.clients]
        await until(lambda: all("back" in fleet.desired.get(d, {}) for d in ids), 10)
        missing = [d for d in ids if "back" not in fleet.desired.get(d, {})]
        assert not missing, f"changes never delivered after the cluster error: {missing}"
        await fleet.stop()
