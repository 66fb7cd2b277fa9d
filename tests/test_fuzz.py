"""Hostile input: property tests of the frame parsers and shadow rules, then attacks on a live
gateway (invalid UTF-8, binary, deep and wide JSON, oversize, flood, slowloris, bad tokens).

Focused on frames and adversarial documents; the shadow's ordinary laws live in
test_shadow_properties.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import ADMIN_KEY, LiveGateway, live_gateway
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway import disconnect, protocol, shadow

TIMEOUT = 5.0
LIMITS = shadow.Limits()

# --- properties of the pure parsers ----------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_scalars = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["heartbeat", "report", "get", "subscribe", "resume", "ping", "x"])},
    optional={
        "reported_state": json_values,
        "id": json_values,
        "types": json_values,
        "ids": json_values,
        "after": json_values,
    },
)


def parse_both(data: str | bytes) -> None:
    """Either parser may refuse, but only ever with FrameError."""
    for parse in (lambda d: protocol.parse_device_frame(d, LIMITS), protocol.parse_dashboard_frame):
        try:
            parse(data)
        except protocol.FrameError as exc:
            assert exc.code and isinstance(exc.message, str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.text() | st.binary())
def test_arbitrary_text_and_bytes_only_raise_frame_error(data: str | bytes) -> None:
    parse_both(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_only_raises_frame_error(value: Any) -> None:
    parse_both(orjson.dumps(value))


@settings(max_examples=400, deadline=None)
@given(frame_like)
def test_frame_shaped_json_only_raises_frame_error(frame: dict[str, Any]) -> None:
    raw = orjson.dumps(frame)
    parse_both(raw)
    parse_both(raw.decode())
    try:
        parsed = protocol.parse_device_frame(raw, LIMITS)
    except protocol.FrameError:
        return
    # what is accepted is within the limits and survives a round trip through the store format
    if isinstance(parsed, protocol.Report | protocol.Heartbeat):
        document = parsed.patch if isinstance(parsed, protocol.Report) else parsed.reported
        if document is not None:
            assert len(shadow.encode(document)) <= LIMITS.max_bytes


ADVERSARIAL: dict[str, str | bytes] = {
    "10,000-deep arrays": "[" * 10_000 + "]" * 10_000,
    "10,000-deep objects in reported_state": (
        '{"type":"report","reported_state":' + '{"a":' * 10_000 + "1" + "}" * 10_000 + "}"
    ),
    "1,000-deep (under the parser's limit)": (
        '{"type":"report","reported_state":' + '{"a":' * 1_000 + "1" + "}" * 1_000 + "}"
    ),
    "deep list in a heartbeat": '{"type":"heartbeat","reported_state":{"l":'
    + "[" * 500
    + "]" * 500
    + "}}",
    "100,000 keys": orjson.dumps(
        {"type": "report", "reported_state": {f"k{n}": n for n in range(100_000)}}
    ),
    "huge string": orjson.dumps({"type": "report", "reported_state": {"s": "x" * 5_000_000}}),
    "huge key": orjson.dumps({"type": "report", "reported_state": {"k" * 100_000: 1}}),
    "huge id": orjson.dumps({"type": "get", "id": "i" * 1_000_000}),
    "huge integer id": '{"type":"get","id":' + "9" * 5000 + "}",
    "NaN": '{"type":"report","reported_state":{"t":NaN}}',
    "Infinity": '{"type":"report","reported_state":{"t":Infinity}}',
    "-Infinity": '{"type":"heartbeat","reported_state":{"t":-Infinity}}',
    "1e999": '{"type":"report","reported_state":{"t":1e999}}',
    "invalid UTF-8": b'{"type":"report","reported_state":{"t":"\xff\xfe"}}',
    "overlong UTF-8": b'{"type":"get","id":"\xc0\xaf"}',
    "lone surrogate (text)": '{"type":"get","id":"\ud800"}',
    "lone surrogate (escaped)": '{"type":"report","reported_state":{"\\ud800":1}}',
    "NUL bytes": '{"type":"report","reported_state":{"\\u0000":"\\u0000"}}',
    "duplicate keys": '{"type":"report","type":"get","reported_state":{"a":1,"a":2}}',
    "BOM": "\ufeff" + '{"type":"get"}',
    "trailing garbage": '{"type":"get"} {"type":"get"}',
    "empty": "",
    "whitespace": " \n\t ",
    "type is an object": '{"type":{"type":"get"}}',
    "id is a bool": '{"type":"get","id":true}',
    "id is a float": '{"type":"get","id":1.5}',
    "empty key": '{"type":"report","reported_state":{"":1}}',
    "filter with 100,000 ids": orjson.dumps(
        {"type": "subscribe", "ids": [f"d{n}" for n in range(100_000)]}
    ),
    "filter with colon ids": '{"type":"subscribe","ids":["a:b","*"]}',
    "resume with a huge id": orjson.dumps({"type": "resume", "after": "1" * 100_000}),
}


def test_adversarial_documents_only_raise_frame_error() -> None:
    for name, data in ADVERSARIAL.items():
        try:
            parse_both(data)
        except Exception as exc:  # anything but FrameError is a bug
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc}") from exc
    too_deep = '{"type":"report","reported_state":' + '{"a":' * 9 + "1" + "}" * 9 + "}"
    codes = {}
    for name, data in {
        "too deep": too_deep,
        "100,000 keys": ADVERSARIAL["100,000 keys"],
        "NaN": ADVERSARIAL["NaN"],
        "invalid UTF-8": ADVERSARIAL["invalid UTF-8"],
        "10,000-deep": ADVERSARIAL["10,000-deep objects in reported_state"],
        "huge key": ADVERSARIAL["huge key"],
    }.items():
        try:
            protocol.parse_device_frame(data, LIMITS)
        except protocol.FrameError as exc:
            codes[name] = exc.code
    assert codes == {
        "too deep": "state_too_deep",
        "100,000 keys": "state_too_large",
        "NaN": "invalid_json",
        "invalid UTF-8": "invalid_json",
        "10,000-deep": "invalid_json",
        "huge key": "invalid_state_key",
    }


# --- merge and delta on adversarial documents --------------------------------------------------

keys = st.text(min_size=1, max_size=6)
leaves = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
documents = st.recursive(
    st.dictionaries(keys, leaves, max_size=4),
    lambda inner: st.dictionaries(keys, leaves | inner | st.lists(leaves, max_size=3), max_size=4),
    max_leaves=25,
)
patches = st.recursive(
    st.dictionaries(keys, leaves | st.none(), max_size=4),
    lambda inner: st.dictionaries(keys, leaves | st.none() | inner, max_size=4),
    max_leaves=25,
)


def delta_patch(desired: shadow.Document, difference: shadow.Document) -> shadow.Document:
    """The desired values of every leaf in *difference*, walked along *desired*'s shape
    (a leaf is `{"desired", "reported"}`, but so could be a desired object: the shape decides)."""
    patch: shadow.Document = {}
    for key, node in difference.items():
        wanted = desired[key]
        if isinstance(wanted, dict) and wanted:
            patch[key] = delta_patch(wanted, node)
        else:
            patch[key] = node["desired"]
    return patch


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, documents)
def test_merging_the_deltas_desired_values_brings_reported_in_sync(
    desired: shadow.Document, reported: shadow.Document
) -> None:
    desired_copy, reported_copy = copy.deepcopy(desired), copy.deepcopy(reported)
    difference = shadow.delta(desired, reported)
    merged = shadow.merge(reported, delta_patch(desired, difference))
    assert shadow.delta(desired, merged) == {}
    assert (desired, reported) == (desired_copy, reported_copy)  # nothing was mutated


@settings(max_examples=300, deadline=None)
@given(documents, patches)
def test_merge_never_mutates_its_inputs(document: shadow.Document, patch: shadow.Document) -> None:
    before = (copy.deepcopy(document), copy.deepcopy(patch))
    merged = shadow.merge(document, patch)
    assert (document, patch) == before
    # and the result shares no mutable container with the patch that a later merge could alter
    shadow.merge(merged, {k: None for k in merged})
    assert (document, patch) == before


def test_merge_and_delta_on_wide_documents() -> None:
    wide = {f"k{n}": n for n in range(100_000)}
    half = {f"k{n}": -n for n in range(0, 100_000, 2)}
    snapshot = dict(wide)
    merged = shadow.merge(wide, half)
    assert wide == snapshot
    difference = shadow.delta(merged, wide)
    assert len(difference) == 49_999  # k0 is -0 == 0
    assert shadow.delta(merged, shadow.merge(wide, delta_patch(merged, difference))) == {}


# --- attacks on a live gateway -----------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def welcomed(gw: LiveGateway, device_id: str, token: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(
        f"{gw.ws_url}/ws/devices/{device_id}", additional_headers=bearer(token), **kwargs
    )
    assert orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "welcome"
    return ws


async def next_frame(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def close_code(ws: ClientConnection) -> int | None:
    async with asyncio.timeout(TIMEOUT * 2):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


async def still_serving(gw: LiveGateway, device_id: str, token: str) -> None:
    async with gw.client() as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get(f"/api/devices/{device_id}")).status_code == 200
    ws = await welcomed(gw, device_id, token)
    await ws.send('{"type":"get","id":"alive"}')
    assert (await next_frame(ws))["id"] == "alive"
    await ws.close()


async def raw_device_socket(port: int, device_id: str, token: str) -> socket.socket:
    """A WebSocket handshake by hand, so frames can be written byte by byte."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET /ws/devices/{device_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode(),
    )
    head = b""
    async with asyncio.timeout(TIMEOUT):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 §5.2), FIN set."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


async def server_close_code(sock: socket.socket) -> int | None:
    """Read server frames until a close frame; its code (None if the TCP link just ended)."""
    loop = asyncio.get_running_loop()
    buffer = b""
    async with asyncio.timeout(TIMEOUT * 2):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionError:
                return None
            if not chunk:
                return None
            buffer += chunk
            while len(buffer) >= 2:
                opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
                offset = 2
                if length == 126:
                    length, offset = struct.unpack("!H", buffer[2:4])[0], 4
                elif length == 127:
                    length, offset = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < offset + length:
                    break
                payload, buffer = buffer[offset : offset + length], buffer[offset + length :]
                if opcode == 0x8:
                    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


async def test_invalid_utf8_text_frame_closes_1007_and_nothing_breaks(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("u8-1", "t")
        sock = await raw_device_socket(gw.port, "u8-1", token)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, client_frame(0x1, b'{"type":"get","id":"\xff\xfe"}'))
            assert await server_close_code(sock) == 1007
        finally:
            sock.close()
        await still_serving(gw, "u8-1", token)


async def test_binary_deep_wide_and_odd_frames_get_error_frames(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("hx-1", "t")
        ws = await welcomed(gw, "hx-1", token)
        cases: list[tuple[str | bytes, str]] = [
            (b'{"type":"get"}', "binary_frame"),
            ("[" * 10_000 + "]" * 10_000, "invalid_json"),
            (
                '{"type":"report","reported_state":' + '{"a":' * 10_000 + "1" + "}" * 10_000 + "}",
                "invalid_json",
            ),
            ('{"type":"report","reported_state":{"t":NaN}}', "invalid_json"),
            ('{"type":"report","reported_state":{"t":Infinity}}', "invalid_json"),
            (
                orjson.dumps(
                    {"type": "report", "reported_state": {f"k{n}": n for n in range(5000)}}
                ).decode(),
                "state_too_large",
            ),
            (
                '{"type":"report","reported_state":' + '{"a":' * 9 + "1" + "}" * 9 + "}",
                "state_too_deep",
            ),
        ]
        for data, code in cases:
            await ws.send(data)
            frame = await next_frame(ws)
            if code:
                assert (frame["type"], frame.get("code")) == ("error", code), (
                    str(data)[:60],
                    frame,
                )
        async with gw.client() as http:
            assert (await http.get("/api/devices/hx-1")).json()["reported_state"] == {}
        await ws.close()
        await still_serving(gw, "hx-1", token)


async def test_100000_keys_and_oversize_frames_close_1009(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("big-1", "t")
        for payload in (
            orjson.dumps(
                {"type": "report", "reported_state": {f"k{n}": n for n in range(100_000)}}
            ),
            b'{"type":"get","id":"' + b"x" * 70_000 + b'"}',
        ):
            ws = await welcomed(gw, "big-1", token, max_size=None)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(payload.decode())
            assert await close_code(ws) == 1009
        await still_serving(gw, "big-1", token)


async def test_flood_is_closed_4429(redis_url: str) -> None:
    async with live_gateway(redis_url, rate_limit=5.0, rate_burst=10) as gw:
        token = await gw.register("fl-1", "t")
        ws = await welcomed(gw, "fl-1", token)
        with contextlib.suppress(ConnectionClosed):
            for _ in range(1000):
                await ws.send('{"type":"heartbeat"}')
        code = await close_code(ws)
        assert code == 4429, code
        async with gw.client() as http:

            async def reason() -> str | None:
                items = (await http.get("/api/devices/fl-1/history")).json()["items"]
                offline = [i for i in items if i.get("status") == "offline"]
                return offline[0]["reason"] if offline else None

            for _ in range(100):
                if await reason() is not None:
                    break
                await asyncio.sleep(0.05)
            assert await reason() == disconnect.RATE_LIMITED.reason
        print(f"\n[measured] flood: client saw close code {code}", flush=True)
        await still_serving(gw, "fl-1", token)


async def test_slowloris_handshakes_do_not_starve_others(redis_url: str) -> None:
    count = 200
    async with live_gateway(redis_url) as gw:
        token = await gw.register("sl-1", "t")
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.sock_sendall(sock, b"GET /ws/devices/sl-1 HT")
            socks.append(sock)
        started = time.monotonic()
        closed: dict[int, float] = {}

        async def drip(index: int, sock: socket.socket) -> None:
            for byte in b"TP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    await loop.sock_sendall(sock, bytes([byte]))
                    await asyncio.sleep(1.0)
                except OSError:
                    closed[index] = time.monotonic() - started
                    return

        drips = [asyncio.create_task(drip(n, s)) for n, s in enumerate(socks)]
        try:
            await asyncio.sleep(2.0)
            # everyone else is still served while the slow handshakes hang on
            await still_serving(gw, "sl-1", token)
            async with gw.client() as http:
                for _ in range(20):
                    assert (await http.get("/api/stats")).status_code == 200
            await asyncio.sleep(10.0)
            served = time.monotonic() - started
        finally:
            for task in drips:
                task.cancel()
            for sock in socks:
                sock.close()
        print(
            f"\n[measured] slowloris: {count} partial handshakes; {len(closed)} closed by the "
            f"gateway within {served:.1f} s (uvicorn has no header-read timeout)",
            flush=True,
        )


WRITE_COMMANDS = (
    "set", "setex", "psetex", "del", "unlink", "hset", "hdel", "hincrby", "sadd", "srem", "zadd",
    "zrem", "xadd", "xtrim", "evalsha", "eval", "fcall", "publish", "expire", "pexpire", "incr",
)  # fmt: skip


async def write_calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {
        name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in WRITE_COMMANDS
        if f"cmdstat_{name}" in stats
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_thousands_of_bad_token_handshakes_write_nothing(
    redis_url: str, redis_client: aioredis.Redis, gateway_factory: Any
) -> None:
    # nothing on a clock: no periodic sweep (its adoption step runs a no-op script every
    # second) and no fleet-counts sample (a point every 10 s of the wall clock)
    gw = gateway_factory(redis_url, sweep_interval="3600", fleet_sampling="false")
    async with httpx.AsyncClient(base_url=gw.base_url, headers=bearer(ADMIN_KEY)) as http:
        response = await http.post("/api/devices", json={"device_id": "bt-1", "device_type": "t"})
        token = response.json()["token"]
    await asyncio.sleep(0.5)
    size_before = await redis_client.dbsize()
    dump_before = {key: await redis_client.dump(key) async for key in redis_client.scan_iter()}
    writes_before = await write_calls(redis_client)
    cpu_before = cpu_seconds(gw.pid)
    statuses: dict[int, int] = {}
    total = 2000
    semaphore = asyncio.Semaphore(50)

    async def attempt(n: int) -> None:
        wrong = token[:-4] + f"{n:04d}"[-4:]
        auth = "" if n % 4 == 0 else f"Authorization: Bearer {wrong}\r\n"
        async with semaphore:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                (
                    f"GET /ws/devices/bt-1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
                ).encode()
            )
            line = await asyncio.wait_for(reader.readline(), TIMEOUT * 2)
            status = int(line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    started = time.monotonic()
    await asyncio.gather(*(attempt(n) for n in range(total)))
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(gw.pid) - cpu_before
    await asyncio.sleep(0.5)
    assert set(statuses) <= {401, 403}, statuses
    assert sum(statuses.values()) == total
    assert await redis_client.dbsize() == size_before
    dump_after = {key: await redis_client.dump(key) async for key in redis_client.scan_iter()}
    assert dump_after == dump_before
    assert await write_calls(redis_client) == writes_before
    print(
        f"\n[measured] {total} bad-token handshakes: {statuses}, {elapsed:.2f} s wall, "
        f"gateway CPU {cpu:.2f} s ({cpu / total * 1000:.2f} ms each), Redis writes 0",
        flush=True,
    )
    assert cpu < total * 0.05, f"{cpu:.1f} CPU seconds for {total} refused handshakes"
