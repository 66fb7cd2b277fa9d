"""Commands, pure: statuses, bounds, ids, the stored record as the API shows it.

A command is something a service asks one device to do (reboot, take a reading): it has an
id, a name and params, and ends in one final status with the device's result or an error. No
I/O here: the Redis side is `queue.py` and the Lua scripts, the process side `service.py`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway import shadow
from gateway.keys import COMMAND_NAME_PATTERN

Status = Literal["queued", "sent", "succeeded", "failed", "timed_out", "expired", "canceled"]
STATUSES: tuple[Status, ...] = (
    "queued", "sent", "succeeded", "failed", "timed_out", "expired", "canceled",
)  # fmt: skip
PENDING: frozenset[str] = frozenset({"queued", "sent"})
FINAL: frozenset[str] = frozenset(STATUSES) - PENDING
Outcome = Literal["succeeded", "failed"]

DEFAULT_TIMEOUT = 30.0
MIN_TIMEOUT = 0.1
MAX_TIMEOUT = 3600.0
DEFAULT_TTL = 3600.0
MAX_TTL = 7 * 86400.0
MAX_WAIT = 60.0
MAX_ERROR_LENGTH = 1024
# final commands kept per device (the oldest go first), besides the retention time
DONE_MAX = 1000
# how long an unfinished record may outlive its ttl and timeout before Redis drops it: a bound
# on a leak, never reached (the due sweep finishes every pending command by its due time)
RECORD_SLACK = 86400
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_command_id(now: float | None = None) -> str:
    """A ULID: 26 characters, sortable by creation time (48 bits of ms, 80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def seconds_text(value: float) -> str:
    """Seconds as stored and sent (a JSON number, to the millisecond): 30 → "30"."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def is_command_name(value: object) -> bool:
    return isinstance(value, str) and COMMAND_NAME_PATTERN.fullmatch(value) is not None


def encode_params(params: object, limits: shadow.Limits) -> bytes:
    """Params as stored: a JSON object within a state document's bounds (null is a value
    here, not a deletion). Raises ShadowError saying what is wrong."""
    return shadow.check_size(shadow.validate_patch(params, limits), limits)


def check_error(error: object) -> str | None:
    """A device's error text: a string of at most MAX_ERROR_LENGTH characters, or None."""
    if error is None:
        return None
    if not isinstance(error, str):
        raise ValueError("'error' must be a string")
    if len(error) > MAX_ERROR_LENGTH:
        raise ValueError(f"'error' must be at most {MAX_ERROR_LENGTH} characters")
    return error


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _seconds(value: bytes | str | None) -> float | None:
    text = _text(value)
    try:
        return float(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class NewCommand:
    """A command to accept, its inputs checked: params encoded, seconds within bounds."""

    command_id: str
    name: str
    params: bytes
    timeout: float
    ttl: float


@dataclass(frozen=True, slots=True)
class Command:
    """A command as the API shows it, read from its record."""

    command_id: str
    name: str
    params: shadow.Document
    status: str
    created_at: float
    sent_at: float | None
    completed_at: float | None
    attempts: int
    result: shadow.Document | None
    error: str | None
    timeout: float
    ttl: float
    deadline: float | None
    seq: int

    @classmethod
    def from_record(cls, command_id: str, record: dict[bytes, bytes]) -> Command:
        def get(name: str) -> bytes | None:
            return record.get(name.encode())

        result = get("result")
        error = get("error")
        return cls(
            command_id=command_id,
            name=_text(get("name")),
            params=shadow.decode_document(get("params")),
            status=_text(get("status")),
            created_at=_seconds(get("created_at")) or 0.0,
            sent_at=_seconds(get("sent_at")),
            completed_at=_seconds(get("completed_at")),
            attempts=int(_text(get("attempts")) or 0),
            result=shadow.decode_document(result) if result is not None else None,
            error=_text(error) if error is not None else None,
            timeout=_seconds(get("timeout")) or DEFAULT_TIMEOUT,
            ttl=_seconds(get("ttl")) or 0.0,
            deadline=_seconds(get("deadline")),
            seq=int(_text(get("seq")) or 0),
        )

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "name": self.name,
            "params": self.params,
            "status": self.status,
            "created_at": self.created_at,
            "sent_at": self.sent_at,
            "completed_at": self.completed_at,
            "attempts": self.attempts,
            "result": self.result,
            "error": self.error,
            "timeout": self.timeout,
            "ttl": self.ttl,
            "expires_at": round(self.created_at + self.ttl, 3),
            "deadline": self.deadline,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """A `command` message on a device's channel, as this process reads it: for the session
    it names (only the process holding that session sends the frame)."""

    command_id: str
    session: str


def read_delivery(data: bytes) -> Delivery | None:
    """The command id and session of a `command` message the scripts published."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != "command":
        return None
    command_id, session = message.get("command_id"), message.get("session")
    if not isinstance(command_id, str) or not isinstance(session, str):
        return None
    return Delivery(command_id, session)


def read_done(data: bytes) -> tuple[str, str] | None:
    """(command id, final status) of a `command_done` notice."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != "command_done":
        return None
    command_id, status = message.get("command_id"), message.get("status")
    if isinstance(command_id, str) and isinstance(status, str):
        return command_id, status
    return None


def frame_deadline(frame: bytes) -> tuple[str, float] | None:
    """(command id, deadline in epoch seconds) of a command frame sent to a device."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    command_id, deadline = message.get("command_id"), message.get("deadline")
    if isinstance(command_id, str) and isinstance(deadline, int | float):
        return command_id, float(deadline)
    return None
