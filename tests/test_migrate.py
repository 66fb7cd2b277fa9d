"""The stored layout's version and `gateway migrate`, on one node (valkey, redis-server) and
on the 3+3 cluster: fleets written by the previous release's own scripts (tests/layout1.py)
are upgraded with every device intact, an interrupted run (kill -9) run again ends as a clean
run, a gateway refuses an older or newer layout in one line, data the article's classes wrote
is never touched, and a process of the previous release still serving makes `--apply` stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from backends import Client, all_keys, node_of, single_node
from layout1 import Layout1Writer, write_fleet
from redis.asyncio.cluster import RedisCluster

from gateway.config import Settings
from gateway.embedded import find_free_port
from gateway.keys import LAYOUT1_OWN_FIELDS, OWN_FIELDS, Keys, layout_migration, layout_version
from gateway.metrics import Metrics
from gateway.migrate import layout as stored_layout
from gateway.migrate.runner import MigrateRefused, Migration
from gateway.migrate.steps import STEPS
from gateway.presence import PresenceEngine
from gateway.store import Store

REPO = Path(__file__).resolve().parents[1]
RENAMES = dict(zip(STEPS[0].args[::2], STEPS[0].args[1::2], strict=True))
QUIET: Any = lambda line: None  # noqa: E731


async def snapshot(client: Client) -> dict[str, Any]:
    """Every key's type and content (hashes as dicts, lists, sets, zsets with scores,
    streams with ids, strings): what a migration may change is compared against it."""
    found: dict[str, Any] = {}
    for name in sorted(await all_keys(client)):
        async with node_of(client, name) as node:
            kind = (await node.type(name)).decode()
            if kind == "hash":
                value: Any = await node.hgetall(name)
            elif kind == "list":
                value = await node.lrange(name, 0, -1)
            elif kind == "set":
                value = await node.smembers(name)
            elif kind == "zset":
                value = await node.zrange(name, 0, -1, withscores=True)
            elif kind == "stream":
                value = await node.xrange(name)
            else:
                value = await node.get(name)
        found[name] = (kind, value)
    return found


def upgraded(before: dict[str, Any], keys: Keys) -> dict[str, Any]:
    """What layout 2 must hold: the same, with every device hash's own fields renamed."""
    expected: dict[str, Any] = {}
    for name, (kind, value) in before.items():
        if kind == "hash" and "device:state:" in name:
            value = {RENAMES.get(f.decode(), f.decode()).encode(): v for f, v in value.items()}
        expected[name] = (kind, value)
    expected[layout_version(keys)] = ("string", b"2")
    return expected


async def old_fleet(client: Client, keys: Keys, count: int = 40) -> list[str]:
    ids = await write_fleet(Layout1Writer(client, keys), count)
    assert await stored_layout.stored(client, keys) == stored_layout.FIRST
    return ids


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=300,
        env=env or dict(os.environ), cwd=REPO,
    )  # fmt: skip


def assert_one_line(stderr: str, starts: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), stderr


# --- the version at start ------------------------------------------------------------
async def test_first_start_writes_the_version_and_seed_data_needs_none(
    backend_client: Client, layout: Keys, seed: Any, backend_url: str
) -> None:
    if not isinstance(backend_client, RedisCluster):
        # the article's classes alone wrote here: nothing of the gateway's, nothing to upgrade
        sync = redis.Redis.from_url(backend_url)
        seed.DeviceStateManager(sync).register_device("seed-1", "thermo")
        sync.close()
    assert await stored_layout.stored(backend_client, layout) is None
    assert await stored_layout.ensure(backend_client, layout) == stored_layout.CURRENT
    assert await backend_client.get(layout_version(layout)) == b"2"
    assert await stored_layout.ensure(backend_client, layout) == stored_layout.CURRENT


async def test_previous_release_data_is_layout_1_and_refused(
    backend_client: Client, layout: Keys
) -> None:
    await old_fleet(backend_client, layout, 3)
    with pytest.raises(stored_layout.LayoutRefused) as refused:
        await stored_layout.ensure(backend_client, layout)
    assert "stored layout 1, older" in str(refused.value)
    assert "`gateway migrate --apply`" in str(refused.value)
    assert await backend_client.get(layout_version(layout)) is None  # nothing written
    await backend_client.set(layout_version(layout), 3)
    with pytest.raises(
        stored_layout.LayoutRefused, match=r"newer than this release's 2 \(a downgrade\)"
    ):
        await stored_layout.ensure(backend_client, layout)
    with pytest.raises(MigrateRefused, match="a downgrade"):
        await Migration(backend_client, layout, apply=True, say=QUIET).run()


@single_node
def test_gateway_serve_refuses_an_older_layout_in_one_line(backend_url: str) -> None:
    async def write() -> None:
        client = aioredis.Redis.from_url(backend_url)
        await old_fleet(client, Keys(), 2)
        await client.aclose()

    asyncio.run(write())
    port = str(find_free_port())
    done = run_cli("serve", "--redis-url", backend_url, "--port", port, "--api-key", "k" * 32)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("gateway:")]
    assert lines == [
        "gateway: the data in Redis is in stored layout 1, older than this release's 2: run "
        "`gateway migrate` to see what upgrading changes, then `gateway migrate --apply`"
    ], done.stderr


# --- migrating -----------------------------------------------------------------------
async def test_dry_run_writes_nothing_and_apply_keeps_every_device(
    backend_client: Client, layout: Keys
) -> None:
    ids = await old_fleet(backend_client, layout)
    before = await snapshot(backend_client)
    lines: list[str] = []
    dry = await Migration(backend_client, layout, apply=False, batch=7, say=lines.append).run()
    assert await snapshot(backend_client) == before
    assert dry.steps[0].examined == len(ids) and dry.steps[0].changed == len(ids)
    assert any(line.startswith("estimate: --apply") for line in lines), lines
    done = await Migration(backend_client, layout, apply=True, batch=7, say=QUIET).run()
    assert done.final == stored_layout.CURRENT and done.steps[0].changed == len(ids)
    after = await snapshot(backend_client)
    assert after == upgraded(before, layout)
    assert await stored_layout.ensure(backend_client, layout) == stored_layout.CURRENT
    # the new release reads every device as the old one wrote it: registry, presence,
    # shadow, versions, history and positions; and an online device's session still holds
    store = Store(backend_client, Settings(), layout)
    for index, device_id in enumerate(ids):
        old = {k.decode(): v for k, v in before[layout.state(device_id)][1].items()}
        device = await store.require(device_id)
        assert device.version == int(old[LAYOUT1_OWN_FIELDS.version]) == 2
        assert device.desired_version == device.reported_version == 1
        assert device.presence_version == int(old[LAYOUT1_OWN_FIELDS.presence_version])
        assert device.desired_state == {"interval": 30 + index % 5}
        assert device.reported_state == {"temp": index % 30, "fw": "1.0"}
        assert device.status == ("online" if index % 2 == 0 else "offline")
        history, _ = await store.history(device_id, 10, None)
        assert [event["type"] for event in history] == (
            ["presence", "state", "state"] if index % 2 == 0 else ["state", "state"]
        )
    stale: list[tuple[str, str, int]] = []
    engine = PresenceEngine(
        backend_client, store, Settings(), Metrics(), lambda *seen: stale.append(seen)
    )
    fresh = engine.beat(ids[0], "old-session-0", b'{"temp":99,"fw":"1.0"}', ack=True)
    engine.beat(ids[2], "not-its-session")
    await engine.flush()
    assert fresh is not None and await fresh == 3  # the version the old release left, + 1
    assert stale == [(ids[2], "not-its-session", -1)]
    again = await Migration(backend_client, layout, apply=True, say=QUIET).run()
    assert again.steps == []


async def test_an_online_device_keeps_its_session_across_the_upgrade(
    backend_client: Client, layout: Keys
) -> None:
    """A device the previous release connected is the same session's after the migration:
    the new release's scripts renew it and refuse a stale one."""
    await old_fleet(backend_client, layout, 2)
    await Migration(backend_client, layout, apply=True, say=QUIET).run()
    state = await backend_client.hget(layout.state("old-00000"), OWN_FIELDS.session)
    assert state == b"old-session-0"
    assert not await backend_client.hexists(layout.state("old-00000"), "session")


@single_node
async def test_seed_written_devices_are_untouched_and_readable(
    backend_client: Client, backend_url: str, seed: Any
) -> None:
    sync = redis.Redis.from_url(backend_url)
    manager = seed.DeviceStateManager(sync)
    manager.register_device("seed-1", "thermo", {"room": "hall"})
    manager.device_heartbeat("seed-1", {"temp": 20})
    await old_fleet(backend_client, Keys(), 4)
    name = Keys().state("seed-1")
    before = await backend_client.hgetall(name)
    await Migration(backend_client, Keys(), apply=True, say=QUIET).run()
    assert await backend_client.hgetall(name) == before
    device = manager.get_device_state("seed-1")
    assert device is not None and device.reported_state == {"temp": 20}
    sync.close()


@pytest.mark.parametrize("schema", ["node"])
@single_node
async def test_node_field_names_migrate_too(backend_client: Client, schema: str) -> None:
    keys = Keys.single(schema=schema)
    ids = await old_fleet(backend_client, keys, 6)
    before = await snapshot(backend_client)
    await Migration(backend_client, keys, apply=True, say=QUIET).run()
    assert await snapshot(backend_client) == upgraded(before, keys)
    stored = await backend_client.hgetall(keys.state(ids[0]))
    assert b"deviceId" in stored and b"v" in stored and b"version" not in stored


# --- interrupted and run again ----------------------------------------------------------
async def test_kill_9_halfway_then_run_again_ends_as_one_clean_run(
    backend_client: Client, layout: Keys, backend_url: str
) -> None:
    writer = Layout1Writer(backend_client, layout)
    pipeline_ids = await write_fleet(writer, 30)
    # many more devices, quicker: registered only (still layout-1 hashes with own fields)
    for index in range(2000):
        await writer.register(f"bulk-{index:05d}", "meter", b"{}")
    before = await snapshot(backend_client)
    command = [sys.executable, "-m", "gateway", "migrate", "--apply", "--batch", "10",
               "--redis-url", backend_url]  # fmt: skip
    process = await asyncio.to_thread(
        subprocess.Popen, command, cwd=REPO, stdout=subprocess.DEVNULL
    )
    progress = layout_migration(layout)
    deadline = time.monotonic() + 120
    while True:
        saved = await backend_client.hgetall(progress)
        if any(int(value.split()[2]) >= 200 for value in saved.values()):
            break
        assert process.poll() is None, "the migration ended before it could be interrupted"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    middle = await snapshot(backend_client)
    assert (
        middle != before
        and await stored_layout.stored(backend_client, layout) == stored_layout.FIRST
    )
    done = run_cli("migrate", "--apply", "--batch", "50", "--redis-url", backend_url)
    assert done.returncode == 0, done.stderr
    assert "went on from an interrupted run" in done.stdout, done.stdout
    after = await snapshot(backend_client)
    assert after == upgraded(before, layout)
    assert len(pipeline_ids) == 30


# --- a process of the previous release beside the migration ------------------------------
async def test_a_serving_previous_release_process_stops_apply(
    backend_client: Client, layout: Keys, backend_url: str
) -> None:
    """What docs/operations.md says: a dry run may run while the previous release serves;
    `--apply` refuses while any gateway process listens (and says so in one line), and goes
    on where it stopped once they are stopped; a new gateway refuses the old layout."""
    ids = await old_fleet(backend_client, layout, 6)
    old = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, str(REPO / "tests" / "layout1.py"), backend_url, ids[1], ids[3]],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "serving"
        assert old.stdout.readline().split() == ["beat", "1", "1"]
        dry = run_cli("migrate", "--redis-url", backend_url)
        assert dry.returncode == 0 and "would convert 6" in dry.stdout, dry.stdout + dry.stderr
        refused = run_cli("migrate", "--apply", "--redis-url", backend_url)
        assert refused.returncode == 1
        # one subscription on one node; one per partition the process holds on a cluster
        count = (
            1
            if stored_layout.FIRST and not layout.sharded
            else len({layout.partition(ids[1]), layout.partition(ids[3])})
        )
        assert_one_line(refused.stderr, f"gateway: {count} gateway process subscription(s)")
        assert await stored_layout.stored(backend_client, layout) == stored_layout.FIRST
        assert await backend_client.hexists(layout.state(ids[0]), "version")
        assert old.stdout.readline().split() == ["beat", "1", "1"]  # still served
    finally:
        old.kill()
        old.wait(30)
        if old.stdout is not None:
            old.stdout.close()
    await asyncio.sleep(0.2)  # the server drops the dead process' subscription
    applied = run_cli("migrate", "--apply", "--redis-url", backend_url)
    assert applied.returncode == 0, applied.stderr
    assert "stored layout is now 2" in applied.stdout
    assert await stored_layout.stored(backend_client, layout) == stored_layout.CURRENT
    # the devices that process held are still online, under its sessions, for the new release
    session = await backend_client.hget(layout.state(ids[1]), OWN_FIELDS.session)
    assert session == f"old-process-{ids[1]}".encode()


async def test_node_restarted_mid_migration_starts_its_scan_over(
    backend_client: Client, layout: Keys
) -> None:
    """A saved cursor of another run id (a restart, a promoted replica) is not trusted."""
    await old_fleet(backend_client, layout, 5)
    migration = Migration(backend_client, layout, apply=True, say=QUIET)
    for name, _ in migration.nodes():
        await backend_client.hset(
            layout_migration(layout), f"2 {name}", "not-this-run 12345 99 99 99 1"
        )
    done = await migration.run()
    assert done.steps[0].changed == 5 and not done.steps[0].resumed
    assert not await backend_client.exists(layout_migration(layout))


def test_every_step_renames_only_the_gateway_own_fields() -> None:
    assert RENAMES["version"] == OWN_FIELDS.version and RENAMES["session"] == OWN_FIELDS.session
    seed_fields = {"device_id", "device_type", "registered_at", "status", "last_seen",
                   "reported_state", "desired_state", "metadata", "deviceId", "deviceType",
                   "registeredAt", "lastSeen", "reportedState", "desiredState"}  # fmt: skip
    assert not seed_fields & (set(RENAMES) | set(RENAMES.values()))
    assert len(set(RENAMES.values())) == len(RENAMES)
