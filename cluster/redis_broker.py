"""The Broker on Redis sharded pub/sub (SPUBLISH/SSUBSCRIBE), cluster or single.

Topic ``t`` travels on the pub/sub channel :func:`cluster.keys.topic` ``(t)``, in the
slot of the channel's keys. Receiving: one :class:`~cluster.redis_subscriber.
NodeSubscriber` per master that owns a subscribed topic, each with its own reader
task. When a subscriber loses topics (connection failure, or a ``sunsubscribe`` pushed
by the server), they become *orphans*; a repair task then re-reads the slot map every
``repair_interval`` seconds and re-subscribes each orphan on the master that owns it now
(the promoted replica after a failover, or the same master once it is back), and calls
the gap handler with the topics it re-subscribed: messages published meanwhile are lost
(at most once), so the caller re-reads state from the Store.

Publishing: concurrent ``publish`` calls are gathered into one batch per event-loop
turn; a batch is split by owning master and sent as one plain pipeline per master, the
pipelines running concurrently. One batch is in flight at a time, which keeps
per-topic publication order. ``SPUBLISH``'s reply (a count on that master only) is not
used. A ``MOVED`` reply or a connection error fails the callers whose messages were in
that part of the batch with :class:`BackendUnavailable` and triggers a slot-map
refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster import keys
from cluster.base import BackendUnavailable, GapHandler, MessageHandler
from cluster.redis_conn import Addr, RedisConfig, Topology, guarded
from cluster.redis_subscriber import NodeSubscriber

log = logging.getLogger(__name__)

_Batch = list[tuple[list[tuple[str, bytes]], "asyncio.Future[None]"]]


class RedisBroker:
    """Broker on Redis; ``config`` names a cluster or a single server."""

    def __init__(self, config: RedisConfig, repair_interval: float = 0.5) -> None:
        self.config = config
        self.repair_interval = repair_interval
        self.redis = Topology(config)
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
        self._queue: _Batch = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        await self.redis.start()
        self._on_message = on_message
        self._on_gap = on_gap
        self._repair = asyncio.create_task(self._repair_loop(), name="redis-broker-repair")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_message = None
        tasks = [t for t in (self._repair, self._flusher) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, BackendUnavailable):
                await t
        for _batch, fut in self._queue:
            if not fut.done():
                fut.set_exception(BackendUnavailable("broker closed"))
        self._queue.clear()
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            await sub.close()
        await self.redis.close()

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
                sub = NodeSubscriber(addr, self._deliver, self._lost, cfg.socket_timeout,
                                     cfg.connect_timeout, cfg.op_timeout)
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
        while not self._closed:
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
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((list(messages), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="redis-broker-publish")
        await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other publishers of this loop turn join in
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                failed = await self._send(batch)
            except Exception as exc:
                failed = {i: BackendUnavailable(str(exc)) for i in range(len(batch))}
            for i, (_msgs, fut) in enumerate(batch):
                if fut.done():
                    continue
                err = failed.get(i)
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

    async def _send(self, batch: _Batch) -> dict[int, BackendUnavailable]:
        groups: dict[Addr, list[tuple[int, str, bytes]]] = {}
        failed: dict[int, BackendUnavailable] = {}
        for i, (msgs, _fut) in enumerate(batch):
            for topic, payload in msgs:
                channel = keys.topic(topic)
                try:
                    addr = self.redis.owner(channel)
                except BackendUnavailable as exc:
                    failed[i] = exc
                    continue
                groups.setdefault(addr, []).append((i, channel, payload))

        async def send(addr: Addr, items: list[tuple[int, str, bytes]]) -> None:
            pipe: Any = self.redis.node_client(addr).pipeline(transaction=False)
            for _i, channel, payload in items:
                pipe.execute_command("SPUBLISH", channel, payload)
            try:
                results = await guarded(pipe.execute(raise_on_error=False),
                                        self.config.op_timeout)
            except BackendUnavailable as exc:
                for i, _c, _p in items:
                    failed.setdefault(i, exc)
                return
            for (i, _c, _p), res in zip(items, results, strict=True):
                if isinstance(res, Exception):  # MOVED, CLUSTERDOWN, ...
                    failed.setdefault(i, BackendUnavailable(f"redis: {res}"))

        await asyncio.gather(*(send(a, items) for a, items in groups.items()))
        if failed:
            self.redis.refresh_soon()
        return failed

    async def healthy(self) -> bool:
        if self._closed or self._orphans:
            return False
        return await self.redis.healthy()


if TYPE_CHECKING:
    from cluster.base import Broker

    _broker: Broker = RedisBroker(RedisConfig(url="redis://127.0.0.1:6379"))
