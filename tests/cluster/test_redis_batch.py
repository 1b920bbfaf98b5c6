"""The write batcher follows ``ASK`` and ``MOVED`` during a real slot migration.

One channel's slot is moved by hand from its master to another one, the way
``redis-cli --cluster reshard`` does it (``CLUSTER SETSLOT ... IMPORTING/MIGRATING``,
``MIGRATE`` of its keys, ``CLUSTER SETSLOT ... NODE``), while the Store keeps writing
metas to that channel: every write must succeed, and land.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from cluster import keys
from cluster.redis_conn import RedisConfig
from cluster.redis_store import RedisStore
from presence.meta import Meta
from tests.cluster.conftest import flush
from tests.fixtures.redis_cluster import HOST, ClusterControl

pytestmark = pytest.mark.redis

CH = "team:migrate"


def node(port: int) -> redis.Redis:
    return redis.Redis(HOST, port, socket_timeout=5, socket_connect_timeout=2)


def myid(port: int) -> str:
    with node(port) as c:
        value = c.execute_command("CLUSTER", "MYID")
    return value.decode() if isinstance(value, bytes) else str(value)


class Migration:
    """Moves one slot from ``src`` to ``dst`` step by step; ``finish`` always leaves
    the cluster stable (the slot on ``dst``, every key with it)."""

    def __init__(self, ctl: ClusterControl, slot: int, src: int, dst: int) -> None:
        self.ctl, self.slot, self.src, self.dst = ctl, slot, src, dst
        self.src_id, self.dst_id = myid(src), myid(dst)

    def begin(self) -> None:
        with node(self.dst) as c:
            c.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.src_id)
        with node(self.src) as c:
            c.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.dst_id)

    def move_keys(self) -> int:
        with node(self.src) as c:
            moved = 0
            while True:
                batch = c.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100)
                if not batch:
                    return moved
                c.execute_command("MIGRATE", HOST, self.dst, "", 0, 5000, "KEYS", *batch)
                moved += len(batch)

    def finish(self) -> None:
        self.move_keys()
        masters = {m for m, _r in self.ctl.slot_owners().values()} | {self.src, self.dst}
        for port in (self.dst, self.src, *sorted(masters - {self.src, self.dst})):
            with node(port) as c:
                c.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.dst_id)


@pytest.fixture
def cluster_config(redis_cluster: str) -> Iterator[RedisConfig]:
    cfg = RedisConfig(cluster=redis_cluster)
    flush(cfg)
    yield cfg


async def test_batched_writes_follow_ask_and_moved_during_a_migration(
    cluster_config: RedisConfig, redis_cluster_control: ClusterControl
) -> None:
    ctl = redis_cluster_control
    await ctl.wait_healthy()
    key = keys.channel_metas(CH)
    src = ctl.master_of(key)
    dst = ctl.other_masters(src)[0]
    migration = Migration(ctl, keys.slot(key), src, dst)
    store = RedisStore(cluster_config)
    await store.start()
    written: list[str] = []

    async def write(first: int, count: int) -> None:
        users = [f"u{i}" for i in range(first, first + count)]
        await asyncio.gather(*(
            store.put_metas("n1", u, f"c-{u}", {CH: Meta(f"c-{u}", since=1000)})
            for u in users))
        written.extend(users)

    finished = False
    try:
        await write(0, 5)  # the channel's hash exists on its master
        migration.begin()
        await write(5, 5)  # the key is still on the source: served there
        assert migration.move_keys() >= 1
        await write(10, 5)  # gone from the source: ASK, then ASKING on the target
        assert store._batch.redirected["ASK"] >= 1
        migration.finish()
        finished = True
        await write(15, 5)  # the slot is the target's now: MOVED for the stale map
        assert store._batch.redirected["MOVED"] >= 1
        presence = await store.channel_presence(CH)
        assert sorted(presence) == sorted(written)
        assert ctl.master_of(key) == dst
    finally:
        if not finished:
            migration.finish()
        await store.close()
        await ctl.wait_healthy()
