"""Stopping a gateway's background tasks is bounded: a lost cancellation is made again, and a
task that will not stop is named, with where it waits, and left behind."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway import runtime
from gateway.config import Settings
from gateway.runtime import Gateway

pytestmark = pytest.mark.unit


def gateway() -> Gateway:
    return Gateway(Settings(redis_url="redis://127.0.0.1:1/0"))  # never connected


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    cancelled = 0

    async def swallows_once() -> None:
        nonlocal cancelled
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled += 1
                if cancelled > 1:
                    raise

    gw = gateway()
    gw.spawn(swallows_once(), "swallows-once")
    await asyncio.sleep(0)
    started = time.monotonic()
    await gw.stop()
    assert cancelled == 2
    assert time.monotonic() - started < runtime.STOP_TASKS_WITHIN


async def test_a_task_that_never_stops_is_named_and_left_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "STOP_TASKS_WITHIN", 0.3)
    release = asyncio.Event()

    async def stuck_here() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    gw = gateway()
    gw.spawn(stuck_here(), "stubborn")
    gw.spawn(asyncio.sleep(3600), "polite")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        await asyncio.wait_for(gw.stop(), 5)
    assert "task stubborn did not stop" in caplog.text
    assert "stuck_here" in caplog.text and "polite" not in caplog.text
    release.set()
    stubborn = next(task for task in gw._tasks if task.get_name() == "stubborn")
    stubborn.cancel()
    await asyncio.wait([stubborn], timeout=1)
    assert stubborn.done()
