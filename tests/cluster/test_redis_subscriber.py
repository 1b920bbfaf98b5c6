"""One master's sharded pub/sub connection (``NodeSubscriber``) on the real cluster.

* Several channels of one master but different slots are subscribed together (the
  broker does that when it re-subscribes a failed master's topics on the promoted
  replica): SSUBSCRIBE refuses channels of different slots in one command (CROSSSLOT),
  which used to kill the new connection every time, so the topics stayed orphaned and
  ``/readyz`` at 503 for good.
* An unsubscribe followed at once by a re-subscribe of one channel: the reply to the
  SUNSUBSCRIBE is expected, not a server push (it used to report the channel lost).
* Whatever ends the reader (here: a delivery callback that raises something else than a
  Redis or OS error) reports every channel lost: the reader never stops silently.
* Subscribes of several channels at once on a fresh subscriber (the first joins of a
  gateway that just started): redis-py's ``PubSub`` connects on its first command, and
  two first commands at once each opened a connection of their own, while the reader
  read only one of them. The other channel's messages went to a socket nobody read,
  its ack never came, and the retry found the channel "held" and returned: a channel
  that received nothing for good, without a line in the log (found by the bench's
  delivery count through Redis Cluster: one team lost every message from the other
  gateway).
* A subscribe cancelled before its command went out (a joiner that gave up) leaves the
  channel not held, so that the next subscribe sends the command.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from cluster import keys
from cluster.base import BackendUnavailable
from cluster.redis_subscriber import IDLE_PING, PONG_TIMEOUT, TICK, NodeSubscriber
from tests.fixtures.redis_cluster import ClusterControl

pytestmark = pytest.mark.redis


class Recorder:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.lost: list[frozenset[str]] = []
        self.lost_event = asyncio.Event()
        self.fail_with: BaseException | None = None

    def on_message(self, channel: str, data: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.put_nowait((channel, data))

    def on_lost(self, _sub: NodeSubscriber, channels: frozenset[str]) -> None:
        self.lost.append(channels)
        self.lost_event.set()


def channels_on(ctl: ClusterControl, master: int, count: int) -> list[str]:
    """``count`` topic channels of different slots, all owned by ``master``."""
    out: list[str] = []
    slots: set[int] = set()
    for i in range(10_000):
        ch = keys.topic(f"team:sub{i}")
        if ctl.master_of(ch) == master and keys.slot(ch) not in slots:
            out.append(ch)
            slots.add(keys.slot(ch))
            if len(out) == count:
                return out
    raise AssertionError("not enough channels found")


@pytest.fixture
async def master(redis_cluster_control: ClusterControl) -> AsyncIterator[int]:
    await redis_cluster_control.wait_healthy()
    yield sorted({m for m, _r in redis_cluster_control.slot_owners().values()})[0]


def publish(port: int, channel: str, data: bytes) -> None:
    with redis.Redis("127.0.0.1", port, socket_timeout=2) as c:
        c.execute_command("SPUBLISH", channel, data)


async def received(rec: Recorder, timeout: float = 3.0) -> tuple[str, bytes]:
    return await asyncio.wait_for(rec.messages.get(), timeout)


def new_sub(port: int, rec: Recorder) -> NodeSubscriber:
    return NodeSubscriber(("127.0.0.1", port), rec.on_message, rec.on_lost, 1.0, 3.0)


async def test_channels_of_different_slots_subscribe_together(
    redis_cluster_control: ClusterControl, master: int
) -> None:
    chans = channels_on(redis_cluster_control, master, 4)
    rec = Recorder()
    sub = new_sub(master, rec)
    try:
        await sub.subscribe(chans)
        assert rec.lost == [] and not sub.dead
        for ch in chans:
            publish(master, ch, ch.encode())
            assert await received(rec) == (ch, ch.encode())
    finally:
        await sub.close()


async def test_unsubscribe_then_resubscribe_is_not_a_lost_channel(
    redis_cluster_control: ClusterControl, master: int
) -> None:
    ch, other = channels_on(redis_cluster_control, master, 2)
    rec = Recorder()
    sub = new_sub(master, rec)
    try:
        for c in (ch, other):  # one at a time: only the finding under test here
            await sub.subscribe([c])
        for _ in range(5):
            await sub.unsubscribe([ch])
            await sub.subscribe([ch])  # before the sunsubscribe reply has been read
        # Every reply has been read once a message published after them arrives.
        publish(master, other, b"mark")
        assert await received(rec) == (other, b"mark")
        publish(master, ch, b"after")
        assert await received(rec) == (ch, b"after")
        assert rec.lost == []
        assert ch in sub.channels and not sub.dead
    finally:
        await sub.close()


async def test_reader_ended_by_any_exception_reports_its_channels_lost(
    redis_cluster_control: ClusterControl, master: int
) -> None:
    chans = channels_on(redis_cluster_control, master, 2)
    rec = Recorder()
    sub = new_sub(master, rec)
    try:
        for c in chans:  # one at a time: only the finding under test here
            await sub.subscribe([c])
        rec.fail_with = LookupError("a bug downstream")
        publish(master, chans[0], b"boom")
        await asyncio.wait_for(rec.lost_event.wait(), 3)
        assert rec.lost == [frozenset(chans)]
        assert sub.dead
    finally:
        await sub.close()


async def test_concurrent_first_subscribes_all_receive(
    redis_cluster_control: ClusterControl, master: int
) -> None:
    chans = channels_on(redis_cluster_control, master, 6)
    rec = Recorder()
    sub = new_sub(master, rec)
    try:
        # Each in its own task, as the node's joiners do; a late ack is retried the
        # way the broker does it.
        async def subscribe(ch: str) -> None:
            for _ in range(3):
                try:
                    await sub.subscribe([ch])
                    return
                except BackendUnavailable:
                    continue

        await asyncio.wait_for(asyncio.gather(*(subscribe(c) for c in chans)), 20)
        assert not sub.dead
        for ch in chans:
            publish(master, ch, ch.encode())
            assert await received(rec) == (ch, ch.encode()), ch
    finally:
        await sub.close()


async def test_a_subscribe_cancelled_before_its_command_leaves_the_channel_not_held(
    redis_cluster_control: ClusterControl, master: int
) -> None:
    first, ch = channels_on(redis_cluster_control, master, 2)
    rec = Recorder()
    sub = new_sub(master, rec)
    try:
        blocker = asyncio.ensure_future(sub.subscribe([first]))
        task = asyncio.ensure_future(sub.subscribe([ch]))
        await asyncio.sleep(0)  # both started; the second waits behind the first
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(blocker, 5)
        assert ch not in sub.channels
        await asyncio.wait_for(sub.subscribe([ch]), 5)
        publish(master, ch, b"after")
        assert await received(rec) == (ch, b"after")
    finally:
        await sub.close()


async def test_an_idle_connection_lives_on_pongs_and_a_frozen_master_is_found_dead(
    redis_cluster_control: ClusterControl, master: int
) -> None:
    """The watchdog: an idle connection to a live master stays up past the PING time
    (its pong counts as traffic); a frozen master (SIGSTOP, no RST, no FIN) is reported
    with all its channels once a PING has gone unanswered."""
    (ch,) = channels_on(redis_cluster_control, master, 1)
    rec = Recorder()
    sub = new_sub(master, rec)
    try:
        await sub.subscribe([ch])
        idle = (IDLE_PING + PONG_TIMEOUT + 1) * TICK  # past the point of a missed pong
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rec.lost_event.wait(), idle)
        assert not sub.dead and rec.lost == []
        replica = redis_cluster_control.replica_of(master)
        redis_cluster_control.pause(master)
        redis_cluster_control.pause(replica)  # no failover: the shard only stays down
        try:
            await asyncio.wait_for(rec.lost_event.wait(), idle + 2 * TICK)
        finally:
            redis_cluster_control.resume(master)
            redis_cluster_control.resume(replica)
        assert rec.lost == [frozenset((ch,))] and sub.dead
    finally:
        await sub.close()
        await redis_cluster_control.wait_healthy()
