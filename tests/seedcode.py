"""Loads the seed document's Python classes at run time, straight from the document.

The contract promises that programs written against the seed's classes keep working beside the
gateway, so tests run those very classes. The project never holds a copy of the seed's code:
only this loader, which reads the shared document wherever it lives.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from servers import skip_or_fail

SEED_NAME = "000_e53ab93c4a8e6ba3.txt"
DEFAULT_SEED_PATH = Path(__file__).resolve().parents[2] / "shared" / "seed" / SEED_NAME
MODULE_NAME = "seed_document"
# A fence opening with exactly ```python at the start of a line, up to the next closing fence.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def seed_path() -> Path:
    override = os.environ.get("GATEWAY_SEED_DOC")
    return Path(override) if override else DEFAULT_SEED_PATH


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def load_seed() -> types.SimpleNamespace:
    """Exec every ```python block, in order, in one namespace, and return that namespace.

    The blocks run as a registered module so dataclasses and enums resolve their module as they
    would when imported normally.
    """
    path = seed_path()
    if not path.is_file():
        skip_or_fail(
            f'"How to Implement Device State Management with Redis" not found at {path}: '
            "its classes are what the compatibility tests run (set GATEWAY_SEED_DOC to its path)"
        )
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        raise AssertionError(f"seed document {path} holds no ```python blocks")
    module = types.ModuleType(MODULE_NAME, f"Python blocks of {path}")
    module.__file__ = str(path)
    sys.modules[MODULE_NAME] = module
    for index, block in enumerate(blocks):
        exec(compile(block, f"{path}#python-block-{index}", "exec"), module.__dict__)
    public = {name: value for name, value in vars(module).items() if not name.startswith("__")}
    return types.SimpleNamespace(**public)


# --- the document's Node.js classes ------------------------------------------------------
HARNESS = Path(__file__).with_name("seed_node_harness.js")
IOREDIS = "ioredis@5"
PRESENCE_CHANNEL = "devices:presence"
MARK = "test_mark"  # the type of the events `settle` publishes; never collected


def install_ioredis(directory: Path) -> Path:
    """`npm install ioredis` into *directory*; its node_modules, for NODE_PATH."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        skip_or_fail(
            "node and npm not found (apt-get install nodejs npm): the Node.js tests need them"
        )
    command = [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(directory)]
    command.append(IOREDIS)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        skip_or_fail(f"npm install {IOREDIS} failed: {result.stderr.strip()[-300:]}")
    return directory / "node_modules"


class NodeSeed:
    """The document's Node.js classes in a node process, driven line by line (JSON).

    `await seed.call("manager", "registerDevice", "id", "type", {})` calls
    `DeviceStateManager.registerDevice`; "detector" is the `OfflineDetector`. Presence events
    from `subscribeToPresence` (see `subscribe`) collect in `events`; the classes' own logging
    goes to stderr.
    """

    def __init__(self, node_modules: Path, redis_url: str) -> None:
        self.node_modules = node_modules
        self.redis_url = redis_url
        self.events: list[dict[str, Any]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._marks: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> NodeSeed:
        path = seed_path()
        if not path.is_file():
            load_seed()  # skips or fails with the reason
        self._process = await asyncio.create_subprocess_exec(
            "node", str(HARNESS), str(path), self.redis_url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_PATH": str(self.node_modules)},
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        if self._reader is not None:
            self._reader.cancel()

    async def call(self, target: str, method: str, *args: Any) -> Any:
        return await self._send({"target": target, "method": method, "args": list(args)})

    async def set(self, target: str, name: str, value: Any) -> None:
        """Set a property of a class instance (`heartbeatTimeout`, say)."""
        await self._send({"target": target, "set": name, "value": value})

    async def _send(self, request: dict[str, Any]) -> Any:
        assert self._process is not None and self._process.stdin is not None
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        line = {"id": call_id, **request}
        self._process.stdin.write(json.dumps(line).encode() + b"\n")
        await self._process.stdin.drain()
        async with asyncio.timeout(10):
            return await future

    async def subscribe(self, client: aioredis.Redis) -> None:
        """`subscribeToPresence`, returning once its subscription delivers (the class
        subscribes without waiting, so an event published at once could be missed)."""
        await self.call("manager", "subscribeToPresence")
        async with asyncio.timeout(10):
            while True:
                try:
                    return await asyncio.wait_for(self.settle(client), 0.2)
                except TimeoutError:
                    continue

    async def wait_events(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """The presence events received, once there are at least *count* of them."""
        deadline = asyncio.get_running_loop().time() + within
        while len(self.events) < count:
            assert asyncio.get_running_loop().time() < deadline, f"events so far: {self.events}"
            await asyncio.sleep(0.02)
        return self.events

    async def settle(self, client: aioredis.Redis) -> None:
        """Publish a mark on the presence channel and wait until the subscriber has it: every
        event published before it has then arrived (one subscription delivers in order)."""
        nonce = os.urandom(8).hex()
        arrived = self._marks[nonce] = asyncio.Event()
        await client.publish(PRESENCE_CHANNEL, json.dumps({"type": MARK, "nonce": nonce}))
        async with asyncio.timeout(10):
            await arrived.wait()

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for raw in self._process.stdout:
            message = json.loads(raw)
            if "event" in message:
                event = message["event"]
                if event.get("type") == MARK:
                    self._marks.pop(event["nonce"], asyncio.Event()).set()
                else:
                    self.events.append(event)
                continue
            future = self._pending.pop(message["id"], None)
            if future is None or future.done():
                continue
            if "error" in message:
                future.set_exception(RuntimeError(f"Node.js class raised: {message['error']}"))
            else:
                future.set_result(message["result"])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the node process ended"))
