"""MQTT topics and payloads, pure: what a device published, validated, and what the gateway
publishes back. Nothing here does I/O, so every rule is testable on its own.

Topics under the prefix (default `devices`), for a device `{id}`:

- `{id}/status` (device, retained): `{"status": "online"|"offline", "session": "..."}`; the
  Last Will is the same `offline` with `"will": true`, which is how the gateway tells the
  broker's Will (`mqtt_will`) from a device's own goodbye (`mqtt_offline`).
- `{id}/reported` (device): a JSON merge patch of the reported state, as a WebSocket `report`.
- `{id}/commands/result` (device): a command's result, as a WebSocket `command_result`.
- `{id}/desired` (gateway, retained): `{"desired": ..., "delta": ..., "desired_version": n}`.
- `{id}/commands` (gateway): the command frame, as a WebSocket session gets it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from gateway import protocol, shadow
from gateway.keys import is_device_id

SESSION_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SESSION_PREFIX = "mqtt:"  # MQTT sessions in the device hash: never mistaken for a WebSocket one


class Kind(Enum):
    STATUS = "status"
    REPORTED = "reported"
    RESULT = "commands/result"


class Dropped(ValueError):
    """A message the gateway drops; *reason* is its `/metrics` label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Status:
    online: bool
    session: str  # the device's own, without the prefix
    will: bool  # the broker published the device's Last Will
    retained: bool = False  # replayed by the broker at subscribe: news, but not a sign of life

    @property
    def session_id(self) -> str:
        """The session as the device hash holds it."""
        return SESSION_PREFIX + self.session

    @property
    def reason(self) -> str:
        return "mqtt_will" if self.will else "mqtt_offline"


class Topics:
    """The topic names of one prefix."""

    def __init__(self, prefix: str = "devices") -> None:
        self.prefix = prefix
        self._levels = prefix.count("/") + 1

    def subscriptions(self, group: str) -> list[str]:
        """Shared subscriptions: each message goes to one process of *group*."""
        return [f"$share/{group}/{self.prefix}/+/{kind.value}" for kind in Kind]

    def parse(self, topic: str) -> tuple[str, Kind]:
        """(device id, kind) of a topic the gateway subscribes to."""
        levels = topic.split("/")
        head, rest = "/".join(levels[: self._levels]), levels[self._levels :]
        if head != self.prefix or len(rest) < 2:
            raise Dropped("bad_topic", f"not a device topic: {topic[:120]!r}")
        device_id, kind = rest[0], "/".join(rest[1:])
        if not is_device_id(device_id):
            raise Dropped("bad_topic", f"not a device id: {device_id[:120]!r}")
        for known in Kind:
            if known.value == kind:
                return device_id, known
        raise Dropped("bad_topic", f"not a topic the gateway reads: {topic[:120]!r}")

    def desired(self, device_id: str) -> str:
        return f"{self.prefix}/{device_id}/desired"

    def commands(self, device_id: str) -> str:
        return f"{self.prefix}/{device_id}/commands"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/{device_id}/status"

    def reported(self, device_id: str) -> str:
        return f"{self.prefix}/{device_id}/reported"

    def result(self, device_id: str) -> str:
        return f"{self.prefix}/{device_id}/commands/result"


def _object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise Dropped("oversize", f"payload of {len(payload)} bytes (limit {max_bytes})")
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Dropped("bad_json", "payload is not JSON") from None
    if not isinstance(value, dict):
        raise Dropped("bad_payload", "payload must be a JSON object")
    return value


def parse_status(payload: bytes, max_bytes: int, retained: bool = False) -> Status:
    message = _object(payload, max_bytes)
    status, session = message.get("status"), message.get("session")
    if status not in ("online", "offline"):
        raise Dropped("bad_payload", "'status' must be online or offline")
    if not isinstance(session, str) or not SESSION_PATTERN.fullmatch(session):
        raise Dropped("bad_payload", "'session' must be 1–64 of A-Z a-z 0-9 . _ -")
    return Status(status == "online", session, message.get("will") is True, retained)


def parse_reported(payload: bytes, limits: shadow.Limits, max_bytes: int) -> shadow.Document:
    """The merge patch, within the same bounds as a WebSocket `report`."""
    patch = _object(payload, max_bytes)
    frame = orjson.dumps({"type": "report", "reported_state": patch})
    try:
        parsed = protocol.parse_device_frame(frame, limits)
    except protocol.FrameError as exc:
        raise Dropped("bad_payload", exc.message) from None
    assert isinstance(parsed, protocol.Report)
    return parsed.patch


def parse_result(payload: bytes, limits: shadow.Limits, max_bytes: int) -> protocol.CommandResult:
    """A command's result: `command_id`, `status` (succeeded, failed), `result`, `error`."""
    message = _object(payload, max_bytes)
    message["type"] = "command_result"
    message.pop("id", None)
    try:
        parsed = protocol.parse_device_frame(orjson.dumps(message), limits)
    except protocol.FrameError as exc:
        raise Dropped("bad_payload", exc.message) from None
    assert isinstance(parsed, protocol.CommandResult)
    return parsed


def desired_payload(
    desired: shadow.Document, reported: shadow.Document, desired_version: int
) -> bytes:
    """What a device finds retained on its `desired` topic."""
    return orjson.dumps(
        {
            "desired": desired,
            "delta": shadow.delta(desired, reported),
            "desired_version": desired_version,
        }
    )
