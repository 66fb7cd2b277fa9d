"""The cluster loss loop: many short runs, each with a primary killed under load, each checking
that every desired change the API accepted reached its device.

One lost change in a dozen runs is invisible to a single test, so this repeats the run
(`CLUSTER_SOAK_RUNS`, 30 by default) on a fresh 3+3 cluster each time and counts. It is slow
(about 20 s a run): `pytest --run-slow tests/test_cluster_soak.py`. With `CLUSTER_SOAK_OUT`
set, the counts and the failover timeline of every run are written there as JSON.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from live import LiveGateway, live_gateway
from test_cluster_faults import busiest_primary

from gateway.client import DeviceClient
from gateway.config import StartupError
from gateway.devcluster import LocalCluster
from gateway.keys import Keys
from gateway.redisconn import connect_cluster
from loadtest import results, stats

RUNS = int(os.environ.get("CLUSTER_SOAK_RUNS", "30"))
DEVICES = int(os.environ.get("CLUSTER_SOAK_DEVICES", "48"))
HEARTBEAT_TIMEOUT = 6.0
FAILOVER_WITHIN = 15.0
SETTLE = 15.0
AFTER_PROMOTION = 3.0


class TimedFleet:
    """Devices that keep the desired state they were last sent, and when each key arrived."""

    def __init__(self, gw: LiveGateway) -> None:
        self.gw = gw
        self.desired: dict[str, dict[str, Any]] = {}
        self.arrived: dict[str, float] = {}  # key → first time a device held it
        self.clients: list[DeviceClient] = []

    async def start(self, count: int) -> None:
        async with self.gw.client() as api:
            for n in range(count):
                device_id = f"s-{n:03d}"
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
            now = time.monotonic()
            for key in desired:
                self.arrived.setdefault(key, now)

        return on_desired

    async def stop(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))


@dataclass
class Change:
    device_id: str
    key: str
    first_try: float
    accepted: float | None = None


class TimedChanges:
    """Desired changes through the API in a loop, each a new key, retried until accepted."""

    def __init__(self, api: httpx.AsyncClient, device_ids: list[str]) -> None:
        self.api = api
        self.device_ids = device_ids
        self.changes: list[Change] = []
        self.refused = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            change = Change(self.device_ids[n % len(self.device_ids)], f"k{n}", time.monotonic())
            while True:
                try:
                    reply = await self.api.patch(
                        f"/api/devices/{change.device_id}/desired",
                        json={"state": {change.key: n}},
                    )
                    if reply.status_code == 200:
                        change.accepted = time.monotonic()
                        self.changes.append(change)
                        break
                    assert reply.status_code == 503, reply.text  # the failover: made later
                    self.refused += 1
                except httpx.HTTPError:
                    self.refused += 1
                await asyncio.sleep(0.05)
            n += 1
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Run:
    """One run's counts and its failover timeline (seconds after the kill)."""

    accepted: int = 0
    refused: int = 0
    missing: int = 0
    missing_devices: int = 0
    missing_on_killed_primary: int = 0
    promoted_s: float | None = None
    first_accepted_after_kill_s: float | None = None  # on the killed primary's devices
    first_delivered_on_killed_primary_s: float | None = None
    # made while the primary was down, on its devices: first try → on the device (ms)
    latencies_ms: list[float] = field(default_factory=list)
    failover_latencies_ms: list[float] = field(default_factory=list)
    broker_reconnects: int = 0


async def killed_primary_devices(cluster: LocalCluster, name: str, ids: list[str]) -> set[str]:
    client = connect_cluster(cluster.url)
    await client.initialize()
    try:
        keys = Keys.cluster()
        nodes = {d: client.get_node_from_key(keys.state(d)) for d in ids}
        return {d for d, node in nodes.items() if node is not None and node.name == name}
    finally:
        await client.aclose()


async def one_run(tmp: Path) -> Run:
    run = Run()
    async with (
        LocalCluster(tmp / "cluster") as cluster,
        live_gateway(cluster.url, heartbeat_timeout=HEARTBEAT_TIMEOUT, sweep_interval=0.5) as gw,
    ):
        fleet = TimedFleet(gw)
        await fleet.start(DEVICES)
        ids = [c.device_id for c in fleet.clients]
        async with gw.client() as api:
            changes = TimedChanges(api, ids)
            changing = asyncio.create_task(changes.run())
            try:
                await asyncio.sleep(2)
                victim = await busiest_primary(cluster, ids)
                served = await killed_primary_devices(cluster, victim.address, ids)
                killed_at = time.monotonic()
                cluster.kill(victim)
                run.promoted_s = await cluster.wait_promoted(victim, FAILOVER_WITHIN)
                await asyncio.sleep(AFTER_PROMOTION)
            finally:
                changes.stop()
                await changing
            accepted = {(c.device_id, c.key) for c in changes.changes}
            deadline = time.monotonic() + SETTLE
            while time.monotonic() < deadline:
                missing = {(d, k) for d, k in accepted if k not in fleet.desired.get(d, {})}
                if not missing:
                    break
                await asyncio.sleep(0.2)
        run.broker_reconnects = gw.gateway.broker.reconnects
        await fleet.stop()
    run.accepted = len(accepted)
    run.refused = changes.refused
    run.missing = len(missing)
    run.missing_devices = len({d for d, _ in missing})
    run.missing_on_killed_primary = sum(d in served for d, _ in missing)
    after = [
        c.accepted - killed_at
        for c in changes.changes
        if c.device_id in served and c.accepted is not None and c.accepted > killed_at
    ]
    if after:
        run.first_accepted_after_kill_s = round(min(after), 3)
    delivered = [
        fleet.arrived[c.key] - killed_at
        for c in changes.changes
        if c.device_id in served and c.first_try >= killed_at and c.key in fleet.arrived
    ]
    if delivered:
        run.first_delivered_on_killed_primary_s = round(min(delivered), 3)
    for c in changes.changes:
        if c.key not in fleet.arrived:
            continue
        ms = round((fleet.arrived[c.key] - c.first_try) * 1000, 1)
        run.latencies_ms.append(ms)
        if killed_at <= c.first_try <= killed_at + (run.promoted_s or FAILOVER_WITHIN):
            run.failover_latencies_ms.append(ms)
    return run


def result_document(summary: dict[str, Any], started_at: str) -> dict[str, Any]:
    """The loop's figures as a load-test result (`cluster-soak`): publishable beside the
    load tests' own (`python -m loadtest publish`)."""
    metrics = {k: v for k, v in summary.items() if k != "runs_detail"}
    return {
        "scenario": "cluster-soak",
        "started_at": started_at,
        "command": f"CLUSTER_SOAK_RUNS={summary['runs']} pytest --run-slow "
        "tests/test_cluster_soak.py",
        "machine": results.machine(None),
        "params": {
            "runs": summary["runs"],
            "devices": summary["devices"],
            "killed_after_s": 2,
            "measured_after_promotion_s": AFTER_PROMOTION,
            "how": "a fresh 3+3 Valkey Cluster and an in-process gateway per run; devices are "
            "the gateway's DeviceClient, desired changes one at a time through the API, each a "
            "new key, retried on 503 until accepted; latency from the first try to the device",
        },
        "valid": True,
        "metrics": metrics,
        "targets": [
            stats.at_most("accepted desired changes missing, all runs", 0, metrics["missing"], ""),
        ],
        "plots": [],
        "runs_detail": summary["runs_detail"],
    }


def median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return round(known[len(known) // 2], 3) if known else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.slow
@pytest.mark.timeout(RUNS * 90)
async def test_thirty_primaries_killed_under_load_lose_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    started_at = results.now_iso()
    runs: list[Run] = []
    for index in range(RUNS):
        caplog.clear()
        for attempt in range(5):  # no free ports (others' sockets in TIME_WAIT), or taken
            try:
                run = await one_run(tmp_path / f"run-{index}-{attempt}")
                break
            except StartupError as exc:
                print(f"\n[soak] run {index + 1}: the cluster did not start ({exc}); again")
                await asyncio.sleep(5)
        else:
            pytest.fail("the cluster did not start five times in a row")
        runs.append(run)
        print(
            f"\n[soak] run {index + 1}/{RUNS}: accepted {run.accepted}, missing {run.missing}"
            f" ({run.missing_devices} devices, {run.missing_on_killed_primary} on the killed"
            f" primary), promoted {run.promoted_s} s, first write {run.first_accepted_after_kill_s}"
            f" s, first delivery {run.first_delivered_on_killed_primary_s} s,"
            f" p99 {percentile(run.latencies_ms, 0.99)} ms",
            flush=True,
        )
        if run.missing:
            await asyncio.to_thread((tmp_path / f"run-{index}.log").write_text, caplog.text)
            print(caplog.text[-20000:], flush=True)
    every = [ms for run in runs for ms in run.latencies_ms]
    during = [ms for run in runs for ms in run.failover_latencies_ms]
    summary = {
        "runs": len(runs),
        "devices": DEVICES,
        "accepted": sum(r.accepted for r in runs),
        "missing": sum(r.missing for r in runs),
        "runs_with_missing": sum(1 for r in runs if r.missing),
        "refused": sum(r.refused for r in runs),
        "desired_ms_p50": percentile(every, 0.5),
        "desired_ms_p99": percentile(every, 0.99),
        "desired_ms_max": max(every, default=None),
        "failover_desired_ms_p99": percentile(during, 0.99),
        "promoted_s_max": max((r.promoted_s or 0 for r in runs), default=None),
        # the failover's timeline, seconds after the kill, median over the runs
        "promoted_s_median": median([r.promoted_s for r in runs]),
        "first_write_on_killed_primary_s_median": median(
            [r.first_accepted_after_kill_s for r in runs]
        ),
        "first_delivery_on_killed_primary_s_median": median(
            [r.first_delivered_on_killed_primary_s for r in runs]
        ),
        "runs_detail": [
            {k: v for k, v in asdict(r).items() if not k.endswith("latencies_ms")} for r in runs
        ],
    }
    brief = orjson.dumps({k: v for k, v in summary.items() if k != "runs_detail"}).decode()
    print(f"\n[measured] {brief}")
    if out := os.environ.get("CLUSTER_SOAK_OUT"):
        text = orjson.dumps(result_document(summary, started_at), option=orjson.OPT_INDENT_2)
        await asyncio.to_thread(Path(out).write_bytes, text)
    assert summary["missing"] == 0, summary
