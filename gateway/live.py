"""A node's connections from registration to their end (PROTOCOL.md "Resume").

- :class:`Live`: the sessions this node serves, at most one per connection id;
- :class:`Connections`: registering a session, and what its end does: hold it for
  resume (a loss), forget it (a clean end, or a hold that expired), or nothing (it
  was superseded).

Superseded: a resume may hand a connection back to the node that served it before that
node has noticed the loss (under load a dead socket is found out late). Two sessions
then carry one connection id and only the newer one owns it: the older is cut, and its
end must neither hold nor forget what the newer one carries on.

Forgetting: the record and its resume token go first (no resume is accepted after the
leaves), then the metas and their leaves; a connection another node resumed meanwhile
(:data:`cluster.base.RESUMED_ELSEWHERE`) keeps its metas for that node's adoption.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Sequence
from typing import Any

from cluster.base import RESUMED_ELSEWHERE, Adopted, Store
from gateway.holds import Held, Holds
from gateway.metrics import Metrics
from gateway.ports import LocalConnection, now_ms
from gateway.reassert import Lanes
from gateway.subscriptions import Subscriptions
from gateway.transitions import Transitions
from gateway.writes import RetryQueue

DropPresence = Callable[[str, str, Sequence[str], bool, int | None], Awaitable[list[str]]]
"""Node.drop_presence: remove a connection's metas from channels, publish the leaves."""
Retrying = Callable[[Callable[[], Awaitable[int]]], Awaitable[int]]
"""A Store write retried through a failover (Node._retrying)."""


class Live(Collection[LocalConnection]):
    """The node's live sessions, at most one per connection id."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[str, LocalConnection] = {}

    def add(self, conn: LocalConnection) -> LocalConnection | None:
        """Add ``conn``; the session it supersedes (same id), now removed, or None."""
        old = self._by_id.get(conn.conn)
        self._by_id[conn.conn] = conn
        return old if old is not conn else None

    def discard(self, conn: LocalConnection) -> None:
        """Remove ``conn`` (nothing if it was superseded, or never added)."""
        if self._by_id.get(conn.conn) is conn:
            del self._by_id[conn.conn]

    def carries(self, conn_id: str) -> bool:
        """Whether a live session has the id ``conn_id`` (a session that ended and finds
        its id here was superseded)."""
        return conn_id in self._by_id

    def __contains__(self, conn: object) -> bool:
        key = getattr(conn, "conn", None)
        return isinstance(key, str) and self._by_id.get(key) is conn

    def __iter__(self) -> Iterator[LocalConnection]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)


class Connections:
    """Registration and end of this node's connections (see the module docstring)."""

    def __init__(self, store: Store, owner: str, *, resume_ttl: float, lanes: Lanes,
                 subscriptions: Subscriptions, writes: RetryQueue, transitions: Transitions,
                 metrics: Metrics, retrying: Retrying, drop_presence: DropPresence,
                 background: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.store, self.owner = store, owner
        self.live = Live()
        self._lanes, self._subscriptions, self._writes = lanes, subscriptions, writes
        self._transitions, self._metrics = transitions, metrics
        self._retrying, self._drop_presence = retrying, drop_presence
        # Lost connections are held here for resume_ttl, or by the lease once we are gone.
        self.holds = Holds(resume_ttl, self._expire, background, metrics)

    async def register(self, conn: LocalConnection, resume_hash: str, resumed: bool) -> int:
        """Record ``conn`` live here and in the Store; the user's connection count."""
        if resumed:
            # Live before the write: a stale session of this id ending during it must
            # see that it is superseded. (A fresh id has no stale session, and is live
            # only once written: a re-assertion must not record a connection whose
            # registration may yet fail.)
            superseded = self.live.add(conn)
            if superseded is not None:
                superseded.abort()  # its client came back on another socket
        try:
            count = await self._retrying(lambda: self.store.add_connection(
                self.owner, conn.user, conn.conn, resume_hash))
        except BaseException:
            self.live.discard(conn)
            raise
        self.live.add(conn)
        self._metrics.connections.set(len(self.live))
        if count == 1 and not resumed:  # the user's first live connection in the cluster
            self._transitions.online(conn.user)
        return count

    async def unregister(self, conn: LocalConnection, channels: Sequence[str],
                         cause: str) -> None:
        """``conn`` ended (``cause``: "lost", "expired" or "closed"): leave its channels
        here, then hold it, forget it, or nothing if it was superseded."""
        async with self._lanes.exclusive(conn.conn):  # after any re-assertion of it
            self.live.discard(conn)
        self._metrics.connections.set(len(self.live))
        presence = [ch for ch in channels if ch in conn.metas]
        for ch in channels:
            await self._subscriptions.leave(ch, conn)
        if self.live.carries(conn.conn):  # superseded: a newer session's now
            return
        if cause == "lost" and self.holds.enabled:
            self.holds.hold(conn.conn, conn.user, presence, now_ms())
            return
        await self._forget(conn.user, conn.conn, presence, cause, now_ms())

    async def resume(self, user: str, token: str) -> tuple[Adopted | None, str]:
        return await self.holds.resume(self.store, self.owner, user, token)

    def _expire(self, cid: str, held: Held) -> Coroutine[Any, Any, None]:
        return self._forget(held.user, cid, held.channels, "lost", held.lost_at)

    async def _forget(self, user: str, cid: str, presence: list[str], cause: str,
                      last_seen: int) -> None:
        left: list[int | None] = []  # remove_connection's answer, kept across retries

        async def forget() -> None:
            left[:] = left or [await self.store.remove_connection(self.owner, user, cid)]
            if left[0] != RESUMED_ELSEWHERE and await self._drop_presence(
                    user, cid, presence, True, last_seen):
                self._metrics.leaves.labels(cause).inc()
            if left[0] == 0:
                self._transitions.offline(user, last_seen, cause)

        await self._writes.attempt((cid, ""), forget)
