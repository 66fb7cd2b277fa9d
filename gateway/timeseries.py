"""The fleet's counts over time: a bounded, downsampled series in Redis, one writer per step.

Every gateway process runs `FleetSeries.run`. At each step boundary of the wall clock (every
`GATEWAY_FLEET_SAMPLE_INTERVAL` seconds, 10 by default) each process tries to claim the step
with `SET NX PX` on that step's own key; only the one that wins reads the counts (the same
counters `/api/stats` answers from: O(partitions × types), never O(fleet)) and appends a point.
However many processes run, a step has one point or none; none when no process could write it
(Redis away): a gap stays a gap, nothing is made up.

Three tiers keep it bounded and downsampled:

| tier | a point every | points kept | span at 10 s |
| --- | --- | --- | --- |
| `hour` | step | 360 | 1 hour |
| `day` | 6 steps | 1,440 | 24 hours |
| `week` | 60 steps | 1,008 | 7 days |

A point of a coarse tier holds the counts at its time, and the lowest and highest online
count the next finer tier saw since the coarse tier's previous point: a dip between two
points of the week still shows. Each tier is one sorted set scored by the point's time,
trimmed by time and by count at every write. On a cluster the series' names share a hash tag
of their own (keys.py), so all of it lives in one slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.keys import Keys
from gateway.scripts import REDIS_ERRORS

log = logging.getLogger("gateway.timeseries")

Range = Literal["hour", "day", "week"]
CLAIM_STEPS = 10  # a claim outlives its step by far: a late process never writes it again
MAX_TYPES = 16  # per point; the rest are summed in `others`


@dataclass(frozen=True)
class Tier:
    name: Range
    every: int  # steps per point
    keep: int  # points kept


TIERS = (Tier("hour", 1, 360), Tier("day", 6, 1440), Tier("week", 60, 1008))
BY_NAME = {tier.name: tier for tier in TIERS}

Counts = Callable[[], Awaitable[dict[str, Any]]]


class FleetSeries:
    """Writes (one process per step) and reads the fleet-counts series of one layout."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        keys: Keys,
        counts: Counts,
        step: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if step < 1:
            raise ValueError(f"the sample step is at least 1 s, got {step}")
        self.redis = redis
        self.keys = keys
        self.counts = counts
        self.step = step
        self.clock = clock
        self.process = secrets.token_hex(4)  # the claim's value: who wrote a step
        self._failing = False

    async def run(self) -> None:
        """Sample at every step boundary until cancelled (cancelling is safe: a claimed step
        whose point was not written stays a gap)."""
        while True:
            number = int(self.clock() // self.step) + 1
            await asyncio.sleep(max(0.0, number * self.step - self.clock()))
            try:
                await self.sample(number)
            except REDIS_ERRORS as exc:
                if not self._failing:
                    log.warning("fleet counts not sampled (Redis: %s); retrying each step", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("fleet counts sampled again")
                self._failing = False

    async def sample(self, number: int) -> bool:
        """Claim step *number*; if this process won it, append its points. True when written."""
        claim_ms = CLAIM_STEPS * self.step * 1000
        if not await self.redis.set(
            self.keys.fleet_claim(number), self.process, nx=True, px=claim_ms
        ):
            return False
        at = number * self.step
        point = _point(at, await self.counts())
        written = [(TIERS[0], point)]
        for finer, tier in itertools.pairwise(TIERS):
            if number % tier.every:
                break  # the coarser tiers' steps are multiples of this one's
            point = await self._coarse(finer, tier, at, point)
            written.append((tier, point))
        async with self.redis.pipeline(transaction=False) as pipe:
            for tier, each in written:
                key = self.keys.fleet_series(tier.name)
                pipe.zadd(key, {orjson.dumps(each): at})
                pipe.zremrangebyscore(key, "-inf", f"({at - self.span(tier)}")
                pipe.zremrangebyrank(key, 0, -(tier.keep + 1))
            await pipe.execute()
        return True

    async def _coarse(
        self, finer: Tier, tier: Tier, at: int, latest: dict[str, Any]
    ) -> dict[str, Any]:
        """The point of *tier* at *at*: the counts now, and the online range *finer* saw since
        *tier*'s previous point."""
        since = at - tier.every * self.step
        rows = await self.redis.zrangebyscore(
            self.keys.fleet_series(finer.name), f"({since}", f"({at}"
        )
        seen = [orjson.loads(row) for row in cast(list[bytes], rows)]
        seen.append(latest)
        return latest | {
            "online_min": min(int(p.get("online_min", p.get("online", 0))) for p in seen),
            "online_max": max(int(p.get("online_max", p.get("online", 0))) for p in seen),
        }

    def span(self, tier: Tier) -> int:
        """Seconds one tier covers."""
        return tier.every * self.step * tier.keep

    async def read(self, name: Range) -> bytes:
        """The points of one tier within its span, oldest first, as the API's JSON document."""
        tier = BY_NAME[name]
        since = self.clock() - self.span(tier)
        rows = cast(
            list[bytes],
            await self.redis.zrangebyscore(self.keys.fleet_series(name), since, "+inf"),
        )
        step = tier.every * self.step
        head = orjson.dumps({"range": name, "step": step, "span": self.span(tier)})
        # the stored points are the document's own JSON: joined, never parsed again
        return head[:-1] + b',"points":[' + b",".join(rows) + b"]}"


def _point(at: int, stats: dict[str, Any]) -> dict[str, Any]:
    """One sample of `Queries.stats`: totals, and the largest types by registered count."""
    online = int(stats.get("online", 0))
    by_type: dict[str, dict[str, int]] = stats.get("by_type", {})
    ranked = sorted(by_type.items(), key=lambda item: (-item[1]["registered"], item[0]))
    point: dict[str, Any] = {
        "t": at,
        "registered": int(stats.get("registered", 0)),
        "online": online,
        "online_min": online,
        "online_max": online,
        "by_type": {
            name: {"registered": c["registered"], "online": c["online"]}
            for name, c in sorted(ranked[:MAX_TYPES])
        },
    }
    rest = ranked[MAX_TYPES:]
    if rest:
        point["others"] = {
            "types": len(rest),
            "registered": sum(c["registered"] for _, c in rest),
            "online": sum(c["online"] for _, c in rest),
        }
    return point
