"""MQTT topics and payloads, pure: what the gateway accepts from a device, and what it drops."""

from __future__ import annotations

import orjson
import pytest

from gateway import shadow
from gateway.config import ConfigError, Settings
from gateway.mqtt import codec
from gateway.mqtt.codec import Dropped, Kind, Topics

LIMITS = Settings().max_frame_bytes
SHADOW = shadow.Limits()


def test_topics_parse_the_three_a_device_publishes() -> None:
    topics = Topics()
    assert topics.parse("devices/lamp-7/status") == ("lamp-7", Kind.STATUS)
    assert topics.parse("devices/lamp-7/reported") == ("lamp-7", Kind.REPORTED)
    assert topics.parse("devices/lamp-7/commands/result") == ("lamp-7", Kind.RESULT)
    assert topics.subscriptions("g") == [
        "$share/g/devices/+/status",
        "$share/g/devices/+/reported",
        "$share/g/devices/+/commands/result",
    ]
    nested = Topics("site/a/devices")
    assert nested.parse("site/a/devices/x/status") == ("x", Kind.STATUS)
    assert nested.desired("x") == "site/a/devices/x/desired"


@pytest.mark.parametrize(
    "topic",
    [
        "devices/lamp-7/desired",  # the gateway's own
        "devices/lamp-7/commands",
        "devices/lamp 7/status",  # not a device id
        "devices/" + "x" * 300 + "/status",
        "other/lamp-7/status",
        "devices/lamp-7",
        "devices/lamp-7/status/extra",
    ],
)
def test_other_topics_are_dropped(topic: str) -> None:
    with pytest.raises(Dropped) as dropped:
        Topics().parse(topic)
    assert dropped.value.reason == "bad_topic"


def test_status_online_offline_and_the_will() -> None:
    online = codec.parse_status(b'{"status": "online", "session": "a1"}', LIMITS)
    assert online.online and online.session_id == "mqtt:a1" and not online.will
    will = codec.parse_status(b'{"status": "offline", "session": "a1", "will": true}', LIMITS)
    assert not will.online and will.reason == "mqtt_will"
    own = codec.parse_status(b'{"status": "offline", "session": "a1"}', LIMITS)
    assert own.reason == "mqtt_offline"
    assert codec.parse_status(b'{"status": "online", "session": "a"}', LIMITS, True).retained


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", "bad_json"),
        (b"[]", "bad_payload"),
        (b'{"status": "maybe", "session": "a"}', "bad_payload"),
        (b'{"status": "online"}', "bad_payload"),
        (b'{"status": "online", "session": "has space"}', "bad_payload"),
        (b'{"status": "online", "session": "' + b"s" * 65 + b'"}', "bad_payload"),
        (b'{"status": "online", "session": "a", "pad": "' + b"x" * LIMITS + b'"}', "oversize"),
    ],
)
def test_bad_statuses_are_dropped(payload: bytes, reason: str) -> None:
    with pytest.raises(Dropped) as dropped:
        codec.parse_status(payload, LIMITS)
    assert dropped.value.reason == reason


def test_reported_is_a_merge_patch_within_the_shadow_limits() -> None:
    assert codec.parse_reported(b'{"t": 1, "x": null}', SHADOW, LIMITS) == {"t": 1, "x": None}
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(10):
        deep = {"d": deep}
    for payload in (b"[1]", b'"text"', orjson.dumps(deep), b'{"' + b"k" * 200 + b'": 1}'):
        with pytest.raises(Dropped):
            codec.parse_reported(payload, SHADOW, LIMITS)


def test_results_as_a_websocket_command_result() -> None:
    result = codec.parse_result(
        b'{"command_id": "c-1", "status": "succeeded", "result": {"ok": 1}}', SHADOW, LIMITS
    )
    assert (result.command_id, result.status, orjson.loads(result.result)) == (
        "c-1", "succeeded", {"ok": 1},
    )  # fmt: skip
    for payload in (b'{"command_id": "c-1", "status": "done"}', b'{"status": "failed"}'):
        with pytest.raises(Dropped):
            codec.parse_result(payload, SHADOW, LIMITS)


def test_desired_payload_carries_the_delta_and_the_version() -> None:
    body = orjson.loads(codec.desired_payload({"led": "on", "fan": 1}, {"fan": 1}, 4))
    assert body == {
        "desired": {"led": "on", "fan": 1},
        "delta": {"led": {"desired": "on", "reported": None}},
        "desired_version": 4,
    }


@pytest.mark.parametrize(
    "url", ["http://broker:1883", "mqtt://", "mqtt://host:port", "mqtt://host/path", "broker"]
)
def test_a_wrong_url_names_the_flag(url: str) -> None:
    with pytest.raises(ConfigError, match="--mqtt-url / GATEWAY_MQTT_URL"):
        Settings(mqtt_url=url)


def test_urls_and_prefixes_that_are_fine() -> None:
    assert Settings(mqtt_url="mqtts://broker.example:8883").mqtt_url
    assert Settings(mqtt_url="mqtt://127.0.0.1", mqtt_topic_prefix="site/a").mqtt_topic_prefix
    for prefix in ("", "a/#", "a/+/b", "/a", "a/"):
        with pytest.raises(ConfigError, match="GATEWAY_MQTT_TOPIC_PREFIX"):
            Settings(mqtt_topic_prefix=prefix)
