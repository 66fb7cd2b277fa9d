"""The device hub with small real sessions: replacement, command and kick delivery, re-sync."""

from __future__ import annotations

import time

import orjson
import pytest

from gateway import disconnect, shadow
from gateway.hub import DeviceHub, LiveSession

pytestmark = pytest.mark.unit


class WriterState:
    def __init__(self) -> None:
        self.closed = False


class Session:
    """A session as the hub sees it (`LiveSession`), recording what the hub does to it."""

    def __init__(self, device_id: str, session: str, desired: shadow.Document | None = None):
        self.device_id = device_id
        self.session = session
        self.desired: shadow.Document = desired or {}
        self.desired_seen = 0
        self.last_activity = time.time()
        self.writer = WriterState()
        self.commands: list[bytes] = []
        self.closes: list[disconnect.Close] = []

    def deliver_command(self, data: bytes, received: float | None = None) -> None:
        self.commands.append(data)

    def close(self, close: disconnect.Close) -> None:
        self.closes.append(close)
        self.writer.closed = True


def live(device_id: str, session: str, desired: shadow.Document | None = None) -> Session:
    made = Session(device_id, session, desired)
    checked: LiveSession = made  # the hub's Protocol: a missing member fails mypy here
    assert checked is made
    return made


def kick(device_id: str, session: str, reason: str) -> bytes:
    return orjson.dumps(
        {"op": "kick", "device_id": device_id, "session": session, "reason": reason}
    )


def test_a_replaced_session_is_closed_with_4409_and_the_new_one_receives_the_commands() -> None:
    hub = DeviceHub()
    old, new = live("d1", "s-old"), live("d1", "s-new")
    hub.add(old)
    hub.add(new)
    assert [c.code for c in old.closes] == [4409]
    assert new.closes == []
    hub.on_command("d1", b'{"type":"state_update"}')
    assert new.commands == [b'{"type":"state_update"}']
    assert old.commands == []
    assert len(hub) == 1


def test_adding_the_same_session_again_does_not_close_it() -> None:
    hub = DeviceHub()
    session = live("d1", "s1")
    hub.add(session)
    hub.add(session)
    assert session.closes == []


def test_the_replaced_session_ending_leaves_the_new_one_in_place() -> None:
    hub = DeviceHub()
    old, new = live("d1", "s-old"), live("d1", "s-new")
    hub.add(old)
    hub.add(new)
    assert not hub.remove(old)  # so its endpoint must not unsubscribe the device
    hub.on_command("d1", b"after")
    assert new.commands == [b"after"]
    assert hub.remove(new)
    assert len(hub) == 0


def test_a_command_for_an_unknown_device_is_dropped() -> None:
    hub = DeviceHub()
    here = live("d1", "s1")
    hub.add(here)
    hub.on_command("elsewhere", b"x")
    assert here.commands == []


def test_a_kick_closes_the_named_session_with_the_close_of_its_reason() -> None:
    hub = DeviceHub()
    current = live("d1", "s2")
    hub.add(current)
    hub.on_control(kick("d1", "s2", "deleted"))
    assert current.closes == [disconnect.DELETED]


def test_a_kick_for_an_old_session_is_ignored() -> None:
    hub = DeviceHub()
    current = live("d1", "s2")
    hub.add(current)
    hub.on_control(kick("d1", "s1", "replaced"))  # s1 was on another process, or is long gone
    assert current.closes == []


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b'["kick"]',
        orjson.dumps({"op": "other", "device_id": "d1", "session": "s1", "reason": "deleted"}),
        orjson.dumps({"op": "kick", "device_id": "d2", "session": "s1", "reason": "deleted"}),
    ],
)
def test_control_messages_that_are_not_a_kick_of_a_live_session_change_nothing(
    data: bytes,
) -> None:
    hub = DeviceHub()
    session = live("d1", "s1")
    hub.add(session)
    hub.on_control(data)
    assert session.closes == []


def test_a_kick_with_an_unknown_reason_closes_as_a_policy_violation() -> None:
    hub = DeviceHub()
    session = live("d1", "s1")
    hub.add(session)
    hub.on_control(kick("d1", "s1", "no such reason"))
    assert session.closes == [disconnect.POLICY]


def test_stale_closes_only_the_named_session_replaced_or_deleted_by_code() -> None:
    hub = DeviceHub()
    a, b = live("a", "sa"), live("b", "sb")
    hub.add(a)
    hub.add(b)
    hub.stale("a", "some older session", -1)
    assert a.closes == []
    hub.stale("a", "sa", -1)
    hub.stale("b", "sb", 0)
    assert a.closes == [disconnect.REPLACED]
    assert b.closes == [disconnect.DELETED]


def test_only_an_open_recently_active_session_counts_as_active() -> None:
    hub = DeviceHub(heartbeat_timeout=10.0)
    fresh, silent, closed = live("fresh", "s1"), live("silent", "s2"), live("closed", "s3")
    silent.last_activity = time.time() - 9.5  # inside the timeout, past the active window
    closed.close(disconnect.NORMAL)
    for session in (fresh, silent, closed):
        hub.add(session)
    assert hub.active_session("fresh") == ("s1", fresh.last_activity)
    assert hub.active_session("silent") is None
    assert hub.active_session("closed") is None
    assert hub.active_session("unknown") is None


def test_resync_targets_are_the_local_sessions_among_the_devices_named() -> None:
    hub = DeviceHub()
    a, b = live("a", "s"), live("b", "s")
    hub.add(a)
    hub.add(b)
    assert hub.resync_targets(["b", "not-here"]) == [b]
    assert sorted(s.device_id for s in hub.resync_targets(None)) == ["a", "b"]


def test_resync_sends_the_desired_state_only_when_it_moved() -> None:
    session = live("d1", "s1", desired={"mode": "eco", "level": 1})
    assert not DeviceHub.resync_one(session, b'{"level":1.0,"mode":"eco"}', 7)
    assert session.commands == []
    assert DeviceHub.resync_one(session, b'{"mode":"boost","level":1}', 8)
    assert [orjson.loads(c) for c in session.commands] == [
        {
            "type": "state_update",
            "desired_state": {"mode": "boost", "level": 1},
            "version": 8,
            "resync": True,
        }
    ]


def test_resync_sends_nothing_when_a_state_came_after_its_read() -> None:
    session = live("d1", "s1", desired={"a": 1})
    seen = session.desired_seen  # noted before the read
    session.desired, session.desired_seen = {"a": 1, "b": 2}, seen + 1  # published after it
    assert not DeviceHub.resync_one(session, b'{"a":1}', 8, seen)
    assert session.commands == []
    assert DeviceHub.resync_one(session, b'{"a":1}', 8, seen + 1)  # none since: compared


def test_resync_compares_json_values_not_python_ones() -> None:
    session = live("d1", "s1", desired={"on": 1})
    assert DeviceHub.resync_one(session, b'{"on":true}', 2)  # true is not 1 in JSON


def test_resync_treats_a_missing_desired_state_as_empty() -> None:
    cleared = live("d1", "s1", desired={"mode": "eco"})
    assert DeviceHub.resync_one(cleared, None, 3)
    assert orjson.loads(cleared.commands[0])["desired_state"] == {}
    empty = live("d2", "s1")
    assert not DeviceHub.resync_one(empty, None, 3)
