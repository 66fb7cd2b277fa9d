"""The Lua scripts: loaded from `lua/` once, run by SHA, reloaded when Redis forgot them.

Every script gets `_lib.lua` in front of it, so helpers are written once. A server restart or
`SCRIPT FLUSH` empties the script cache; the first `NOSCRIPT` reply reloads and retries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

KeyOrArg = str | bytes | int | float


def _source(name: str) -> str:
    return (resources.files("gateway") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class Script:
    """One Lua script, identified by the SHA-1 of its full source."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _source("_lib") + "\n" + _source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[KeyOrArg]) -> Any:
        """Run the script. Cancelling is safe: redis-py drops a connection cut mid-reply."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class Scripts:
    """The gateway's scripts, one attribute each."""

    def __init__(self) -> None:
        self.register = Script("register")
        self.deregister = Script("deregister")
        self.connect = Script("connect")
        self.heartbeat_batch = Script("heartbeat_batch")
        self.disconnect = Script("disconnect")
        self.expire = Script("expire")
        self.section_write = Script("section_write")
        self.rotate_token = Script("rotate_token")
        self.page = Script("page")
        self.adopt = Script("adopt")
        self.describe = Script("describe")
        self.stats = Script("stats")

    def all(self) -> list[Script]:
        return [value for value in vars(self).values() if isinstance(value, Script)]

    async def load(self, client: Redis) -> None:
        """Load every script up front, so a syntax error stops start-up, not the first call."""
        for script in self.all():
            await client.script_load(script.source)


SCRIPTS = Scripts()
