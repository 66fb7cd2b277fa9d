"""Events out at load: presence events at a steady rate to webhook endpoints and SSE readers.

A gateway process serves a private Valkey. Presence events are appended to the fleet log at
`--rate` per second for `--duration` seconds, shaped as the gateway's own scripts write them
and carrying a per-device sequence number and the time they were written, so the run measures
delivery alone. `--endpoints` webhooks (one receiver process, a path each) and `--readers`
SSE streams (a reader process) take them. Reported: webhook delivery latency (from the event
written to the receiver's answer) p50/p99, events lost, delivered twice or out of order per
device (per endpoint), SSE events lost, and the gateway's CPU-seconds per 1,000 deliveries.

    python -m loadtest events --rate 1000 --duration 60 --endpoints 10 --readers 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from redis.asyncio import Redis

from gateway.embedded import find_free_port
from gateway.keys import Keys
from loadtest import fleet, results

API_KEY = "loadtest-events-key"
DEVICES = 1000
DRAIN_TIMEOUT = 120.0


# --- the receiver process ----------------------------------------------------------
class Tally:
    """What one webhook endpoint received."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.duplicates = 0
        self.out_of_order = 0
        self.last: dict[str, int] = {}
        self.latencies: list[float] = []

    def add(self, msg_id: str, event: dict[str, Any], now: float) -> None:
        if msg_id in self.ids:
            self.duplicates += 1
            return
        self.ids.add(msg_id)
        device, seq = event["device_id"], int(event["seq"])
        if seq < self.last.get(device, -1):
            self.out_of_order += 1
        self.last[device] = max(seq, self.last.get(device, -1))
        self.latencies.append(now - float(event["written_at"]))


def receiver_main(port: int) -> None:
    tallies: dict[str, Tally] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = b"ok"
        if scope["method"] == "POST":
            headers = dict(scope["headers"])
            tally = tallies.setdefault(scope["path"], Tally())
            tally.add(headers[b"webhook-id"].decode(), orjson.loads(body), time.time())
        else:
            answer = orjson.dumps({path: _summary(t) for path, t in tallies.items()})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")


def _summary(tally: Tally) -> dict[str, Any]:
    return {
        "received": len(tally.ids),
        "duplicates": tally.duplicates,
        "out_of_order": tally.out_of_order,
        "latencies": sorted(tally.latencies),
    }


# --- the SSE reader process ---------------------------------------------------------
def readers_main(base_url: str, readers: int, expected: int, out: str, within: float) -> None:
    """*readers* streams from now on; each counts its events until it has *expected*."""

    async def one(http: httpx.AsyncClient, counts: list[int], index: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        buffer = b""
        async with http.stream("GET", "/api/events/stream?types=presence", headers=headers) as r:
            async for chunk in r.aiter_bytes():
                buffer += chunk
                blocks = buffer.split(b"\n\n")
                buffer = blocks.pop()
                counts[index] += sum(1 for b in blocks if b"\nevent: presence" in b)
                if counts[index] >= expected:
                    return

    async def run() -> list[int]:
        counts = [0] * readers
        limits = httpx.Limits(max_connections=readers + 10)
        async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as http:
            tasks = [asyncio.create_task(one(http, counts, i)) for i in range(readers)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await asyncio.gather(*tasks)
            for task in tasks:
                task.cancel()
        return counts

    Path(out).write_text(json.dumps(asyncio.run(run())))


# --- the gateway ----------------------------------------------------------------
@contextlib.contextmanager
def gateway(redis_url: str, log_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_WEBHOOK_ALLOW_PRIVATE": "true", "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_API_KEY": API_KEY, "GATEWAY_EVENTS_STREAM_QUEUE": "100000"}  # fmt: skip
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--redis-url", redis_url]  # fmt: skip
    with open(log_dir / "gateway.log", "ab") as log:
        process = subprocess.Popen(command, cwd=fleet.REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{base_url}/readyz")
        yield process, base_url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / fleet.CLOCK_TICKS


async def produce(redis_url: str, rate: float, duration: float) -> int:
    """Presence events at *rate* per second, in 20 ms batches; the count written."""
    client = Redis.from_url(redis_url)
    key = Keys().part(0).events
    total = int(rate * duration)
    tick = 0.02
    per_tick = max(1, round(rate * tick))
    written = 0
    started = time.monotonic()
    try:
        while written < total:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(min(per_tick, total - written)):
                    device = written % DEVICES
                    now = time.time()
                    event = {"type": "presence", "device_id": f"dev-{device:05d}",
                             "status": "online" if written % 2 else "offline",
                             "timestamp": now, "version": written // DEVICES + 1,
                             "reason": "connected", "seq": written, "written_at": now}  # fmt: skip
                    pipe.xadd(key, {"event": orjson.dumps(event)}, maxlen=100_000,
                              approximate=True)  # fmt: skip
                    written += 1
                await pipe.execute()
            await asyncio.sleep(max(0.0, started + (written / rate) - time.monotonic()))
    finally:
        await client.aclose()
    return written


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest events")
    parser.add_argument("--rate", type=float, default=1000.0, help="presence events per second")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--readers", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    args = parser.parse_args(argv)
    started_at = fleet.now_iso()
    context = multiprocessing.get_context("spawn")
    with (
        fleet.PrivateRedis() as server,
        tempfile.TemporaryDirectory(prefix="loadtest-events-") as log_dir,
        gateway(server.url, Path(log_dir)) as (process, base_url),
    ):
        receiver_port = find_free_port()
        receiver = context.Process(target=receiver_main, args=(receiver_port,), daemon=True)
        receiver.start()
        _wait_for(f"http://127.0.0.1:{receiver_port}/report")
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for index in range(args.endpoints):
            body = {"url": f"http://127.0.0.1:{receiver_port}/hook/{index}", "types": ["presence"]}
            made = httpx.post(f"{base_url}/api/webhooks", json=body, headers=headers, timeout=10)
            made.raise_for_status()
        total = int(args.rate * args.duration)
        counts_path = Path(log_dir) / "readers.json"
        readers = context.Process(
            target=readers_main,
            args=(base_url, args.readers, total, str(counts_path), args.duration + DRAIN_TIMEOUT),
            daemon=True,
        )
        readers.start()
        time.sleep(3.0)  # every reader connected, every endpoint leased
        cpu_before = cpu_seconds(process.pid)
        wall = time.monotonic()
        written = asyncio.run(produce(server.url, args.rate, args.duration))
        produced_in = time.monotonic() - wall
        report: dict[str, Any] = {}
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            report = httpx.get(f"http://127.0.0.1:{receiver_port}/report", timeout=30).json()
            if len(report) == args.endpoints and all(
                t["received"] >= written for t in report.values()
            ):
                break
            time.sleep(0.5)
        cpu = cpu_seconds(process.pid) - cpu_before
        readers.join(timeout=DRAIN_TIMEOUT)
        counts = json.loads(counts_path.read_text()) if counts_path.exists() else []
        receiver.terminate()
        latencies = sorted(x for t in report.values() for x in t["latencies"])
        delivered = sum(t["received"] for t in report.values())
        lost = args.endpoints * written - delivered
        sse_lost = sum(max(0, written - c) for c in counts) + written * (args.readers - len(counts))
        metrics = {
            "events_written": written,
            "write_rate_per_s": round(written / produced_in, 1),
            "webhook_deliveries": delivered,
            "webhook_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "webhook_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "webhook_undelivered": lost,
            "webhook_duplicates": sum(t["duplicates"] for t in report.values()),
            "webhook_out_of_order": sum(t["out_of_order"] for t in report.values()),
            "sse_events_received": sum(counts),
            "sse_lost": sse_lost,
            "gateway_cpu_s": round(cpu, 2),
            "gateway_cpu_s_per_1000_deliveries": round(1000 * cpu / max(1, delivered), 3),
        }
        document = fleet.write_result(
            "events",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_events", argv),
            redis_url=server.url,
            params={
                "rate": args.rate,
                "duration": args.duration,
                "endpoints": args.endpoints,
                "readers": args.readers,
                "devices": DEVICES,
                "how": "presence events appended to the fleet log at a steady rate (as the "
                "gateway's scripts write them); one gateway process delivers them to webhook "
                "endpoints (one receiver process) and SSE readers (one reader process); latency "
                "from the event written to the receiver; CPU of the gateway process over the run",
            },
            metrics=metrics,
            targets=[
                fleet.target(
                    "undelivered",
                    "0 webhook events undelivered after the drain",
                    lost,
                    "events",
                    lost == 0,
                ),
                fleet.target(
                    "order",
                    "0 out of order per device",
                    metrics["webhook_out_of_order"],
                    "events",
                    metrics["webhook_out_of_order"] == 0,
                ),
                fleet.target("sse", "0 SSE events lost", sse_lost, "events", sse_lost == 0),
            ],
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
