"""The Redis clients the gateway uses: one node, or a Valkey/Redis Cluster.

redis-py's asyncio connection packs every command in pure Python; for the heartbeat batches
and pages (thousands of arguments per call) that was a third of the gateway's CPU. hiredis
(already required for parsing) packs in C with the same encoding rules, on both kinds of client.

A cluster is named by `redis+cluster://[user:password@]host:port[,host:port...]` (or
`rediss+cluster://` for TLS): every listed node is a seed the client may learn the cluster from.
A plain `redis://` URL that turns out to point at a cluster node is detected by `detect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from gateway import compat

SOCKET_TIMEOUT = 5.0
NO_RETRY = Retry(NoBackoff(), 0)
MAX_CONNECTIONS = 64
# commands and pipelines in flight at once on a cluster: a pipeline takes one connection on
# each node it spans, so this is also the most connections any node's pool ever holds
CLUSTER_CONCURRENCY = 8
IDLE_TRIM_INTERVAL = 5.0  # seconds between closing idle cluster connections past one per node
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

Client = Redis | RedisCluster


class HiredisPackedConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        if (isinstance(head, str) and " " in head) or (isinstance(head, bytes) and b" " in head):
            args = (*head.split(), *args[1:])
        return [hiredis.pack_command(args)]


@dataclass(frozen=True)
class ClusterUrl:
    """A `redis+cluster://` URL taken apart: its seed nodes and a node URL for the options."""

    seeds: tuple[tuple[str, int], ...]
    node_url: str  # the first seed as a plain redis(s):// URL, carrying credentials and options

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        parts = urllib.parse.urlsplit(url)
        scheme = CLUSTER_SCHEMES.get(parts.scheme)
        if scheme is None:
            raise ValueError(f"not a cluster URL: {url!r}")
        credentials, at, hosts = parts.netloc.rpartition("@")
        seeds = []
        for address in hosts.split(","):
            host, colon, port = address.strip().rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ValueError(f"a cluster seed is host:port, got {address!r} in {url!r}")
            seeds.append((host.strip("[]"), int(port)))
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError("a cluster has only database 0")
        first = f"{seeds[0][0]}:{seeds[0][1]}"
        query = f"?{parts.query}" if parts.query else ""
        return cls(tuple(seeds), f"{scheme}://{credentials}{at}{first}/0{query}")


def is_cluster_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in CLUSTER_SCHEMES


def connect(url: str, max_connections: int = MAX_CONNECTIONS, **options: Any) -> Redis:
    """A client for one node; plain TCP connections get hiredis packing, TLS and unix keep theirs.

    The pool blocks (up to the socket timeout) when every connection is busy, instead of
    failing the call: a connect storm queues for Redis rather than being refused.
    """
    options.setdefault("socket_timeout", SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
    # a connection idle for a second is PINGed before use, and a dead one is replaced once:
    # after Redis restarts, the first call on each pooled connection must not fail
    options.setdefault("health_check_interval", 1)
    options.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)))
    if url.startswith("redis://"):
        options.setdefault("connection_class", HiredisPackedConnection)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=SOCKET_TIMEOUT, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


class GatewayCluster(RedisCluster):
    """RedisCluster with a bound on commands in flight: redis-py's cluster pool refuses a
    connection past its maximum (MaxConnectionsError) instead of waiting for one, so callers
    wait here instead, and a connect storm queues rather than fails. With at most
    *concurrency* commands (or pipelines) in flight in all, no node's pool holds more
    connections than that, plus the two kept for the client's own topology reads: a
    process's command connections are bounded per primary, whatever the load."""

    def __init__(self, *args: Any, concurrency: int = CLUSTER_CONCURRENCY, **kwargs: Any) -> None:
        kwargs["max_connections"] = concurrency + 2
        super().__init__(*args, **kwargs)
        self.in_flight = asyncio.Semaphore(concurrency)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.in_flight, _closed_under_us():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        return BoundedPipeline(self, transaction)  # type: ignore[abstract]

    async def trim_idle(self, keep: int = 1) -> int:
        """Close all but *keep* idle connections of every node; returns how many closed.
        The seed nodes the topology is read from are objects of their own: theirs all go
        (a topology read opens one when it needs it)."""
        manager = self.nodes_manager
        trims = [(node, keep) for node in manager.nodes_cache.values()]
        trims += [(node, 0) for node in manager.startup_nodes.values()]
        closed = 0
        for node, kept in trims:
            for connection in compat.idle_cluster_connections(node, kept):
                with contextlib.suppress(RedisError, OSError):
                    await connection.disconnect()
                closed += 1
        return closed

    async def trim_idle_forever(self, interval: float = IDLE_TRIM_INTERVAL) -> None:
        """After a burst, a node's pool falls back to one connection within *interval*."""
        while True:
            await asyncio.sleep(interval)
            await self.trim_idle()


class BoundedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self.cluster_client
        assert isinstance(client, GatewayCluster)
        async with client.in_flight, _closed_under_us():
            return await super().execute(raise_on_error, allow_redirections)


@contextlib.asynccontextmanager
async def _closed_under_us() -> AsyncIterator[None]:
    """When a node fails, redis-py's cluster client closes all of its connections, those other
    commands are still using too; such a command then fails inside redis-py with an
    AttributeError (its writer is gone). It is a lost connection: said so, as one."""
    try:
        yield
    except AttributeError as exc:
        raise ConnectionError(f"connection closed under the command: {exc}") from exc


def connect_cluster(
    url: str, concurrency: int = CLUSTER_CONCURRENCY, **options: Any
) -> GatewayCluster:
    """A cluster client for a `redis+cluster://` URL, or a plain URL of one of its nodes."""
    node_url = ClusterUrl.parse(url).node_url if is_cluster_url(url) else url
    seeds = ClusterUrl.parse(url).seeds if is_cluster_url(url) else ()
    kwargs: dict[str, Any] = dict(parse_url(node_url))
    kwargs.pop("db", None)
    ssl = kwargs.pop("connection_class", None) is not None and node_url.startswith("rediss://")
    kwargs.setdefault("socket_timeout", SOCKET_TIMEOUT)
    kwargs.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
    # failover takes a few seconds: retries with backoff ride it out, topology refreshed
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 6))
    kwargs |= options
    startup = [ClusterNode(host, port) for host, port in seeds] or None
    if startup is None:
        kwargs["host"], kwargs["port"] = kwargs.pop("host"), kwargs.pop("port")
    client = GatewayCluster(startup_nodes=startup, ssl=ssl, concurrency=concurrency, **kwargs)
    if not ssl:
        # hiredis packing for every node the client will connect to
        client.nodes_manager.connection_kwargs["connection_class"] = HiredisPackedConnection
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = HiredisPackedConnection
    return client


async def detect_cluster(url: str) -> bool:
    """Whether a plain URL points at a cluster node (`INFO cluster`); a cluster URL is one."""
    if is_cluster_url(url):
        return True
    if url.startswith("unix://"):
        return False
    probe = Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, retry=NO_RETRY)
    try:
        info = await probe.info("cluster")
    except RedisError as exc:
        if isinstance(exc, ConnectionError | TimeoutError):
            raise
        return False  # a server without the cluster section: certainly not a cluster
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))
