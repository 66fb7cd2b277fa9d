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
PROTOCOL_ERROR = Close(1002, "protocol_error", True)
INVALID_TEXT = Close(1007, "invalid_utf8", True)
POLICY = Close(1008, "policy_violation", False)
DELETED = Close(1008, "deleted", False)
TOKEN_ROTATED = Close(1008, "token_rotated", False)
TOO_BIG = Close(1009, "frame_too_large", True)
INTERNAL = Close(1011, "internal_error", True)
RESTARTING = Close(1012, "gateway_restarting", True)
MALFORMED = Close(4400, "malformed_frames", True)
AUTH_REQUIRED = Close(4401, "auth_required", False)
TOO_SLOW = Close(4408, "slow_consumer", True)
REPLACED = Close(4409, "replaced", False)
RATE_LIMITED = Close(4429, "rate_limited", True)

TABLE: tuple[Close, ...] = (
    NORMAL, PROTOCOL_ERROR, INVALID_TEXT, POLICY, DELETED, TOKEN_ROTATED, TOO_BIG, INTERNAL,
    RESTARTING, MALFORMED, AUTH_REQUIRED, TOO_SLOW, REPLACED, RATE_LIMITED,
)  # fmt: skip

# Close codes from the peer that mean "the connection died" rather than "the device said bye".
LOST_CODES = frozenset({1005, 1006, 1011})
# Closes the WebSocket layer makes by itself, on a frame it cannot take; by their code.
PROTOCOL_CLOSES = {close.code: close for close in (PROTOCOL_ERROR, INVALID_TEXT, TOO_BIG, INTERNAL)}


def protocol_close(code: int) -> Close:
    """The close for a frame the WebSocket layer refused (1002, 1007, 1009, 1011), by code."""
    return PROTOCOL_CLOSES.get(code, INTERNAL)


def ended_by(code: int) -> str:
    """The presence reason of a session ended by a close with *code* that the gateway's
    session did not choose: the peer's, or the WebSocket layer's (`frame_too_large`, …)."""
    if code in LOST_CODES:
        return "connection_lost"
    close = PROTOCOL_CLOSES.get(code)
    return close.reason if close is not None else NORMAL.reason


def by_reason(reason: str) -> Close:
    """The close for a kick published on the control channel (replaced, deleted, …)."""
    for close in TABLE:
        if close.reason == reason:
            return close
    return POLICY
