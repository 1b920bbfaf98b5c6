"""The Redis link a process's Store and Broker share (cluster/redis_link.py), on the real
cluster: whichever of them closes first, the other keeps writing, publishing and
receiving through it; the last one out closes it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from cluster.base import BackendUnavailable
from cluster.redis_broker import RedisBroker
from cluster.redis_conn import RedisConfig
from cluster.redis_link import RedisLink
from cluster.redis_store import RedisStore
from presence.messages import JoinMsg, decode_message, encode_join
from presence.meta import Meta

pytestmark = pytest.mark.redis


def meta(conn: str, note: str) -> Meta:
    return Meta.from_wire({"conn": conn, "status": "online", "device": "web", "note": note,
                           "online_at": 1, "since": 1, "seq": 1})


@dataclass
class Linked:
    """A Store and a Broker on one Redis link, as the factory makes them, started; what
    the Broker delivers goes to ``got``."""

    link: RedisLink
    store: RedisStore
    broker: RedisBroker
    got: asyncio.Queue[tuple[str, bytes]]


@contextlib.asynccontextmanager
async def linked(config: RedisConfig) -> AsyncIterator[Linked]:
    """Start a :class:`Linked` pair; both are closed at the end (closing is idempotent,
    a test may close one of them itself)."""
    link = RedisLink(config)
    store = RedisStore(config, link=link)
    broker = RedisBroker(config, link=link)
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_gap(_topics: list[str]) -> None:
        return None

    await store.start()
    await broker.start(lambda topic, payload: got.put_nowait((topic, payload)), on_gap)
    try:
        yield Linked(link, store, broker, got)
    finally:
        await store.close()
        await broker.close()


@pytest.mark.parametrize("first", ["store", "broker"])
async def test_either_may_close_first_and_the_other_goes_on(redis_cluster: str,
                                                            first: str) -> None:
    async with linked(RedisConfig(cluster=redis_cluster)) as pair:
        link, store, broker, got = pair.link, pair.store, pair.broker, pair.got
        assert store.redis is broker.redis  # one slot map, one client per master
        await broker.subscribe("team:link")
        if first == "store":
            await store.close()
            await broker.publish([("team:link", encode_join("u1", meta("c1", "a"), 1))])
            topic, payload = await asyncio.wait_for(got.get(), 5)
            msg = decode_message(payload)
            assert topic == "team:link" and isinstance(msg, JoinMsg)
            assert msg.meta.note == "a"
        else:
            await broker.close()
            written = await store.put_metas("node-a", "u1", "c1", {"team:link": meta("c1", "b")})
            assert list(written) == ["team:link"]
            presence = await store.channel_presence("team:link")
            assert [m.note for m in presence["u1"]] == ["b"]
    # The last one out closed the shared write path.
    with pytest.raises(BackendUnavailable):
        await link.batch.run([("k", ("GET", "k"))])


async def test_a_write_given_joins_publishes_each_one_it_made_and_none_it_refused(
        redis_config: RedisConfig) -> None:
    """The joins ride in the write's own script (one round trip): every channel written
    gets exactly its join on the Broker's topic, a channel whose entry is another node's
    gets none, and ``published`` tells the caller not to publish them again."""
    async with linked(redis_config) as pair:
        store, broker, got = pair.store, pair.broker, pair.got
        channels = [f"team:pub-{i}" for i in range(6)]  # several slots: several masters
        for ch in channels:
            await broker.subscribe(ch)
        joins = {ch: encode_join("u1", meta("c1", ch), 7) for ch in channels}
        written = await store.put_metas("node-a", "u1", "c1",
                                        {ch: meta("c1", ch) for ch in channels}, joins)
        assert written.published and sorted(written) == channels
        arrived = dict([await asyncio.wait_for(got.get(), 5) for _ in channels])
        assert arrived == joins
        # node-b writing the same entries (node-a's) writes nothing, so publishes nothing:
        # a marker published after it on the same topic is the next message there.
        refused = await store.put_metas("node-b", "u1", "c1", {channels[0]: meta("c1", "x")},
                                        {channels[0]: encode_join("u1", meta("c1", "x"), 8)})
        assert list(refused) == []
        marker = encode_join("u9", meta("c9", "marker"), 9)
        await broker.publish([(channels[0], marker)])
        assert await asyncio.wait_for(got.get(), 5) == (channels[0], marker)
        # Without joins the write publishes nothing and says so.
        plain = await store.put_metas("node-a", "u1", "c1", {channels[1]: meta("c1", "y")})
        assert list(plain) == [channels[1]] and not plain.published
        await broker.publish([(channels[1], marker)])
        assert await asyncio.wait_for(got.get(), 5) == (channels[1], marker)
