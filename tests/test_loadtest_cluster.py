"""`--cluster` load tests: what the command line accepts, how deliveries are accounted, and the
count of the Redis connections a process holds on each node of a real local cluster.

No load run here: the runs themselves are the lead's (`python -m loadtest moonshot --cluster`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from loadtest.cli import build_parser, options_from
from loadtest.localcluster import RunCluster
from loadtest.options import Options
from loadtest.producers import Delivery, delivery


def options(*argv: str) -> Options:
    return options_from(build_parser().parse_args(list(argv)), list(argv))


def refusal(*argv: str) -> str:
    with pytest.raises(SystemExit) as refused:
        options(*argv)
    return str(refused.value)


@pytest.mark.unit
def test_a_cluster_moonshot_with_a_kill_is_filed_beside_the_single_node_one() -> None:
    opts = options("moonshot", "--cluster", "--devices", "2000", "--duration", "60",
                   "--kill-primary-at", "20")  # fmt: skip
    assert (opts.cluster, opts.kill_primary_at, opts.start_gateways) == (True, 20.0, 7)
    assert opts.result_name == "moonshot-cluster"
    single = options("moonshot", "--devices", "2000")
    assert (single.cluster, single.kill_primary_at, single.result_name) == (
        False, None, "moonshot",
    )  # fmt: skip


@pytest.mark.unit
def test_cluster_options_are_refused_where_they_cannot_be_honoured() -> None:
    assert "fanout" in refusal("fanout", "--cluster")
    assert "--redis-url" in refusal("soak", "--cluster", "--redis-url", "redis://127.0.0.1:7000")
    assert "needs --cluster" in refusal("moonshot", "--kill-primary-at", "20")
    assert "not idle" in refusal("idle", "--cluster", "--kill-primary-at", "1")
    assert "inside the measured phase" in refusal(
        "moonshot", "--cluster", "--duration", "60", "--kill-primary-at", "60"
    )


@pytest.mark.unit
def test_a_change_is_missing_only_when_neither_it_nor_a_later_one_reached_its_device() -> None:
    # change k goes to device k % 2: device 0 gets 0, 2, 4; device 1 gets 1, 3, 5
    received = {0, 1, 3, 4}
    assert delivery([0, 1, 2, 3, 4, 5], received, devices=2) == Delivery([5], 1)
    assert delivery([0, 1, 3, 4], received, devices=2) == Delivery([], 0)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[RunCluster]:
    valkey = RunCluster(tmp_path / "cluster", replicas=0)
    await valkey.start()
    try:
        yield valkey
    finally:
        await valkey.stop()


async def test_connections_are_counted_per_node_from_the_servers_client_lists(
    cluster: RunCluster,
) -> None:
    first, second, third = cluster.local.nodes
    commands = [
        aioredis.Redis(host="127.0.0.1", port=first.port),
        aioredis.Redis(host="127.0.0.1", port=first.port),
    ]
    listener = aioredis.Redis(host="127.0.0.1", port=second.port)
    pubsub = listener.pubsub()
    try:
        await asyncio.gather(*(client.ping() for client in commands))
        await pubsub.subscribe("a-channel")
        held = (await cluster.connections({"this test": os.getpid()}))["this test"]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        for client in (*commands, listener):
            await client.aclose()
    assert held.per_node == {first.address: 2, second.address: 1, third.address: 0}
    assert held.pubsub_per_node == {first.address: 0, second.address: 1, third.address: 0}
    assert (held.total, held.pubsub) == (3, 1)
