"""The admin port's listener: bounds on what an idle or half-sent request can hold.

aiohttp alone waits forever for the first request head of a connection and accepts
connections without limit; the admin port shares the process's file descriptors with
the WebSocket port, so 19,000 half-sent requests once took 19,000 of 20,000 (issue 10).
This module adds, without touching aiohttp's request handling:

* a header deadline: a connection must deliver its first complete request head (up to
  the blank line) within :data:`HEADER_TIMEOUT` seconds of opening, else it is closed;
* a keep-alive bound: a connection idle between requests, or holding a partial next
  head, is closed :data:`KEEPALIVE_TIMEOUT` seconds after its last response
  (aiohttp's ``keepalive_timeout``, from :func:`handler_args`);
* a socket bound: at most :data:`MAX_CONNECTIONS` connections at once. A connection
  arriving at the bound evicts the oldest one still waiting for its first head (so a
  flood of half-sent requests cannot lock out the kubelet or Prometheus); when every
  connection is past its head, the newcomer is closed at once.

Bodies have their own deadline where a route reads one (gateway/http.py ``read_body``).
The values are module constants, not settings: they protect the process and have no
reason to differ between deployments (docs/operations.md, "Admin port limits").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

__all__ = [
    "HEADER_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "LINGERING_TIME",
    "MAX_CONNECTIONS",
    "AdminSite",
    "ConnectionGuard",
    "handler_args",
]

HEADER_TIMEOUT = 5.0
"""Seconds a new connection has to send its first complete request head."""
KEEPALIVE_TIMEOUT = 10.0
"""Seconds an idle keep-alive connection is kept after its last response."""
LINGERING_TIME = 2.0
"""Seconds spent reading the unread rest of a body after answering, before closing."""
MAX_CONNECTIONS = 256
"""Open connections on the admin port at most (probes and scrapes need a handful)."""


def handler_args() -> dict[str, Any]:
    """``web.Application(handler_args=...)`` for the admin app (read at call time)."""
    # lingering_time: how long aiohttp drains the unread rest of a refused body before
    # closing (its default, 10 s, lets a trickled body hold the socket that long).
    return {"keepalive_timeout": KEEPALIVE_TIMEOUT, "lingering_time": LINGERING_TIME}


class _Guarded(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: admission, first-head deadline."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]
                 ) -> None:
        self.guard = guard
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.head_done = False
        self.counted = False  # admitted and not yet released
        self._tail = b""
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        if not self.guard.admit(self):
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.guard.header_timeout, self._expire)
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        self._deadline = None
        if not self.head_done and self.transport is not None:
            self.guard.timed_out += 1
            self.transport.abort()  # free the descriptor now; nothing is owed to it

    def data_received(self, data: bytes) -> None:
        if not self.head_done:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._head_complete()
            else:
                self._tail = seen[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def _head_complete(self) -> None:
        self.head_done = True
        self._tail = b""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.started(self)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.release(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)


class ConnectionGuard:
    """Book-keeping of one listener's connections (see the module docstring).

    ``waiting`` holds the connections still before their first head, oldest first;
    ``open`` counts every admitted connection. ``evicted``, ``refused`` and
    ``timed_out`` count what the guard closed (for tests and logs).
    """

    def __init__(self, limit: int, header_timeout: float) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.open = 0
        self.waiting: dict[_Guarded, None] = {}
        self.evicted = self.refused = self.timed_out = 0

    def admit(self, conn: _Guarded) -> bool:
        """Admit ``conn``, evicting the oldest waiting connection at the bound;
        False (the caller closes it) when every open connection is past its head."""
        if self.open >= self.limit:
            if not self.waiting:
                self.refused += 1
                return False
            oldest = next(iter(self.waiting))
            self.evicted += 1
            self._forget(oldest)
            if oldest.transport is not None:
                oldest.transport.abort()
        self.open += 1
        conn.counted = True
        self.waiting[conn] = None
        return True

    def started(self, conn: _Guarded) -> None:
        """``conn`` delivered its first head: no longer evictable."""
        self.waiting.pop(conn, None)

    def release(self, conn: _Guarded) -> None:
        """``conn`` closed (idempotent)."""
        self._forget(conn)

    def _forget(self, conn: _Guarded) -> None:
        if conn.counted:
            conn.counted = False
            self.open -= 1
        self.waiting.pop(conn, None)


class AdminSite(web.BaseSite):
    """A TCP site like ``web.TCPSite`` whose connections go through a
    :class:`ConnectionGuard`. ``limit`` and ``header_timeout`` default to
    :data:`MAX_CONNECTIONS` and :data:`HEADER_TIMEOUT` as they are when the site is made.
    """

    __slots__ = ("_host", "_port", "guard")

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 limit: int | None = None, header_timeout: float | None = None,
                 backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.guard = ConnectionGuard(
            MAX_CONNECTIONS if limit is None else limit,
            HEADER_TIMEOUT if header_timeout is None else header_timeout,
        )

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() first"
        guard = self.guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guarded(guard, server), self._host, self._port, backlog=self._backlog)
