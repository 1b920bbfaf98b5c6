"""The writing half of a client connection: frames out without waiting, bounded.

Every frame to the client (replies, diffs, churn events) is written without waiting
(``websockets.broadcast``), so a client that does not read never blocks the node; its
unsent buffer is checked against ``max_buffer`` after each write and the connection
closed with 1008 when it passes it. A server-initiated close takes at most
:data:`CLOSE_TIMEOUT` seconds, after which the TCP connection is cut.

:class:`Outbound` is the hub's :class:`~gateway.hub.Member` surface; the session
(gateway/session.py) builds on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import ServerConnection

from gateway.ports import NodeServices
from presence.codec import Format, encode
from presence.connection import Connection
from presence.errors import CloseCode

CLOSE_TIMEOUT = 2.0
"""Seconds a server-initiated close may take before the TCP connection is cut."""


class Outbound:
    """Writes to one client; ``core`` decides which frames are held back (a join in
    flight) and is told when the connection is closing."""

    __slots__ = ("close_code", "close_reason", "closing", "conn", "core", "fmt", "node",
                 "settings", "ws")

    def __init__(self, ws: ServerConnection, node: NodeServices, fmt: Format,
                 conn: str, core: Connection) -> None:
        self.ws = ws
        self.node = node
        self.fmt = fmt
        self.settings = node.settings
        self.conn = conn
        self.core = core
        self.closing = False
        self.close_code: int | None = None
        self.close_reason = ""

    def write_frame(self, data: str | bytes, ch: str | None = None) -> None:
        if self.closing or self.core.hold(ch, data):
            return
        broadcast([self.ws], data)
        if self.buffered() > self.settings.transport.max_buffer:
            self.slow_consumer()

    def direct(self, ch: str) -> ServerConnection | None:
        if self.closing or ch in self.core.backlog:
            return None
        return self.ws

    def buffered(self) -> int:
        transport = self.ws.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def slow_consumer(self) -> None:
        if self.closing:
            return
        self.node.metrics.slow_consumers.inc()
        self.close_soon(CloseCode.POLICY_VIOLATION, "slow consumer: unsent buffer too large")

    def send(self, frame: dict[str, Any]) -> None:
        data = encode(frame, self.fmt)
        self.write_frame(data)
        self.node.stats.count_out(1, len(data))

    def close_soon(self, code: int, reason: str) -> None:
        """Stop writing and close in the background (never blocks the caller)."""
        if self.closing:
            return
        self._closing(code, reason)
        self.node.background(self._close(code, reason))

    def _closing(self, code: int, reason: str) -> None:
        self.closing = True
        self.core.closed = True
        self.close_code = code
        self.close_reason = reason
        self.node.metrics.count_close(code)

    async def _close(self, code: int, reason: str) -> None:
        # websockets' close() drains the write buffer first, with no deadline: a client
        # that stopped reading would keep the connection (and its buffer) forever.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code, reason)
        except Exception:
            self.abort()

    def abort(self) -> None:
        if self.ws.transport is not None:
            self.ws.transport.abort()
