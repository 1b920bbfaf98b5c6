"""The one Redis write path: commands of one event-loop turn, one plain pipeline per master.

Each awaited cluster pipeline of redis-py takes a connection of its own: a thousand
concurrent updates a second opened hundreds of connections per master, and the
connection churn and per-pipeline slot bookkeeping cost more than the writes. Here
callers (the Store's writes, the Broker's publications) hand over their commands, each
with the key that routes it; the commands of every caller of one loop turn are grouped
by owning master and sent as one non-transactional pipeline per master (on the write
path's own connection to it, cluster/node_pipe.py), the pipelines
running concurrently, one batch in flight at a time (so one caller's commands, and
successive batches, keep their order). Each pipeline's deadline is the pipe's own: at
most two attempts of the socket timeout each, or of half the batcher's deadline where
that is shorter.

Replies that name another node are followed, not counted as failures (at most
:data:`MAX_ROUNDS` rounds per batch):

* ``MOVED slot host:port`` (a failover, a finished migration): the command is sent to
  that node and the slot map is re-read in the background, so later batches go there
  directly;
* ``ASK slot host:port`` (the slot is being migrated and the key is already on the
  target): ``ASKING`` then the command on that node, once;
* ``TRYAGAIN`` (a multi-key command during a migration): sent again after a short pause;
* ``NOSCRIPT`` to an ``EVALSHA`` (a node that never saw the script): sent again as
  ``EVAL``.

A caller gets the replies of its own commands, or :class:`BackendUnavailable` when any
of them failed (connection error, timeout, an error reply, redirections beyond the
bound).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import AskError, MovedError, NoScriptError, TryAgainError

from cluster.base import BackendUnavailable
from cluster.node_pipe import NodePipe
from cluster.redis_conn import Addr, Topology, as_eval, guarded

Command = tuple[str, tuple[Any, ...]]
"""(routing key, command arguments)."""

MAX_ROUNDS = 5
"""Sends of one command at most: the first and four redirections or retries."""

TRYAGAIN_PAUSE = 0.05
"""Seconds before a ``TRYAGAIN`` command is sent again (a migration is in progress)."""

_Item = tuple[list[Command], asyncio.Future[list[Any]]]


@dataclass(slots=True)
class _Send:
    """One command of the batch on its way: whose it is and where it goes now."""

    caller: int
    index: int
    addr: Addr
    args: tuple[Any, ...]
    asking: bool = False


class WriteBatcher:
    """See the module docstring."""

    def __init__(self, topology: Topology, timeout: float) -> None:
        self.redis = topology
        self.timeout = timeout
        self._queue: list[_Item] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._pipes: dict[Addr, NodePipe] = {}
        self.redirected: Counter[str] = Counter()
        """Commands sent again, by reason (``MOVED``, ``ASK``, ``TRYAGAIN``,
        ``NOSCRIPT``): a figure for tests and diagnostics."""

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` with the others of this loop turn; their replies in order."""
        if not commands:
            return []
        if self._closed:
            raise BackendUnavailable("redis: closed")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((list(commands), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="redis-write-batch")
        return await fut

    async def close(self) -> None:
        self._closed = True
        task = self._flusher
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendUnavailable):
                await task
        for _cmds, fut in self._queue:
            if not fut.done():
                fut.set_exception(BackendUnavailable("redis: closed"))
                fut.exception()
        self._queue.clear()
        pipes = list(self._pipes.values())
        self._pipes.clear()
        for pipe in pipes:
            await pipe.close()

    def _pipe(self, addr: Addr) -> NodePipe:
        """The connection of the write path to ``addr``; a new one when the Topology
        has replaced that master's client (a refresh dropped it as stale)."""
        client = self.redis.node_client(addr)
        pipe = self._pipes.get(addr)
        if pipe is None or pipe.client is not client:
            if pipe is not None:
                asyncio.get_running_loop().create_task(pipe.close())
            # Two attempts (cluster/node_pipe.py) fit in the batcher's own deadline.
            within = min(self.redis.config.socket_timeout, self.timeout / 2)
            pipe = self._pipes[addr] = NodePipe(client, within)
        return pipe

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
                        fut.exception()

    async def _send(self, batch: list[_Item]) -> None:
        replies: list[list[Any]] = [[None] * len(cmds) for cmds, _fut in batch]
        failed: dict[int, BackendUnavailable] = {}
        todo: list[_Send] = []
        for i, (cmds, _fut) in enumerate(batch):
            for j, (key, args) in enumerate(cmds):
                try:
                    todo.append(_Send(i, j, self.redis.owner(key), args))
                except BackendUnavailable as exc:
                    failed.setdefault(i, exc)

        for round_ in range(MAX_ROUNDS):
            todo = [s for s in todo if s.caller not in failed]
            if not todo:
                break
            retry = await self._round(todo, replies, failed, last=round_ == MAX_ROUNDS - 1)
            if retry and any(isinstance(e, TryAgainError) for e, _s in retry):
                await asyncio.sleep(TRYAGAIN_PAUSE)
            todo = [s for _e, s in retry]

        for i, (_cmds, fut) in enumerate(batch):
            if fut.done():
                continue
            if i in failed:
                fut.set_exception(failed[i])
                fut.exception()  # the caller may have given up waiting
            else:
                fut.set_result(replies[i])

    async def _round(
        self, todo: list[_Send], replies: list[list[Any]],
        failed: dict[int, BackendUnavailable], last: bool,
    ) -> list[tuple[Exception, _Send]]:
        """Send ``todo`` (one pipeline per node); record replies and failures; return
        the commands to send again, with the reply that says where."""
        groups: dict[Addr, list[_Send]] = {}
        for s in todo:
            groups.setdefault(s.addr, []).append(s)
        retry: list[tuple[Exception, _Send]] = []

        async def send(addr: Addr, items: list[_Send]) -> None:
            commands: list[tuple[Any, ...]] = []
            for s in items:
                if s.asking:
                    commands.append(("ASKING",))
                commands.append(s.args)
            try:
                # No timer of its own: the pipe bounds each of its two attempts.
                results = await guarded(self._pipe(addr).execute(commands), None)
            except BackendUnavailable as exc:
                self.redis.refresh_soon()  # the node may be gone (failover)
                for s in items:
                    failed.setdefault(s.caller, exc)
                return
            it = iter(results)
            for s in items:
                if s.asking:
                    next(it)  # the reply to ASKING
                res = next(it)
                if not isinstance(res, Exception):
                    replies[s.caller][s.index] = res
                    continue
                again = None if last else _redirect(s, res)
                if again is None:
                    failed.setdefault(s.caller, BackendUnavailable(f"redis: {res}"))
                    continue
                if isinstance(res, MovedError):
                    self.redis.refresh_soon()
                self.redirected[_reason(res)] += 1
                retry.append((res, again))

        if len(groups) == 1:  # most batches: no task to run one send
            ((addr, items),) = groups.items()
            await send(addr, items)
        else:
            await asyncio.gather(*(send(a, items) for a, items in groups.items()))
        # Keep the batch's order among the commands sent again.
        retry.sort(key=lambda r: (r[1].caller, r[1].index))
        return retry


def _redirect(s: _Send, reply: Exception) -> _Send | None:
    """Where and how to send ``s`` again after the error ``reply``, or None (a failure)."""
    if isinstance(reply, MovedError):
        return _Send(s.caller, s.index, (reply.host, int(reply.port)), s.args)
    if isinstance(reply, AskError):
        return _Send(s.caller, s.index, (reply.host, int(reply.port)), s.args, asking=True)
    if isinstance(reply, TryAgainError):
        return _Send(s.caller, s.index, s.addr, s.args, s.asking)
    if isinstance(reply, NoScriptError):
        fallback = as_eval(s.args)
        if fallback is not None:
            return _Send(s.caller, s.index, s.addr, fallback, s.asking)
    return None


def _reason(reply: Exception) -> str:
    if isinstance(reply, MovedError):
        return "MOVED"
    if isinstance(reply, AskError):
        return "ASK"
    if isinstance(reply, TryAgainError):
        return "TRYAGAIN"
    return "NOSCRIPT"
