"""A join the members of a channel have been told already is not sent to them again.

A joiner's Store read is applied to the hub's mirror and its difference sent to the
local members already there (gateway/repair.py, ``joined_read``). That read already
holds the joiner's own meta, so those members got the join from it, and the live join
published by the same join, applied after the read, was sent to them a second time:
the same meta, the same ``seq``. Clients ignore it by the ``seq`` rule, but it is a
diff about nothing, and it broke a test that counts diffs
(``tests/browser/test_resume.py``, once inside the suite). The hub now sends a join
only when its meta differs from the one the mirror holds for that conn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from cluster.memory import MemoryStore
from gateway.hub import Hub
from gateway.repair import GapRepair
from presence.meta import new_meta
from tests.fixtures.hub_members import Sink


def diffs(sink: Sink) -> list[dict[str, Any]]:
    return [f for f in map(orjson.loads, sink.frames) if f.get("t") == "diff"]


async def test_the_live_join_after_a_joiners_read_is_not_sent_again() -> None:
    ch = "team:dup"
    store = MemoryStore()
    hub = Hub(0, 1 << 20)

    async def reassert(_ch: str) -> None:
        return None

    repair = GapRepair(store, hub, reassert, settle=0)
    pat_meta = new_meta("c-pat", None, 1_000)
    await store.put_metas("n1", "pat", "c-pat", {ch: pat_meta})
    pat = Sink("c-pat")
    hub.add(ch, pat)
    await repair.joined_read(ch)  # pat's own join seeds the mirror
    carol_meta = new_meta("c-carol", None, 2_000)
    await store.put_metas("n1", "carol", "c-carol", {ch: carol_meta})
    hub.add(ch, Sink("c-carol"))
    await repair.joined_read(ch)  # carol's snapshot read: pat is told of carol
    hub.flush_all()
    assert [list(d["joins"]) for d in diffs(pat)] == [["carol"]]
    # carol's live join, published by the same join, arrives after the read.
    repair.deliver(ch, lambda: hub.on_join(ch, "carol", carol_meta, 2_000))
    hub.flush_all()
    assert len(diffs(pat)) == 1
    # An update of that meta still goes out.
    update = dataclasses.replace(carol_meta, note="at the venue", seq=2)
    repair.deliver(ch, lambda: hub.on_join(ch, "carol", update, 2_100))
    hub.flush_all()
    assert len(diffs(pat)) == 2


async def test_a_live_join_the_mirror_got_from_a_seed_is_still_sent() -> None:
    """The channel's first two local members join at once: a's snapshot read ran
    before b's write, b's read (which holds both) seeded the mirror. Nobody was told
    anything by a seed, so b's live join, the same meta as the mirror's, must still
    reach a."""
    ch = "team:first"
    hub = Hub(0, 1 << 20)
    a, b = Sink("c-a"), Sink("c-b")
    hub.add(ch, a)
    hub.add(ch, b)
    a_meta, b_meta = new_meta("c-a", None, 1_000), new_meta("c-b", None, 1_001)
    hub.seed(ch, {"a": [a_meta]})  # a's read
    hub.seed(ch, {"a": [a_meta], "b": [b_meta]})  # b's read
    hub.on_join(ch, "a", a_meta, 1_000)
    hub.on_join(ch, "b", b_meta, 1_001)
    hub.flush_all()
    assert [set(d["joins"]) for d in diffs(a)] == [{"b"}]  # a conn's own join not echoed
    assert [set(d["joins"]) for d in diffs(b)] == [{"a"}]
    # Told now: the same join again (a repair's re-read, a re-assert) is not re-sent.
    hub.on_join(ch, "b", b_meta, 1_002)
    hub.flush_all()
    assert len(diffs(a)) == 1
