"""The write path's connection to one master: a batch written at once, replies read in order.

The write batcher (cluster/redis_batch.py) sends one batch at a time, one pipeline per
master. A redis-py ``Pipeline`` per batch cost most of what the cluster path adds to an
update (the pipeline object, a connection from the pool, ``asyncio.wait_for`` around the
write), and a redis-py ``Connection`` used directly still did: its command packing in
Python, its stream writer and its reply read. Per round trip of one ``SPUBLISH`` on
loopback on this machine (``python -m loadtest.redis_wire``): 213 us of CPU through a
``Pipeline``, 119 us through a ``Connection``, 68 us here, where
``hiredis.pack_command`` writes to an ``asyncio.Protocol`` whose replies
``hiredis.Reader`` parses. So a :class:`NodePipe` owns one such connection per master
(the address, and the password and database when the client has them, taken from the
node client's pool settings).

One deadline covers each attempt, the connect, the write and every reply, of
``timeout`` seconds (the socket timeout of the configuration, or half the batcher's
deadline where that is shorter: two attempts fit in it). It must stay that
short, well under the call's deadline: the batcher has one batch in flight for the
whole process, so a frozen master would stall every write; and a batch that waited out
a freeze longer than the cluster's node timeout would be answered by a master about to
be demoted, whose writes the demotion may then drop (without this deadline the chaos
run's ``stop_master`` left views that never converged).

Replies are what redis-py's pipeline returned: the client's response callback for the
command applied (``SET`` -> ``True``), an error reply (``MOVED``, ``NOSCRIPT``, ...)
as the exception redis-py's parser makes of it, returned in its place; an error reply
that redis-py counts as a connection error (``LOADING``, too many clients) fails the
batch as a link failure.

One caller at a time: the batcher has one batch in flight, and a round sends to each
master once. A failure on the link (an error, the deadline, a cancellation) leaves the
connection closed, never out of step with its replies; the next batch opens it again.
A batch past its deadline is not written again (the master may run what sits in its
socket buffer when it wakes). Nor is a batch written on a new connection before the
master has answered a ``PING`` on it: a frozen master's kernel still completes TCP
connects, so batches written on the connections opened during a freeze would all wait
in its buffers and run when it wakes, in no order among themselves, a later leave
before an earlier join (the chaos run's ``stop_master`` found members left in the
Store for good that way). Only the batch written on the connection that was open when
the master froze can run late; it sits in the master's buffers before the ``PING`` of
any new connection does, so it runs before whatever is written after that answer. A
connection that was open before the batch and fails before any reply is read (the
server restarted, or dropped the idle client, since the last batch) is opened again
and the batch written once more, as redis-py's own retry did for the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

from cluster.redis_conn import open_transport, pack


class _Wire(asyncio.Protocol):
    """The socket's side: the replies of the batch in flight, collected in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(protocolError=InvalidResponse,
                                      replyError=BaseParser.parse_error)
        self._transport: asyncio.Transport | None = None
        self._want = 0
        self._replies: list[Any] = []
        self._done: asyncio.Future[list[Any]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved once the transport is closed (``connection_lost``)."""

    def attach(self, transport: asyncio.Transport) -> None:
        # Not connection_made: uvloop may call that after create_connection returned.
        self._transport = transport

    def send(self, packed: bytes, count: int, within: float) -> asyncio.Future[list[Any]]:
        """Write ``packed``; the future gets its ``count`` replies, or the link's error,
        or ``TimeoutError`` after ``within`` seconds (the link is then closed)."""
        if self.lost or self._transport is None or self._transport.is_closing():
            raise RedisConnectionError("connection closed")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._want, self._replies, self._done = count, [], done
        # A bare timer, not asyncio.timeout(): that cost a fifth of a round trip's CPU.
        self._timer = loop.call_later(max(within, 0.0), self._expire, within)
        self._transport.write(packed)
        return done

    def _expire(self, within: float) -> None:
        self._fail(TimeoutError(f"no reply within {within:.3g} s"))

    @property
    def attached(self) -> bool:
        return self._transport is not None

    @property
    def replied(self) -> bool:
        """Whether any reply of the batch in flight has been read."""
        return bool(self._replies)

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            reply = self._reader.gets()
            while reply is not False:
                done = self._done
                if done is None or done.done():
                    raise InvalidResponse("a reply nobody waits for")
                self._replies.append(reply)
                if len(self._replies) == self._want:
                    self._done = None
                    self._stop_timer()
                    done.set_result(self._replies)
                reply = self._reader.gets()
        except Exception as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection lost: {exc}" if exc else
                                        "connection closed by the server"))
        if not self.gone.done():
            self.gone.set_result(None)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        self._stop_timer()
        done, self._done = self._done, None
        if done is not None and not done.done():
            done.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.lost = True
        self._stop_timer()
        self._done = None
        if self._transport is not None:
            self._transport.abort()


class NodePipe:
    """See the module docstring; ``client`` is the master's plain client."""

    def __init__(self, client: Redis, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        pool: Any = client.connection_pool
        settings = pool.connection_kwargs
        self._addr: tuple[str, int] = (settings.get("host", "localhost"),
                                       int(settings.get("port", 6379)))
        self._connect_timeout: float | None = settings.get("socket_connect_timeout")
        self._preamble: list[tuple[Any, ...]] = []
        if settings.get("password"):
            user = settings.get("username")
            self._preamble.append(("AUTH", user, settings["password"]) if user
                                  else ("AUTH", settings["password"]))
        if settings.get("db"):
            self._preamble.append(("SELECT", settings["db"]))
        self._callbacks: Any = client.response_callbacks
        self._wire: _Wire | None = None

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order, an error reply as
        its ``ResponseError``. Raises on a link failure (connection, timeout, cancel)
        with the connection closed."""
        packed = b"".join([pack(args) for args in commands])
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            wire = self._wire
            was_open = attempt == 1 and wire is not None and not wire.lost
            deadline = loop.time() + self.timeout
            try:
                if wire is None or wire.lost:
                    async with asyncio.timeout_at(deadline):  # rare: no cost per batch
                        wire = await self._open()
                replies = await wire.send(packed, len(commands), deadline - loop.time())
                for reply in replies:
                    if isinstance(reply, RedisConnectionError):
                        # LOADING, too many clients: redis-py raises these as link errors.
                        raise reply
            except TimeoutError:
                # Never written again: the master may be frozen with the batch in its
                # socket buffer, and would run it twice once it wakes.
                self._drop()
                raise
            except (RedisConnectionError, OSError):
                replied = wire is not None and wire.replied
                self._drop()
                if was_open and not replied:
                    continue  # found closed (see the module docstring): once more
                raise
            except BaseException:
                # Replies left unread would answer the next batch's commands.
                self._drop()
                raise
            pairs = zip(commands, replies, strict=True)
            return [self._callback(args[0], reply) for args, reply in pairs]
        raise AssertionError("not reached: the second attempt returns or raises")

    def _callback(self, name: Any, reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            return reply
        callback = self._callbacks.get(name)
        return reply if callback is None else callback(reply)

    async def _open(self) -> _Wire:
        """Connect and run the preamble (under the caller's deadline): ``PING``, after
        ``AUTH`` and ``SELECT`` when the client has them."""
        wire = _Wire()
        self._wire = wire
        wire.attach(await open_transport(self._addr, wire, self._connect_timeout))
        # The PING is not a health check: a frozen master's kernel completes TCP
        # connects, and a batch written on such a connection would wait in its socket
        # buffer and run whenever it wakes, in any order against what other connections
        # left there (see the module docstring). No batch goes out before an answer.
        preamble = [*self._preamble, ("PING",)]
        packed = b"".join([pack(args) for args in preamble])
        for reply in await wire.send(packed, len(preamble), self.timeout):
            if isinstance(reply, Exception):
                raise RedisConnectionError(f"redis: connection set-up: {reply}")
        return wire

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

    async def close(self) -> None:
        """Close the connection; returns once the transport is closed (bounded)."""
        wire = self._wire
        self._drop()
        if wire is not None and wire.attached:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wire.gone), 1.0)
