"""Backpressure for every WebSocket connection: what a client makes the server write is
bounded by what the client reads.

websockets answers each ping with a pong straight from ``data_received``, outside any
buffer check, and only pauses reading when its queue of inbound *data* frames is full.
A client that sends pings (or anything that earns an answer) and never reads therefore
grows the server's write buffer without bound, before ``hello`` as well as after, and
the keepalive ping then waits on the full buffer forever, so its pong timeout never
fires.

:class:`BoundedConnection` (a :class:`~websockets.asyncio.server.ServerConnection`
passed to ``serve(create_connection=...)``) guarantees, for every connection:

- Reading from the socket is paused while the transport has paused writing (its unsent
  bytes went above the high-water mark ``write_limit`` given to ``serve``) and resumed
  when the transport resumes writing (unsent bytes back under the low-water mark).
  websockets' own pause for a full inbound queue is kept: reading resumes only when
  neither reason holds. At most one read chunk of answers can land past the mark.
- A connection whose unsent bytes stay above ``max_buffer`` for longer than
  ``buffer_grace`` seconds, whatever wrote them (pongs, replies, diffs written by the
  hub directly to the transport), or whose writing stays paused for longer than
  ``stall_timeout`` seconds (the client reads nothing: what the keepalive's pong timeout
  would have caught had its ping not been stuck behind the buffer), is closed: with a
  1008 close frame and EOF when the connection is open, the TCP connection cut
  ``close_grace`` seconds later if it has not ended by then; aborted at once otherwise.

The checks cost nothing for a connection that keeps up: the watch timer runs only while
the transport has paused writing.

A read bigger than :data:`READ_SLICE` is parsed a slice per event-loop turn, reading
paused meanwhile: a burst of pipelined frames (a ping flood's first read, before any
backpressure) does not hold the loop for the whole read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

KEEPALIVE_PING = b"keepalive"
"""Payload of the server's keepalive pings (a pong carrying it answers the last one)."""

SERVER_LOGGER = logging.getLogger("websockets.server")
"""The logger of every connection (websockets' own, without its per-connection adapter)."""

READ_SLICE = 16 * 1024
"""Bytes of one read parsed in one loop turn (:meth:`BoundedConnection.data_received`)."""

WRITE_LIMIT = 32 * 1024
"""High-water mark of a connection's write buffer (websockets' default, made explicit):
above it, the transport pauses writing and the connection stops reading."""


@dataclass(frozen=True, slots=True)
class BufferPolicy:
    """Bounds of one connection's unsent bytes (see the module docstring).

    ``on_overflow(reason)`` is called once per connection closed by the policy while it
    was open (metrics, logs); it must not raise.
    """

    max_buffer: int = 512 * 1024
    buffer_grace: float = 1.0
    stall_timeout: float = 20.0
    close_grace: float = 1.0
    on_overflow: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        for name in ("buffer_grace", "stall_timeout", "close_grace"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def check_interval(self) -> float:
        """How often a paused connection is looked at: a quarter of the shorter bound,
        so a bound is overrun by at most that much."""
        return min(self.buffer_grace, self.stall_timeout) / 4


class FrameList(list[Any]):
    """The part of :class:`collections.deque` that websockets' inbound frame queue uses
    (``append``, ``popleft``, ``extendleft``, ``len``), on a list: the queue holds at
    most ``max_queue`` frames, so moving them on ``popleft`` costs less than a deque's
    64-slot block costs every idle connection."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def extendleft(self, items: Iterable[Any]) -> None:
        # deque.extendleft prepends one item at a time: the last one ends up first.
        self[0:0] = list(items)[::-1]


class BoundedConnection(ServerConnection):
    """A server connection that reads only as fast as its client reads (module
    docstring). Use :func:`bounded_connections` to bind a :class:`BufferPolicy`."""

    policy: ClassVar[BufferPolicy] = BufferPolicy()

    # Slots, not instance-dict entries: attributes added to the base class's __dict__
    # after its own grow it out of its shared-key layout, about 1.5 KB a connection
    # (memory per idle connection is a target).
    __slots__ = ("_unread", "_watch", "over_since", "overflowed", "ping_due", "ping_sent",
                 "queue_full", "reading_paused", "stalled_since")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_full = False
        self.reading_paused = False
        self._unread: memoryview | None = None
        """What is left of a read being parsed a slice per loop turn (reading paused)."""
        self.stalled_since: float | None = None
        self.over_since: float | None = None
        self.overflowed: str | None = None
        """Why the policy closed this connection; None while it has not."""
        self._watch: asyncio.TimerHandle | None = None
        self.ping_due: float | None = None
        """Loop time of the next keepalive ping (gateway/keepalive.py); None until the
        keepalive first sees the connection open."""
        self.ping_sent: float | None = None
        """Loop time of the keepalive ping not answered yet; None when none is."""
        # websockets keeps its waiters for a drained buffer in a deque: 760 bytes a
        # connection, for a list that is empty except while a send() waits.
        self.drain_waiters = []  # type: ignore[assignment]
        # websockets wraps its logger in an adapter per connection (with a weak proxy
        # to it, for log formatters: none of ours reads it), 320 bytes a connection.
        self.protocol.logger = self.logger = SERVER_LOGGER

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The inbound assembler pauses and resumes reading on its own; route it through
        # here, or its resume would undo a pause for a full write buffer.
        self.recv_messages.pause = self._pause_for_queue
        self.recv_messages.resume = self._resume_for_queue
        # Its queue of inbound frames is a deque, 760 bytes a connection for the few
        # frames (at most max_queue) it ever holds; the same queue on a list takes 72.
        frames = self.recv_messages.frames
        if type(frames.queue) is collections.deque and not frames.queue:
            frames.queue = FrameList()  # type: ignore[assignment]

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            # websockets binds a subprotocol chooser to each protocol, a closure over the
            # connection (a reference cycle, 270 bytes) used by the handshake only.
            vars(self.protocol).pop("select_subprotocol", None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- a big read, a slice per loop turn -------------------------------------------
    def data_received(self, data: bytes) -> None:
        if len(data) <= READ_SLICE:
            super().data_received(data)
            return
        # A read holds up to the loop's buffer (256 KB on uvloop): a burst of pipelined
        # frames, each ping of a flood answered with a pong. Parsed at once, one such
        # read held the loop for tens of milliseconds and a flooder's first burst (the
        # kernel takes megabytes of pongs before the write buffer pauses reading) for
        # 0.6-0.7 s. A slice per turn, reading paused until the read is used up, lets
        # every other connection have its turn in between; the bytes keep their order.
        self._unread = memoryview(data)
        self._apply_reading()
        self._next_slice()

    def _next_slice(self) -> None:
        rest = self._unread
        if rest is None:
            return
        if self.connection_lost_waiter.done():  # reset: nothing can be answered now
            self._unread = None
            return
        self._unread = rest[READ_SLICE:] if len(rest) > READ_SLICE else None
        super().data_received(bytes(rest[:READ_SLICE]))
        if self._unread is not None:
            self.loop.call_soon(self._next_slice)
        else:
            self._apply_reading()

    # -- reading follows writing ------------------------------------------------------
    def _pause_for_queue(self) -> None:
        self.queue_full = True
        self._apply_reading()

    def _resume_for_queue(self) -> None:
        self.queue_full = False
        self._apply_reading()

    def _apply_reading(self) -> None:
        want_paused = self.queue_full or self.paused or self._unread is not None
        if want_paused == self.reading_paused or self.transport.is_closing():
            return
        self.reading_paused = want_paused
        if want_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stalled_since = self.loop.time()
        self._apply_reading()
        self._note_size()
        self._arm()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stalled_since = None
        self.over_since = None
        self._disarm()
        self._apply_reading()

    def send_data(self) -> None:
        super().send_data()
        self._note_size()

    # -- the watch while writing is paused --------------------------------------------
    def _note_size(self) -> None:
        if (self.over_since is None
                and self.transport.get_write_buffer_size() > self.policy.max_buffer):
            self.over_since = self.loop.time()

    def _arm(self) -> None:
        if self._watch is None:
            self._watch = self.loop.call_later(self.policy.check_interval, self._check)

    def _disarm(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _check(self) -> None:
        self._watch = None
        if not self.paused or self.transport.is_closing() or self.overflowed is not None:
            return
        now = self.loop.time()
        policy = self.policy
        if self.transport.get_write_buffer_size() > policy.max_buffer:
            if self.over_since is None:
                self.over_since = now
            elif now - self.over_since >= policy.buffer_grace:
                self.overflow("unsent buffer above max_buffer")
                return
        else:
            self.over_since = None
        if self.stalled_since is not None and now - self.stalled_since >= policy.stall_timeout:
            self.overflow("client not reading")
            return
        self._arm()

    def overflow(self, reason: str) -> None:
        """Close this connection for its unsent bytes (idempotent; never raises)."""
        if self.overflowed is not None:
            return
        self.overflowed = reason
        if self.protocol.state is not State.OPEN:
            # A close is under way already, or there is no WebSocket to close yet.
            self.transport.abort()
            return
        if self.policy.on_overflow is not None:
            self.policy.on_overflow(reason)
        # A client that starts reading gets the close frame; one that does not is cut.
        self._fail(CloseCode.POLICY_VIOLATION, f"slow consumer: {reason}")

    # -- keepalive (driven by gateway/keepalive.py) ------------------------------------
    def keepalive_due(self, now: float, interval: float, timeout: float) -> bool | None:
        """The keepalive's turn at loop time ``now``: True when a ping was sent, False
        when the connection was failed (1011) for a pong ``timeout`` seconds late, None
        when nothing was due. A ping goes ``interval`` seconds after the connection was
        first seen open, then ``interval`` seconds after the previous ping once it is
        answered."""
        # The clock first: most connections are not due, and this runs for each of them
        # on every sweep.
        sent = self.ping_sent
        if sent is not None:
            if now - sent < timeout:
                return None
        elif self.ping_due is not None and now < self.ping_due:
            return None
        if self.protocol.state is not State.OPEN or self.transport.is_closing():
            return None
        if sent is not None:
            self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return False
        if self.ping_due is None:
            self.ping_due = now + interval
            return None
        self.protocol.send_ping(KEEPALIVE_PING)
        with contextlib.suppress(Exception):
            self.send_data()
        self.ping_sent = now
        self.ping_due = now + interval
        return True

    def acknowledge_pings(self, data: bytes) -> None:
        if data == KEEPALIVE_PING and self.ping_sent is not None:
            self.latency = self.loop.time() - self.ping_sent
            self.ping_sent = None
            return
        super().acknowledge_pings(data)

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Fail the open connection with ``code``: the close frame joins the queue of
        unsent bytes, and the TCP connection is cut ``close_grace`` seconds later if it
        has not ended by then."""
        self.protocol.fail(code, reason)
        with contextlib.suppress(Exception):
            self.send_data()
        self.loop.call_later(self.policy.close_grace, self._abort)

    def _abort(self) -> None:
        if not self.connection_lost_waiter.done():
            self.transport.abort()


def bounded_connections(policy: BufferPolicy) -> type[BoundedConnection]:
    """A :class:`BoundedConnection` class bound to ``policy``, for ``serve``'s
    ``create_connection`` (which takes a class, not an instance)."""

    class Bounded(BoundedConnection):
        pass

    Bounded.policy = policy
    return Bounded


__all__ = ["KEEPALIVE_PING", "WRITE_LIMIT", "BoundedConnection", "BufferPolicy", "FrameList",
           "bounded_connections"]


# -- prepared frames (one serialization per flush, the same bytes to every member) -------
def prepare(data: str | bytes) -> bytes:
    """The wire bytes of one unmasked server frame carrying ``data`` (a text frame for
    ``str``, binary for ``bytes``): what ``protocol.send_text``/``send_binary`` would
    write on a server connection with no extension (``compression=None``)."""
    if isinstance(data, str):
        return Frame(Opcode.TEXT, data.encode()).serialize(mask=False, extensions=[])
    return Frame(Opcode.BINARY, data).serialize(mask=False, extensions=[])

