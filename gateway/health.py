"""Backend health as the node acts on it: probing, the readiness grace, recovery.

Contract:

* The backends are probed every second (a probe longer than 3 s counts as failed).
* :meth:`Health.usable` is True while the backend answers, and for ``grace`` seconds
  after it stopped answering: a Redis failover (a few seconds) neither takes the pod
  out of the Service nor turns requests away; writes in that window are retried by
  the node for a bounded time. Past the grace, readiness fails and requests get
  ``overloaded`` at once.
* When the backend answers again after having failed, ``on_recovered`` runs once
  (the node refreshes its lease, re-asserts its connections, retries queued writes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.metrics import Metrics
from gateway.ports import BackendError as BACKEND_DOWN

log = structlog.get_logger("presence.health")


async def until_connected(*starts: Callable[[], Awaitable[None]]) -> None:
    """Run the backends' ``start`` calls in order, all again with backoff (up to 5 s)
    until every one succeeds: a gateway started before Redis stays alive (and not
    ready) instead of exiting."""
    delay = 0.5
    while True:
        try:
            for start in starts:
                await start()
            return
        except BACKEND_DOWN as exc:
            # The error's text names what is wrong (refused, WRONGPASS, NOAUTH, ...).
            log.warning("backend_unavailable_at_start", error=f"{type(exc).__name__}: {exc}",
                        retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Health:
    """Tracks whether the backend answers, and since when it does not."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        grace: float,
        metrics: Metrics,
        on_recovered: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.grace = grace
        self.metrics = metrics
        self.on_recovered = on_recovered
        self.clock = clock
        self.ok = False
        self.down_since: float | None = clock()
        metrics.backend_up.set(0)

    def usable(self) -> bool:
        """The backend answers, or stopped answering less than ``grace`` seconds ago."""
        return self.down_since is None or self.clock() - self.down_since < self.grace

    def mark(self, ok: bool) -> None:
        """Record a probe's (or a start-up connection's) outcome."""
        if ok:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = self.clock()
        self.ok = ok
        self.metrics.backend_up.set(1 if ok else 0)

    def force(self, ok: bool) -> None:
        """Set the state as a probe past the grace would (operators' tests, drills)."""
        self.mark(ok)
        if not ok:
            self.down_since = self.clock() - self.grace

    async def loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(3.0):
                    ok = await self.probe()
            except Exception:
                ok = False
            was = self.ok
            self.mark(ok)
            if ok and not was:
                log.info("backend_recovered")
                try:
                    await self.on_recovered()
                except Exception as exc:
                    log.warning("recovery_failed", error=type(exc).__name__)
                    self.ok = False  # run the recovery again after the next probe
            elif was and not ok:
                log.warning("backend_unavailable")
            await asyncio.sleep(1.0)
