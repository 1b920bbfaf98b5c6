"""The Broker on Redis sharded pub/sub (SPUBLISH/SSUBSCRIBE), cluster or single.

Topic ``t`` travels on the pub/sub channel :func:`cluster.keys.topic` ``(t)``, in the
slot of the channel's keys. Receiving: one :class:`~cluster.redis_subscriber.
NodeSubscriber` per master that owns a subscribed topic, each reading its own
connection. When a subscriber loses topics (connection failure, or a ``sunsubscribe`` pushed
by the server), they become *orphans*; a repair task then re-reads the slot map every
``repair_interval`` seconds and re-subscribes each orphan on the master that owns it now
(the promoted replica after a failover, or the same master once it is back), and calls
the gap handler with the topics it re-subscribed: messages published meanwhile are lost
(at most once), so the caller re-reads state from the Store.

Publishing goes through the one Redis write path, :class:`~cluster.redis_batch.
WriteBatcher` (as the Store's writes do): concurrent ``publish`` calls of one event-loop
turn are sent as one plain pipeline per master, one batch in flight at a time, which
keeps per-topic publication order; ``MOVED``/``ASK`` replies are followed. ``SPUBLISH``'s
reply (a count on that master only) is not used. A connection error fails the callers
whose messages were in that part of the batch with :class:`BackendUnavailable` and
triggers a slot-map refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster import keys
from cluster.base import BackendUnavailable, GapHandler, MessageHandler
from cluster.redis_batch import Command
from cluster.redis_conn import Addr, RedisConfig
from cluster.redis_link import RedisLink
from cluster.redis_subscriber import NodeSubscriber

log = logging.getLogger(__name__)


class RedisBroker:
    """Broker on Redis; ``config`` names a cluster or a single server."""

    def __init__(self, config: RedisConfig, repair_interval: float = 0.5,
                 link: RedisLink | None = None) -> None:
        self.config = config
        self.repair_interval = repair_interval
        # The process's link, shared with the Store (cluster/redis_link.py), or one of
        # its own.
        self._link = link if link is not None else RedisLink(config)
        self.redis = self._link.topology
        self._on_message: MessageHandler | None = None
        self._on_gap: GapHandler | None = None
        self._wanted: dict[str, str] = {}  # topic -> pub/sub channel
        self._by_channel: dict[str, str] = {}  # pub/sub channel -> topic
        self._where: dict[str, NodeSubscriber] = {}  # topic -> its subscriber
        self._subs: dict[Addr, NodeSubscriber] = {}
        self._sub_locks: dict[Addr, asyncio.Lock] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._orphans: set[str] = set()
        self._orphaned = asyncio.Event()
        self._repair: asyncio.Task[None] | None = None
        self._batch = self._link.batch
        self._closed = False

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        await self._link.attach(self)
        self._on_message = on_message
        self._on_gap = on_gap
        self._repair = asyncio.create_task(self._repair_loop(), name="redis-broker-repair")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_message = None
        if self._repair is not None:
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendUnavailable):
                await self._repair
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            await sub.close()
        await self._link.detach(self)

    # -- receiving ---------------------------------------------------------------
    async def subscribe(self, topic: str) -> None:
        if topic in self._wanted:
            pending = self._pending.get(topic)
            if pending is not None:
                await asyncio.shield(pending)
            return
        channel = keys.topic(topic)
        self._wanted[topic] = channel
        self._by_channel[channel] = topic
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[topic] = fut
        try:
            await self._subscribe_on_owner([topic])
        except BaseException as exc:
            self._forget(topic)
            fut.set_exception(exc if isinstance(exc, BackendUnavailable)
                              else BackendUnavailable(str(exc)))
            fut.exception()
            raise
        else:
            fut.set_result(None)
        finally:
            self._pending.pop(topic, None)

    async def unsubscribe(self, topic: str) -> None:
        if topic not in self._wanted:
            return
        sub = self._where.get(topic)
        self._forget(topic)
        if sub is not None:
            await sub.unsubscribe([keys.topic(topic)])

    def _forget(self, topic: str) -> None:
        channel = self._wanted.pop(topic, None)
        if channel is not None:
            self._by_channel.pop(channel, None)
        self._where.pop(topic, None)
        self._orphans.discard(topic)

    async def _subscribe_on_owner(self, topics: Sequence[str]) -> list[str]:
        """Subscribe ``topics`` on the masters owning them now; return those done.

        Raises :class:`BackendUnavailable` when any master fails (the others' topics
        are subscribed all the same).
        """
        groups: dict[Addr, list[str]] = {}
        for t in topics:
            groups.setdefault(self.redis.owner(self._wanted[t]), []).append(t)
        done: list[str] = []
        error: BackendUnavailable | None = None
        for addr, group in groups.items():
            try:
                sub = await self._subscriber(addr)
                await sub.subscribe([self._wanted[t] for t in group if t in self._wanted])
            except BackendUnavailable as exc:
                error = exc
                continue
            for t in group:
                if t in self._wanted:
                    self._where[t] = sub
                    done.append(t)
        if error is not None:
            raise error
        return done

    async def _subscriber(self, addr: Addr) -> NodeSubscriber:
        lock = self._sub_locks.setdefault(addr, asyncio.Lock())
        async with lock:
            sub = self._subs.get(addr)
            if sub is None or sub.dead:
                cfg = self.config
                sub = NodeSubscriber(addr, self._deliver, self._lost, cfg.connect_timeout,
                                     cfg.op_timeout, cfg.auth_command())
                self._subs[addr] = sub
            return sub

    def _deliver(self, channel: str, payload: bytes) -> None:
        topic = self._by_channel.get(channel)
        if topic is not None and self._on_message is not None:
            self._on_message(topic, payload)

    def _lost(self, sub: NodeSubscriber, channels: frozenset[str]) -> None:
        if self._subs.get(sub.addr) is sub and sub.dead:
            del self._subs[sub.addr]
            asyncio.get_running_loop().create_task(sub.close())
        for channel in channels:
            topic = self._by_channel.get(channel)
            if topic is not None and self._where.get(topic) is sub:
                del self._where[topic]
                self._orphans.add(topic)
        if self._orphans:
            log.warning("redis pub/sub lost %d topics on %s", len(channels), sub.addr)
            self._orphaned.set()

    async def _repair_loop(self) -> None:
        # This loop is the only way back for an orphaned topic: it must outlive any
        # error (an unexpected one is logged and the round tried again).
        while not self._closed:
            try:
                await self._repair_orphans()
            except Exception:
                log.exception("redis pub/sub repair round failed")
                await asyncio.sleep(self.repair_interval)

    async def _repair_orphans(self) -> None:
        """One round: wait for orphans, then re-subscribe them until none is left."""
        if not self._orphans:
            await self._orphaned.wait()
        self._orphaned.clear()
        while self._orphans and not self._closed:
            # A poll period, not synchronisation: the cluster tells nobody when a
            # replica has been promoted.
            await asyncio.sleep(self.repair_interval)
            with contextlib.suppress(BackendUnavailable):
                await self.redis.refresh()
            orphans = sorted(t for t in self._orphans if t in self._wanted)
            self._orphans.intersection_update(self._wanted)
            done: list[str] = []
            try:
                done = await self._subscribe_on_owner(orphans)
            except BackendUnavailable:
                done = [t for t in orphans if t in self._where]
            self._orphans.difference_update(done)
            if done and self._on_gap is not None:
                try:
                    await self._on_gap(done)
                except Exception:
                    log.exception("gap handler failed")

    # -- publishing --------------------------------------------------------------
    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if not messages:
            return
        if self._closed:
            raise BackendUnavailable("broker closed")
        commands: list[Command] = []
        for topic, payload in messages:
            channel = keys.topic(topic)
            commands.append((channel, ("SPUBLISH", channel, payload)))
        await self._batch.run(commands)

    async def healthy(self) -> bool:
        if self._closed or self._orphans:
            return False
        return await self.redis.healthy()


if TYPE_CHECKING:
    from cluster.base import Broker

    _broker: Broker = RedisBroker(RedisConfig(url="redis://127.0.0.1:6379"))
