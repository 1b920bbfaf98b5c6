"""A joiner's snapshot and what the channel's other local members hold end equal.

The joiner's snapshot is a Store read; the hub's mirror is what the members already
there were told. When the two differ (a write whose publication a broker gap lost,
while a restarted Redis was being re-asserted), the difference used to stay: the
joiner held one state, the others another, and no later repair saw it (repairs diff
the mirror). Found by the chaos test (``python -m loadtest.chaos --seed 30``,
``restart_cluster``). Now the joiner's read is applied to the mirror, and its
difference sent to the others."""

from __future__ import annotations

from cluster.memory import MemoryBroker, MemoryStore
from presence.meta import Meta
from tests.fixtures.servers import GatewayFactory


async def test_a_joiners_store_read_reaches_the_members_already_there(
    gateway_factory: GatewayFactory,
) -> None:
    store = MemoryStore()
    gw = await gateway_factory(broker=MemoryBroker(), store=store)
    watcher = await gw.client("watcher")
    await watcher.join("team:same")
    # Written, never published (its publication lost in a gap): the mirror lacks it.
    ghost_free = Meta(conn="c-y", status="busy", device="web", note="n", since=1, seq=1)
    await store.put_metas("other-node", "y", "c-y", {"team:same": ghost_free})
    joiner = await gw.client("joiner")
    joined = await joiner.join("team:same")
    assert "y" in joined["presence"]
    diff = await watcher.wait_for(lambda e: "y" in e.get("joins", {}), 5)
    assert diff["joins"]["y"][0]["conn"] == "c-y"
    assert set(watcher.mirror["team:same"].users()) == {"watcher", "joiner", "y"}
