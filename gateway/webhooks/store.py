"""Webhook endpoints in Redis: one hash each (settings, secret, cursor, status), a bounded
list of recent attempts, a lease, and a set of every id. Key names come from keys.py.

The API writes settings; the delivering process writes the cursor and the status, through a
script fenced by its lease token and the endpoint's replay generation, so a process that lost
its lease (or a cursor a replay moved) never overwrites the newer truth.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import keys as names
from gateway.keys import Keys
from gateway.scripts import Scripts
from gateway.webhooks.model import TooManyWebhooks, Webhook, WebhookNotFound
from gateway.webhooks.signing import new_secret

DELIVERIES_KEPT = 100
ROTATION_OVERLAP = 86400.0  # seconds the previous secret still signs after a rotation


class WebhookStore:
    def __init__(self, redis: Redis | RedisCluster, keys: Keys, max_endpoints: int) -> None:
        self.redis = redis
        self.keys = keys
        self.max_endpoints = max_endpoints
        scripts = Scripts(keys)
        self._advance = scripts.webhook_advance
        self._lease = scripts.webhook_lease

    # --- the API's side --------------------------------------------------------
    async def create(self, webhook: Webhook) -> None:
        if await self.redis.scard(names.webhooks_index(self.keys)) >= self.max_endpoints:
            raise TooManyWebhooks(
                f"at most {self.max_endpoints} webhook endpoints (GATEWAY_WEBHOOK_MAX_ENDPOINTS)"
            )
        await self.redis.hset(
            names.webhook(self.keys, webhook.webhook_id), mapping=cast(Any, webhook.to_hash())
        )
        await self.redis.sadd(names.webhooks_index(self.keys), webhook.webhook_id)

    async def get(self, webhook_id: str) -> Webhook:
        raw: Any = await self.redis.hgetall(names.webhook(self.keys, webhook_id))
        if not raw or b"secret" not in raw:
            raise WebhookNotFound(webhook_id)
        return Webhook.from_hash(webhook_id, raw)

    async def ids(self) -> list[str]:
        members: Any = await self.redis.smembers(names.webhooks_index(self.keys))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def all(self) -> list[Webhook]:
        ids = await self.ids()
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for webhook_id in ids:
                pipe.hgetall(names.webhook(self.keys, webhook_id))
            replies = await pipe.execute()
        return [
            Webhook.from_hash(webhook_id, raw)
            for webhook_id, raw in zip(ids, replies, strict=True)
            if raw and b"secret" in raw
        ]

    async def update(self, webhook_id: str, fields: dict[str, str]) -> Webhook:
        await self.get(webhook_id)
        if fields:
            await self.redis.hset(names.webhook(self.keys, webhook_id), mapping=cast(Any, fields))
        return await self.get(webhook_id)

    async def rotate(self, webhook_id: str) -> str:
        webhook = await self.get(webhook_id)
        secret = new_secret()
        await self.update(
            webhook_id,
            {
                "secret": secret,
                "previous_secret": webhook.secret,
                "previous_until": repr(time.time() + ROTATION_OVERLAP),
            },
        )
        return secret

    async def replay(self, webhook_id: str, cursor: str) -> Webhook:
        """Deliver again from *cursor*: the delivering process sees the new generation and
        restarts from it (its writes for the old one are refused)."""
        await self.get(webhook_id)
        key = names.webhook(self.keys, webhook_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"cursor": cursor, "failing_since": "", "last_error": ""})
            pipe.hincrby(key, "generation", 1)
            await pipe.execute()
        return await self.get(webhook_id)

    async def delete(self, webhook_id: str) -> None:
        await self.get(webhook_id)
        await self.redis.srem(names.webhooks_index(self.keys), webhook_id)
        for key in (
            names.webhook(self.keys, webhook_id),
            names.webhook_lease(self.keys, webhook_id),
            names.webhook_deliveries(self.keys, webhook_id),
        ):
            await self.redis.delete(key)

    async def deliveries(self, webhook_id: str, limit: int) -> list[dict[str, Any]]:
        await self.get(webhook_id)
        rows: Any = await self.redis.lrange(
            names.webhook_deliveries(self.keys, webhook_id), 0, limit - 1
        )
        return [orjson.loads(row) for row in rows]

    # --- the delivering process's side ---------------------------------------------
    async def acquire(self, webhook_id: str, token: str, lease_ms: int) -> bool:
        key = names.webhook_lease(self.keys, webhook_id)
        return bool(await self.redis.set(key, token, nx=True, px=lease_ms))

    async def renew(self, webhook_id: str, token: str, lease_ms: int) -> bool:
        key = names.webhook_lease(self.keys, webhook_id)
        return bool(await self._lease(self.redis, [key], [token, "renew", lease_ms]))

    async def release(self, webhook_id: str, token: str) -> None:
        key = names.webhook_lease(self.keys, webhook_id)
        await self._lease(self.redis, [key], [token, "release", 0])

    async def record(
        self,
        webhook: Webhook,
        token: str,
        *,
        cursor: str = "",
        attempts: Sequence[dict[str, Any]] = (),
        failing_since: float | str | None = "-",
        last_error: str | None = "-",
        status: str = "-",
    ) -> int:
        """One fenced write (see webhook_advance.lua): 1 written, 0 lease lost, -1 replayed,
        -2 deleted. *attempts* oldest first."""
        since = failing_since if isinstance(failing_since, str) else (
            "" if failing_since is None else repr(failing_since)
        )  # fmt: skip
        keys: Sequence[str] = (
            names.webhook_lease(self.keys, webhook.webhook_id),
            names.webhook(self.keys, webhook.webhook_id),
            names.webhook_deliveries(self.keys, webhook.webhook_id),
        )
        args: list[str | int] = [
            token,
            str(webhook.generation),
            cursor,
            DELIVERIES_KEPT,
            since,
            "" if last_error is None else last_error,
            status,
            *(orjson.dumps(a).decode() for a in attempts[-DELIVERIES_KEPT:]),
        ]
        return int(await self._advance(self.redis, keys, args))
