"""One device's live session: its frames in, its commands and acks out.

The per-connection protocol (centrifuge's client.go): the endpoint authenticates and hands
the socket over; this class keeps the device's reported document (it owns that section while
connected), answers frames, and relays its command channel.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import orjson
from starlette.websockets import WebSocket

from gateway import disconnect, protocol, shadow
from gateway.ratelimit import TokenBucket
from gateway.writer import Relay, Writer

if TYPE_CHECKING:
    from gateway.runtime import Gateway


class DeviceSession:
    # thousands per process: no per-instance __dict__
    __slots__ = (
        "bucket", "close_reason", "desired", "device_id", "gateway", "last_activity", "limits",
        "malformed", "refused", "reported", "reported_meta", "session", "version",
        "websocket", "writer",
    )  # fmt: skip

    def __init__(
        self,
        gateway: Gateway,
        websocket: WebSocket,
        device_id: str,
        session: str,
    ) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.websocket = websocket
        self.device_id = device_id
        self.session = session
        self.writer = Writer(websocket, settings.send_queue_size, self._slow)
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
        self.limits = gateway.store.limits
        self.reported: shadow.Document = {}
        self.reported_meta: shadow.Document = {}
        self.desired: shadow.Document = {}
        self.version = 0
        self.malformed = 0
        self.refused = 0
        self.close_reason: str | None = None
        self.last_activity = time.time()

    def _slow(self) -> None:
        self.close_reason = "slow_consumer"
        self.gateway.metrics.slow_clients.labels("device").inc()

    # --- outgoing -----------------------------------------------------------
    def send(self, frame: bytes, kind: str, relay: Relay | None = None) -> None:
        if self.writer.send(frame, relay):
            self.gateway.metrics.out(kind).inc()

    def close(self, close: disconnect.Close) -> None:
        if self.close_reason is None:
            self.close_reason = close.reason
        self.writer.close(close)

    def ended(self) -> None:
        """The connection is closing already (its disconnect arrived): send nothing more."""
        self.writer.closed = True  # a frame still queued fails quietly; no close frame follows

    def deliver_command(self, data: bytes, received: float | None = None) -> None:
        """Relay a command-channel message as is, then the delta it leaves.

        *received*: when the message came off Redis (`time.perf_counter()`), for the relay
        latency histogram; None for frames the gateway makes up itself (a re-sync).
        """
        relay = None if received is None else Relay(received, self.gateway.metrics.relay_command)
        self.send(data, "command", relay)
        desired = protocol.parse_command(data)
        if desired is None:
            return
        self.desired = desired
        version = protocol.command_version(data)
        if version is not None:
            self.version = max(self.version, version)
        self.send(protocol.delta_frame(shadow.delta(desired, self.reported), version), "delta")

    def welcome(self, desired: bytes, reported: bytes, meta: bytes, version: int) -> None:
        self.desired = shadow.decode_document(desired)
        self.reported = shadow.decode_document(reported)
        self.reported_meta = shadow.decode_document(meta)
        self.version = version
        settings = self.gateway.settings
        self.send(
            protocol.welcome(
                self.device_id, self.session, settings.heartbeat_timeout,
                self.desired, self.reported, version, settings.max_frame_bytes,
            ),
            "welcome",
        )  # fmt: skip

    # --- incoming -----------------------------------------------------------
    def receive(self, data: str | bytes | None, binary: bool) -> None:
        """Handle one frame; every frame renews presence, even one that is refused."""
        presence = self.gateway.presence
        self.last_activity = time.time()
        if not self.bucket.take():
            presence.beat(self.device_id, self.session)  # refused, but still a sign of life
            self.refused += 1
            self.gateway.metrics.rejected.labels("rate_limited").inc()
            if self.refused > self.gateway.settings.rate_burst:
                self.close(disconnect.RATE_LIMITED)
            else:
                self.send(protocol.error("rate_limited", "too many frames; slow down"), "error")
            return
        self.refused = 0
        try:
            if binary:
                presence.beat(self.device_id, self.session)
                raise protocol.FrameError("binary_frame", "frames must be JSON text, not binary")
            frame = protocol.parse_device_frame(data or "", self.limits)
        except protocol.FrameError as exc:
            presence.beat(self.device_id, self.session)
            self._refuse(exc)
            return
        if isinstance(frame, protocol.Heartbeat):
            self.gateway.metrics.in_heartbeat.inc()
            if frame.reported is None:
                presence.beat(self.device_id, self.session)
            else:
                self._write_reported(frame.reported, shadow.stamp(frame.reported, time.time()))
        elif isinstance(frame, protocol.Report):
            self.gateway.metrics.in_report.inc()
            merged = shadow.merge(self.reported, frame.patch)
            try:
                shadow.check_size(merged, self.limits)
            except shadow.ShadowError as exc:
                presence.beat(self.device_id, self.session)
                self._refuse(protocol.FrameError("state_too_large", exc.detail, frame.request_id))
                return
            stamps = shadow.merge_stamps(self.reported_meta, frame.patch, time.time())
            waiter = self._write_reported(merged, stamps, ack=True)
            if waiter is not None:
                request_id = frame.request_id
                waiter.add_done_callback(lambda done: self._acked(request_id, done))
        else:
            self.gateway.metrics.in_get.inc()
            written = presence.beat(self.device_id, self.session, ack=True)
            asyncio.get_running_loop().create_task(self._answer_get(frame.request_id, written))

    def _write_reported(
        self, document: shadow.Document, stamps: shadow.Document, ack: bool = False
    ) -> asyncio.Future[int] | None:
        self.reported, self.reported_meta = document, stamps
        return self.gateway.presence.beat(
            self.device_id, self.session, orjson.dumps(document), orjson.dumps(stamps), ack=ack
        )

    def _acked(self, request_id: str | int | None, done: asyncio.Future[int]) -> None:
        if done.cancelled():
            return
        version = done.result()
        if version > 0:
            self.version = version
            self.send(protocol.ack(request_id, version), "ack")
        # ≤ 0: the session was replaced or the device deleted; the hub is closing the socket

    async def _answer_get(
        self, request_id: str | int | None, written: asyncio.Future[int] | None = None
    ) -> None:
        if written is not None:
            await asyncio.wait([written])  # earlier reports of this device land first
        device = await self.gateway.store.get(self.device_id)
        if device is None:
            return
        self.desired = device.desired_state
        self.send(
            protocol.shadow_frame(
                request_id, device.desired_state, device.reported_state, device.version
            ),
            "shadow",
        )

    def _refuse(self, error: protocol.FrameError) -> None:
        self.malformed += 1
        self.gateway.metrics.rejected.labels(error.code).inc()
        if self.malformed > self.gateway.settings.malformed_tolerance:
            self.close(disconnect.MALFORMED)
        else:
            self.send(protocol.error(error.code, error.message, error.request_id), "error")
