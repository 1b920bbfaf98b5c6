"""One Redis link per process: the Topology and the write path the Store and the Broker
share.

Separately, the Store and the Broker each kept a slot map, a client per master with its
own connection pool, and a write batcher: an update's meta write and its publication
then went out as two pipelines per master in two different batches, and the per
pipeline cost (a syscall, redis-py's pipeline bookkeeping) was most of what the cluster
path costs over one process. Shared, the writes and publications of one loop turn go out
together, one pipeline per master, and a refresh of the slot map serves both.

:meth:`RedisLink.attach` and :meth:`RedisLink.detach` count the holders: the Topology is
started by the first holder's start and closed, with the batcher, when the last holder
detaches, whatever order the holders close in.
"""

from __future__ import annotations

import asyncio

from cluster.redis_batch import WriteBatcher
from cluster.redis_conn import RedisConfig, Topology


class RedisLink:
    """See the module docstring."""

    def __init__(self, config: RedisConfig) -> None:
        self.topology = Topology(config)
        self.batch = WriteBatcher(self.topology, config.op_timeout)
        self._holders: set[int] = set()
        self._started = False
        self._lock = asyncio.Lock()

    async def attach(self, holder: object) -> None:
        """Count ``holder`` in and start the Topology if nobody has yet (raises what
        the start raises; the holder stays counted until it detaches)."""
        async with self._lock:
            self._holders.add(id(holder))
            if not self._started:
                await self.topology.start()
                self._started = True

    async def detach(self, holder: object) -> None:
        """Count ``holder`` out; the last one out closes the batcher and the Topology."""
        async with self._lock:
            self._holders.discard(id(holder))
            if self._holders:
                return
            await self.batch.close()
            await self.topology.close()
            self._started = False
