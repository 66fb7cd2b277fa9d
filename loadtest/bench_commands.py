"""Commands through real gateway processes: round trip at a steady rate, then an offline drain.

    python -m loadtest commands --devices 10000 --rate 1000 --duration 60 --queued 10

One run, two phases, on gateways started here (a private valkey, loopback only, cores split as
in every scenario: `loadtest/README.md`):

1. **Live.** Every device is connected; `--rate` commands/s go through
   `POST /api/devices/{id}/commands` (round-robin over the devices) for `--duration` s. Each
   carries its number (`seq`) and a probe (the wall clock, ns, as its request is written);
   the device answers once per `command_id` with `{"echo": seq}`, and times the `ack` the
   gateway sends once the result is stored: **round trip**, POST written → result stored.
   Beside it: the same per command from its record (`completed_at − created_at`, the
   gateway's clock, every command) and the gateway's own `gateway_command_seconds{since=
   "created"}` histogram, scraped before and after (bucket-estimated quantiles).
2. **Drain.** Every device disconnects; once Redis has them all offline, each gets
   `--queued` commands, made one after another so their order is defined; then every device
   reconnects at once. **Time to drain**: from the reconnect to the last result acked.

Then every accepted command is read back through `GET /api/devices/{id}/commands`: each must
be `succeeded` with its device's result (`lost` counts those that are not), none may have
been answered twice (results the gateway counted as finishing a command against those
accepted; acks a device got for a result it had had acked), and each device's queued
commands must have reached it in the order they were made (`drain_out_of_order`).

The POSTs go out on a small HTTP/1.1 client of its own (keep-alive loopback connections, a
request written and its answer read with asyncio streams): httpx costs about a millisecond of
CPU per request, and at 1,000/s would fill the core the load generator is pinned to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from loadtest import affinity, plots, results, run, stats
from loadtest.cluster import Cluster
from loadtest.context import Ctx
from loadtest.options import Options
from loadtest.producers import paced
from loadtest.progress import Progress
from loadtest.scenarios.connect import connect_phase
from loadtest.sim import Fleet, raise_nofile

HISTOGRAM = "gateway_command_seconds"
SUCCEEDED = 'status="succeeded"'
RESULTS_IN = 'type="command_result"'
ROUND_TRIP_GOAL_MS = 25.0
DRAIN_GOAL_S = 60.0
CONNECTIONS = 64  # keep-alive HTTP connections (requests in flight at most)
HTTP_TIMEOUT = 30.0
IDLE_S = 3.0  # a keep-alive connection idle this long is replaced (the server closes at 5 s)
PAGE = 100  # commands per page when reading them back
READ_ATTEMPTS = 3
SETTLE_S = 30.0  # bound on waiting for the last results after the POSTs stop
COMMAND_TIMEOUT = 30  # seconds a device has to answer
COMMAND_TTL = 3600  # seconds a queued command may wait
DRAIN_SEQ_BASE = 100_000_000  # queued commands are numbered from here (live ones from 0)


class HttpError(Exception):
    pass


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used: float = 0.0  # monotonic time of its last answer; 0: never used


class HttpPool:
    """Keep-alive HTTP/1.1 connections to the gateways, one request at a time on each.

    Only what the gateway sends is understood: a status line, headers, a `Content-Length`
    body. A connection that fails or is told to close is replaced.
    """

    def __init__(self, base_urls: list[str], api_key: str, size: int) -> None:
        self.targets = [(urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80)
                        for u in base_urls]  # fmt: skip
        self.auth = f"Authorization: Bearer {api_key}\r\n".encode()
        self.size = size
        self.idle: asyncio.Queue[tuple[int, _Conn | None]] = asyncio.Queue()

    async def open(self) -> None:
        for index in range(self.size):
            self.idle.put_nowait((index, await self._connect(index)))

    async def _connect(self, index: int) -> _Conn:
        host, port = self.targets[index % len(self.targets)]
        reader, writer = await asyncio.open_connection(host, port)
        return _Conn(reader, writer)

    async def close(self) -> None:
        while not self.idle.empty():
            _, conn = self.idle.get_nowait()
            if conn is not None:
                conn.writer.close()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body) of one request; raises HttpError or OSError (the connection is
        replaced either way).

        A connection idle for longer than the server keeps one (uvicorn: 5 s) is replaced
        before use; one the server closed meanwhile gets the request again on a new one. Both
        kinds sent here are safe to send twice: a GET, and a POST carrying its own
        `command_id` (the same id and content answer the command the first one made)."""
        index, conn = await self.idle.get()
        try:
            for attempt in range(2):
                if conn is None or time.monotonic() - conn.used > IDLE_S:
                    if conn is not None:
                        conn.writer.close()
                    conn = await self._connect(index)
                fresh = conn.used == 0.0
                try:
                    status, data, close = await self._exchange(conn, method, path, body)
                except (ConnectionError, asyncio.IncompleteReadError, HttpError):
                    conn.writer.close()
                    conn = None
                    if fresh or attempt:
                        raise
                    continue  # closed by the server while idle: once more, on a new one
                conn.used = time.monotonic()
                if close:
                    conn.writer.close()
                    conn = None
                return status, data
            raise AssertionError("unreachable")
        except BaseException:
            if conn is not None:
                conn.writer.close()
                conn = None
            raise
        finally:
            self.idle.put_nowait((index, conn))

    async def _exchange(
        self, conn: _Conn, method: str, path: str, body: bytes
    ) -> tuple[int, bytes, bool]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: gateway\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        conn.writer.write(head + self.auth + b"\r\n" + body)
        async with asyncio.timeout(HTTP_TIMEOUT):
            status, length, close = await self._head(conn.reader)
            return status, await conn.reader.readexactly(length), close

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
        line = await reader.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {line[:80]!r}")
        status, length, close = int(parts[1]), 0, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
            elif name == b"transfer-encoding":
                raise HttpError("chunked answers are not read by this client")
        return status, length, close


@dataclass
class Made:
    """Commands POSTed: counts by status, what was accepted per device, the POST latency."""

    statuses: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, list[int]] = field(default_factory=dict)  # device → seqs, in order
    accepted_status: Counter[str] = field(default_factory=Counter)  # `sent` or `queued`
    post_ms: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(seqs) for seqs in self.accepted.values())


def counts_text(counts: Counter[str]) -> str:
    """`a:1,b:2`: counts by kind in one metric."""
    return ",".join(f"{kind}:{count}" for kind, count in sorted(counts.items()))


def command_id(run_id: str, seq: int) -> str:
    return f"lt-{run_id}-{seq:09d}"


async def post_command(
    pool: HttpPool, run_id: str, device_id: str, seq: int, made: Made, probe: bool
) -> None:
    """One `POST …/commands`; the answer counted, the command kept when accepted."""
    started = time.perf_counter()
    params: dict[str, int] = {"seq": seq}
    if probe:
        params["probe"] = time.time_ns()
    body = orjson.dumps(
        {"name": "echo", "params": params, "command_id": command_id(run_id, seq),
         "timeout": COMMAND_TIMEOUT, "ttl": COMMAND_TTL}
    )  # fmt: skip
    try:
        status, answer = await pool.request("POST", f"/api/devices/{device_id}/commands", body)
    except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError) as exc:
        made.statuses[type(exc).__name__] += 1
        return
    made.post_ms.append((time.perf_counter() - started) * 1000)
    made.statuses[str(status)] += 1
    if status in (200, 202):
        made.accepted.setdefault(device_id, []).append(seq)
        made.accepted_status[str(orjson.loads(answer).get("status"))] += 1


async def live_load(
    pool: HttpPool, run_id: str, ids: list[str], rate: float, duration: float
) -> tuple[Made, float]:
    """*rate* commands/s for *duration* s, command k to device k mod N; (what was made, the
    rate achieved)."""
    made = Made()
    started = time.perf_counter()

    async def one(k: int) -> None:
        await post_command(pool, run_id, ids[k % len(ids)], k, made, probe=True)

    await paced(rate, duration, one, pool.size)
    elapsed = time.perf_counter() - started
    return made, sum(made.statuses.values()) / elapsed


async def queue_commands(
    pool: HttpPool, run_id: str, ids: list[str], queued: int, first_seq: int
) -> Made:
    """*queued* commands for each (offline) device, one after another per device, so each
    device's are made in a known order; as many devices at once as the pool has connections."""
    made = Made()
    todo = iter(enumerate(ids))

    async def filler() -> None:
        for index, device_id in todo:
            for j in range(queued):
                seq = first_seq + j * len(ids) + index
                await post_command(pool, run_id, device_id, seq, made, probe=False)

    await asyncio.gather(*(filler() for _ in range(pool.size)))
    return made


@dataclass
class Check:
    """Every accepted command read back from the gateway."""

    read: int = 0
    succeeded: int = 0
    lost: list[str] = field(default_factory=list)  # not final-succeeded, or not found
    unverified: int = 0  # of devices whose commands could not be read
    wrong_result: int = 0
    attempts_over_one: int = 0
    drain_completed_out_of_order: int = 0
    stored_ms: list[float] = field(default_factory=list)  # live phase: completed − created
    read_failures: Counter[str] = field(default_factory=Counter)


async def read_page(pool: HttpPool, path: str, check: Check) -> bytes | None:
    """One page of a device's commands, tried up to READ_ATTEMPTS times; None if never read."""
    for _ in range(READ_ATTEMPTS):
        try:
            status, body = await pool.request("GET", path)
        except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError) as exc:
            check.read_failures[type(exc).__name__] += 1
            continue
        if status == 200:
            return body
        check.read_failures[f"http_{status}"] += 1
    return None


async def read_back(
    pool: HttpPool, run_id: str, live: Made, drain: Made, concurrency: int
) -> Check:
    """Each device's commands (newest first, pages followed) against what it was given."""
    check = Check()
    live_seqs = {device: set(seqs) for device, seqs in live.accepted.items()}
    devices = iter(sorted(set(live.accepted) | set(drain.accepted)))

    async def one_device(device_id: str) -> None:
        records: dict[str, dict[str, Any]] = {}
        path = f"/api/devices/{device_id}/commands?status=all&limit={PAGE}"
        expected = live.accepted.get(device_id, []) + drain.accepted.get(device_id, [])
        for _ in range(1000):  # bounded: 100,000 commands per device
            answer = await read_page(pool, path, check)
            if answer is None:  # not read: its commands are counted unverified
                check.unverified += len(expected)
                return
            page = orjson.loads(answer)
            for item in page["items"]:
                records[item["command_id"]] = item
            if not page.get("next_cursor"):
                break
            path = (
                f"/api/devices/{device_id}/commands?status=all&limit={PAGE}"
                f"&cursor={page['next_cursor']}"
            )
        last_completed = 0.0
        for seq in expected:
            cid = command_id(run_id, seq)
            record = records.get(cid)
            check.read += record is not None
            if record is None or record.get("status") != "succeeded":
                check.lost.append(cid)
                continue
            check.succeeded += 1
            if record.get("result") != {"echo": seq}:
                check.wrong_result += 1
            if int(record.get("attempts") or 0) > 1:
                check.attempts_over_one += 1
            completed = float(record.get("completed_at") or 0.0)
            if seq in live_seqs.get(device_id, ()):
                created = float(record.get("created_at") or 0.0)
                check.stored_ms.append((completed - created) * 1000)
            else:  # queued ones: results stored in the order the commands were made
                if completed < last_completed:
                    check.drain_completed_out_of_order += 1
                last_completed = completed

    async def reader() -> None:
        for device_id in devices:
            await one_device(device_id)

    await asyncio.gather(*(reader() for _ in range(concurrency)))
    return check


async def wait_offline(ctx: Ctx, within: float) -> bool:
    """Until Redis has no device of the fleet online (bounded)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await ctx.online_in_redis() == 0:
            return True
        await asyncio.sleep(0.2)
    return await ctx.online_in_redis() == 0


def device_counts(fleet: Fleet, prefix: str) -> dict[str, int]:
    names = (
        "commands_received", "commands_run", "commands_repeated", "command_results_sent",
        "command_acks", "command_acks_unexpected", "commands_out_of_order",
        "command_error_command_finished", "command_error_unknown_command",
    )  # fmt: skip
    return {f"{prefix}{name}": fleet.total(name) for name in names}


async def commands_bench(ctx: Ctx, queued: int, connections: int) -> None:
    """Both phases (see the module docstring); fills ctx.result."""
    opts, m = ctx.opts, ctx.result.metrics
    cluster = ctx.cluster
    await connect_phase(ctx)
    fleet = ctx.fleet
    assert fleet is not None
    pool = HttpPool(cluster.base_urls, opts.api_key, connections)
    await pool.open()
    try:
        # --- live: commands to connected devices -------------------------------------
        ctx.phase = "live commands"
        ctx.progress_key = "command_ms"
        histogram_before = await cluster.histogram(HISTOGRAM, since="created")
        succeeded_before = await cluster.metric("gateway_commands_total", SUCCEEDED)
        results_before = await cluster.metric("gateway_messages_in_total", RESULTS_IN)
        mark = ctx.mark()
        live, achieved = await live_load(pool, ctx.run_id, ctx.ids, opts.rate, opts.duration)
        settled = await fleet.wait_for(lambda: fleet.total("command_acks") >= live.count, SETTLE_S)
        live_cost = ctx.cost(mark, live.count, "live_")
        live_cost["load_average_1m_end_of_live"] = round(os.getloadavg()[0], 2)
        observed = (await cluster.histogram(HISTOGRAM, since="created")).since(histogram_before)
        ctx.phase = "disconnecting"
        await fleet.stop()  # every socket closed; the final reports hold every sample
        round_trip = stats.summary(fleet.samples.get("command_ms", []), "round_trip_ms")
        live_devices = device_counts(fleet, "live_")
        offline = await wait_offline(ctx, 60.0)

        # --- drain: queued for offline devices, then everyone reconnects at once ------
        ctx.phase = f"queueing {queued} per device"
        queue_started = time.perf_counter()
        drain = await queue_commands(pool, ctx.run_id, ctx.ids, queued, DRAIN_SEQ_BASE)
        queue_s = time.perf_counter() - queue_started
        drain_fleet = await ctx.start_fleet()
        ctx.phase = "draining"
        mark = ctx.mark()
        reconnect_at = time.time()
        go = ctx.go()
        all_online = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
        online_s = time.perf_counter() - go
        drained = await drain_fleet.wait_for(
            lambda: drain_fleet.total("command_acks") >= drain.count,
            DRAIN_GOAL_S * 3 + drain.count / 1000,
        )
        drain_cost = ctx.cost(mark, drain.count, "drain_")
        drain_cost["load_average_1m_end_of_drain"] = round(os.getloadavg()[0], 2)
        succeeded_after = await cluster.metric("gateway_commands_total", SUCCEEDED)
        results_after = await cluster.metric("gateway_messages_in_total", RESULTS_IN)
        ctx.phase = "stopping devices"
        await drain_fleet.stop()
        last_ack = max(
            (float(final.get("last_command_ack", 0.0)) for final in drain_fleet.finals.values()),
            default=0.0,
        )
        drain_s = last_ack - reconnect_at if drained and last_ack else math.nan
        drain_devices = device_counts(drain_fleet, "drain_")

        # --- every accepted command, read back -----------------------------------------
        ctx.phase = "reading commands back"
        check = await read_back(pool, ctx.run_id, live, drain, connections)
    finally:
        await pool.close()

    accepted = live.count + drain.count
    stored_twice = int(succeeded_after - succeeded_before) - accepted
    results_sent = (
        live_devices["live_command_results_sent"] + drain_devices["drain_command_results_sent"]
    )
    repeats = live_devices["live_commands_repeated"] + drain_devices["drain_commands_repeated"]
    acked_twice = (
        live_devices["live_command_acks_unexpected"]
        + drain_devices["drain_command_acks_unexpected"]
    )
    gateway = stats.relay_summary(observed, "gateway_command")
    stored = stats.summary(check.stored_ms, "stored_ms")
    m.update(
        {
            "rate": opts.rate,
            "duration_s": opts.duration,
            "queued_per_device": queued,
            "live_posts": sum(live.statuses.values()),
            "live_post_rate_achieved": round(achieved, 1),
            "live_accepted": live.count,
            "live_accepted_as": counts_text(live.accepted_status),
            "live_post_statuses": counts_text(live.statuses),
            "live_settled": settled,
            **round_trip,
            **stored,
            **gateway,
            **stats.summary(live.post_ms, "post_ms"),
            **live_devices,
            **live_cost,
            "offline_before_queueing": offline,
            "drain_accepted": drain.count,
            "drain_accepted_as": counts_text(drain.accepted_status),
            "drain_post_statuses": counts_text(drain.statuses),
            "drain_queue_s": round(queue_s, 2),
            "drain_queue_posts_per_s": round(sum(drain.statuses.values()) / queue_s, 1),
            "drain_all_online": all_online,
            "drain_online_s": round(online_s, 3),
            "drain_complete": drained,
            "drain_s": round(drain_s, 3),
            **drain_devices,
            **drain_cost,
            "accepted": accepted,
            "read_back": check.read,
            "succeeded": check.succeeded,
            "lost": len(check.lost),
            "lost_examples": ",".join(check.lost[:5]),
            "wrong_result": check.wrong_result,
            "attempts_over_one": check.attempts_over_one,
            "read_failures": sum(check.read_failures.values()),
            "unverified": check.unverified,
            "results_sent_by_devices": results_sent,
            "results_counted_by_gateway": int(results_after - results_before),
            "repeats_answered_from_memory": repeats,
            "stored_twice": stored_twice,
            "acked_twice": acked_twice,
            "answered_twice": max(stored_twice, 0) + acked_twice,
            "drain_out_of_order": drain_devices["drain_commands_out_of_order"]
            + check.drain_completed_out_of_order,
            "drain_completed_out_of_order": check.drain_completed_out_of_order,
        }
    )
    refused = sum(live.statuses.values()) + sum(drain.statuses.values()) - accepted
    ctx.result.targets += [
        stats.at_most("command round trip p99 (POST → result stored)", ROUND_TRIP_GOAL_MS,
                      round_trip["round_trip_ms_p99"], "ms"),
        stats.at_most("offline drain (reconnect → last result stored)", DRAIN_GOAL_S,
                      round(drain_s, 3), "s"),
        stats.at_most("accepted commands lost", 0, len(check.lost), ""),
        stats.at_most("accepted commands not read back", 0, check.unverified, ""),
        stats.at_most("commands answered twice", 0, max(stored_twice, 0) + acked_twice, ""),
        stats.at_most("queued commands out of order", 0, m["drain_out_of_order"], ""),
        stats.at_most("wrong results stored", 0, check.wrong_result, ""),
        stats.at_most("POSTs refused or failed", 0, refused, ""),
        stats.at_least("commands/s achieved", opts.rate * 0.95, round(achieved, 1), "/s"),
    ]  # fmt: skip
    plots.histogram(ctx, "round-trip", "commands: POST → result stored",
                    fleet.samples.get("command_ms", []), "ms")  # fmt: skip


def time_budget(opts: Options, queued: int) -> float:
    """The hard bound of one run: setup, both phases and the read-back, with room."""
    devices = opts.devices
    return 180 + devices / 50 + opts.duration * 1.2 + devices * queued / 300 + 3 * DRAIN_GOAL_S


async def _bounded(ctx: Ctx, queued: int, connections: int) -> str | None:
    """The benchmark within its time budget; the error that ended it early, if any."""
    progress: asyncio.Task[None] | None = None
    budget = time_budget(ctx.opts, queued)
    try:
        async with asyncio.timeout(budget):
            await ctx.setup()
            progress = asyncio.create_task(Progress(ctx).run())
            await commands_bench(ctx, queued, connections)
    except TimeoutError:
        return f"run exceeded its time budget of {budget:.0f} s"
    finally:
        ctx.phase = "stopping"
        if ctx.fleet is not None and len(ctx.fleet.finals) < len(ctx.fleet.specs):
            await ctx.fleet.stop()
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        if ctx.redis is not None:
            await ctx.redis.aclose()
        await ctx.cluster.close()
    return None


async def run_bench(opts: Options, queued: int, connections: int) -> Path:
    """Like every scenario's run (`loadtest.run`): cores split, processes up, bounded, all
    stopped; returns the JSON result path."""
    raise_nofile()
    opts.out.mkdir(parents=True, exist_ok=True)
    chosen, unpinned = run.choose_cpus(opts)
    own_cpus = affinity.available()
    if chosen is not None:  # before anything starts: workers inherit the coordinator's cores
        affinity.pin(os.getpid(), chosen.generator)
    cluster = Cluster(opts, chosen)
    ctx = Ctx(opts, cluster, len(chosen.generator) if chosen else len(own_cpus))
    started_at = results.now_iso()
    try:
        error = await _bounded(ctx, queued, connections)
    finally:
        if chosen is not None:
            affinity.pin(os.getpid(), own_cpus)
    cpus: dict[str, Any] = {"pinning": unpinned}
    if chosen is not None:
        cpus = {
            "pinning": affinity.describe(chosen, cluster.redis_pinned),
            "server": list(chosen.server),
            "generator": list(chosen.generator),
        }
    path = run._write(ctx, started_at, error, cpus)
    # what this benchmark is asked beyond a scenario's options, beside them
    document = orjson.loads(path.read_bytes())
    document["params"].update(queued=queued, http_connections=connections)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest commands",
        description="Commands: round trip at a steady rate to connected devices, then an "
        "offline drain (loopback only)",
    )
    parser.add_argument("--devices", type=int, default=10_000, help="simulated devices")
    parser.add_argument("--rate", type=float, default=1000.0, help="commands/s (live phase)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the live phase")
    parser.add_argument("--queued", type=int, default=10, help="commands queued per device")
    parser.add_argument("--start-gateways", type=int, default=1, help="gateway processes")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: auto)")
    parser.add_argument("--heartbeat-interval", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="keep-alive HTTP connections for the POSTs")  # fmt: skip
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument("--no-pin", action="store_true", help="do not split the cores")
    parser.add_argument("--no-live", action="store_true", help="no live progress view")
    parser.add_argument(
        "--out", type=Path, default=results.results_dir(),
        help=f"results directory (default {results.results_dir()}, outside the repository)",
    )  # fmt: skip
    return parser


def options(args: argparse.Namespace, argv: list[str]) -> Options:
    if args.devices < 1 or args.rate <= 0 or args.duration <= 0 or not 0 <= args.queued <= 50:
        raise SystemExit("loadtest commands: --devices ≥ 1, --rate > 0, --duration > 0, "
                         "--queued 0–50")  # fmt: skip
    if not 1 <= args.connections <= 512 or not 1 <= args.start_gateways <= 8:
        raise SystemExit("loadtest commands: --connections 1–512, --start-gateways 1–8")
    return Options(
        scenario="commands",
        devices=args.devices,
        dashboards=0,
        duration=args.duration,
        workers=args.workers,
        source_addrs=-1,
        gateway=[],
        start_gateways=args.start_gateways,
        redis_url=None,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=None,
        offline_grace=None,
        rate=args.rate,
        out=args.out,
        api_key=f"lt-{secrets.token_urlsafe(16)}",
        connect_concurrency=args.connect_concurrency,
        drop="abort",
        frame="heartbeat",
        stalled_dashboard=False,
        live=not args.no_live,
        command=shlex.join(["python", "-m", "loadtest", "commands", *argv]),
        pin=not args.no_pin,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(argv or [])
    args = build_parser().parse_args(argv)
    opts = options(args, argv)
    path = asyncio.run(run_bench(opts, args.queued, args.connections))
    from loadtest.cli import print_summary

    print_summary(path)
    document: dict[str, Any] = orjson.loads(path.read_bytes())
    document["path"] = str(path)
    if "error" in document["metrics"]:
        raise SystemExit(1)
    return document
