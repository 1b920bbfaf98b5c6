"""Ownership records lost by Redis (asynchronous replication) come back with the next
lease refresh, so a node that dies afterwards is still swept completely."""

from __future__ import annotations

import pytest

from cluster import keys
from cluster.redis_conn import RedisConfig
from cluster.redis_store import RedisStore
from presence.meta import Meta

pytestmark = pytest.mark.redis


@pytest.fixture(params=["redis-cluster", "redis-single"])
def config(request: pytest.FixtureRequest) -> RedisConfig:
    from tests.cluster.conftest import flush

    if request.param == "redis-cluster":
        cfg = RedisConfig(cluster=request.getfixturevalue("redis_cluster"))
    else:
        cfg = RedisConfig(url=request.getfixturevalue("redis_single"))
    flush(cfg)
    return cfg


async def test_lost_ownership_is_rewritten_by_the_lease_refresh(config: RedisConfig) -> None:
    store = RedisStore(config)
    await store.start()
    try:
        await store.refresh_lease("n1", 15, now=1000)
        await store.put_metas("n1", "u1", "c1", {"team:a": Meta("c1", since=1000)})
        # An update of an owned meta does not write the ownership record again ...
        await store.put_metas("n1", "u1", "c1", {"team:a": Meta("c1", since=1000, seq=2)})
        # ... so if a failover lost it, only the lease refresh brings it back.
        await store.redis.command("DEL", keys.node_metas("n1"))
        await store.refresh_lease("n1", 15, now=2000)
        assert await store.dead_nodes(now=60_000) == ["n1"]
        swept = await store.sweep_node("n1", now=60_000)
        assert swept is not None and [(s.ch, s.user, s.conn) for s in swept] == [
            ("team:a", "u1", "c1")]
        assert await store.channel_presence("team:a") == {}
    finally:
        await store.close()
