"""Domain errors: what the store and the presence engine refuse, in their own words.

They know nothing of HTTP. Each names its problem kind (problems.py) so the REST endpoints map
it to `application/problem+json` at the edge, as they do `shadow.ShadowError`; the WebSocket
endpoints map the few they meet to handshake statuses and close codes.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """A refusal with a human-readable detail and optional machine-readable members."""

    problem: ClassVar[str] = "invalid-request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(GatewayError):
    problem = "invalid-request"


class InvalidDeviceId(GatewayError):
    problem = "invalid-device-id"


class InvalidDeviceType(GatewayError):
    problem = "invalid-device-type"


class InvalidCursor(GatewayError):
    """A cursor, stream id or position this gateway did not issue."""

    problem = "invalid-cursor"


class DeviceNotFound(GatewayError):
    problem = "device-not-found"

    def __init__(self, device_id: str) -> None:
        super().__init__(f"no device {device_id!r} is registered")
        self.device_id = device_id


class DeviceExists(GatewayError):
    problem = "device-exists"

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is already registered")
        self.device_id = device_id


class NotConfirmed(GatewayError):
    """A write landed on its primary, which failed before a replica confirmed it: it may be
    lost in the failover. Sending the same change again is safe."""

    problem = "redis-unavailable"


class Contention(GatewayError):
    """Concurrent writers kept moving what a compare-and-set write depends on: retry."""

    problem = "write-contention"


# --- commands (gateway/commands/) ---------------------------------------------------
class CommandNotFound(GatewayError):
    problem = "command-not-found"

    def __init__(self, device_id: str, command_id: str) -> None:
        super().__init__(f"device {device_id!r} has no command {command_id!r}")


class CommandFinished(GatewayError):
    """The command reached a final status already: it never changes again."""

    problem = "command-finished"

    def __init__(self, command_id: str, status: str) -> None:
        super().__init__(f"command {command_id!r} has ended ({status})", status=status)


class CommandExists(GatewayError):
    """A command with this id exists with other content: an id names one command."""

    problem = "command-exists"

    def __init__(self, command_id: str) -> None:
        super().__init__(
            f"command id {command_id!r} names another command of this device; "
            "send a new id, or the same name, params, timeout and ttl to get that command back"
        )


class CommandQueueFull(GatewayError):
    problem = "command-queue-full"

    def __init__(self, device_id: str, pending: int) -> None:
        super().__init__(
            f"device {device_id!r} has {pending} commands pending, the most it may queue; "
            "wait for some to finish or cancel them",
            pending=pending,
        )


class DeviceOffline(GatewayError):
    """A command with ttl 0 for a device that is not connected: nothing was stored."""

    problem = "device-offline"

    def __init__(self, device_id: str) -> None:
        super().__init__(
            f"device {device_id!r} is not connected, and a command with ttl 0 is only "
            "delivered to a connected device; nothing was stored"
        )
