"""The browser dashboard (contract §7) driven in headless Chromium against a real gateway.

Debian's chromium through Playwright's `executable_path` (no browser download). The gateway
runs in the test's loop (`live_gateway`) on a private valkey; devices are real WebSockets.
Each test leaves a screenshot in `test-artifacts/`; with GATEWAY_UPDATE_DOCS_SCREENSHOT=1
one test also refreshes `docs/dashboard.png` for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
import uuid
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
from websockets.exceptions import InvalidStatus

from gateway.metrics import Metrics
from gateway.presence import PresenceEngine

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
    async with opened_page(browser, request) as opened:
        yield opened


@contextlib.asynccontextmanager
async def opened_page(
    browser: Browser, request: pytest.FixtureRequest, label: str = "", **options: Any
) -> AsyncIterator[Page]:
    """A page in a context of its own (viewport, colour scheme, permissions), checked when it
    closes: a screenshot left in test-artifacts/, and no uncaught error."""
    context = await browser.new_context(**({"viewport": {"width": 1400, "height": 900}} | options))
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.set_default_timeout(TIMEOUT * 1000)
    try:
        yield opened
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(filter(None, (request.node.name, label))))
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
        entries = await client.xrange(gw.gateway.store.keys.part(0).events, f"({after}", "+")
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
    # every write control of the page: register, metadata, desired state, rotate, delete
    controls = page.locator("[data-write]")
    names = await controls.evaluate_all("items => items.map(item => item.id)")
    assert set(names) >= {
        "register-open", "metadata-edit", "metadata-editor", "metadata-save", "desired-editor",
        "desired-apply", "token-rotate", "device-delete",
    }  # fmt: skip
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
    for name in ("#register-open", "#token-rotate", "#device-delete", "#metadata-edit"):
        await expect(page.locator(name)).to_be_enabled()
        assert await page.locator(name).get_attribute("title") is None
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
    """Thirty devices, some online, one panel open with a delta."""
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


DOCS = REPO_ROOT / "docs"


async def test_the_docs_screenshots(
    valkey_url: str, browser: Browser, request: pytest.FixtureRequest
) -> None:
    """A fleet with a real past of a few seconds: waves of devices going online and offline, a
    device reporting, one flapping. With GATEWAY_UPDATE_DOCS_SCREENSHOT=1 it refreshes the
    README's screenshots: the fleet view, the device panel, the phone layout, dark mode."""
    async with live_gateway(valkey_url, fleet_sample_interval=1) as gw:
        store = gw.gateway.store
        kinds = ["thermostat", "door-lock", "air-quality"]
        tokens = {}
        for i in range(30):
            name = f"{kinds[i % 3]}-{i + 1:02d}"
            site = {"site": f"bldg-{i % 4 + 1}"}
            _, tokens[name] = await store.register(name, kinds[i % 3], site)
        names = sorted(tokens)
        steady, waving = names[::2], names[1::2]
        chosen, flappy = "thermostat-01", "door-lock-02"
        cycler = Cycler(gw)
        sessions: dict[str, str] = {}
        async with contextlib.AsyncExitStack() as stack:
            sockets = {}
            for name in steady:
                sockets[name] = await stack.enter_async_context(open_device(gw, name, tokens[name]))
                await receive(sockets[name])
            await store.patch_section(chosen, "desired", {"setpoint": 21.5, "mode": "heat"})
            for tick in range(14):  # a wave of the other half going online and offline
                wanted = {n for i, n in enumerate(waving) if (i + tick) % 5 < 2 + tick % 3}
                for name in waving:
                    if name in wanted and name not in sessions and name != flappy:
                        sessions[name] = uuid.uuid4().hex
                        await cycler.engine.connect(name, sessions[name], "")
                    elif name not in wanted and name in sessions:
                        await cycler.engine.end_now([(name, sessions.pop(name))], "closed", 0)
                await cycler.cycle(flappy)
                sensors = {"humidity": 40 + tick % 4, "co2": 420 + 9 * tick}
                reported = {"setpoint": round(19.5 + tick * 0.15, 2), "sensors": sensors}
                frame = {"type": "heartbeat", "reported_state": reported}
                await sockets[chosen].send(orjson.dumps(frame).decode())
                await asyncio.sleep(0.75)
            update = os.environ.get("GATEWAY_UPDATE_DOCS_SCREENSHOT") == "1"
            shots = [
                ("dashboard.png", {}, None),
                ("dashboard-panel.png", {}, chosen),
                ("dashboard-dark.png", {"color_scheme": "dark"}, flappy),
                ("dashboard-phone.png", {"viewport": {"width": 390, "height": 844},
                                         "is_mobile": True}, None),
            ]  # fmt: skip
            for name, options, panel in shots:
                async with opened_page(browser, request, name, **options) as page:
                    await signed_in(page, gw)
                    chart = page.locator("#online-chart")
                    await expect(chart).to_have_attribute("data-server", re.compile(r"\d\d"))
                    log = page.locator("#event-log")
                    await expect(log).to_have_attribute("data-loaded", "true")
                    if panel:
                        await page.evaluate(f"window.dashboard.openDevice({panel!r})")
                        await expect(page.locator("#device-panel")).to_have_attribute(
                            "data-loaded", "true"
                        )
                        await expect(page.locator("#panel-timeline")).to_have_attribute(
                            "data-changes", re.compile(r"\d")
                        )
                    if panel == flappy:
                        await expect(page.locator("#panel-flapping")).to_be_visible()
                    await page.evaluate("document.activeElement?.blur()")  # no focus ring
                    await page.wait_for_timeout(300)
                    if update:
                        await page.screenshot(path=str(DOCS / name))
                        assert (DOCS / name).stat().st_size > 10_000


# --- the dashboard's memory, management, phone and keyboard -------------------------------


class Cycler:
    """Presence events through the gateway's own transitions, no sockets needed."""

    def __init__(self, gw: LiveGateway) -> None:
        g = gw.gateway
        self.engine = PresenceEngine(g.redis, g.store, g.settings, Metrics(), lambda *_: None)

    async def cycle(self, device_id: str) -> None:
        session = uuid.uuid4().hex
        assert await self.engine.connect(device_id, session, "")
        await self.engine.end_now([(device_id, session)], "closed", 0)


async def stream_presence_ids(client: aioredis.Redis, gw: LiveGateway) -> list[str]:
    """Every presence event id in the fleet stream, oldest first."""
    rows = await client.xrange(gw.gateway.store.keys.part(0).events, "-", "+")
    return [i.decode() for i, body in rows if orjson.loads(body[b"event"])["type"] == "presence"]


def sid(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


async def test_a_reload_paints_the_fleet_history_and_the_latest_events_at_once(
    valkey_url: str, valkey_client: aioredis.Redis, page: Page
) -> None:
    async with live_gateway(valkey_url, fleet_sample_interval=1) as gw:
        store = gw.gateway.store
        for i in range(6):
            await store.register(f"hist-{i}", "thermo" if i % 2 else "lamp", {})
        cycler = Cycler(gw)
        for i in range(6):
            await cycler.cycle(f"hist-{i}")
        async with gw.client() as http:  # the server keeps a few points of the fleet's past
            deadline = time.monotonic() + 3 * TIMEOUT
            for _ in range(1000):
                if len((await http.get("/api/stats/history")).json()["points"]) >= 3:
                    break
                assert time.monotonic() < deadline, "the series never reached three points"
                await asyncio.sleep(0.2)
        await signed_in(page, gw)
        expected = list(reversed(await stream_presence_ids(valkey_client, gw)))

        started = time.monotonic()
        await page.reload()
        chart = page.locator("#online-chart")
        await expect(chart).to_have_attribute("data-server", re.compile(r"^([3-9]|\d\d+)$"))
        await expect(page.locator("#event-log")).to_have_attribute("data-loaded", "true")
        painted = time.monotonic() - started
        assert painted < 2.0, f"history took {painted:.2f} s to show"
        assert await log_ids(page) == expected  # the events from before the page, newest first
        assert (await chart.get_attribute("data-series") or "").split(",") == [
            "online",
            "lamp",
            "thermo",
        ]
        bars = page.locator("#type-bars .type-bar")
        await expect(bars).to_have_count(2)
        await expect(page.locator('#type-bars [data-type="lamp"]')).to_contain_text("0 / 3")

        # a range holds its own points: the day's come from the same series
        await page.click('.segmented [data-range="day"]')
        await expect(chart).to_have_attribute("data-range", "day")
        assert await page.get_attribute('[data-range="day"]', "aria-pressed") == "true"


async def test_the_event_log_joins_history_and_live_without_gap_or_duplicate(
    gw: LiveGateway, page: Page, valkey_client: aioredis.Redis
) -> None:
    store = gw.gateway.store
    ids = [f"join-{i:02d}" for i in range(10)]
    for device_id in ids:
        await store.register(device_id, "thermo", {})
    cycler = Cycler(gw)
    for round_ in range(8):  # 160 events before the page: more than the first page of 100
        for device_id in ids:
            await cycler.cycle(device_id)
            if round_ % 3 == 0:  # state events between them, which the log leaves out
                await store.patch_section(device_id, "reported", {"round": round_})

    stop = asyncio.Event()

    async def keep_going() -> None:  # events written while the page loads and joins
        while not stop.is_set():
            for device_id in ids[:3]:
                await cycler.cycle(device_id)
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(keep_going())
    try:
        await signed_in(page, gw)
        await expect(page.locator("#event-log")).to_have_attribute("data-loaded", "true")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await writer
    everything = await stream_presence_ids(valkey_client, gw)

    async def settled() -> list[str]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            shown = await log_ids(page)
            if shown and shown[0] == everything[-1]:
                return shown
            assert time.monotonic() < deadline, "the log never caught up with the stream"
            await asyncio.sleep(0.05)

    shown = await settled()
    assert len(shown) == len(set(shown)), "an event shows twice"
    oldest = everything.index(shown[-1])
    assert shown == list(reversed(everything[oldest:])), "the log has a gap"
    assert len(shown) < len(everything)  # older events wait for a scroll

    # scrolling back loads older pages, still without gap or duplicate, down to the oldest
    log = page.locator("#event-log")
    deadline = time.monotonic() + 3 * TIMEOUT
    while await log.get_attribute("data-more") == "true":
        assert time.monotonic() < deadline, "older events never finished loading"
        await log.evaluate("list => { list.scrollTop = list.scrollHeight; }")
        await asyncio.sleep(0.1)
    shown = await log_ids(page)
    assert shown == list(reversed(everything))
    await expect(page.locator("#log-state")).to_have_text("No older events are kept.")


async def test_the_panel_draws_the_presence_timeline_value_plots_and_paged_history(
    gw: LiveGateway, page: Page
) -> None:
    store = gw.gateway.store
    _, token = await store.register("flappy-1", "thermo", {})
    cycler = Cycler(gw)
    for value in range(60):
        reported = {"temp": 20 + value / 10, "env": {"hum": 40 + value % 7}, "fw": "1.0"}
        await store.patch_section("flappy-1", "reported", reported)
        if value % 7 == 0:
            await cycler.cycle("flappy-1")  # online and offline again: flapping
    async with open_device(gw, "flappy-1", token) as device:
        await receive(device)
        await signed_in(page, gw)
        await open_panel(page, "flappy-1")
        timeline = page.locator("#panel-timeline")
        await expect(timeline).to_have_attribute("data-changes", "19")  # 9 cycles and one connect
        await expect(page.locator("#panel-flapping")).to_be_visible()
        await expect(page.locator("#timeline-summary")).to_contain_text("19 presence changes")
        periods = timeline.locator("rect.period")
        assert await periods.count() >= 19
        assert await periods.last.get_attribute("data-status") == "online"
        titles = await timeline.locator("rect.period title").all_text_contents()
        assert any("offline (closed)" in title for title in titles)

        plots = page.locator("#panel-plots")
        await expect(plots).to_have_attribute("data-leaves", re.compile("temp"))
        leaves = set((await plots.get_attribute("data-leaves") or "").split(","))
        assert leaves == {"temp", "env.hum"}  # numeric leaves only; "fw" is text
        temp = plots.locator('canvas[data-path="temp"]')
        await expect(temp).to_have_attribute("data-points", "60")
        await expect(temp).to_have_attribute("data-latest", "25.9")

        history = page.locator("#panel-history li")
        await expect(history).to_have_count(50)
        async with gw.client() as http:
            pages = (await http.get("/api/devices/flappy-1/history", params={"limit": 100})).json()
        api_ids = [item["id"] for item in pages["items"]]
        shown = await history.evaluate_all("items => items.map(i => i.dataset.eventId)")
        assert shown == api_ids[:50]
        await page.click("#history-older")
        await expect(history).to_have_count(min(100, len(api_ids)))
        shown = await history.evaluate_all("items => items.map(i => i.dataset.eventId)")
        assert shown == api_ids[:100]

        # a new report reaches the plot while the panel is open
        frame = {"type": "heartbeat", "reported_state": {"temp": 31.5}}
        await device.send(orjson.dumps(frame).decode())
        await expect(temp).to_have_attribute("data-latest", "31.5", timeout=3 * TIMEOUT * 1000)


async def test_an_admin_registers_rotates_edits_and_deletes_a_device(
    gw: LiveGateway, browser: Browser, request: pytest.FixtureRequest
) -> None:
    permissions = ["clipboard-read", "clipboard-write"]
    async with opened_page(browser, request, "admin", permissions=permissions) as page:
        await signed_in(page, gw)
        await expect(page.locator("body")).to_have_attribute("data-role", "admin")
        await page.click("#register-open")
        dialog = page.locator("#register-dialog")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#register-id")).to_be_focused()
        await page.fill("#register-id", "made-1")
        await page.fill("#register-type", "lamp")
        await page.fill("#register-metadata", '{"room": "lab", "floor": 2}')
        await page.click("#register-submit")

        token_dialog = page.locator("#token-dialog")
        await expect(token_dialog).to_be_visible()
        token = await page.input_value("#token-value")
        assert len(token) >= 40
        snippet = await page.locator("#token-snippet").inner_text()
        assert f'DeviceClient("{gw.ws_url}", "made-1"' in snippet and token in snippet
        await page.click("#token-copy")
        await expect(page.locator("#copy-state")).to_have_text("Copied the token.")
        assert await page.evaluate("navigator.clipboard.readText()") == token
        await page.click("#snippet-copy")
        await expect(page.locator("#copy-state")).to_have_text("Copied the snippet.")
        assert await page.evaluate("navigator.clipboard.readText()") == snippet
        await page.click("#token-done")
        await expect(token_dialog).to_be_hidden()
        assert token not in await page.content()  # shown once: gone from the page
        async with open_device(gw, "made-1", token) as device:  # the token shown works
            assert (await receive(device))["type"] == "welcome"
            await expect(row(page, "made-1")).to_have_attribute("data-status", "online")

            # rotate: the old token stops working, the new one is shown once
            await open_panel(page, "made-1")
            await page.click("#token-rotate")
            await expect(page.locator("#confirm-dialog")).to_be_visible()
            await page.click("#confirm-ok")
            await expect(token_dialog).to_be_visible()
            rotated = await page.input_value("#token-value")
            assert rotated != token
            await page.click("#token-done")
        with pytest.raises(InvalidStatus):
            async with open_device(gw, "made-1", token):
                pass
        async with open_device(gw, "made-1", rotated) as device:
            assert (await receive(device))["type"] == "welcome"

        # metadata: the whole object edited; a removed key is deleted
        await page.click("#metadata-edit")
        await page.fill("#metadata-editor", '{"room": "hall", "tags": {"a": 1}}')
        await page.click("#metadata-save")
        await expect(page.locator("#panel-metadata")).to_contain_text('"hall"')
        async with gw.client() as http:
            document = (await http.get("/api/devices/made-1")).json()
        assert document["metadata"] == {"room": "hall", "tags": {"a": 1}}

        # delete, after a confirmation that a cancel leaves alone
        await page.click("#device-delete")
        await page.click("#confirm-cancel")
        await expect(page.locator("#confirm-dialog")).to_be_hidden()
        assert await gw.gateway.store.get("made-1") is not None
        await page.click("#device-delete")
        await expect(page.locator("#confirm-title")).to_have_text("Delete made-1?")
        await page.click("#confirm-ok")
        await expect(page.locator("#device-panel")).to_be_hidden()
        await expect(row(page, "made-1")).to_have_count(0)
        assert await gw.gateway.store.get("made-1") is None


async def test_a_refused_registration_says_why_and_keeps_the_dialog(
    gw: LiveGateway, page: Page
) -> None:
    await gw.gateway.store.register("taken-1", "lamp", {})
    await signed_in(page, gw)
    await page.click("#register-open")
    await page.fill("#register-id", "taken-1")
    await page.fill("#register-type", "lamp")
    await page.click("#register-submit")
    error = page.locator("#register-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("exists")
    await page.fill("#register-id", "fresh-1")
    await page.fill("#register-metadata", "[1, 2]")
    await page.click("#register-submit")
    await expect(error).to_have_text("Metadata must be a JSON object.")
    assert await gw.gateway.store.get("fresh-1") is None
    await page.keyboard.press("Escape")
    await expect(page.locator("#register-dialog")).to_be_hidden()
    await expect(page.locator("#register-open")).to_be_focused()  # focus comes back


async def boxes(page: Page, selectors: list[str]) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for selector in selectors:
        box = await page.locator(selector).first.bounding_box()
        assert box is not None, f"{selector} is not shown"
        found[selector] = box
    return found


def overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"] + 0.5
        or b["x"] + b["width"] <= a["x"] + 0.5
        or a["y"] + a["height"] <= b["y"] + 0.5
        or b["y"] + b["height"] <= a["y"] + 0.5
    )


def assert_apart(found: dict[str, dict[str, float]]) -> None:
    names = list(found)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not overlap(found[first], found[second]), (first, second, found)


async def test_at_390_px_wide_nothing_overlaps_and_the_panel_is_a_sheet(
    gw: LiveGateway, browser: Browser, request: pytest.FixtureRequest
) -> None:
    store = gw.gateway.store
    cycler = Cycler(gw)
    for i in range(40):
        await store.register(f"phone-device-with-a-long-name-{i:02d}", f"kind-{i % 3}", {})
        if i % 4 == 0:
            await cycler.cycle(f"phone-device-with-a-long-name-{i:02d}")
    viewport = {"width": 390, "height": 844}
    async with opened_page(browser, request, "phone", viewport=viewport, is_mobile=True,
                           has_touch=True) as page:  # fmt: skip
        await signed_in(page, gw)
        await expect(page.locator("#event-log li").first).to_be_visible()
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways ({width} px)"
        header = [".brand", "#conn-state", ".counters", "#register-open", "#logout"]
        assert_apart(await boxes(page, header))
        filters = ["#filter-text", "#filter-type", "#filter-status", "#sort-by"]
        labels = ".filters .lbl"
        assert await page.locator(labels).all_inner_texts() == ["Search", "Type", "Status", "Sort"]
        for index in range(await page.locator(labels).count()):  # no label cut short
            clipped = (
                await page.locator(labels)
                .nth(index)
                .evaluate("el => el.scrollWidth > el.clientWidth")
            )
            assert not clipped
        blocks = [".topbar", ".filters", ".list-meta", ".list-head", "#device-list",
                  ".fleet-card", ".log-card"]  # fmt: skip
        assert_apart(await boxes(page, blocks))
        assert_apart(await boxes(page, filters))
        for selector in [*header, *filters, *blocks]:
            box = (await boxes(page, [selector]))[selector]
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390.5, selector
        cells = ".row[data-device-id] >> nth=0"
        first_row = page.locator(cells)
        assert_apart({
            name: box
            for name in (".status", ".id", ".seen")
            if (box := await first_row.locator(f".cell{name}").bounding_box()) is not None
        })  # fmt: skip
        # the list is on top where it is drawn: nothing covers it
        hit = await page.evaluate(
            """() => { const r = document.querySelector('#device-list').getBoundingClientRect();
                       const el = document.elementFromPoint(r.x + r.width / 2, r.y + 20);
                       return el ? el.closest('#device-list') !== null : false; }"""
        )
        assert hit
        # the panel is a full-screen sheet
        await first_row.click()
        panel = page.locator("#device-panel")
        await expect(panel).to_have_attribute("data-loaded", "true")
        box = await panel.bounding_box()
        assert box == {"x": 0, "y": 0, "width": 390, "height": 844}
        await expect(page.locator("#panel-close")).to_be_in_viewport()
        await page.click("#panel-close")
        await expect(panel).to_be_hidden()


FOCUS_STYLE = """el => { const s = getComputedStyle(el);
  return {outline: s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2,
          id: el.id, cls: el.className, tag: el.tagName,
          text: (el.textContent || '').trim().slice(0, 30)}; }"""


async def test_every_control_is_reachable_by_keyboard_with_a_visible_focus(
    gw: LiveGateway, page: Page
) -> None:
    store = gw.gateway.store
    for i in range(5):
        await store.register(f"key-{i}", "lamp", {})
    await Cycler(gw).cycle("key-0")
    await signed_in(page, gw)
    await expect(page.locator("#event-log li")).to_have_count(2)
    reached: list[dict[str, Any]] = []
    for _ in range(40):
        await page.keyboard.press("Tab")
        focused = await page.evaluate_handle("document.activeElement")
        style = await page.evaluate(f"({FOCUS_STYLE})(document.activeElement)")
        await focused.dispose()
        if style["tag"] == "BODY":
            continue
        reached.append(style)
    ids = {item["id"] for item in reached}
    for wanted in ["filter-text", "filter-type", "filter-status", "sort-by", "register-open",
                   "logout", "event-log"]:  # fmt: skip
        assert wanted in ids, (wanted, ids)
    rows = ["row" in str(item["cls"]) for item in reached]
    assert any(rows), "no device row takes focus"
    # the list is one Tab stop (the arrows move within it), not one per row
    assert not any(a and b for a, b in itertools.pairwise(rows)), "Tab walks row by row"
    assert {item["text"] for item in reached} >= {"Hour", "Day", "Week"}
    invisible = [item for item in reached if not item["outline"]]
    assert not invisible, f"focus not visible on {invisible}"

    # rows: arrows move, Enter opens the panel, Escape closes it and focus returns
    first = row(page, "key-0")
    await first.focus()
    await page.keyboard.press("ArrowDown")
    await expect(row(page, "key-1")).to_be_focused()
    await page.keyboard.press("Enter")
    panel = page.locator("#device-panel")
    await expect(panel).to_have_attribute("data-device-id", "key-1")
    await expect(page.locator("#panel-title")).to_be_focused()
    await page.keyboard.press("Escape")
    await expect(panel).to_be_hidden()
    await expect(row(page, "key-1")).to_be_focused()


CONTRAST = """() => {
  const parse = (c) => { const m = /rgba?\\(([^)]+)\\)/.exec(c); if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const over = (top, under) => ({r: top.r * top.a + under.r * (1 - top.a),
    g: top.g * top.a + under.g * (1 - top.a), b: top.b * top.a + under.b * (1 - top.a), a: 1});
  const lum = (c) => { const f = (v) => { v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
  const backdrop = (el) => { const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0) { layers.push(c); if (c.a >= 1) break; } }
    let bg = parse(getComputedStyle(document.documentElement).backgroundColor);
    if (!bg || bg.a < 1) bg = {r: 255, g: 255, b: 255, a: 1};
    for (const layer of layers.reverse()) bg = over(layer, bg);
    return bg; };
  const failures = []; let checked = 0;
  for (const el of document.querySelectorAll('body *')) {
    if (!el.checkVisibility({opacityProperty: true, visibilityProperty: true})) continue;
    if (el.closest('[disabled], [aria-hidden="true"]') || el.matches(':disabled')) continue;
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const r = el.getBoundingClientRect();
    if (r.width < 1 || r.height < 1 || r.bottom < 0 || r.right < 0) continue;
    const s = getComputedStyle(el);
    const bg = backdrop(el);
    const fg = over(parse(s.color), bg);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(s.fontSize);
    const large = size >= 24 || (Number(s.fontWeight) >= 700 && size >= 18.66);
    checked++;
    if (ratio < (large ? 3 : 4.5) - 0.005) failures.push(
      `${el.tagName.toLowerCase()}#${el.id}.${el.className} "${el.textContent.trim().slice(0, 24)}"`
      + ` ${s.color} on ${JSON.stringify(bg)}: ${ratio.toFixed(2)}`);
  }
  return {checked, failures, background: backdrop(document.body)};
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_colours_follow_the_system_and_meet_wcag_aa_contrast(
    gw: LiveGateway, browser: Browser, request: pytest.FixtureRequest, scheme: str
) -> None:
    store = gw.gateway.store
    _, token = await store.register("contrast-1", "lamp", {"site": "lab"})
    await store.register("contrast-2", "lamp", {})
    await store.patch_section("contrast-1", "reported", {"level": 3, "mode": "eco"})
    await store.patch_section("contrast-1", "desired", {"level": 5})
    async with (
        opened_page(browser, request, scheme, color_scheme=scheme) as page,
        open_device(gw, "contrast-1", token) as device,
    ):
        await receive(device)
        await signed_in(page, gw)
        result = await page.evaluate(CONTRAST)
        assert result["checked"] > 30 and not result["failures"], result["failures"]
        background = result["background"]
        dark = background["r"] + background["g"] + background["b"] < 3 * 60
        assert dark == (scheme == "dark"), background
        await open_panel(page, "contrast-1")
        await page.fill("#desired-editor", "{")
        await page.click("#desired-apply")
        await expect(page.locator("#desired-result")).to_have_attribute("data-status", "invalid")
        result = await page.evaluate(CONTRAST)
        assert not result["failures"], result["failures"]
        await page.click("#panel-close")
        await page.click("#register-open")
        await expect(page.locator("#register-dialog")).to_be_visible()
        result = await page.evaluate(CONTRAST)
        assert not result["failures"], result["failures"]


async def test_a_large_fleet_is_searched_and_paged_by_the_server(
    valkey_url: str, page: Page
) -> None:
    async with live_gateway(valkey_url, dashboard_snapshot_limit=100) as gw:
        store = gw.gateway.store
        names = [f"big-{i:04d}" for i in range(1200)] + [f"other-{i}" for i in range(5)]
        for index, name in enumerate(names):
            await store.register(name, "even" if index % 2 == 0 else "odd", {})
        await signed_in(page, gw)
        await expect(page.locator("#truncated-note")).to_be_visible()
        await expect(page.locator("#count-total")).to_have_text("1205")
        assert await page.locator("#sort-by").is_disabled()
        # the snapshot's first 100 and the page after them: the rest waits for a scroll
        await expect(page.locator("#list-count")).to_have_text(
            "600 of 1,205 devices loaded (more as you scroll)"
        )

        async def listed() -> list[str]:
            ids: list[str] = await page.evaluate("window.dashboard.state.view.slice()")
            return ids

        # scrolling near the end loads the next pages, in order, each device once
        deadline = time.monotonic() + 3 * TIMEOUT
        while len(await listed()) < len(names):
            assert time.monotonic() < deadline, f"only {len(await listed())} listed"
            await page.locator("#device-list").evaluate("l => { l.scrollTop = l.scrollHeight; }")
            await asyncio.sleep(0.1)
        assert await listed() == sorted(names)

        # a search is an API query: prefix, type and status, in cursor pages
        async with page.expect_request(re.compile(r"/api/devices\?.*prefix=big-01")) as sent:
            await page.fill("#filter-text", "big-01")
        assert "limit=500" in (await sent.value).url
        await expect(page.locator("#list-count")).to_contain_text("100 matching devices loaded")
        await page.select_option("#filter-type", "odd")
        await expect(page.locator("#list-count")).to_contain_text("50 matching devices loaded")
        assert await listed() == [f"big-{i:04d}" for i in range(100, 200) if i % 2 == 1]
        await page.fill("#filter-text", "nothing-like-this")
        await expect(page.locator("#list-count")).to_contain_text("0 matching devices loaded")
