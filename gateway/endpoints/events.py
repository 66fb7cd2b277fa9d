"""`GET /api/events/stream`: the fleet event log as Server-Sent Events.

Thin: the query and `Last-Event-ID` are checked before the response starts (a bad one is a
problem, not a broken stream); the stream itself is `gateway.eventstream`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from gateway import contract
from gateway.contract import Reply
from gateway.endpoints.api import endpoint, given
from gateway.eventlog import Position
from gateway.eventstream import EventStream, Filter, Reader, control
from gateway.problems import Problem
from gateway.runtime import Gateway, NotReady

log = logging.getLogger("gateway.events")
RETRY_MS = 1000  # what browsers wait before reconnecting
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer


def _stream(request: Request) -> tuple[Gateway, EventStream]:
    gateway: Gateway = request.app.state.gateway
    if gateway.event_stream is None:
        raise NotReady("the gateway has not reached Redis yet")
    return gateway, gateway.event_stream


@endpoint(
    Reply(200, str, "The event stream", media_type="text/event-stream"),
    problems=("invalid-cursor", "too-many-streams"),
    tag="events",
)
async def event_stream(request: Request, query: contract.EventStreamQuery) -> Response:
    """Fleet events as Server-Sent Events, from a position on.

    Each event's `id:` is the position after it, `event:` its type (presence, state, registry,
    command) and `data:` its JSON as the REST pages show it. Reconnecting with `Last-Event-ID`
    (or `?after=`) resumes exactly after that event; if events after it were trimmed from the
    bounded log, the first event is `event: gap`. A reader that falls behind by more than the
    send queue gets `event: overflow` and the stream ends: reconnect to resume from the last id.
    Keep-alive comments come every `GATEWAY_EVENTS_STREAM_KEEPALIVE` seconds.
    """
    gateway, stream = _stream(request)
    header = request.headers.get("last-event-id")
    after_text = header if header else given(query.after)
    if after_text is not None and len(after_text) > contract.MAX_POSITION_LENGTH:
        raise Problem("invalid-cursor", "Last-Event-ID is longer than any position")
    after = stream.log.decode(after_text) if after_text is not None else await stream.log.position()
    if stream.count >= stream.max_readers:
        raise Problem(
            "too-many-streams",
            f"this gateway serves {stream.max_readers} event streams at most; try another "
            "instance or later",
        )
    types = given(query.types)
    reader = Reader(
        Filter(
            frozenset(types.split(",")) if types else None,
            given(query.device_type),
            given(query.device_prefix),
        ),
        after,
        gateway.settings.events_stream_queue,
    )
    gap = await stream.gap(after)
    return StreamingResponse(
        _frames(stream, reader, after, gap, gateway.settings.events_stream_keepalive),
        media_type="text/event-stream",
        headers=HEADERS,
    )


async def _frames(
    stream: EventStream,
    reader: Reader,
    after: Position,
    gap: dict[str, object] | None,
    keepalive: float,
) -> AsyncIterator[bytes]:
    """The stream's bytes: each wake sends everything queued as one write."""
    yield b"retry: %d\n: events after %s\n\n" % (RETRY_MS, after.encode().encode())
    if gap is not None:
        yield control("gap", gap)
    joining = asyncio.create_task(stream.join(reader), name="event-stream-join")
    try:
        while True:
            try:
                async with asyncio.timeout(keepalive):
                    await reader.ready.wait()
            except TimeoutError:
                yield _keepalive(stream, reader)
                continue
            chunk = reader.take()
            if chunk:
                yield chunk
            if reader.overflowed:
                yield control(
                    "overflow",
                    {
                        "resume_after": reader.last_id or after.encode(),
                        "detail": "this reader fell too far behind; reconnect with "
                        "Last-Event-ID to resume",
                    },
                )
                return
            if reader.closed:  # the gateway is shutting down
                return
            if joining.done() and joining.exception() is not None:
                log.warning("event stream ended: %s", joining.exception())
                return
    finally:
        joining.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await joining
        stream.leave(reader)


def _keepalive(stream: EventStream, reader: Reader) -> bytes:
    """A comment; for a live reader with nothing queued also the feed's position as a bare
    `id:` (no data: no event), so a filtered stream's reconnect skips what it filtered out."""
    if reader in stream.readers and not reader.queue:
        reader.last_id = stream.feed_id()
        return b": keep-alive\nid: %s\n\n" % reader.last_id.encode()
    return b": keep-alive\n\n"


routes: list[BaseRoute] = [Route("/api/events/stream", event_stream, methods=["GET"])]
