"""uvicorn's sans-I/O WebSocket protocol with read back-pressure by a high-water mark.

uvicorn pauses reading after every message and resumes when the app takes it: two
`epoll_ctl` calls and the selector bookkeeping around them for each frame, about a fifth of
the gateway's CPU when devices stream reports. Here reading pauses only once
`READ_HIGH_WATER` messages wait for the app, and resumes (as before) when it has taken them
all. Back-pressure is kept: a socket never holds more than that many unread messages, each
bounded by the frame size limit.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

READ_HIGH_WATER = 4


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def send_receive_event_to_app(self) -> None:
        # uvicorn pauses when `read_paused` is false; claim it is set so it leaves the
        # decision to the high-water mark below, then put the real state back
        paused = self.read_paused
        self.read_paused = True
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = paused
        if not paused and self.queue.qsize() >= READ_HIGH_WATER:
            self.read_paused = True
            self.transport.pause_reading()
