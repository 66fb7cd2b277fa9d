"""Device and dashboard frames, pure: parse and validate what arrives, build what leaves.

Never awaits and never touches Redis, so every malformed input is tested without a socket.
A frame that cannot be understood raises FrameError with a stable `code` for the error frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import shadow
from gateway.commands import model as commands_model
from gateway.keys import is_command_id, is_device_id

MAX_REQUEST_ID = 64
MAX_FILTER_IDS = 1000
POSITION = re.compile(r"[A-Za-z0-9_.:-]{1,4096}")  # a stream id, or a cluster's position
EVENT_TYPES = frozenset({"presence", "state", "registered", "deleted", "metadata", "command"})


class FrameError(ValueError):
    """A frame the gateway refuses; `code` goes in the error frame."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Heartbeat:
    reported: shadow.Document | None


@dataclass(frozen=True, slots=True)
class Report:
    patch: shadow.Document
    request_id: str | int | None


@dataclass(frozen=True, slots=True)
class Get:
    request_id: str | int | None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A device's answer to a command: `succeeded` with an optional result, or `failed`."""

    command_id: str
    status: str
    result: bytes  # a JSON object within a state document's bounds; b"" for none
    error: str | None
    request_id: str | int | None


DeviceFrame = Heartbeat | Report | Get | CommandResult
COMMAND_OUTCOMES = ("succeeded", "failed")


def _load_object(data: str | bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError("invalid_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("invalid_frame", "frame must be a JSON object with a 'type'")
    return value


def _request_id(frame: dict[str, Any]) -> str | int | None:
    request_id = frame.get("id")
    if request_id is None:
        return None
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        raise FrameError("invalid_frame", "'id' must be a string or an integer")
    if isinstance(request_id, str) and len(request_id) > MAX_REQUEST_ID:
        raise FrameError("invalid_frame", f"'id' must be at most {MAX_REQUEST_ID} characters")
    return request_id


def _state(frame: dict[str, Any], limits: shadow.Limits) -> Any:
    try:
        return shadow.validate_patch(frame.get("reported_state"), limits)
    except shadow.ShadowError as exc:
        code = exc.problem.replace("-", "_")
        raise FrameError(code, exc.detail, _readable_id(frame)) from None


def _readable_id(frame: dict[str, Any]) -> str | int | None:
    """The frame's `id` if it is a valid one, else None: for error frames, never raises."""
    try:
        return _request_id(frame)
    except FrameError:
        return None


def parse_device_frame(data: str | bytes, limits: shadow.Limits) -> DeviceFrame:
    """The frame a device sent, validated; FrameError says what is wrong.

    A refusal carries the frame's `id` whenever the frame is an object with a valid one.
    """
    frame = _load_object(data)
    kind = frame.get("type")
    if kind == "heartbeat":
        if frame.get("reported_state") is None:
            return Heartbeat(None)
        return Heartbeat(shadow.merge({}, _state(frame, limits)))
    if kind == "report":
        request_id = _request_id(frame)
        if "reported_state" not in frame:
            raise FrameError("invalid_frame", "'report' needs 'reported_state'", request_id)
        return Report(_state(frame, limits), request_id)
    if kind == "get":
        return Get(_request_id(frame))
    if kind == "command_result":
        return _command_result(frame, limits)
    if not isinstance(kind, str):
        raise FrameError("invalid_frame", "frame must have a string 'type'", _readable_id(frame))
    raise FrameError(
        "unknown_type",
        f"unknown frame type {kind[:40]!r}; expected heartbeat, report, get or command_result",
        _readable_id(frame),
    )


def _command_result(frame: dict[str, Any], limits: shadow.Limits) -> CommandResult:
    request_id = _request_id(frame)
    command_id = frame.get("command_id")
    if not is_command_id(command_id):
        raise FrameError(
            "invalid_frame", "'command_id' must be the id of a command frame", request_id
        )
    status = frame.get("status")
    if status not in COMMAND_OUTCOMES:
        raise FrameError("invalid_frame", "'status' must be succeeded or failed", request_id)
    result = frame.get("result")
    empty = b"{}" if status == "succeeded" else b""  # a failure without a result has none
    try:
        encoded = empty if result is None else commands_model.encode_params(result, limits)
    except shadow.ShadowError as exc:
        code = exc.problem.replace("-", "_")
        raise FrameError(code, f"'result': {exc.detail}", request_id) from None
    try:
        error = commands_model.check_error(frame.get("error"))
    except ValueError as exc:
        raise FrameError("invalid_frame", str(exc), request_id) from None
    assert isinstance(command_id, str)
    return CommandResult(command_id, str(status), encoded, error, request_id)


def welcome(
    device_id: str, session: str, heartbeat_timeout: float, desired: shadow.Document,
    reported: shadow.Document, version: int, max_frame_bytes: int,
) -> bytes:  # fmt: skip
    return orjson.dumps(
        {
            "type": "welcome",
            "device_id": device_id,
            "session": session,
            "heartbeat_timeout": heartbeat_timeout,
            "max_frame_bytes": max_frame_bytes,
            "desired_state": desired,
            "reported_state": reported,
            "delta": shadow.delta(desired, reported),
            "version": version,
        }
    )


def delta_frame(difference: shadow.Document, version: int | None) -> bytes:
    return orjson.dumps({"type": "delta", "delta": difference, "version": version})


def ack(request_id: str | int | None, version: int) -> bytes:
    return orjson.dumps({"type": "ack", "id": request_id, "version": version})


def command_ack(request_id: str | int | None, command_id: str, status: str) -> bytes:
    """The answer to a `command_result` that finished its command."""
    return orjson.dumps({"type": "ack", "id": request_id, "command_id": command_id,
                         "status": status})  # fmt: skip


def command_refused(request_id: str | int | None, command_id: str, status: str | None) -> bytes:
    """The answer to a `command_result` that changed nothing: an unknown command (or one
    never sent), or one that is final already (*status*)."""
    if status is None:
        code, message = "unknown_command", f"no command {command_id!r} was sent to this device"
    else:
        code, message = "command_finished", f"command {command_id!r} has ended ({status})"
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message,
                             "command_id": command_id}  # fmt: skip
    if status is not None:
        frame["status"] = status
    if request_id is not None:
        frame["id"] = request_id
    return orjson.dumps(frame)


def shadow_frame(
    request_id: str | int | None, desired: shadow.Document, reported: shadow.Document, version: int
) -> bytes:
    return orjson.dumps(
        {
            "type": "shadow",
            "id": request_id,
            "desired_state": desired,
            "reported_state": reported,
            "delta": shadow.delta(desired, reported),
            "version": version,
        }
    )


def error(code: str, message: str, request_id: str | int | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return orjson.dumps(frame)


GATEWAY_TYPES = frozenset({"command", "command_done"})


def is_gateway_message(data: bytes) -> bool:
    """True for a command-channel message of a type the gateway owns (`command`,
    `command_done`): those are the gateway's own to send, never relayed as they are."""
    if b'"command' not in data:
        return False
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") in GATEWAY_TYPES


def parse_command(data: bytes) -> shadow.Document | None:
    """The desired state in a command-channel message, if it carries one (seed format)."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    # the Node.js classes publish `desiredState`
    desired = message.get("desired_state", message.get("desiredState"))
    return dict(desired) if isinstance(desired, dict) else None


def command_version(data: bytes) -> int | None:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    version = message.get("version") if isinstance(message, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


# --- dashboard frames -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    types: frozenset[str] | None
    ids: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class Resume:
    after: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


DashboardFrame = Subscribe | Resume | Ping


def _string_set(
    frame: dict[str, Any], name: str, allowed: frozenset[str] | None
) -> frozenset[str] | None:
    value = frame.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise FrameError("invalid_frame", f"'{name}' must be a list of strings")
    if len(value) > MAX_FILTER_IDS:
        raise FrameError("too_many_ids", f"'{name}' may list at most {MAX_FILTER_IDS} entries")
    if allowed is not None and not set(value) <= allowed:
        raise FrameError("invalid_frame", f"'{name}' entries must be among {sorted(allowed)}")
    if allowed is None and not all(is_device_id(item) for item in value):
        raise FrameError("invalid_frame", f"'{name}' entries must be device ids")
    return frozenset(value)


def parse_dashboard_frame(data: str | bytes) -> DashboardFrame:
    frame = _load_object(data)
    kind = frame.get("type")
    if kind == "subscribe":
        return Subscribe(_string_set(frame, "types", EVENT_TYPES), _string_set(frame, "ids", None))
    if kind == "resume":
        after = frame.get("after")
        if not isinstance(after, str) or not POSITION.fullmatch(after):
            raise FrameError(
                "invalid_frame",
                "'after' must be a cursor this gateway sent (a snapshot's or an events frame's)",
            )
        return Resume(after)
    if kind == "ping":
        return Ping()
    raise FrameError("unknown_type", "expected subscribe, resume or ping")
