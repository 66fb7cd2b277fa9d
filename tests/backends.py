"""Looking into a backend the same way on one node and on a cluster.

redis-py's cluster client sends some whole-database commands (DBSIZE, KEYS) to one node only,
and sharded channels take SPUBLISH on the node that owns them: these helpers hide neither
layout from a test, they only ask every primary where a question is about all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from servers import available_engines

from gateway.devcluster import LocalCluster, Node
from gateway.keys import Keys
from gateway.redisconn import connect_cluster, is_cluster_url

Client = aioredis.Redis | RedisCluster

single_node = pytest.mark.parametrize("backend_url", available_engines(), indirect=True)
"""Run a test of the backend fixtures on every single-node engine only (not the cluster)."""


async def connect(url: str) -> Client:
    """A new client of the backend at *url*: a RedisCluster, initialized, for a cluster URL."""
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url)
    cluster = connect_cluster(url)
    await cluster.initialize()
    return cluster


def layout_of(client: Client) -> Keys:
    """The default key names of the backend behind *client*."""
    return Keys.cluster() if isinstance(client, RedisCluster) else Keys()


async def dbsize(client: Client) -> int:
    """Keys on the server, or on every primary of a cluster."""
    if isinstance(client, RedisCluster):
        return int(await client.dbsize(target_nodes=RedisCluster.PRIMARIES))
    return int(await client.dbsize())


async def all_keys(client: Client) -> set[str]:
    """Every key name, on the server or on every primary of a cluster."""
    if isinstance(client, RedisCluster):
        names: list[bytes] = await client.keys("*", target_nodes=RedisCluster.PRIMARIES)
    else:
        names = await client.keys("*")
    return {bytes(name).decode() for name in names}


async def publish(client: Client, channel: str, data: bytes) -> int:
    """Publish as other programs would: SPUBLISH where channels are sharded (the cluster)."""
    if isinstance(client, RedisCluster):
        return int(await client.spublish(channel, data))
    return int(await client.publish(channel, data))


def _plain(node: ClusterNode) -> aioredis.Redis:
    return aioredis.Redis(host=node.host, port=node.port, socket_timeout=10)


@contextlib.asynccontextmanager
async def node_of(client: Client, key: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the one server that holds *key* (the client itself on one node), for
    what must run on that server: a MULTI with server commands, a connection kill."""
    if not isinstance(client, RedisCluster):
        yield client
        return
    node = _plain(client.get_node_from_key(key))
    try:
        yield node
    finally:
        await node.aclose()


@contextlib.asynccontextmanager
async def primaries(client: Client) -> AsyncIterator[list[aioredis.Redis]]:
    """Plain clients of every primary (the client itself on one node): per-node settings."""
    if not isinstance(client, RedisCluster):
        yield [client]
        return
    nodes = [_plain(node) for node in client.get_primaries()]
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.aclose()


async def busiest_primary(cluster: LocalCluster, device_ids: list[str]) -> Node:
    """The primary of *cluster* that holds the most of the devices' partitions."""
    client = connect_cluster(cluster.url)
    await client.initialize()
    try:
        keys = Keys.cluster()
        counts: dict[str, int] = {}
        for device_id in device_ids:
            node = client.get_node_from_key(keys.state(device_id))
            counts[node.name] = counts.get(node.name, 0) + 1
    finally:
        await client.aclose()
    name = max(counts, key=lambda n: counts[n])
    return next(node for node in cluster.nodes if node.address == name)
