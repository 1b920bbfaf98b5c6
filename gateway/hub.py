"""The local hub: channel -> local members, coalescing of changes, one-to-many fan-out.

For every channel with local members the hub keeps the pending diff (changes received
from the broker and not yet sent) and a mirror of the channel's state (used to repair
the local view after a broker gap). A flush encodes the diff once per wire format,
serializes it once as a WebSocket frame and writes the same bytes to every member's
socket without awaiting any of them (:func:`gateway.transport.prepare`), where
``websockets.broadcast`` would write (open, no fragmented message in progress); members
whose own changes are in the diff get a copy without them. Flushes run on one tick for
all channels: the first pending change of any channel starts the coalescing window,
and when it ends every channel with pending changes is flushed (one timer per window,
not one per channel; a change waits at most the window). A member whose unsent buffer
has passed ``max_buffer`` is closed (1008) instead of written to, so a stuck client
cannot grow the node's memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from websockets.protocol import State

from gateway.transport import prepare
from presence.codec import Format, encode
from presence.diff import PendingDiff
from presence.meta import Meta
from presence.state import ChannelState

OPEN = State.OPEN


class Member(Protocol):
    """What the hub needs of a connection."""

    conn: str
    fmt: Format

    def write_frame(self, data: str | bytes, ch: str | None = None) -> None:
        """Write an encoded frame without waiting (``ch``: the channel it is about)."""
        ...

    def buffered(self) -> int:
        """Bytes written to this connection and not yet sent."""
        ...

    def slow_consumer(self) -> None:
        """Close the connection (1008): its buffer passed the bound."""
        ...

    def direct(self, ch: str) -> Any:
        """The websocket to write ``ch``'s frames to directly with
        ``websockets.broadcast``, or None when frames must go through
        :meth:`write_frame` (the member still waits for its ``joined`` reply)."""
        ...


class Channel:
    """One channel's local members, pending diff and mirror."""

    __slots__ = ("members", "mirror", "name", "pending", "seeded", "untold")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Member] = set()
        self.pending = PendingDiff()
        self.mirror = ChannelState()
        # False until a Store read has filled the mirror: before that the mirror says
        # nothing (every member is still waiting for its snapshot), so a read is a seed,
        # not a difference to tell anyone.
        self.seeded = False
        # (user, conn) of the metas the mirror got from a seed rather than from a join
        # sent to every member: a joiner whose read ran at the same time may lack them,
        # so the live join of such a meta is still sent.
        self.untold: set[tuple[str, str]] = set()


class Hub:
    """Local fan-out. All methods run on the event loop and never suspend."""

    def __init__(
        self,
        coalesce_ms: int,
        max_buffer: int,
        on_flush: Callable[[int, int, float], None] | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.coalesce = coalesce_ms / 1000.0
        self.max_buffer = max_buffer
        self.channels: dict[str, Channel] = {}
        self._members = 0  # running count: summing over channels per join is quadratic
        # on_flush(frames written, bytes written, propagation seconds) feeds the metrics.
        self.on_flush = on_flush
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        # The channels with a pending diff, in the order they got it, and the one timer
        # that flushes them all: one loop wake-up per window for every channel, not one
        # per channel (a change still waits at most the window).
        self._due: dict[Channel, None] = {}
        self._tick: asyncio.Handle | None = None

    # -- membership --------------------------------------------------------------
    def add(self, ch: str, member: Member) -> bool:
        """Add a member; True when it is the channel's first local member."""
        channel = self.channels.get(ch)
        first = channel is None
        if channel is None:
            channel = self.channels[ch] = Channel(ch)
        elif channel.pending:
            # Changes received so far predate the newcomer's snapshot: they are for the
            # members already there.
            self._flush(channel)
        if member not in channel.members:
            channel.members.add(member)
            self._members += 1
        return first

    def remove(self, ch: str, member: Member) -> bool:
        """Remove a member; True when the channel has no local member left."""
        channel = self.channels.get(ch)
        if channel is None:
            return False
        if member in channel.members:
            channel.members.discard(member)
            self._members -= 1
        if channel.members:
            return False
        self._due.pop(channel, None)
        del self.channels[ch]
        return True

    def member_count(self) -> int:
        return self._members

    # -- presence changes ----------------------------------------------------------
    def seed(self, ch: str, presence: dict[str, list[Meta]]) -> None:
        """Initialise a channel's mirror from a store snapshot (first local join)."""
        channel = self.channels.get(ch)
        if channel is None:
            return
        for user, metas in presence.items():
            for meta in metas:
                channel.mirror.merge(user, meta)
                channel.untold.add((user, meta.conn))
        channel.seeded = True

    def on_join(self, ch: str, user: str, meta: Meta, ts: int) -> None:
        channel = self.channels.get(ch)
        if channel is None:
            return
        current = channel.mirror.get(user, meta.conn)
        key = (user, meta.conn)
        if current == meta and key not in channel.untold:
            # Every local member has been told this meta already: typically a joiner's
            # Store read, applied first, held the join that arrives live now.
            return
        channel.untold.discard(key)
        if current is not None and current.since != meta.since:
            # A new life of the conn here (it left and joined again) whose leave this
            # node never got: a broker gap lost it. Its new meta starts again at seq 1
            # and clients keep the highest seq for a conn, so without the leave every
            # member would keep the earlier meta for good.
            self.on_leave(ch, user, meta.conn, ts, ts)
        channel.mirror.merge(user, meta)
        if not channel.pending.add_join(user, meta, ts):
            # A leave of this conn is pending: it must reach clients before the join.
            self._flush(channel)
            channel.pending.add_join(user, meta, ts)
        self._schedule(channel)

    def on_leave(self, ch: str, user: str, conn: str, last_seen: int, ts: int) -> None:
        channel = self.channels.get(ch)
        if channel is None:
            return
        channel.mirror.remove(user, conn)
        channel.untold.discard((user, conn))
        channel.pending.add_leave(user, conn, last_seen, ts)
        self._schedule(channel)

    def mirror(self, ch: str) -> ChannelState | None:
        channel = self.channels.get(ch)
        return channel.mirror if channel is not None else None

    def _schedule(self, channel: Channel) -> None:
        self._due[channel] = None
        if self._tick is not None:
            return
        loop = asyncio.get_running_loop()
        if self.coalesce > 0:
            self._tick = loop.call_later(self.coalesce, self._flush_due)
        else:
            self._tick = loop.call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self._tick = None
        due, self._due = self._due, {}
        for channel in due:
            self._flush(channel)

    def flush_all(self) -> None:
        """Send every pending diff now (drain, tests)."""
        for channel in tuple(self.channels.values()):
            self._flush(channel)

    def _flush(self, channel: Channel) -> None:
        self._due.pop(channel, None)
        pending = channel.pending
        if not pending:
            return
        channel.pending = PendingDiff()
        name = channel.name
        own = pending.conns()
        limit = self.max_buffer
        frame: dict[str, Any] | None = None
        # Per format: (payload, its prepared frame); built on first use.
        shared: dict[Format, tuple[str | bytes, bytes]] = {}
        frames = 0
        nbytes = 0
        # One pass over the members, writing as it goes (this loop is the fan-out hot
        # path): the slow-consumer and protocol-state checks read the transport and the
        # protocol directly, and the frame serialized once is written to each socket.
        for member in tuple(channel.members):
            if member.conn in own:
                if member.buffered() > limit:
                    member.slow_consumer()
                    continue
                personal = pending.frame(name, exclude=member.conn)
                if personal is not None:
                    self._count(1, _write(member, encode(personal, member.fmt), name))
                continue
            entry = shared.get(member.fmt)
            if entry is None:
                if frame is None:
                    frame = pending.frame(name)
                    if frame is None:  # not reached: a non-empty diff has entries
                        break
                data = encode(frame, member.fmt)
                entry = shared[member.fmt] = (data, prepare(data))
            ws = member.direct(name)
            if ws is None:
                # Waiting for its joined reply (the core holds the frame), or closing.
                member.write_frame(entry[0], name)
            else:
                transport = ws.transport
                if transport.get_write_buffer_size() > limit:
                    member.slow_consumer()
                    continue
                # What websockets.broadcast checks (open, no fragmented message going).
                protocol = ws.protocol
                if (protocol.state is not OPEN or ws.send_in_progress is not None
                        or protocol.expect_continuation_frame):
                    continue
                transport.write(entry[1])
            frames += 1
            nbytes += len(entry[0])
        if self.on_flush is not None and pending.ts is not None:
            self.on_flush(frames, nbytes, max(0.0, (self.clock_ms() - pending.ts) / 1000.0))

    def _count(self, frames: int, nbytes: int) -> None:
        if self.on_flush is not None:
            self.on_flush(frames, nbytes, -1.0)

    def _writable(self, members: Iterable[Member]) -> list[Member]:
        out: list[Member] = []
        for member in tuple(members):
            if member.buffered() > self.max_buffer:
                member.slow_consumer()
            else:
                out.append(member)
        return out

    # -- churn ---------------------------------------------------------------------
    def broadcast(self, ch: str, frame: dict[str, Any]) -> None:
        """Send one frame to every local member of ``ch`` (churn events)."""
        channel = self.channels.get(ch)
        if channel is None:
            return
        shared: dict[Format, str | bytes] = {}
        frames = nbytes = 0
        for member in self._writable(channel.members):
            data = shared.get(member.fmt)
            if data is None:
                data = shared[member.fmt] = encode(frame, member.fmt)
            member.write_frame(data, ch)
            frames += 1
            nbytes += len(data)
        self._count(frames, nbytes)


def _write(member: Member, data: str | bytes, ch: str) -> int:
    member.write_frame(data, ch)
    return len(data)
