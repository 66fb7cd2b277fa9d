"""Key names and id rules: nothing a client sends may form a foreign key or channel (§1, §2)."""

from __future__ import annotations

import inspect

import pytest

from gateway.keys import Keys, generated_admin_key, is_device_id, is_device_type

SEED_NAMES = {
    "state": "device:state:d1",
    "heartbeat": "device:heartbeat:d1",
    "online": "devices:online",
    "registered": "devices:registered",
    "presence_channel": "devices:presence",
    "commands": "device:d1:commands",
}


@pytest.mark.parametrize("value", ["a", "A-z_0.9", "x" * 128, "device-001", "..", "-"])
def test_valid_device_ids(value: str) -> None:
    assert is_device_id(value)


@pytest.mark.parametrize(
    "value",
    ["", "a:b", "a*", "a?", "a[b", "a]", "a b", "x" * 129, "a/b", "a\nb", "é", "a\x00", "{a}"],
)
def test_invalid_device_ids(value: str) -> None:
    assert not is_device_id(value)


@pytest.mark.parametrize("value", [None, 1, b"abc", ["a"]])
def test_non_strings_are_never_ids(value: object) -> None:
    assert not is_device_id(value)
    assert not is_device_type(value)


def test_device_type_length_and_charset() -> None:
    assert is_device_type("t" * 64)
    assert is_device_type("thermo.v2_x-1")
    for bad in ("", "t" * 65, "a:b", "a*", "a b", "a?", "a["):
        assert not is_device_type(bad), bad


def test_default_names_are_the_seeds() -> None:
    keys = Keys()
    assert keys.state("d1") == SEED_NAMES["state"]
    assert keys.heartbeat("d1") == SEED_NAMES["heartbeat"]
    assert keys.online == SEED_NAMES["online"]
    assert keys.registered == SEED_NAMES["registered"]
    assert keys.presence_channel == SEED_NAMES["presence_channel"]
    assert keys.commands("d1") == SEED_NAMES["commands"]
    assert keys.type_set("thermo") == "devices:type:thermo"


def _every_name(keys: Keys) -> dict[str, str]:
    """Every key or channel name Keys can produce, called with sample arguments."""
    names: dict[str, str] = {}
    for name, member in inspect.getmembers(type(keys)):
        if name.startswith("_") or name in {"expired_channel"}:
            continue
        if isinstance(member, property):
            names[name] = getattr(keys, name)
        elif inspect.isfunction(member):
            parameters = list(inspect.signature(member).parameters)
            if parameters == ["self", "device_id"]:
                names[name] = getattr(keys, name)("d1")
            elif parameters == ["self", "device_type"]:
                names[name] = getattr(keys, name)("t1")
    return names


def test_prefix_is_applied_to_every_name() -> None:
    plain, prefixed = _every_name(Keys()), _every_name(Keys("tenant1:"))
    assert plain.keys() == prefixed.keys()
    assert len(plain) >= 19, sorted(plain)
    for name, value in plain.items():
        assert prefixed[name] == "tenant1:" + value, name
    assert generated_admin_key(Keys("tenant1:")) == "tenant1:" + generated_admin_key(Keys())


def test_every_name_is_distinct() -> None:
    names = _every_name(Keys())
    assert len(set(names.values())) == len(names), names


def test_expired_channel_names_the_urls_database_without_prefix() -> None:
    assert Keys().expired_channel(3) == "__keyevent@3__:expired"
    assert Keys("p:").expired_channel(0) == "__keyevent@0__:expired"


@pytest.mark.parametrize("prefix", ["", "p:"])
def test_device_ids_round_trip_from_heartbeat_keys_and_command_channels(prefix: str) -> None:
    keys = Keys(prefix)
    assert keys.device_from_heartbeat(keys.heartbeat("dev-1.x")) == "dev-1.x"
    assert keys.device_from_commands(keys.commands("dev-1.x")) == "dev-1.x"


def test_foreign_names_yield_no_device_id() -> None:
    keys = Keys("p:")
    assert keys.device_from_heartbeat("device:heartbeat:d1") is None  # wrong prefix
    assert keys.device_from_heartbeat("p:device:heartbeat:a:b") is None
    assert keys.device_from_heartbeat("p:device:state:d1") is None
    assert keys.device_from_commands("p:device:a:b:commands") is None
    assert keys.device_from_commands("p:device:d1:other") is None
    assert keys.device_from_commands("p:device::commands") is None
