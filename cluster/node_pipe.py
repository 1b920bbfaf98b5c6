"""The write path's connection to one master: a batch written at once, replies read in order.

The write batcher (cluster/redis_batch.py) sends one batch at a time, one pipeline per
master. A redis-py ``Pipeline`` per batch cost most of what the cluster path adds to
an update: the pipeline object and its command stack, a connection taken from and given
back to the pool, and, with a socket timeout set, ``asyncio.wait_for`` around the write
(a task per write) and a timeout around every reply read. Measured on this machine
with one redis-server on loopback, per round trip of one to three commands: 130-210 us
of CPU through ``Pipeline.execute`` against 88-127 us on the same library's
``Connection`` used directly.

So a :class:`NodePipe` holds one redis-py ``Connection`` of its own per master (made
from the node client's pool settings, not taken from the pool) without the library's
socket timeout: one deadline covers each attempt instead, the write and every reply,
of ``timeout`` seconds (the socket timeout of the configuration). It must stay that
short, well under the call's deadline: the batcher has one batch in flight for the
whole process, so a frozen master would stall every write; and a batch that waited out
a freeze longer than the cluster's node timeout would be answered by a master about to
be demoted, whose writes the demotion may then drop (without this deadline the chaos
run's ``stop_master`` left views that never converged; redis-py's read timeout had
bounded each attempt the same way). Replies go through the node
client's own ``parse_response``, so they are what the pipeline returned (the command's
response callback applied; an error reply such as ``MOVED`` or ``NOSCRIPT`` returned as
its exception object, in its place).

One caller at a time: the batcher has one batch in flight, and a round sends to each
master once. A failure on the link (an error, the deadline, a cancellation) leaves the
connection closed, never out of step with its replies; the next batch opens it again.
A batch past its deadline is not written again (the master may run what sits in its
socket buffer when it wakes). A connection that was open before the batch and fails
before any reply is read (the server restarted, or dropped the idle client, since the
last batch) is opened again and the batch written once more, as redis-py's own retry
did for the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


class NodePipe:
    """See the module docstring; ``client`` is the master's plain client."""

    def __init__(self, client: Redis, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        pool: Any = client.connection_pool
        settings = dict(pool.connection_kwargs)
        settings["socket_timeout"] = None  # one deadline per attempt instead (execute)
        self._conn: Any = pool.connection_class(**settings)

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order, an error reply as
        its ``ResponseError``. Raises on a link failure (connection, timeout, cancel)
        with the connection closed."""
        conn = self._conn
        packed = conn.pack_commands(commands)
        for attempt in (1, 2):
            was_open = attempt == 1 and conn.is_connected
            replies: list[Any] = []
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.send_packed_command(packed, check_health=False)
                    for args in commands:
                        try:
                            replies.append(await self.client.parse_response(conn, args[0]))
                        except ResponseError as exc:
                            replies.append(exc)
                return replies
            except TimeoutError:
                # Never written again: the master may be frozen with the batch in its
                # socket buffer, and would run it twice once it wakes.
                await conn.disconnect(nowait=True)
                raise
            except (RedisConnectionError, OSError):
                await conn.disconnect(nowait=True)
                if was_open and not replies:
                    continue  # found closed (see the module docstring): once more
                raise
            except BaseException:
                # Replies left unread would answer the next batch's commands.
                await conn.disconnect(nowait=True)
                raise
        raise AssertionError("not reached: the second attempt returns or raises")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.disconnect(nowait=True)
