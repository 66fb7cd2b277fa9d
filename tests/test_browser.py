"""The browser dashboard (contract §7) driven in headless Chromium against a real gateway.

Debian's chromium through Playwright's `executable_path` (no browser download). The gateway
runs in the test's loop (`live_gateway`) on a private valkey; devices are real WebSockets.
Each test leaves a screenshot in `test-artifacts/`; with GATEWAY_UPDATE_DOCS_SCREENSHOT=1
one test also refreshes `docs/dashboard.png` for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from live import ADMIN_KEY, READ_KEY, LiveGateway, live_gateway
from playwright.async_api import Browser, Page, async_playwright, expect
from servers import RedisServer
from websockets.asyncio.client import ClientConnection, connect

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT = 5.0
UI_DEADLINE_MS = 1500  # "shows within a second", with margin


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Browser tests run on valkey only: one private server for the module."""
    server = RedisServer("valkey", data_dir=tmp_path_factory.mktemp("browser-valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def valkey_url(valkey: RedisServer) -> str:
    with valkey.sync_client() as client:
        client.flushall()
        client.config_set("notify-keyspace-events", "Ex")
    return valkey.url


@pytest.fixture
async def gw(valkey_url: str) -> AsyncIterator[LiveGateway]:
    async with live_gateway(valkey_url) as live:
        yield live


@pytest.fixture
async def valkey_client(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(valkey_url)
    yield client
    await client.aclose()


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.set_default_timeout(TIMEOUT * 1000)
    try:
        yield opened
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        with contextlib.suppress(Exception):
            await opened.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# --- helpers --------------------------------------------------------------------------


def open_device(gw: LiveGateway, device_id: str, token: str) -> connect:
    return connect(
        f"{gw.ws_url}/ws/devices/{device_id}",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    )


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def receive_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        while (frame := await receive(ws))["type"] != kind:
            pass
    return frame


async def signed_in(page: Page, gw: LiveGateway, key: str = ADMIN_KEY) -> None:
    """Open the dashboard with a key (admin by default) in the URL; wait for the live connection."""
    await page.goto(f"{gw.base_url}/?token={key}")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    assert "token" not in page.url  # the key leaves the address bar at once


def row(page: Page, device_id: str) -> Any:
    return page.locator(f'#device-list .row[data-device-id="{device_id}"]')


async def counters(page: Page) -> tuple[str, str, str]:
    return (
        await page.locator("#count-online").inner_text(),
        await page.locator("#count-offline").inner_text(),
        await page.locator("#count-total").inner_text(),
    )


async def wait_stream_growth(
    client: aioredis.Redis, gw: LiveGateway, after: str, count: int
) -> list[bytes]:
    deadline = time.monotonic() + 3 * TIMEOUT
    while True:
        entries = await client.xrange(gw.gateway.store.keys.events, f"({after}", "+")
        if len(entries) >= count:
            return [entry_id for entry_id, _ in entries]
        assert time.monotonic() < deadline, f"the stream did not grow by {count}"
        await asyncio.sleep(0.02)


async def log_ids(page: Page) -> list[str]:
    ids: list[str] = await page.eval_on_selector_all(
        "#event-log li", "items => items.map(item => item.dataset.eventId)"
    )
    return ids


# --- tests ----------------------------------------------------------------------------


async def test_the_page_loads_with_a_token_and_lists_the_fleet(gw: LiveGateway, page: Page) -> None:
    store = gw.gateway.store
    tokens = {}
    for i in range(5):
        _, tokens[f"page-{i}"] = await store.register(
            f"page-{i}", "thermo" if i % 2 else "lamp", {}
        )
    async with open_device(gw, "page-1", tokens["page-1"]) as one:
        await receive(one)
        async with open_device(gw, "page-3", tokens["page-3"]) as three:
            await receive(three)
            await signed_in(page, gw)
            await expect(page.locator("#device-list .row[data-device-id]")).to_have_count(5)
            await expect(row(page, "page-1")).to_have_attribute("data-status", "online")
            await expect(row(page, "page-0")).to_have_attribute("data-status", "offline")
            await expect(row(page, "page-0")).to_have_attribute("data-device-type", "lamp")
            await expect(page.locator("#count-online")).to_have_text("2")
            await expect(page.locator("#count-offline")).to_have_text("3")
            await expect(page.locator("#count-total")).to_have_text("5")
            await expect(page.locator("#list-count")).to_have_text("5 devices")
            await expect(page.locator("#login-overlay")).to_be_hidden()

            # the filters narrow the list
            await page.select_option("#filter-status", "online")
            await expect(page.locator("#device-list .row[data-device-id]")).to_have_count(2)
            await page.select_option("#filter-status", "")
            await page.fill("#filter-text", "page-4")
            await expect(page.locator("#device-list .row[data-device-id]")).to_have_count(1)


async def test_presence_changes_show_within_a_second(gw: LiveGateway, page: Page) -> None:
    store = gw.gateway.store
    _, token = await store.register("live-1", "thermo", {})
    await store.register("live-2", "thermo", {})
    await signed_in(page, gw)
    await expect(row(page, "live-1")).to_have_attribute("data-status", "offline")

    async with open_device(gw, "live-1", token) as device:
        await receive(device)
        await expect(row(page, "live-1")).to_have_attribute(
            "data-status", "online", timeout=UI_DEADLINE_MS
        )
        await expect(page.locator("#count-online")).to_have_text("1", timeout=UI_DEADLINE_MS)
        await expect(page.locator("#count-offline")).to_have_text("1")
        entry = page.locator('#event-log li[data-device-id="live-1"][data-status="online"]')
        await expect(entry).to_have_count(1, timeout=UI_DEADLINE_MS)
        await expect(entry).to_contain_text("connected")

    await expect(row(page, "live-1")).to_have_attribute(
        "data-status", "offline", timeout=UI_DEADLINE_MS
    )
    await expect(page.locator("#count-online")).to_have_text("0", timeout=UI_DEADLINE_MS)
    await expect(page.locator("#count-offline")).to_have_text("2")
    gone = page.locator('#event-log li[data-device-id="live-1"][data-status="offline"]')
    await expect(gone).to_have_count(1, timeout=UI_DEADLINE_MS)
    # newest first
    assert await page.locator("#event-log li").first.get_attribute("data-status") == "offline"


async def open_panel(page: Page, device_id: str) -> None:
    await row(page, device_id).click()
    panel = page.locator("#device-panel")
    await expect(panel).to_be_visible()
    await expect(panel).to_have_attribute("data-device-id", device_id)
    await expect(panel).to_have_attribute("data-loaded", "true")


async def test_a_desired_edit_in_the_panel_reaches_the_device(gw: LiveGateway, page: Page) -> None:
    store = gw.gateway.store
    _, token = await store.register("edit-1", "lamp", {})
    await store.patch_section("edit-1", "reported", {"led": {"color": "blue"}})
    async with open_device(gw, "edit-1", token) as device:
        await receive(device)
        await signed_in(page, gw)
        await open_panel(page, "edit-1")
        await expect(page.locator("#panel-reported")).to_contain_text('"color"')
        await expect(page.locator("#panel-delta")).to_have_attribute("data-in-sync", "true")

        await page.fill("#desired-editor", '{"led": {"color": "red"}}')
        await page.click("#desired-apply")
        update = await receive_type(device, "state_update")
        assert update["desired_state"] == {"led": {"color": "red"}}

        await expect(page.locator("#desired-result")).to_have_attribute("data-status", "ok")
        await expect(page.locator("#desired-result")).to_have_attribute("data-conflict", "false")
        await expect(page.locator("#panel-desired")).to_contain_text('"red"')
        delta = page.locator("#panel-delta")
        await expect(delta).to_have_attribute("data-in-sync", "false")
        await expect(delta.locator('tr.delta-leaf[data-path="led.color"]')).to_have_count(1)


async def test_invalid_json_in_the_editor_is_not_sent(gw: LiveGateway, page: Page) -> None:
    await gw.gateway.store.register("edit-bad", "lamp", {})
    await signed_in(page, gw)
    await open_panel(page, "edit-bad")
    version = await page.locator("#device-panel").get_attribute("data-version")
    await page.fill("#desired-editor", '{"led": ')
    await page.click("#desired-apply")
    await expect(page.locator("#desired-result")).to_have_attribute("data-status", "invalid")
    async with gw.client() as http:
        document = (await http.get("/api/devices/edit-bad")).json()
    assert str(document["version"]) == version
    assert document["desired_state"] == {}


async def test_a_conflict_is_shown_when_the_shadow_moved(gw: LiveGateway, page: Page) -> None:
    store = gw.gateway.store
    await store.register("clash-1", "lamp", {})
    await signed_in(page, gw)
    await open_panel(page, "clash-1")
    # someone else changes the shadow after the editor was based on it
    async with gw.client() as http:
        response = await http.patch("/api/devices/clash-1/desired", json={"state": {"fan": 1}})
    assert response.status_code == 200
    await expect(page.locator("#panel-stale")).to_be_visible()

    await page.fill("#desired-editor", '{"fan": 3}')
    await page.click("#desired-apply")
    result = page.locator("#desired-result")
    await expect(result).to_have_attribute("data-conflict", "true")
    await expect(result).to_contain_text("Conflict")
    # said once: the versions appear a single time, the problem's own detail is not repeated
    text = await result.inner_text()
    assert text.count("0 → 1") == 1 and "expected" not in text, text
    async with gw.client() as http:
        document = (await http.get("/api/devices/clash-1")).json()
    assert document["desired_state"] == {"fan": 1}  # nothing applied

    # "Reload latest & re-apply" then succeeds
    await page.click("#desired-reapply")
    await expect(result).to_have_attribute("data-status", "ok")
    async with gw.client() as http:
        document = (await http.get("/api/devices/clash-1")).json()
    assert document["desired_state"] == {"fan": 3}


async def test_the_editor_applies_while_the_device_keeps_reporting(
    gw: LiveGateway, page: Page
) -> None:
    """Reports move the shadow version every moment; the editor's base is the desired section's
    own version, so "Apply" goes through without a conflict."""
    _, token = await gw.gateway.store.register("busy-1", "thermo", {})
    async with open_device(gw, "busy-1", token) as device:
        await receive(device)
        stop = asyncio.Event()

        async def keep_reporting() -> None:
            count = 0
            while not stop.is_set():
                count += 1
                frame = {"type": "heartbeat", "reported_state": {"temp": count}}
                await device.send(orjson.dumps(frame).decode())
                await asyncio.sleep(0.1)

        reporter = asyncio.create_task(keep_reporting())
        try:
            await signed_in(page, gw)
            await open_panel(page, "busy-1")
            panel = page.locator("#device-panel")
            first = int(await panel.get_attribute("data-version") or 0)
            # the panel follows the reports: the shadow version moves on, desired stays
            deadline = time.monotonic() + TIMEOUT
            while int(await panel.get_attribute("data-version") or 0) < first + 3:
                assert time.monotonic() < deadline, "the panel never saw the reports"
                await asyncio.sleep(0.05)
            await expect(page.locator("#panel-stale")).to_be_hidden()

            await page.fill("#desired-editor", '{"target": 21}')
            async with page.expect_request("**/api/devices/busy-1/desired") as sent:
                await page.click("#desired-apply")
            assert (await sent.value).post_data_json == {
                "state": {"target": 21},
                "desired_version": 0,
            }
            result = page.locator("#desired-result")
            await expect(result).to_have_attribute("data-status", "ok")
            await expect(result).to_have_attribute("data-conflict", "false")
            update = await receive_type(device, "state_update")
            assert update["desired_state"] == {"target": 21}
            await expect(page.locator("#desired-base-version")).to_have_text("1")
        finally:
            stop.set()
            await reporter


async def test_a_read_only_key_disables_every_write_control(gw: LiveGateway, page: Page) -> None:
    await gw.gateway.store.register("ro-1", "lamp", {})
    reason = "read-only API key: writes need an admin key"
    await signed_in(page, gw, READ_KEY)
    await expect(page.locator("body")).to_have_attribute("data-role", "read")
    await open_panel(page, "ro-1")
    controls = page.locator("#device-panel [data-write]")
    assert await controls.count() >= 2  # the editor and its Apply button
    for index in range(await controls.count()):
        control = controls.nth(index)
        await expect(control).to_be_disabled()
        await expect(control).to_have_attribute("title", reason)
    await expect(page.locator("#desired-apply")).to_be_disabled()
    await expect(page.locator("#desired-editor")).to_be_disabled()
    note = page.locator("#panel-read-only")
    await expect(note).to_be_visible()
    await expect(note).to_have_text(reason)

    # an admin key gets them back, without the reason
    await page.click("#panel-close")
    await page.click("#logout")
    await page.fill("#login-key", ADMIN_KEY)
    await page.click("#login-submit")
    await expect(page.locator("body")).to_have_attribute("data-role", "admin")
    await open_panel(page, "ro-1")
    await expect(page.locator("#desired-apply")).to_be_enabled()
    await expect(page.locator("#desired-editor")).to_be_enabled()
    assert await page.locator("#desired-apply").get_attribute("title") is None
    await expect(note).to_be_hidden()


async def test_a_dropped_socket_resumes_without_losing_an_event(
    gw: LiveGateway, page: Page, valkey_client: aioredis.Redis
) -> None:
    store = gw.gateway.store
    tokens = {}
    for i in range(4):
        _, tokens[f"drop-{i}"] = await store.register(f"drop-{i}", "thermo", {})
    await signed_in(page, gw)
    start = await store.last_event_id()

    async def cycle_all() -> None:
        before = await store.last_event_id()
        for name, token in tokens.items():
            async with open_device(gw, name, token) as device:
                await receive(device)
        await wait_stream_growth(valkey_client, gw, before, 2 * len(tokens))

    await cycle_all()  # seen live
    # the socket drops; the page reconnects with backoff while events keep coming
    await page.evaluate("window.dashboard.ws.close()")
    await expect(page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")
    await cycle_all()
    await cycle_all()
    await expect(page.locator("#conn-state")).to_have_attribute(
        "data-state", "connected", timeout=3 * TIMEOUT * 1000
    )
    await cycle_all()  # and live again after the reconnect

    expected = [i.decode() for i in await wait_stream_growth(valkey_client, gw, start, 32)]
    deadline = time.monotonic() + TIMEOUT
    while sorted(await log_ids(page)) != sorted(expected):
        assert time.monotonic() < deadline, "the event log never caught up"
        await asyncio.sleep(0.05)
    ids = await log_ids(page)
    assert len(ids) == len(set(ids)) == 32  # exactly once each
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))), reverse=True)
    await expect(page.locator("#count-online")).to_have_text("0")


async def test_without_a_token_the_login_form_appears(gw: LiveGateway, page: Page) -> None:
    await gw.gateway.store.register("login-1", "thermo", {})
    await page.goto(gw.base_url + "/")
    form = page.locator("#login-form")
    await expect(form).to_be_visible()
    await expect(page.locator("#login-key")).to_be_focused()
    await expect(page.locator("#login-error")).to_be_hidden()  # a first visit is no error

    await page.fill("#login-key", "not-the-key")
    async with page.expect_response("**/api/session") as refused:
        await page.click("#login-submit")
    assert (await refused.value).status == 401
    error = page.locator("#login-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("unknown API key")
    await expect(form).to_be_visible()
    await expect(page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")

    await page.fill("#login-key", ADMIN_KEY)
    await page.click("#login-submit")
    await expect(form).to_be_hidden()
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(row(page, "login-1")).to_have_count(1)
    cookies = await page.context.cookies()
    session = next(c for c in cookies if c["name"] == "gateway_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"

    # sign out: back to the form, and the cookie no longer works
    await page.click("#logout")
    await expect(form).to_be_visible()
    async with gw.client(None) as http:
        response = await http.get(
            "/api/stats", headers={"Cookie": f"gateway_session={session['value']}"}
        )
    assert response.status_code == 401


async def test_a_wrong_token_in_the_url_shows_the_login_error(gw: LiveGateway, page: Page) -> None:
    await page.goto(f"{gw.base_url}/?token=wrong-key")
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#login-error")).to_be_visible()
    assert "wrong-key" not in page.url


async def test_fleet_overview_screenshot(gw: LiveGateway, page: Page) -> None:
    """Thirty devices, some online, one panel open with a delta; refreshes docs/dashboard.png
    when GATEWAY_UPDATE_DOCS_SCREENSHOT=1."""
    store = gw.gateway.store
    kinds = ["thermostat", "door-lock", "air-quality"]
    tokens = {}
    for i in range(30):
        name = f"{kinds[i % 3]}-{i + 1:02d}"
        _, tokens[name] = await store.register(name, kinds[i % 3], {"site": f"bldg-{i % 4 + 1}"})
    online = [name for i, name in enumerate(sorted(tokens)) if i % 3 != 1][:18]
    chosen = next(name for name in online if name.startswith("thermostat"))
    await store.patch_section(chosen, "reported", {"setpoint": 20.5, "mode": "heat", "fw": "1.4.2"})
    async with contextlib.AsyncExitStack() as stack:
        for name in online:
            device = await stack.enter_async_context(open_device(gw, name, tokens[name]))
            await receive(device)
        await store.patch_section(chosen, "desired", {"setpoint": 22.0, "mode": "heat"})
        await signed_in(page, gw)
        await expect(page.locator("#count-online")).to_have_text(str(len(online)))
        await expect(page.locator("#count-total")).to_have_text("30")
        await page.select_option("#sort-by", "status")
        await page.evaluate(f"window.dashboard.openDevice({chosen!r})")
        await expect(page.locator("#device-panel")).to_have_attribute("data-loaded", "true")
        await expect(page.locator("#device-panel")).to_have_attribute("data-status", "online")
        delta = page.locator('#panel-delta tr.delta-leaf[data-path="setpoint"]')
        await expect(delta).to_have_count(1)
        await page.wait_for_timeout(1200)  # let the chart gather a few points
        if os.environ.get("GATEWAY_UPDATE_DOCS_SCREENSHOT") == "1":
            await page.screenshot(path=str(DOCS_SCREENSHOT))
            assert DOCS_SCREENSHOT.stat().st_size > 10_000
