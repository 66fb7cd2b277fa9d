"""REST API latency on a loaded fleet: a real gateway process, timed over real HTTP.

A private Redis gets a fleet (`fleet.load_fleet`: register.lua, small states, connect.lua for
half the devices with a 1 h heartbeat TTL), then `python -m gateway serve` runs against it with
`GATEWAY_SWEEP_INTERVAL=3600` so the offline sweep never runs during the measurement. One httpx
client on one keep-alive loopback connection times each request (client-side wall time from
sending the request to having the whole body), after a warm-up, interleaving the endpoints so
background noise falls on all of them alike.

    python -m loadtest.bench_api --devices 1000000 --repeat 50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from gateway.embedded import find_free_port
from loadtest import fleet, results

API_KEY = "loadtest-admin-key"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
PAGE = 1000
CURSOR_PAGES = 5
ONLINE_PAGE = f"/api/devices?status=online&limit={PAGE}&include_state=true"
STALE_PAGE = f"/api/devices?stale_seconds=60&limit={PAGE}"
OFFLINE_PAGE = f"/api/devices?status=offline&limit={PAGE}"
STATS = "/api/stats"
PAGE_TARGET_MS = 50.0
STATS_TARGET_MS = 5.0


class GatewayProcess:
    """`python -m gateway serve` on a free loopback port, its output in a log file."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.port = find_free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{self.port}.log"
        self.command = [
            sys.executable, "-m", "gateway", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--redis-url", redis_url, "--api-key", API_KEY,
        ]  # fmt: skip
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("GATEWAY_") and name not in ("REDIS_URL", "PORT")
        }
        env.update(GATEWAY_SWEEP_INTERVAL="3600", GATEWAY_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=fleet.REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gateway exited ({self.process.returncode}):\n{self.log_text()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {READY_TIMEOUT} s:\n{self.log_text()}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / fleet.CLOCK_TICKS

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_gateway(redis_url: str) -> Iterator[GatewayProcess]:
    with tempfile.TemporaryDirectory(prefix="loadtest-gateway-") as log_dir:
        gateway = GatewayProcess(redis_url, Path(log_dir))
        try:
            gateway.wait_ready()
            yield gateway
        finally:
            gateway.stop()


def percentile(values: list[float], percent: int) -> float:
    """Linear interpolation between the closest ranks (`statistics.quantiles`, inclusive)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(values_ms),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": max(values_ms),
        "mean_ms": statistics.fmean(values_ms),
    }


class Timer:
    """Wall time of each request on one keep-alive connection; checks every answer."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.bytes: dict[str, int] = {}

    def get(self, name: str, path: str, check: Callable[[Any], None]) -> tuple[float, Any]:
        started = time.perf_counter()
        response = self.client.get(path)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
        body = response.json()
        check(body)
        self.bytes[name] = len(response.content)
        return elapsed_ms, body


def full_page(expected: int) -> Callable[[Any], None]:
    def check(body: Any) -> None:
        if len(body["items"]) < expected:
            raise RuntimeError(f"page held {len(body['items'])} items, expected {expected}")

    return check


def measure(
    base_url: str, devices: int, online: int, repeat: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, Any]]:
    """Interleaved timings of every endpoint; returns (samples in ms, body sizes, stats body)."""
    page_online = min(PAGE, online)
    page_stale = min(PAGE, devices - online)
    samples: dict[str, list[float]] = {}
    stats_body: dict[str, Any] = {}
    with httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    ) as client:
        timer = Timer(client)

        def one_round(record: bool) -> None:
            def keep(name: str, value: float) -> None:
                if record:
                    samples.setdefault(name, []).append(value)

            keep(
                "online_page_include_state",
                timer.get("online", ONLINE_PAGE, full_page(page_online))[0],
            )
            elapsed, body = timer.get("stats", STATS, lambda body: None)
            stats_body.update(body)
            keep("stats", elapsed)
            keep("stale_page", timer.get("stale", STALE_PAGE, full_page(page_stale))[0])
            keep("offline_page", timer.get("offline", OFFLINE_PAGE, full_page(page_stale))[0])

        def cursor_walk(record: bool) -> None:
            path, seen = ONLINE_PAGE, 0
            for number in range(1, CURSOR_PAGES + 1):
                expected = min(PAGE, max(online - seen, 0))
                elapsed, body = timer.get("cursor", path, full_page(expected))
                seen += len(body["items"])
                if record:
                    samples.setdefault("cursor_page", []).append(elapsed)
                    samples.setdefault(f"cursor_page_{number}", []).append(elapsed)
                if not body["next_cursor"]:
                    break
                path = f"{ONLINE_PAGE}&cursor={body['next_cursor']}"

        for _ in range(warmup):
            one_round(record=False)
            cursor_walk(record=False)
        for index in range(repeat):
            one_round(record=True)
            # a 5-page walk every 5th round: 50 rounds give 10 walks, 50 cursor pages
            if index % CURSOR_PAGES == 0:
                cursor_walk(record=True)
    return samples, timer.bytes, stats_body


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_api",
        description="REST API latency of a real gateway process on a loaded fleet",
    )
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--online-fraction", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=50, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument(
        "--redis-url",
        help="an external Redis (default: a private server); with --no-load it must hold a fleet",
    )
    parser.add_argument("--no-load", action="store_true", help="use the fleet already there")
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.devices < 1:
        raise SystemExit("--repeat and --devices must be ≥ 1")
    started_at = fleet.now_iso()
    with fleet.redis_target(args.redis_url) as server:
        print(f"bench_api: {server.description}", flush=True)
        metrics: dict[str, float] = {}
        if args.no_load:
            how_loaded = "an existing fleet in the given Redis (--no-load)"
        else:
            loaded = fleet.load_fleet(server.url, args.devices, args.online_fraction)
            how_loaded = fleet.fleet_description(args.devices, args.online_fraction, 3600.0)
            metrics["fleet_load_seconds"] = loaded["load_seconds"]
            metrics["redis_used_memory_mib"] = loaded["redis_used_memory_mib"]
        with running_gateway(server.url) as gateway:
            with httpx.Client(
                base_url=gateway.base_url, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as probe:
                stats = probe.get(STATS).raise_for_status().json()
            devices, online = int(stats["registered"]), int(stats["online"])
            print(f"  gateway pid {gateway.pid} on {gateway.base_url}: {stats}", flush=True)
            redis_before, gateway_before = server.cpu_seconds(), gateway.cpu_seconds()
            samples, sizes, _ = measure(gateway.base_url, devices, online, args.repeat, args.warmup)
            redis_cpu = server.cpu_seconds() - redis_before
            gateway_cpu = gateway.cpu_seconds() - gateway_before
            command = gateway.command
        requests = sum(
            len(values) for name, values in samples.items() if name[-1] not in "0123456789"
        )
        for name, values in samples.items():
            for key, value in summary(values).items():
                metrics[f"{name}_{key}"] = value
        metrics.update(
            {
                "requests_timed": requests,
                "redis_cpu_seconds_per_1k_requests": redis_cpu / (requests / 1000),
                "gateway_cpu_seconds_per_1k_requests": gateway_cpu / (requests / 1000),
                "fleet_registered": devices,
                "fleet_online": online,
            }
        )
        targets = []
        for name, label, limit in (
            ("online_page_include_state", "online page of 1,000 with state", PAGE_TARGET_MS),
            ("stats", "GET /api/stats", STATS_TARGET_MS),
            ("stale_page", "stale-devices page of 1,000", PAGE_TARGET_MS),
            ("cursor_page", f"each of {CURSOR_PAGES} cursor pages", PAGE_TARGET_MS),
        ):
            for quantile in ("p50", "p99"):
                measured = metrics[f"{name}_{quantile}_ms"]
                targets.append(
                    fleet.target(
                        f"{label} {quantile}",
                        f"≤ {limit:g} ms",
                        round(measured, 2),
                        "ms",
                        measured <= limit,
                    )
                )
        document = fleet.write_result(
            "bench_api",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_api", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "online_fraction": args.online_fraction,
                "repeat": args.repeat,
                "warmup_rounds": args.warmup,
                "redis": server.description,
                "redis_cpu_source": server.cpu_source,
                "fleet": how_loaded,
                "gateway": "python " + " ".join(command[1:]) + " with GATEWAY_SWEEP_INTERVAL=3600 "
                "(no offline sweep during the measurement) and GATEWAY_LOG_LEVEL=warning",
                "requests": {
                    "online_page_include_state": ONLINE_PAGE,
                    "stats": STATS,
                    "stale_page": STALE_PAGE,
                    "offline_page": OFFLINE_PAGE + " (no target; filtered index walk)",
                    "cursor_page": f"{CURSOR_PAGES} consecutive pages of {ONLINE_PAGE} following "
                    f"next_cursor, one walk every {CURSOR_PAGES}th round",
                },
                "response_bytes": sizes,
                "timing": "client-side wall time (time.perf_counter) per request, from sending "
                "it to having the whole body, httpx over loopback HTTP/1.1 on one keep-alive "
                f"connection; {args.warmup} untimed warm-up rounds, then {args.repeat} rounds "
                "with the endpoints interleaved; every answer checked (200, a full page); "
                f"p99 interpolates between the two largest of {args.repeat} samples",
            },
            metrics=metrics,
            targets=targets,
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
