"""Engagement signals for the churn model, written beside the presence traffic.

Sessions, devices and online minutes (presence/engagement.py) are written in the
background: a slow or failing backend must never delay or break a connection, so a
failed write is only logged (the figures then miss a sample). The feed reads its store
and clock at each signal (tests script whole days with a fake clock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import structlog

from cluster.engagement import EngagementStore

log = structlog.get_logger("presence.engagement")


class EngagementFeed:
    """Background writer of one node's engagement signals, to the store and at the
    time its two callables give (read at each signal: tests swap both)."""

    def __init__(self, store: Callable[[], EngagementStore], clock_ms: Callable[[], int]) -> None:
        self._store = store
        self._clock = clock_ms
        self._pending: set[asyncio.Future[None]] = set()

    def opened(self, user: str) -> None:
        """A connection of ``user`` opened: count a session, online this minute."""
        self._write("opened", _opened(self._store(), user, self._clock()))

    def device(self, user: str, device: str) -> None:
        """A join or update of ``user`` carried ``device``."""
        self._write("device", self._store().record_device(user, device, self._clock()))

    def _write(self, what: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(_logged(what, coro))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait until the writes started so far are done (or failed)."""
        while self._pending:
            await asyncio.gather(*self._pending)

    async def tick(self, users: Iterable[str]) -> int:
        """Mark ``users`` online for the current minute (one batched call); returns
        the number of users marked."""
        marked = sorted(set(users))
        if marked:
            await _logged("tick", self._store().mark_online(marked, self._clock()))
        return len(marked)

    @staticmethod
    async def loop(tick: Callable[[], Awaitable[int]]) -> None:
        """Call ``tick`` just after each wall-clock minute begins (a plain 60 s period
        drifts and now and then would skip a minute of a user connected all along)."""
        while True:
            await asyncio.sleep(60.5 - time.time() % 60)
            await tick()


async def _opened(store: EngagementStore, user: str, now: int) -> None:
    await store.record_session(user, now)
    await store.mark_online([user], now)


async def _logged(what: str, aw: Awaitable[None]) -> None:
    """Await an engagement write; log (never raise) its failure."""
    try:
        await aw
    except Exception as exc:
        log.warning("engagement_write_failed", what=what, error=type(exc).__name__)
