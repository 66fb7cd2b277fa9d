"""uvicorn's sans-I/O WebSocket protocol, with three changes the gateway needs.

- Read back-pressure by a high-water mark. uvicorn pauses reading after every message and
  resumes when the app takes it: two `epoll_ctl` calls and the selector bookkeeping around
  them for each frame, about a fifth of the gateway's CPU when devices stream reports. Here
  reading pauses only once `READ_HIGH_WATER` messages wait for the app, and resumes (as
  before) when it has taken them all. A socket still never holds more than that many unread
  messages, each bounded by the frame size limit.
- A refused handshake is not an error. uvicorn never marks the handshake done after a denial
  response (`websocket.http.response.*`, what Starlette's `send_denial_response` sends), so
  every refused token was logged at ERROR as an app that "returned without completing
  handshake".
- A close the gateway sends ends the TCP connection promptly: after the close frame the peer
  has `CLOSE_TIMEOUT` to answer, then the transport is aborted (uvicorn waits 10 s, then
  closes gracefully, which a peer that does not read can hold up further). A frame the
  WebSocket layer refuses (too large, not UTF-8) gets a close frame with the gateway's reason
  token (`frame_too_large`, …) and the same bounded wait, instead of a close with the rest of
  the frame unread, which makes the kernel reset the connection and may destroy the close
  frame before the peer reads it.

The hot path (a frame in, a frame out) runs uvicorn's code unchanged but for the pause check.
"""

from __future__ import annotations

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Close, Frame, Opcode

from gateway import disconnect

READ_HIGH_WATER = 4
CLOSE_TIMEOUT = 2.0  # seconds a peer has to answer the gateway's close frame


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

    async def run_asgi(self) -> None:
        """uvicorn's, but a denial response completes the handshake, and a close frame the
        app sent waits at most `CLOSE_TIMEOUT` for the peer's answer."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            # a denial response is written whole, then marked `close_sent`, never complete
            if not (self.handshake_complete or self.close_sent):
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.close_timer is None:
            self.transport.close()
        else:
            self._linger()

    def handle_parser_exception(self) -> None:
        """The peer sent what the WebSocket layer refuses: close with the gateway's token."""
        if self.close_sent:
            return  # closing already: the rest of what arrives is discarded
        self.handle_events()  # frames that came whole before the refused one still count
        if self.transport.is_closing():  # among them, the peer's own close
            return
        refused = self.conn.close_sent
        self.conn.data_to_send()  # websockets' close frame, its reason in prose: ours instead
        if refused is None:  # the layer sent no close frame: nothing to wait for
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
            self.close_sent = True
            self.transport.close()
            return
        close = disconnect.protocol_close(refused.code)
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": close.code, "reason": close.reason}
        )
        frame = Frame(Opcode.CLOSE, Close(close.code, close.reason).serialize())
        self.transport.write(frame.serialize(mask=False))
        self.close_sent = True
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the peer sees the end at once: no reply needed
        self._linger()

    def _linger(self) -> None:
        """Our close frame is out: read (and discard) until the peer closes, at most
        `CLOSE_TIMEOUT`, then drop the connection however it stands."""
        if self.close_timer is not None:
            self.close_timer.cancel()
        if self.read_paused:  # the peer's close frame or end of stream must still be seen
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
