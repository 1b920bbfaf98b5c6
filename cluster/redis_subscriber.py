"""One sharded pub/sub connection to one Redis master, with its own reader task.

redis-py 8.1's ``ClusterPubSub`` reading loop is slow and does not follow a failover
(TECH-NOTES.md), so the broker keeps one plain ``redis.asyncio`` pub/sub connection per
master instead. A :class:`NodeSubscriber` reads that connection in a loop
(``get_message(timeout=1)``), hands every ``smessage`` to the broker, resolves the
acknowledgements that :meth:`NodeSubscriber.subscribe` waits for, and reports the
channels it lost:

* all of them when the connection fails (``ConnectionError``, a read timeout, or no
  ``pong`` to an idle-time PING within ``pong_timeout``: a frozen master);
* one channel when the server pushes a ``sunsubscribe`` nobody asked for (its slot
  moved, e.g. after a graceful failover);
* all of them when the reader ends for any other reason (a bug in a callback, an
  unexpected reply): the reader never stops silently while its channels look held.

SSUBSCRIBE takes channels of one slot per command (CROSSSLOT otherwise), so a batch is
sent as one command per slot. The replies to our own SUNSUBSCRIBEs are counted per
channel: a re-subscribe sent before such a reply has been read does not turn that
reply into a "server push".

The library's own health checks are off on this connection on purpose: they would read
from the socket from the caller's task while the reader task reads too. Liveness is the
reader's idle PING instead; TCP keepalive is on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cluster import keys
from cluster.base import BackendUnavailable
from cluster.redis_conn import Addr, guarded, text

OnMessage = Callable[[str, bytes], None]
"""(pub/sub channel, payload)."""
OnLost = Callable[["NodeSubscriber", frozenset[str]], None]
"""(subscriber, pub/sub channels it no longer receives)."""

IDLE_PING = 2.0
PONG_TIMEOUT = 3.0


class NodeSubscriber:
    """Sharded subscriptions on one master; see the module docstring."""

    def __init__(
        self,
        addr: Addr,
        on_message: OnMessage,
        on_lost: OnLost,
        socket_timeout: float,
        connect_timeout: float,
        ack_timeout: float,
    ) -> None:
        self.addr = addr
        self.channels: set[str] = set()
        self.dead = False
        self._on_message = on_message
        self._on_lost = on_lost
        self._ack_timeout = ack_timeout
        self._client = Redis(
            host=addr[0], port=addr[1], socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout, socket_keepalive=True,
            health_check_interval=0, retry=Retry(NoBackoff(), 0),
        )
        self._pubsub: PubSub = self._client.pubsub(ignore_subscribe_messages=False)
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._unsubscribing: dict[str, int] = {}
        """Channel -> our SUNSUBSCRIBE commands whose reply has not been read yet."""
        self._reader: asyncio.Task[None] | None = None
        # One command written at a time: redis-py's PubSub connects on its first
        # command, and two first commands at once would each open a connection of their
        # own while the reader reads only one (the other's channels then receive nothing,
        # for good, with nothing in the log).
        self._writing = asyncio.Lock()

    async def subscribe(self, channels: Iterable[str]) -> None:
        """SSUBSCRIBE ``channels`` and return once the server acknowledged each.

        A channel counts as held once its command is written; a channel held already
        but not acknowledged yet is waited for as well. Raises
        :class:`BackendUnavailable` (after marking itself dead) when the master cannot
        be reached, or when an ack does not come within the ack timeout (the channel
        stays held: the command went out). Cancelled before the command was written,
        the channels are not held.
        """
        wanted = list(channels)
        async with self._writing:
            if self.dead:
                raise BackendUnavailable(f"redis: subscriber {self.addr} is closed")
            new = [c for c in wanted if c not in self.channels]
            loop = asyncio.get_running_loop()
            for c in new:
                fut = self._acks.get(c)
                if fut is None or fut.done():
                    self._acks[c] = loop.create_future()
            by_slot: dict[int, list[str]] = {}
            for c in new:
                by_slot.setdefault(keys.slot(c), []).append(c)
            try:
                for group in by_slot.values():
                    await guarded(self._pubsub.ssubscribe(*group), self._ack_timeout)
                    self.channels.update(group)
            except BackendUnavailable as exc:
                self._fail(exc)  # the command could not be written: the connection is gone
                raise
            except BaseException:
                for c in new:
                    if c not in self.channels:
                        fut = self._acks.pop(c, None)
                        if fut is not None and not fut.done():
                            fut.cancel()
                raise
            if self._reader is None:
                self._reader = asyncio.create_task(self._read(), name=f"redis-sub-{self.addr}")
        waits = [f for c in wanted if (f := self._acks.get(c)) is not None]
        if not waits:
            return
        # asyncio.wait leaves the futures alone on timeout: a late acknowledgement is
        # not a lost master. Under load the reader may simply be behind (it declares
        # the connection dead itself when the master stops answering its PINGs), so
        # only this subscribe fails; the ack, when it comes, finds the channel there.
        done, pending = await asyncio.wait(waits, timeout=self._ack_timeout)
        for fut in done:
            if fut.cancelled():
                raise BackendUnavailable(f"redis: subscription to {self.addr} cancelled")
            error = fut.exception()
            if error is not None:
                raise BackendUnavailable(f"redis: {self.addr}: {error}") from error
        if pending:
            raise BackendUnavailable(f"redis: no ssubscribe ack from {self.addr} yet")

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """SUNSUBSCRIBE ``channels`` (best effort: a dead connection drops them anyway)."""
        wanted = list(channels)
        async with self._writing:
            gone = [c for c in wanted if c in self.channels]
            if not gone or self.dead:
                self.channels.difference_update(gone)
                return
            self.channels.difference_update(gone)
            for c in gone:
                self._unsubscribing[c] = self._unsubscribing.get(c, 0) + 1
                fut = self._acks.pop(c, None)
                if fut is not None and not fut.done():
                    fut.cancel()
            by_slot: dict[int, list[str]] = {}
            for c in gone:
                by_slot.setdefault(keys.slot(c), []).append(c)
            try:
                for group in by_slot.values():
                    await guarded(self._pubsub.sunsubscribe(*group), self._ack_timeout)
            except BackendUnavailable as exc:
                self._fail(exc)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        ping_at: float | None = None
        try:
            while not self.dead:
                msg = await self._pubsub.get_message(timeout=1.0)
                now = loop.time()
                if msg is None:
                    if ping_at is None and now - last_rx >= IDLE_PING:
                        await self._pubsub.ping()
                        ping_at = now
                    elif ping_at is not None and now - ping_at >= PONG_TIMEOUT:
                        raise TimeoutError(f"no pong from {self.addr}")
                    continue
                last_rx, ping_at = now, None
                self._handle(msg)
        except asyncio.CancelledError:
            self._fail(ConnectionError("reader cancelled"))  # a no-op after close()
            raise
        except Exception as exc:
            # Whatever it was (connection, protocol, a callback's bug), the channels are
            # no longer read: report them, so the broker re-subscribes and repairs.
            self._fail(exc)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "smessage":
            channel = text(msg["channel"])
            if channel in self.channels:
                self._on_message(channel, msg["data"])
        elif kind == "ssubscribe":
            fut = self._acks.pop(text(msg["channel"]), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == "sunsubscribe":
            channel = text(msg["channel"])
            pending = self._unsubscribing.get(channel, 0)
            if pending:
                # The reply to one of ours (replies come in command order).
                if pending == 1:
                    del self._unsubscribing[channel]
                else:
                    self._unsubscribing[channel] = pending - 1
            elif channel in self.channels:
                # Pushed by the server: the slot moved away from this master.
                self.channels.discard(channel)
                self._on_lost(self, frozenset((channel,)))

    def _fail(self, exc: BaseException) -> None:
        """Mark the connection dead and report every channel it carried, once."""
        if self.dead:
            return
        self.dead = True
        lost = frozenset(self.channels)
        self.channels.clear()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(BackendUnavailable(f"redis: {self.addr}: {exc}"))
                fut.exception()  # retrieved: nobody may be waiting any more
        self._acks.clear()
        self._on_lost(self, lost)

    async def close(self) -> None:
        """Stop the reader and close the connection; idempotent."""
        self.dead = True
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            # Whatever ended the reader has been reported as lost channels already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            pubsub: Any = self._pubsub  # redis-py leaves PubSub.aclose untyped
            await asyncio.wait_for(pubsub.aclose(), 2.0)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._client.aclose(), 2.0)
