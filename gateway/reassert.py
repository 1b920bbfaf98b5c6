"""Re-assertion: write this node's live connections into the Store again.

Needed whenever the Store may have lost what this node wrote: a promoted replica
(replication is asynchronous), a Redis restarted empty, a lease that lapsed while the
node was frozen and a survivor swept it. Writing a connection's record and metas again
is idempotent, and the joins it publishes are idempotent for every client.

A re-assertion must never land after the connection's departure: written after the
departure's removal, its metas would stay in the Store for good (a ghost no sweep
finds: the node is alive). So each connection's re-assertion runs in that connection's
:class:`Lanes` lane, and only while the connection is still in the node's live set; the
node takes the same lane to take a connection out of that set. Either the re-assertion
finishes first and the departure's removal comes after it, or the departure comes
first and the re-assertion skips the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import structlog

from cluster.base import Store
from gateway.ports import LocalConnection
from presence.errors import CloseCode

log = structlog.get_logger("presence.reassert")

Reput = Callable[[LocalConnection, "str | None"], Awaitable[None]]
"""Node.reput_metas: write a live connection's current metas again (all of them, or one
channel's), read only when that connection's writes are its to make (so a re-assertion
never writes, nor publishes after, a meta its connection has replaced meanwhile)."""
BATCH = 100
"""Connections re-asserted concurrently (bounded, so a big node does not flood Redis)."""


class Lanes:
    """One lock per connection id, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def exclusive(self, conn: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(conn, (asyncio.Lock(), 0))
        self._locks[conn] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[conn]
            if users == 1:
                del self._locks[conn]
            else:
                self._locks[conn] = (lock, users - 1)


async def reassert_channel(conns: Collection[LocalConnection], ch: str, reput: Reput,
                           lanes: Lanes) -> None:
    """Write again the meta of every connection in ``conns`` (the node's live set)
    that has joined ``ch``, each in its lane and only while it is still live."""
    for conn in list(conns):
        async with lanes.exclusive(conn.conn):
            if ch in conn.metas and conn in conns:
                await reput(conn, ch)


async def reassert_all(store: Store, owner: str, conns: Collection[LocalConnection],
                       reput: Reput, close_failed: bool, lanes: Lanes) -> None:
    """Write every connection's record and metas again (each in its lane, and only
    while it is still in ``conns``, the node's live set). With ``close_failed``, a
    connection that cannot be re-asserted is closed (1012, its client reconnects and
    so becomes visible again); without it the first failure is raised."""
    async def one(conn: LocalConnection) -> None:
        async with lanes.exclusive(conn.conn):
            if conn not in conns:
                return  # gone meanwhile: its departure removes what it had
            try:
                await store.add_connection(owner, conn.user, conn.conn)
                await reput(conn, None)
            except Exception as exc:
                if not close_failed:
                    raise
                log.warning("reassert_failed", conn=conn.conn, error=type(exc).__name__)
                conn.close_soon(CloseCode.SERVICE_RESTART, "server restarting; reconnect")

    todo = list(conns)
    for i in range(0, len(todo), BATCH):
        await asyncio.gather(*(one(c) for c in todo[i:i + BATCH]))
