"""`gateway migrate`: the console command around `Migration` (which Redis, which layout)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import redisconn
from gateway.config import Settings
from gateway.embedded import EmbeddedRedis
from gateway.keys import Keys
from gateway.migrate.runner import Migration, Outcome

log = logging.getLogger("gateway")


def layout_keys(settings: Settings, cluster: bool) -> Keys:
    """The names of the layout a gateway with *settings* runs (as `Gateway` decides it)."""
    if cluster:
        return Keys.cluster(settings.key_prefix, settings.cluster_partitions)
    return Keys.single(settings.key_prefix, settings.seed_schema)


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[tuple[Redis | RedisCluster, Keys]]:
    """A client of the configured Redis, or of the embedded one on the data directory (started
    for the run and stopped after it, as `gateway serve` would)."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.data_dir, log=log)
        await embedded.start()
        url = embedded.url
    try:
        client: Redis | RedisCluster
        if await redisconn.detect_cluster(url):
            client = redisconn.connect_cluster(url)
            await client.initialize()
            keys = layout_keys(settings, cluster=True)
        else:
            client, keys = redisconn.connect(url), layout_keys(settings, cluster=False)
        try:
            yield client, keys
        finally:
            await client.aclose()
    finally:
        if embedded is not None:
            await embedded.stop()


async def migrate(settings: Settings, apply: bool, batch: int) -> Outcome:
    async with connected(settings) as (client, keys):
        return await Migration(client, keys, apply=apply, batch=batch).run()
