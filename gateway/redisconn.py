"""The Redis client the gateway uses: redis-py asyncio, with commands packed by hiredis.

redis-py's asyncio connection packs every command in pure Python; for the heartbeat batches
and pages (thousands of arguments per call) that was a third of the gateway's CPU. hiredis
(already required for parsing) packs in C with the same encoding rules.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError

SOCKET_TIMEOUT = 5.0
NO_RETRY = Retry(NoBackoff(), 0)
MAX_CONNECTIONS = 64


class HiredisPackedConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        if (isinstance(head, str) and " " in head) or (isinstance(head, bytes) and b" " in head):
            args = (*head.split(), *args[1:])
        return [hiredis.pack_command(args)]


def connect(url: str, max_connections: int = MAX_CONNECTIONS, **options: Any) -> Redis:
    """A client for *url*; plain TCP connections get hiredis packing, TLS and unix keep theirs.

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
