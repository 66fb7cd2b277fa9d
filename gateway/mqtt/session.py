"""An MQTT device's session in the process that took it: what the hub delivers, published.

The process whose `online` took the session (mqtt_connect.lua) holds it, as a WebSocket
session is held by the process with the socket: the hub hands it the device's command frames
(named for this session, so exactly one process publishes each) and desired-state changes, and
kicks it when another session takes the device over. The device's messages themselves may
reach any process (gateway/mqtt/ingest.py).
"""

from __future__ import annotations

import time
from typing import Protocol

from gateway import disconnect, protocol, shadow


class Outlet(Protocol):
    """The bridge, as a session uses it."""

    def publish_command(self, device_id: str, frame: bytes) -> None: ...
    def publish_desired(self, device_id: str) -> None: ...
    def release(self, session: MqttSession) -> None: ...


class _Closed:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class MqttSession:
    __slots__ = (
        "desired", "desired_seen", "device_id", "last_activity", "outlet", "session", "taken",
        "writer",
    )  # fmt: skip

    def __init__(self, outlet: Outlet, device_id: str, session: str) -> None:
        self.outlet = outlet
        self.device_id = device_id
        self.session = session  # `mqtt:` and the device's own
        self.desired: shadow.Document = {}
        self.desired_seen = 0  # desired states received: a re-sync read before one sends nothing
        self.last_activity = time.time()
        self.writer = _Closed()  # the hub reads `writer.closed`, as of a socket's writer
        self.taken = False  # set once its `online` took the session in Redis

    transport = "mqtt"

    def deliver_frame(self, frame: bytes, kind: str) -> None:
        """A command frame the gateway made for this session."""
        if not self.writer.closed:
            self.outlet.publish_command(self.device_id, frame)

    def deliver_command(self, data: bytes, received: float | None = None) -> None:
        """A command-channel message: a desired change republishes the retained `desired`;
        any other message that is not the gateway's own is relayed on `commands` as is."""
        if self.writer.closed or protocol.is_gateway_message(data):
            return
        desired = protocol.parse_command(data)
        if desired is None:
            self.outlet.publish_command(self.device_id, data)
            return
        self.desired = desired
        self.desired_seen += 1
        self.outlet.publish_desired(self.device_id)

    def close(self, close: disconnect.Close) -> None:
        """Replaced, deleted or released: this process stops publishing for the session (the
        device's broker connection is the broker's to end)."""
        if self.writer.closed:
            return
        self.writer.closed = True
        self.outlet.release(self)
