"""Every close code the gateway uses, in one table, with whether the client should reconnect."""

from __future__ import annotations

from typing import NamedTuple


class Close(NamedTuple):
    code: int
    reason: str
    reconnect: bool


NORMAL = Close(1000, "closed", True)
POLICY = Close(1008, "policy violation", False)
DELETED = Close(1008, "deleted", False)
TOKEN_ROTATED = Close(1008, "token_rotated", False)
TOO_BIG = Close(1009, "frame too large", True)
INTERNAL = Close(1011, "internal error", True)
RESTARTING = Close(1012, "gateway restarting", True)
MALFORMED = Close(4400, "too many malformed frames", True)
AUTH_REQUIRED = Close(4401, "authentication required", False)
ORIGIN_REFUSED = Close(4403, "origin not allowed", False)
TOO_SLOW = Close(4408, "too slow: send queue full", True)
REPLACED = Close(4409, "replaced", False)
RATE_LIMITED = Close(4429, "rate limit exceeded", True)

TABLE: tuple[Close, ...] = (
    NORMAL, POLICY, DELETED, TOKEN_ROTATED, TOO_BIG, INTERNAL, RESTARTING, MALFORMED,
    AUTH_REQUIRED, ORIGIN_REFUSED, TOO_SLOW, REPLACED, RATE_LIMITED,
)  # fmt: skip

# Close codes from the peer that mean "the connection died" rather than "the device said bye".
LOST_CODES = frozenset({1005, 1006, 1011})


def by_reason(reason: str) -> Close:
    """The close for a kick published on the control channel (replaced, deleted, …)."""
    for close in TABLE:
        if close.reason == reason:
            return close
    return POLICY
