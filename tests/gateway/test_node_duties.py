"""The node's duties under backend faults: subscriptions every joiner waits for, writes
retried until done, gap repair serialised with live delivery, the readiness grace.

The faults are injected by subclasses of the real memory backends that fail or stall
on demand (a Redis failover cannot be timed to one call); the real-process versions of
these faults are in tests/integration/.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence

import pytest

from cluster.base import BackendUnavailable
from cluster.memory import MemoryBroker, MemoryStore
from gateway.health import Health
from gateway.hub import Hub
from gateway.leases import Leases
from gateway.metrics import Metrics
from gateway.repair import GapRepair
from presence.meta import Meta, new_meta
from tests.fixtures.hub_members import Sink
from tests.fixtures.servers import GatewayFactory


class GatedBroker(MemoryBroker):
    """Subscribes wait for ``gate``; the first ``fail`` of them then fail."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.subscribing = asyncio.Event()
        self.fail = fail
        self.attempts = 0

    async def subscribe(self, topic: str) -> None:
        self.attempts += 1
        self.subscribing.set()
        await self.gate.wait()
        if self.fail > 0:
            self.fail -= 1
            raise BackendUnavailable("injected: subscribe failed")
        await super().subscribe(topic)


class FlakyStore(MemoryStore):
    """The next ``fail_removes`` removals and ``fail_puts`` meta writes fail."""

    fail_removes = 0
    fail_puts = 0

    async def remove_metas(self, node: str, user: str, conn: str, channels: Sequence[str],
                           now: int, last: bool) -> list[str]:
        if self.fail_removes > 0:
            self.fail_removes -= 1
            raise BackendUnavailable("injected: remove failed")
        return await super().remove_metas(node, user, conn, channels, now, last)

    async def put_metas(self, node: str, user: str, conn: str,
                        metas: Mapping[str, Meta],
                        joins: Mapping[str, bytes] | None = None) -> list[str]:
        if self.fail_puts > 0:
            self.fail_puts -= 1
            raise BackendUnavailable("injected: put failed")
        return await super().put_metas(node, user, conn, metas, joins)


async def test_every_joiner_waits_for_the_subscription_which_is_retried(
    gateway_factory: GatewayFactory,
) -> None:
    broker = GatedBroker(fail=1)
    gw = await gateway_factory(broker=broker, store=MemoryStore())
    a, b, c = await gw.client("a"), await gw.client("b"), await gw.client("c")
    first = asyncio.ensure_future(a.join("team:sub"))
    second = asyncio.ensure_future(b.join("team:sub"))
    await asyncio.wait_for(broker.subscribing.wait(), 5)
    await asyncio.sleep(0.1)  # time for a joiner that does not wait to be answered
    # Neither joiner is answered while the subscription is not active.
    assert not first.done() and not second.done()
    broker.gate.set()  # the first subscribe fails, the retry succeeds
    async with asyncio.timeout(5):
        await asyncio.gather(first, second)
    assert broker.attempts >= 2
    # The channel really is subscribed: a change published now reaches both.
    await c.join("team:sub")
    await c.update(status="busy")
    for x in (a, b):
        diff = await x.wait_for(lambda e: "c" in e.get("joins", {}) and
                                e["joins"]["c"][0]["status"] == "busy", 5)
        assert diff["ch"] == "team:sub"


async def test_a_failed_leave_is_retried_until_done(gateway_factory: GatewayFactory) -> None:
    store = FlakyStore()
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    leaver, watcher = await gw.client("leaver"), await gw.client("watcher")
    await leaver.join("team:retry")
    await watcher.join("team:retry")
    store.fail_removes = 3  # the close's removal fails three times, then succeeds
    await leaver.close()
    diff = await watcher.wait_for(lambda e: "leaver" in e.get("leaves", {}), 10)
    assert diff["leaves"]["leaver"][0]["last_seen"] > 0
    assert "leaver" not in await store.channel_presence("team:retry")
    assert store.fail_removes == 0


async def test_a_join_rides_through_a_short_store_failure(gateway_factory: GatewayFactory) -> None:
    store = FlakyStore()
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    a = await gw.client("a")
    store.fail_puts = 2  # a failover's worth of errors: retried, not "overloaded"
    joined = await a.join("team:ride")
    assert "a" in joined["presence"]
    assert "a" in await store.channel_presence("team:ride")


class StaleReadStore(MemoryStore):
    """``channel_presence`` takes its snapshot at once but answers only when ``gate``
    opens: a Store read that is slower than the live traffic around it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        snapshot = await super().channel_presence(ch)
        self.reading.set()
        await self.gate.wait()
        return snapshot


async def test_gap_repair_is_serialised_with_live_delivery() -> None:
    store = StaleReadStore()
    hub = Hub(0, 1 << 20)
    ch = "team:gap"
    b, c = new_meta("b1", None, 1), new_meta("c1", None, 2)
    await store.put_metas("n", "b", "b1", {ch: b})
    hub.add(ch, Sink("viewer"))
    hub.seed(ch, {"b": [b]})

    async def no_reassert(_ch: str) -> None:
        return None

    repair = GapRepair(store, hub, no_reassert)
    await repair.on_gap([ch])
    await asyncio.wait_for(store.reading.wait(), 5)
    # While the (stale) read is out: b leaves and c joins, live.
    await store.remove_metas("n", "b", "b1", [ch], 3, True)
    repair.deliver(ch, lambda: hub.on_leave(ch, "b", "b1", 3, 3))
    await store.put_metas("n", "c", "c1", {ch: c})
    repair.deliver(ch, lambda: hub.on_join(ch, "c", c, 4))
    store.gate.set()
    await asyncio.wait_for(repair.wait_idle(), 5)
    mirror = hub.mirror(ch)
    assert mirror is not None
    # No ghost from the stale read, and no spurious leave of the newcomer.
    assert {u: [m.conn for m in mirror.metas(u)] for u in mirror.users()} == {"c": ["c1"]}
    assert repair.repaired == 1


class FailingReadStore(MemoryStore):
    fail_reads = 0

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        if self.fail_reads > 0:
            self.fail_reads -= 1
            raise BackendUnavailable("injected: read failed")
        return await super().channel_presence(ch)


async def test_a_failed_gap_repair_is_retried() -> None:
    store = FailingReadStore()
    hub = Hub(0, 1 << 20)
    ch = "team:gap2"
    ghost = new_meta("g1", None, 1)
    hub.add(ch, Sink("viewer"))
    hub.seed(ch, {"ghost": [ghost]})  # the Store lost it; the mirror still shows it

    async def no_reassert(_ch: str) -> None:
        return None

    repair = GapRepair(store, hub, no_reassert)
    store.fail_reads = 2
    await repair.on_gap([ch])
    await asyncio.wait_for(repair.wait_idle(), 10)
    mirror = hub.mirror(ch)
    assert mirror is not None and list(mirror.users()) == []
    assert store.fail_reads == 0 and repair.repaired == 1


class FirstReadStaleStore(MemoryStore):
    """The first read of a channel answers ``stale`` (a woken-up old master's data);
    ``second`` is set by the next read."""

    def __init__(self, stale: dict[str, list[Meta]]) -> None:
        super().__init__()
        self.stale: dict[str, list[Meta]] | None = stale
        self.second = asyncio.Event()

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        if self.stale is not None:
            stale, self.stale = self.stale, None
            return stale
        self.second.set()
        return await super().channel_presence(ch)


async def test_a_gap_is_repaired_once_more_after_it_settles() -> None:
    """Right after a failover a woken-up old master answered the repair's read with its
    stale data, the update the new master took was not delivered, and nothing read
    again: one gateway's members kept the older meta (chaos seed 1)."""
    ch = "team:settle"
    old = new_meta("a1", None, 1)
    new = dataclasses.replace(old, note="after", seq=old.seq + 1)
    store = FirstReadStaleStore({"a": [old]})
    await store.put_metas("n", "a", "a1", {ch: new})  # what the new master holds
    hub = Hub(0, 1 << 20)
    hub.add(ch, Sink("viewer"))
    hub.seed(ch, {"a": [old]})

    async def no_reassert(_ch: str) -> None:
        return None

    repair = GapRepair(store, hub, no_reassert, settle=0.2)
    await repair.on_gap([ch])
    await asyncio.wait_for(repair.wait_idle(), 5)
    mirror = hub.mirror(ch)
    assert mirror is not None and mirror.metas("a") == [old]  # the stale read
    await asyncio.wait_for(store.second.wait(), 5)  # the settle's read
    await asyncio.wait_for(repair.wait_idle(), 5)
    mirror = hub.mirror(ch)
    assert mirror is not None and mirror.metas("a") == [new] and repair.repaired == 2
    await repair.close()


def test_readiness_grace() -> None:
    now = [100.0]

    async def probe() -> bool:
        return True

    async def recovered() -> None:
        return None

    health = Health(probe, 10.0, Metrics(), recovered, clock=lambda: now[0])
    health.mark(True)
    assert health.usable()
    health.mark(False)  # a failover begins
    now[0] += 9.5
    assert health.usable()  # still within the grace: the pod stays in the Service
    now[0] += 1.0
    assert not health.usable()
    health.mark(True)
    assert health.usable()
    health.mark(False)
    health.mark(False)  # still the same outage: the grace is not restarted
    now[0] += 10.5
    assert not health.usable()


async def test_leaves_of_a_swept_node_are_not_lost_when_their_publish_fails() -> None:
    store = MemoryStore()
    t = [1_000_000]
    meta = new_meta("c1", None, 1)
    await store.put_metas("dead", "u", "c1", {"team:swept": meta})
    await store.refresh_lease("dead", 1.0, t[0])
    published: list[list[tuple[str, bytes]]] = []
    fail = [1]

    async def publish(messages: list[tuple[str, bytes]]) -> None:
        if fail[0] > 0:
            fail[0] -= 1
            raise BackendUnavailable("injected: publish failed")
        published.append(messages)

    async def nothing() -> None:
        return None

    leases = Leases(store, "me", 4.0, publish, nothing, lambda: 0, clock_ms=lambda: t[0])
    t[0] += 5_000  # the dead node's lease has lapsed
    with pytest.raises(BackendUnavailable):
        await leases.sweep_once()
    assert published == []
    # The Store no longer shows the meta, but the claim holds the leave still owed.
    assert await store.channel_presence("team:swept") == {}
    t[0] += 60_000  # the failed sweeper's claim has expired: another one takes it over
    assert await leases.sweep_once() == 1
    assert [ch for ch, _ in published[0]] == ["team:swept"]
    assert await store.dead_nodes(t[0]) == []  # finished: nothing left to sweep


async def test_joiners_reading_a_new_channel_at_once_tell_nobody_a_difference() -> None:
    # Several resumed connections arrive on a node for one channel at the same time:
    # each enters the channel, then reads it. The first read has not filled the mirror
    # when the second one comes back; the second must seed it too, not send everyone
    # as a join to the members already there (a flap of the whole team).
    store = StaleReadStore()
    hub = Hub(0, 1 << 20)
    ch = "team:arrivals"
    for i in range(5):
        await store.put_metas("n", f"u{i}", f"c{i}", {ch: new_meta(f"c{i}", None, i)})

    async def no_reassert(_ch: str) -> None:
        return None

    repair = GapRepair(store, hub, no_reassert)
    first, second = Sink("c0"), Sink("c1")
    hub.add(ch, first)
    slow = asyncio.ensure_future(repair.joined_read(ch))
    await asyncio.wait_for(store.reading.wait(), 5)
    hub.add(ch, second)
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(slow, repair.joined_read(ch)), 5)
    hub.flush_all()
    assert first.frames == [] and second.frames == []
    mirror = hub.mirror(ch)
    assert mirror is not None and sorted(mirror.users()) == [f"u{i}" for i in range(5)]


async def test_a_duty_that_swallows_its_cancel_does_not_hold_the_stop(
        gateway_factory: GatewayFactory) -> None:
    """A duty that lets one cancel go by (as one did on its way out of a Redis read) is
    cancelled again: the node's stop finishes its steps, the Store's close included,
    instead of waiting out its budget on the duties and skipping the rest."""
    store = ClosingStore()
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # once, and back to its loop

    gw.gateway.node.run_duty(stubborn())
    await asyncio.wait_for(gw.gateway.stop(), 10)
    assert swallowed.is_set() and store.closed


class ClosingStore(MemoryStore):
    """Records that it was closed (the node's last stop step)."""

    closed = False

    async def close(self) -> None:
        self.closed = True
        await super().close()
