"""Webhooks against real gateway processes and a real receiver (tests/webhookreceiver.py)
that fails, hangs and answers 500 on purpose: signatures checked by an independent HMAC,
retries with backoff and the same `webhook-id`, per-device order under retries, two
processes delivering each event once, kill -9 of the delivering one, the failing state and
its resume, a gap after the log was trimmed, and the API's refusals.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from backends import Client, connect
from conftest import ADMIN_KEY, READ_KEY, GatewayFactory, GatewayProcess
from live import live_gateway
from webhookreceiver import HANG, Receiver

from gateway import keys as names
from gateway.keys import Keys
from gateway.redisconn import is_cluster_url
from gateway.webhooks import WebhookVerificationError, verify
from gateway.webhooks.signing import headers as signed_headers
from gateway.webhooks.signing import new_secret

FAST = {
    "webhook_allow_private": "true",
    "webhook_retry_base": "0.1",
    "webhook_timeout": "0.5",
    "webhook_lease": "1.5",
}
WAIT = 15.0


def admin(gw: GatewayProcess) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=WAIT)


async def create(gw: GatewayProcess, url: str, **body: Any) -> dict[str, Any]:
    async with admin(gw) as http:
        response = await http.post("/api/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


async def register(gw: GatewayProcess, *device_ids: str) -> None:
    async with admin(gw) as http:
        for device_id in device_ids:
            body = {"device_id": device_id, "device_type": "thermo"}
            response = await http.post("/api/devices", json=body)
            assert response.status_code == 201, response.text


async def desire(gw: GatewayProcess, device_id: str, state: dict[str, Any]) -> None:
    async with admin(gw) as http:
        response = await http.patch(f"/api/devices/{device_id}/desired", json={"state": state})
        assert response.status_code == 200, response.text


def independent_check(secret: str, request: Any) -> None:
    """Standard Webhooks verification written out with hmac and base64 only."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{request.id}.{request.headers['webhook-timestamp']}.".encode() + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.partition(",")[2] for s in request.headers["webhook-signature"].split()]
    assert expected in given
    assert abs(time.time() - int(request.headers["webhook-timestamp"])) < 60


@pytest.fixture(params=["single", "cluster"])
def any_url(request: pytest.FixtureRequest, valkey_engine: Any) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    with valkey_engine.sync_client() as client:
        client.flushall()
    return str(valkey_engine.url)


@pytest.fixture
def valkey_url(valkey_engine: Any) -> str:
    with valkey_engine.sync_client() as client:
        client.flushall()
    return str(valkey_engine.url)


@pytest.fixture
async def redis(valkey_url: str) -> AsyncIterator[Client]:
    client = await connect(valkey_url)
    yield client
    await client.aclose()


async def test_signed_retried_with_backoff_and_in_order_per_device(
    any_url: str, gateway_factory: GatewayFactory
) -> None:
    gw = gateway_factory(any_url, **FAST)
    async with Receiver().running() as receiver:
        made = await create(gw, receiver.url, types=["registry", "state"])
        secret = made["secret"]
        assert secret.startswith("whsec_") and made["status"] == "active"
        # the first event: 500, no answer (timeout), 500, then accepted
        receiver.plan.extend([500, HANG, 500])
        await register(gw, "o-1", "o-2", "o-3")
        for version in (1, 2):
            for device_id in ("o-1", "o-2", "o-3"):
                await desire(gw, device_id, {"v": version})
        accepted = await receiver.wait_accepted(9)
    for request in receiver.requests:
        independent_check(secret, request)
        verify(secret, request.headers, request.body)
        assert request.headers["content-type"] == "application/json"
    head = receiver.requests[0]
    attempts = receiver.attempts(head.id)
    assert [a.answer for a in attempts] == [500, HANG, 500, 200], "retried with the same id"
    assert head.json["id"] == head.id and head.json["type"] == "registered"
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.5 + 0.1, gaps  # backoff; the hang took the timeout
    assert len({r.id for r in accepted}) == len(accepted) == 9, "an event delivered twice"
    for device_id in ("o-1", "o-2", "o-3"):
        mine = [r.json for r in accepted if r.json["device_id"] == device_id]
        assert [e["type"] for e in mine] == ["registered", "state", "state"]
        assert [e["state"] for e in mine[1:]] == [{"v": 1}, {"v": 2}]
    async with admin(gw) as http:
        page = (await http.get(f"/api/webhooks/{made['webhook_id']}/deliveries")).json()
        shown = (await http.get(f"/api/webhooks/{made['webhook_id']}")).json()
        metrics = (await http.get("/metrics")).text
    results = [(d["result"], d["status_code"]) for d in reversed(page["items"])]
    assert results[:4] == [("failed", 500), ("failed", None), ("failed", 500), ("succeeded", 200)]
    assert "no answer" in page["items"][-2]["error"]
    assert "secret" not in shown and shown["failing_since"] is None
    assert 'gateway_webhook_deliveries_total{result="failed"} 3.0' in metrics


async def test_two_processes_deliver_each_event_once_and_kill_9_loses_nothing(
    valkey_url: str, redis: Client, gateway_factory: GatewayFactory
) -> None:
    first = gateway_factory(valkey_url, **FAST)
    second = gateway_factory(valkey_url, **FAST)
    async with Receiver().running() as receiver:
        made = await create(first, receiver.url, types=["registry"])
        await register(first, *(f"a-{i}" for i in range(10)))
        await register(second, *(f"b-{i}" for i in range(10)))
        accepted = await receiver.wait_accepted(20)
        assert len(accepted) == 20, "an event delivered twice by two processes"
        lease = await redis.get(names.webhook_lease(Keys(), made["webhook_id"]))
        assert isinstance(lease, bytes)
        holder_pid = int(lease.decode().split("-")[0])
        holder, survivor = (first, second) if holder_pid == first.pid else (second, first)
        assert holder.pid == holder_pid
        # the next event hangs in the holder's POST; the holder dies mid-delivery
        receiver.plan.append(HANG)
        await register(survivor, "c-0")
        async with asyncio.timeout(WAIT):
            while len(receiver.requests) < 21:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        os.kill(holder.pid, signal.SIGKILL)
        holder.process.wait()
        await register(survivor, *(f"c-{i}" for i in range(1, 5)))
        accepted = await receiver.wait_accepted(25)
    hung = receiver.requests[20]
    assert hung.answer == HANG and hung.json["device_id"] == "c-0"
    assert [r.answer for r in receiver.attempts(hung.id)] == [HANG, 200], "resent, same id"
    delivered = [r.json["device_id"] for r in accepted]
    assert sorted(set(delivered)) == sorted(
        [f"a-{i}" for i in range(10)] + [f"b-{i}" for i in range(10)] + [f"c-{i}" for i in range(5)]
    )
    assert len(delivered) == 25, "an event delivered twice"


async def test_failing_then_resumed_with_a_gap_after_the_log_was_trimmed(
    valkey_url: str, redis: Client, gateway_factory: GatewayFactory
) -> None:
    gw = gateway_factory(valkey_url, webhook_retry_limit="0.5", **FAST)
    async with Receiver().running() as receiver:
        receiver.default = 503
        made = await create(gw, receiver.url)
        hook = f"/api/webhooks/{made['webhook_id']}"
        await register(gw, "f-1", "f-2", "f-3")
        async with admin(gw) as http:
            async with asyncio.timeout(WAIT):
                while (shown := (await http.get(hook)).json())["status"] != "failing":  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert shown["last_error"] == "HTTP 503"
            metrics = (await http.get("/metrics")).text
            assert "gateway_webhook_failing_total 1.0" in metrics
            tried = len(receiver.requests)
            await asyncio.sleep(0.5)
            assert len(receiver.requests) == tried, "a failing endpoint is not retried"
            # the receiver stays down longer than the log keeps: only f-3's event is left
            await redis.xtrim(Keys().part(0).events, maxlen=1, approximate=False)
            receiver.default = 200
            response = await http.patch(hook, json={"enabled": True})
            assert response.status_code == 200 and response.json()["status"] == "active"
            accepted = await receiver.wait_accepted(2)
            page = (await http.get(hook + "/deliveries")).json()["items"]
    gap, event = accepted[:2]
    assert gap.id.startswith("gap-") and gap.json["type"] == "gap"
    assert gap.json["after"] == made["cursor"]
    assert gap.json["first_kept"] == [event.id]
    assert event.json["device_id"] == "f-3"
    assert page[0]["result"] == "succeeded" and page[1]["result"] == "gap"


async def test_the_api_refuses_bad_input_and_private_targets(valkey_url: str) -> None:
    async with live_gateway(valkey_url) as gw, gw.client() as http:
        for body, kind in (
            ({"url": "http://127.0.0.1:9/x"}, "webhook-target-refused"),
            ({"url": "http://10.1.2.3/x"}, "webhook-target-refused"),
            ({"url": "http://[::1]/x"}, "webhook-target-refused"),
            ({"url": "http://169.254.169.254/latest"}, "webhook-target-refused"),
            ({"url": "ftp://example.com/x"}, "webhook-target-refused"),
            ({"url": "http://user:pw@example.com/x"}, "webhook-target-refused"),
            ({"url": "https://example.com/x", "types": ["bogus"]}, "invalid-request"),
            ({"url": "https://example.com/x", "types": []}, "invalid-request"),
            ({"url": "https://example.com/x", "colour": 1}, "invalid-request"),
            ({}, "invalid-request"),
        ):
            response = await http.post("/api/webhooks", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["type"].endswith(kind), (body, response.text)
        assert (await http.get("/api/webhooks")).json() == {"items": []}
        missing = "/api/webhooks/wh_0123456789abcdef"
        assert (await http.get(missing)).status_code == 404
        assert (await http.patch(missing, json={"enabled": True})).status_code == 404
        assert (await http.post(missing + "/replay", params={"after": "0"})).status_code == 404
        async with gw.client(READ_KEY) as reader:
            assert (await reader.get("/api/webhooks")).status_code == 403
    async with live_gateway(valkey_url, webhook_allow_private=True) as gw, gw.client() as http:
        made = (await http.post("/api/webhooks", json={"url": "http://127.0.0.1:9/x"})).json()
        hook = f"/api/webhooks/{made['webhook_id']}"
        rotated = (await http.post(hook + "/rotate-secret")).json()["secret"]
        assert rotated.startswith("whsec_") and rotated != made["secret"]
        assert "secret" not in (await http.get(hook)).json()
        response = await http.post(hook + "/replay", params={"after": "nope"})
        assert response.status_code == 400
        response = await http.patch(hook, json={"enabled": False, "device_type": "lamp"})
        assert response.json()["status"] == "disabled" and response.json()["device_type"] == "lamp"
        assert (await http.delete(hook)).status_code == 204
        assert (await http.get(hook)).status_code == 404


def test_verify_refuses_a_bad_signature_and_an_old_timestamp() -> None:
    secret, body = new_secret(), b'{"id":"1-0"}'
    now = int(time.time())
    good = signed_headers([secret], "1-0", now, body)
    verify(secret, good, body)
    verify(secret, {k.upper(): v for k, v in good.items()}, body)
    for headers, payload in (
        (good, body + b" "),
        (signed_headers([new_secret()], "1-0", now, body), body),
        (signed_headers([secret], "1-0", now - 3600, body), body),
        ({**good, "webhook-id": "2-0"}, body),
        ({k: v for k, v in good.items() if k != "webhook-signature"}, body),
    ):
        with pytest.raises(WebhookVerificationError):
            verify(secret, headers, payload)
    # after a rotation both secrets sign: either one verifies
    both = signed_headers([secret, new_secret()], "1-0", now, body)
    verify(secret, both, body)


def test_cluster_keys_of_one_endpoint_share_a_slot() -> None:
    keys = Keys.cluster()
    tags = {name.split("}")[0] for name in (
        names.webhook(keys, "wh_1"), names.webhook_lease(keys, "wh_1"),
        names.webhook_deliveries(keys, "wh_1"),
    )}  # fmt: skip
    assert tags == {"{wh_1"}
    assert not is_cluster_url("redis://x") and "{" not in names.webhook(Keys(), "wh_1")
