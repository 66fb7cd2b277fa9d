"""Redis work per heartbeat, counted in server instructions by callgrind: exact and repeatable.

Wall-clock rates on a shared 2-core machine move with whatever else runs; the instructions a
Redis server executes for the same commands do not. This runs a private valkey-server under
`valgrind --tool=callgrind`, registers and connects devices with the gateway's own `Store` and
`PresenceEngine`, zeroes the counters, writes whole rounds of heartbeats with
`PresenceEngine.flush()` (one `heartbeat_batch.lua` call per chunk), and reads the server's
instruction count. Each device's beats are 1.5 s apart on its own clock, so every beat also
moves the last-seen indexes, as it does for a real device that beats every few seconds (the
throughput bench runs rounds faster than that and moves them only about once in six beats).
Variants: `bare` (no document), `unchanged` (the same document every beat: a device
session sends a repeat as a bare beat, so only the first is written), `changing` (a new
document every beat: versions, the device's history and the fleet log), `noop_report` (the
same document sent every beat anyway, as a `report` whose merge changes nothing does: the
script compares it with the stored one). Then the seed's
`DeviceStateManager.device_heartbeat` is counted the same way.

    python -m loadtest redis-cost --devices 2000 --rounds 5

Needs valgrind (Debian package `valgrind`). Instructions are not time: divide by what the
throughput bench measures (Redis CPU seconds per heartbeat) to relate the two.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from gateway import redisconn
from gateway.config import Settings
from gateway.devcluster import consecutive_ports
from gateway.embedded import find_free_port, valkey_executable
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.store import Store
from loadtest import fleet, results
from loadtest.bench_store import (
    VARIANTS,
    beat_round,
    bench_device_id,
    layout_client,
    setup_devices,
)
from loadtest.seedload import add_seed_argument, load_seed

HOST = "127.0.0.1"
# the throughput bench's variants, and a `report` frame whose merge changes nothing (the one
# beat that still compares a document in Redis)
COST_VARIANTS = (*VARIANTS, "noop_report")
# server instructions per heartbeat a variant may cost on one node
TARGETS = {"bare": 37_000, "unchanged": 37_000, "changing": 70_000}
BEAT_SPACING = 1.5  # seconds between one device's beats on its own clock: > the 1 s index step


class CountedRedis:
    """A valkey-server under callgrind whose instruction count can be zeroed and read."""

    def __init__(self, workdir: Path, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or find_free_port(HOST)
        self.dumps = 0
        self.process = subprocess.Popen(
            [
                "valgrind", "--tool=callgrind",
                f"--callgrind-out-file={workdir}/callgrind.out",
                str(valkey_executable()),
                "--bind", HOST, "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(workdir), *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://{HOST}:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("valkey-server under callgrind did not start") from None
                time.sleep(0.2)
        client.close()

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.process.pid)], check=True,
                       capture_output=True)  # fmt: skip

    def instructions(self) -> int:
        """Instructions executed since the last `zero()`."""
        subprocess.run(["callgrind_control", "-d", str(self.process.pid)], check=True,
                       capture_output=True)  # fmt: skip
        self.dumps += 1
        dump = self.workdir / f"callgrind.out.{self.dumps}"
        deadline = time.monotonic() + 30
        while True:
            for line in dump.read_text().splitlines() if dump.exists() else []:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind wrote no totals to {dump}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class CountedCluster:
    """Three cluster primaries (no replicas), each under callgrind: the work split per node."""

    def __init__(self, workdir: Path, primaries: int = 3) -> None:
        ports = consecutive_ports(primaries, None)
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "15000"]  # fmt: skip
        self.nodes = [CountedRedis(workdir / str(port), port, extra) for port in ports]
        cli = valkey_executable().with_name("valkey-cli")
        subprocess.run(
            [str(cli), "--cluster", "create", *(f"{HOST}:{port}" for port in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        for node in self.nodes:
            with redis.Redis(host=HOST, port=node.port) as client:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the counted cluster did not come up")
                    time.sleep(0.2)
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in ports)

    def zero(self) -> None:
        for node in self.nodes:
            node.zero()

    def instructions(self) -> list[int]:
        return [node.instructions() for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def counted_cluster() -> Iterator[CountedCluster]:
    _need_valgrind()
    with tempfile.TemporaryDirectory(prefix="loadtest-callgrind-cluster-") as workdir:
        cluster = CountedCluster(Path(workdir))
        try:
            yield cluster
        finally:
            cluster.stop()


def _need_valgrind() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("redis-cost needs valgrind (Debian: apt-get install valgrind)")


@contextmanager
def counted_redis() -> Iterator[CountedRedis]:
    _need_valgrind()
    with tempfile.TemporaryDirectory(prefix="loadtest-callgrind-") as workdir:
        server = CountedRedis(Path(workdir))
        try:
            yield server
        finally:
            server.stop()


async def gateway_rounds(url: str, device_ids: list[str], rounds: int, variant: str,
                         first_round: int, measure: Callable[[], Any]) -> None:  # fmt: skip
    """Whole rounds of heartbeats; *measure* is called after a warm-up round."""
    client, keys = await layout_client(url)
    settings = Settings()
    engine = PresenceEngine(client, Store(client, settings, keys), settings, Metrics(), _no_stale)
    epoch = time.time() + 5
    written: dict[str, bytes] = {}
    try:
        for index in range(first_round, first_round + rounds + 1):
            if index == first_round + 1:
                measure()
            seen_at = epoch + BEAT_SPACING * index
            beat_round(engine, device_ids, variant, index, written, seen_at=seen_at)
            await engine.flush()
    finally:
        await client.aclose()


def _no_stale(device_id: str, session: str, code: int) -> None:
    raise RuntimeError(f"heartbeat refused for {device_id} ({code})")


def seed_heartbeats(url: str, device_ids: list[str], rounds: int, seed: Any,
                    measure: Callable[[], Any]) -> None:  # fmt: skip
    client = redis.Redis.from_url(url)
    manager = seed.DeviceStateManager(client)
    try:
        for round_no in range(rounds + 1):
            if round_no == 1:
                measure()
            reported = {"temp": round_no, "hum": 40}
            for device_id in device_ids:
                manager.device_heartbeat(device_id, reported)
    finally:
        client.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest redis-cost",
        description="Redis server instructions per heartbeat (callgrind): gateway vs seed",
    )
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per variant")
    parser.add_argument("--seed-rounds", type=int, default=2)
    parser.add_argument(
        "--cluster", action="store_true",
        help="also count the same rounds on a 3-primary cluster, per node (the work split); "
        "use enough devices that each partition's indexes outgrow Redis' compact encoding "
        "(over 128 per partition: --devices 20000), as in a real fleet",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    add_seed_argument(parser)
    return parser


# A server under callgrind runs tens of times slower than a real one: a batch of thousands of
# beats can outlast the gateway's 5 s socket timeout, which is meant for servers that answer.
CALLGRIND_SOCKET_TIMEOUT = 120.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.devices < 1 or args.rounds < 1 or args.seed_rounds < 1:
        raise SystemExit("--devices, --rounds and --seed-rounds must be ≥ 1")
    seed = load_seed(args.seed_doc)
    redisconn.SOCKET_TIMEOUT = CALLGRIND_SOCKET_TIMEOUT
    started_at = fleet.now_iso()
    device_ids = [bench_device_id(index) for index in range(args.devices)]
    metrics: dict[str, float] = {}
    with counted_redis() as server:
        print(f"redis-cost: valkey-server under callgrind on {server.url}", flush=True)
        asyncio.run(setup_devices(server.url, device_ids))
        for number, variant in enumerate(COST_VARIANTS):
            asyncio.run(
                gateway_rounds(server.url, device_ids, args.rounds, variant,
                               number * (args.rounds + 1), server.zero)
            )  # fmt: skip
            per_beat = server.instructions() / (args.rounds * args.devices)
            metrics[f"gateway_{variant}_instructions_per_heartbeat"] = round(per_beat)
            print(f"  gateway, {variant} state: {per_beat:,.0f} instructions/heartbeat", flush=True)
        seed_heartbeats(server.url, device_ids, args.seed_rounds, seed, server.zero)
        per_call = server.instructions() / (args.seed_rounds * args.devices)
        metrics["seed_instructions_per_heartbeat"] = round(per_call)
        print(f"  seed device_heartbeat: {per_call:,.0f} instructions/heartbeat", flush=True)
        targets: list[dict[str, Any]] = []
        for variant in COST_VARIANTS:
            ours = metrics[f"gateway_{variant}_instructions_per_heartbeat"]
            metrics[f"gateway_{variant}_to_seed_ratio"] = round(ours / per_call, 2)
            if variant in TARGETS:
                targets.append(
                    fleet.target(f"server instructions per heartbeat ({variant})",
                                 f"≤ {TARGETS[variant]:,}", ours, "", ours <= TARGETS[variant])
                )  # fmt: skip
        if args.cluster:
            targets += count_cluster(device_ids, args.rounds, metrics)
        document = fleet.write_result(
            "redis_cost",
            started_at=started_at,
            command=fleet.command_line("loadtest.redis_cost", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "rounds": args.rounds,
                "seed_rounds": args.seed_rounds,
                "beat_spacing_s": BEAT_SPACING,
                "how": "valkey-server under valgrind --tool=callgrind; counters zeroed after "
                "a warm-up round and read with callgrind_control -d; instructions of the "
                "whole server process (command parsing, Lua, replies) divided by heartbeats",
            },
            metrics=metrics,
            targets=targets,
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


def count_cluster(device_ids: list[str], rounds: int, metrics: dict[str, float]) -> list[Any]:
    """The same rounds on three primaries: each node's share of one node's instructions."""
    targets = []
    with counted_cluster() as cluster:
        print(f"redis-cost: 3 primaries under callgrind at {cluster.url}", flush=True)
        asyncio.run(setup_devices(cluster.url, device_ids))
        for number, variant in enumerate(VARIANTS):
            asyncio.run(
                gateway_rounds(cluster.url, device_ids, rounds, variant,
                               number * (rounds + 1), cluster.zero)
            )  # fmt: skip
            per_node = [n / (rounds * len(device_ids)) for n in cluster.instructions()]
            single = metrics[f"gateway_{variant}_instructions_per_heartbeat"]
            busiest, total = max(per_node) / single, sum(per_node) / single
            metrics[f"cluster_{variant}_instructions_per_heartbeat"] = round(sum(per_node))
            metrics[f"cluster_{variant}_busiest_share"] = round(busiest, 3)
            metrics[f"cluster_{variant}_total_ratio"] = round(total, 3)
            shares = ", ".join(f"{n / single:.1%}" for n in per_node)
            print(f"  cluster, {variant}: per node {shares} of one node; total {total:.2f}x",
                  flush=True)  # fmt: skip
            targets += [
                fleet.target(f"busiest primary's share of one node ({variant})", "≤ 40 %",
                             round(busiest * 100, 1), "%", busiest <= 0.40),
                fleet.target(f"3 primaries together vs one node ({variant})", "≤ 1.15×",
                             round(total, 3), "×", total <= 1.15),
            ]  # fmt: skip
    return targets


if __name__ == "__main__":
    main()
