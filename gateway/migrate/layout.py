"""The stored layout's version: written at the first start, checked at every start.

One small string per deployment (key prefix) and per cluster (`gateway:layout`). A Redis with
no version yet is either new to the gateway, and gets this release's version, or holds what
the previous release wrote (its own indexes or fleet log exist): that is layout 1, which this
release refuses to serve until `gateway migrate --apply` has upgraded it. A version newer than
this release's is a downgrade, refused too. Data the classes of "How to Implement Device State
Management with Redis" wrote alone (their hashes and sets, no gateway index) needs nothing.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import StartupError
from gateway.keys import Keys, generated_admin_key, layout_version

CURRENT = 2  # this release's stored layout
FIRST = 1  # the layout of the releases before versions were stored

Client = Redis | RedisCluster


class LayoutRefused(StartupError):
    """The stored layout is not this release's: one line that says what to run."""


def older(found: int) -> str:
    return (
        f"the data in Redis is in stored layout {found}, older than this release's {CURRENT}: "
        "run `gateway migrate` to see what upgrading changes, then `gateway migrate --apply`"
    )


def newer(found: int) -> str:
    return (
        f"the data in Redis is in stored layout {found}, newer than this release's {CURRENT} "
        "(a downgrade): run the release that wrote it, or a newer one"
    )


async def stored(client: Client, keys: Keys) -> int | None:
    """The stored version; None when nothing is stored and the gateway never wrote here;
    `FIRST` when nothing is stored but the previous release's data is there."""
    raw = await client.get(layout_version(keys))
    if raw is not None:
        try:
            return int(raw)
        except ValueError:
            raise LayoutRefused(
                f"{layout_version(keys)} holds {raw!r}, not a layout version: it was not "
                "written by the gateway; remove it, or use another GATEWAY_KEY_PREFIX"
            ) from None
    return FIRST if await holds_gateway_data(client, keys) else None


async def holds_gateway_data(client: Client, keys: Keys) -> bool:
    """Whether an earlier release wrote here: any partition's id index or fleet log, or the
    admin key it generated (each partition's keys live in one slot: one EXISTS each)."""
    names = [generated_admin_key(keys)]
    for part in keys.parts:
        names += [part.index, part.events]
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(name)
        found = await pipe.execute()
    return any(found)


async def ensure(client: Client, keys: Keys) -> int:
    """At start: write this release's version where there is none and nothing to upgrade;
    raise LayoutRefused when the stored layout is older or newer than this release's."""
    found = await stored(client, keys)
    if found is None:
        await client.set(layout_version(keys), CURRENT, nx=True)
        found = await stored(client, keys)
    if found is None or found == CURRENT:
        return CURRENT
    raise LayoutRefused(older(found) if found < CURRENT else newer(found))
