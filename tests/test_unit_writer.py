"""The per-socket writer, over an in-memory ASGI peer: ordering, overflow, closing, failures."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgipeer import Peer, accepted, until
from prometheus_client import CollectorRegistry, Histogram

from gateway import disconnect
from gateway.writer import Relay, Writer

pytestmark = pytest.mark.unit


class Overflows:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def writer_for(peer: Peer, limit: int = 8, on_overflow: Overflows | None = None) -> Writer:
    return Writer(await accepted(peer), limit, on_overflow)


async def test_frames_queued_before_a_close_go_out_before_the_close_frame() -> None:
    peer = Peer()
    writer = await writer_for(peer)
    peer.reading.clear()
    for n in range(3):
        assert writer.send(b'{"n":%d}' % n)
    writer.close(disconnect.NORMAL)
    await until(lambda: peer.waiting == 1)
    assert peer.closes == []  # the close waits behind the queued frames
    peer.reading.set()
    await writer.wait_closed()
    assert peer.after_accept == [
        {"type": "websocket.send", "text": '{"n":0}'},
        {"type": "websocket.send", "text": '{"n":1}'},
        {"type": "websocket.send", "text": '{"n":2}'},
        {"type": "websocket.close", "code": 1000, "reason": "closed"},
    ]


async def test_a_full_queue_closes_with_4408_once_and_calls_on_overflow_once() -> None:
    peer = Peer()
    overflows = Overflows()
    writer = await writer_for(peer, limit=3, on_overflow=overflows)
    peer.reading.clear()
    assert writer.send(b"in flight")
    await until(lambda: peer.waiting == 1)  # the sender holds it; the queue is empty again
    assert all(writer.send(b"queued") for _ in range(3))
    assert not writer.send(b"one too many")
    assert not writer.send(b"and another")
    assert writer.closed
    assert overflows.calls == 1
    # a peer that does not read is not waited for: its close goes out with its frames stuck
    await asyncio.wait_for(writer.wait_closed(), 0.5)
    peer.reading.set()
    await asyncio.sleep(0)
    assert peer.closes == [(4408, "slow_consumer")]
    assert peer.frames == []  # queued frames are dropped, the one in flight too
    assert overflows.calls == 1


async def test_a_closed_writer_refuses_frames_and_closes_once_with_its_first_code() -> None:
    peer = Peer()
    writer = await writer_for(peer)
    writer.close(disconnect.REPLACED)
    writer.close(disconnect.NORMAL)
    assert not writer.send(b"late")
    await writer.wait_closed()
    assert peer.after_accept == [{"type": "websocket.close", "code": 4409, "reason": "replaced"}]
    assert peer.transport.aborted == 0  # nor cut short by a second close


async def test_a_drained_writer_starts_sending_again() -> None:
    peer = Peer()
    writer = await writer_for(peer)
    assert writer.send(b"first")
    await until(lambda: writer.sent == 1)
    await asyncio.sleep(0)  # the sender task ends: an idle socket keeps no task
    assert writer.send(b"second")
    await until(lambda: writer.sent == 2)
    assert peer.frames == ["first", "second"]


async def test_utf8_frames_go_as_text_and_other_bytes_as_binary() -> None:
    peer = Peer()
    writer = await writer_for(peer)
    writer.send('{"t":"é"}'.encode())
    writer.send(b"\xff\x00raw")
    await until(lambda: writer.sent == 2)
    assert peer.after_accept == [
        {"type": "websocket.send", "text": '{"t":"é"}'},
        {"type": "websocket.send", "bytes": b"\xff\x00raw"},
    ]


async def test_a_peer_gone_mid_send_is_dropped_quietly_and_its_close_aborts() -> None:
    peer = Peer()
    writer = await writer_for(peer)
    peer.gone = True
    assert writer.send(b"into the void")
    await until(lambda: peer.refused == 1)
    assert writer.sent == 0
    writer.close(disconnect.NORMAL)
    await asyncio.wait_for(writer.wait_closed(), 0.5)
    assert peer.transport.aborted == 1
    assert peer.closes == []


async def test_a_relay_is_observed_once_its_frame_is_written_not_when_queued() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("relay_seconds", "test", registry=registry)
    peer = Peer()
    writer = await writer_for(peer)
    peer.reading.clear()
    writer.send(b"relayed", Relay(time.perf_counter(), histogram))
    await until(lambda: peer.waiting == 1)
    assert registry.get_sample_value("relay_seconds_count") == 0
    peer.reading.set()
    await until(lambda: writer.sent == 1)
    assert registry.get_sample_value("relay_seconds_count") == 1
