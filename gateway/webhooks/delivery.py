"""The webhook worker: each endpoint delivered to by exactly one process, in log order.

Every process scans the endpoints every `SCAN_INTERVAL` and takes the lease (`SET NX PX`) of
each active one nobody holds; it renews the lease every third of its life and, holding it,
reads the fleet log after the endpoint's cursor and POSTs each wanted event in order. The
head event is retried (exponential backoff with jitter) until it gets a 2xx or the retry
limit passes since it first failed, when the endpoint is marked `failing`; nothing behind it
goes first, so a device's events arrive in order. The cursor moves only after a 2xx, in a
script fenced by the lease token: a process killed mid-delivery leaves the lease to expire,
and the next holder starts from the cursor, sending the event again with the same
`webhook-id` (receivers dedupe on it). Delivery is at least once; in the steady state, once.

A cursor trimmed past in the bounded log is not skipped silently: a `gap` event is delivered
first (`webhook-id` `gap-<cursor>`), then the oldest events still kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
import urllib.parse
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import Settings
from gateway.eventlog import ZERO, EventLog, Position, merged, parse_id
from gateway.eventstream import Item
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.presence import REDIS_ERRORS
from gateway.store import text
from gateway.webhooks import model, signing
from gateway.webhooks.model import Webhook, WebhookNotFound
from gateway.webhooks.store import WebhookStore

log = logging.getLogger("gateway.webhooks")

SCAN_INTERVAL = 1.0
POLL_INTERVAL = 0.05  # an endpoint that has had everything looks again this often
BATCH = 100
GAP_CHECK_EVERY = 5.0  # seconds between checks that the cursor was not trimmed past
RESOLVE_FOR = 30.0  # seconds a target's resolved addresses are trusted
TYPE_CACHE = 10_000
USER_AGENT = "presence-gateway-webhooks/1"
MAX_ANSWER = 64 * 1024  # bytes of a target's answer read (and ignored)


class Progress:
    """Successes not yet written: the cursor after them and their attempts. Written once per
    batch (or before a failure is), so a 2xx costs no Redis round trip of its own; a process
    killed before the write leaves those events to be sent again, with the same ids."""

    __slots__ = ("attempts", "cursor")

    def __init__(self) -> None:
        self.cursor = ""
        self.attempts: list[dict[str, Any]] = []

    def take(self) -> tuple[str, list[dict[str, Any]]]:
        taken = self.cursor, self.attempts
        self.cursor, self.attempts = "", []
        return taken


class Stop(Exception):
    """This process must stop delivering to the endpoint (lease lost, disabled, replayed,
    deleted, failing)."""


class WebhookWorker:
    def __init__(
        self,
        redis: Redis | RedisCluster,
        keys: Keys,
        store: WebhookStore,
        log_: EventLog,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.log = log_
        self.settings = settings
        self.metrics = metrics
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"  # lease token: pid, for operators
        self.lease_ms = int(settings.webhook_lease * 1000)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._resolved: dict[str, tuple[float, str | None]] = {}
        self._types: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.http: httpx.AsyncClient | None = None
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per delivery

    async def run(self) -> None:
        """Scan for endpoints to deliver to until cancelled; then release every lease held."""
        timeout = httpx.Timeout(self.settings.webhook_timeout, connect=5.0)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        self.http = httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)
        try:
            while True:
                try:
                    await self._scan()
                except REDIS_ERRORS as exc:
                    log.warning("webhook scan failed (%s); retrying", exc)
                await asyncio.sleep(SCAN_INTERVAL)
        finally:
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.http.aclose()

    async def _scan(self) -> None:
        for webhook in await self.store.all():
            task = self.tasks.get(webhook.webhook_id)
            if task is not None and not task.done():
                continue
            if not webhook.enabled or webhook.status != "active":
                continue
            if await self.store.acquire(webhook.webhook_id, self.token, self.lease_ms):
                self.tasks[webhook.webhook_id] = asyncio.create_task(
                    self._hold(webhook.webhook_id), name=f"webhook-{webhook.webhook_id}"
                )

    async def _hold(self, webhook_id: str) -> None:
        """Deliver while the lease is ours; release it when done (a crash lets it expire)."""
        delivering = asyncio.create_task(self._deliver(webhook_id))
        try:
            while not delivering.done():
                await asyncio.wait({delivering}, timeout=self.settings.webhook_lease / 3)
                if delivering.done():
                    break
                if not await self.store.renew(webhook_id, self.token, self.lease_ms):
                    log.info("webhook %s: lease lost; another process delivers", webhook_id)
                    delivering.cancel()
        except REDIS_ERRORS as exc:
            log.warning("webhook %s: lease renewal failed (%s); stopping", webhook_id, exc)
            delivering.cancel()
        finally:
            if not delivering.done():
                delivering.cancel()
            with contextlib.suppress(BaseException):
                await delivering
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.shield(self.store.release(webhook_id, self.token))

    async def _deliver(self, webhook_id: str) -> None:
        try:
            await self._deliver_until_stopped(webhook_id)
        except (Stop, WebhookNotFound):
            return
        except REDIS_ERRORS as exc:
            log.warning("webhook %s: Redis failed (%s); the next scan resumes", webhook_id, exc)
        except Exception:  # a bug must not end delivery for good: the next scan resumes
            log.exception("webhook %s: delivery failed; the next scan resumes", webhook_id)

    async def _deliver_until_stopped(self, webhook_id: str) -> None:
        checked = 0.0
        gap_sent: str | None = None
        while True:
            webhook = await self._current(webhook_id, None)
            position = self.log.decode(webhook.cursor)
            if time.monotonic() - checked > GAP_CHECK_EVERY:
                checked = time.monotonic()
                first_kept = None if gap_sent == webhook.cursor else await self._trimmed(position)
                if first_kept is not None:
                    await self._send_gap(webhook, first_kept)
                    gap_sent = webhook.cursor
            reads = await self.log.read(position, BATCH)
            rows = merged(reads, BATCH * max(1, len(reads)))
            if not rows:
                await asyncio.sleep(POLL_INTERVAL)
                continue
            items = [
                Item(p, text(entry_id), self.log.event_id(p, entry_id), body.get(b"event", b"{}"))
                for p, entry_id, body in rows
            ]
            types = await self._device_types(items) if webhook.device_type else {}
            progress = Progress()
            for item in items:
                position = position.advanced(item.partition, item.sid)
                if webhook.wants(item.group, types.get(item.device_id)):
                    webhook = await self._send(webhook, item.event_id, item.data, progress)
                progress.cursor = position.encode()  # past filtered-out events too
            await self._flush(webhook, progress)

    async def _current(self, webhook_id: str, held: Webhook | None) -> Webhook:
        """The endpoint as stored now; Stop when this process must no longer deliver to it."""
        webhook = await self.store.get(webhook_id)
        if not webhook.enabled or webhook.status != "active":
            raise Stop
        if held is not None and webhook.generation != held.generation:
            raise Stop
        return webhook

    async def _write(self, webhook: Webhook, **fields: Any) -> None:
        if await self.store.record(webhook, self.token, **fields) != 1:
            raise Stop

    async def _flush(
        self,
        webhook: Webhook,
        progress: Progress,
        failed: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Write the successes so far (and a failed attempt after them), fenced."""
        cursor, attempts = progress.take()
        if failed is not None:
            attempts.append(failed)
        if cursor or attempts or fields:
            await self._write(webhook, cursor=cursor, attempts=attempts, **fields)

    async def _trimmed(self, position: Position) -> list[str] | None:
        """The oldest event kept in each partition that lost events after *position* to
        trimming, or None when none did. As `GET /api/presence/events`' `gap`, but a cursor
        at the very start of the log counts too (XINFO's entries-added says whether any entry
        ever left)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in self.keys.parts:
                pipe.xinfo_stream(part.events)
            replies = await pipe.execute(raise_on_error=False)
        first_kept: list[str] = []
        lost = False
        for partition, info in enumerate(replies):
            if isinstance(info, Exception) or not isinstance(info, dict):
                continue  # no stream: nothing was ever written there
            mine = position[partition]
            first = info.get("first-entry")
            if not first:  # emptied: lost whatever was written after *position*
                newest = parse_id(text(info.get("last-generated-id") or b"0-0"))
                lost = lost or mine < newest
                continue
            removed = int(info.get("entries-added") or 0) > int(info.get("length") or 0)
            if mine < parse_id(text(first[0])) and (mine != ZERO or removed):
                lost = True
                first_kept.append(self.log.event_id(partition, first[0]))
        return first_kept if lost else None

    async def _send_gap(self, webhook: Webhook, first_kept: list[str]) -> None:
        log.warning("webhook %s: events after its cursor were trimmed; sending a gap event",
                    webhook.webhook_id)  # fmt: skip
        self.metrics.webhook_gaps.inc()
        body = model.gap_body(webhook.cursor, first_kept, time.time())
        progress = Progress()
        await self._send(webhook, f"gap-{webhook.cursor}", body, progress, gap=True)
        await self._flush(webhook, progress)

    async def _send(
        self, webhook: Webhook, msg_id: str, body: bytes, progress: Progress, gap: bool = False
    ) -> Webhook:
        """POST one event until a 2xx, recorded in *progress* (the caller then moves its
        cursor past it). Returns the endpoint as it stands; Stop when delivery must end."""
        attempt = 0
        while True:
            attempt += 1
            code, latency, error = await self._post(webhook, msg_id, body)
            now = time.time()
            record: dict[str, Any] = {
                "webhook_id": msg_id, "attempt": attempt, "status_code": code,
                "latency_ms": round(latency * 1000, 1), "error": error, "at": now,
            }  # fmt: skip
            if code is not None and 200 <= code < 300:
                record["result"] = "gap" if gap else "succeeded"
                progress.attempts.append(record)
                if webhook.failing_since is not None:  # the head event went through at last
                    await self._flush(webhook, progress, failing_since=None, last_error=None)
                self.metrics.webhook_deliveries.labels("succeeded").inc()
                self.metrics.webhook_seconds.observe(latency)
                return webhook.changed(failing_since=None, last_error=None)
            record["result"] = "failed"
            self.metrics.webhook_deliveries.labels("failed").inc()
            since = webhook.failing_since or now
            reason = error or f"HTTP {code}"
            if now - since >= self.settings.webhook_retry_limit:
                record["result"] = "gave_up"
                await self._flush(webhook, progress, record, last_error=reason, status="failing")
                self.metrics.webhook_failing.inc()
                log.warning(
                    "webhook_failing: %s failed for %.0f s (%s); marked failing, re-enable it "
                    "to resume", webhook.webhook_id, now - since, reason,
                )  # fmt: skip
                raise Stop
            await self._flush(webhook, progress, record, failing_since=since, last_error=reason)
            delay = model.backoff(
                attempt, self.settings.webhook_retry_base, self.settings.webhook_retry_max_delay
            )
            await asyncio.sleep(
                min(delay, max(0.0, since + self.settings.webhook_retry_limit - now))
            )
            webhook = await self._current(webhook.webhook_id, webhook)

    async def _post(
        self, webhook: Webhook, msg_id: str, body: bytes
    ) -> tuple[int | None, float, str | None]:
        """(status code or None, seconds, error) of one attempt; never raises for the target's
        faults."""
        assert self.http is not None
        started = time.perf_counter()
        refused = await self._refused(webhook.url)
        if refused is not None:
            return None, 0.0, refused
        now = time.time()
        headers = signing.headers(webhook.signing_secrets(now), msg_id, int(now), body)
        headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
        try:
            async with self.http.stream("POST", webhook.url, content=body, headers=headers) as r:
                # a short answer is read to its end, so the connection is kept for the next
                # POST; a long one is not read further (the connection is closed instead)
                size = 0
                async for chunk in r.aiter_raw():
                    size += len(chunk)
                    if size > MAX_ANSWER:
                        break
                return r.status_code, time.perf_counter() - started, None
        except httpx.TimeoutException:
            elapsed = time.perf_counter() - started
            return None, elapsed, f"no answer in {self.settings.webhook_timeout:g} s"
        except (httpx.HTTPError, OSError) as exc:
            return None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:300]

    async def _refused(self, url: str) -> str | None:
        """Why the target may not be sent to now (re-resolved every RESOLVE_FOR seconds, so a
        name that moved to a private address is caught), or None."""
        if self.settings.webhook_allow_private:
            return None
        host = urllib.parse.urlsplit(url).hostname or ""
        cached = self._resolved.get(host)
        if cached is not None and time.monotonic() - cached[0] < RESOLVE_FOR:
            return cached[1]
        try:
            reason = await refused_target(host)
        except OSError as exc:
            return f"cannot resolve {host}: {exc}"
        self._resolved[host] = (time.monotonic(), reason)
        return reason

    async def _device_types(self, items: list[Item]) -> dict[str, str]:
        missing = sorted({i.device_id for i in items if i.device_id not in self._types})
        if missing:
            field = self.keys.fields.device_type
            async with self.redis.pipeline(transaction=False) as pipe:
                for device_id in missing:
                    pipe.hget(self.keys.state(device_id), field)
                replies = await pipe.execute()
            for device_id, raw in zip(missing, replies, strict=True):
                if raw is not None:
                    self._types[device_id] = text(raw)
            while len(self._types) > TYPE_CACHE:
                self._types.popitem(last=False)
        return {i.device_id: self._types[i.device_id] for i in items if i.device_id in self._types}


async def refused_target(host: str) -> str | None:
    """Resolve *host*; why it may not be a target (a loopback, private, link-local ...
    address among its addresses), or None. OSError when it does not resolve."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    for info in infos:
        reason = model.refused_address(str(info[4][0]))
        if reason is not None:
            return f"{host} resolves to {reason}"
    return None
