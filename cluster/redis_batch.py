"""Store writes of one event-loop turn, sent as one plain pipeline per Redis master.

Each awaited cluster pipeline of redis-py takes a connection of its own: a thousand
concurrent updates a second opened hundreds of connections per master, and the
connection churn and per-pipeline slot bookkeeping cost more than the writes. Here
callers hand over their commands (each with the key that routes it); the commands of
every caller of one loop turn are grouped by owning master and sent as one
non-transactional pipeline per master, the pipelines running concurrently, one batch in
flight at a time (so one caller's commands, and successive batches, keep their order).

A caller gets the replies of its own commands, or :class:`BackendUnavailable` when any
of them failed (connection error, timeout, ``MOVED`` after a failover: the slot map is
then refreshed in the background and later batches go to the new owner).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from cluster.base import BackendUnavailable
from cluster.redis_conn import Addr, Topology, guarded

Command = tuple[str, tuple[Any, ...]]
"""(routing key, command arguments)."""

_Item = tuple[list[Command], asyncio.Future[list[Any]]]


class WriteBatcher:
    """See the module docstring."""

    def __init__(self, topology: Topology, timeout: float) -> None:
        self.redis = topology
        self.timeout = timeout
        self._queue: list[_Item] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` with the others of this loop turn; their replies in order."""
        if not commands:
            return []
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((list(commands), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="redis-store-batch")
        return await fut

    async def close(self) -> None:
        task = self._flusher
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendUnavailable):
                await task
        for _cmds, fut in self._queue:
            if not fut.done():
                fut.set_exception(BackendUnavailable("store closed"))
                fut.exception()
        self._queue.clear()

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other writers of this loop turn join in
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._send(batch)
            except Exception as exc:  # never leave a caller waiting
                for _cmds, fut in batch:
                    if not fut.done():
                        fut.set_exception(BackendUnavailable(f"redis: {exc}"))

    async def _send(self, batch: list[_Item]) -> None:
        replies: list[list[Any]] = [[None] * len(cmds) for cmds, _fut in batch]
        failed: dict[int, BackendUnavailable] = {}
        groups: dict[Addr, list[tuple[int, int, tuple[Any, ...]]]] = {}
        for i, (cmds, _fut) in enumerate(batch):
            for j, (key, args) in enumerate(cmds):
                try:
                    addr = self.redis.owner(key)
                except BackendUnavailable as exc:
                    failed.setdefault(i, exc)
                    continue
                groups.setdefault(addr, []).append((i, j, args))

        async def send(addr: Addr, items: list[tuple[int, int, tuple[Any, ...]]]) -> None:
            pipe: Any = self.redis.node_client(addr).pipeline(transaction=False)
            for _i, _j, args in items:
                pipe.execute_command(*args)
            try:
                results = await guarded(pipe.execute(raise_on_error=False), self.timeout)
            except BackendUnavailable as exc:
                for i, _j, _a in items:
                    failed.setdefault(i, exc)
                return
            for (i, j, _a), res in zip(items, results, strict=True):
                if isinstance(res, Exception):  # MOVED, CLUSTERDOWN, a script error ...
                    failed.setdefault(i, BackendUnavailable(f"redis: {res}"))
                else:
                    replies[i][j] = res

        await asyncio.gather(*(send(a, items) for a, items in groups.items()))
        for i, (_cmds, fut) in enumerate(batch):
            if fut.done():
                continue
            if i in failed:
                fut.set_exception(failed[i])
                fut.exception()  # the caller may have given up waiting
            else:
                fut.set_result(replies[i])
        if failed:
            self.redis.refresh_soon()
