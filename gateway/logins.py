"""Dashboard login sessions: an API key exchanged once for a same-origin HttpOnly cookie.

The browser never keeps the API key; Redis keeps only the hash of the cookie value, with
the role it grants and a lifetime, so any gateway process can check it and logout is global.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.auth import Role, hash_token, new_secret
from gateway.keys import Keys, login_session

COOKIE = "gateway_session"
LIFETIME = 12 * 3600


async def create(redis: Redis | RedisCluster, keys: Keys, role: Role) -> str:
    """A new session for *role*; returns the cookie value (shown to the browser only)."""
    value = new_secret()
    await redis.set(login_session(keys, hash_token(value)), role.value, ex=LIFETIME)
    return value


async def resolve(redis: Redis | RedisCluster, keys: Keys, value: str | None) -> Role | None:
    if not value or len(value) > 128:
        return None
    stored = await redis.get(login_session(keys, hash_token(value)))
    if stored is None:
        return None
    try:
        return Role(stored.decode() if isinstance(stored, bytes) else str(stored))
    except ValueError:
        return None


async def delete(redis: Redis | RedisCluster, keys: Keys, value: str | None) -> None:
    if value and len(value) <= 128:
        await redis.delete(login_session(keys, hash_token(value)))


def same_origin(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """True when a browser *origin* may use this gateway: listed, or the page's own host.

    No Origin header means a non-browser client (firmware, scripts), which cross-site
    WebSocket hijacking cannot involve.
    """
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    _, _, authority = origin.partition("://")
    return bool(host) and authority == host
