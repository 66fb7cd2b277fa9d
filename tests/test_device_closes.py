"""How device connections end when the gateway ends them: refused handshakes, a frame too
large, a flood. Real uvicorn, real sockets; a raw TCP peer where a well-behaved client library
would hide what the gateway does (it never answers a close frame, it keeps sending).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import orjson
import pytest
import redis.asyncio as aioredis
from live import live_gateway
from rawws import CLOSE, TEXT, RawSocket, close_of
from test_device_ws import bearer, device_doc, eventually, presence_feed
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.wsprotocol import CLOSE_TIMEOUT

TIMEOUT = 5.0


@contextlib.contextmanager
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """Every record at ERROR or above from uvicorn's loggers and the gateway's."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    loggers = [logging.getLogger("uvicorn"), logging.getLogger()]  # uvicorn does not propagate
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


# --- refused handshakes -------------------------------------------------------------


async def test_refused_handshakes_log_no_error_and_keep_their_status_and_body(
    redis_url: str,
) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("rf-1")
        base = f"{gw.ws_url}/ws/devices"
        cases: list[tuple[str, dict[str, str] | None, int]] = [
            (f"{base}/rf-1", None, 401),
            (f"{base}/rf-1?token=", None, 401),
            (f"{base}/rf-1", bearer("not-the-token"), 403),
            (f"{base}/rf-1?token=not-the-token", None, 403),
            (f"{base}/nobody", bearer(token), 404),
            (f"{base}/nobody?token={token}", None, 404),
        ]
        with errors_logged() as errors:
            for url, headers, status in cases:
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url, additional_headers=headers, open_timeout=TIMEOUT):
                        pass
                response = refused.value.response
                assert response.status_code == status, url
                body = orjson.loads(response.body or b"")
                assert body["status"] == status and isinstance(body["detail"], str), body
            await asyncio.sleep(0.2)  # each refused connection's app call has returned
        assert [record.getMessage() for record in errors] == []


# --- a frame too large ----------------------------------------------------------------


async def test_a_frame_too_large_closes_1009_with_its_reason_everywhere(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with live_gateway(redis_url) as gw, presence_feed(redis_client) as feed:
        token = await gw.register("big-1")
        async with connect(
            f"{gw.ws_url}/ws/devices/big-1", additional_headers=bearer(token), max_size=None
        ) as ws:
            await asyncio.wait_for(ws.recv(), TIMEOUT)  # welcome
            blob = orjson.dumps({"type": "report", "reported_state": {"blob": "x" * 100_000}})
            with contextlib.suppress(ConnectionClosed):
                await ws.send(blob.decode())
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await ws.recv()
            assert (ws.close_code, ws.close_reason) == (1009, "frame_too_large")
        offline = (await feed.wait("big-1", "offline"))[0]
        assert offline["reason"] == "frame_too_large"
        assert (await device_doc(gw, "big-1"))["reported_state"] == {}


async def test_a_frame_too_large_is_closed_cleanly_and_dropped_promptly(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("big-2")
        device = await RawSocket.open(gw.port, "/ws/devices/big-2", token)
        try:
            assert (await device.frame())[0] == TEXT  # welcome
            # a report that arrives whole in the same read as the frame too large still counts
            device.send(orjson.dumps({"type": "report", "reported_state": {"a": 1}, "id": 1}))
            device.send(b'{"type":"heartbeat","reported_state":{"b":"' + b"y" * 70_000 + b'"}}')
            # the close frame reaches a peer that is still sending (no reset destroys it) ...
            assert await device.close_frame() == (1009, "frame_too_large")
            # ... and a peer that never answers it is not kept waiting for
            assert await device.seconds_until_dropped() < CLOSE_TIMEOUT + 2
        finally:
            device.close()

        async def stored() -> bool:
            return bool((await device_doc(gw, "big-2"))["reported_state"] == {"a": 1})

        await eventually(stored, "the report sent before the frame too large")


# --- a flood ------------------------------------------------------------------------


async def test_a_flood_is_closed_after_the_burst_and_dropped_promptly(redis_url: str) -> None:
    burst = 3
    async with live_gateway(redis_url, rate_limit=0.1, rate_burst=burst) as gw:
        token = await gw.register("fl-1")
        device = await RawSocket.open(gw.port, "/ws/devices/fl-1", token)
        try:
            assert (await device.frame())[0] == TEXT  # welcome
            for _ in range(40):
                device.send(b'{"type":"heartbeat"}')
            errors = 0
            async with asyncio.timeout(TIMEOUT):
                while (frame := await device.frame())[0] != CLOSE:
                    assert orjson.loads(frame[1])["code"] == "rate_limited"
                    errors += 1
            # the burst is taken, the next `burst` frames are refused, the one after closes
            assert errors == burst
            assert close_of(frame[1]) == (4429, "rate_limited")
            assert await device.seconds_until_dropped() < CLOSE_TIMEOUT + 2
        finally:
            device.close()
