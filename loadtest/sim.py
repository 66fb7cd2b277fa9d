"""Device and dashboard simulators, and the worker processes that run them.

A worker process runs one asyncio loop holding thousands of lean simulated devices: one task
per device on the `websockets` asyncio client (no keepalive task, no compression), bound to a
chosen loopback source address so several addresses multiply the ephemeral ports available.
Dashboards are simulated the same way. Every `report_interval` a worker sends cumulative
counters and the latency samples gathered since its last report to the coordinator (`Fleet`).

Parent → worker commands: `go` (start connecting), `window` (the stream-id bounds dashboards
count events in), `drop` (abort or silence every device), `stop` (close everything, answer
with a final report). Worker → parent: `ready`, `stats`, `dropped`, `final`.

Devices answer the gateway's `command` frames as the device protocol asks: each command is
carried out once, by `command_id`; a repeat is answered from the device's memory of what it
answered, and counted (`commands_repeated`), as is every `ack` of a result (`command_acks`;
one more than once: `command_acks_unexpected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.dashboards import parse_id

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SAMPLE_CAP = 50_000  # latency samples per kind per report; more are dropped (counted)
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
LATENCY_DASHBOARDS = 10  # dashboards (of the whole fleet) whose every event latency is sampled
HEARTBEAT = '{"type":"heartbeat"}'
SEQ_BITS = 20  # a stream key is ms << 20 | seq: over a million events per millisecond
ANSWERED_CAP = 256  # results a device remembers by command_id, to answer a repeat unchanged

Gateway = tuple[str, int]  # host, port
WORKER_GC_THRESHOLDS = (50_000, 20, 100)  # young collections rarer: workers allocate per frame


def raise_nofile() -> int:
    """Soft open-files limit up to the hard one (the machine allows 20,000 per process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stream_key(entry_id: str) -> int:
    """A Redis stream id `ms-seq` (read by the gateway's own parser) as one comparable integer."""
    ms, seq = parse_id(entry_id)
    return (ms << SEQ_BITS) + seq


@dataclass
class WorkerSpec:
    index: int
    gateways: list[Gateway]
    devices: list[tuple[str, str, int, str]]  # device id, token, gateway index, source ("" any)
    dashboards: list[tuple[int, str, bool, bool]]  # gateway index, source, stalled, sampled
    api_key: str = ""
    heartbeat_interval: float = 20.0
    send_interval: float = 0.0  # seconds between payload frames per device; 0: heartbeats only
    frame: str = "heartbeat"  # payload frame: heartbeat with reported_state, or report (acked)
    connect_concurrency: int = 256
    reconnect: bool = True
    rotate_on_reconnect: bool = False
    open_timeout: float = 30.0
    report_interval: float = 0.5


class Device:
    __slots__ = (
        "answered", "awaiting", "command_seq", "dropped", "gateway", "id", "last_frame",
        "probe", "seq", "silent", "token", "ws",
    )  # fmt: skip

    def __init__(self, device_id: str, token: str, gateway: int, source: str) -> None:
        self.id = device_id
        self.token = token
        self.gateway = gateway
        self.ws: ClientConnection | None = None
        self.last_frame = 0.0
        self.seq = 0
        self.probe = 0
        self.silent = False
        self.dropped = False
        # commands, made only when the first one comes: command_id → the result frame sent,
        # command_id → its probe (ns; 0: none) until the result's ack, the newest `seq` run
        self.answered: dict[str, str] | None = None
        self.awaiting: dict[str, int] | None = None
        self.command_seq = -1


class Dashboard:
    """A simulated dashboard's position in the stream and what it counted inside the window."""

    __slots__ = ("count", "gateway", "index", "last_key", "max_latency", "sampled", "stalled", "ws")

    def __init__(self, index: int, gateway: int, stalled: bool, sampled: bool) -> None:
        self.index = index
        self.gateway = gateway
        self.stalled = stalled
        self.sampled = sampled
        self.last_key = 0  # the newest stream id received: every frame must start above it
        self.count = 0  # events received with ids inside the window
        self.max_latency = 0.0
        self.ws: ClientConnection | None = None


@dataclass
class Stats:
    counters: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[float]] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)  # `seq` of each desired change received
    lost: list[str] = field(default_factory=list)  # devices whose socket closed under them

    def sample(self, kind: str, value: float) -> None:
        bucket = self.samples.setdefault(kind, [])
        if len(bucket) < SAMPLE_CAP:
            bucket.append(value)
        else:
            self.counters[f"samples_dropped_{kind}"] += 1

    def error(self, exc: BaseException) -> None:
        if isinstance(exc, InvalidStatus):
            name = f"http_{exc.response.status_code}"
            try:
                detail = orjson.loads(exc.response.body or b"{}").get("detail")
            except (orjson.JSONDecodeError, AttributeError):
                detail = None
            if detail:
                name += f" ({str(detail)[:60]})"
        elif isinstance(exc, OSError) and exc.errno is not None:
            name = errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
        elif isinstance(exc, TimeoutError):
            name = "timeout"
        else:
            name = type(exc).__name__
        self.errors[name] += 1

    def take(self) -> dict[str, Any]:
        samples, self.samples = self.samples, {}
        seqs, self.seqs = self.seqs, []
        lost, self.lost = self.lost, []
        return {
            "stamp": time.monotonic(),
            "counters": dict(self.counters),
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "samples": samples,
            "seqs": seqs,
            "lost": lost,
        }


class Worker:
    def __init__(self, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.stats = Stats()
        self.devices = [Device(*d) for d in spec.devices]
        self.dashboards = [
            Dashboard(i, gw, stalled, sampled)
            for i, (gw, _src, stalled, sampled) in enumerate(spec.dashboards)
        ]
        # stream keys (low, high]: dashboards count the events with ids in between
        self.window: tuple[int, int] | None = None
        self.sources = {d[0]: d[3] for d in spec.devices}
        self.go = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.stop_params: dict[str, Any] = {}
        self.stopping = False
        self.gate = asyncio.Semaphore(spec.connect_concurrency)
        self.tasks: list[asyncio.Task[None]] = []
        self.loop = asyncio.get_running_loop()
        self.last_command_ack = 0.0  # wall clock of the newest command result acked

    # --- plumbing -------------------------------------------------------------
    def send(self, kind: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.conn.send((kind, self.spec.index, body))

    def _listen(self) -> None:
        """Thread: blocking reads of the parent's commands, handed to the loop."""
        while True:
            try:
                command, params = self.conn.recv()
            except (EOFError, OSError):
                command, params = "stop", {}
            self.loop.call_soon_threadsafe(self.command, command, params)
            if command == "stop":
                return

    def command(self, command: str, params: dict[str, Any]) -> None:
        if command == "go":
            self.go.set()
        elif command == "window":
            self.set_window(int(params["low"]), int(params["high"]))
        elif command == "drop":
            self.drop(str(params.get("mode", "abort")))
        elif command == "stop":
            self.stop_params = params
            self.stop_requested.set()

    async def main(self) -> None:
        threading.Thread(target=self._listen, daemon=True).start()
        self.send("ready", {"pid": os.getpid()})
        await self.go.wait()
        reporter = asyncio.create_task(self._report_loop())
        for dash in self.dashboards:
            self.tasks.append(asyncio.create_task(self.run_dashboard(dash)))
        for device in self.devices:
            self.tasks.append(asyncio.create_task(self.run_device(device)))
        await self.stop_requested.wait()
        await self.shutdown()
        reporter.cancel()
        self.send("final", self.final())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.spec.report_interval)
            self.send("stats", self.stats.take())
            # a worker holds thousands of sockets, so a full collection over them pauses
            # every simulated device for hundreds of milliseconds, and that pause would be
            # measured as the gateway's latency; what has survived so far is never scanned again
            gc.freeze()

    async def shutdown(self) -> None:
        self.stopping = True
        sockets = [d.ws for d in self.devices if d.ws is not None]
        sockets += [d.ws for d in self.dashboards if d.ws is not None and not d.stalled]
        for start in range(0, len(sockets), 2000):
            chunk = sockets[start : start + 2000]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*(ws.close() for ws in chunk), return_exceptions=True)
        for dash in self.dashboards:
            if dash.stalled and dash.ws is not None:
                # a stalled reader the gateway dropped shows it in its state (CLOSED/CLOSING)
                self.stats.counters["stalled_closed_by_gateway"] += int(dash.ws.state.value >= 2)
                dash.ws.transport.abort()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def final(self) -> dict[str, Any]:
        body = self.stats.take()
        live = [d for d in self.dashboards if not d.stalled]
        body["dash_counts"] = [d.count for d in live] if self.window is not None else []
        body["dash_max_latency_ms"] = max((d.max_latency for d in live), default=0.0)
        body["last_seq"] = {d.id: d.seq for d in self.devices}
        body["last_command_ack"] = self.last_command_ack
        return body

    # --- devices --------------------------------------------------------------
    async def open(self, gateway: int, path: str, source: str, **kwargs: Any) -> ClientConnection:
        host, port = self.spec.gateways[gateway]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
            if kwargs.pop("small_buffer", False):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await self.loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await connect(
            f"ws://{host}:{port}{path}",
            sock=sock,
            compression=None,
            ping_interval=None,
            proxy=None,
            user_agent_header=None,
            open_timeout=self.spec.open_timeout,
            **kwargs,
        )

    async def run_device(self, device: Device) -> None:
        attempt = 0
        lost_at: float | None = None
        counters = self.stats.counters
        while not self.stopping and not device.dropped:
            async with self.gate:
                if self.stopping:
                    return
                counters["connecting"] += 1
                started = time.perf_counter()
                try:
                    ws = await self.open(
                        device.gateway,
                        f"/ws/devices/{device.id}",
                        self.sources[device.id],
                        additional_headers={"Authorization": f"Bearer {device.token}"},
                        max_queue=4,
                    )
                    try:
                        async with asyncio.timeout(self.spec.open_timeout):
                            first = orjson.loads(await ws.recv(decode=False))
                        if first.get("type") != "welcome":
                            raise RuntimeError(f"first frame {first.get('type')!r}")
                    except BaseException:
                        ws.transport.abort()
                        raise
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats.error(exc)
                    counters["connect_failures"] += 1
                    ws = None
                finally:
                    counters["connecting"] -= 1
            if ws is None:
                if not self.spec.reconnect:
                    return
                attempt += 1
                await self._backoff(device, attempt)
                continue
            now = time.perf_counter()
            self.stats.sample("handshake_ms", (now - started) * 1000)
            if lost_at is not None:
                self.stats.sample("reconnect_s", now - lost_at)
                counters["reconnected"] += 1
            attempt = 0
            device.ws = ws
            device.last_frame = time.time()
            counters["welcomed"] += 1
            counters["online"] += 1
            try:
                await self.session(device, ws)
            except ConnectionClosed as exc:
                if not self.stopping:
                    self.stats.closes[str(exc.rcvd.code if exc.rcvd is not None else 1006)] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.error(exc)
            finally:
                counters["online"] -= 1
                device.ws = None
            if self.stopping or device.dropped:
                return
            counters["disconnects"] += 1
            self.stats.lost.append(device.id)
            lost_at = time.perf_counter()
            if not self.spec.reconnect:
                return
            attempt += 1
            await self._backoff(device, attempt)

    async def _backoff(self, device: Device, attempt: int) -> None:
        """Full-jitter exponential backoff; optionally try the next gateway."""
        if self.spec.rotate_on_reconnect:
            device.gateway = (device.gateway + 1) % len(self.spec.gateways)
        await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))

    async def session(self, device: Device, ws: ClientConnection) -> None:
        spec = self.spec
        counters = self.stats.counters
        beat = spec.heartbeat_interval
        every = spec.send_interval
        clock = time.monotonic
        next_beat = clock() + random.uniform(0.3, 1.0) * beat
        next_send = clock() + random.uniform(0, every) if every > 0 else float("inf")
        while True:
            if device.silent:  # reads, never answers
                self.handle(device, await ws.recv(decode=False))
                continue
            wait = min(next_beat, next_send) - clock()
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        raw = await ws.recv(decode=False)
                except TimeoutError:
                    continue
                reply = self.handle(device, raw)
                if reply is not None:
                    await ws.send(reply)
                    device.last_frame = time.time()
                continue
            now = clock()
            if now >= next_send:
                await ws.send(self.payload(device, device.seq + 1))
                device.seq += 1
                counters["sent_payload"] += 1
                next_send = max(next_send + every, now - every)
            else:
                await ws.send(HEARTBEAT)
                counters["sent_heartbeat"] += 1
            device.last_frame = time.time()
            next_beat = now + beat

    def payload(self, device: Device, seq: int) -> str:
        if self.spec.frame == "report":
            frame = {"type": "report", "id": seq, "reported_state": {"seq": seq}}
        else:
            frame = {"type": "heartbeat", "reported_state": {"seq": seq}}
        return orjson.dumps(frame).decode()

    def handle(self, device: Device, raw: bytes | str) -> str | None:
        """Count one frame from the gateway; the frame to answer it with, if any."""
        counters = self.stats.counters
        try:
            frame = orjson.loads(raw)
            kind = frame.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            self.stats.errors["bad_frame_from_gateway"] += 1
            return None
        if kind == "command":
            return self.command_frame(device, frame)
        if kind == "ack" and "command_id" in frame:
            self.command_ack(device, frame)
            return None
        if kind == "state_update":
            counters["state_updates"] += 1
            desired = frame.get("desired_state")
            probe = desired.get("probe") if isinstance(desired, dict) else None
            if isinstance(probe, int) and probe != device.probe:
                device.probe = probe
                counters["probes"] += 1
                seq = desired.get("seq")
                if isinstance(seq, int):
                    self.stats.seqs.append(seq)
                self.stats.sample("desired_ms", (time.time_ns() - probe) / 1e6)
                committed = frame.get("timestamp")
                if isinstance(committed, int | float):  # the gateway's commit time in Redis
                    self.stats.sample("commit_ms", (time.time() - committed) * 1000)
        elif kind == "ack":
            counters["acks"] += 1
        elif kind == "delta":
            counters["deltas"] += 1
        elif kind == "error":
            self.stats.errors[f"frame_{frame.get('code')}"] += 1
            if "command_id" in frame:
                counters[f"command_error_{frame.get('code')}"] += 1
        else:
            counters[f"frames_{kind}"] += 1
        return None

    def command_frame(self, device: Device, frame: dict[str, Any]) -> str | None:
        """Carry out a command once: its result echoes its `seq`; a repeat gets the same
        result again, from memory, and is counted. `seq` must grow per device (the order
        commands were made in), else `commands_out_of_order`."""
        counters = self.stats.counters
        command_id = frame.get("command_id")
        if not isinstance(command_id, str):
            self.stats.errors["command_without_id"] += 1
            return None
        counters["commands_received"] += 1
        if device.answered is None or device.awaiting is None:
            device.answered, device.awaiting = {}, {}
        previous = device.answered.get(command_id)
        if previous is not None:
            counters["commands_repeated"] += 1
            return previous
        params = frame.get("params")
        seq = params.get("seq") if isinstance(params, dict) else None
        probe = params.get("probe") if isinstance(params, dict) else None
        if isinstance(seq, int):
            if seq <= device.command_seq:
                counters["commands_out_of_order"] += 1
            device.command_seq = max(device.command_seq, seq)
        counters["commands_run"] += 1
        reply = orjson.dumps(
            {"type": "command_result", "command_id": command_id, "status": "succeeded",
             "result": {"echo": seq}}
        ).decode()  # fmt: skip
        device.answered[command_id] = reply
        if len(device.answered) > ANSWERED_CAP:  # bounded: the oldest is forgotten
            del device.answered[next(iter(device.answered))]
        device.awaiting[command_id] = probe if isinstance(probe, int) else 0
        counters["command_results_sent"] += 1
        return reply

    def command_ack(self, device: Device, frame: dict[str, Any]) -> None:
        """A result stored: time it from its probe (the moment its POST was sent)."""
        counters = self.stats.counters
        awaiting = device.awaiting or {}
        probe = awaiting.pop(str(frame.get("command_id")), None)
        if probe is None:  # acked before, or never answered: stored twice?
            counters["command_acks_unexpected"] += 1
            return
        counters["command_acks"] += 1
        self.last_command_ack = time.time()
        if probe:
            self.stats.sample("command_ms", (time.time_ns() - probe) / 1e6)

    def drop(self, mode: str) -> None:
        """Every device stops: `abort` (RST, no close frame), `silent`, or `mixed` (alternate)."""
        dropped: dict[str, tuple[float, str]] = {}
        for i, device in enumerate(self.devices):
            how = mode if mode != "mixed" else ("abort" if i % 2 == 0 else "silent")
            device.dropped = True
            if device.ws is None:
                continue
            dropped[device.id] = (device.last_frame, how)
            if how == "abort":
                device.ws.transport.abort()
            else:
                device.silent = True
        self.send("dropped", {"devices": dropped})

    # --- dashboards -----------------------------------------------------------
    def set_window(self, low: int, high: int) -> None:
        """Count from now on the events with stream keys in (low, high].

        The window must be known before its first event arrives, since frames are counted as
        they come and not kept; a dashboard already past *low* is counted as `window_late`.
        Every dashboard must also have had its snapshot before the window opens (the scenario
        waits for `dashboard_snapshot`), since the events a snapshot covers are not sent.
        """
        self.window = (low, high)
        late = sum(1 for d in self.dashboards if not d.stalled and d.last_key > low)
        if late:
            self.stats.errors["window_late"] += late

    async def run_dashboard(self, dash: Dashboard) -> None:
        counters = self.stats.counters
        source = self.spec.dashboards[dash.index][1]
        path = f"/ws/dashboard?token={self.spec.api_key}"
        try:
            async with self.gate:
                dash.ws = await self.open(
                    dash.gateway,
                    path,
                    source,
                    max_queue=1 if dash.stalled else 64,
                    max_size=None,
                    small_buffer=dash.stalled,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.error(exc)
            counters["dashboard_failures"] += 1
            return
        if dash.stalled:
            counters["stalled_connected"] += 1
            await asyncio.Event().wait()  # never reads; cancelled at shutdown
        counters["dashboards_online"] += 1
        ws = dash.ws
        try:
            while True:  # bytes, not str: orjson reads them as they are, no decoding pass
                self.dashboard_frame(dash, await ws.recv(decode=False))
        except ConnectionClosed as exc:
            if not self.stopping:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                self.stats.closes[f"dashboard_{code}"] += 1
        finally:
            counters["dashboards_online"] -= 1
            if not self.stopping:
                counters["dashboard_disconnects"] += 1

    def dashboard_frame(self, dash: Dashboard, raw: bytes) -> None:
        """Count one frame: per frame for most dashboards, per event only where it must be.

        Ids only increase on a dashboard, so a frame whose first id is above the previous
        frame's last and whose last is not below its first holds ids in order: it lies inside
        the window, outside it, or across one of its edges, and only a frame across an edge
        (or one on a latency-sampled dashboard) is parsed event by event; the others are only
        scanned for their first and last id (`events_summary`). Latency is the receive time
        minus the millisecond of the event's stream id, i.e. Redis's clock at the XADD (same
        machine): publish → receive, up to 1 ms high from the id's resolution.
        """
        counters = self.stats.counters
        keys: list[int] | None = None
        summary = None if dash.sampled else events_summary(raw)
        if summary is None:
            frame = orjson.loads(raw)
            if frame.get("type") != "events":
                self.dashboard_other(frame)
                return
            keys = [stream_key(event["id"]) for event in frame["events"]]
            if not keys:
                return
            summary = keys[0], keys[-1], len(keys)
        first, last, count = summary
        now_ms = time.time() * 1000
        counters["dashboard_events"] += count
        if first <= dash.last_key or last < first:
            self.stats.errors["dashboard_out_of_order"] += 1
        previous, dash.last_key = dash.last_key, max(dash.last_key, last)
        if self.window is None:
            return
        low, high = self.window
        if last > high >= previous:  # this dashboard has had the whole window
            counters["dashboards_past_window"] += 1
        if last <= low or first > high:
            return
        if low < first and last <= high and not dash.sampled:
            dash.count += count
            latency = now_ms - (first >> SEQ_BITS)  # the oldest event of the frame
            if latency > dash.max_latency:
                dash.max_latency = latency
            return
        if keys is None:  # across an edge of the window: event by event after all
            keys = [stream_key(event["id"]) for event in orjson.loads(raw)["events"]]
        for key in keys:
            if low < key <= high:
                dash.count += 1
                latency = now_ms - (key >> SEQ_BITS)
                if latency > dash.max_latency:
                    dash.max_latency = latency
                if dash.sampled:
                    self.stats.sample("event_ms", latency)

    def dashboard_other(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        self.stats.counters[f"dashboard_{kind}"] += 1
        # a snapshot after the window opened stands for the events before it: they are not
        # sent as events, so this dashboard cannot count the whole window
        window = self.window
        if kind == "snapshot" and window and stream_key(str(frame.get("cursor"))) > window[0]:
            self.stats.errors["snapshot_after_window_start"] += 1


EVENTS_HEAD = b'{"type":"events","events":[{"id":"'
EVENT_HEAD = b'{"id":"'


def events_summary(raw: bytes) -> tuple[int, int, int] | None:
    """First and last stream key and event count of an `events` frame, without parsing it.

    The gateway writes every event as `{"id":"…",` + its JSON, and presence events (like the
    simulator's `{"seq"}` reports) hold no nested object starting with an `id`, so the frame
    holds as many events as `{"id":"` occurrences. Anything else: None (parse it instead).
    Finding three substrings costs a fifth of what parsing 50 events does.
    """
    if not raw.startswith(EVENTS_HEAD):
        return None
    start = len(EVENTS_HEAD)
    tail = raw.rindex(EVENT_HEAD) + len(EVENT_HEAD)
    first = raw[start : raw.index(b'"', start)].decode()
    last = raw[tail : raw.index(b'"', tail)].decode()
    return stream_key(first), stream_key(last), raw.count(EVENT_HEAD)


def worker_main(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process."""
    raise_nofile()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)

    async def run() -> None:
        await Worker(spec, conn).main()

    asyncio.run(run())


# --- the coordinator's side ---------------------------------------------------------
class Fleet:
    """Worker processes and their aggregated, cumulative statistics."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self.context = multiprocessing.get_context("spawn")
        self.conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.counters: list[dict[str, int]] = [{} for _ in specs]
        self.stamps: list[float] = [time.monotonic() for _ in specs]
        self.errors: list[dict[str, int]] = [{} for _ in specs]
        self.closes: list[dict[str, int]] = [{} for _ in specs]
        self.samples: dict[str, list[float]] = {}
        self.finals: dict[int, dict[str, Any]] = {}
        self.received_seqs: set[int] = set()  # desired changes received, by `seq`
        self.lost_sockets: set[str] = set()  # devices whose socket closed at least once
        self.dropped: dict[str, tuple[float, str]] = {}
        self.ready: set[int] = set()
        self.pids: dict[int, int] = {}  # worker index → its process id
        self.changed = asyncio.Event()
        self.listeners: list[Callable[[str, int, dict[str, Any]], None]] = []
        self._loop = asyncio.get_running_loop()
        self._dropped_from: set[int] = set()

    async def start(self, within: float = 60.0) -> None:
        for spec in self.specs:
            parent, child = self.context.Pipe()
            process = self.context.Process(target=worker_main, args=(spec, child), daemon=True)
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)
            threading.Thread(target=self._listen, args=(parent,), daemon=True).start()
        async with asyncio.timeout(within):
            while len(self.ready) < len(self.specs):
                await self._wait_change()

    def _listen(self, conn: multiprocessing.connection.Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            self._loop.call_soon_threadsafe(self._on_message, *message)

    def _on_message(self, kind: str, index: int, body: dict[str, Any]) -> None:
        if kind == "ready":
            self.ready.add(index)
            self.pids[index] = int(body["pid"])
        elif kind in ("stats", "final"):
            self.counters[index] = body["counters"]
            self.stamps[index] = body["stamp"]
            self.errors[index] = body["errors"]
            self.closes[index] = body["closes"]
            for name, values in body["samples"].items():
                self.samples.setdefault(name, []).extend(values)
            self.received_seqs.update(body["seqs"])
            self.lost_sockets.update(body["lost"])
            if kind == "final":
                self.finals[index] = body
        elif kind == "dropped":
            self.dropped.update(body["devices"])
            self._dropped_from.add(index)
        for listener in self.listeners:
            listener(kind, index, body)
        self.changed.set()

    async def _wait_change(self, within: float = 1.0) -> None:
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), within)

    def command(self, command: str, **params: Any) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send((command, params))

    def total(self, name: str) -> int:
        return sum(c.get(name, 0) for c in self.counters)

    def snapshot(self, *names: str) -> list[tuple[float, int]]:
        """Per worker: (its clock at its last report, the sum of *names* then)."""
        return [
            (stamp, sum(c.get(n, 0) for n in names))
            for stamp, c in zip(self.stamps, self.counters, strict=True)
        ]

    @staticmethod
    def rate(start: list[tuple[float, int]], end: list[tuple[float, int]]) -> float:
        """Counts per second between two snapshots, each worker on its own report clock."""
        total = 0.0
        for (t0, v0), (t1, v1) in zip(start, end, strict=True):
            if t1 > t0:
                total += (v1 - v0) / (t1 - t0)
        return total

    def error_totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for errors in self.errors:
            total.update(errors)
        return total

    def close_totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for closes in self.closes:
            total.update(closes)
        return total

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> bool:
        """Until *predicate* holds after a report, or *within* seconds: whether it held."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if predicate():
                return True
            await self._wait_change(min(1.0, max(0.01, deadline - time.monotonic())))
        return predicate()

    async def drop(self, mode: str, within: float = 10.0) -> dict[str, tuple[float, str]]:
        self.command("drop", mode=mode)
        await self.wait_for(lambda: len(self._dropped_from) == len(self.specs), within)
        return self.dropped

    async def stop(self, within: float = 60.0, **params: Any) -> None:
        self.command("stop", **params)
        await self.wait_for(lambda: len(self.finals) == len(self.specs), within)
        for process in self.processes:
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
        for conn in self.conns:
            conn.close()
