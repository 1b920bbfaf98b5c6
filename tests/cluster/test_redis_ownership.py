"""Ownership records: lost by Redis (asynchronous replication) they come back with the
next lease refresh, and concurrent writes of one meta never leave a channel entry
without one, so a node that dies is always swept completely."""

from __future__ import annotations

import asyncio

import pytest

from cluster import keys
from cluster.redis_conn import RedisConfig
from cluster.redis_store import RedisStore
from presence.codec import pack
from presence.meta import Meta

pytestmark = pytest.mark.redis


async def test_lost_ownership_is_rewritten_by_the_lease_refresh(redis_config: RedisConfig) -> None:
    store = RedisStore(redis_config)
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


async def test_interleaved_put_and_remove_leave_no_unowned_entry(redis_config: RedisConfig) -> None:
    """A re-assert (put) beside the session's own leave (remove) of one meta, in
    either order, with the ownership record cached or not: whatever the outcome, a
    channel entry always has its ownership record, so a sweep finds it."""
    store = RedisStore(redis_config)
    await store.start()
    ch, field = "team:race", keys.meta_field("u1", "c1")
    owned = pack([ch, "u1", "c1"])
    try:
        await store.refresh_lease("n1", 15, now=1000)
        for put_first in (True, False):
            for cached in (True, False):
                if cached:
                    await store.put_metas("n1", "u1", "c1", {ch: Meta("c1", since=1000)})
                else:
                    await store.remove_metas("n1", "u1", "c1", [ch], now=1000, last=True)
                put = store.put_metas("n1", "u1", "c1", {ch: Meta("c1", since=1000, seq=2)})
                remove = store.remove_metas("n1", "u1", "c1", [ch], now=1000, last=True)
                await asyncio.gather(*((put, remove) if put_first else (remove, put)))
                entry = await store.redis.command("HEXISTS", keys.channel_metas(ch), field)
                record = await store.redis.command(
                    "SISMEMBER", keys.node_metas("n1"), owned)
                case = f"put_first={put_first} cached={cached}"
                assert not int(entry) or int(record), f"unowned channel entry ({case})"
        # And so the sweep of the node leaves nothing behind.
        await store.sweep_node("n1", now=60_000)
        assert await store.channel_presence(ch) == {}
    finally:
        await store.close()
