"""Commands end to end over a real device socket, on every backend (each single-node engine
and the 3+3 cluster): the offline queue, delivery, results, timeouts, re-sends, the fleet log.

The device is scripted (commanddevice.Device): the test decides when it answers, or whether
it drops its connection first. Statuses are read back through the REST API, events from the
partition's fleet log and the fleet's command channel, as another program would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from backends import Client, all_keys, publish
from commanddevice import Device, command, post_command, wait_status
from live import live_gateway
from presence_feed import Subscription

from gateway.keys import Keys

Event = dict[str, Any]


async def command_events(client: Client, layout: Keys, device_id: str) -> list[Event]:
    """The device's command events in its partition's fleet log, oldest first."""
    rows = await client.xrange(layout.of(device_id).events, "-", "+")
    events = [{**orjson.loads(body[b"event"]), "id": entry.decode()} for entry, body in rows]
    return [e for e in events if e["type"] == "command" and e["device_id"] == device_id]


def statuses(events: list[Event], command_id: str) -> list[str]:
    return [e["status"] for e in events if e["command_id"] == command_id]


async def test_offline_queue_arrives_in_order_right_after_the_welcome(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("q-1")
        async with gw.client() as http:
            made = []
            for index in range(5):
                response = await post_command(
                    http, "q-1", name=f"step-{index}", params={"i": index}
                )
                assert response.status_code == 202, response.text
                assert response.json()["status"] == "queued"
                made.append(response.json()["command_id"])
        async with Device(gw.ws_url, "q-1", token) as device:
            frames = await device.wait_for(5)
            assert device.frames[0]["type"] == "welcome"
            assert [f["command_id"] for f in frames] == made
            assert [f["name"] for f in frames] == [f"step-{i}" for i in range(5)]
            assert [f["params"] for f in frames] == [{"i": i} for i in range(5)]
            assert all(f["attempt"] == 1 and f["timeout"] == 30 for f in frames)
            assert all(f["session"] == device.frames[0]["session"] for f in frames)
            for frame in frames:
                answer = await device.answer(frame["command_id"], result={"n": frame["name"]})
                assert answer["type"] == "ack"
            await asyncio.sleep(0.3)
            assert len(device.commands()) == 5, "a command was sent twice"
        for index, command_id in enumerate(made):
            done = await command(gw, "q-1", command_id)
            assert done["status"] == "succeeded"
            assert done["result"] == {"n": f"step-{index}"}
            assert done["attempts"] == 1
        events = await command_events(backend_client, layout, "q-1")
        for command_id in made:
            assert statuses(events, command_id) == ["queued", "sent", "succeeded"]


async def test_a_connected_device_gets_its_command_at_once_and_the_result_finishes_it(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("c-1")
        channel = layout.of("c-1").commands_channel
        async with (
            Subscription(backend_client, [channel]) as followed,
            Device(gw.ws_url, "c-1", token) as device,
            gw.client() as http,
        ):
            await device.wait_for(1, "welcome")
            response = await post_command(
                http, "c-1", name="reboot", params={"delay": 2}, timeout=5
            )
            assert response.status_code == 202
            body = response.json()
            assert body["status"] == "sent" and body["attempts"] == 1
            assert response.headers["location"] == f"/api/devices/c-1/commands/{body['command_id']}"
            (frame,) = await device.wait_for(1)
            assert frame["command_id"] == body["command_id"]
            assert frame["deadline"] == pytest.approx(body["created_at"] + 5, abs=0.01)
            ack = await device.answer(frame["command_id"], result={"rebooted": True}, id="r1")
            assert ack == {"type": "ack", "id": "r1", "command_id": frame["command_id"],
                           "status": "succeeded"}  # fmt: skip
            done = await command(gw, "c-1", frame["command_id"])
            assert done["status"] == "succeeded"
            assert done["result"] == {"rebooted": True}
            assert done["completed_at"] >= done["sent_at"] >= done["created_at"]
            published = []
            async with asyncio.timeout(5):
                while len(published) < 2:
                    _, _, data = await followed.queue.get()
                    published.append(orjson.loads(data))
        assert [p["status"] for p in published] == ["sent", "succeeded"]
        logged = await command_events(backend_client, layout, "c-1")
        assert [e["status"] for e in logged] == ["sent", "succeeded"]
        # the channel carries the log's events, each with its log id
        assert [p.pop("stream_id") for p in published] == [e.pop("id") for e in logged]
        assert published == logged


async def test_a_late_repeated_or_unknown_result_changes_nothing(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("late-1")
        async with Device(gw.ws_url, "late-1", token) as device, gw.client() as http:
            await device.wait_for(1, "welcome")
            slow = (await post_command(http, "late-1", name="slow", timeout=0.3)).json()
            quick = (await post_command(http, "late-1", name="quick")).json()
            await device.wait_for(2)
            timed_out = await wait_status(gw, "late-1", slow["command_id"], "timed_out")
            assert timed_out["error"] == "no answer within the timeout"
            late = await device.answer(slow["command_id"], result={"x": 1})
            assert late["type"] == "error" and late["code"] == "command_finished"
            assert late["status"] == "timed_out"
            assert await command(gw, "late-1", slow["command_id"]) == timed_out
            assert (await device.answer(quick["command_id"]))["type"] == "ack"
            finished = await command(gw, "late-1", quick["command_id"])
            again = await device.answer(quick["command_id"], "failed", error="changed my mind")
            assert again["code"] == "command_finished" and again["status"] == "succeeded"
            unknown = await device.answer("01NOSUCHCOMMAND0000000000")
            assert unknown["type"] == "error" and unknown["code"] == "unknown_command"
            assert await command(gw, "late-1", quick["command_id"]) == finished
        events = await command_events(backend_client, layout, "late-1")
        assert statuses(events, slow["command_id"]) == ["sent", "timed_out"]
        assert statuses(events, quick["command_id"]) == ["sent", "succeeded"]


async def test_a_session_dropped_before_its_result_gets_the_command_again(
    backend_url: str,
) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("drop-1")
        async with gw.client() as http:
            first = Device(gw.ws_url, "drop-1", token)
            async with first:
                await first.wait_for(1, "welcome")
                made = (await post_command(http, "drop-1", name="valve", ttl=60)).json()
                (frame,) = await first.wait_for(1)
                assert frame["attempt"] == 1
                first.abort()  # between the command and its result
            async with Device(gw.ws_url, "drop-1", token) as second:
                (again,) = await second.wait_for(1)
                assert again["command_id"] == made["command_id"]
                assert again["attempt"] == 2
                assert again["session"] != frame["session"]
                assert (await second.answer(again["command_id"]))["type"] == "ack"
            done = await command(gw, "drop-1", made["command_id"])
            assert done["status"] == "succeeded" and done["attempts"] == 2


async def test_unanswered_when_its_session_ended_it_waits_for_the_device_again(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    """The deadline passes while the device is away: back to queued, sent on the next connect."""
    async with live_gateway(backend_url) as gw:
        token = await gw.register("away-1")
        async with gw.client() as http:
            async with Device(gw.ws_url, "away-1", token) as device:
                await device.wait_for(1, "welcome")
                made = (await post_command(http, "away-1", name="read", timeout=0.3)).json()
                await device.wait_for(1)
            queued = await wait_status(gw, "away-1", made["command_id"], "queued")
            assert queued["attempts"] == 1
            async with Device(gw.ws_url, "away-1", token) as device:
                (frame,) = await device.wait_for(1)
                assert frame["attempt"] == 2
                await device.answer(frame["command_id"])
        events = await command_events(backend_client, layout, "away-1")
        assert statuses(events, made["command_id"]) == ["sent", "queued", "sent", "succeeded"]


async def test_a_ttl_that_runs_out_ends_the_command(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("ttl-1")
        async with gw.client() as http:
            never = (await post_command(http, "ttl-1", name="never", ttl=0.5)).json()
            expired = await wait_status(gw, "ttl-1", never["command_id"], "expired")
            assert expired["attempts"] == 0 and expired["sent_at"] is None
            assert expired["error"] == "the device did not connect within the ttl"
            async with Device(gw.ws_url, "ttl-1", token) as device:
                await device.wait_for(1, "welcome")
                sent = (await post_command(http, "ttl-1", name="once", timeout=0.2, ttl=0.6)).json()
                await device.wait_for(1)
            ended = await wait_status(gw, "ttl-1", sent["command_id"], "timed_out")
            assert ended["attempts"] == 1
            assert ended["error"] == "the ttl ran out before the device answered"
            async with Device(gw.ws_url, "ttl-1", token) as device:
                await device.wait_for(1, "welcome")
                await asyncio.sleep(0.3)
                assert device.commands() == [], "a final command was sent again"


async def test_ttl_zero_goes_only_to_a_connected_device(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("now-1")
        async with gw.client() as http:
            refused = await post_command(http, "now-1", name="ping", ttl=0)
            assert refused.status_code == 409
            assert refused.json()["type"].endswith("/device-offline")
            listed = await http.get("/api/devices/now-1/commands")
            assert listed.json()["items"] == []
            async with Device(gw.ws_url, "now-1", token) as device:
                await device.wait_for(1, "welcome")
                accepted = await post_command(http, "now-1", name="ping", ttl=0)
                assert accepted.status_code == 202 and accepted.json()["status"] == "sent"
                (frame,) = await device.wait_for(1)
                assert frame["name"] == "ping"


async def test_wait_answers_with_the_final_status(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("w-1")
        async with Device(gw.ws_url, "w-1", token) as device, gw.client() as http:
            await device.wait_for(1, "welcome")
            waiting = asyncio.create_task(post_command(http, "w-1", name="measure", wait=5))
            (frame,) = await device.wait_for(1)
            await device.answer(frame["command_id"], result={"celsius": 21.5})
            response = await waiting
            assert response.status_code == 200
            assert response.json()["status"] == "succeeded"
            assert response.json()["result"] == {"celsius": 21.5}
            unanswered = await post_command(http, "w-1", name="ignored", wait=0.5)
            assert unanswered.status_code == 202
            assert unanswered.json()["status"] == "sent"


async def test_deleting_the_device_cancels_its_commands_and_removes_them(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url) as gw:
        await gw.register("del-1")
        async with gw.client() as http:
            made = [(await post_command(http, "del-1", name=f"c{i}")).json() for i in range(3)]
            assert (
                await http.delete(f"/api/devices/del-1/commands/{made[0]['command_id']}")
            ).status_code == 200
            events_before = await command_events(backend_client, layout, "del-1")
            assert (await http.delete("/api/devices/del-1")).status_code == 204
            gone = await http.get(f"/api/devices/del-1/commands/{made[1]['command_id']}")
            assert gone.status_code == 404 and gone.json()["type"].endswith("/device-not-found")
        assert not [k for k in await all_keys(backend_client) if "command" in k and "del-1" in k]
        due = await backend_client.zrange(layout.of("del-1").commands_due, 0, -1)
        assert not [m for m in due if m.startswith(b"del-1/")]
        events = (await command_events(backend_client, layout, "del-1"))[len(events_before) :]
        assert sorted(e["command_id"] for e in events) == sorted(c["command_id"] for c in made[1:])
        assert {e["status"] for e in events} == {"canceled"}
        assert {e["error"] for e in events} == {"the device was deleted"}
        counts = await backend_client.hgetall(layout.of("del-1").commands_counts)
        assert {int(v) for v in counts.values()} <= {0}


async def test_a_canceled_command_is_final(backend_url: str) -> None:
    async with live_gateway(backend_url) as gw:
        token = await gw.register("cx-1")
        async with Device(gw.ws_url, "cx-1", token) as device, gw.client() as http:
            await device.wait_for(1, "welcome")
            made = (await post_command(http, "cx-1", name="long")).json()
            (frame,) = await device.wait_for(1)
            canceled = await http.delete(f"/api/devices/cx-1/commands/{made['command_id']}")
            assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
            again = await http.delete(f"/api/devices/cx-1/commands/{made['command_id']}")
            assert again.status_code == 409 and again.json()["type"].endswith("/command-finished")
            late = await device.answer(frame["command_id"])
            assert late["code"] == "command_finished" and late["status"] == "canceled"


async def test_command_typed_messages_of_other_programs_are_not_relayed(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    """The gateway owns `command` on the device's channel; every other type is relayed."""
    async with live_gateway(backend_url) as gw:
        token = await gw.register("own-1")
        async with Device(gw.ws_url, "own-1", token) as device:
            await device.wait_for(1, "welcome")
            channel = layout.commands("own-1")
            forged = {"type": "command", "command_id": "x", "name": "rm", "params": {},
                      "session": device.frames[0]["session"]}  # fmt: skip
            await publish(backend_client, channel, orjson.dumps(forged, option=orjson.OPT_INDENT_2))
            await publish(backend_client, channel, b'{"type":"custom","n":1}')
            (relayed,) = await device.wait_for(1, "custom")
            assert relayed == {"type": "custom", "n": 1}
            assert device.commands() == []


async def test_two_gateways_send_each_command_once(backend_url: str) -> None:
    """The command goes through the process holding the socket, never through both."""
    async with live_gateway(backend_url) as holder, live_gateway(backend_url) as other:
        token = await holder.register("two-1")
        async with Device(holder.ws_url, "two-1", token) as device, other.client() as http:
            await device.wait_for(1, "welcome")
            made = [(await post_command(http, "two-1", name=f"n{i}")).json() for i in range(20)]
            frames = await device.wait_for(20)
            assert [f["command_id"] for f in frames] == [m["command_id"] for m in made]
            for frame in frames:
                await device.answer(frame["command_id"])
            await asyncio.sleep(0.3)
            assert len(device.commands()) == 20, "a command was sent twice"
        out = [
            g.gateway.metrics.registry.get_sample_value(
                "gateway_messages_out_total", {"kind": "command"}
            )
            for g in (holder, other)
        ]
        assert out == [20, None]
