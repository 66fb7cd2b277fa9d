"""The in-process registry of live device sessions, and fan-out to them.

Everything here runs on the event loop without awaiting a socket: delivering a command is
enqueueing on the session's writer. The broker calls in; the device endpoint registers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Protocol

import orjson

from gateway import disconnect, shadow

log = logging.getLogger("gateway.hub")
RESYNC_CHUNK = 500


class Closable(Protocol):
    @property
    def closed(self) -> bool: ...


class LiveSession(Protocol):
    """A device session as the hub sees it (gateway.device_session.DeviceSession)."""

    device_id: str
    session: str
    desired: shadow.Document
    desired_seen: int
    last_activity: float

    @property
    def writer(self) -> Closable: ...
    def deliver_command(self, data: bytes, received: float | None = None) -> None: ...
    def deliver_frame(self, frame: bytes, kind: str) -> None: ...
    def close(self, close: disconnect.Close) -> None: ...


class DeviceHub:
    """Live sessions by device id (at most one per device in this process)."""

    def __init__(self, heartbeat_timeout: float = 60.0) -> None:
        # a device silent for nearly the whole timeout is expiring honestly: only one whose
        # last frame is clearly inside it had its key lost (Redis restarted, or stalled)
        self.active_window = heartbeat_timeout - max(0.05, min(2.0, heartbeat_timeout / 4))
        self.sessions: dict[str, LiveSession] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: LiveSession) -> None:
        previous = self.sessions.get(session.device_id)
        self.sessions[session.device_id] = session
        if previous is not None and previous is not session:
            previous.close(disconnect.REPLACED)

    def remove(self, session: LiveSession) -> bool:
        """Forget *session*; True when it was the device's live one here."""
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
            return True
        return False

    def active_session(self, device_id: str) -> tuple[str, float] | None:
        """(session, last frame time) of *device_id*'s local socket if clearly active."""
        session = self.sessions.get(device_id)
        if session is None or session.writer.closed:
            return None
        if time.time() - session.last_activity > self.active_window:
            return None
        return session.session, session.last_activity

    # --- what the broker delivers ---------------------------------------------
    def on_command(self, device_id: str, data: bytes) -> None:
        session = self.sessions.get(device_id)
        if session is not None:
            session.deliver_command(data, time.perf_counter())

    def deliver_frame(self, device_id: str, session_id: str, frame: bytes, kind: str) -> bool:
        """Write a frame made for one session, if that session lives here; True if it does."""
        session = self.sessions.get(device_id)
        if session is None or session.session != session_id or session.writer.closed:
            return False
        session.deliver_frame(frame, kind)
        return True

    def on_control(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict) or message.get("op") != "kick":
            return
        session = self.sessions.get(str(message.get("device_id")))
        if session is not None and session.session == message.get("session"):
            session.close(disconnect.by_reason(str(message.get("reason"))))

    def stale(self, device_id: str, session_id: str, code: int) -> None:
        """The presence engine found a session that is no longer current (or a deleted device)."""
        session = self.sessions.get(device_id)
        if session is not None and session.session == session_id:
            session.close(disconnect.REPLACED if code == -1 else disconnect.DELETED)

    # --- re-sync after a subscription was lost and restored ---------------------
    def resync_targets(self, device_ids: Collection[str] | None = None) -> list[LiveSession]:
        """Local sessions among *device_ids* (None: all of them)."""
        if device_ids is None:
            return list(self.sessions.values())
        return [s for d in device_ids if (s := self.sessions.get(d)) is not None]

    @staticmethod
    def resync_one(
        session: LiveSession, desired_raw: bytes | None, version: int, seen: int | None = None
    ) -> bool:
        """Send the current desired state if it moved while no message could arrive.

        *seen*: the session's `desired_seen` before the read. The channel was live again
        before the read, so a state the session got since is at least as new as the one
        read: sending the read after it would take back the device's newest change."""
        if seen is not None and session.desired_seen != seen:
            return False
        desired = shadow.decode_document(desired_raw)
        if shadow.same(desired, session.desired):
            return False
        session.deliver_command(
            orjson.dumps(
                {
                    "type": "state_update",
                    "desired_state": desired,
                    "version": version,
                    "resync": True,
                }
            )
        )
        return True
