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
                        metas: Mapping[str, Meta]) -> object:  # type: ignore[override]
        if self.gated:
            self.waiting.set()
            await self.gate.wait()
        return await super().put_metas(node, user, conn, metas)


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
