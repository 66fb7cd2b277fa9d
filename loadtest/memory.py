"""Redis memory per registered device, with a breakdown by key kind, on any layout.

The fleet is written by the gateway's own scripts, built by its own code (`register.lua`,
`section_write.lua` for a small reported and desired state — so each device has its first
two history entries — and `connect.lua` for the online share), so the figures are exactly what
a real fleet costs: on one node in pipelines (`loadtest.fleet`, fast enough for a million
devices), on a cluster through `Store` and `PresenceEngine`. Then `used_memory` (minus what
the server used empty) per device, and `MEMORY USAGE` (all samples) of sampled keys by kind:
a device's own keys (hash, heartbeat, history) per device, the fleet's sets and indexes per
member.

    python -m loadtest memory --devices 1000000
    python -m loadtest memory --devices 100000 --cluster   # a local 3-primary cluster
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import Settings
from gateway.devcluster import LocalCluster
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.store import Store
from loadtest import fleet, results
from loadtest.bench_store import layout_client

DEVICE_TYPES = ("sensor", "thermostat", "meter", "camera")
CONCURRENCY = 256
SAMPLES = 200


def device_id(index: int) -> str:
    return f"dev-{index:07d}"


async def load(url: str, devices: int, online_fraction: float) -> float:
    """Register, write states, connect; returns the seconds it took."""
    client, keys = await layout_client(url)
    settings = Settings()
    store = Store(client, settings, keys)
    engine = PresenceEngine(client, store, settings, Metrics(), lambda *_: None)
    started = time.perf_counter()
    try:
        await store.scripts.load(client)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(index: int) -> None:
            ident = device_id(index)
            async with limit:
                await store.register(ident, DEVICE_TYPES[index % 4], {"site": f"s{index % 100}"})
                await store.patch_section(ident, "reported", {"temp": 21.5, "hum": 40})
                await store.patch_section(ident, "desired", {"interval": 30})
                if random.random() < online_fraction:
                    await engine.connect(ident, "memory-session", "")

        await asyncio.gather(*(one(index) for index in range(devices)))
    finally:
        await client.aclose()
    return time.perf_counter() - started


async def used_memory(client: Redis | RedisCluster) -> int:
    if isinstance(client, RedisCluster):
        replies = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(reply["used_memory"]) for reply in replies.values())
    return int((await client.info("memory"))["used_memory"])


async def breakdown(url: str, keys: Keys, devices: int) -> dict[str, float]:
    """Bytes per device of each key kind, from MEMORY USAGE ... SAMPLES 0 of sampled keys."""
    client, _ = await layout_client(url)
    try:
        sample = random.sample(range(devices), min(SAMPLES, devices))
        per_device: dict[str, list[int]] = defaultdict(list)
        for index in sample:
            ident = device_id(index)
            for kind, name in (
                ("device hash", keys.state(ident)),
                ("heartbeat key", keys.heartbeat(ident)),
                ("history", keys.history(ident)),
            ):
                per_device[kind].append(int(await client.memory_usage(name, samples=0) or 0))
        sizes: dict[str, float] = {
            kind: sum(values) / len(sample) for kind, values in per_device.items()
        }
        fleet_kinds: dict[str, float] = defaultdict(float)
        for part in keys.parts:
            names = {
                "registered set": part.registered,
                "online set": part.online,
                "id index": part.index,
                "online id index": part.index_online,
                "offline last-seen index": part.offline_seen,
                "online last-seen index": part.online_seen,
                "event log": part.events,
            }
            names |= {f"type set ({t})": part.type_set(t) for t in DEVICE_TYPES}
            names |= {f"type id index ({t})": part.index_type(t) for t in DEVICE_TYPES}
            for kind, name in names.items():
                kind = kind.split(" (")[0]
                fleet_kinds[kind] += int(await client.memory_usage(name, samples=0) or 0)
        sizes |= {kind: total / devices for kind, total in fleet_kinds.items()}
        return sizes
    finally:
        await client.aclose()


async def measure(
    url: str, devices: int, online_fraction: float, bulk: bool = False
) -> dict[str, Any]:
    client, keys = await layout_client(url)
    empty = await used_memory(client)
    await client.aclose()
    if bulk:
        loaded = await asyncio.to_thread(
            fleet.load_fleet, url, devices, online_fraction, state_writes="script", quiet=True
        )
        seconds = loaded["load_seconds"]
    else:
        seconds = await load(url, devices, online_fraction)
    client, _ = await layout_client(url)
    used = await used_memory(client)
    await client.aclose()
    return {
        "devices": devices,
        "load_seconds": seconds,
        "bytes_per_device": (used - empty) / devices,
        "breakdown": await breakdown(url, keys, devices),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest memory")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--online-fraction", type=float, default=0.5)
    parser.add_argument("--cluster", action="store_true", help="on a local 3-primary cluster")
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    args = parser.parse_args(argv)
    started_at = fleet.now_iso()
    random.seed(7)
    if args.cluster:
        with tempfile.TemporaryDirectory(prefix="loadtest-memory-cluster-") as workdir:
            cluster = LocalCluster(Path(workdir), replicas=0)
            asyncio.run(cluster.start())
            try:
                found = asyncio.run(measure(cluster.url, args.devices, args.online_fraction))
                # the result names the server by one of its nodes, read while it runs
                node_url = f"redis://{cluster.nodes[0].address}/0"
                return report(args, argv, started_at, found, node_url)
            finally:
                asyncio.run(cluster.stop())
    with fleet.PrivateRedis() as server:
        found = asyncio.run(measure(server.url, args.devices, args.online_fraction, bulk=True))
        return report(args, argv, started_at, found, server.url)


def report(
    args: argparse.Namespace,
    argv: list[str] | None,
    started_at: str,
    found: dict[str, Any],
    url: str,
) -> dict[str, Any]:
    metrics = {"bytes_per_device": round(found["bytes_per_device"], 1)}
    metrics |= {f"bytes_per_device_{k}".replace(" ", "_"): round(v, 1)
                for k, v in found["breakdown"].items()}  # fmt: skip
    target = fleet.target(
        "Redis memory per registered device", "≤ 1,024 B", metrics["bytes_per_device"], "B",
        metrics["bytes_per_device"] <= 1024,
    )  # fmt: skip
    print(f"memory: {found['devices']:,} devices loaded in {found['load_seconds']:.0f} s")
    for kind, value in sorted(found["breakdown"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<24} {value:8.1f} B/device")
    print(f"  {'all (used_memory)':<24} {found['bytes_per_device']:8.1f} B/device")
    document = fleet.write_result(
        "memory",
        started_at=started_at,
        command=fleet.command_line("loadtest.memory", argv),
        redis_url=url,
        params={
            "devices": args.devices,
            "online_fraction": args.online_fraction,
            "layout": "cluster (3 primaries, no replicas)" if args.cluster else "single node",
            "fleet": fleet.fleet_description(args.devices, args.online_fraction, 3600.0, "script")
            if not args.cluster
            else "registered, given a small reported and desired state and connected through "
            "Store and PresenceEngine",
            "how": "used_memory after the load minus before, divided by devices; breakdown "
            f"by MEMORY USAGE ... SAMPLES 0 of {SAMPLES} sampled devices' own keys and of every "
            "partition's fleet keys",
        },
        metrics=metrics,
        targets=[target],
        out_dir=args.out,
    )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
