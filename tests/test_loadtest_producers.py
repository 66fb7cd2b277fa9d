"""The load test's presence producer stays bounded when it falls behind its clock.

A fanout run at 1,000 events/s once died with `MaxConnectionsError: Too many connections`:
a producer late by a few hundred transitions started one connect script per transition at
once, past the client's pool of 100. A real Redis; the client is the one a run uses.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from gateway.config import Settings
from gateway.store import Store
from loadtest.producers import PresenceProducer

DEVICES = 600  # more than the pool's 100 connections, fewer than one step of 500 twice


async def registered(client: aioredis.Redis, redis_url: str) -> list[str]:
    store = Store(client, Settings(redis_url=redis_url))
    ids = [f"producer-{i:04d}" for i in range(DEVICES)]
    for start in range(0, DEVICES, 50):
        await asyncio.gather(*(store.register(i, "lt", {}) for i in ids[start : start + 50]))
    return ids


async def test_a_burst_of_transitions_stays_inside_the_connection_pool(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)  # redis-py's default pool: 100 connections
    try:
        ids = await registered(client, redis_url)
        producer = PresenceProducer(client, ids, rate=1000, ttl_s=600)
        await producer.flip(ids)  # every one due at once, as after a stall
        assert await client.scard("devices:online") == DEVICES
        await producer.finish()
        assert await client.scard("devices:online") == 0
    finally:
        await client.aclose()


async def test_a_producer_behind_its_clock_catches_up_in_bounded_steps(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        ids = await registered(client, redis_url)
        producer = PresenceProducer(client, ids, rate=100_000, ttl_s=600)  # far past Redis
        running = asyncio.create_task(producer.run())
        await asyncio.sleep(0.5)
        assert not running.done(), running.exception()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        assert producer.done > 0
        assert producer.max_behind > 500  # it did fall behind, and kept going
    finally:
        await client.aclose()
