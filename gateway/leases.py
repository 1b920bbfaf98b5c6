"""This node's lease, the sweeping of dead nodes, and self-sweep detection.

Contract:

* The lease is refreshed every ``node_lease / 4`` seconds with a lifetime of
  ``max(0.8 * node_lease, resume_ttl)`` (so a node that dies is swept within
  ``max(node_lease, resume_ttl)``, its connections resumable until then).
* A refresh that finds the lease had lapsed means this node was frozen (GC pause, CPU
  throttling, partition) long enough for others to sweep it: every live connection is
  re-asserted at once (connection record, metas, joins published), and once more a
  lease period later in case a sweep was still removing records when we woke. A
  connection that cannot be re-asserted is closed (1012) so that its client reconnects
  rather than stay invisible.
* Sweeping: any node may sweep a dead one; the Store hands the claim to exactly one.
  The swept metas' leaves are published *before* the claim is finished, so a sweeper
  that dies or fails to publish leaves the claim to expire and another sweeper to
  publish them again (duplicated leaves are harmless; lost ones leave ghosts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from cluster.base import Store, SweptMeta
from gateway.metrics import Metrics
from gateway.ports import now_ms
from presence.messages import encode_leave

log = structlog.get_logger("presence.leases")

Publish = Callable[[list[tuple[str, bytes]]], Awaitable[None]]


class Leases:
    """Lease refresh, self-sweep detection and the sweeper of one node."""

    def __init__(
        self,
        store: Store,
        owner: str,
        lease: float,
        publish: Publish,
        reassert_all: Callable[[], Awaitable[None]],
        connections: Callable[[], int],
        clock_ms: Callable[[], int] = now_ms,
        hold: float = 0.0,
        swept: Callable[[list[SweptMeta]], None] = lambda swept: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.lease = lease
        self.hold = hold
        self.swept = swept  # told what each sweep removed (webhook events)
        self.metrics = metrics
        self.publish = publish
        self.reassert_all = reassert_all
        self.connections = connections
        self.clock_ms = clock_ms
        self.self_sweeps = 0
        self._later: asyncio.Task[None] | None = None

    @property
    def ttl(self) -> float:
        # At least the resume hold: a dead node's connections are held (resumable)
        # from its last refresh, and swept once the lease lapses.
        return max(self.lease * 0.8, self.hold)

    async def release(self) -> None:
        """Clean stop. Without holds the lease is given up (nothing is left to sweep);
        with them it is refreshed one last time for ``hold`` seconds, so the
        connections just closed with 1012 stay resumable elsewhere until then and a
        survivor sweeps what nobody resumed."""
        if self.hold > 0:
            await self.store.refresh_lease(self.owner, self.hold, self.clock_ms(), 0)
        else:
            await self.store.drop_lease(self.owner)

    async def refresh(self) -> bool:
        """Refresh the lease; False when it had lapsed (or did not exist)."""
        return await self.store.refresh_lease(
            self.owner, self.ttl, self.clock_ms(), self.connections())

    async def lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 4)
            try:
                alive = await self.refresh()
            except Exception as exc:
                log.warning("lease_refresh_failed", error=type(exc).__name__)
                continue
            if not alive:
                await self.on_lapsed()

    async def on_lapsed(self) -> None:
        """Our lease lapsed: re-assert every live connection now and once more later."""
        self.self_sweeps += 1
        log.warning("lease_lapsed_reasserting", node=self.owner)
        await self.reassert_all()
        if self._later is None or self._later.done():
            self._later = asyncio.ensure_future(self._reassert_later())

    async def _reassert_later(self) -> None:
        await asyncio.sleep(self.lease)
        await self.reassert_all()

    async def sweep_loop(self) -> None:
        interval = min(1.0, self.lease / 10)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("sweep_failed", error=type(exc).__name__)

    async def sweep_once(self) -> int:
        """Sweep every dead node this call can claim; returns the metas swept."""
        now = self.clock_ms()
        count = 0
        for node in await self.store.dead_nodes(now):
            if node == self.owner:
                continue
            swept = await self.store.sweep_node(node, now)
            if swept is None:
                continue
            await self.publish([(s.ch, encode_leave(s.user, s.conn, s.last_seen or now, now))
                                for s in swept if s.ch])
            await self.store.sweep_finish(node)
            if self.metrics is not None:
                self.metrics.leaves.labels("node_died").inc(len({s.conn for s in swept if s.ch}))
            self.swept(swept)
            count += len(swept)
            log.info("node_swept", dead_node=node, metas=len(swept))
        return count

    async def close(self) -> None:
        if self._later is not None:
            self._later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._later
