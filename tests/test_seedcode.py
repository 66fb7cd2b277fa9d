"""The seed document's own classes run against each real engine: proves loader and fixtures."""

from __future__ import annotations

import types

import pytest
import redis

pytestmark = pytest.mark.seed


def test_seed_heartbeat_makes_a_device_online(seed: types.SimpleNamespace, redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        manager = seed.DeviceStateManager(client)
        manager.register_device("s-1", "thermo")
        manager.device_heartbeat("s-1", {"t": 1})
        state = manager.get_device_state("s-1")
    assert state is not None
    assert state.status.value == "online"
    assert state.reported_state == {"t": 1}


def test_seed_defines_the_documented_classes(seed: types.SimpleNamespace) -> None:
    for name in (
        "DeviceStatus",
        "DeviceState",
        "DeviceStateManager",
        "OfflineDetector",
        "KeyspaceOfflineDetector",
        "BulkStateQuery",
    ):
        assert hasattr(seed, name), name
