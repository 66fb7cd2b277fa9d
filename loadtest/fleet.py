"""A registered fleet, loaded fast, and the private Redis every benchmark measures on.

The fleet goes straight into Redis through the gateway's own Lua scripts (`register.lua`, then
`section_write.lua` for small reported/desired states, then `connect.lua` for the online part
with a long heartbeat TTL so it stays online through a measurement), sent as pipelines of
EVALSHA with a couple of pipelines in flight. The result is exactly what the gateway would
have written had each device registered and connected through it.

This module also holds what every benchmark here shares: a private valkey-server on a free
loopback port with persistence off (`--save "" --appendonly no`), the server's CPU time from
`/proc/PID/stat`, the machine description and the JSON result document.

    python -m loadtest.fleet --devices 1000000 --online-fraction 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import redis
import redis.asyncio as aioredis

from gateway import shadow
from gateway.auth import hash_device_token
from gateway.config import Settings
from gateway.embedded import find_free_port, valkey_executable
from gateway.keys import OWN_FIELDS, Keys
from gateway.presence import connect_call
from gateway.scripts import Call
from gateway.store import Store
from loadtest import results

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SHARED_PORT = 6379
START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEVICE_TYPES = ("sensor", "thermostat", "meter", "camera")
FLEET_SESSION = "fleet-load"
EMPTY_SHA1 = hashlib.sha1(b"{}").hexdigest()


# --- the private server -------------------------------------------------------
class PrivateRedis:
    """A valkey-server child on a free loopback port, persistence off, in a temporary dir."""

    def __init__(self, maxclients: int = 10000) -> None:
        self.binary = valkey_executable()
        self.maxclients = maxclients
        self.dir = Path(tempfile.mkdtemp(prefix="loadtest-valkey-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def describe(self) -> str:
        return (
            f"private valkey-server (pid {self.pid}) started for this run on {HOST}:{self.port} "
            f'with --save "" --appendonly no (no persistence), never the shared :6379'
        )

    def start(self) -> PrivateRedis:
        for _ in range(3):
            self.port = find_free_port(HOST)
            command = [
                str(self.binary),
                "--bind", HOST,
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--daemonize", "no",
                "--protected-mode", "yes",
                "--maxclients", str(self.maxclients),
                "--logfile", str(self.dir / "valkey.log"),
            ]  # fmt: skip
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready():
                return self
            self._terminate()
        raise RuntimeError(f"valkey-server did not start; see {self.dir / 'valkey.log'}")

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(redis.RedisError, OSError):
                    # the pid check: whoever else holds a raced port would answer the PING too
                    if client.info("server").get("process_id") == self.process.pid:
                        return True
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Target:
    """The Redis a run measures on: its URL, how to read its CPU time, and what it is."""

    url: str
    pid: int | None
    description: str

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far."""
        if self.pid is not None:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        with redis.Redis.from_url(self.url) as client:
            info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    @property
    def cpu_source(self) -> str:
        if self.pid is not None:
            return f"/proc/{self.pid}/stat utime+stime"
        return "INFO cpu used_cpu_user+used_cpu_sys"


def refuse_shared(url: str) -> None:
    parts = urlsplit(url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1") and (parts.port or 6379) == SHARED_PORT:
        raise SystemExit(
            "refusing to benchmark the shared Redis on 127.0.0.1:6379; "
            "omit --redis-url to start a private server"
        )


def target_for(url: str, description: str | None = None) -> Target:
    """An existing server; its CPU from /proc when it runs on this machine, else INFO cpu."""
    refuse_shared(url)
    with redis.Redis.from_url(url) as client:
        pid = int(client.info("server").get("process_id", 0))
    local = urlsplit(url).hostname in (HOST, "localhost") and Path(f"/proc/{pid}/stat").exists()
    return Target(url, pid if local else None, description or f"external Redis at {url}")


@contextlib.contextmanager
def redis_target(url: str | None) -> Iterator[Target]:
    """A private server for the run, or the external one given by --redis-url."""
    if url is None:
        with PrivateRedis() as server:
            yield Target(server.url, server.pid, server.describe())
        return
    yield target_for(url, f"external Redis at {url} (given by --redis-url)")


# --- the result document ------------------------------------------------------
def machine(redis_url: str) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    with redis.Redis.from_url(redis_url) as client:
        info = client.info("server")
    version = str(info.get("redis_version", "unknown"))
    if "valkey_version" in info:
        version = f"valkey {info['valkey_version']} (redis_version {version})"
    return {
        "cpus": os.cpu_count(),
        "model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "redis_version": version,
        "loadavg_at_start": os.getloadavg()[0],
    }


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The exact command as run; when called as a library, the equivalent module command."""
    if argv is None:
        return shlex.join(sys.orig_argv)
    return shlex.join(["python", "-m", module, *argv])


def target(name: str, text: str, measured: float, unit: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "target": text, "measured": measured, "unit": unit, "ok": ok}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_result(
    scenario: str,
    *,
    started_at: str,
    command: str,
    redis_url: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    targets: list[dict[str, Any]],
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Write `<out_dir>/<scenario>-<timestamp>.json` (default: the results directory, outside
    the repository) and return the document (its path in `path`)."""
    document: dict[str, Any] = {
        "scenario": scenario,
        "started_at": started_at,
        "command": command,
        "machine": machine(redis_url),
        "params": params,
        "metrics": {name: _round(value) for name, value in metrics.items()},
        "targets": targets,
        "plots": [],
    }
    out_dir = out_dir or results.results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[^0-9T]", "", started_at.split("+")[0])
    path = out_dir / f"{scenario}-{stamp}.json"
    serial = 1
    while path.exists():
        serial += 1
        path = out_dir / f"{scenario}-{stamp}-{serial}.json"
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    document["path"] = str(path)
    return document


def _round(value: float) -> float:
    return value if isinstance(value, int) else round(float(value), 6)


def _measured(value: float) -> str:
    """A target's figure as people read it: whole numbers with separators, else 4 digits."""
    if float(value).is_integer() or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def print_summary(document: dict[str, Any]) -> None:
    print(f"\n{document['scenario']}: {document['params'].get('redis', '')}")
    for name, value in document["metrics"].items():
        print(f"  {name:<44} {value:,.6g}")
    for item in document["targets"]:
        mark = "ok  " if item["ok"] else "MISS"
        print(
            f"  [{mark}] {item['name']:<40} {_measured(item['measured'])} {item['unit']}"
            f"  (target {item['target']})"
        )
    print(f"  result: {document['path']}")


# --- the fleet ----------------------------------------------------------------
def device_id(index: int) -> str:
    return f"dev-{index:07d}"


def device_type(index: int) -> str:
    return DEVICE_TYPES[index % len(DEVICE_TYPES)]


def is_online(index: int, fraction: float) -> bool:
    """Spread the online devices evenly through the id order (every other one at 0.5)."""
    return int((index + 1) * fraction) > int(index * fraction)


def reported_state(index: int) -> dict[str, Any]:
    return {"temp": 18 + index % 10, "hum": 40 + index % 7, "fw": "1.4.2"}


def desired_state(index: int) -> dict[str, Any]:
    return {"temp": 21, "fw": "1.4.2"}


def _run_batches(
    client: redis.Redis,
    batches: Sequence[Sequence[int]],
    build: Callable[[Any, int], None],
    concurrency: int,
) -> list[Any]:
    """Send each batch as one pipeline; *concurrency* pipelines in flight (threads).

    The synchronous client packs commands with hiredis (the asyncio client packs them in pure
    Python, which made the loader client-bound); the GIL is released while a thread waits.
    """
    with ThreadPoolExecutor(max_workers=concurrency) as pool:

        def send(batch: Sequence[int]) -> list[Any]:
            with client.pipeline(transaction=False) as pipe:
                for index in batch:
                    build(pipe, index)
                return list(pipe.execute())

        replies: list[Any] = []
        for reply in pool.map(send, batches):
            replies.extend(reply)
        return replies


def _batches(indexes: Sequence[int], size: int) -> list[Sequence[int]]:
    return [indexes[start : start + size] for start in range(0, len(indexes), size)]


def load_fleet(
    redis_url: str,
    devices: int,
    online_fraction: float = 0.5,
    *,
    pipeline_size: int = 1000,
    concurrency: int = 2,
    online_ttl: float = 3600.0,
    state_writes: str = "hset",
    quiet: bool = False,
) -> dict[str, Any]:
    """Register *devices* devices, give them small states, connect a fraction; returns timings.

    Ids are `dev-0000000`…; types cycle through DEVICE_TYPES; every device gets the token
    hash of `token-<id>`. Refuses to run on a database that already holds a `dev-0000000`.
    """
    settings = Settings()
    k = Keys.single(settings.key_prefix, settings.seed_schema)
    # the gateway's own call builders: the fleet is what its register and connect would write
    store = Store(aioredis.Redis(), settings, k)
    client = redis.Redis.from_url(redis_url, max_connections=concurrency + 1)
    try:
        if client.exists(k.state(device_id(0))):
            raise RuntimeError(f"{redis_url} already holds a fleet (device {device_id(0)})")
        for script in store.scripts.all():
            client.script_load(script.source)
        desired_bytes = orjson.dumps(desired_state(0))
        stamp_time = time.time()
        desired_meta = shadow.encode_stamps(shadow.stamp(desired_state(0), stamp_time))

        def send(pipe: Any, call: Call) -> None:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)

        def register(pipe: Any, index: int) -> None:
            ident, kind, now = device_id(index), device_type(index), time.time()
            metadata = orjson.dumps({"site": f"site-{index % 100}"})
            send(
                pipe,
                store.register_call(
                    ident, kind, metadata, hash_device_token(f"token-{ident}"), now
                ),
            )
            if state_writes == "none":
                return
            if state_writes == "hset":
                # what section_write.lua leaves after one reported and one desired write,
                # without its two history entries (see the report)
                reported = reported_state(index)
                pipe.hset(
                    k.state(ident),
                    mapping={
                        "reported_state": orjson.dumps(reported),
                        OWN_FIELDS.reported_meta: shadow.encode_stamps(
                            shadow.stamp(reported, stamp_time)
                        ),
                        "desired_state": desired_bytes,
                        OWN_FIELDS.desired_meta: desired_meta,
                        OWN_FIELDS.version: 2,
                    },
                )
                return
            sections: tuple[tuple[Literal["reported", "desired"], dict[str, Any]], ...] = (
                ("reported", reported_state(index)),
                ("desired", desired_state(index)),
            )
            for section, state in sections:
                # against the empty sections register.lua just wrote
                call, _ = store.section_call(
                    ident, section, b"{}", b"{}", EMPTY_SHA1[:16], state, now
                )
                send(pipe, call)

        ttl_ms = int(online_ttl * 1000)

        def connect(pipe: Any, index: int) -> None:
            send(
                pipe, connect_call(store, device_id(index), FLEET_SESSION, "", time.time(), ttl_ms)
            )

        per_device = {"none": 1, "hset": 2, "script": 3}[state_writes]
        started = time.perf_counter()
        replies = _run_batches(
            client,
            _batches(range(devices), max(1, pipeline_size // per_device)),
            register,
            concurrency,
        )
        registered = sum(1 for reply in replies[::per_device] if reply == 1)
        if state_writes == "script":
            refused = [r for i, r in enumerate(replies) if i % per_device and int(r[0]) != 1]
            if refused:
                raise RuntimeError(f"{len(refused)} state writes refused, e.g. {refused[0]!r}")
        register_seconds = time.perf_counter() - started
        if not quiet:
            print(f"  registered {registered:,} devices in {register_seconds:.1f} s", flush=True)
        online_ids = [index for index in range(devices) if is_online(index, online_fraction)]
        started = time.perf_counter()
        replies = _run_batches(client, _batches(online_ids, pipeline_size), connect, concurrency)
        connected = sum(1 for reply in replies if reply[0] == 1)
        connect_seconds = time.perf_counter() - started
        if not quiet:
            print(f"  connected {connected:,} devices in {connect_seconds:.1f} s", flush=True)
        memory = client.info("memory")
        dbsize = client.dbsize()
        online_count = client.zcard(k.part(0).index_online)
    finally:
        client.close()
    used = int(memory["used_memory"])
    return {
        "devices": devices,
        "registered": registered,
        "online": int(online_count),
        "connected": connected,
        "register_seconds": register_seconds,
        "connect_seconds": connect_seconds,
        "load_seconds": register_seconds + connect_seconds,
        "redis_used_memory_bytes": used,
        "redis_used_memory_mib": used / 2**20,
        "redis_used_memory_rss_mib": int(memory["used_memory_rss"]) / 2**20,
        "redis_bytes_per_device": used / max(devices, 1),
        "redis_keys": int(dbsize),
    }


STATE_WRITES = {
    "hset": "given a small reported and desired state by one HSET in the same pipeline (the "
    "fields section_write.lua would leave: states, per-leaf timestamps, version 2, without "
    "history entries)",
    "script": "given a small reported and desired state with section_write.lua (two history "
    "entries each)",
    "none": "left with empty states",
}


def fleet_description(
    devices: int, online_fraction: float, online_ttl: float, state_writes: str = "hset"
) -> str:
    return (
        f"{devices:,} devices `dev-0000000`… (types {', '.join(DEVICE_TYPES)} in turn) "
        "registered straight into Redis with the gateway's register.lua, "
        f"{STATE_WRITES[state_writes]}, then connect.lua for {online_fraction:.0%} of them "
        f"(spread evenly through the id order) with a {online_ttl:.0f} s heartbeat TTL so they "
        "stay online; EVALSHA in pipelines of ~1,000 commands (sync redis-py, hiredis), "
        "2 pipelines in flight"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fleet",
        description="load a registered fleet into a private Redis, fast; report time and memory",
    )
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--online-fraction", type=float, default=0.5)
    parser.add_argument("--online-ttl", type=float, default=3600.0, help="heartbeat TTL, s")
    parser.add_argument("--pipeline", type=int, default=1000, help="commands per pipeline")
    parser.add_argument("--concurrency", type=int, default=2, help="pipelines in flight")
    parser.add_argument(
        "--state-writes",
        choices=sorted(STATE_WRITES),
        default="hset",
        help="how the small reported/desired states are written (default hset)",
    )
    parser.add_argument(
        "--redis-url", help="an external, empty Redis (default: a private server for this run)"
    )
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not 0 <= args.online_fraction <= 1 or args.devices < 1:
        raise SystemExit("--devices must be ≥ 1 and --online-fraction within 0–1")
    started_at = now_iso()
    with redis_target(args.redis_url) as redis_server:
        print(f"fleet: {redis_server.description}", flush=True)
        cpu_before = redis_server.cpu_seconds()
        loaded = load_fleet(
            redis_server.url,
            args.devices,
            args.online_fraction,
            pipeline_size=args.pipeline,
            concurrency=args.concurrency,
            online_ttl=args.online_ttl,
        )
        cpu = redis_server.cpu_seconds() - cpu_before
        per_device = {"none": 1, "hset": 2, "script": 3}[args.state_writes]
        operations = loaded["devices"] * per_device + loaded["connected"]
        metrics = {
            "load_seconds": loaded["load_seconds"],
            "register_seconds": loaded["register_seconds"],
            "connect_seconds": loaded["connect_seconds"],
            "devices_per_second": loaded["devices"] / loaded["load_seconds"],
            "registered": loaded["registered"],
            "online": loaded["online"],
            "redis_used_memory_mib": loaded["redis_used_memory_mib"],
            "redis_used_memory_rss_mib": loaded["redis_used_memory_rss_mib"],
            "redis_bytes_per_device": loaded["redis_bytes_per_device"],
            "redis_keys": loaded["redis_keys"],
            "redis_cpu_seconds": cpu,
            "redis_cpu_seconds_per_1k_commands": cpu / (operations / 1000),
        }
        document = write_result(
            "fleet",
            started_at=started_at,
            command=command_line("loadtest.fleet", argv),
            redis_url=redis_server.url,
            params={
                "devices": args.devices,
                "online_fraction": args.online_fraction,
                "online_ttl_seconds": args.online_ttl,
                "pipeline": args.pipeline,
                "concurrency": args.concurrency,
                "redis": redis_server.description,
                "state_writes": args.state_writes,
                "how": fleet_description(
                    args.devices, args.online_fraction, args.online_ttl, args.state_writes
                ),
                "commands_sent": operations,
                "redis_cpu_source": redis_server.cpu_source,
            },
            metrics=metrics,
            targets=[],
            out_dir=args.out,
        )
    print_summary(document)
    return document


if __name__ == "__main__":
    main()
