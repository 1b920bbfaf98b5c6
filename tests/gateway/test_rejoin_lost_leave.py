"""A conn that left a channel and joined it again, where a node never got the leave.

A broker gap (a master frozen past the cluster's node timeout, then failed over) can
lose a leave. The conn's next join in that channel starts a new meta at ``seq`` 1, and
clients keep the meta with the highest ``seq`` for a conn (PROTOCOL.md), so every
client that kept the earlier meta (``seq`` 2 and up after an update) ignored the
rejoin, the repair's re-read and every later update below that ``seq``: the view stayed
wrong for good (``python -m loadtest.chaos --classes stop_master`` with the machine
loaded). The node now tells a new life of a conn by its ``since`` and sends the lost
leave before the join.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import orjson

from cluster.memory import MemoryBroker, MemoryStore
from gateway.hub import Hub
from gateway.repair import GapRepair
from presence.messages import LeaveMsg, decode_message
from presence.meta import Meta, new_meta
from presence.state import ChannelState
from tests.fixtures.hub_members import Sink
from tests.fixtures.servers import GatewayFactory


class Viewer(Sink):
    """A hub member that also applies its diffs to a mirror, as a client does."""

    def __init__(self, conn: str, ch: str, seed: dict[str, list[Meta]]) -> None:
        super().__init__(conn)
        self.state = ChannelState.from_wire(
            {u: [m.to_wire() for m in ms] for u, ms in seed.items()})
        self.ch = ch

    def write_frame(self, data: str | bytes, ch: str | None = None) -> None:
        super().write_frame(data, ch)
        frame: dict[str, Any] = orjson.loads(data)
        if frame.get("t") == "diff" and frame.get("ch") == self.ch:
            self.state.apply_diff(frame)


def lives(old_note: str = "before") -> tuple[Meta, Meta]:
    """The conn's meta after two updates of its first join, and its rejoin later."""
    first = dataclasses.replace(new_meta("a1", None, 1_000), note=old_note, seq=3)
    again = new_meta("a1", None, 2_000)
    return first, again


async def test_a_live_rejoin_after_a_lost_leave_replaces_the_earlier_meta() -> None:
    ch = "team:life"
    first, again = lives()
    hub = Hub(0, 1 << 20)
    viewer = Viewer("v1", ch, {"a": [first]})
    hub.add(ch, viewer)
    hub.seed(ch, {"a": [first]})
    hub.on_join(ch, "a", again, 2_000)  # the leave in between never came
    hub.flush_all()
    assert viewer.state.metas("a") == [again]
    mirror = hub.mirror(ch)
    assert mirror is not None and mirror.metas("a") == [again]
    # An update of the new life (seq 2, still below the old life's 3) goes through too.
    update = dataclasses.replace(again, note="after", seq=2)
    hub.on_join(ch, "a", update, 2_100)
    hub.flush_all()
    assert viewer.state.metas("a") == [update]


async def test_an_update_of_the_same_life_is_not_sent_as_a_leave() -> None:
    ch = "team:same"
    first, _again = lives()
    hub = Hub(0, 1 << 20)
    viewer = Viewer("v1", ch, {"a": [first]})
    hub.add(ch, viewer)
    hub.seed(ch, {"a": [first]})
    hub.on_join(ch, "a", dataclasses.replace(first, note="next", seq=4), 1_500)
    hub.flush_all()
    frames = [orjson.loads(f) for f in viewer.frames]
    assert len(frames) == 1 and not frames[0].get("leaves")
    assert viewer.state.metas("a")[0].note == "next"


async def test_a_gap_repair_replaces_a_meta_of_an_earlier_life() -> None:
    ch = "team:relife"
    first, again = lives()
    store = MemoryStore()
    await store.put_metas("n", "a", "a1", {ch: again})  # what the Store holds now
    hub = Hub(0, 1 << 20)
    viewer = Viewer("v1", ch, {"a": [first]})
    hub.add(ch, viewer)
    hub.seed(ch, {"a": [first]})

    async def no_reassert(_ch: str) -> None:
        return None

    repair = GapRepair(store, hub, no_reassert, settle=0)
    await repair.on_gap([ch])
    await asyncio.wait_for(repair.wait_idle(), 5)
    hub.flush_all()
    assert viewer.state.metas("a") == [again]


class LosingBroker(MemoryBroker):
    """Loses the next ``lose_leaves`` leaves published, as a broker gap does."""

    lose_leaves = 0

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        kept = []
        for topic, payload in messages:
            if self.lose_leaves > 0 and isinstance(decode_message(payload), LeaveMsg):
                self.lose_leaves -= 1
                continue
            kept.append((topic, payload))
        await super().publish(kept)


async def test_clients_see_a_rejoin_whose_leave_was_lost(
    gateway_factory: GatewayFactory,
) -> None:
    broker = LosingBroker()
    gw = await gateway_factory(broker=broker, store=MemoryStore())
    a, watcher = await gw.client("a"), await gw.client("watcher")
    ch = "team:lost-leave"
    await watcher.join(ch)
    await a.join(ch, note="first")
    await a.update(note="second")
    await a.update(note="third")  # seq 3 in every view
    await watcher.wait_for(lambda e: e.get("joins", {}).get("a", [{}])[0].get("note")
                           == "third", 5)
    broker.lose_leaves = 1
    await a.leave(ch)
    await a.join(ch, note="back")  # a new meta, seq 1
    await watcher.wait_for(lambda e: e.get("joins", {}).get("a", [{}])[0].get("note")
                           == "back", 5)
    metas = watcher.mirror[ch].metas("a")
    assert [(m.note, m.seq) for m in metas] == [("back", 1)]
    await a.update(note="moved")  # seq 2: below the lost life's 3
    await watcher.wait_for(lambda e: e.get("joins", {}).get("a", [{}])[0].get("note")
                           == "moved", 5)
    assert [m.note for m in watcher.mirror[ch].metas("a")] == ["moved"]
