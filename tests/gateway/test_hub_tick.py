"""One flush tick for every channel of the hub.

Each channel had a timer of its own, started by its first pending change: at 1,000
updates/s into 100 channels a gateway woke 1,000 times a second for them. The hub now
keeps one timer for all the channels with a pending diff, started by the first change
of any of them; when it fires every such channel is flushed, so a change still waits at
most the coalescing window (less when another channel started the window).
"""

from __future__ import annotations

import asyncio

import orjson

from gateway.hub import Hub
from presence.meta import new_meta
from tests.fixtures.hub_members import Sink


class TimedSink(Sink):
    """A member that records the loop time of each frame and can be waited on."""

    def __init__(self, conn: str) -> None:
        super().__init__(conn)
        self.times: list[float] = []
        self.got = asyncio.Event()

    def write_frame(self, data: str | bytes, ch: str | None = None) -> None:
        super().write_frame(data, ch)
        self.times.append(asyncio.get_running_loop().time())
        self.got.set()


async def test_changes_of_two_channels_in_one_window_go_out_in_one_tick() -> None:
    hub = Hub(40, 1 << 20)
    a, b = TimedSink("c-a"), TimedSink("c-b")
    hub.add("team:a", a)
    hub.add("team:b", b)
    loop = asyncio.get_running_loop()
    started = loop.time()
    hub.on_join("team:a", "pat", new_meta("c-pat", None, 1_000), 1_000)
    await asyncio.sleep(0.01)  # b's change comes later inside a's window
    assert not a.frames, "flushed before the window ended"
    hub.on_join("team:b", "kim", new_meta("c-kim", None, 1_010), 1_010)
    await asyncio.wait_for(asyncio.gather(a.got.wait(), b.got.wait()), 2.0)
    # The same loop callback wrote both: the loop's clock did not move between them.
    assert a.times == b.times
    assert a.times[0] - started >= 0.04 - 0.005
    assert [list(orjson.loads(f)["joins"]) for f in a.frames] == [["pat"]]
    assert [list(orjson.loads(f)["joins"]) for f in b.frames] == [["kim"]]


async def test_a_channel_flushed_early_or_removed_is_not_flushed_again_by_the_tick() -> None:
    hub = Hub(20, 1 << 20)
    a, b, c = TimedSink("c-a"), TimedSink("c-b"), TimedSink("c-c")
    hub.add("team:a", a)
    hub.add("team:gone", b)
    hub.on_join("team:a", "pat", new_meta("c-pat", None, 1_000), 1_000)
    hub.on_join("team:gone", "kim", new_meta("c-kim", None, 1_000), 1_000)
    # A newcomer flushes what is pending for the members already there (Hub.add).
    hub.add("team:a", c)
    assert len(a.frames) == 1
    assert hub.remove("team:gone", b)
    hub.on_join("team:a", "lee", new_meta("c-lee", None, 1_005), 1_005)
    await asyncio.wait_for(c.got.wait(), 2.0)
    assert [list(orjson.loads(f)["joins"]) for f in a.frames] == [["pat"], ["lee"]]
    assert [list(orjson.loads(f)["joins"]) for f in c.frames] == [["lee"]]
    assert not b.frames
