"""The processes under test: gateways (started here, or given) sharing one Redis.

Started gateways run `python -m gateway serve` on free loopback ports; Redis is a private
valkey (`gateway.embedded`) unless `--redis-url` names one, or, with `--cluster`, a local
Valkey Cluster (`loadtest.localcluster`). Everything started here is pinned to the server's
cores when the run has a CPU split, and stopped in `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from loadtest import affinity, procstat
from loadtest.localcluster import RunCluster
from loadtest.options import Options
from loadtest.stats import Buckets

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if not address.is_loopback:
        raise SystemExit(f"loadtest: {url} is not a loopback address; load tests stay on 127/8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """Gateways (started here, or given) sharing one Redis (private valkey, a local Valkey
    Cluster, or given)."""

    def __init__(self, opts: Options, cpus: affinity.Split | None = None) -> None:
        self.opts = opts
        self.cpus = cpus  # where what is started here runs; None: not pinned
        self.tmp = Path(tempfile.mkdtemp(prefix="loadtest-"))
        self.redis_url = opts.redis_url
        self.redis_pid: int | None = None
        self.redis_version: str | None = None
        self.redis_pinned = False
        self.embedded: Any = None
        self.valkey: RunCluster | None = None  # --cluster: the local cluster
        self.ports: list[int] = []
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.base_urls: list[str] = []
        self.started = opts.start_gateways > 0

    @property
    def gateway_pids(self) -> list[int]:
        if self.started:
            return [p.pid for p in self.processes.values() if p.returncode is None]
        pids: list[int] = []
        for port in self.ports:
            pids += procstat.pids_listening(port)
        return sorted(set(pids))

    @property
    def gateway_names(self) -> dict[str, int]:
        """The started gateway processes that run, by name (`gateway-0`, …)."""
        return {
            f"gateway-{index}": process.pid
            for index, process in sorted(self.processes.items())
            if process.returncode is None
        }

    @property
    def redis_pids(self) -> list[int]:
        """The Redis server processes: the one node, or every live node of the cluster."""
        if self.valkey is not None:
            return self.valkey.pids
        return [self.redis_pid] if self.redis_pid else []

    async def start(self) -> None:
        if self.opts.cluster:
            await self._start_valkey_cluster()
        elif self.started and not self.redis_url:
            from gateway.embedded import EmbeddedRedis

            self.embedded = EmbeddedRedis(self.tmp / "redis")
            self.redis_url = await self.embedded.start()
            self.redis_pid = self.embedded.pid
            self.redis_pinned = self.redis_pid is not None and self.pin(self.redis_pid)
        if self.redis_url and self.valkey is None:
            await self._inspect_redis(self.redis_url)
        if self.started:
            self.ports = [free_port() for _ in range(self.opts.start_gateways)]
            await asyncio.gather(*(self.spawn(i) for i in range(len(self.ports))))
        else:
            for url in self.opts.gateway:
                check_loopback(url)
                self.ports.append(urlsplit(url).port or 80)
        self.base_urls = (
            [f"http://127.0.0.1:{p}" for p in self.ports]
            if self.started
            else [u.rstrip("/") for u in self.opts.gateway]
        )

    async def _start_valkey_cluster(self) -> None:
        self.valkey = RunCluster(self.tmp / "valkey-cluster")
        self.redis_url = await self.valkey.start()
        self.redis_version = await self.valkey.version()
        pinned = [self.pin(pid) for pid in self.valkey.pids]
        self.redis_pinned = bool(pinned) and all(pinned)

    async def _inspect_redis(self, url: str) -> None:
        check_loopback(url.replace("redis://", "http://", 1))
        client = aioredis.Redis.from_url(url)
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
        self.redis_version = str(info.get("valkey_version") or info.get("redis_version"))
        pid = int(info.get("process_id", 0))
        if (
            self.redis_pid is None
            and pid
            and await asyncio.to_thread(os.path.isdir, f"/proc/{pid}")
        ):
            self.redis_pid = pid

    def pin(self, pid: int) -> bool:
        return self.cpus is not None and affinity.pin(pid, self.cpus.server)

    def gateway_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "GATEWAY_API_KEY": self.opts.api_key,
                "GATEWAY_LOG_LEVEL": "warning",
                "REDIS_URL": self.redis_url or "",
            }
        )
        if self.opts.heartbeat_timeout is not None:
            env["GATEWAY_HEARTBEAT_TIMEOUT"] = str(self.opts.heartbeat_timeout)
        if self.opts.offline_grace is not None:
            env["GATEWAY_OFFLINE_GRACE"] = str(self.opts.offline_grace)
        return env

    async def spawn(self, index: int) -> None:
        port = self.ports[index]
        log = await asyncio.to_thread(open, self.tmp / f"gateway-{index}.log", "ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--redis-url", self.redis_url or "",
                env=self.gateway_env(), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self.processes[index] = process
        self.pin(process.pid)  # before it starts any thread, so they all inherit the cores
        if await self._wait_ready(process, port):
            self.pin(process.pid)  # and any thread that was quicker than that
            return
        tail = (self.tmp / f"gateway-{index}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"gateway {index} on port {port} did not become ready:\n{tail}")

    async def _wait_ready(self, process: asyncio.subprocess.Process, port: int) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline and process.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"http://127.0.0.1:{port}/readyz")
                    if response.status_code == 200:
                        return True
                await asyncio.sleep(0.1)
        return False

    async def stop_gateway(self, index: int) -> None:
        process = self.processes.get(index)
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def close(self) -> None:
        await asyncio.gather(*(self.stop_gateway(i) for i in list(self.processes)))
        if self.embedded is not None:
            await self.embedded.stop()
        if self.valkey is not None:
            await self.valkey.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the gateways' own figures (/metrics) -------------------------------------
    async def scrape(self) -> list[str]:
        """Every gateway's /metrics text (an unreachable one is left out)."""
        texts: list[str] = []
        async with httpx.AsyncClient(timeout=5) as client:
            for base in self.base_urls:
                with contextlib.suppress(httpx.HTTPError):
                    texts.append((await client.get(f"{base}/metrics")).text)
        return texts

    async def metric(self, prefix: str, label: str | None = None) -> float:
        """Sum over every gateway of the Prometheus samples starting with *prefix*."""
        total = 0.0
        for text in await self.scrape():
            for line in text.splitlines():
                if line.startswith(prefix) and (label is None or label in line):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    async def histogram(self, name: str, **labels: str) -> Buckets:
        """Histogram *name* with *labels*, summed over every gateway."""
        total = Buckets()
        for text in await self.scrape():
            for family in text_string_to_metric_families(text):
                if family.name != name:
                    continue
                for sample in family.samples:
                    if any(sample.labels.get(k) != v for k, v in labels.items()):
                        continue
                    total.add(sample.name.removeprefix(name), sample.labels, sample.value)
        return total
