"""Key names and id rules: nothing a client sends may form a foreign key or channel (§1, §2)."""

from __future__ import annotations

import inspect

import pytest
from redis.crc import key_slot

from gateway.keys import (
    Keys,
    Schema,
    generated_admin_key,
    is_device_id,
    is_device_type,
    spread_tags,
)

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


def _names_of(target: object, device_id: str = "d1") -> dict[str, str]:
    """Every name an object's properties and one-argument methods produce, with sample ids."""
    names: dict[str, str] = {}
    for name, member in inspect.getmembers(type(target)):
        if name.startswith("_") or name in {"expired_channel", "fields", "sharded", "parts"}:
            continue
        if isinstance(member, property):
            value = getattr(target, name)
            if isinstance(value, str):
                names[name] = value
        elif inspect.isfunction(member):
            parameters = list(inspect.signature(member).parameters)
            if parameters == ["self", "device_id"] and name != "partition":
                names[name] = getattr(target, name)(device_id)
            elif parameters == ["self", "device_type"]:
                names[name] = getattr(target, name)("t1")
            elif parameters == ["self", "process"]:
                names[name] = getattr(target, name)("proc1")
    return names


DEVICE_NAMES = ("state", "heartbeat", "history", "commands")


def _every_name(keys: Keys, device_id: str = "d1") -> dict[str, str]:
    names = {f"device.{name}": getattr(keys, name)(device_id) for name in DEVICE_NAMES}
    for part in keys.parts:
        names |= {f"{part.number}.{k}": v for k, v in _names_of(part).items()}
    return names


@pytest.mark.parametrize("schema", ["python", "node", "cluster"])
def test_prefix_is_applied_to_every_name(schema: Schema) -> None:
    partitions = 4 if schema == "cluster" else 1
    plain = _every_name(Keys("", schema, partitions))
    prefixed = _every_name(Keys("tenant1:", schema, partitions))
    assert plain.keys() == prefixed.keys()
    assert len(plain) >= 19, sorted(plain)
    for name, value in plain.items():
        assert prefixed[name] == "tenant1:" + value, name
    assert generated_admin_key(Keys("tenant1:")) == "tenant1:" + generated_admin_key(Keys())


@pytest.mark.parametrize("schema", ["python", "node", "cluster"])
def test_every_name_is_distinct(schema: Schema) -> None:
    names = _every_name(Keys("", schema, 4 if schema == "cluster" else 1))
    assert len(set(names.values())) == len(names), names


def test_node_layout_has_the_same_keys_and_the_node_classes_fields() -> None:
    assert _every_name(Keys(schema="node")) == _every_name(Keys())
    fields = Keys(schema="node").fields
    assert (fields.device_id, fields.last_seen, fields.reported, fields.millis) == (
        "deviceId", "lastSeen", "reportedState", True,
    )  # fmt: skip
    assert Keys().fields.section("desired") == "desired_state"


def test_cluster_layout_keeps_a_devices_keys_and_its_partition_in_one_slot() -> None:
    keys = Keys.cluster(partitions=64)
    for device_id in ("sensor-1", "a", "x" * 128, "dev.42_b-c"):
        part = keys.of(device_id)
        slots = {key_slot(name.encode()) for name in _names_of(part).values()}
        slots |= {
            key_slot(keys.state(device_id).encode()),
            key_slot(keys.heartbeat(device_id).encode()),
        }
        slots |= {
            key_slot(keys.history(device_id).encode()),
            key_slot(keys.commands(device_id).encode()),
        }
        assert len(slots) == 1, device_id


def test_cluster_partitions_spread_evenly_over_equal_slot_ranges() -> None:
    for partitions in (16, 64, 256):
        slots = [key_slot(part.base.encode()) for part in Keys.cluster(partitions=partitions).parts]
        for primaries in (3, 4, 6):
            per_primary = [0] * primaries
            for slot in slots:
                per_primary[slot * primaries // 16384] += 1
            assert max(per_primary) - min(per_primary) <= 1, (partitions, primaries, per_primary)
    assert spread_tags(64) == spread_tags(64)  # stable: part of the data layout
    assert Keys.cluster(partitions=64).partition("sensor-1") == 19


def test_devices_spread_over_partitions() -> None:
    keys = Keys.cluster(partitions=64)
    counts = [0] * 64
    for n in range(64_000):
        counts[keys.partition(f"device-{n:06d}")] += 1
    assert max(counts) < 1.1 * 1000 and min(counts) > 0.9 * 1000


def test_fleet_names_need_a_partition_on_the_cluster() -> None:
    with pytest.raises(ValueError, match="needs a partition"):
        _ = Keys.cluster(partitions=4).online
    assert Keys().online == "devices:online"


@pytest.mark.parametrize("prefix", ["a b", "{x}", "p*", "x" * 65])
def test_prefixes_that_could_break_a_name_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Keys(prefix)


def test_expired_channel_names_the_urls_database_without_prefix() -> None:
    assert Keys().expired_channel(3) == "__keyevent@3__:expired"
    assert Keys("p:").expired_channel(0) == "__keyevent@0__:expired"


@pytest.mark.parametrize("prefix", ["", "p:"])
@pytest.mark.parametrize("schema", ["python", "cluster"])
def test_device_ids_round_trip_from_heartbeat_keys_and_command_channels(
    prefix: str, schema: Schema
) -> None:
    keys = Keys(prefix, schema, 64 if schema == "cluster" else 1)
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


def test_foreign_names_yield_no_device_id_on_the_cluster() -> None:
    keys = Keys.cluster(partitions=64)
    name = keys.heartbeat("d1")
    assert keys.device_from_heartbeat(name) == "d1"
    assert keys.device_from_heartbeat("device:heartbeat:d1") is None  # no tag
    assert keys.device_from_heartbeat("{zz}device:heartbeat:d1") is None  # another partition's
    assert keys.device_from_commands(keys.commands("d1").replace("d1", "a:b")) is None
