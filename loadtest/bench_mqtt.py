"""MQTT devices through one Mosquitto into one gateway, beside WebSocket devices on another.

A private Redis with a registered fleet (`loadtest.fleet`), a private Mosquitto, gateway A
bridging the broker (`--mqtt-url`) and gateway B serving WebSocket devices, both on the same
Redis at the same time (so both figures come from the same machine under the same load).
Each MQTT device connects with its Last Will, announces `online` (retained) and publishes a
reported patch every `--interval` seconds for `--duration` seconds; WebSocket devices send a
`report` frame at the same interval. At the end, even MQTT devices say `offline` and
disconnect, odd ones drop their TCP connection (the broker publishes their Will).

Measured: presence events per device from the fleet log (exactly one `online` per connect and
one `offline` per disconnect, with the right reason), reported → stored latency (each patch
carries its send time; the fleet log's entry id is Redis's clock when it was stored), and each
gateway's CPU-seconds per 1,000 device messages over the measured phase. The MQTT clients are
a minimal MQTT 3.1.1 implementation over asyncio streams (QoS 0), so the load generator stays
light; the broker allows anonymous clients here (authentication is the broker's, not measured).

    python -m loadtest mqtt --devices 10000 --ws-devices 2000 --duration 60 --interval 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
import websockets

from gateway.embedded import find_free_port
from gateway.keys import Keys, layout_version
from gateway.migrate import layout
from loadtest import fleet, procstat, results

HOST = "127.0.0.1"
API_KEY = "loadtest-admin-key"
CONNECTS_IN_FLIGHT = 200


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def connect_packet(client_id: str, will_topic: str, will: bytes, keepalive: int = 60) -> bytes:
    flags = 0x02 | 0x04 | 0x08 | 0x20  # clean session, Will, Will QoS 1, Will retained
    body = _string(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    body += _string(client_id.encode()) + _string(will_topic.encode()) + _string(will)
    return b"\x10" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    body = _string(topic.encode()) + payload
    return bytes([0x30 | (1 if retain else 0)]) + _length(len(body)) + body


class Counts:
    def __init__(self) -> None:
        self.mqtt_sent = 0
        self.ws_sent = 0
        self.connected = 0
        self.failed = 0


async def mqtt_device(
    index: int, port: int, gate: asyncio.Semaphore, go: asyncio.Event, stop: asyncio.Event,
    interval: float, counts: Counts,
) -> None:  # fmt: skip
    ident = fleet.device_id(index)
    session = f"s{index}"
    prefix = f"devices/{ident}"
    will = orjson.dumps({"status": "offline", "session": session, "will": True})
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(connect_packet(ident, f"{prefix}/status", will))
            if (await reader.readexactly(4))[3] != 0:
                raise ConnectionError("refused")
            online = orjson.dumps({"status": "online", "session": session})
            writer.write(publish_packet(f"{prefix}/status", online, retain=True))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            counts.failed += 1
            return
    counts.connected += 1
    await go.wait()
    await asyncio.sleep(random.uniform(0, interval))
    sequence = 0
    while not stop.is_set():
        patch = orjson.dumps({"seq": sequence, "t": round(time.time(), 4)})
        writer.write(publish_packet(f"{prefix}/reported", patch))
        sequence += 1
        counts.mqtt_sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    if index % 2 == 0:
        offline = orjson.dumps({"status": "offline", "session": session})
        writer.write(publish_packet(f"{prefix}/status", offline, retain=True) + b"\xe0\x00")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
    else:
        transport = writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a reset, not a FIN: the broker sees the connection fail
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        transport.abort()


async def ws_device(
    index: int, url: str, gate: asyncio.Semaphore, go: asyncio.Event, stop: asyncio.Event,
    interval: float, counts: Counts,
) -> None:  # fmt: skip
    ident = fleet.device_id(index)
    async with gate:
        try:
            socket_ = await websockets.connect(f"{url}/ws/devices/{ident}?token=token-{ident}")
            await socket_.recv()  # the welcome
        except (OSError, websockets.WebSocketException):
            counts.failed += 1
            return
    counts.connected += 1

    async def drain() -> None:
        with contextlib.suppress(websockets.WebSocketException):
            async for _ in socket_:
                pass

    reader = asyncio.create_task(drain())
    await go.wait()
    await asyncio.sleep(random.uniform(0, interval))
    sequence = 0
    while not stop.is_set():
        frame = {"type": "report", "id": sequence,
                 "reported_state": {"seq": sequence, "t": round(time.time(), 4)}}  # fmt: skip
        with contextlib.suppress(websockets.WebSocketException):
            await socket_.send(orjson.dumps(frame).decode())
        sequence += 1
        counts.ws_sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    await socket_.close()
    reader.cancel()


def start_mosquitto(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "mosquitto"
    if shutil.which(binary) is None:
        raise SystemExit("loadtest mqtt: mosquitto not installed (apt-get install mosquitto)")
    port = find_free_port(HOST)
    config = directory / "mosquitto.conf"
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "mosquitto")
    config.write_text(
        f"user {user}\nlistener {port} {HOST}\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 100000\nlog_dest file {directory / 'mosquitto.log'}\n"
    )
    process = subprocess.Popen([binary, "-c", str(config)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return process, port
        time.sleep(0.05)
    process.kill()
    raise SystemExit("loadtest mqtt: mosquitto did not start")


def start_gateway(
    redis_url: str, log: Path, mqtt_url: str | None
) -> tuple[subprocess.Popen[bytes], str]:
    port = find_free_port(HOST)
    command = [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", str(port),
               "--redis-url", redis_url]  # fmt: skip
    if mqtt_url:
        command += ["--mqtt-url", mqtt_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_API_KEY=API_KEY, GATEWAY_EVENTS_MAXLEN="1000000",
               GATEWAY_HEARTBEAT_TIMEOUT="120", GATEWAY_RATE_LIMIT="1000")  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/readyz", timeout=1) as response,
        ):
            body = orjson.loads(response.read())
            if not mqtt_url or body.get("mqtt", {}).get("connected"):
                return process, url
        if process.poll() is not None:
            raise SystemExit(f"loadtest mqtt: gateway exited; see {log}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"loadtest mqtt: gateway not ready; see {log}")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


async def online_count(client: aioredis.Redis, keys: Keys) -> int:
    return int(await client.zcard(keys.part(0).index_online))


async def wait_online(client: aioredis.Redis, keys: Keys, wanted: int, within: float) -> float:
    started = time.monotonic()
    while await online_count(client, keys) != wanted:
        if time.monotonic() - started > within:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def read_log(client: aioredis.Redis, keys: Keys) -> list[tuple[int, dict[str, Any]]]:
    """Every fleet-log event with the millisecond Redis stored it at, oldest first."""
    events: list[tuple[int, dict[str, Any]]] = []
    start = "-"
    while True:
        rows: Any = await client.xrange(keys.part(0).events, start, "+", count=10_000)
        for entry, body in rows:
            events.append((int(bytes(entry).split(b"-")[0]), orjson.loads(body[b"event"])))
        if len(rows) < 10_000:
            return events
        millis, seq = bytes(rows[-1][0]).decode().split("-")
        start = f"{millis}-{int(seq) + 1}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace, redis_url: str, broker_port: int, mqtt_gw: str,
                  ws_gw: str, pids: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    keys = Keys()
    client = aioredis.Redis.from_url(redis_url)
    counts = Counts()
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    go, stop = asyncio.Event(), asyncio.Event()
    total = args.devices + args.ws_devices
    tasks = [asyncio.create_task(mqtt_device(i, broker_port, gate, go, stop, args.interval, counts))
             for i in range(args.devices)]  # fmt: skip
    tasks += [asyncio.create_task(ws_device(args.devices + i, ws_gw.replace("http", "ws"), gate,
                                            go, stop, args.interval, counts))
              for i in range(args.ws_devices)]  # fmt: skip
    ramp = await wait_online(client, keys, total, 300)
    online_after_ramp = await online_count(client, keys)
    mqtt_before = metric(mqtt_gw, 'gateway_mqtt_messages_total{topic="reported"}')
    ws_before = metric(ws_gw, 'gateway_messages_in_total{type="report"}')
    cpu_before = [procstat.read(pid) for pid in pids]
    go.set()
    went = time.time()
    await asyncio.sleep(args.duration)
    stopped = time.time()
    cpu_after = [procstat.read(pid) for pid in pids]
    mqtt_handled = metric(mqtt_gw, 'gateway_mqtt_messages_total{topic="reported"}') - mqtt_before
    ws_handled = metric(ws_gw, 'gateway_messages_in_total{type="report"}') - ws_before
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_online(client, keys, 0, 60)
    await asyncio.sleep(1.0)  # the last reports land
    events = await read_log(client, keys)
    await client.aclose()

    online: dict[str, int] = {}
    offline: dict[str, list[str]] = {}
    latencies: list[float] = []
    steady: list[float] = []  # sent at least one interval after the start and before the end
    for stored_ms, event in events:
        ident = event.get("device_id", "")
        if event["type"] == "presence":
            if event["status"] == "online":
                online[ident] = online.get(ident, 0) + 1
            else:
                offline.setdefault(ident, []).append(event["reason"])
        elif event["type"] == "state" and isinstance(event.get("state"), dict):
            sent = event["state"].get("t")
            if isinstance(sent, float | int) and int(ident[4:]) < args.devices:
                latencies.append(stored_ms / 1000 - sent)
                if went + args.interval <= sent <= stopped - args.interval:
                    steady.append(stored_ms / 1000 - sent)
    mqtt_ids = [fleet.device_id(i) for i in range(args.devices)]
    once_online = sum(1 for d in mqtt_ids if online.get(d) == 1)
    right_offline = sum(
        1 for i, d in enumerate(mqtt_ids)
        if offline.get(d) == (["mqtt_offline"] if i % 2 == 0 else ["mqtt_will"])
    )  # fmt: skip
    assert cpu_before[0] and cpu_after[0] and cpu_before[1] and cpu_after[1]
    mqtt_cpu = cpu_after[0].cpu_s - cpu_before[0].cpu_s
    ws_cpu = cpu_after[1].cpu_s - cpu_before[1].cpu_s
    return {
        "connect_ramp_seconds": round(ramp, 1),
        "online_after_ramp": online_after_ramp,
        "connect_failures": counts.failed,
        "mqtt_reported_sent": counts.mqtt_sent,
        "mqtt_reported_handled": mqtt_handled,
        "mqtt_devices_online_exactly_once": once_online,
        "mqtt_devices_offline_exactly_once_with_reason": right_offline,
        "presence_events_total": sum(online.values()) + sum(len(v) for v in offline.values()),
        "reported_to_stored_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "reported_to_stored_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "reported_stored_measured": len(latencies),
        "steady_reported_to_stored_p50_ms": round(percentile(steady, 0.5) * 1000, 1),
        "steady_reported_to_stored_p99_ms": round(percentile(steady, 0.99) * 1000, 1),
        "steady_reported_stored_measured": len(steady),
        "mqtt_gateway_cpu_s_per_1000_messages": round(mqtt_cpu / max(mqtt_handled, 1) * 1000, 3),
        "ws_reports_handled": ws_handled,
        "ws_gateway_cpu_s_per_1000_messages": round(ws_cpu / max(ws_handled, 1) * 1000, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest mqtt")
    parser.add_argument("--devices", type=int, default=10_000, help="MQTT devices")
    parser.add_argument("--ws-devices", type=int, default=2_000, help="WebSocket devices")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between reports")
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    args = parser.parse_args(argv)
    started_at = fleet.now_iso()
    directory = Path(tempfile.mkdtemp(prefix="loadtest-mqtt-"))
    total = args.devices + args.ws_devices
    with fleet.PrivateRedis() as server:
        fleet.load_fleet(server.url, total, 0.0, quiet=True)
        with redis.Redis.from_url(server.url) as sync:  # the fleet is this release's layout
            sync.set(layout_version(Keys()), layout.CURRENT)
        broker, broker_port = start_mosquitto(directory)
        processes: list[subprocess.Popen[bytes]] = [broker]
        try:
            mqtt_gateway, mqtt_url = start_gateway(
                server.url, directory / "gateway-mqtt.log", f"mqtt://{HOST}:{broker_port}"
            )
            processes.append(mqtt_gateway)
            ws_gateway, ws_url = start_gateway(server.url, directory / "gateway-ws.log", None)
            processes.append(ws_gateway)
            metrics = asyncio.run(
                measure(args, server.url, broker_port, mqtt_url, ws_url,
                        (mqtt_gateway.pid, ws_gateway.pid))
            )  # fmt: skip
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=20)
                if process.poll() is None:
                    process.kill()
        document = fleet.write_result(
            "mqtt",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_mqtt", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "ws_devices": args.ws_devices,
                "duration": args.duration,
                "interval": args.interval,
                "how": "one Mosquitto, gateway A bridging it and gateway B serving WebSocket "
                "devices on one Redis at once; presence from the fleet log; latency from each "
                "patch's send time to its fleet-log entry id; CPU from /proc over the measured "
                "phase",
            },
            metrics=metrics,
            targets=[
                fleet.target(
                    "presence exactly once per connect",
                    "every MQTT device",
                    metrics["mqtt_devices_online_exactly_once"],
                    "devices",
                    metrics["mqtt_devices_online_exactly_once"] == args.devices,
                ),
                fleet.target(
                    "offline exactly once, right reason",
                    "every MQTT device",
                    metrics["mqtt_devices_offline_exactly_once_with_reason"],
                    "devices",
                    metrics["mqtt_devices_offline_exactly_once_with_reason"] == args.devices,
                ),
            ],
            out_dir=args.out,
        )
    fleet.print_summary(document)
    print(f"  logs: {directory}")
    return document


if __name__ == "__main__":
    main()
