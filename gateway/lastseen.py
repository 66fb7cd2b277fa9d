"""When a device was last seen: how the layout stores it, and how reads recover it.

Every frame renews the device's heartbeat TTL, but `last_seen` in its hash and its score in
the online last-seen index move only when a frame falls in a later index step than the one
its session last wrote (the gateway holding the socket remembers it): a chatty device costs
one index write per step, not one per frame. Readers lose nothing: while the heartbeat
lives, its expiry time says when it was last renewed, to the millisecond, and
`refined_last_seen` puts that back.
"""

from __future__ import annotations

INDEX_STEP = 1.0  # seconds `last_seen` may trail an online device's latest frame in Redis
NO_KEY = -2  # PEXPIRETIME of a key that does not exist: the device is offline


def step_of(seen_at: float) -> int:
    """The index step a time falls in."""
    return int(seen_at // INDEX_STEP)


def refined_last_seen(stored: float, expires_at_ms: int, ttl_ms: int, now: float) -> float:
    """An online device's latest frame: the stored `last_seen` moved forward to when the
    heartbeat was last renewed (its PEXPIRETIME less the TTL: the same for every reader at
    any moment). Trusted only within a step of the stored value and never in the future, so
    a heartbeat another program wrote with another TTL, or one cut short for an offline grace,
    never misleads it."""
    if expires_at_ms < 0:
        return stored
    renewed = (expires_at_ms - ttl_ms) / 1000
    if stored <= renewed <= min(now, stored + INDEX_STEP + 1):
        return round(renewed, 3)
    return stored
