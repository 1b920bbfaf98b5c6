"""One sharded pub/sub connection to one Redis master, read by an ``asyncio.Protocol``.

redis-py 8.1's ``ClusterPubSub`` reading loop is slow and does not follow a failover
(TECH-NOTES.md), so the broker keeps one pub/sub connection per master instead. That
connection is not a redis-py ``PubSub`` either: its ``get_message()`` cost 39 us of CPU
per message on this machine (a coroutine chain, a timeout and a dict per message;
``python -m loadtest.redis_wire``), about an eighth of a cluster gateway's samples. A
:class:`NodeSubscriber` owns the socket through an ``asyncio.Protocol`` that feeds what
arrives straight into ``hiredis.Reader`` (2.2 us per message, the callback included) and
hands every ``smessage`` to the broker from the event loop's read callback. It resolves
the acknowledgements that :meth:`NodeSubscriber.subscribe` waits for, and reports the
channels it lost:

* all of them when the connection fails (closed or reset by the server, a protocol
  error, an error reply, or no ``pong`` to an idle-time PING within ``PONG_TIMEOUT``
  ticks: a frozen master);
* one channel when the server pushes a ``sunsubscribe`` nobody asked for (its slot
  moved, e.g. after a graceful failover);
* all of them when a delivery callback raises: a reply is never dropped silently
  while its channels look held.

SSUBSCRIBE takes channels of one slot per command (CROSSSLOT otherwise), so a batch is
sent as one command per slot. The replies to our own SUNSUBSCRIBEs are counted per
channel: a re-subscribe sent before such a reply has been read does not turn that
reply into a "server push".

Liveness is a watchdog ticking once a second that counts ticks without a byte
received (a count, not clock arithmetic: uvloop's clock moves in milliseconds, and
ticks that late under load must not add up to a dead master by rounding). After
``IDLE_PING`` silent ticks it sends a PING; after ``PONG_TIMEOUT`` more the
connection is dead. TCP keepalive is on.

With credentials configured (``RedisConfig.auth_command``) a new connection sends
``AUTH`` before anything else; there is no ``SELECT``, since pub/sub channels do not
belong to a database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import hiredis

from cluster import keys
from cluster.base import BackendUnavailable
from cluster.redis_conn import Addr, open_transport, pack

OnMessage = Callable[[str, bytes], None]
"""(pub/sub channel, payload)."""
OnLost = Callable[["NodeSubscriber", frozenset[str]], None]
"""(subscriber, pub/sub channels it no longer receives)."""

TICK = 1.0
IDLE_PING = 2
"""Silent ticks before a PING."""
PONG_TIMEOUT = 3
"""Silent ticks after the PING before the connection counts as dead."""

_PING = pack((b"PING",))


class _Wire(asyncio.Protocol):
    """The socket's side: bytes in, replies out to the subscriber, one at a time."""

    def __init__(self, sub: NodeSubscriber) -> None:
        self._sub = sub
        self._reader = hiredis.Reader()
        self.received = 0
        """Chunks received so far: the watchdog's evidence that the master is alive."""
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved once the transport is closed (``connection_lost``)."""

    def data_received(self, data: bytes) -> None:
        self.received += 1
        sub = self._sub
        try:
            self._reader.feed(data)
            reply = self._reader.gets()
            while reply is not False:
                sub._handle(reply)
                reply = self._reader.gets()
        except Exception as exc:
            # Whatever it was (a protocol error, an error reply, a callback's bug), the
            # rest of the stream cannot be trusted to be read: report the channels.
            sub._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        self._sub._fail(exc or ConnectionError("connection closed by the server"))


class NodeSubscriber:
    """Sharded subscriptions on one master; see the module docstring."""

    def __init__(
        self,
        addr: Addr,
        on_message: OnMessage,
        on_lost: OnLost,
        connect_timeout: float,
        ack_timeout: float,
        auth: tuple[str, ...] = (),
    ) -> None:
        self.addr = addr
        self._auth = pack(auth) if auth else b""
        self.channels: set[str] = set()
        self.dead = False
        self._on_message = on_message
        self._on_lost = on_lost
        self._connect_timeout = connect_timeout
        self._ack_timeout = ack_timeout
        self._wire: _Wire | None = None
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._unsubscribing: dict[str, int] = {}
        """Channel -> our SUNSUBSCRIBE commands whose reply has not been read yet."""
        # Commands go out in call order, and the connection is opened once: a
        # subscribe waiting for the connect holds back the unsubscribe called after it.
        self._writing = asyncio.Lock()

    async def subscribe(self, channels: Iterable[str]) -> None:
        """SSUBSCRIBE ``channels`` and return once the server acknowledged each.

        A channel counts as held once its command is written; a channel held already
        but not acknowledged yet is waited for as well. Raises
        :class:`BackendUnavailable` (after marking itself dead) when the master cannot
        be reached, or when an ack does not come within the ack timeout (the channel
        stays held: the command went out). Cancelled before the command was written
        (while connecting), the channels are not held.
        """
        wanted = list(channels)
        async with self._writing:
            transport = await self._connected()
            new = [c for c in wanted if c not in self.channels]
            loop = asyncio.get_running_loop()
            for c in new:
                fut = self._acks.get(c)
                if fut is None or fut.done():
                    self._acks[c] = loop.create_future()
            for group in _by_slot(new).values():
                transport.write(pack((b"SSUBSCRIBE", *group)))
            self.channels.update(new)
        waits = [f for c in wanted if (f := self._acks.get(c)) is not None]
        if not waits:
            return
        # asyncio.wait leaves the futures alone on timeout: a late acknowledgement is
        # not a lost master. Under load the loop may simply be behind (the watchdog
        # declares the connection dead itself when the master stops answering its
        # PINGs), so only this subscribe fails; the ack, when it comes, finds the
        # channel there.
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
            self.channels.difference_update(gone)
            transport = self._transport
            if not gone or self.dead or transport is None:
                return
            for c in gone:
                self._unsubscribing[c] = self._unsubscribing.get(c, 0) + 1
                fut = self._acks.pop(c, None)
                if fut is not None and not fut.done():
                    fut.cancel()
            for group in _by_slot(gone).values():
                transport.write(pack((b"SUNSUBSCRIBE", *group)))

    async def _connected(self) -> asyncio.Transport:
        """The open transport, connecting first if there is none (under ``_writing``)."""
        if self.dead:
            raise BackendUnavailable(f"redis: subscriber {self.addr} is closed")
        if self._transport is not None:
            return self._transport
        loop = asyncio.get_running_loop()
        wire = _Wire(self)
        try:
            transport = await open_transport(self.addr, wire, self._connect_timeout)
        except (OSError, TimeoutError) as exc:
            error = BackendUnavailable(f"redis: {self.addr}: {type(exc).__name__}: {exc}")
            self._fail(error)
            raise error from exc
        if self.dead:  # closed while connecting
            transport.abort()
            raise BackendUnavailable(f"redis: subscriber {self.addr} is closed")
        self._wire, self._transport = wire, transport
        if self._auth:
            # Before any SSUBSCRIBE; a refusal (WRONGPASS, or NOAUTH when none was
            # configured) is an error reply, which fails the connection with its text.
            transport.write(self._auth)
        self._watchdog = loop.create_task(self._watch(wire), name=f"redis-sub-{self.addr}")
        return transport

    async def _watch(self, wire: _Wire) -> None:
        seen, silent = wire.received, 0
        while not self.dead:
            await asyncio.sleep(TICK)
            if wire.received != seen:
                seen, silent = wire.received, 0
                continue
            silent += 1
            if silent == IDLE_PING and self._transport is not None:
                self._transport.write(_PING)
            elif silent >= IDLE_PING + PONG_TIMEOUT:
                self._fail(TimeoutError(f"no pong from {self.addr}"))

    def _handle(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            raise reply  # e.g. MOVED to an SSUBSCRIBE: the broker re-subscribes elsewhere
        if not isinstance(reply, list):
            return  # AUTH's +OK
        kind = reply[0]
        if kind == b"smessage":
            channel = reply[1].decode()
            if channel in self.channels:
                self._on_message(channel, reply[2])
        elif kind == b"ssubscribe":
            fut = self._acks.pop(reply[1].decode(), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == b"sunsubscribe":
            channel = reply[1].decode()
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
        # Anything else (the watchdog's pong) only proves the master alive.

    def _fail(self, exc: BaseException) -> None:
        """Mark the connection dead, drop it and report every channel it carried, once."""
        if self.dead:
            return
        self.dead = True
        self._drop()
        lost = frozenset(self.channels)
        self.channels.clear()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(BackendUnavailable(f"redis: {self.addr}: {exc}"))
                fut.exception()  # retrieved: nobody may be waiting any more
        self._acks.clear()
        self._on_lost(self, lost)

    def _drop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()

    async def close(self) -> None:
        """Close the connection and stop the watchdog, without reporting channels lost
        (the caller is dropping them); returns once the transport is closed (bounded);
        idempotent."""
        self.dead = True
        watchdog, wire = self._watchdog, self._wire
        self._drop()
        if watchdog is not None and watchdog is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        if wire is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wire.gone), 1.0)


def _by_slot(channels: Iterable[str]) -> dict[int, list[str]]:
    by_slot: dict[int, list[str]] = {}
    for c in channels:
        by_slot.setdefault(keys.slot(c), []).append(c)
    return by_slot
