"""A connection leaves a channel while the Store fails (the removal is queued), then
joins it again: the others must end with its new meta. The queued leave used to be
dropped by the join, so nobody saw the leave, and the new meta (``seq`` 1) lost to the
old one (a higher ``seq``) in every mirror for good. Found by the chaos test
(``python -m loadtest.chaos --seed 30``, a master holding none of the channels killed:
the users' keys were on it)."""

from __future__ import annotations

import asyncio

from cluster.memory import MemoryBroker
from tests.fixtures.servers import GatewayFactory
from tests.gateway.test_node_duties import FlakyStore


async def test_rejoin_after_a_queued_leave_shows_the_new_meta(
    gateway_factory: GatewayFactory,
) -> None:
    store = FlakyStore()
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    mover, watcher = await gw.client("mover"), await gw.client("watcher")
    await watcher.join("team:rejoin")
    await mover.join("team:rejoin", status="busy", note="old")
    for note in ("old-2", "old-3"):
        await mover.update(note=note)
    await watcher.wait_for(lambda e: any(m["note"] == "old-3" for m in
                                         e.get("joins", {}).get("mover", [])), 5)
    store.fail_removes = 10_000  # the leave's removal fails: it is queued
    await mover.leave("team:rejoin")
    store.fail_removes = 0
    await mover.join("team:rejoin", status="online", note="new")
    async with asyncio.timeout(5):
        while True:
            metas = watcher.mirror["team:rejoin"].metas("mover")
            if [m.note for m in metas] == ["new"]:
                break
            await watcher.events.get()
    assert [m.note for m in (await store.channel_presence("team:rejoin"))["mover"]] == ["new"]
