"""The Lua scripts: they load on every engine, survive a flushed script cache, and document
their KEYS and ARGV (architecture.md: one atomic operation per file, with its header)."""

from __future__ import annotations

import asyncio
import re
from importlib import resources

import pytest
import redis.asyncio as aioredis

from gateway.config import Settings
from gateway.keys import Keys
from gateway.scripts import SCRIPTS, Script, Scripts
from gateway.store import Store

LUA = resources.files("gateway") / "lua"
SCRIPT_FILES = sorted(
    entry.name[: -len(".lua")]
    for entry in LUA.iterdir()
    if entry.name.endswith(".lua") and not entry.name.startswith("_")  # `_name`: helpers
)


def header_and_body(name: str) -> tuple[str, str]:
    """The leading comment block of a script file, and the rest."""
    lines = (LUA / f"{name}.lua").read_text(encoding="utf-8").splitlines()
    split = next((i for i, line in enumerate(lines) if not line.startswith("--")), len(lines))
    return "\n".join(lines[:split]), "\n".join(lines[split:])


def test_every_script_file_is_a_script() -> None:
    assert SCRIPT_FILES, "no Lua files found"
    assert sorted(script.name for script in SCRIPTS.all()) == SCRIPT_FILES


@pytest.mark.parametrize("name", SCRIPT_FILES)
def test_every_script_documents_keys_argv_and_returns(name: str) -> None:
    header, body = header_and_body(name)
    assert "KEYS[" in header, f"{name}.lua: no KEYS in its header"
    assert "ARGV[" in header, f"{name}.lua: no ARGV in its header"
    assert "Returns" in header, f"{name}.lua: its header does not say what it returns"
    for kind in ("KEYS", "ARGV"):
        for index in sorted(set(re.findall(rf"{kind}\[(\d+)\]", body)), key=int):
            assert f"{kind}[{index}]" in header, f"{name}.lua uses {kind}[{index}] undocumented"


def test_every_script_carries_the_layouts_names_and_the_shared_helpers() -> None:
    library = (LUA / "_lib.lua").read_text(encoding="utf-8")
    for script in SCRIPTS.all():
        head, _, rest = script.source.partition(library)
        assert rest, script.name
        assert head.startswith("-- rendered for the python layout") and "'PUBLISH'" in head
    cluster = Scripts(Keys.cluster(partitions=4))
    node = Scripts(Keys(schema="node"))
    assert "'SPUBLISH'" in cluster.connect.source and "'deviceId'" in node.connect.source
    assert len({SCRIPTS.connect.sha, cluster.connect.sha, node.connect.sha}) == 3
    # the command helpers go with the scripts that use them, and only there: every other
    # script (heartbeats above all) stays as short to load and run as before
    helpers = (LUA / "_commands.lua").read_text(encoding="utf-8")
    with_helpers = {s.name for s in SCRIPTS.all() if helpers in s.source}
    assert with_helpers == {"connect", "deregister", "mqtt_connect"} | {
        s.name for s in SCRIPTS.all() if s.name.startswith("command_")
    }


async def test_all_scripts_load(redis_client: aioredis.Redis) -> None:
    await redis_client.script_flush()
    await SCRIPTS.load(redis_client)
    shas = [script.sha for script in SCRIPTS.all()]
    assert await redis_client.script_exists(*shas) == [True] * len(shas)


async def test_a_call_after_script_flush_reloads_and_succeeds(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    store = Store(redis_client, Settings(redis_url=redis_url))
    await store.register("d1", "t", {})
    await redis_client.script_flush()
    assert await redis_client.script_exists(SCRIPTS.register.sha) == [False]
    await store.register("d2", "t", {})  # NOSCRIPT, reload, retry
    assert await redis_client.script_exists(SCRIPTS.register.sha) == [True]
    await redis_client.script_flush()
    results = await asyncio.gather(
        *(store.patch_section("d1", "desired", {f"k{i}": i}) for i in range(5)),
        *(store.register(f"n{i}", "t", {}) for i in range(5)),
    )
    assert len(results) == 10
    assert len((await store.require("d1")).desired_state) == 5
    assert (await store.stats())["registered"] == 7


async def test_a_script_with_an_unknown_sha_is_loaded_from_its_source(
    redis_client: aioredis.Redis,
) -> None:
    script = Script("rotate_token")
    await redis_client.script_flush()
    assert await script(redis_client, ["device:state:none", "gateway:control"], ["none", "h"]) == 0
