"""Store writes that must eventually happen: queued when they fail, retried until done.

A connection that closed or left a channel while the backend was failing over still
owes the Store a removal (and everyone a leave). Such a write is never dropped: it is
kept under a key (the connection, and the channel or ``""``) and retried with backoff
until it succeeds. A newer write for the same key replaces the queued one, and
:meth:`RetryQueue.cancel` drops it (a connection that joins the channel again must not
see its new meta removed by an old, late leave).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

log = structlog.get_logger("presence.writes")

Write = Callable[[], Awaitable[None]]
"""A write to retry: a callable making a fresh awaitable for every attempt."""

Key = tuple[str, str]
"""(connection id, channel or "") identifying what a queued write is about."""

T = TypeVar("T")


async def retrying(make: Callable[[], Awaitable[T]], budget: float,
                   retryable: tuple[type[BaseException], ...],
                   usable: Callable[[], bool]) -> T:
    """Await ``make()``, retried with backoff on ``retryable`` errors for at most
    ``budget`` seconds and only while ``usable()`` (the backend is within its grace):
    a client's write rides through a short failover instead of failing at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    delay = 0.1
    while True:
        try:
            return await make()
        except retryable:
            if loop.time() + delay > deadline or not usable():
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


class RetryQueue:
    """Failed writes, retried in order of first failure until each succeeds.

    The queue's loop runs while the queue is not empty; :meth:`kick` makes it try at
    once (after the backend came back). Writes never run concurrently with each other.
    """

    def __init__(self, min_delay: float = 0.2, max_delay: float = 5.0) -> None:
        self._pending: dict[Key, Write] = {}
        self._min = min_delay
        self._max = max_delay
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: Key, write: Write) -> None:
        """Queue ``write`` (replacing what was queued under ``key``)."""
        self._pending.pop(key, None)
        self._pending[key] = write
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        self._wake.set()

    async def attempt(self, key: Key, write: Write) -> None:
        """Run ``write`` now; if it fails, queue it (never raises for its failure)."""
        try:
            await write()
        except Exception as exc:
            log.warning("write_queued", key=key, error=type(exc).__name__)
            self.add(key, write)

    def cancel(self, key: Key) -> None:
        """Forget the write queued under ``key``, if any."""
        self._pending.pop(key, None)

    async def settle(self, key: Key) -> None:
        """Run the write queued under ``key`` now, if any, and forget it once done;
        if it fails it stays queued and its error is raised.

        What a new write about the same key needs first: a connection that left a
        channel while the Store was failing, and joins it again, must have its old
        meta removed and the leave published BEFORE the new join. Dropping the queued
        leave instead would leave every other member holding the old meta, whose
        higher ``seq`` then shadows the new join's forever.
        """
        write = self._pending.get(key)
        if write is None:
            return
        await write()
        if self._pending.get(key) is write:
            del self._pending[key]

    def kick(self) -> None:
        """Retry now rather than after the current backoff."""
        self._wake.set()

    async def run_now(self) -> None:
        """Try every queued write once, in order (used when the backend returned)."""
        for key, write in list(self._pending.items()):
            if self._pending.get(key) is not write:
                continue
            try:
                await write()
            except Exception as exc:
                self.failures += 1
                log.info("write_retry_failed", key=key, error=type(exc).__name__)
                return
            if self._pending.get(key) is write:
                del self._pending[key]

    async def _run(self) -> None:
        delay = self._min
        while self._pending:
            self._wake.clear()
            before = len(self._pending)
            await self.run_now()
            if not self._pending:
                break
            delay = self._min if len(self._pending) < before else min(delay * 2, self._max)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
