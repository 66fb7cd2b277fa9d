"""The previous release's writer (stored layout 1), kept to build the fleets `gateway migrate`
upgrades, and to play a gateway process of that release beside a new one.

`layout1/` holds that release's scripts as they were (long own-field names such as
`version`, `session`, `presence_version`); their KEYS and ARGV are the same as today's, so
the calls are built by today's call builders and only the script run differs. Reads of the
device hash use that release's names (`LAYOUT1_OWN_FIELDS`).

Run as a program, it is a process of that release holding devices:
`python tests/layout1.py URL DEVICE...` connects them, listens on the control channel (as
that release's broker does) and heartbeats them every 0.2 s until killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.auth import hash_device_token
from gateway.config import Settings
from gateway.keys import LAYOUT1_OWN_FIELDS, Keys
from gateway.presence import connect_call
from gateway.redisconn import connect_cluster, is_cluster_url
from gateway.scripts import Call, Script, Scripts, prelude
from gateway.store import Store, now_text

HERE = Path(__file__).resolve().parent / "layout1"
OLD = LAYOUT1_OWN_FIELDS
Client = Redis | RedisCluster


class OldScript(Script):
    """A script of the previous release, from `layout1/`, rendered for a layout."""

    def __init__(self, name: str, keys: Keys) -> None:
        self.name = name
        lib = (HERE / "_lib.lua").read_text()
        self.source = prelude(keys) + lib + "\n" + (HERE / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


class Layout1Writer:
    """Writes devices as the previous release did: register, shadow writes, connect,
    heartbeats, through its own scripts."""

    def __init__(self, client: Client, keys: Keys, settings: Settings | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings or Settings()
        self.store = Store(client, self.settings, keys, Scripts(keys))
        self.scripts = {
            name: OldScript(name, keys)
            for name in ("register", "section_write", "connect", "heartbeat_batch")
        }

    async def _run(self, call: Call, name: str) -> Any:
        return await self.scripts[name](self.client, call.keys, call.args)

    async def register(self, device_id: str, device_type: str, metadata: bytes) -> None:
        call = self.store.register_call(
            device_id, device_type, metadata, hash_device_token(f"token-{device_id}"), time.time()
        )
        assert await self._run(call, "register") == 1

    async def write(self, device_id: str, section: Any, patch: dict[str, Any]) -> None:
        f = self.keys.fields
        field = f.section(section)
        meta = {"desired": OLD.desired_meta, "reported": OLD.reported_meta}.get(section, "-")
        raw, raw_meta, known = await self.client.hmget(
            self.keys.state(device_id), [field, meta, OLD.desired_sha]
        )
        call, _ = self.store.section_call(
            device_id, section, raw, raw_meta, known, patch, time.time()
        )
        reply = await self._run(call, "section_write")
        assert reply[0] in (0, 1), reply

    async def connect(self, device_id: str, session: str) -> None:
        call = connect_call(self.store, device_id, session, "", time.time())
        assert (await self._run(call, "connect"))[0] == 1

    async def heartbeat(self, beats: list[tuple[str, str]]) -> list[int]:
        """One heartbeat_batch call per device (each on its own partition's keys)."""
        codes = []
        s = self.settings
        for device_id, session in beats:
            part, k = self.keys.of(device_id), self.keys
            keys = [part.online, part.index_online, part.online_seen, part.offline_seen,
                    part.online_by_type, part.events, part.presence_channel,
                    k.state(device_id), k.heartbeat(device_id), k.history(device_id)]  # fmt: skip
            args = [now_text(), s.ttl_ms, s.history_maxlen, s.events_maxlen, 1,
                    device_id, session, now_text()]  # fmt: skip
            codes += await self.scripts["heartbeat_batch"](self.client, keys, args)
        return codes


async def write_fleet(writer: Layout1Writer, count: int, online_every: int = 2) -> list[str]:
    """*count* devices as that release leaves them: registered, a reported and a desired
    write (history and fleet log entries, versions), every *online_every*-th connected."""
    ids = [f"old-{index:05d}" for index in range(count)]
    for index, device_id in enumerate(ids):
        await writer.register(device_id, ("sensor", "meter")[index % 2], b'{"site":"a"}')
        await writer.write(device_id, "reported", {"temp": index % 30, "fw": "1.0"})
        await writer.write(device_id, "desired", {"interval": 30 + index % 5})
        if index % online_every == 0:
            await writer.connect(device_id, f"old-session-{index}")
    return ids


async def client_of(url: str) -> Client:
    if is_cluster_url(url):
        cluster = connect_cluster(url)
        await cluster.initialize()
        return cluster
    return Redis.from_url(url)


async def serve(url: str, device_ids: list[str]) -> None:
    """A process of the previous release holding *device_ids*: until killed."""
    client = await client_of(url)
    keys = Keys.cluster() if isinstance(client, RedisCluster) else Keys()
    writer = Layout1Writer(client, keys)
    sessions = [(device_id, f"old-process-{device_id}") for device_id in device_ids]
    for device_id, session in sessions:
        await writer.connect(device_id, session)
    # the control channel, as that release's broker listens to it
    if isinstance(client, RedisCluster):
        parts = {keys.of(device_id).control_channel for device_id in device_ids}
        pubsub: Any = client.pubsub()
        await pubsub.ssubscribe(*parts)
    else:
        pubsub = client.pubsub()
        await pubsub.subscribe(keys.parts[0].control_channel)
    print("serving", flush=True)
    while True:
        codes = await writer.heartbeat(sessions)
        print("beat", *codes, flush=True)
        await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2:]))
