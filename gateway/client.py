"""The Python device client: one device's session with the gateway, kept alive.

`DeviceClient` connects to `/ws/devices/{id}`, heartbeats at a fraction of the timeout the
gateway announces, answers desired-state changes through a callback, and reconnects with
full-jitter exponential backoff when the connection is lost or the gateway restarts. It stops,
raising `DeviceRejected`, when reconnecting cannot help: a refused token or id at the handshake,
a deleted device or rotated token (1008), or a newer session of the same device (4409).

The device owns its reported document: the client keeps it locally, merges acknowledged
reports into it, and re-sends it after a reconnect when the gateway's copy differs (resume).

No frame larger than the gateway accepts is ever sent: the welcome announces the limit
(`max_frame_bytes`; `DEFAULT_MAX_FRAME_BYTES` until then), a request over it raises
`FrameTooLarge` at once, and a frame that still drew a 1009 close (a proxy with a smaller
limit, say) lowers the limit below its size, so it is never sent again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
import random
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway import disconnect, shadow

log = logging.getLogger("gateway.client")

DesiredCallback = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None] | None]
# (name, params) -> result: async or plain (a plain one runs in a worker thread)
CommandHandler = Callable[
    [str, dict[str, Any]], Awaitable[dict[str, Any] | None] | dict[str, Any] | None
]

# Handshake statuses that retrying cannot fix: no token, wrong token, unknown or invalid id.
REJECTED_STATUSES = frozenset({400, 401, 403, 404, 410, 422})
# Close codes that mean "this client misbehaved": the backoff keeps growing across them.
PENALTY_CODES = frozenset({1002, 1007, 1009, 4400, 4408, 4429})
# The gateway's default frame limit, assumed until a welcome announces the real one.
DEFAULT_MAX_FRAME_BYTES = 65536
NO_RECONNECT = frozenset(close.code for close in disconnect.TABLE if not close.reconnect)
MAX_EXPONENT = 62
HEARTBEAT = orjson.dumps({"type": "heartbeat"})
# commands answered, remembered by id: the gateway sends a command again when it cannot know
# the answer arrived (a dropped connection), and the answer is sent again, never recomputed
ANSWERS_KEPT = 1000
MAX_ERROR_LENGTH = 1024


class DeviceRejected(Exception):
    """The gateway refused this device for good: reconnecting would not help.

    `code` is the HTTP status of a refused handshake (401, 403, 404) or the WebSocket close
    code of an ended session (1008 deleted / token rotated, 4409 replaced by a newer session).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"device rejected by the gateway: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class RequestFailed(Exception):
    """The gateway answered a request (`report`, `get`) with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ConnectionError):
    """The connection ended before the gateway answered; the outcome is unknown."""


class FrameTooLarge(ValueError):
    """A frame over the gateway's size limit: refused here, never sent (nor re-sent)."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} would be a {size:,}-byte frame; the gateway accepts at most {limit:,} bytes"
        )
        self.size = size
        self.limit = limit


def backoff_delay(
    attempt: int, minimum: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Full jitter: uniform in [0, min(maximum, minimum · 2^attempt)].

    Spreading reconnects over the whole window keeps a fleet that lost the same gateway
    from reconnecting in lockstep (AWS architecture blog, "Exponential Backoff And Jitter").
    """
    ceiling = maximum if attempt >= MAX_EXPONENT else min(maximum, minimum * 2**attempt)
    return (rng or random).uniform(0.0, max(0.0, ceiling))


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    patch: dict[str, Any] | None  # a report's patch, merged locally once acknowledged
    size: int  # of its frame, in bytes


@dataclass(slots=True)
class _Ended:
    """How one connection ended: its close code (None: never opened or no close frame)."""

    code: int | None
    welcomed: bool


class DeviceClient:
    """One device's live session with the gateway; see the module docstring."""

    def __init__(
        self,
        url: str,
        device_id: str,
        token: str,
        *,
        heartbeat_fraction: float = 1 / 3,
        on_desired: DesiredCallback | None = None,
        on_command: CommandHandler | None = None,
        reported: dict[str, Any] | None = None,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        open_timeout: float = 10.0,
        request_timeout: float = 10.0,
    ) -> None:
        if not 0 < heartbeat_fraction < 1:
            raise ValueError(f"heartbeat_fraction must be in (0, 1), got {heartbeat_fraction}")
        if not 0 <= backoff_min <= backoff_max:
            raise ValueError("backoff bounds must satisfy 0 ≤ backoff_min ≤ backoff_max")
        self.url = url.rstrip("/") + "/ws/devices/" + urllib.parse.quote(device_id, safe="")
        self.device_id = device_id
        self.heartbeat_fraction = heartbeat_fraction
        self.on_desired = on_desired
        self.on_command = on_command
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self._headers = {"Authorization": f"Bearer {token}"}
        self.connected = asyncio.Event()
        self.desired: dict[str, Any] = {}
        self.version = 0
        self.session: str | None = None
        self.heartbeat_timeout: float | None = None
        self.connects = 0  # sessions opened so far (welcome received)
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES  # the largest frame this client sends
        self._frame_ceiling: int | None = None  # below the smallest frame closed with 1009
        self._largest_sent = 0  # on the current connection: the frame a 1009 close refused
        self._reported: dict[str, Any] | None = None
        if reported is not None:
            self.set_reported(reported)
        self._known: dict[str, Any] | None = None  # the gateway's reported copy, as we know it
        self._ws: ClientConnection | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._callbacks: asyncio.Queue[tuple[dict[str, Any], dict[str, Any]]] = asyncio.Queue()
        self._commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answers: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._working: str | None = None  # the command whose handler runs now
        self._queued: set[str] = set()  # commands waiting for the handler
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._rng = random.Random()

    # --- public API ---------------------------------------------------------
    @property
    def reported(self) -> dict[str, Any] | None:
        """The device's own reported document (None until known)."""
        return None if self._reported is None else dict(self._reported)

    def set_reported(self, document: dict[str, Any]) -> None:
        """Replace the local reported document; the next heartbeat carries it if it changed.

        Raises `FrameTooLarge` (and keeps the old document) when it could never be sent.
        """
        frame = orjson.dumps({"type": "heartbeat", "reported_state": document})
        self._check_size("this reported document", len(frame))
        self._reported = dict(document)

    async def run(self) -> None:
        """Connect and keep the session until `close()`; raise `DeviceRejected` when refused.

        Cancelling is safe: the connection is closed and pending requests fail.
        """
        if self._running:
            raise RuntimeError("this DeviceClient is already running")
        self._running = True
        callbacks = asyncio.create_task(self._run_callbacks(), name=f"{self.device_id} callbacks")
        commands = asyncio.create_task(self._run_commands(), name=f"{self.device_id} commands")
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    ended = await self._connect_once()
                except DeviceRejected as exc:
                    log.warning("%s: %s; not reconnecting", self.device_id, exc)
                    raise
                if self._stop.is_set():
                    return
                if ended.welcomed and ended.code not in PENALTY_CODES:
                    attempt = 0
                delay = backoff_delay(attempt, self.backoff_min, self.backoff_max, self._rng)
                attempt += 1
                log.info("%s: reconnecting in %.2f s (close code %s)", self.device_id, delay,
                         ended.code)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            self._running = False
            self.connected.clear()
            for task in (callbacks, commands):
                task.cancel()
            for task in (callbacks, commands):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def report(self, patch: dict[str, Any]) -> int:
        """Merge *patch* into the reported document (`null` deletes); return the new version.

        Waits for a connection if there is none, then for the matching `ack`. Raises
        `FrameTooLarge` before sending a frame over the gateway's limit (nothing changes),
        `RequestFailed` on an error frame, `ConnectionLost` if the connection ends first (the
        patch stays in the local document and is re-sent on resume), `TimeoutError` after
        `request_timeout` (wrap in `asyncio.timeout` for less). Cancelling is safe: a late
        ack still updates the local document, nothing is sent twice.
        """
        answer = await self._request({"type": "report", "reported_state": patch}, patch)
        version = answer.get("version")
        return version if isinstance(version, int) else self.version

    async def get(self) -> dict[str, Any]:
        """The device's shadow: `desired_state`, `reported_state`, `delta`, `version`.

        Raises like `report`. Cancelling is safe.
        """
        answer = await self._request({"type": "get"}, None)
        return {key: value for key, value in answer.items() if key not in ("type", "id")}

    async def close(self) -> None:
        """Close the session with 1000 and stop reconnecting, for good. Cancelling is safe."""
        self._stop.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._task is not None:
            await asyncio.wait({self._task})  # its outcome is for wait(); ours may be cancelled

    async def wait(self) -> None:
        """Wait until the task started by `async with` ends; raise what ended it.

        Cancelling is safe: it does not stop the client.
        """
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __aenter__(self) -> DeviceClient:
        """Start `run()` in a task and wait for the first welcome (or the refusal)."""
        self._task = asyncio.create_task(self.run(), name=f"{self.device_id} client")
        waiter = asyncio.create_task(self.connected.wait())
        try:
            await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (a timeout): no __aexit__ will stop the task
            await self.close()
            raise
        finally:
            waiter.cancel()
        if self._task.done():
            self._task.result()  # raises DeviceRejected (or whatever stopped run)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        if self._task is not None and not self._task.cancelled():
            self._task.exception()  # seen through wait() or the log, never raised on exit

    # --- one connection -----------------------------------------------------
    async def _connect_once(self) -> _Ended:
        """Open, welcome, read until closed. Raises only DeviceRejected (and cancellation)."""
        try:
            ws = await connect(
                self.url, additional_headers=self._headers, open_timeout=self.open_timeout
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in REJECTED_STATUSES:
                raise DeviceRejected(status, _detail(exc.response.body)) from None
            log.warning("%s: handshake refused with HTTP %d", self.device_id, status)
            return _Ended(None, False)
        except (OSError, TimeoutError, EOFError, InvalidHandshake, ConnectionClosed) as exc:
            log.warning("%s: cannot connect: %s", self.device_id, exc)
            return _Ended(None, False)
        welcomed = False
        heartbeats: asyncio.Task[None] | None = None
        try:
            if self._stop.is_set():
                await ws.close()
                return _Ended(1000, False)
            self._ws = ws
            self._largest_sent = 0
            async with asyncio.timeout(self.open_timeout):
                first = await ws.recv()
            self._welcome(_load(first))
            welcomed = True
            await self._resume(ws)  # before any report can be sent on this connection
            self.connects += 1
            self.connected.set()
            heartbeats = asyncio.create_task(self._heartbeats(ws), name="heartbeats")
            async for raw in ws:
                self._dispatch(_load(raw))
        except ConnectionClosed:
            pass
        except (OSError, TimeoutError, ValueError) as exc:  # dead peer, silent gateway, bad JSON
            log.warning("%s: connection failed: %s", self.device_id, exc)
        finally:
            self.connected.clear()
            self._ws = None
            if heartbeats is not None:
                heartbeats.cancel()
            if ws.close_code == disconnect.TOO_BIG.code:
                self._lower_frame_limit()
            self._fail_pending()
            await ws.close()
        code = ws.close_code
        if code in NO_RECONNECT and not self._stop.is_set():
            raise DeviceRejected(code, ws.close_reason or "")
        return _Ended(code, welcomed)

    def _welcome(self, frame: dict[str, Any]) -> None:
        if frame.get("type") != "welcome":
            raise ValueError(f"expected a welcome frame, got {frame.get('type')!r}")
        self.session = str(frame.get("session"))
        timeout = frame.get("heartbeat_timeout")
        self.heartbeat_timeout = float(timeout) if isinstance(timeout, int | float) else 60.0
        announced = frame.get("max_frame_bytes")
        if isinstance(announced, int) and not isinstance(announced, bool) and announced > 0:
            self.max_frame_bytes = announced
        if self._frame_ceiling is not None:
            self.max_frame_bytes = min(self.max_frame_bytes, self._frame_ceiling)
        self.desired = _object(frame.get("desired_state"))
        self._set_version(frame.get("version"))
        self._known = _object(frame.get("reported_state"))
        if self._reported is None:
            self._reported = dict(self._known)
        delta = _object(frame.get("delta"))
        if delta:
            self._callbacks.put_nowait((dict(self.desired), delta))

    async def _resume(self, ws: ClientConnection) -> None:
        """Re-send the local reported document when the gateway's copy differs."""
        if self._reported is not None and not shadow.same(self._reported, self._known):
            await self._send_heartbeat(ws)

    async def _heartbeats(self, ws: ClientConnection) -> None:
        """Send a heartbeat every fraction of the announced timeout until cancelled."""
        interval = (self.heartbeat_timeout or 60.0) * self.heartbeat_fraction
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                await self._send_heartbeat(ws)

    async def _send_heartbeat(self, ws: ClientConnection) -> None:
        document = self._reported
        if document is not None:
            # Reports still in flight are part of the document: a replace must not undo them.
            for entry in self._pending.values():
                if entry.patch is not None:
                    document = shadow.merge(document, entry.patch)
        if document is not None and not shadow.same(document, self._known):
            data = orjson.dumps({"type": "heartbeat", "reported_state": document})
            if len(data) <= self.max_frame_bytes:
                await self._send(ws, data)
                self._known = dict(document)
                return
            refused = FrameTooLarge("the reported document", len(data), self.max_frame_bytes)
            log.warning("%s: %s; heartbeat sent without it", self.device_id, refused)
        await self._send(ws, HEARTBEAT)

    async def _send(self, ws: ClientConnection, data: bytes) -> None:
        """Send one frame, within the limit (checked by the caller)."""
        self._largest_sent = max(self._largest_sent, len(data))
        await ws.send(data.decode())

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_frame_bytes:
            raise FrameTooLarge(what, size, self.max_frame_bytes)

    def _lower_frame_limit(self) -> None:
        """A 1009 close: the largest frame sent on that connection was over the real limit."""
        if self._largest_sent == 0:
            return
        ceiling = self._largest_sent - 1
        if self._frame_ceiling is not None:
            ceiling = min(ceiling, self._frame_ceiling)
        self._frame_ceiling = ceiling
        self.max_frame_bytes = min(self.max_frame_bytes, ceiling)
        log.warning("%s: a %d-byte frame was refused as too large; sending at most %d bytes",
                    self.device_id, self._largest_sent, self.max_frame_bytes)  # fmt: skip

    # --- frames in ----------------------------------------------------------
    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "state_update":
            # The gateway follows every state_update with a delta frame: the callback runs then.
            # the Node.js classes publish `desiredState`
            desired = frame.get("desired_state", frame.get("desiredState"))
            if isinstance(desired, dict):
                self.desired = dict(desired)
            self._set_version(frame.get("version"))
        elif kind == "delta":
            self._set_version(frame.get("version"))
            self._callbacks.put_nowait((dict(self.desired), _object(frame.get("delta"))))
        elif kind == "ack":
            self._set_version(frame.get("version"))
            self._answer(frame)
        elif kind == "shadow":
            self.desired = _object(frame.get("desired_state"))
            self._set_version(frame.get("version"))
            self._answer(frame)
        elif kind == "command":
            self._command(frame)
        elif kind == "error" and "command_id" in frame and "id" not in frame:
            # a result the gateway did not take: the command ended meanwhile (timed out,
            # canceled) or was answered already; nothing to do but say so
            log.info("%s: command %s: %s", self.device_id, frame.get("command_id"),
                     frame.get("message"))  # fmt: skip
        elif kind == "error":
            pending = self._pending.pop(str(frame.get("id")), None) if "id" in frame else None
            error = RequestFailed(str(frame.get("code")), str(frame.get("message")))
            if pending is None:
                log.warning("%s: gateway error %s", self.device_id, error)
            elif not pending.future.done():
                pending.future.set_exception(error)
        else:
            log.debug("%s: ignoring frame of type %r", self.device_id, kind)

    def _answer(self, frame: dict[str, Any]) -> None:
        pending = self._pending.pop(str(frame.get("id")), None)
        if pending is None:
            return
        if pending.patch is not None:
            self._reported = shadow.merge(self._reported or {}, pending.patch)
            self._known = shadow.merge(self._known or {}, pending.patch)
        if not pending.future.done():
            pending.future.set_result(frame)

    def _set_version(self, version: object) -> None:
        if isinstance(version, int) and not isinstance(version, bool):
            self.version = max(self.version, version)

    def _fail_pending(self) -> None:
        """The connection ended: unanswered reports stay in the local document (resume),
        except one whose frame is now known to be too large: it is dropped."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            error: Exception = ConnectionLost("connection ended before the answer")
            if entry.size > self.max_frame_bytes:
                error = FrameTooLarge("this report", entry.size, self.max_frame_bytes)
            elif entry.patch is not None:
                self._reported = shadow.merge(self._reported or {}, entry.patch)
            if not entry.future.done():
                entry.future.set_exception(error)
                entry.future.exception()  # retrieved: an abandoned request logs nothing

    # --- requests and callbacks ---------------------------------------------
    async def _request(self, frame: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
        async with asyncio.timeout(self.request_timeout):
            await self.connected.wait()
            ws = self._ws
            if ws is None:
                raise ConnectionLost("not connected")
            request_id = f"r{next(self._ids)}"
            data = orjson.dumps({**frame, "id": request_id})
            self._check_size(f"this {frame['type']}", len(data))
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = _Pending(future, patch, len(data))
            try:
                await self._send(ws, data)
                return await future
            except ConnectionClosed:
                raise ConnectionLost("connection ended before the answer") from None
            finally:
                entry = self._pending.get(request_id)
                if entry is not None and entry.patch is None:
                    del self._pending[request_id]  # a report stays: a late ack still merges

    # --- commands ------------------------------------------------------------
    def _command(self, frame: dict[str, Any]) -> None:
        """A command (or the same one sent again): answered from memory when it was
        answered before, queued for the handler otherwise, never run twice."""
        command_id = frame.get("command_id")
        if not isinstance(command_id, str) or self.on_command is None:
            return
        answer = self._answers.get(command_id)
        if answer is not None:
            self._send_answer(answer)
        elif command_id != self._working and command_id not in self._queued:
            self._queued.add(command_id)
            self._commands.put_nowait(frame)

    async def _run_commands(self) -> None:
        """Run `on_command` for one command at a time, in the order they came."""
        while True:
            frame = await self._commands.get()
            command_id = str(frame["command_id"])
            self._queued.discard(command_id)
            self._working = command_id
            try:
                answer = await self._answer_command(command_id, frame)
            finally:
                self._working = None
            self._answers[command_id] = answer
            while len(self._answers) > ANSWERS_KEPT:
                self._answers.popitem(last=False)
            self._send_answer(answer)

    async def _answer_command(self, command_id: str, frame: dict[str, Any]) -> bytes:
        """The `command_result` frame: `succeeded` with what the handler returned, or
        `failed` with the message of what it raised."""
        assert self.on_command is not None
        name, params = str(frame.get("name")), _object(frame.get("params"))
        try:
            if inspect.iscoroutinefunction(self.on_command):
                result = await self.on_command(name, params)
            else:
                result = await asyncio.to_thread(self.on_command, name, params)
                if inspect.isawaitable(result):
                    result = await result
            if result is not None and not isinstance(result, dict):
                raise TypeError(f"a command handler returns a dict or None, not {type(result)}")
            answer = {"type": "command_result", "command_id": command_id,
                      "status": "succeeded", "result": result or {}}  # fmt: skip
            data = orjson.dumps(answer)
            if len(data) > self.max_frame_bytes:
                raise FrameTooLarge("this command's result", len(data), self.max_frame_bytes)
            return data
        except Exception as exc:
            log.info("%s: command %s (%s) failed: %s", self.device_id, command_id, name, exc)
            message = (str(exc) or type(exc).__name__)[:MAX_ERROR_LENGTH]
            return orjson.dumps({"type": "command_result", "command_id": command_id,
                                 "status": "failed", "error": message})  # fmt: skip

    def _send_answer(self, answer: bytes) -> None:
        """Send a command's answer now if connected; else it goes when the gateway sends the
        command again on the next connection."""
        ws = self._ws
        if ws is None or not self.connected.is_set():
            return
        task = asyncio.get_running_loop().create_task(self._send_quietly(ws, answer))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _send_quietly(self, ws: ClientConnection, data: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send(ws, data)

    async def _run_callbacks(self) -> None:
        """Run `on_desired` in order, off the reader; a failing callback is logged."""
        while True:
            desired, delta = await self._callbacks.get()
            if self.on_desired is None:
                continue
            try:
                result = self.on_desired(desired, delta)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s: on_desired callback failed", self.device_id)


def _load(raw: str | bytes) -> dict[str, Any]:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("gateway frame is not a JSON object")
    return value


def _object(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _detail(body: bytes | bytearray | None) -> str:
    """The `detail` of a refused handshake's JSON body, if any."""
    with contextlib.suppress(ValueError):
        value = orjson.loads(body or b"")
        if isinstance(value, dict) and isinstance(value.get("detail"), str):
            return str(value["detail"])
    return ""
