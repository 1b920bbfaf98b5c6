"""Re-assertion: write this node's live connections into the Store again.

Needed whenever the Store may have lost what this node wrote: a promoted replica
(replication is asynchronous), a Redis restarted empty, a lease that lapsed while the
node was frozen and a survivor swept it. Writing a connection's record and metas again
is idempotent, and the joins it publishes are idempotent for every client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping

import structlog

from cluster.base import Store
from gateway.ports import LocalConnection
from presence.errors import CloseCode
from presence.meta import Meta

log = structlog.get_logger("presence.reassert")

PutMetas = Callable[[str, Mapping[str, Meta]], Awaitable[None]]
BATCH = 100
"""Connections re-asserted concurrently (bounded, so a big node does not flood Redis)."""


async def reassert_channel(conns: Iterable[LocalConnection], ch: str, put_metas: PutMetas) -> None:
    """Write again the meta of every connection in ``conns`` that has joined ``ch``."""
    for conn in list(conns):
        meta = conn.metas.get(ch)
        if meta is not None:
            await put_metas(conn.user, {ch: meta})


async def reassert_all(store: Store, owner: str, conns: Iterable[LocalConnection],
                       put_metas: PutMetas, close_failed: bool) -> None:
    """Write every connection's record and metas again. With ``close_failed``, a
    connection that cannot be re-asserted is closed (1012, its client reconnects and
    so becomes visible again); without it the first failure is raised."""
    async def one(conn: LocalConnection) -> None:
        try:
            await store.add_connection(owner, conn.user, conn.conn)
            await put_metas(conn.user, dict(conn.metas))
        except Exception as exc:
            if not close_failed:
                raise
            log.warning("reassert_failed", conn=conn.conn, error=type(exc).__name__)
            conn.close_soon(CloseCode.SERVICE_RESTART, "server restarting; reconnect")

    todo = list(conns)
    for i in range(0, len(todo), BATCH):
        await asyncio.gather(*(one(c) for c in todo[i:i + BATCH]))
