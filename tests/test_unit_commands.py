"""The command model and frames, pure: ids, bounds, records, the device's result frame, the
messages the gateway owns on a device's channel. No server, no socket."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from gateway import protocol, shadow
from gateway.commands import model

pytestmark = pytest.mark.unit
LIMITS = shadow.Limits()


def test_command_ids_are_ulids_sorted_by_creation() -> None:
    now = time.time()
    ids = [model.new_command_id(now + step / 1000) for step in range(50)]
    assert all(len(i) == 26 and set(i) <= set(model.CROCKFORD) for i in ids)
    assert ids == sorted(ids)
    assert len(set(model.new_command_id(now) for _ in range(1000))) == 1000


@pytest.mark.parametrize(
    ("seconds", "text"), [(30.0, "30"), (0.1, "0.1"), (3600, "3600"), (0.0004, "0"), (1.25, "1.25")]
)
def test_seconds_are_stored_as_short_json_numbers(seconds: float, text: str) -> None:
    assert model.seconds_text(seconds) == text
    assert orjson.loads(text) == pytest.approx(round(seconds, 3))


def test_params_have_a_state_documents_bounds_and_null_is_a_value() -> None:
    assert model.encode_params({"a": None, "b": [1, 2]}, LIMITS) == b'{"a":null,"b":[1,2]}'
    with pytest.raises(shadow.TooLarge):
        model.encode_params({"x": "y" * 40000}, LIMITS)
    deep: dict[str, Any] = {"v": 1}
    for _ in range(8):
        deep = {"n": deep}
    with pytest.raises(shadow.TooDeep):
        model.encode_params(deep, LIMITS)
    with pytest.raises(shadow.NotAnObject):
        model.encode_params([1], LIMITS)


def test_a_record_reads_back_as_the_api_shows_it() -> None:
    record = {
        b"name": b"reboot", b"params": b'{"delay":2}', b"status": b"succeeded",
        b"created_at": b"100.000", b"sent_at": b"100.5", b"completed_at": b"101.25",
        b"attempts": b"2", b"result": b'{"ok":true}', b"timeout": b"30", b"ttl": b"60",
        b"deadline": b"130.5", b"seq": b"100000000",
    }  # fmt: skip
    command = model.Command.from_record("c1", record)
    assert command.final and command.seq == 100_000_000
    assert command.to_dict() == {
        "command_id": "c1", "name": "reboot", "params": {"delay": 2}, "status": "succeeded",
        "created_at": 100.0, "sent_at": 100.5, "completed_at": 101.25, "attempts": 2,
        "result": {"ok": True}, "error": None, "timeout": 30.0, "ttl": 60.0,
        "expires_at": 160.0, "deadline": 130.5,
    }  # fmt: skip
    queued = model.Command.from_record("c2", {b"status": b"queued", b"created_at": b"5"})
    assert not queued.final and queued.sent_at is None and queued.result is None


def test_the_result_frame() -> None:
    frame = protocol.parse_device_frame(
        '{"type":"command_result","command_id":"c1","status":"succeeded","result":{"t":1},"id":7}',
        LIMITS,
    )
    assert frame == protocol.CommandResult("c1", "succeeded", b'{"t":1}', None, 7)
    failed = protocol.parse_device_frame(
        '{"type":"command_result","command_id":"c1","status":"failed","error":"no"}', LIMITS
    )
    assert failed == protocol.CommandResult("c1", "failed", b"", "no", None)
    bare = protocol.parse_device_frame(
        '{"type":"command_result","command_id":"c1","status":"succeeded"}', LIMITS
    )
    assert isinstance(bare, protocol.CommandResult) and bare.result == b"{}"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"command_id": "a:b", "status": "succeeded"}, "invalid_frame"),
        ({"command_id": 5, "status": "succeeded"}, "invalid_frame"),
        ({"status": "succeeded"}, "invalid_frame"),
        ({"command_id": "c", "status": "done"}, "invalid_frame"),
        ({"command_id": "c", "status": "succeeded", "result": [1]}, "invalid_state"),
        ({"command_id": "c", "status": "succeeded", "result": {"x": "y" * 40000}},
         "state_too_large"),
        ({"command_id": "c", "status": "failed", "error": 5}, "invalid_frame"),
        ({"command_id": "c", "status": "failed", "error": "e" * 1025}, "invalid_frame"),
    ],
)  # fmt: skip
def test_bad_result_frames_are_refused_with_their_id(frame: dict[str, Any], code: str) -> None:
    with pytest.raises(protocol.FrameError) as refused:
        protocol.parse_device_frame(orjson.dumps({"type": "command_result", "id": "r9", **frame}),
                                    LIMITS)  # fmt: skip
    assert refused.value.code == code
    assert refused.value.request_id == "r9"


def test_answers_to_results() -> None:
    assert orjson.loads(protocol.command_ack("r1", "c1", "succeeded")) == {
        "type": "ack", "id": "r1", "command_id": "c1", "status": "succeeded"
    }  # fmt: skip
    unknown = orjson.loads(protocol.command_refused(None, "c1", None))
    assert unknown["code"] == "unknown_command" and "id" not in unknown
    finished = orjson.loads(protocol.command_refused(3, "c1", "timed_out"))
    assert finished["code"] == "command_finished" and finished["status"] == "timed_out"
    assert finished["id"] == 3


def test_the_messages_the_gateway_owns_on_a_device_channel() -> None:
    sent = b'{"type":"command","command_id":"c1","name":"n","params":{},"session":"s1"}'
    assert model.read_delivery(sent) == model.Delivery("c1", "s1")
    assert model.read_done(b'{"type":"command_done","command_id":"c1","status":"failed"}') == (
        "c1", "failed",
    )  # fmt: skip
    assert protocol.is_gateway_message(b'{ "type": "command", "command_id": "x" }')
    assert protocol.is_gateway_message(b'{"type":"command_done"}')
    assert not protocol.is_gateway_message(b'{"type":"state_update","desired_state":{}}')
    assert not protocol.is_gateway_message(b'{"type":"custom","note":"a \\"command\\""}')
    assert not protocol.is_gateway_message(b"\xff\xfe not json")
    assert model.read_delivery(b'{"type":"state_update"}') is None
    assert model.frame_deadline(b'{"command_id":"c1","deadline":12.5}') == ("c1", 12.5)
