"""Every close code the gateway uses, in one table, with whether the client should reconnect."""

from __future__ import annotations

from typing import NamedTuple


class Close(NamedTuple):
    """A close code, its reason token (sent as the close reason, and the presence `reason`
    when this close ends a session) and whether the peer should reconnect."""

    code: int
    reason: str
    reconnect: bool


NORMAL = Close(1000, "closed", True)
POLICY = Close(1008, "policy_violation", False)
DELETED = Close(1008, "deleted", False)
TOKEN_ROTATED = Close(1008, "token_rotated", False)
TOO_BIG = Close(1009, "frame_too_large", True)
INTERNAL = Close(1011, "internal_error", True)
RESTARTING = Close(1012, "gateway_restarting", True)
MALFORMED = Close(4400, "malformed_frames", True)
AUTH_REQUIRED = Close(4401, "auth_required", False)
ORIGIN_REFUSED = Close(4403, "origin_refused", False)
TOO_SLOW = Close(4408, "slow_consumer", True)
REPLACED = Close(4409, "replaced", False)
RATE_LIMITED = Close(4429, "rate_limited", True)

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
