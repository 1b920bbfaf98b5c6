"""Redis Cluster failures: a master killed (its replica promoted), a shard frozen.

Each test leaves the shared cluster with six healthy nodes again (roles may differ).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from cluster import keys
from cluster.base import BackendUnavailable
from cluster.redis_broker import RedisBroker
from cluster.redis_conn import RedisConfig
from cluster.redis_store import RedisStore
from presence.meta import Meta
from tests.cluster.test_contract import Inbox
from tests.fixtures.redis_cluster import ClusterControl

pytestmark = pytest.mark.redis
T = TypeVar("T")


def topics_by_master(ctl: ClusterControl, count: int = 40) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for i in range(count):
        t = f"team:f{i}"
        out.setdefault(ctl.master_of(keys.topic(t)), []).append(t)
    return out


async def eventually(fn: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Retry ``fn`` until it stops raising BackendUnavailable (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)  # a retry period against an external process


@pytest.fixture
async def ctl(redis_cluster_control: ClusterControl) -> AsyncIterator[ClusterControl]:
    await redis_cluster_control.wait_healthy()
    try:
        yield redis_cluster_control
    finally:
        await redis_cluster_control.restore()


def config(ctl: ClusterControl) -> RedisConfig:
    return RedisConfig(cluster=ctl.startup_nodes, socket_timeout=1.0, connect_timeout=1.0,
                       op_timeout=3.0)


async def test_master_killed_broker_and_store_recover(ctl: ClusterControl) -> None:
    by_master = topics_by_master(ctl)
    victim_port, victim_topics = next(iter(sorted(by_master.items())))
    victim = victim_topics[0]
    others = [ts[0] for port, ts in by_master.items() if port != victim_port]
    broker = RedisBroker(config(ctl))
    store = RedisStore(config(ctl))
    inbox = Inbox()
    await broker.start(inbox.on_message, inbox.on_gap)
    await store.start()
    try:
        for t in [victim, *others]:
            await broker.subscribe(t)
        await broker.publish([(t, b"warm") for t in [victim, *others]])
        await inbox.until(lambda: len(inbox.got) == 1 + len(others))

        killed_at = time.monotonic()
        ctl.kill(victim_port)
        # The other masters' topics keep flowing.
        await broker.publish([(t, b"during") for t in others])
        await inbox.until(lambda: all(inbox.of(t) == [b"warm", b"during"] for t in others))

        await ctl.wait_promoted(keys.topic(victim), victim_port, timeout=20)
        await inbox.until(lambda: any(victim in g for g in inbox.gaps), timeout=30)
        assert time.monotonic() - killed_at < 30
        assert all(t not in g for g in inbox.gaps for t in others)

        await eventually(lambda: broker.publish([(victim, b"after")]), timeout=10)
        await inbox.until(lambda: inbox.of(victim)[-1:] == [b"after"])
        await broker.publish([(t, b"after") for t in others])
        await inbox.until(lambda: all(inbox.of(t)[-1:] == [b"after"] for t in others))

        m = Meta("c1", "online", "web", "", 1, 1)
        await eventually(lambda: store.put_metas("n1", "u1", "c1", {victim: m}), timeout=10)
        assert await store.channel_presence(victim) == {"u1": [m]}
        deadline = time.monotonic() + 10
        while not (await broker.healthy() and await store.healthy()):
            assert time.monotonic() < deadline, "not healthy after the failover"
            await asyncio.sleep(0.2)
    finally:
        await broker.close()
        await store.close()


async def test_frozen_shard_is_unavailable_then_recovers(ctl: ClusterControl) -> None:
    by_master = topics_by_master(ctl)
    port, topics = next(iter(sorted(by_master.items())))
    topic = topics[0]
    replica = ctl.replica_of(port)
    broker = RedisBroker(config(ctl))
    store = RedisStore(config(ctl))
    inbox = Inbox()
    await broker.start(inbox.on_message, inbox.on_gap)
    await store.start()
    try:
        await broker.subscribe(topic)
        assert await broker.healthy() and await store.healthy()
        ctl.pause(port)
        ctl.pause(replica)  # no replica to promote: the shard stays down

        started = time.monotonic()
        assert not await store.healthy()
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await store.channel_presence(topic)
        with pytest.raises(BackendUnavailable):
            await broker.publish([(topic, b"lost")])
        assert time.monotonic() - started < 10  # bounded, never a hang
        assert not await broker.healthy()

        ctl.resume(port)
        ctl.resume(replica)  # it may still win an election: either outcome is fine
        await ctl.wait_healthy(timeout=30)
        await eventually(lambda: store.channel_presence(topic), timeout=10)
        await inbox.until(lambda: any(topic in g for g in inbox.gaps), timeout=20)
        # At most once while the shard settles (a demoted master may still take a
        # publish): publish until one arrives, bounded.
        deadline = time.monotonic() + 15
        n = 0
        while not any(p.startswith(b"back") for p in inbox.of(topic)):
            assert time.monotonic() < deadline, (inbox.got, inbox.gaps)
            n += 1
            with contextlib.suppress(BackendUnavailable):
                await broker.publish([(topic, b"back%d" % n)])
            with contextlib.suppress(TimeoutError):
                await inbox.until(lambda: bool(inbox.of(topic)), timeout=1)
    finally:
        await broker.close()
        await store.close()
