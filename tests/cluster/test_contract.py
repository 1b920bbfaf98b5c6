"""One contract suite for every Broker/Store backend: memory, Redis Cluster, plain Redis.

Each test gets a :class:`Backend` that makes brokers ("nodes") and stores sharing one
backend; Redis backends are flushed before each test. Times are fake ``now`` values.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from cluster.base import RESUMED_ELSEWHERE, SWEEP_CLAIM_MS, Adopted, Broker, Store, SweptMeta
from cluster.memory import MemoryBroker, MemoryBus, MemoryStore
from cluster.redis_broker import RedisBroker
from cluster.redis_conn import RedisConfig
from cluster.redis_store import RedisStore
from presence.churn import ChurnRecord, snapshot_order
from presence.meta import Meta

WAIT = 10.0
DAY = 86_400_000


class Inbox:
    """Collects (topic, payload) and gap calls; waits on them with a deadline."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.gaps: list[list[str]] = []
        self._changed = asyncio.Event()

    def on_message(self, topic: str, payload: bytes) -> None:
        self.got.append((topic, payload))
        self._changed.set()

    async def on_gap(self, topics: Sequence[str]) -> None:
        self.gaps.append(list(topics))
        self._changed.set()

    def of(self, topic: str) -> list[bytes]:
        return [p for t, p in self.got if t == topic]

    async def until(self, pred: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self._changed.clear()
                await self._changed.wait()


class Backend:
    """Makes brokers and stores on one shared backend and closes them at the end."""

    def __init__(self, kind: str, config: RedisConfig | None) -> None:
        self.kind = kind
        self.config = config
        self.bus = MemoryBus()
        self.memory_store = MemoryStore()
        self._closers: list[Callable[[], Any]] = []

    async def broker(self, inbox: Inbox | None = None) -> tuple[Broker, Inbox]:
        inbox = inbox or Inbox()
        b: Broker = MemoryBroker(self.bus) if self.config is None else RedisBroker(self.config)
        await b.start(inbox.on_message, inbox.on_gap)
        self._closers.append(b.close)
        return b, inbox

    async def store(self) -> Store:
        if self.config is None:
            return self.memory_store
        s = RedisStore(self.config)
        await s.start()
        self._closers.append(s.close)
        return s

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()


@pytest.fixture
async def backend(backend_config: tuple[str, RedisConfig | None]) -> AsyncIterator[Backend]:
    b = Backend(*backend_config)
    try:
        yield b
    finally:
        await b.close()


def meta(conn: str, status: str = "online", seq: int = 1, since: int = 1000) -> Meta:
    return Meta(conn=conn, status=status, device="web", note="", since=since, seq=seq)


# -- Broker ------------------------------------------------------------------------
async def test_self_delivery_and_per_topic_order(backend: Backend) -> None:
    b, inbox = await backend.broker()
    await b.subscribe("team:a")
    await b.subscribe("team:b")
    sent_a = [f"a{i}".encode() for i in range(100)]
    sent_b = [f"b{i}".encode() for i in range(100)]
    await b.publish([("team:a", p) for p in sent_a[:50]])
    # Concurrent single publishes of one loop turn are batched: order must hold.
    await asyncio.gather(*(b.publish([("team:a", a), ("team:b", bb)])
                           for a, bb in zip(sent_a[50:], sent_b[:50], strict=True)))
    for p in sent_b[50:]:
        await b.publish([("team:b", p)])
    await inbox.until(lambda: len(inbox.got) == 200)
    assert inbox.of("team:a") == sent_a
    assert inbox.of("team:b") == sent_b
    assert await b.healthy()


async def test_order_across_many_topics(backend: Backend) -> None:
    b, inbox = await backend.broker()
    topics = [f"team:w{i}" for i in range(24)]  # spread over every master's slots
    for t in topics:
        await b.subscribe(t)
    await asyncio.gather(*(b.publish([(t, str(i).encode()) for t in topics])
                           for i in range(20)))
    await inbox.until(lambda: len(inbox.got) == 24 * 20)
    for t in topics:
        assert inbox.of(t) == [str(i).encode() for i in range(20)]


async def test_subscribe_twice_is_a_noop(backend: Backend) -> None:
    b, inbox = await backend.broker()
    await b.subscribe("team:x")
    await asyncio.gather(b.subscribe("team:x"), b.subscribe("team:x"))
    await b.publish([("team:x", b"1"), ("team:x", b"end")])
    await inbox.until(lambda: (("team:x", b"end") in inbox.got))
    assert inbox.of("team:x") == [b"1", b"end"]


async def test_unsubscribe_stops_delivery(backend: Backend) -> None:
    b, inbox = await backend.broker()
    await b.subscribe("team:gone")
    await b.subscribe("team:kept")
    await b.publish([("team:gone", b"before")])
    await inbox.until(lambda: inbox.of("team:gone") == [b"before"])
    await b.unsubscribe("team:gone")
    await b.unsubscribe("team:never")  # unknown: ignored
    await b.publish([("team:gone", b"after"), ("team:kept", b"sentinel")])
    await inbox.until(lambda: inbox.of("team:kept") == [b"sentinel"])
    assert inbox.of("team:gone") == [b"before"]
    # and it can come back
    await b.subscribe("team:gone")
    await b.publish([("team:gone", b"again")])
    await inbox.until(lambda: inbox.of("team:gone") == [b"before", b"again"])


async def test_two_nodes_see_each_other(backend: Backend) -> None:
    b1, in1 = await backend.broker()
    b2, in2 = await backend.broker()
    await b1.subscribe("team:shared")
    await b2.subscribe("team:shared")
    await b2.subscribe("team:only2")
    await b1.publish([("team:shared", b"from1"), ("team:only2", b"x")])
    await b2.publish([("team:shared", b"from2")])
    await in1.until(lambda: len(in1.of("team:shared")) == 2)
    await in2.until(lambda: len(in2.of("team:shared")) == 2 and in2.of("team:only2") == [b"x"])
    assert in1.of("team:shared")[0] == b"from1"
    assert set(in2.of("team:shared")) == {b"from1", b"from2"}
    assert in1.of("team:only2") == []


async def test_close_is_idempotent(backend: Backend) -> None:
    b, _ = await backend.broker()
    await b.subscribe("team:c")
    await b.close()
    await b.close()



async def test_joins_given_to_a_write_arrive_once_whoever_publishes_them(
        backend: Backend) -> None:
    """A store that publishes the joins of its writes (Redis: from the write's script)
    says so with ``published``; one that does not leaves them to the caller. Either
    way each member of the channel receives the join exactly once."""
    b, inbox = await backend.broker()
    s = await backend.store()
    await b.subscribe("team:joins")
    join = b"join-of-c1"
    written = await s.put_metas("n1", "u1", "c1", {"team:joins": meta("c1")},
                                {"team:joins": join})
    assert list(written) == ["team:joins"]
    assert written.published == (backend.kind != "memory")
    if not written.published:
        await b.publish([("team:joins", join)])
    await b.publish([("team:joins", b"marker")])
    await inbox.until(lambda: b"marker" in inbox.of("team:joins"))
    assert inbox.of("team:joins") == [join, b"marker"]


# -- Store: metas ------------------------------------------------------------------
async def test_put_and_remove_metas(backend: Backend) -> None:
    s = await backend.store()
    await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1"), "team:b": meta("c1")})
    await s.put_metas("n2", "u1", "c2", {"team:a": meta("c2", "busy")})
    await s.put_metas("n2", "u2", "c3", {"team:a": meta("c3", "away")})
    pres = await s.channel_presence("team:a")
    assert {u: sorted(m, key=lambda x: x.conn) for u, m in pres.items()} == {
        "u1": [meta("c1"), meta("c2", "busy")], "u2": [meta("c3", "away")]}
    # replacing a meta
    await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1", "away", seq=2)})
    pres = await s.channel_presence("team:a")
    assert sorted(pres["u1"], key=lambda x: x.conn)[0] == meta("c1", "away", seq=2)
    await s.remove_metas("n1", "u1", "c1", ["team:a"], now=5000, last=False)
    pres = await s.channel_presence("team:a")
    assert [m.conn for m in pres["u1"]] == ["c2"]
    assert (await s.channel_presence("team:b"))["u1"] == [meta("c1")]
    await s.remove_metas("n1", "u1", "c1", ["team:b"], now=5000, last=True)
    assert await s.channel_presence("team:b") == {}
    assert await s.channel_presence("team:nobody") == {}


async def test_user_presence_and_last_seen(backend: Backend) -> None:
    s = await backend.store()
    await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1"), "team:b": meta("c1", "busy")})
    await s.put_metas("n1", "u1", "c2", {"team:a": meta("c2", "away")})
    got = await s.user_presence(["u1", "ghost"])
    assert sorted(got["u1"].metas, key=lambda m: m.conn) == [meta("c1", "busy"),
                                                            meta("c2", "away")]
    assert got["u1"].last_seen is None
    assert got["ghost"].metas == () and got["ghost"].last_seen is None
    await s.remove_metas("n1", "u1", "c1", ["team:a", "team:b"], now=7000, last=True)
    got = await s.user_presence(["u1"])
    assert got["u1"].metas == (meta("c2", "away"),)
    assert got["u1"].last_seen == 7000
    await s.remove_metas("n1", "u1", "c2", ["team:a"], now=8000, last=True)
    got = await s.user_presence(["u1"])
    assert got["u1"].metas == () and got["u1"].last_seen == 8000
    assert await s.user_presence([]) == {}


async def test_connection_counts_across_nodes(backend: Backend) -> None:
    s1 = await backend.store()
    s2 = await backend.store()
    assert await s1.add_connection("n1", "u1", "c1") == 1
    assert await s2.add_connection("n2", "u1", "c2") == 2
    assert await s1.add_connection("n1", "u1", "c3") == 3
    assert await s2.add_connection("n2", "u2", "c4") == 1
    await s1.remove_connection("n1", "u1", "c1")
    await s1.remove_connection("n1", "u1", "nope")
    assert await s2.add_connection("n2", "u1", "c5") == 3


# -- Store: leases and sweeping ------------------------------------------------------
async def test_leases_and_dead_nodes(backend: Backend) -> None:
    s = await backend.store()
    await s.refresh_lease("n1", 15, now=1000)
    await s.refresh_lease("n2", 15, now=1000)
    await s.refresh_lease("idle", 15, now=1000)  # owns nothing: never reported
    await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1")})
    await s.add_connection("n2", "u2", "c2")
    await s.put_metas("nolease", "u3", "c3", {"team:a": meta("c3")})
    assert await s.dead_nodes(now=2000) == ["nolease"]
    assert await s.dead_nodes(now=20_000) == ["n1", "n2", "nolease"]
    await s.refresh_lease("n1", 15, now=10_000)
    assert await s.dead_nodes(now=20_000) == ["n2", "nolease"]
    # a clean stop: metas and connections removed, then the lease dropped
    await s.remove_metas("n1", "u1", "c1", ["team:a"], now=21_000, last=True)
    await s.drop_lease("n1")
    assert await s.dead_nodes(now=30_000) == ["n2", "nolease"]
    # dropping the lease of a node that still owns state makes it dead at once
    await s.refresh_lease("n3", 15, now=30_000)
    await s.add_connection("n3", "u4", "c4")
    assert "n3" not in await s.dead_nodes(now=31_000)
    await s.drop_lease("n3")
    assert "n3" in await s.dead_nodes(now=31_000)


async def test_live_nodes_report_connections(backend: Backend) -> None:
    s = await backend.store()
    await s.refresh_lease("a", 15, now=1000, connections=7)
    await s.refresh_lease("b", 15, now=1000, connections=3)
    await s.refresh_lease("c", 1, now=1000)
    assert await s.live_nodes(now=1500) == {"a": 7, "b": 3, "c": 0}
    assert await s.live_nodes(now=5000) == {"a": 7, "b": 3}
    await s.refresh_lease("a", 15, now=5000, connections=9)
    await s.drop_lease("b")
    assert await s.live_nodes(now=6000) == {"a": 9}
    assert await s.live_nodes(now=30_000) == {}


async def test_sweep_node_exactly_once(backend: Backend) -> None:
    stores = [await backend.store() for _ in range(3)]
    s = stores[0]
    await s.refresh_lease("dead", 15, now=1000)
    await s.refresh_lease("live", 15, now=1000)
    await s.add_connection("dead", "u1", "d1")
    await s.add_connection("dead", "u2", "d2")
    await s.add_connection("live", "u1", "l1")
    await s.put_metas("dead", "u1", "d1", {"team:a": meta("d1"), "team:b": meta("d1")})
    await s.put_metas("dead", "u2", "d2", {"team:a": meta("d2")})
    await s.put_metas("live", "u1", "l1", {"team:a": meta("l1")})
    await s.refresh_lease("live", 15, now=20_000)
    assert await s.dead_nodes(now=20_000) == ["dead"]
    # alive: nobody may sweep it
    assert await s.sweep_node("live", now=20_000) is None
    results = await asyncio.gather(*(st.sweep_node("dead", now=20_000) for st in stores))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert sorted(winners[0], key=lambda m: (m.ch, m.user, m.conn)) == [
        SweptMeta("team:a", "u1", "d1"), SweptMeta("team:a", "u2", "d2"),
        SweptMeta("team:b", "u1", "d1")]
    assert await s.sweep_node("dead", now=21_000) is None
    assert await s.dead_nodes(now=21_000) == []
    pres = await s.channel_presence("team:a")
    assert list(pres) == ["u1"] and [m.conn for m in pres["u1"]] == ["l1"]
    assert await s.channel_presence("team:b") == {}
    # A dead node's connections count as lost from its last lease refresh (1000).
    assert {m.last_seen for m in winners[0]} == {1000}
    users = await s.user_presence(["u1", "u2"])
    assert users["u1"].metas == (meta("l1"),) and users["u1"].last_seen == 1000
    assert users["u2"].metas == () and users["u2"].last_seen == 1000
    # u1 keeps only its live connection
    assert await s.add_connection("live", "u1", "l2") == 2


async def test_sweep_of_a_node_that_came_back(backend: Backend) -> None:
    s = await backend.store()
    await s.refresh_lease("n", 15, now=1000)
    await s.put_metas("n", "u", "c", {"team:a": meta("c")})
    assert await s.dead_nodes(now=17_000) == ["n"]
    await s.refresh_lease("n", 15, now=17_000)  # alive again before the sweep
    assert await s.sweep_node("n", now=17_001) is None
    assert "u" in await s.channel_presence("team:a")


async def test_refresh_lease_says_whether_the_lease_was_alive(backend: Backend) -> None:
    s = await backend.store()
    assert await s.refresh_lease("n", 15, now=1000) is False  # never existed
    assert await s.refresh_lease("n", 15, now=5000) is True
    assert await s.refresh_lease("n", 15, now=20_000) is True  # expiry is inclusive
    assert await s.refresh_lease("n", 15, now=35_001) is False  # lapsed (frozen node)
    assert await s.refresh_lease("n", 15, now=36_000) is True
    await s.drop_lease("n")
    assert await s.refresh_lease("n", 15, now=37_000) is False
    # swept while it was frozen: the next refresh says so, even before the claim ends
    await s.put_metas("n", "u", "c", {"team:a": meta("c")})
    swept = await s.sweep_node("n", now=60_000)
    assert swept == [SweptMeta("team:a", "u", "c")]
    assert await s.refresh_lease("n", 15, now=60_001) is False
    assert await s.refresh_lease("n", 15, now=60_002) is True


async def dead_node_with_metas(s: Store, now: int) -> list[SweptMeta]:
    await s.refresh_lease("dead", 15, now=now)
    await s.add_connection("dead", "u1", "d1")
    await s.put_metas("dead", "u1", "d1", {"team:a": meta("d1"), "team:b": meta("d1")})
    await s.put_metas("dead", "u2", "d2", {"team:a": meta("d2")})
    return [SweptMeta("team:a", "u1", "d1"), SweptMeta("team:a", "u2", "d2"),
            SweptMeta("team:b", "u1", "d1")]


def ordered(metas: list[SweptMeta] | None) -> list[SweptMeta]:
    assert metas is not None
    return sorted(metas, key=lambda m: (m.ch, m.user, m.conn))


async def test_sweep_claim_holds_until_finished(backend: Backend) -> None:
    s1, s2 = await backend.store(), await backend.store()
    expected = await dead_node_with_metas(s1, now=1000)
    t = 20_000
    assert ordered(await s1.sweep_node("dead", now=t)) == expected
    assert await s1.channel_presence("team:a") == {}
    # Claimed, leaves not published yet: nobody else sweeps it meanwhile.
    assert await s2.dead_nodes(now=t + 1) == []
    assert await s2.sweep_node("dead", now=t + 1) is None
    # Published: finishing drops the claim for good.
    await s1.sweep_finish("dead")
    later = t + SWEEP_CLAIM_MS + 1
    assert await s2.dead_nodes(now=later) == []
    assert await s2.sweep_node("dead", now=later) is None
    await s1.sweep_finish("dead")  # a second finish is a no-op
    await s2.sweep_finish("dead")  # so is one without a claim


async def test_unfinished_sweep_is_taken_over_with_the_same_metas(backend: Backend) -> None:
    s1, s2 = await backend.store(), await backend.store()
    expected = await dead_node_with_metas(s1, now=1000)
    t = 20_000
    assert ordered(await s1.sweep_node("dead", now=t)) == expected
    # s1 dies before publishing the leaves: once its claim expires the node is listed
    # again and the next sweeper gets the same metas.
    later = t + SWEEP_CLAIM_MS + 1
    assert await s2.dead_nodes(now=later) == ["dead"]
    assert ordered(await s2.sweep_node("dead", now=later)) == expected
    users = await s2.user_presence(["u1", "u2"])
    # last-seen: the dead node's last lease refresh, whichever sweeper finishes
    assert users["u1"].metas == () and users["u1"].last_seen == 1000
    if backend.config is not None:
        # The late finish of the expired claim must not release the new one (the
        # memory store is one object: both "sweepers" are the same one there).
        await s1.sweep_finish("dead")
        assert await s2.sweep_node("dead", now=later + 1) is None
        assert await s1.dead_nodes(now=later + 1) == []
    await s2.sweep_finish("dead")
    assert await s1.dead_nodes(now=later + SWEEP_CLAIM_MS + 1) == []
    assert await s1.sweep_node("dead", now=later + SWEEP_CLAIM_MS + 1) is None


async def test_concurrent_sweepers_claim_once_after_an_expired_claim(backend: Backend) -> None:
    stores = [await backend.store() for _ in range(3)]
    expected = await dead_node_with_metas(stores[0], now=1000)
    assert await stores[0].sweep_node("dead", now=20_000) is not None
    later = 20_000 + SWEEP_CLAIM_MS + 1
    results = await asyncio.gather(*(st.sweep_node("dead", now=later) for st in stores))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert ordered(winners[0]) == expected


# -- Store: churn ------------------------------------------------------------------
def rec(supplier: str, score: float, at: int = 1) -> ChurnRecord:
    return ChurnRecord(supplier, score, "low", None, "m1", at, {"f": 0.5})


async def test_churn_get_put_snapshot(backend: Backend) -> None:
    s = await backend.store()
    assert await s.churn_get("org1", ["a"]) == {}
    assert await s.churn_snapshot("org1", 10) == []
    await s.churn_put("org1", [rec("a", 0.5), rec("b", 0.9), rec("c", 0.5), rec("d", 0.1)])
    await s.churn_put("org2", [rec("a", 0.99)])
    await s.churn_put("org1", [rec("d", 0.95, at=2)])  # replaces d
    got = await s.churn_get("org1", ["a", "d", "zz"])
    assert got == {"a": rec("a", 0.5), "d": rec("d", 0.95, at=2)}
    snap = await s.churn_snapshot("org1", 10)
    assert [r.supplier for r in snap] == ["d", "b", "a", "c"]
    assert snap[0] == rec("d", 0.95, at=2)
    # the limit cuts through a tie by supplier id
    assert [r.supplier for r in await s.churn_snapshot("org1", 3)] == ["d", "b", "a"]
    assert await s.churn_snapshot("org1", 0) == []


async def test_churn_snapshot_of_a_large_org(backend: Backend) -> None:
    s = await backend.store()
    records = [rec(f"s{i:04d}", (i * 37 % 1000) / 1000) for i in range(3000)]
    await s.churn_put("big", records)
    snap = await s.churn_snapshot("big", 500)
    assert snap == snapshot_order(records, 500)
    assert len(await s.churn_snapshot("big", 5000)) == 3000


async def test_healthy(backend: Backend) -> None:
    s = await backend.store()
    assert await s.healthy()


# -- resume ------------------------------------------------------------------------
async def test_resume_adopts_a_connection_once_with_its_channels(backend: Backend) -> None:
    s, other = await backend.store(), await backend.store()
    await s.refresh_lease("n1", 15, now=1000)
    await other.refresh_lease("n2", 60, now=1000)
    assert await s.add_connection("n1", "u1", "c1", "hash-1") == 1
    await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1", "busy"), "team:b": meta("c1")})
    await s.track_channel("n1", "u1", "c1", "churn:acme", True)
    assert await other.resume("n2", "u1", "c1", "wrong", "hash-2") is None
    assert await other.resume("n2", "u2", "c1", "hash-1", "hash-2") is None  # other user
    adopted = await other.resume("n2", "u1", "c1", "hash-1", "hash-2")
    assert adopted == Adopted("c1", {"churn:acme": None, "team:a": meta("c1", "busy"),
                                     "team:b": meta("c1")})
    assert await other.resume("n2", "u1", "c1", "hash-1", "hash-3") is None  # single use
    # Nothing anyone sees changed.
    assert (await s.channel_presence("team:a"))["u1"] == [meta("c1", "busy")]
    # The old node no longer owns it: its writes leave it alone, its sweep does not see it.
    assert await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1", "away", seq=9)}) == []
    assert await s.remove_metas("n1", "u1", "c1", ["team:a"], 2000, True) == []
    assert await s.remove_connection("n1", "u1", "c1") == RESUMED_ELSEWHERE
    assert (await s.channel_presence("team:a"))["u1"] == [meta("c1", "busy")]
    assert await s.dead_nodes(now=20_000) == []  # n1 owns nothing any more
    assert await s.sweep_node("n1", now=20_000) is None
    assert (await s.user_presence(["u1"]))["u1"].metas != ()
    # The new owner's writes go through; the newest hash resumes it again.
    assert await other.put_metas("n2", "u1", "c1", {"team:a": meta("c1", "away", 2)}) == [
        "team:a"]
    again = await s.resume("n3", "u1", "c1", "hash-2", "hash-4")
    assert again is not None and set(again.channels) == {"team:a", "team:b", "churn:acme"}
    assert again.channels["team:a"] == meta("c1", "away", 2)


async def test_resume_of_a_dead_node_connection_wins_over_its_sweep(backend: Backend) -> None:
    s = await backend.store()
    await s.refresh_lease("dead", 15, now=1000)
    await s.add_connection("dead", "u1", "c1", "h1")
    await s.add_connection("dead", "u2", "c2", "h2")
    await s.put_metas("dead", "u1", "c1", {"team:a": meta("c1")})
    await s.put_metas("dead", "u2", "c2", {"team:a": meta("c2")})
    adopted = await s.resume("live", "u1", "c1", "h1", "h1b")
    assert adopted is not None and list(adopted.channels) == ["team:a"]
    await s.refresh_lease("live", 60, now=20_000)
    swept = await s.sweep_node("dead", now=20_000)
    assert swept == [SweptMeta("team:a", "u2", "c2")]  # not the resumed connection
    assert swept[0].last_seen == 1000
    await s.sweep_finish("dead")
    pres = await s.channel_presence("team:a")
    assert list(pres) == ["u1"] and pres["u1"] == [meta("c1")]
    # A swept connection cannot be resumed any more.
    assert await s.resume("live", "u2", "c2", "h2", "h2b") is None
    assert await s.add_connection("live", "u1", "c9") == 2  # c1 counts, now on "live"


async def test_a_clean_end_forgets_the_resume_hash(backend: Backend) -> None:
    s = await backend.store()
    await s.add_connection("n1", "u1", "c1", "h1")
    await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1")})
    assert await s.remove_metas("n1", "u1", "c1", ["team:a", "team:gone"], 5000, True) == [
        "team:a", "team:gone"]  # removed now, or already gone: leaves to publish
    await s.remove_connection("n1", "u1", "c1")
    assert await s.resume("n2", "u1", "c1", "h1", "h2") is None
    # Re-asserting a connection keeps its resume hash (an empty one changes nothing).
    await s.add_connection("n1", "u1", "c2", "h9")
    await s.add_connection("n1", "u1", "c2")
    assert await s.resume("n2", "u1", "c2", "h9", "h10") is not None


# -- transitions (webhook events) ------------------------------------------------------
async def test_occupancy_and_offline_are_decided_once(backend: Backend) -> None:
    s, t = await backend.store(), await backend.store()
    assert await s.add_connection("n1", "u1", "c1") == 1
    assert await t.add_connection("n2", "u1", "c2") == 2
    first = await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1"), "team:b": meta("c1")})
    assert first == ["team:a", "team:b"] and first.changed == ["team:a", "team:b"]
    second = await t.put_metas("n2", "u1", "c2", {"team:a": meta("c2")})
    assert second == ["team:a"] and second.changed == []
    assert (await s.put_metas("n1", "u1", "c1", {"team:a": meta("c1", seq=2)})).changed == []
    gone = await s.remove_metas("n1", "u1", "c1", ["team:a", "team:b"], 5000, True)
    assert gone == ["team:a", "team:b"] and gone.changed == ["team:b"]
    assert (await t.remove_metas("n2", "u1", "c2", ["team:a"], 6000, True)).changed == [
        "team:a"]
    assert await s.remove_connection("n1", "u1", "c1") == 1
    assert await t.remove_connection("n2", "u1", "c2") == 0  # offline
    assert await t.remove_connection("n2", "u1", "c2") is None  # unknown: no second event
    # Many first members at once: one of them sees the channel occupied.
    stores = [await backend.store() for _ in range(4)]
    results = await asyncio.gather(*(
        st.put_metas(f"n{i}", f"v{i}", f"k{i}", {"team:race": meta(f"k{i}")})
        for i, st in enumerate(stores)))
    assert sum(len(r.changed) for r in results) == 1


async def test_a_sweep_says_which_channels_emptied_and_who_went_offline(
        backend: Backend) -> None:
    s = await backend.store()
    await s.refresh_lease("dead", 15, now=1000)
    await s.refresh_lease("live", 60, now=1000)
    await s.add_connection("dead", "alone", "d1")
    await s.put_metas("dead", "alone", "d1", {"team:x": meta("d1"), "team:y": meta("d1")})
    await s.add_connection("dead", "twice", "d2")
    await s.put_metas("dead", "twice", "d2", {"team:y": meta("d2")})
    await s.add_connection("live", "twice", "l2")
    await s.put_metas("live", "twice", "l2", {"team:y": meta("l2")})
    await s.add_connection("dead", "idle", "d3")  # connected, in no presence channel
    swept = await s.sweep_node("dead", now=20_000)
    assert swept is not None
    by = {(m.ch, m.user): m for m in swept}
    assert set(by) == {("team:x", "alone"), ("team:y", "alone"), ("team:y", "twice"),
                       ("", "idle")}
    assert by[("team:x", "alone")].vacated and not by[("team:y", "alone")].vacated
    assert {m.user for m in swept if m.offline} == {"alone", "idle"}
    assert sum(m.offline for m in swept if m.user == "alone") == 1
    assert not any(m.offline for m in swept if m.user == "twice")
    assert all(m.last_seen == 1000 for m in swept)
