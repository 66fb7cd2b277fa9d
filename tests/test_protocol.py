"""Device and dashboard frames (gateway/protocol.py), pure: no socket, no Redis.

The property tests hold the protocol module to its promise: whatever arrives on a socket,
parsing either yields a frame or raises FrameError with a stable code, never anything else.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol, shadow
from gateway.protocol import FrameError, Get, Heartbeat, Report

LIMITS = shadow.Limits(max_bytes=32768, max_depth=8, max_key_length=128)
SMALL = shadow.Limits(max_bytes=64, max_depth=2, max_key_length=4)
ERROR_CODES = {
    "invalid_json",
    "invalid_frame",
    "unknown_type",
    "invalid_state",
    "state_too_large",
    "state_too_deep",
    "invalid_state_key",
}


def parse(frame: object, limits: shadow.Limits = LIMITS) -> protocol.DeviceFrame:
    return protocol.parse_device_frame(orjson.dumps(frame), limits)


def refused(frame: str | bytes, limits: shadow.Limits = LIMITS) -> FrameError:
    with pytest.raises(FrameError) as caught:
        protocol.parse_device_frame(frame, limits)
    return caught.value


# --- device frames: the happy paths ------------------------------------------------


def test_heartbeat_without_state() -> None:
    assert parse({"type": "heartbeat"}) == Heartbeat(None)
    assert parse({"type": "heartbeat", "reported_state": None}) == Heartbeat(None)


def test_heartbeat_with_state_is_the_whole_document_without_nulls() -> None:
    frame = parse({"type": "heartbeat", "reported_state": {"t": 21.5, "gone": None, "n": {"a": 1}}})
    assert frame == Heartbeat({"t": 21.5, "n": {"a": 1}})


def test_text_and_bytes_parse_alike() -> None:
    text = '{"type":"get","id":"r1"}'
    assert protocol.parse_device_frame(text, LIMITS) == Get("r1")
    assert protocol.parse_device_frame(text.encode(), LIMITS) == Get("r1")


def test_report_keeps_the_patch_and_the_request_id() -> None:
    frame = parse({"type": "report", "reported_state": {"led": "on", "x": None}, "id": 7})
    assert frame == Report({"led": "on", "x": None}, 7)
    assert parse({"type": "report", "reported_state": {}}) == Report({}, None)


def test_get_with_and_without_id() -> None:
    assert parse({"type": "get"}) == Get(None)
    assert parse({"type": "get", "id": "a" * protocol.MAX_REQUEST_ID}) == Get("a" * 64)


def test_unknown_fields_are_ignored() -> None:
    assert parse({"type": "get", "extra": [1, 2]}) == Get(None)


# --- device frames: refusals -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_json"),
        ("", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        ('{"type":"get"', "invalid_json"),
        ("[1,2]", "invalid_frame"),
        ('"heartbeat"', "invalid_frame"),
        ("null", "invalid_frame"),
        ("42", "invalid_frame"),
        ("{}", "invalid_frame"),
        ('{"type":7}', "invalid_frame"),
        ('{"type":null}', "invalid_frame"),
        ('{"type":"reboot"}', "unknown_type"),
        ('{"type":"HEARTBEAT"}', "unknown_type"),
    ],
)
def test_unreadable_frames(raw: str | bytes, code: str) -> None:
    assert refused(raw).code == code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "heartbeat", "reported_state": 5}, "invalid_state"),
        ({"type": "heartbeat", "reported_state": "on"}, "invalid_state"),
        ({"type": "heartbeat", "reported_state": [1]}, "invalid_state"),
        ({"type": "report", "reported_state": True}, "invalid_state"),
        ({"type": "report"}, "invalid_frame"),
        ({"type": "report", "reported_state": {"": 1}}, "invalid_state_key"),
        ({"type": "report", "reported_state": {"k" * 129: 1}}, "invalid_state_key"),
        ({"type": "get", "id": True}, "invalid_frame"),
        ({"type": "get", "id": 1.5}, "invalid_frame"),
        ({"type": "get", "id": {"a": 1}}, "invalid_frame"),
        ({"type": "get", "id": "x" * 65}, "invalid_frame"),
        ({"type": "report", "reported_state": {}, "id": [1]}, "invalid_frame"),
    ],
)
def test_wrong_field_types(frame: dict[str, Any], code: str) -> None:
    assert refused(orjson.dumps(frame)).code == code


def test_state_limits_apply_to_heartbeats_and_reports() -> None:
    deep: dict[str, Any] = {"a": {"b": {"c": 1}}}
    big = {"k": "x" * 100}
    for kind in ("heartbeat", "report"):
        assert refused(orjson.dumps({"type": kind, "reported_state": deep}), SMALL).code == (
            "state_too_deep"
        )
        assert refused(orjson.dumps({"type": kind, "reported_state": big}), SMALL).code == (
            "state_too_large"
        )
        assert refused(
            orjson.dumps({"type": kind, "reported_state": {"longer": 1}}), SMALL
        ).code == ("invalid_state_key")


def test_refusal_of_a_report_keeps_its_request_id() -> None:
    error = refused(orjson.dumps({"type": "report", "reported_state": 3, "id": "r9"}))
    assert error.request_id == "r9"
    error = refused(orjson.dumps({"type": "report", "id": 4}))
    assert error.request_id == 4


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "reboot", "id": "r1"}, "unknown_type"),
        ({"id": "r1"}, "invalid_frame"),
        ({"type": 5, "id": "r1"}, "invalid_frame"),
        ({"type": None, "id": "r1"}, "invalid_frame"),
        ({"type": "heartbeat", "reported_state": [1], "id": "r1"}, "invalid_state"),
        ({"type": "report", "reported_state": 3, "id": "r1"}, "invalid_state"),
    ],
)
def test_every_refusal_of_an_object_with_a_valid_id_echoes_it(
    frame: dict[str, Any], code: str
) -> None:
    error = refused(orjson.dumps(frame))
    assert (error.code, error.request_id) == (code, "r1")
    assert refused(orjson.dumps({**frame, "id": 7})).request_id == 7


@pytest.mark.parametrize("bad_id", [True, 1.5, [1], {"a": 1}, "x" * 65])
def test_a_refusal_never_echoes_an_invalid_id(bad_id: object) -> None:
    for frame in ({"type": "reboot"}, {}, {"type": 5}, {"type": "heartbeat", "reported_state": 1}):
        assert refused(orjson.dumps({**frame, "id": bad_id})).request_id is None


def test_unknown_type_message_is_bounded() -> None:
    error = refused(orjson.dumps({"type": "z" * 10_000}))
    assert error.code == "unknown_type"
    assert len(error.message) < 200


# --- property: nothing but FrameError escapes ------------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)
FRAME_TYPES = st.sampled_from(["heartbeat", "report", "get", "other", ""]) | JSON_VALUES
FRAMES = st.fixed_dictionaries(
    {"type": FRAME_TYPES},
    optional={"reported_state": JSON_VALUES, "id": JSON_VALUES},
)


def _parse_or_frame_error(data: str | bytes, limits: shadow.Limits) -> None:
    try:
        frame = protocol.parse_device_frame(data, limits)
    except FrameError as exc:
        assert exc.code in ERROR_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        # whatever was refused can always be told to the device
        error = orjson.loads(protocol.error(exc.code, exc.message, exc.request_id))
        assert error["type"] == "error" and error["code"] == exc.code
        return
    assert isinstance(frame, Heartbeat | Report | Get)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_frame_error(data: bytes) -> None:
    _parse_or_frame_error(data, LIMITS)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_frame_error(data: str) -> None:
    _parse_or_frame_error(data, LIMITS)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES, st.sampled_from([LIMITS, SMALL]))
def test_arbitrary_json_values_raise_only_frame_error(value: object, limits: shadow.Limits) -> None:
    _parse_or_frame_error(orjson.dumps(value), limits)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(FRAMES, st.sampled_from([LIMITS, SMALL]))
def test_frame_shaped_objects_raise_only_frame_error(
    frame: dict[str, Any], limits: shadow.Limits
) -> None:
    _parse_or_frame_error(orjson.dumps(frame), limits)


@given(st.integers(min_value=1, max_value=3000))
def test_deep_nesting_is_refused_not_crashed(depth: int) -> None:
    nested = '{"a":' * depth + "1" + "}" * depth
    _parse_or_frame_error('{"type":"report","reported_state":' + nested + "}", LIMITS)
    _parse_or_frame_error("[" * depth + "]" * depth, LIMITS)


@settings(max_examples=200)
@given(st.dictionaries(st.text(min_size=1, max_size=8), JSON_LEAVES, max_size=6))
def test_valid_reports_round_trip(state: dict[str, Any]) -> None:
    frame = parse({"type": "report", "reported_state": state, "id": "q"})
    assert frame == Report(state, "q")
    heartbeat = parse({"type": "heartbeat", "reported_state": state})
    assert heartbeat == Heartbeat({k: v for k, v in state.items() if v is not None})


# --- outgoing frames ----------------------------------------------------------------


def test_welcome_shape() -> None:
    frame = orjson.loads(
        protocol.welcome(
            "dev-1", "s1", 60.0, {"led": "on", "fan": 2}, {"led": "off", "fan": 2}, 5, 65536
        )
    )
    assert frame == {
        "type": "welcome",
        "device_id": "dev-1",
        "session": "s1",
        "heartbeat_timeout": 60.0,
        "max_frame_bytes": 65536,
        "desired_state": {"led": "on", "fan": 2},
        "reported_state": {"led": "off", "fan": 2},
        "delta": {"led": {"desired": "on", "reported": "off"}},
        "version": 5,
    }


def test_welcome_delta_is_nested_and_empty_when_in_sync() -> None:
    nested = orjson.loads(
        protocol.welcome("d", "s", 2, {"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}, 1, 4096)
    )
    assert nested["delta"] == {"a": {"c": {"desired": 2, "reported": None}}}
    in_sync = orjson.loads(protocol.welcome("d", "s", 2, {"a": 1}, {"a": 1, "b": 2}, 1, 4096))
    assert in_sync["delta"] == {}


def test_ack_delta_and_shadow_frames() -> None:
    assert orjson.loads(protocol.ack("r1", 9)) == {"type": "ack", "id": "r1", "version": 9}
    assert orjson.loads(protocol.ack(None, 1)) == {"type": "ack", "id": None, "version": 1}
    assert orjson.loads(protocol.delta_frame({"x": {"desired": 1, "reported": None}}, 3)) == {
        "type": "delta",
        "delta": {"x": {"desired": 1, "reported": None}},
        "version": 3,
    }
    shadow_frame = orjson.loads(protocol.shadow_frame(2, {"x": 1}, {"x": 0, "y": 1}, 4))
    assert shadow_frame == {
        "type": "shadow",
        "id": 2,
        "desired_state": {"x": 1},
        "reported_state": {"x": 0, "y": 1},
        "delta": {"x": {"desired": 1, "reported": 0}},
        "version": 4,
    }


def test_error_frame_carries_id_only_when_given() -> None:
    assert orjson.loads(protocol.error("invalid_json", "bad")) == {
        "type": "error",
        "code": "invalid_json",
        "message": "bad",
    }
    assert orjson.loads(protocol.error("invalid_frame", "bad", "r")) == {
        "type": "error",
        "code": "invalid_frame",
        "message": "bad",
        "id": "r",
    }
    assert orjson.loads(protocol.error("invalid_frame", "bad", 0))["id"] == 0


# --- command channel messages ------------------------------------------------------


def test_parse_command_reads_the_seed_format() -> None:
    seed_message = b'{"type":"state_update","desired_state":{"led":"on"},"timestamp":1.5}'
    assert protocol.parse_command(seed_message) == {"led": "on"}
    assert protocol.command_version(seed_message) is None


@pytest.mark.parametrize(
    "raw",
    [b"reboot", b"", b"[1]", b'{"type":"x"}', b'{"desired_state":[1]}', b'{"desired_state":null}'],
)
def test_parse_command_without_a_desired_document(raw: bytes) -> None:
    assert protocol.parse_command(raw) is None


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        (b'{"version":4}', 4),
        (b'{"version":true}', None),
        (b'{"version":"4"}', None),
        (b'{"version":4.0}', None),
        (b"[4]", None),
        (b"garbage", None),
    ],
)
def test_command_version(raw: bytes, version: int | None) -> None:
    assert protocol.command_version(raw) == version


@given(st.binary(max_size=100) | JSON_VALUES.map(orjson.dumps))
def test_command_parsers_never_raise(raw: bytes) -> None:
    desired = protocol.parse_command(raw)
    assert desired is None or isinstance(desired, dict)
    version = protocol.command_version(raw)
    assert version is None or (isinstance(version, int) and not isinstance(version, bool))


# --- dashboard frames --------------------------------------------------------------


def test_dashboard_frames() -> None:
    assert protocol.parse_dashboard_frame('{"type":"ping"}') == protocol.Ping()
    assert protocol.parse_dashboard_frame('{"type":"subscribe"}') == protocol.Subscribe(None, None)
    sub = protocol.parse_dashboard_frame(
        orjson.dumps({"type": "subscribe", "types": ["presence"], "ids": ["a-1", "b.2"]})
    )
    assert sub == protocol.Subscribe(frozenset({"presence"}), frozenset({"a-1", "b.2"}))
    resume = protocol.parse_dashboard_frame('{"type":"resume","after":"1700000000000-3"}')
    assert resume == protocol.Resume("1700000000000-3")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "subscribe", "types": ["bogus"]}, "invalid_frame"),
        ({"type": "subscribe", "types": "presence"}, "invalid_frame"),
        ({"type": "subscribe", "ids": ["a:b"]}, "invalid_frame"),
        ({"type": "subscribe", "ids": [1]}, "invalid_frame"),
        ({"type": "subscribe", "ids": ["a"] * 1001}, "too_many_ids"),
        ({"type": "resume", "after": "not a cursor!"}, "invalid_frame"),
        ({"type": "resume", "after": "1" * 5000}, "invalid_frame"),
        ({"type": "resume", "after": 17}, "invalid_frame"),
        ({"type": "resume"}, "invalid_frame"),
        ({"type": "heartbeat"}, "unknown_type"),
    ],
)
def test_dashboard_refusals(frame: dict[str, Any], code: str) -> None:
    with pytest.raises(FrameError) as caught:
        protocol.parse_dashboard_frame(orjson.dumps(frame))
    assert caught.value.code == code


@settings(max_examples=300)
@given(st.binary(max_size=100) | JSON_VALUES.map(orjson.dumps))
def test_dashboard_parser_raises_only_frame_error(raw: bytes) -> None:
    with contextlib.suppress(FrameError):
        protocol.parse_dashboard_frame(raw)
