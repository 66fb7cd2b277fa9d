"""Coalesced writes: gather between wake-ups, write once per tick, back off while Redis fails.

What a tick gathered stays gathered when its write fails (the writer puts it back), so a retry
after the backoff writes it with whatever arrived meanwhile: nothing is dropped, and a Redis
that is down costs one attempt per backoff step, never one per frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.scripts import REDIS_ERRORS

log = logging.getLogger("gateway")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


async def run_ticks(
    wake: asyncio.Event, flush: Callable[[], Awaitable[None]], interval: float, what: str
) -> None:
    """Call *flush* at most once per *interval* while *wake* is set; forever (cancel to stop)."""
    backoff = 0.0
    while True:
        await wake.wait()
        await asyncio.sleep(backoff or interval)
        wake.clear()
        try:
            await flush()
            backoff = 0.0
        except REDIS_ERRORS as exc:
            backoff = min(max(backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
            log.warning("%s failed (%s); retrying in %.2f s", what, exc, backoff)
            wake.set()
