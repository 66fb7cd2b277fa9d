"""The Lua scripts: rendered for a layout, loaded once, run by SHA, reloaded when Redis forgot.

Every script gets a prelude in front of it: the layout's names for the device hash's fields and
its publish command (`PUBLISH` on one node, `SPUBLISH` on a cluster), rendered once when the
scripts are built, then `_lib.lua` (and `_commands.lua` for the scripts that handle
commands), so helpers are written once and the scripts are the same for every layout. A
server restart, a failover to a replica that never saw `SCRIPT LOAD`, or `SCRIPT FLUSH`
empties the script cache: the first `NOSCRIPT` reply reloads and retries.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from gateway.keys import OWN_FIELDS, Keys, OwnFields

KeyOrArg = str | bytes | int | float
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
Client = Redis | RedisCluster
NAMES = (
    "register", "deregister", "connect", "heartbeat_batch", "report_batch", "disconnect", "expire",
    "section_write", "rotate_token", "page", "adopt", "describe", "stats", "migrate_fields",
    "command_create", "command_result", "command_cancel", "command_expire", "command_claim",
    "mqtt_batch", "mqtt_connect", "webhook_advance", "webhook_lease",
)  # fmt: skip
# a script whose source runs in front of another's: mqtt_connect is connect.lua with a check first
COMPOSED = {"mqtt_connect": "connect"}
# the scripts that also take the command helpers (_commands.lua) after _lib.lua
WITH_COMMANDS = frozenset(
    {"connect", "deregister", "command_create", "command_result", "command_cancel",
     "command_expire", "command_claim"}
)  # fmt: skip
WITH_COMMANDS |= {"mqtt_connect"}


def _source(name: str) -> str:
    return (resources.files("gateway") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def prelude(keys: Keys, own: OwnFields = OWN_FIELDS) -> str:
    """The layout's names as Lua constants (every value is a fixed identifier: no escaping);
    *own* names the gateway's own hash fields (the stored layout's)."""
    f = keys.fields
    return "\n".join(
        [
            f"-- rendered for the {keys.schema} layout",
            f"local F_ID, F_TYPE, F_REGISTERED = '{f.device_id}', '{f.device_type}', "
            f"'{f.registered_at}'",
            f"local F_STATUS, F_SEEN, F_METADATA = '{f.status}', '{f.last_seen}', '{f.metadata}'",
            f"local F_REPORTED, F_DESIRED = '{f.reported}', '{f.desired}'",
            f"local MILLIS = {'true' if f.millis else 'false'}",
            f"local PUBLISH = '{'SPUBLISH' if keys.sharded else 'PUBLISH'}'",
            f"local NODE_EVENTS = {'true' if keys.schema == 'node' else 'false'}",
            f"local SEED_SETS = {'true' if keys.seed_sets else 'false'}",
            f"local G_VERSION, G_DESIRED_VERSION, G_REPORTED_VERSION = '{own.version}', "
            f"'{own.desired_version}', '{own.reported_version}'",
            f"local G_PRESENCE_VERSION, G_DESIRED_SHA = '{own.presence_version}', "
            f"'{own.desired_sha}'",
            f"local G_REPORTED_META, G_DESIRED_META = '{own.reported_meta}', '{own.desired_meta}'",
            f"local G_SESSION, G_TOKEN_HASH, G_LINGER = '{own.session}', '{own.token_hash}', "
            f"'{own.linger_reason}'",
            "",
        ]
    )


class Script:
    """One Lua script, identified by the SHA-1 of its full source."""

    def __init__(self, name: str, head: str | None = None) -> None:
        self.name = name
        head = prelude(Keys()) if head is None else head
        libs = ("_lib", "_commands") if name in WITH_COMMANDS else ("_lib",)
        self.source = head + "".join(_source(lib) + "\n" for lib in libs) + _source(name)
        if name in COMPOSED:
            self.source += "\n" + _source(COMPOSED[name])
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: Client, keys: Sequence[str], args: Sequence[KeyOrArg]) -> Any:
        """Run the script. Cancelling is safe: redis-py drops a connection cut mid-reply."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


@dataclass(frozen=True)
class Call:
    """One script call of a batch run together (`Scripts.run_many`)."""

    script: Script
    keys: Sequence[str]
    args: Sequence[KeyOrArg]


class Scripts:
    """The gateway's scripts for one layout, one attribute each."""

    def __init__(self, keys: Keys | None = None) -> None:
        head = prelude(keys or Keys())
        self.register = Script("register", head)
        self.deregister = Script("deregister", head)
        self.connect = Script("connect", head)
        self.heartbeat_batch = Script("heartbeat_batch", head)
        self.report_batch = Script("report_batch", head)
        self.disconnect = Script("disconnect", head)
        self.expire = Script("expire", head)
        self.section_write = Script("section_write", head)
        self.rotate_token = Script("rotate_token", head)
        self.page = Script("page", head)
        self.adopt = Script("adopt", head)
        self.describe = Script("describe", head)
        self.stats = Script("stats", head)
        self.command_create = Script("command_create", head)
        self.command_result = Script("command_result", head)
        self.command_cancel = Script("command_cancel", head)
        self.command_expire = Script("command_expire", head)
        self.command_claim = Script("command_claim", head)
        self.migrate_fields = Script("migrate_fields", head)
        self.mqtt_batch = Script("mqtt_batch", head)
        self.mqtt_connect = Script("mqtt_connect", head)
        self.webhook_advance = Script("webhook_advance", head)
        self.webhook_lease = Script("webhook_lease", head)

    def all(self) -> list[Script]:
        return [value for value in vars(self).values() if isinstance(value, Script)]

    async def load(self, client: Client) -> None:
        """Load every script up front, so a syntax error stops start-up, not the first call.
        On a cluster, `SCRIPT LOAD` goes to every primary."""
        for script in self.all():
            await client.script_load(script.source)

    @staticmethod
    async def run_many(client: Client, calls: Sequence[Call]) -> list[Any]:
        """Several script calls in one pipeline (on a cluster: one per node, sent together);
        results in order. A call that finds its script missing is loaded and run again; any
        other error is raised after the batch."""
        if len(calls) == 1:
            only = calls[0]
            return [await only.script(client, only.keys, only.args)]
        async with client.pipeline(transaction=False) as pipe:
            for call in calls:
                queue(pipe, call)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for index, result in enumerate(results):
            if isinstance(result, NoScriptError):
                call = calls[index]
                results[index] = await call.script(client, call.keys, call.args)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results


async def run_each(client: Client, calls: Sequence[Call], in_flight: int) -> list[Any]:
    """Every call's result, or the exception that call (or its pipeline) met, in order.

    Up to *in_flight* pipelines run at once, so Redis executes one while this process encodes
    the next; each carries an equal share of the calls (on a cluster, split per node by the
    client). A call whose pipeline failed as a whole (a node down) gets that failure.
    """
    if not calls:
        return []
    size = -(-len(calls) // in_flight)
    groups = [list(calls[start : start + size]) for start in range(0, len(calls), size)]

    async def one(group: list[Call]) -> list[Any]:
        try:
            if len(group) == 1:
                call = group[0]
                return [await call.script(client, call.keys, call.args)]
            async with client.pipeline(transaction=False) as pipe:
                for call in group:
                    queue(pipe, call)
                results: list[Any] = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as exc:
            return [exc] * len(group)
        for index, result in enumerate(results):
            if isinstance(result, NoScriptError):
                call = group[index]
                try:
                    results[index] = await call.script(client, call.keys, call.args)
                except REDIS_ERRORS as exc:
                    results[index] = exc
        return results

    outcomes = await asyncio.gather(*(one(group) for group in groups))
    return [result for group in outcomes for result in group]


def queue(pipe: Any, call: Call) -> None:
    """Add *call* to a pipeline (single node or cluster)."""
    # by name: redis-py's cluster pipeline refuses its `evalsha` method, though the command
    # routes by its keys like any other
    pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)


SCRIPTS = Scripts()  # the default layout's, for code that runs only on one node
