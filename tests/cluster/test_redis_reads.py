"""Reads through the Topology's command client on the real cluster: a burst of
concurrent reads (a reconnect storm's snapshots) waits for connections instead of
failing. redis-py's async cluster client raises ``MaxConnectionsError`` past 100
connections per node rather than waiting, and the storm answered ``overloaded``."""

from __future__ import annotations

import asyncio

import pytest

from cluster.redis_conn import RedisConfig, Topology

pytestmark = pytest.mark.redis


async def test_a_burst_of_reads_on_one_node_all_succeed(redis_cluster: str) -> None:
    topology = Topology(RedisConfig(cluster=redis_cluster))
    await topology.start()
    try:
        keys = [f"presence:test:{{burst}}:{i}" for i in range(400)]  # one slot
        replies = await asyncio.wait_for(
            asyncio.gather(*(topology.command("GET", k) for k in keys),
                           return_exceptions=True), 30)
        failed = [r for r in replies if isinstance(r, BaseException)]
        assert failed == []
    finally:
        await topology.close()
