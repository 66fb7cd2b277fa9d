"""The device panel's commands in headless Chromium, against a real gateway and real devices.

A command sent from the panel reaches a connected device (a raw WebSocket that answers as the
test says), and its row follows the fleet's `command` events live: sent, then the result or
the error. An offline device's command waits queued and is delivered when it connects. A
read-only key gets the form disabled with the reason; bad input is refused in the page or by
the gateway, inline, and sends nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from commanddevice import Device
from live import READ_KEY, LiveGateway, live_gateway
from playwright.async_api import Browser, Page, async_playwright, expect
from servers import RedisServer
from test_browser import ARTIFACTS, CHROMIUM_ARGS, CONTRAST, open_panel, opened_page, signed_in

# one Chromium for the module (a launch costs a second or two), so one event loop for it all
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

LIVE_MS = 3000  # a status change shows this soon after it happened (events are batched per 50 ms)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer("valkey", data_dir=tmp_path_factory.mktemp("browser-commands"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def valkey_url(valkey: RedisServer) -> str:
    with valkey.sync_client() as client:
        client.flushall()
    return valkey.url


@pytest_asyncio.fixture(loop_scope="module")
async def gw(valkey_url: str) -> AsyncIterator[LiveGateway]:
    async with live_gateway(valkey_url) as live:
        yield live


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    async with opened_page(browser, request) as opened:
        yield opened


def command_row(page: Page, command_id: str) -> Any:
    return page.locator(f'#command-list li[data-command-id="{command_id}"]')


async def send_from_panel(
    page: Page, name: str, params: str = "", answer_in: str = "", ttl: str = ""
) -> None:
    """Fill the form and press Send (timeout and ttl left empty keep what the form shows)."""
    await page.fill("#command-name", name)
    await page.fill("#command-params", params)
    if answer_in:
        await page.fill("#command-timeout", answer_in)
    if ttl:
        await page.fill("#command-ttl", ttl)
    await page.click("#command-send")


async def shot(page: Page, name: str) -> None:
    """The commands section alone, in test-artifacts/ (the page's own shot misses it: the
    panel scrolls inside itself)."""
    ARTIFACTS.mkdir(exist_ok=True)
    section = page.locator("#panel-commands")
    await section.scroll_into_view_if_needed()
    await section.screenshot(path=str(ARTIFACTS / f"{name}.png"))


async def commands_of(gw: LiveGateway, device_id: str) -> list[dict[str, Any]]:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}/commands", params={"status": "all"})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def test_a_command_from_the_panel_goes_sent_then_succeeded_or_failed_live(
    gw: LiveGateway, page: Page
) -> None:
    token = await gw.register("cmd-live", "lamp")
    async with Device(gw.ws_url, "cmd-live", token) as device:
        await device.wait_for(1, "welcome")
        await signed_in(page, gw)
        await open_panel(page, "cmd-live")
        await expect(page.locator("#command-list")).to_have_attribute("data-loaded", "true")
        await expect(page.locator("#command-state")).to_have_text("No commands yet.")

        await send_from_panel(page, "reboot", '{"delay": 5}', answer_in="20")
        (frame,) = await device.wait_for(1)
        assert (frame["name"], frame["params"]) == ("reboot", {"delay": 5})
        cid = frame["command_id"]
        row = command_row(page, cid)
        await expect(row).to_have_attribute("data-status", "sent")
        await expect(row.locator(".command-sent")).to_be_visible()
        await expect(page.locator("#command-result")).to_contain_text("Sent reboot: sent")

        # the device's answer reaches the row through the live feed alone
        assert (await device.answer(cid, "succeeded", result={"uptime": 0}))["type"] == "ack"
        await expect(row).to_have_attribute("data-status", "succeeded", timeout=LIVE_MS)
        await expect(row.locator(".command-result")).to_have_text('{"uptime":0}')
        await expect(row.locator(".command-done")).to_be_visible()
        await expect(row.locator(".command-cancel")).to_have_count(0)
        result = page.locator("#command-result")
        await expect(result).to_have_attribute("data-status", "ok")
        await expect(result).to_contain_text('reboot succeeded: {"uptime":0}')

        # a failed one shows its error, newest first
        await send_from_panel(page, "selftest")
        (_, second) = await device.wait_for(2)
        failed = command_row(page, second["command_id"])
        await expect(failed).to_have_attribute("data-status", "sent")
        await device.answer(second["command_id"], "failed", error="sensor 2 missing")
        await expect(failed).to_have_attribute("data-status", "failed", timeout=LIVE_MS)
        await expect(failed.locator(".command-error")).to_have_text("error: sensor 2 missing")
        await expect(result).to_have_attribute("data-status", "error")
        await expect(result).to_contain_text("selftest failed: sensor 2 missing")
        ids = await page.eval_on_selector_all(
            "#command-list li", "items => items.map(item => item.dataset.commandId)"
        )
        assert ids == [second["command_id"], cid]
        await shot(page, "commands-light")
        stored = {c["command_id"]: c for c in await commands_of(gw, "cmd-live")}
        assert stored[cid]["timeout"] == 20.0 and stored[cid]["result"] == {"uptime": 0}
        assert stored[second["command_id"]]["error"] == "sensor 2 missing"


async def test_an_offline_device_gets_its_queued_command_when_it_connects_live(
    gw: LiveGateway, page: Page
) -> None:
    token = await gw.register("cmd-away", "lamp")
    await signed_in(page, gw)
    await open_panel(page, "cmd-away")
    await send_from_panel(page, "calibrate", '{"to": 21.5}')
    await expect(page.locator("#command-result")).to_contain_text("queued")
    (made,) = await commands_of(gw, "cmd-away")
    row = command_row(page, made["command_id"])
    await expect(row).to_have_attribute("data-status", "queued")
    await expect(row.locator(".command-params")).to_have_text('{"to":21.5}')

    # a command another program makes appears too, live and in its place
    async with gw.client() as http:
        other = await http.post("/api/devices/cmd-away/commands", json={"name": "report"})
    assert other.status_code == 202, other.text
    other_row = command_row(page, other.json()["command_id"])
    await expect(other_row).to_have_attribute("data-status", "queued", timeout=LIVE_MS)
    ids = await page.eval_on_selector_all(
        "#command-list li", "items => items.map(item => item.dataset.commandId)"
    )
    assert ids == [other.json()["command_id"], made["command_id"]]

    # the device connects: its queue is sent in order, and the rows follow
    async with Device(gw.ws_url, "cmd-away", token) as device:
        first, second = await device.wait_for(2)
        assert [first["name"], second["name"]] == ["calibrate", "report"]
        await expect(row).to_have_attribute("data-status", "sent", timeout=LIVE_MS)
        await expect(other_row).to_have_attribute("data-status", "sent", timeout=LIVE_MS)
        await device.answer(first["command_id"], "succeeded", result={"offset": -0.3})
        await expect(row).to_have_attribute("data-status", "succeeded", timeout=LIVE_MS)
        await expect(row.locator(".command-result")).to_have_text('{"offset":-0.3}')
        await expect(page.locator("#command-result")).to_contain_text("calibrate succeeded")
        device.abort()  # the session dies with "report" unanswered

    # sent again on the next connect, as attempt 2, and the row says so
    async with Device(gw.ws_url, "cmd-away", token) as again:
        (resent,) = await again.wait_for(1)
        assert (resent["command_id"], resent["attempt"]) == (second["command_id"], 2)
        await expect(other_row).to_have_attribute("data-attempts", "2", timeout=LIVE_MS)
        await expect(other_row.locator(".command-attempts")).to_have_text("attempt 2")
        await expect(other_row).to_have_attribute("data-status", "sent")

        # a pending one can be canceled from its row, by keyboard; focus stays on the row
        await other_row.locator(".command-cancel").focus()
        await page.keyboard.press("Enter")
        await expect(other_row).to_have_attribute("data-status", "canceled")
        await expect(other_row).to_be_focused()
    assert {c["status"] for c in await commands_of(gw, "cmd-away")} == {"succeeded", "canceled"}


async def test_a_read_only_key_gets_the_form_disabled_with_the_reason(
    gw: LiveGateway, page: Page
) -> None:
    await gw.register("cmd-ro", "lamp")
    async with gw.client() as http:
        made = await http.post("/api/devices/cmd-ro/commands", json={"name": "ping"})
        assert made.status_code == 202
        for i in range(22):  # newer ones: "ping" is on the second page
            body = {"name": f"batch-{i:02d}"}
            assert (await http.post("/api/devices/cmd-ro/commands", json=body)).is_success
    reason = "read-only API key: writes need an admin key"
    await signed_in(page, gw, READ_KEY)
    await expect(page.locator("body")).to_have_attribute("data-role", "read")
    await open_panel(page, "cmd-ro")
    for control in ("#command-name", "#command-params", "#command-timeout", "#command-ttl",
                    "#command-send"):  # fmt: skip
        await expect(page.locator(control)).to_be_disabled()
        await expect(page.locator(control)).to_have_attribute("title", reason)
    note = page.locator("#command-read-only")
    await expect(note).to_be_visible()
    await expect(note).to_have_text(f"Sending commands is disabled ({reason}).")
    await expect(page.locator("#command-form")).to_have_attribute(
        "aria-describedby", "command-read-only"
    )
    # the commands are still listed, a page at a time, newest first
    rows = page.locator("#command-list li")
    await expect(rows).to_have_count(20)
    await expect(rows.first.locator(".command-name")).to_have_text("batch-21")
    row = command_row(page, made.json()["command_id"])
    await expect(row).to_have_count(0)
    await page.click("#command-older")
    await expect(rows).to_have_count(23)
    await expect(rows.last.locator(".command-name")).to_have_text("ping")
    await expect(page.locator("#command-older")).to_be_hidden()
    await expect(page.locator("#command-state")).to_have_text("No older commands are kept.")
    # and a pending one cannot be canceled from here
    await expect(row).to_have_attribute("data-status", "queued")
    await expect(row.locator(".command-cancel")).to_be_disabled()
    await expect(row.locator(".command-cancel")).to_have_attribute("title", reason)
    # Ctrl+Enter in the (disabled) params does nothing either
    await page.locator("#command-params").dispatch_event(
        "keydown", {"key": "Enter", "ctrlKey": True}
    )
    assert len(await commands_of(gw, "cmd-ro")) == 23


async def test_bad_input_and_refusals_are_shown_inline_and_send_nothing(
    valkey_url: str, page: Page
) -> None:
    async with live_gateway(valkey_url, command_queue_max=2) as gw:
        await gw.register("cmd-bad", "lamp")
        await signed_in(page, gw)
        await open_panel(page, "cmd-bad")
        await expect(page.locator("#command-list")).to_have_attribute("data-loaded", "true")
        result = page.locator("#command-result")
        posts: list[str] = []
        page.on(
            "request",
            lambda r: posts.append(r.url) if r.method == "POST" and "/commands" in r.url else None,
        )

        # not JSON: refused in the page, focus on the field, nothing sent
        await send_from_panel(page, "reboot", '{"delay": ')
        await expect(result).to_have_attribute("data-status", "invalid")
        await expect(result).to_contain_text("params are not valid JSON")
        await expect(page.locator("#command-params")).to_have_attribute("aria-invalid", "true")
        await expect(page.locator("#command-params")).to_be_focused()
        await send_from_panel(page, "reboot", "[1, 2]")
        await expect(result).to_contain_text("params must be a JSON object")
        await send_from_panel(page, "re boot")
        await expect(result).to_contain_text("the name must be")
        await expect(page.locator("#command-name")).to_be_focused()
        await send_from_panel(page, "reboot", answer_in="0")
        await expect(result).to_contain_text("timeout must be 0.1–3600 seconds")
        await page.fill("#command-timeout", "30")
        await page.focus("#command-ttl")
        await page.keyboard.press("Control+A")
        await page.keyboard.type("1e")  # not a number: the field's value is "", not the default
        await page.click("#command-send")
        await expect(result).to_contain_text("ttl must be a number of seconds")
        await expect(page.locator("#command-ttl")).to_be_focused()
        await page.fill("#command-ttl", "3600")
        assert posts == [] and await commands_of(gw, "cmd-bad") == []
        await page.fill("#command-timeout", "30")
        # typing in a field clears its mark
        await page.fill("#command-params", "{}")
        await expect(page.locator("#command-params")).not_to_have_attribute("aria-invalid", "true")

        # the gateway's 422 (params nested too deeply), named on its field
        deep = "{" + '"a": {' * 9 + "}" * 10
        await send_from_panel(page, "reboot", deep)
        await expect(result).to_have_attribute("data-status", "error")
        await expect(result).to_contain_text("Not sent:")
        await expect(page.locator("#command-params")).to_have_attribute("aria-invalid", "true")

        # ttl 0 to a device that is not connected: 409 device-offline, nothing stored
        await send_from_panel(page, "reboot", "", ttl="0")
        await expect(result).to_have_attribute("data-kind", "device-offline")
        await expect(result).to_contain_text("the device is not connected")
        await expect(page.locator("#command-ttl")).to_be_focused()
        assert await commands_of(gw, "cmd-bad") == []

        # a full queue: 429, with how many are pending
        await page.fill("#command-ttl", "3600")
        for name in ("one", "two"):
            await send_from_panel(page, name)
            await expect(result).to_contain_text(f"Sent {name}: queued")
        await send_from_panel(page, "three")
        await expect(result).to_have_attribute("data-kind", "command-queue-full")
        await expect(result).to_contain_text("command queue is full (2 pending)")
        assert [c["name"] for c in await commands_of(gw, "cmd-bad")] == ["two", "one"]
        await expect(page.locator("#command-list li")).to_have_count(2)
        assert len(posts) == 5  # the 422, the 409, two accepted, the 429


async def test_the_commands_fit_a_phone_and_meet_contrast_in_the_dark(
    gw: LiveGateway, browser: Browser, request: pytest.FixtureRequest
) -> None:
    token = await gw.register("cmd-phone-with-a-long-device-name", "lamp")
    device_id = "cmd-phone-with-a-long-device-name"
    async with Device(gw.ws_url, device_id, token) as device:
        await device.wait_for(1, "welcome")
        async with gw.client() as http:
            for name in ("ok", "bad", "late", "waiting"):
                body = {"name": f"{name}-command", "params": {"n": 1}}
                assert (await http.post(f"/api/devices/{device_id}/commands", json=body)).is_success
        frames = await device.wait_for(4)
        await device.answer(frames[0]["command_id"], "succeeded", result={"long": "x" * 300})
        await device.answer(frames[1]["command_id"], "failed", error="no")
        async with opened_page(
            browser, request, "dark", color_scheme="dark",
            viewport={"width": 390, "height": 844}, is_mobile=True,
        ) as page:  # fmt: skip
            await signed_in(page, gw)
            await page.evaluate(f"window.dashboard.openDevice({device_id!r})")
            await expect(page.locator("#command-list li")).to_have_count(4)
            await expect(page.locator('#command-list li[data-status="failed"]')).to_have_count(1)
            await page.locator("#panel-commands").scroll_into_view_if_needed()
            # nothing is wider than the screen
            overflow = await page.evaluate(
                """() => [...document.querySelectorAll('#panel-commands, #panel-commands *')]
                    .filter(el => el.getBoundingClientRect().right > innerWidth + 1)
                    .map(el => el.id || el.className)"""
            )
            assert overflow == []
            await shot(page, "commands-phone-dark")
            contrast = await page.evaluate(CONTRAST)
            assert not contrast["failures"], contrast["failures"]
            # keyboard: Tab walks name, timeout, ttl, params, Send; Ctrl+Enter sends
            await page.focus("#command-name")
            await page.keyboard.type("kbd-command")
            order = []
            for _ in range(4):
                await page.keyboard.press("Tab")
                order.append(await page.evaluate("document.activeElement.id"))
            assert order == ["command-timeout", "command-ttl", "command-params", "command-send"]
            await page.focus("#command-params")
            await page.keyboard.press("Control+Enter")
            await expect(page.locator("#command-result")).to_contain_text("Sent kbd-command")
            await expect(page.locator("#command-list li")).to_have_count(5)
            await expect(page.locator("#command-list")).to_have_attribute("data-count", "5")
