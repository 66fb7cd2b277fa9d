"""A webhook receiver for tests: a real uvicorn server on a free port, in the test's loop,
that records every request and answers as planned (a status, or hang: no answer at all).

`plan` is consumed one request at a time; with it empty, `default` answers (200 unless set).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn

from gateway.embedded import find_free_port

HANG = "hang"
Answer = int | str


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    answer: Answer

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def ok(self) -> bool:
        return isinstance(self.answer, int) and 200 <= self.answer < 300


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plan: collections.deque[Answer] = collections.deque()
        self.default: Answer = 200
        self.url = ""
        self._release = asyncio.Event()  # set to let hanging requests go (at shutdown)

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.requests if r.ok]

    def attempts(self, msg_id: str) -> list[Received]:
        return [r for r in self.requests if r.id == msg_id]

    async def wait_accepted(self, count: int, within: float = 15.0) -> list[Received]:
        async with asyncio.timeout(within):
            while len({r.id for r in self.accepted}) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return self.accepted

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = self.plan.popleft() if self.plan else self.default
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(headers, body, time.monotonic(), answer))
        if answer == HANG:
            await self._release.wait()
            return
        assert isinstance(answer, int)
        await send({"type": "http.response.start", "status": answer, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Receiver]:
        port = find_free_port()
        config = uvicorn.Config(self, host="127.0.0.1", port=port, log_level="error",
                                lifespan="off")  # fmt: skip
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign,attr-defined,unused-ignore]
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}/hook"
        try:
            yield self
        finally:
            self._release.set()
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
