"""Dashboard login sessions (`POST/DELETE /api/session`): the cookie, its flags, what it grants.

Real uvicorn, real Redis engines; the cookie is carried by hand in a `Cookie` header so each
request says exactly which credential it presents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from live import ADMIN_KEY, READ_KEY, LiveGateway, live_gateway

COOKIE = "gateway_session"


@pytest.fixture
async def gw(redis_url: str) -> AsyncIterator[LiveGateway]:
    async with live_gateway(redis_url) as live:
        yield live


def anonymous(gw: LiveGateway) -> httpx.AsyncClient:
    return gw.client(None)


async def login(gw: LiveGateway, key: str) -> str:
    async with anonymous(gw) as http:
        response = await http.post("/api/session", json={"api_key": key})
    assert response.status_code == 204, response.text
    return response.cookies[COOKIE]


def with_cookie(value: str, **extra: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={value}", **extra}


@pytest.mark.parametrize("key", [ADMIN_KEY, READ_KEY])
async def test_login_sets_an_httponly_samesite_strict_cookie(gw: LiveGateway, key: str) -> None:
    async with anonymous(gw) as http:
        response = await http.post("/api/session", json={"api_key": key})
    assert response.status_code == 204
    assert response.content == b""
    header = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert header.startswith(f"{COOKIE}=")
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in header.lower()
    assert "secure" not in attributes  # plain http here; https would add Secure
    value = response.cookies[COOKIE]
    assert value and key not in value  # the key itself never becomes the cookie


@pytest.mark.parametrize(
    "body",
    [{"api_key": "wrong-key"}, {"api_key": ""}],
    ids=["wrong", "empty"],
)
async def test_login_with_a_bad_key_is_a_401_problem(gw: LiveGateway, body: object) -> None:
    async with anonymous(gw) as http:
        response = await http.post("/api/session", json=body)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 401
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize("body", [b"not json", b'["x"]', b'{"key": 1}'])
async def test_login_with_a_malformed_body_is_a_4xx_problem(gw: LiveGateway, body: bytes) -> None:
    async with anonymous(gw) as http:
        response = await http.post(
            "/api/session", content=body, headers={"Content-Type": "application/json"}
        )
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "set-cookie" not in response.headers


async def test_login_refusals_say_what_is_wrong(gw: LiveGateway) -> None:
    """The login body is declared like every other: its refusals name the field and limit."""
    json_type = {"Content-Type": "application/json"}
    async with anonymous(gw) as http:
        unknown = await http.post("/api/session", json={"key": ADMIN_KEY})
        mistyped = await http.post("/api/session", json={"api_key": 5})
        large = await http.post(
            "/api/session", content=b'{"api_key": "' + b"k" * 5000 + b'"}', headers=json_type
        )
        text = await http.post(
            "/api/session", content=b'{"api_key": "k"}', headers={"Content-Type": "text/plain"}
        )
        wrong = await http.post("/api/session", json={"api_key": "wrong-key"})
        # an empty key means "the one in the Authorization header"
        header = await http.post(
            "/api/session", json={"api_key": ""}, headers={"Authorization": f"Bearer {READ_KEY}"}
        )
    assert (unknown.status_code, unknown.json()["parameter"]) == (422, "key")
    assert "expected api_key" in unknown.json()["detail"]
    assert (mistyped.status_code, mistyped.json()["parameter"]) == (422, "api_key")
    assert large.status_code == 413 and "4096" in large.json()["detail"]
    assert text.status_code == 415
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    for refused in (unknown, mistyped, large, text, wrong):
        assert refused.headers["content-type"] == "application/problem+json"
        assert "set-cookie" not in refused.headers
    assert header.status_code == 204 and header.cookies[COOKIE]


async def test_login_from_a_foreign_origin_is_refused(gw: LiveGateway) -> None:
    async with anonymous(gw) as http:
        response = await http.post(
            "/api/session",
            json={"api_key": ADMIN_KEY},
            headers={"Origin": "https://evil.example"},
        )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize("key", [ADMIN_KEY, READ_KEY])
async def test_the_cookie_authenticates_rest_reads(gw: LiveGateway, key: str) -> None:
    await gw.gateway.store.register("cookie-1", "thermo", {})
    value = await login(gw, key)
    async with anonymous(gw) as http:
        assert (await http.get("/api/stats")).status_code == 401  # no credential at all
        stats = await http.get("/api/stats", headers=with_cookie(value))
        device = await http.get("/api/devices/cookie-1", headers=with_cookie(value))
        forged = await http.get("/api/stats", headers=with_cookie("forged-value"))
    assert stats.status_code == 200 and stats.json()["registered"] == 1
    assert device.status_code == 200 and device.json()["device_id"] == "cookie-1"
    assert forged.status_code == 401


async def test_cookie_writes_need_the_same_origin(gw: LiveGateway) -> None:
    await gw.gateway.store.register("cookie-w", "thermo", {})
    value = await login(gw, ADMIN_KEY)
    path = "/api/devices/cookie-w/desired"
    async with anonymous(gw) as http:
        foreign = await http.patch(
            path,
            json={"state": {"led": "red"}},
            headers=with_cookie(value, Origin="https://evil.example"),
        )
        same = await http.patch(
            path, json={"state": {"led": "green"}}, headers=with_cookie(value, Origin=gw.base_url)
        )
        after = await http.get("/api/devices/cookie-w", headers=with_cookie(value))
    assert foreign.status_code == 403, foreign.text
    assert foreign.headers["content-type"].startswith("application/problem+json")
    assert same.status_code == 200, same.text
    assert after.json()["desired_state"] == {"led": "green"}  # the refused write changed nothing


async def test_cookie_writes_from_an_allowed_origin_pass(redis_url: str) -> None:
    async with live_gateway(redis_url, allowed_origins=("https://ops.example",)) as gw:
        await gw.gateway.store.register("cookie-o", "thermo", {})
        value = await login(gw, ADMIN_KEY)
        async with anonymous(gw) as http:
            response = await http.patch(
                "/api/devices/cookie-o/desired",
                json={"state": {"fan": 2}},
                headers=with_cookie(value, Origin="https://ops.example"),
            )
    assert response.status_code == 200, response.text


async def test_a_read_only_cookie_cannot_write(gw: LiveGateway) -> None:
    await gw.gateway.store.register("cookie-r", "thermo", {})
    value = await login(gw, READ_KEY)
    async with anonymous(gw) as http:
        response = await http.patch(
            "/api/devices/cookie-r/desired",
            json={"state": {"led": "red"}},
            headers=with_cookie(value, Origin=gw.base_url),
        )
    assert response.status_code == 403, response.text


async def test_logout_ends_the_session_everywhere(gw: LiveGateway) -> None:
    value = await login(gw, ADMIN_KEY)
    other = await login(gw, ADMIN_KEY)  # a second browser stays signed in
    async with anonymous(gw) as http:
        assert (await http.get("/api/stats", headers=with_cookie(value))).status_code == 200
        response = await http.delete("/api/session", headers=with_cookie(value))
        assert response.status_code == 204
        cleared = response.headers["set-cookie"]
        assert cleared.startswith(f"{COOKIE}=") and "max-age=0" in cleared.lower()
        assert (await http.get("/api/stats", headers=with_cookie(value))).status_code == 401
        assert (await http.get("/api/stats", headers=with_cookie(other))).status_code == 200
        # logging out twice, or with no cookie, is harmless
        assert (await http.delete("/api/session", headers=with_cookie(value))).status_code == 204
        assert (await http.delete("/api/session")).status_code == 204


async def test_the_session_lives_in_redis_hashed(
    gw: LiveGateway, redis_client: aioredis.Redis
) -> None:
    value = await login(gw, ADMIN_KEY)
    stored = [key async for key in redis_client.scan_iter(match="*gateway:login:*")]
    assert len(stored) == 1
    assert value.encode() not in stored[0]  # only the hash of the cookie value is kept
    assert await redis_client.get(stored[0]) == b"admin"
    ttl = await redis_client.ttl(stored[0])
    assert 11 * 3600 < ttl <= 12 * 3600
