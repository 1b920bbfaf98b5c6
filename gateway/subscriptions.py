"""The node's broker subscriptions: one per channel with local members.

Contract:

* :meth:`Subscriptions.join` returns only once the node's subscription to the channel
  is active (every joiner waits for it, not only the first), so a member never reads
  a snapshot while changes to the channel could still be missed.
* A subscription that fails is retried, with backoff, for as long as the channel has
  local members; a joiner waits at most ``wait`` seconds and then gets the error
  (and is not a member), while the retries go on for the others.
* The last member leaving unsubscribes. Subscribes and unsubscribes of one channel
  never overlap: a join right after the last leave waits for that unsubscribe first.
"""

from __future__ import annotations

import asyncio

import structlog

from cluster.base import BackendUnavailable, Broker
from gateway.hub import Hub, Member
from gateway.metrics import Metrics

log = structlog.get_logger("presence.subscriptions")


class Subscriptions:
    """Channel -> subscription state for one node."""

    def __init__(self, broker: Broker, hub: Hub, metrics: Metrics, wait: float = 5.0) -> None:
        self.broker = broker
        self.hub = hub
        self.metrics = metrics
        self.wait = wait
        self._active: dict[str, asyncio.Task[None]] = {}
        self._closing: dict[str, asyncio.Task[None]] = {}

    def active(self, ch: str) -> bool:
        task = self._active.get(ch)
        return task is not None and task.done() and not task.cancelled()

    async def join(self, ch: str, member: Member) -> None:
        """Add ``member`` to ``ch`` and wait until the channel's subscription is active."""
        self.hub.add(ch, member)
        self._gauge()
        task = self._active.get(ch)
        if task is None:
            task = self._active[ch] = asyncio.ensure_future(self._subscribe(ch))
        try:
            if task.done():
                # The channel's subscription is up (the common case, every join but a
                # channel's first on this node): no timer and no shield to pay for.
                task.result()
            else:
                async with asyncio.timeout(self.wait):
                    await asyncio.shield(task)
        except BaseException as exc:
            await self.leave(ch, member)
            if isinstance(exc, TimeoutError):
                raise BackendUnavailable(f"subscription to {ch} not active") from exc
            raise

    async def leave(self, ch: str, member: Member) -> None:
        """Remove ``member`` from ``ch``; unsubscribe when it was the last one."""
        last = self.hub.remove(ch, member)
        self._gauge()
        if not last:
            return
        task = self._active.pop(ch, None)
        if task is not None and not task.done():
            task.cancel()
        closing = self._closing[ch] = asyncio.ensure_future(self._unsubscribe(ch, task))
        try:
            await asyncio.shield(closing)
        finally:
            if self._closing.get(ch) is closing and closing.done():
                del self._closing[ch]

    def _gauge(self) -> None:
        self.metrics.channels.set(len(self.hub.channels))
        self.metrics.members.set(self.hub.member_count())

    async def _subscribe(self, ch: str) -> None:
        closing = self._closing.get(ch)
        if closing is not None:
            await asyncio.wait([closing])
        delay = 0.1
        while True:
            try:
                await self.broker.subscribe(ch)
                return
            except Exception as exc:
                log.warning("subscribe_failed", ch=ch, error=type(exc).__name__,
                            retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _unsubscribe(self, ch: str, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            # Let a cancelled subscribe finish unwinding before the unsubscribe goes out.
            await asyncio.wait([task])
        try:
            await self.broker.unsubscribe(ch)
        except Exception as exc:
            # A stale subscription only costs messages the hub ignores (no members).
            log.warning("unsubscribe_failed", ch=ch, error=type(exc).__name__)

    async def close(self) -> None:
        tasks = [*self._active.values(), *self._closing.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._active.clear()
        self._closing.clear()
