"""What a node and its local connections need of each other.

The node (gateway/node.py and the duty modules beside it) never imports the session
module, and the session never imports the node: each sees the other through the small
protocol here. That keeps the import graph a tree and lets either side be tested with
the other replaced.

- :class:`LocalConnection`: what the node needs of one local connection (the hub's
  :class:`~gateway.hub.Member` writing surface, plus its user and current metas, to
  re-assert them after a backend gap or a lapsed lease, and a way to close it).
- :class:`NodeServices`: what a session needs of the node: registration, entering and
  leaving channels, meta writes, snapshots, queries, accounting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from cluster.base import Adopted, BackendUnavailable
from gateway.auth import Authenticator
from gateway.engagement_feed import EngagementFeed
from gateway.hub import Member
from gateway.metrics import Metrics
from gateway.reads import Reads
from gateway.stats import NodeStats
from presence.meta import Meta
from presence.ratelimit import SlidingWindow
from presence.settings import Settings

BackendError = (BackendUnavailable, ConnectionError, OSError, asyncio.TimeoutError)
"""Exceptions from the backends that mean "unavailable", not "bug"."""


def now_ms() -> int:
    """The server clock: milliseconds since the epoch (the protocol's times)."""
    return int(time.time() * 1000)


class LocalConnection(Member, Protocol):
    """A connection served by this node, as the node sees it."""

    user: str

    @property
    def metas(self) -> Mapping[str, Meta]:
        """This connection's current meta in every presence channel it has joined."""
        ...

    def close_soon(self, code: int, reason: str) -> None:
        """Close the connection in the background with ``code`` (never blocks)."""
        ...

    def abort(self) -> None:
        """Cut the TCP connection now, without a closing handshake."""
        ...

    def expire_if_due(self, ms: int) -> None:
        """Close with 4001 "token expired" if the token's deadline passed at ``ms``."""
        ...

    async def drain(self, jitter: float) -> None:
        """Node shutdown: end this connection with 1012 and a reconnect hint."""
        ...


class NodeServices(Protocol):
    """The node as a session uses it. Methods that touch the backends raise the
    backend's "unavailable" errors (``gateway.node.BackendError``) or
    :class:`~presence.errors.Overloaded`; the session turns those into ``overloaded``."""

    settings: Settings
    node_id: str
    metrics: Metrics
    auth: Authenticator
    stats: NodeStats
    """Traffic figures: ``stats.count_in(nbytes)``, ``stats.count_out(frames, nbytes)``."""
    reads: Reads
    """Join snapshots (``reads.snapshot(ch, fresh)``: ``fresh`` reads the Store, else
    the node may answer a re-join from its mirror) and ``reads.query_users(users)``."""
    feed: EngagementFeed
    """Engagement signals: ``feed.opened(user)`` after a welcome, ``feed.device(user,
    device)`` when a join or update names a device."""

    @property
    def draining(self) -> bool:
        """True once the node stops accepting connections (SIGTERM)."""
        ...

    def new_conn_id(self) -> str:
        """A connection id unique across the cluster and over time."""
        ...

    def connection_count(self) -> int:
        """Connections registered on this node now."""
        ...

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a short task (a close, say), keeping a reference until it ends."""
        ...


    def check_backend(self) -> None:
        """Raise :class:`~presence.errors.Overloaded` while the backend is known down."""
        ...

    def join_limiter(self, user: str) -> SlidingWindow:
        """The per-user join window (``joins_per_minute``) shared by the user's local
        connections."""
        ...

    async def register(self, conn: LocalConnection, resume_hash: str, resumed: bool) -> int:
        """Record an authenticated connection (Store and local set) with the hash of its
        resume token ("" keeps the stored one: a resume wrote it; ``resumed``: the
        connection was adopted by a resume, not new); return the
        user's connection count across the cluster, this one included. On an
        exception nothing is registered."""
        ...

    async def unregister(self, conn: LocalConnection, channels: Sequence[str],
                         cause: str) -> None:
        """The connection ended: leave every channel in ``channels`` (presence and
        churn) locally. ``cause`` "lost" (no clean end) holds its metas for
        ``resume_ttl`` (gateway/holds.py); any other cause ("closed", "expired")
        removes the metas of the presence channels (those of ``conn.metas`` at the
        call), publishes their leaves and forgets the connection. Never raises: a
        Store write that fails is queued and retried until done."""
        ...

    async def resume(self, user: str, token: str) -> tuple[Adopted | None, str]:
        """Adopt the connection ``token`` (a resume token of ``user``) names, wherever
        it was: its channels with their metas, and its new resume token; ``(None,
        "")`` when it cannot be resumed (unknown, used, expired, another user's, or
        the backend is down)."""
        ...

    async def enter(self, ch: str, member: LocalConnection, meta: Meta | None) -> None:
        """Make ``member`` a local member of ``ch`` once the node's subscription to it
        is active; with ``meta`` (a presence channel) store and publish it as a join.
        On an exception the member is not in ``ch`` and nothing was published."""
        ...

    async def exit(self, ch: str, member: LocalConnection, had_meta: bool, last: bool) -> None:
        """``member`` leaves ``ch``; with ``had_meta`` its meta is removed and the leave
        published (``last``: the connection has no presence channel left, so the
        user's last-seen is set). Never raises for a failed Store write: it is queued
        and retried until done."""
        ...

    async def put_metas(self, user: str, metas: Mapping[str, Meta]) -> None:
        """Store a connection's changed metas (channel -> meta) and publish them."""
        ...

