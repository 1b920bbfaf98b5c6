"""The gateway process: WebSocket server on the public port, admin API, shutdown.

:class:`Gateway` is used both by the CLI and, in-process on port 0, by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from cluster.base import Broker, Store
from cluster.factory import make_backend
from gateway.admin_server import AdminSite
from gateway.keepalive import Keepalive
from gateway.logs import timed_step
from gateway.node import Node
from gateway.session import Session
from gateway.static_files import SECURITY_HEADERS, static_response
from gateway.transport import WRITE_LIMIT, BufferPolicy, bounded_connections
from presence.codec import SUBPROTOCOLS, Format
from presence.errors import CloseCode
from presence.settings import Settings

log = structlog.get_logger("presence.server")

WS_PATH = "/ws"

FD_RESERVE = 1024
"""File descriptors kept free of WebSocket connections: the admin port's bound (256),
sockets still in their opening handshake (bounded by websockets' 10 s open timeout),
backend connections, logs. Without them, the process hits EMFILE in ``accept`` before it
can answer 1013."""


def connection_cap(max_connections: int, nofile: int) -> int:
    """WebSocket connections, authenticated or not, that one process admits:
    ``max_connections``, lowered when the file-descriptor limit ``nofile`` cannot hold
    them plus :data:`FD_RESERVE` (a negative ``nofile`` means unlimited). At least 1."""
    if nofile < 0 or nofile == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, nofile - FD_RESERVE))


def _plain(connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
    """A plain-text answer on the public port, with the same security headers as the
    static files (the port is also the dashboard's origin)."""
    response = connection.respond(status, text)
    for name, value in SECURITY_HEADERS:
        response.headers[name] = value
    return response


def select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """The first subprotocol the client offers that we speak; None (JSON) otherwise.

    websockets' default refuses a client offering none when subprotocols are set; the
    protocol says such a client gets JSON, hence this function.
    """
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return None


class Gateway:
    """One gateway process: node, public WebSocket server, admin HTTP server."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        store: Store | None = None,
    ) -> None:
        if broker is None or store is None:
            broker, store = make_backend(settings)
        self.settings = settings
        self.node = Node(settings, broker, store)
        self.server: Server | None = None
        self.admin_runner: web.AppRunner | None = None
        self.autoscaler: Any = None
        self.port = settings.transport.port
        self.admin_port = settings.transport.admin_port
        self.stopped = asyncio.Event()
        self.connection_cap = settings.transport.max_connections

    async def _handler(self, ws: ServerConnection) -> None:
        # Every open WebSocket counts, before ``hello`` too: an unauthenticated socket
        # holds a file descriptor and memory like any other.
        if self.server is not None and len(self.server.all_connections) > self.connection_cap:
            self.node.metrics.count_close(CloseCode.TRY_AGAIN_LATER)
            try:
                async with asyncio.timeout(2):
                    await ws.close(CloseCode.TRY_AGAIN_LATER, "overloaded, reconnect later")
            except TimeoutError:
                ws.transport.abort()
            return
        fmt = Format.for_subprotocol(ws.subprotocol)
        await Session(ws, self.node, fmt).run()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            if "upgrade" not in request.headers.get("Connection", "").lower():
                return _plain(connection, HTTPStatus.UPGRADE_REQUIRED, "WebSocket endpoint\n")
            return None
        if path == "/healthz":
            return _plain(connection, HTTPStatus.OK, "ok\n")
        response = static_response(path)
        if response is not None:
            return response
        return _plain(connection, HTTPStatus.NOT_FOUND, "not found\n")

    async def start(self) -> None:
        """Admin API first (liveness answers while the backend is awaited), then the
        node, then the public listener."""
        s = self.settings.transport
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.connection_cap = connection_cap(s.max_connections, nofile)
        if self.connection_cap < s.max_connections:
            log.warning("connection_cap_lowered", max_connections=s.max_connections,
                        nofile=nofile, reserve=FD_RESERVE, cap=self.connection_cap)
        await self._start_admin()
        await self.node.start()
        if self.autoscaler is not None:
            self.autoscaler.start()
        self.server = await serve(
            self._handler,
            s.host,
            s.port,
            subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS],
            select_subprotocol=select_subprotocol,
            process_request=self._process_request,
            # permessage-deflate triples memory per connection and slows fan-out 4.5x.
            compression=None,
            max_size=s.max_frame,
            # Reading pauses while the write buffer is above write_limit, and a client
            # that lets it stay above max_buffer, or reads nothing for ping_timeout,
            # is closed (gateway/transport.py): a ping flood cannot grow memory.
            create_connection=bounded_connections(BufferPolicy(
                max_buffer=s.max_buffer,
                stall_timeout=s.ping_timeout,
                on_overflow=self._on_overflow,
            )),
            write_limit=WRITE_LIMIT,
            # One keepalive task for every connection (gateway/keepalive.py) instead of
            # websockets' task per connection: 1.5 KB less per idle connection.
            ping_interval=None,
            close_timeout=2,
            server_header=None,
            # asyncio's default of 100 overflows under a reconnect storm: clients then
            # wait for SYN retransmits (1 s, 3 s, 7 s ...).
            backlog=s.listen_backlog,
        )
        server = self.server
        self.node.run_duty(Keepalive(lambda: server.all_connections, s.ping_interval,
                                     s.ping_timeout).loop())
        sock = next(iter(self.server.sockets))
        self.port = sock.getsockname()[1]
        log.info("listening", host=s.host, port=self.port, admin_port=self.admin_port,
                 node=self.node.node_id)

    def _on_overflow(self, reason: str) -> None:
        self.node.metrics.slow_consumers.inc()
        log.info("slow_consumer_closed", reason=reason)

    async def _start_admin(self) -> None:
        from gateway.app import build_admin

        app, self.autoscaler = build_admin(self.node)
        self.admin_runner = web.AppRunner(app, access_log=None)
        await self.admin_runner.setup()
        t = self.settings.transport
        site = AdminSite(self.admin_runner, t.admin_host, t.admin_port)
        await site.start()
        addresses = self.admin_runner.addresses
        if addresses:
            self.admin_port = int(addresses[0][1])

    async def drain(self) -> None:
        """SIGTERM: refuse new connections, publish our members' leaves, close every
        connection with 1012 and a jittered reconnect hint, within ``drain_timeout``."""
        node = self.node
        if node.draining:
            return
        node.draining = True
        log.info("draining", connections=len(node.sessions))
        if self.server is not None:
            self.server.close(close_connections=False)
        sessions = list(node.sessions)
        jitter = self.settings.lifetime.reconnect_jitter
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.lifetime.drain_timeout):
                await asyncio.gather(*(s.drain(jitter) for s in sessions))
                node.hub.flush_all()
                if self.server is not None:
                    await self.server.wait_closed()
        # Whatever did not close in time is cut.
        for s in list(node.sessions):
            s.abort()

    async def stop(self) -> None:
        with timed_step(log, "drain", self.settings.lifetime.drain_timeout + 0.5):
            await self.drain()
        if self.autoscaler is not None:
            with timed_step(log, "autoscaler", 1.0), contextlib.suppress(Exception):
                await self.autoscaler.stop()
        if self.admin_runner is not None:
            with timed_step(log, "admin", 1.0):
                await self.admin_runner.cleanup()
        await self.node.stop()
        self.stopped.set()
        log.info("stopped", node=self.node.node_id)


__all__ = ["Gateway", "select_subprotocol"]
