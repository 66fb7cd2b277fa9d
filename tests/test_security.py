"""Security properties (SECURITY.md) checked on live gateways over real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import re
from typing import Any

import httpx
import redis.asyncio as aioredis
from live import ADMIN_KEY, READ_KEY, LiveGateway, live_gateway
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway import auth
from gateway.keys import OWN_FIELDS

TIMEOUT = 5.0
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def handshake_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a refused handshake (101 when it was accepted)."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=TIMEOUT):
            return 101
    except InvalidStatus as refused:
        return int(refused.response.status_code)


async def welcomed(gw: LiveGateway, device_id: str, token: str) -> ClientConnection:
    ws = await connect(f"{gw.ws_url}/ws/devices/{device_id}", additional_headers=bearer(token))
    await asyncio.wait_for(ws.recv(), TIMEOUT)
    return ws


async def close_code(ws: ClientConnection) -> int | None:
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


async def everything(client: aioredis.Redis) -> list[bytes]:
    """Every key, field, member and value in the database, as bytes."""
    found: list[bytes] = []
    async for key in client.scan_iter(count=1000):
        found.append(key)
        kind = (await client.type(key)).decode()
        if kind == "string":
            found.append(await client.get(key) or b"")
        elif kind == "hash":
            for field, value in (await client.hgetall(key)).items():
                found += [field, value]
        elif kind == "set":
            found += list(await client.smembers(key))
        elif kind == "zset":
            found += [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            found += list(await client.lrange(key, 0, -1))
        elif kind == "stream":
            for entry_id, body in await client.xrange(key):
                found.append(entry_id)
                for field, value in body.items():
                    found += [field, value]
    return found


# --- device tokens ------------------------------------------------------------------------


async def test_tokens_are_random_43_char_url_safe_and_stored_only_hashed(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with live_gateway(redis_url) as gw:
        tokens = [await gw.register(f"tok-{n}", "t") for n in range(5)]
        async with gw.client() as http:
            rotated = (await http.post("/api/devices/tok-0/token")).json()["token"]
        tokens.append(rotated)
        assert len(set(tokens)) == len(tokens)
        for token in tokens:
            assert TOKEN_SHAPE.fullmatch(token), token
        ws = await welcomed(gw, "tok-1", tokens[1])  # sessions write too: still no token
        stored = await everything(redis_client)
        blob = b"\n".join(stored)
        for token in tokens:
            assert token.encode() not in blob, "a device token is stored in Redis"
        for device_id, token in (("tok-0", rotated), ("tok-1", tokens[1])):
            token_hash = await redis_client.hget(f"device:state:{device_id}", OWN_FIELDS.token_hash)
            # the first 128 bits of its SHA-256, base64url
            digest = hashlib.sha256(token.encode()).digest()[:16]
            assert token_hash == base64.urlsafe_b64encode(digest).rstrip(b"=")
        # the API keys neither
        assert ADMIN_KEY.encode() not in blob and READ_KEY.encode() not in blob
        await ws.close()


def test_token_check_is_constant_time() -> None:
    source = inspect.getsource(auth.token_matches)
    assert "hmac.compare_digest" in source
    for stored in (auth.hash_device_token("x" * 43), auth.hash_token("x" * 43)):  # both forms
        assert auth.token_matches(stored, "x" * 43)
        assert not auth.token_matches(stored, "x" * 42 + "y")
    assert not auth.token_matches(None, "x" * 43)
    assert not auth.token_matches("", "")


async def test_wrong_tokens_of_every_shape_are_refused(redis_url: str) -> None:
    async with live_gateway(redis_url) as gw:
        token = await gw.register("ct-1", "t")
        other = await gw.register("ct-2", "t")
        url = f"{gw.ws_url}/ws/devices/ct-1"
        flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
        cases = {
            "same length, last char": flipped,
            "same length, first char": ("A" if token[0] != "A" else "B") + token[1:],
            "another device's token": other,
            "prefix": token[:-1],
            "extended": token + "A",
            "hash of the token": hashlib.sha256(token.encode()).hexdigest(),
            "stored hash of the token": auth.hash_device_token(token),
            "case swapped": token.swapcase() if token.swapcase() != token else token + "x",
        }
        for what, wrong in cases.items():
            assert await handshake_status(url, bearer(wrong)) == 403, what
            assert await handshake_status(f"{url}?token={wrong}") == 403, what
        assert await handshake_status(url, bearer(token)) == 101


# --- rotation and deletion close live sessions ---------------------------------------------


async def test_rotation_stops_the_old_token_at_once_on_every_process(redis_url: str) -> None:
    async with live_gateway(redis_url) as first, live_gateway(redis_url) as second:
        old = await first.register("rot-1", "t")
        ws = await welcomed(first, "rot-1", old)
        async with second.client() as http:  # rotated through the other process
            new = (await http.post("/api/devices/rot-1/token")).json()["token"]
        assert await close_code(ws) == 1008
        assert ws.close_reason == "token_rotated"
        for gw in (first, second):
            url = f"{gw.ws_url}/ws/devices/rot-1"
            assert await handshake_status(url, bearer(old)) == 403
        fresh = await welcomed(second, "rot-1", new)
        await fresh.close()


async def test_deleting_a_device_closes_its_socket_on_another_process(redis_url: str) -> None:
    async with live_gateway(redis_url) as first, live_gateway(redis_url) as second:
        token = await first.register("del-1", "t")
        ws = await welcomed(first, "del-1", token)
        async with second.client() as http:
            assert (await http.delete("/api/devices/del-1")).status_code == 204
        assert await close_code(ws) == 1008
        assert await handshake_status(f"{first.ws_url}/ws/devices/del-1", bearer(token)) == 404


# --- read-only keys ------------------------------------------------------------------------

WRITES: list[tuple[str, str, Any]] = [
    ("POST", "/api/devices", {"device_id": "ro-new", "device_type": "t"}),
    ("PATCH", "/api/devices/ro-1", {"metadata": {"a": 1}}),
    ("DELETE", "/api/devices/ro-1", None),
    ("PATCH", "/api/devices/ro-1/desired", {"state": {"a": 1}}),
    ("POST", "/api/devices/ro-1/token", None),
    # the role is checked before the body is read: a broken body still gets 403
    ("POST", "/api/devices", "{not json"),
    ("PATCH", "/api/devices/ro-1/desired", "x" * 300_000),
]


async def test_read_only_key_can_never_write(redis_url: str, redis_client: aioredis.Redis) -> None:
    async with live_gateway(redis_url) as gw:
        await gw.register("ro-1", "t")
        before = sorted(await everything(redis_client))
        async with gw.client(READ_KEY) as http:
            assert (await http.get("/api/devices/ro-1")).status_code == 200
            for method, path, body in WRITES:
                if isinstance(body, str):
                    response = await http.request(
                        method, path, content=body, headers={"Content-Type": "application/json"}
                    )
                else:
                    response = await http.request(method, path, json=body)
                assert response.status_code == 403, (method, path, response.text)
                assert response.headers["content-type"].startswith("application/problem+json")
            # a login with the read key gives a read-only cookie, which cannot write either
            login = await http.post("/api/session", json={"api_key": READ_KEY})
            assert login.status_code == 204
        cookie = login.cookies.get("gateway_session")
        assert cookie
        async with httpx.AsyncClient(
            base_url=gw.base_url, cookies={"gateway_session": cookie}
        ) as c:
            assert (await c.get("/api/devices/ro-1")).status_code == 200
            origin = {"Origin": gw.base_url}
            for method, path, body in WRITES[:5]:
                response = await c.request(method, path, json=body, headers=origin)
                assert response.status_code == 403, (method, path, response.text)
        after = sorted(await everything(redis_client))
        # only the login session key was added
        added = [item for item in after if item not in before]
        assert all(b"gateway:login:" in item or item == b"read" for item in added), added


# --- browsers: Origin allow-list -------------------------------------------------------------


async def test_dashboard_origin_allow_list_refuses_cross_site_sockets(redis_url: str) -> None:
    allowed = "https://ops.example.com"
    async with live_gateway(redis_url, allowed_origins=(allowed,)) as gw:
        url = f"{gw.ws_url}/ws/dashboard?token={ADMIN_KEY}"
        for evil in (
            "https://evil.example",
            "null",
            f"http://127.0.0.1:{gw.port}.evil.example",
            "https://ops.example.com.evil.example",
        ):
            assert await handshake_status(url, {"Origin": evil}) == 403, evil
        async with gw.client(None) as http:
            login = await http.post(
                "/api/session", json={"api_key": ADMIN_KEY}, headers={"Origin": allowed}
            )
            assert login.status_code == 204
            cookie = login.cookies["gateway_session"]
            # the operator's cookie, carried by a page on another site: refused
            hijack = {"Origin": "https://evil.example", "Cookie": f"gateway_session={cookie}"}
            assert await handshake_status(f"{gw.ws_url}/ws/dashboard", hijack) == 403
            cross_login = await http.post(
                "/api/session",
                json={"api_key": ADMIN_KEY},
                headers={"Origin": "https://evil.example"},
            )
            assert cross_login.status_code == 403
            # cookie-authenticated writes from another origin are refused too
            write = await http.post(
                "/api/devices",
                json={"device_id": "csrf", "device_type": "t"},
                headers={"Origin": "https://evil.example", "Cookie": f"gateway_session={cookie}"},
            )
            assert write.status_code == 403, write.text
        for good in (allowed, gw.base_url):
            async with connect(url, additional_headers={"Origin": good}) as ws:
                snapshot = await asyncio.wait_for(ws.recv(), TIMEOUT)
                assert '"snapshot"' in str(snapshot)
        async with connect(
            f"{gw.ws_url}/ws/dashboard",
            additional_headers={"Origin": allowed, "Cookie": f"gateway_session={cookie}"},
        ) as ws:
            assert '"snapshot"' in str(await asyncio.wait_for(ws.recv(), TIMEOUT))


# --- nothing secret in the log ---------------------------------------------------------------


async def test_no_token_or_key_is_ever_logged(redis_url: str, gateway_factory: Any) -> None:
    gw = gateway_factory(redis_url, log_level="debug")
    secrets_used = [ADMIN_KEY, READ_KEY]
    async with httpx.AsyncClient(base_url=gw.base_url, headers=bearer(ADMIN_KEY)) as http:
        for n in range(3):
            response = await http.post(
                "/api/devices", json={"device_id": f"lg-{n}", "device_type": "t"}
            )
            secrets_used.append(response.json()["token"])
        # header auth, query auth (firmware that cannot set headers), rotation
        async with connect(
            f"{gw.ws_url}/ws/devices/lg-0", additional_headers=bearer(secrets_used[2])
        ) as ws:
            await ws.recv()
        async with connect(f"{gw.ws_url}/ws/devices/lg-1?token={secrets_used[3]}") as ws:
            await ws.recv()
        assert (
            await handshake_status(f"{gw.ws_url}/ws/devices/lg-2?token=wrong-{secrets_used[4]}")
            == 403
        )
        rotated = (await http.post("/api/devices/lg-0/token")).json()["token"]
        secrets_used.append(rotated)
        async with connect(
            f"{gw.ws_url}/ws/devices/lg-0", additional_headers=bearer(rotated)
        ) as ws:
            await ws.recv()
        # logins and the dashboard (the API key as ?token=, as browsers must)
        login = await http.post("/api/session", json={"api_key": ADMIN_KEY})
        assert login.status_code == 204
        secrets_used.append(login.cookies["gateway_session"])
        async with connect(f"{gw.ws_url}/ws/dashboard?token={ADMIN_KEY}") as ws:
            await ws.recv()
        async with connect(f"{gw.ws_url}/ws/dashboard?token={READ_KEY}") as ws:
            await ws.recv()
        wrong_key = "wrong-key-" + secrets_used[2][:20]
        assert (await http.get("/api/stats", headers=bearer(wrong_key))).status_code == 401
        secrets_used.append(wrong_key)
    await asyncio.sleep(0.5)
    log = gw.log_text()
    assert "DEBUG" in log or "debug" in log.lower()
    leaked = [s for s in secrets_used if s in log]
    lines = [line for line in log.splitlines() if any(s in line for s in secrets_used)]
    assert leaked == [], "secrets in the log:\n" + "\n".join(lines[:10])


async def test_a_query_that_looks_like_a_credential_is_redacted_from_the_access_log(
    redis_url: str, gateway_factory: Any
) -> None:
    """uvicorn's access formatter unpacks the record's arguments: redaction must keep them."""
    gw = gateway_factory(redis_url)
    async with httpx.AsyncClient(base_url=gw.base_url, headers=bearer(ADMIN_KEY)) as http:
        for name in ("cookie", "Set-Cookie", "authorization", "token"):
            response = await http.get("/api/stats", params={name: "secret-in-query"})
            assert response.status_code == 422
    await asyncio.sleep(0.5)
    log = gw.log_text()
    assert "Logging error" not in log and "Traceback" not in log, log[-3000:]
    assert "secret-in-query" not in log
    assert log.count('"GET /api/stats?') == 4, log[-3000:]
