"""A re-assertion of a connection (after a failover, a Redis restart, a self-sweep)
in flight while that connection closes: its write used to land after the close's
removal, leaving its meta in the Store for good (a ghost no sweep finds: the node is
alive). Found by the chaos test (``python -m loadtest.chaos --seed 30``: a master
frozen right after a frozen gateway woke up and re-asserted)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from cluster.memory import MemoryBroker, MemoryStore
from presence.meta import Meta
from tests.fixtures.servers import GatewayFactory


class GatedStore(MemoryStore):
    """While ``gated``, meta writes wait for ``gate`` (a write stuck in a failover)."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.removed = asyncio.Event()

    async def remove_metas(self, *args: object, **kw: object) -> object:  # type: ignore[override]
        try:
            return await super().remove_metas(*args, **kw)  # type: ignore[arg-type]
        finally:
            self.removed.set()

    async def put_metas(self, node: str, user: str, conn: str,
                        metas: Mapping[str, Meta],
                        joins: Mapping[str, bytes] | None = None,
                        ) -> object:  # type: ignore[override]
        if self.gated:
            self.waiting.set()
            await self.gate.wait()
        return await super().put_metas(node, user, conn, metas, joins)


async def test_a_reassertion_in_flight_never_outlives_the_close(
    gateway_factory: GatewayFactory,
) -> None:
    store = GatedStore()
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    leaver = await gw.client("leaver")
    await leaver.join("team:ghost")
    store.gated = True
    reassert = asyncio.ensure_future(gw.node.reassert_all(close_failed=False))
    await asyncio.wait_for(store.waiting.wait(), 5)  # its write is in flight
    closing = asyncio.ensure_future(leaver.close())
    await asyncio.sleep(0.2)  # the close reaches the server while the write waits
    store.gated = False
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(reassert, closing), 10)
    await asyncio.wait_for(store.removed.wait(), 5)  # the close's removal ran
    await asyncio.sleep(0.3)  # and nothing writes the meta back afterwards
    assert "leaver" not in await store.channel_presence("team:ghost")


class NoteGatedStore(MemoryStore):
    """Once ``armed``, meta writes carrying the note ``held`` wait for ``gate``;
    ``written`` records the notes of the writes done, in order."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.armed = False
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.written: list[str] = []
        self.wrote = asyncio.Event()

    async def put_metas(self, node: str, user: str, conn: str,
                        metas: Mapping[str, Meta],
                        joins: Mapping[str, bytes] | None = None,
                        ) -> object:  # type: ignore[override]
        notes = [m.note for m in metas.values()]
        if self.armed and self.held in notes:
            self.waiting.set()
            await self.gate.wait()
        done = await super().put_metas(node, user, conn, metas, joins)
        self.written += notes
        self.wrote.set()
        return done


async def test_an_update_during_a_reassertion_is_what_everyone_keeps(
    gateway_factory: GatewayFactory,
) -> None:
    """A re-assertion wrote a connection's meta while the connection's update went
    through: the update's write and publication came first, the re-assertion's older
    meta was written and published after, and every view kept the older meta while
    the client had been told ``ok`` (the chaos test, seed 1, a frozen master: the
    re-assertion of a lapsed lease against a user's update). Now a connection's meta
    writes and their publications go one at a time, and a re-assertion reads the
    metas it writes in its turn."""
    store = NoteGatedStore(held="before")
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    watcher = await gw.client("watcher")
    await watcher.join("team:order")
    user = await gw.client("u1")
    await user.join("team:order", status="online", note="before")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    store.armed = True
    reassert = asyncio.ensure_future(gw.node.reassert_all(close_failed=False))
    await asyncio.wait_for(store.waiting.wait(), 5)  # the re-assertion's write waits
    store.wrote.clear()
    update = asyncio.ensure_future(user.update(note="after"))
    # Time for the update to overtake the waiting write (which it did, at once, before
    # the change); now it waits its turn, so nothing is written here.
    await asyncio.wait({asyncio.ensure_future(store.wrote.wait())}, timeout=0.5)
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(reassert, update), 10)
    assert store.written[-1] == "after"
    (meta,) = (await store.channel_presence("team:order"))["u1"]
    assert meta.note == "after"
    # A diff after everything else: the watcher has applied every diff before it.
    other = await gw.client("u2")
    await other.join("team:order")
    await watcher.wait_for(lambda e: "u2" in e["joins"])
    (seen,) = watcher.mirror["team:order"].metas("u1")
    assert seen.note == "after"
