"""One device's live session: its frames in, its commands and acks out.

The per-connection protocol (centrifuge's client.go): the endpoint authenticates and hands
the socket over; this class keeps the device's reported document (it owns that section while
connected), answers frames, and relays its command channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, assert_never

import orjson
from starlette.websockets import WebSocket

from gateway import disconnect, protocol, shadow
from gateway.commands.queue import Finished, ResultIn
from gateway.metrics import Metrics
from gateway.ratelimit import TokenBucket
from gateway.writer import Relay, Writer


class Shadow(Protocol):
    """What a `get` frame answers with (the store's Device)."""

    @property
    def desired_state(self) -> shadow.Document: ...
    @property
    def reported_state(self) -> shadow.Document: ...
    @property
    def version(self) -> int: ...


class CommandResults(Protocol):
    """The command service, as a session uses it: finish commands with the device's results."""

    def submit(self, result: ResultIn) -> asyncio.Future[Finished]: ...


class Beats(Protocol):
    """The presence engine, as a session uses it: note activity for the next tick."""

    def beat(
        self,
        device_id: str,
        session: str,
        reported: bytes | None = None,
        reported_meta: bytes = b"{}",
        ack: bool = False,
        seen_at: float | None = None,
    ) -> asyncio.Future[int] | None: ...


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every device session of a process shares: its few collaborators and its limits,
    built once (a session never sees the whole gateway)."""

    presence: Beats
    read_shadow: Callable[[str], Awaitable[Shadow | None]]
    commands: CommandResults
    metrics: Metrics
    limits: shadow.Limits
    heartbeat_timeout: float
    max_frame_bytes: int
    rate_limit: float
    rate_burst: int
    malformed_tolerance: int
    send_queue_size: int


class DeviceSession:
    # thousands per process: no per-instance __dict__
    __slots__ = (
        "bucket", "close_reason", "context", "desired", "desired_seen", "device_id", "held",
        "last_activity",
        "malformed", "refused", "reported", "reported_encoded", "reported_meta", "session",
        "version", "websocket", "writer",
    )  # fmt: skip

    def __init__(
        self,
        context: SessionContext,
        websocket: WebSocket,
        device_id: str,
        session: str,
    ) -> None:
        self.context = context
        self.websocket = websocket
        self.device_id = device_id
        self.session = session
        self.writer = Writer(websocket, context.send_queue_size, self._slow)
        self.bucket = TokenBucket(context.rate_limit, context.rate_burst)
        self.reported: shadow.Document = {}
        # the reported document as last written (or found at connect): a heartbeat that
        # repeats it byte for byte is a bare heartbeat, nothing of the shadow rewritten
        self.reported_encoded = b""
        self.reported_meta: shadow.Document = {}
        self.desired: shadow.Document = {}
        # how many desired states this session was given: a re-sync notes it before it reads,
        # and sends nothing if one came meanwhile (that one is at least as new as its read)
        self.desired_seen = 0
        self.version = 0
        self.malformed = 0
        self.refused = 0
        self.close_reason: str | None = None
        self.last_activity = time.time()
        # what the broker delivered before the welcome went out: sent right after it, so the
        # welcome is always the first frame and a device's commands keep their order
        self.held: list[tuple[bytes, str | None]] | None = []

    def _slow(self) -> None:
        self.close_reason = "slow_consumer"
        self.context.metrics.slow_clients.labels("device").inc()

    # --- outgoing -----------------------------------------------------------
    def send(self, frame: bytes, kind: str, relay: Relay | None = None) -> None:
        if self.writer.send(frame, relay):
            self.context.metrics.out(kind).inc()

    def close(self, close: disconnect.Close) -> None:
        if self.close_reason is None:
            self.close_reason = close.reason
        self.writer.close(close)

    def ended(self) -> None:
        """The connection is closing already (its disconnect arrived): send nothing more."""
        self.writer.closed = True  # a frame still queued fails quietly; no close frame follows

    def deliver_frame(self, frame: bytes, kind: str) -> None:
        """A frame the gateway made for this session (a command), after the welcome."""
        if self.held is not None:
            self._hold(frame, kind)
            return
        self.send(frame, kind)

    def _hold(self, data: bytes, kind: str | None) -> None:
        assert self.held is not None
        if len(self.held) >= self.context.send_queue_size:
            self.close(disconnect.TOO_SLOW)
            return
        self.held.append((data, kind))

    def deliver_command(self, data: bytes, received: float | None = None) -> None:
        """Relay a command-channel message as is, then the delta it leaves.

        *received*: when the message came off Redis (`time.perf_counter()`), for the relay
        latency histogram; None for frames the gateway makes up itself (a re-sync).
        """
        if self.held is not None:
            self._hold(data, None)
            return
        if protocol.is_gateway_message(data):
            return  # a message of a type the gateway owns, not from the gateway: not relayed
        relay = None if received is None else Relay(received, self.context.metrics.relay_command)
        self.send(data, "command", relay)
        desired = protocol.parse_command(data)
        if desired is None:
            return
        self.desired = desired
        self.desired_seen += 1
        version = protocol.command_version(data)
        if version is not None:
            self.version = max(self.version, version)
        self.send(protocol.delta_frame(shadow.delta(desired, self.reported), version), "delta")

    def welcome(
        self,
        desired: bytes,
        reported: bytes,
        meta: bytes,
        version: int,
        commands: Sequence[bytes] = (),
    ) -> None:
        """The first frame, then the device's pending *commands* (oldest first), then what
        the broker delivered meanwhile."""
        self.desired = shadow.decode_document(desired)
        self.reported = shadow.decode_document(reported)
        self.reported_encoded = reported
        self.reported_meta = shadow.decode_stamps(meta, self.reported)
        self.version = version
        self.desired_seen += 1
        context = self.context
        self.send(
            protocol.welcome(
                self.device_id, self.session, context.heartbeat_timeout,
                self.desired, self.reported, version, context.max_frame_bytes,
            ),
            "welcome",
        )  # fmt: skip
        for frame in commands:
            self.send(frame, "command")
        held, self.held = self.held, None
        for data, kind in held or ():
            if kind is None:
                self.deliver_command(data)
            else:
                self.send(data, kind)

    # --- incoming -----------------------------------------------------------
    def receive(self, data: str | bytes | None, binary: bool) -> None:
        """Handle one frame; every frame renews presence, even one that is refused."""
        context = self.context
        presence = context.presence
        self.last_activity = time.time()
        if not self.bucket.take():
            presence.beat(self.device_id, self.session)  # refused, but still a sign of life
            self.refused += 1
            context.metrics.rejected.labels("rate_limited").inc()
            if self.refused > context.rate_burst:
                self.close(disconnect.RATE_LIMITED)
            else:
                self.send(protocol.error("rate_limited", "too many frames; slow down"), "error")
            return
        self.refused = 0
        try:
            if binary:
                presence.beat(self.device_id, self.session)
                raise protocol.FrameError("binary_frame", "frames must be JSON text, not binary")
            frame = protocol.parse_device_frame(data or "", context.limits)
        except protocol.FrameError as exc:
            presence.beat(self.device_id, self.session)
            self._refuse(exc)
            return
        match frame:
            case protocol.Heartbeat():
                context.metrics.in_heartbeat.inc()
                document = frame.reported
                encoded = document_to_write(self.reported_encoded, document)
                if document is None or encoded is None:
                    presence.beat(self.device_id, self.session)
                else:
                    stamps = shadow.stamp(document, time.time())
                    self._write_reported(document, stamps, encoded=encoded)
            case protocol.Report():
                context.metrics.in_report.inc()
                self._report(frame)
            case protocol.Get():
                context.metrics.in_get.inc()
                written = presence.beat(self.device_id, self.session, ack=True)
                asyncio.get_running_loop().create_task(self._answer_get(frame.request_id, written))
            case protocol.CommandResult():
                context.metrics.in_command_result.inc()
                presence.beat(self.device_id, self.session)
                self._command_result(frame)
            case _:
                assert_never(frame)

    def _command_result(self, frame: protocol.CommandResult) -> None:
        result = ResultIn(self.device_id, frame.command_id, frame.status, frame.result, frame.error)
        finished = self.context.commands.submit(result)
        request_id, command_id = frame.request_id, frame.command_id

        def answer(done: asyncio.Future[Finished]) -> None:
            if done.cancelled() or done.exception() is not None:
                return  # the process is stopping: the device sends it again on the re-send
            outcome = done.result()
            if outcome.code == 1:
                self.send(protocol.command_ack(request_id, command_id, outcome.status), "ack")
            else:
                status = outcome.status if outcome.code == -1 else None
                self.send(protocol.command_refused(request_id, command_id, status), "error")

        finished.add_done_callback(answer)

    def _report(self, frame: protocol.Report) -> None:
        merged = shadow.merge(self.reported, frame.patch)
        try:
            shadow.check_size(merged, self.context.limits)
        except shadow.ShadowError as exc:
            self.context.presence.beat(self.device_id, self.session)
            self._refuse(protocol.FrameError("state_too_large", exc.detail, frame.request_id))
            return
        stamps = shadow.merge_stamps(self.reported_meta, frame.patch, time.time())
        waiter = self._write_reported(merged, stamps, ack=True)
        if waiter is not None:
            request_id = frame.request_id
            waiter.add_done_callback(lambda done: self._acked(request_id, done))

    def _write_reported(
        self,
        document: shadow.Document,
        stamps: shadow.Document,
        ack: bool = False,
        encoded: bytes | None = None,
    ) -> asyncio.Future[int] | None:
        self.reported, self.reported_meta = document, stamps
        self.reported_encoded = orjson.dumps(document) if encoded is None else encoded
        return self.context.presence.beat(
            self.device_id,
            self.session,
            self.reported_encoded,
            shadow.encode_stamps(stamps),
            ack=ack,
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
        device = await self.context.read_shadow(self.device_id)
        if device is None:
            return
        self.desired = device.desired_state
        self.desired_seen += 1
        self.send(
            protocol.shadow_frame(
                request_id, device.desired_state, device.reported_state, device.version
            ),
            "shadow",
        )

    def _refuse(self, error: protocol.FrameError) -> None:
        self.malformed += 1
        self.context.metrics.rejected.labels(error.code).inc()
        if self.malformed > self.context.malformed_tolerance:
            self.close(disconnect.MALFORMED)
        else:
            self.send(protocol.error(error.code, error.message, error.request_id), "error")


def document_to_write(written: bytes, document: shadow.Document | None) -> bytes | None:
    """The encoded reported document a heartbeat writes, or None when it has none or repeats
    the one its session last wrote byte for byte: then it is a bare heartbeat in Redis (the
    session owns its reported section, so nothing else changed it through the gateway)."""
    if document is None:
        return None
    encoded = orjson.dumps(document)
    return None if encoded == written else encoded
