"""One client connection: the executor of its protocol state machine.

The protocol itself (authentication rules, quotas, rate limits, joins, leaves,
updates, the hold-back of diffs during a join, errors and abuse closes) lives in
:class:`presence.connection.Connection`, with no I/O. The session reads frames from the
WebSocket, feeds them to that core and executes the effects it returns against the node
(:class:`gateway.ports.NodeServices`) and the socket.

Writing to the client, bounded and without waiting, is :class:`gateway.outbound.Outbound`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from cluster.base import Adopted
from gateway.auth import bearer_token
from gateway.holds import new_token, token_hash
from gateway.outbound import CLOSE_TIMEOUT, Outbound
from gateway.ports import BackendError, NodeServices, now_ms
from presence import connection as pc
from presence.codec import Format
from presence.connection import Connection, Effect
from presence.errors import (
    CloseCode,
    InternalError,
    LimitExceeded,
    Overloaded,
    PresenceError,
    RateLimited,
    error_frame,
)
from presence.meta import Meta

log = structlog.get_logger("presence.session")

ABUSE_CLOSES = frozenset({CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG,
                          CloseCode.MALFORMED, CloseCode.UNAUTHORIZED})
"""Server close codes that are a clean end (PROTOCOL.md: bad token, abuse)."""



class Session(Outbound):
    """The server side of one WebSocket connection."""

    __slots__ = ("_done", "_finished", "registered", "user")

    def __init__(self, ws: ServerConnection, node: NodeServices, fmt: Format) -> None:
        conn = node.new_conn_id()
        super().__init__(ws, node, fmt, conn,
                         Connection(conn, node.settings.quotas, time.monotonic()))
        self.user = ""
        self.registered = False
        self._finished: asyncio.Event | None = None
        self._done = False

    @property
    def metas(self) -> Mapping[str, Meta]:
        return self.core.metas

    @property
    def finished(self) -> asyncio.Event:
        """Set once the connection is cleaned up (made on demand: tests and drains)."""
        if self._finished is None:
            self._finished = asyncio.Event()
            if self._done:
                self._finished.set()
        return self._finished

    # -- lifecycle -------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until it closes; always cleans up."""
        node = self.node
        node.metrics.connections_opened.inc()
        try:
            if node.draining:
                await self._refuse(CloseCode.SERVICE_RESTART, "server restarting")
                return
            if node.connection_count() >= self.settings.transport.max_connections:
                await self._refuse(CloseCode.TRY_AGAIN_LATER, "overloaded, reconnect later")
                return
            if not await self._authenticate():
                return
            # recv() in a loop, not ``async for``: the iterator's async generator stays
            # suspended with the connection, 300 bytes for nothing.
            ws = self.ws
            while True:
                message = await ws.recv()
                node.stats.count_in(len(message))
                if not self.closing:
                    await self._execute(
                        self.core.receive(message, self.fmt, time.monotonic(), now_ms()))
                del message  # not kept alive by this frame while the next one is awaited
        except ConnectionClosed:
            pass
        except Exception:
            # A bug or a backend failure outside any request: say so, do not hang.
            log.exception("session_failed", conn=self.conn)
            if not self.closing:
                with contextlib.suppress(Exception):
                    await self._refuse(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await self._cleanup()

    async def _refuse(self, code: int, reason: str) -> None:
        self._closing(code, reason)
        await self._close(code, reason)

    async def _authenticate(self) -> bool:
        """Wait for ``hello``, verify the token, register; False if the socket closed."""
        try:
            async with asyncio.timeout(self.settings.auth.auth_timeout):
                message = await self.ws.recv()
        except TimeoutError:
            await self._refuse(CloseCode.UNAUTHORIZED, "no hello in time")
            return False
        self.node.stats.count_in(len(message))
        try:
            hello = Connection.hello(message, self.fmt)
            header = self.ws.request.headers.get("Authorization") if self.ws.request else None
            claims = self.node.auth.verify(hello.token or bearer_token(header))
        except PresenceError as exc:
            log.info("auth_failed", conn=self.conn, reason=exc.message)
            await self._refuse(CloseCode.UNAUTHORIZED, exc.message[:120])
            return False
        self.user = claims.user
        self.core.authenticated(claims, self.node.join_limiter)
        # The handshake's headers (~2.5 KB a connection) are not needed past
        # authentication; websockets keeps them only for the application's use (the
        # request object itself must stay: websockets reads "no request" as "handshake
        # not done").
        if self.ws.request is not None:
            self.ws.request.headers.clear()
        self.ws.response = None
        if self.ws.state is not State.OPEN:
            return False  # the client left while its hello waited: nothing to register
        adopted, token = (None, "")
        if hello.resume is not None:  # a connection lost in the last resume_ttl seconds?
            adopted, token = await self.node.resume(self.user, hello.resume)
        digest = ""  # a resume has stored its new token's hash already
        if adopted is not None:
            self.conn = self.core.conn = adopted.conn
        else:
            token, digest = new_token(self.conn)
        count = await self.node.register(self, digest, adopted is not None)
        self.registered = True
        if adopted is not None and hello.resume and self.ws.state is not State.OPEN:
            await self._hold_unwelcomed(adopted, hello.resume)
            return False
        t, lifetime = self.settings.transport, self.settings.lifetime
        resumed = None if hello.resume is None else adopted is not None
        await self._execute(self.core.registered(
            count, hello.ref, self.node.node_id, t.ping_interval, t.max_frame,
            (token, lifetime.resume_ttl, resumed)))
        if adopted is not None:
            for effect in self.core.resumed(adopted.channels):
                if not self.closing:  # a failed channel closes the connection (held)
                    await self._execute([effect])
        if self.closing:  # the close must go out before the handler returns (with 1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                    await self.ws.wait_closed()
            return False
        self.node.feed.opened(self.user)  # engagement: a session, online now
        log.info("connection_open", conn=self.conn, user=self.user, role=claims.role,
                 format=self.fmt.value)
        return True

    async def _hold_unwelcomed(self, adopted: Adopted, presented: str) -> None:
        """The client went away while its resume was being adopted (it gave up waiting
        for the ``welcome``, as clients do in a reconnect storm): the new token can
        never reach it, so the token it holds is made good again, and the connection
        is held as it was, with every adopted channel (the end of the session holds
        them: nothing adopted may stay in the Store unowned). A ``welcome`` already
        written spends the token, as PROTOCOL.md says; this is only the one never
        sent."""
        for ch, meta in adopted.channels.items():
            self.core.entered(ch, meta)
        await self.node.register(self, token_hash(presented), True)

    def expire_if_due(self, ms: int) -> None:
        """The node's expiry loop (gateway/expiry.py): 4001 once the token expired."""
        effects = self.core.expired(ms, self.settings.lifetime.token_leeway)
        if effects and not self.closing:
            self.node.background(self._execute(effects))

    async def _cleanup(self) -> None:
        node = self.node
        was_member = self.registered
        if self.registered:
            await node.unregister(self, self.core.joined_channels(), self._cause())
        self.core.end()
        code = self.ws.close_code
        if code is not None and not self.closing:
            node.metrics.count_close(code)
        if was_member:
            log.info("connection_close", conn=self.conn, user=self.user, code=code,
                     reason=self.close_reason or self.ws.close_reason or "")
        self._done = True
        if self._finished is not None:
            self._finished.set()

    def _cause(self) -> str:
        """How the connection ended: "lost" (no clean end: held for resume),
        "expired" (its token) or "closed" (PROTOCOL.md "Resume")."""
        if self.close_code is not None:  # closed by us
            if self.close_code == CloseCode.SERVICE_RESTART:
                return "lost"  # a drain: the client resumes elsewhere
            return "expired" if self.close_reason == "token expired" else "closed"
        rcvd, sent = self.ws.protocol.close_rcvd, self.ws.protocol.close_sent
        if rcvd is not None:  # the client's close: 1001 (going away) is a loss
            return "lost" if rcvd.code in (1001, 1006) else "closed"
        if sent is not None and sent.code in ABUSE_CLOSES:
            return "closed"  # the library closed it for abuse (frame too big, flood)
        return "lost"  # no close frame, late pong

    async def drain(self, jitter: float) -> None:
        """Node shutdown: close with 1012 and a reconnect hint of a random delay, so
        clients do not all return at once; they resume elsewhere (the connection is
        held). With resume off the metas are removed first (leaves published)."""
        delay = random.uniform(0, jitter)
        if self.settings.lifetime.resume_ttl > 0:
            self.close_soon(CloseCode.SERVICE_RESTART,
                            f"server restarting; reconnect in {delay:.1f}s")
        else:
            await self._execute(self.core.drain(delay))

    # -- effects ---------------------------------------------------------------------
    async def _execute(self, effects: list[Effect]) -> None:
        """Run ``effects`` in order; the first that fails ends the list and its error
        goes back to the core (see presence/connection.py)."""
        for effect in effects:
            try:
                more = await self._run(effect)
            except PresenceError as exc:
                await self._failed(effect, exc)
                return
            except BackendError as exc:
                log.warning("backend_error", conn=self.conn, error=type(exc).__name__,
                            detail=str(exc)[:200], effect=type(effect).__name__)
                await self._failed(effect, Overloaded("backend unavailable, retry later",
                                                      retry_after=2.0))
                return
            except ConnectionClosed:
                raise
            except Exception:
                log.exception("request_failed", conn=self.conn)
                await self._failed(effect, InternalError("internal error"))
                return
            if more:
                await self._execute(more)

    async def _failed(self, effect: Effect, error: PresenceError) -> None:
        await self._execute(self.core.failed(effect, error, time.monotonic()))

    async def _run(self, effect: Effect) -> list[Effect] | None:
        node = self.node
        if isinstance(effect, pc.Send):
            self.send(effect.frame)
        elif isinstance(effect, pc.Deliver):  # held back during the join
            self.write_frame(effect.data)
            node.stats.count_out(1, len(effect.data))
        elif isinstance(effect, pc.Fail):
            self._error(effect.error, effect.ref)
        elif isinstance(effect, pc.Close):
            self.close_soon(effect.code, effect.reason)
        elif isinstance(effect, pc.Enter):
            node.check_backend()
            await node.enter(effect.ch, self, effect.meta)
            self.core.entered(effect.ch, effect.meta)
        elif isinstance(effect, pc.Adopt):
            await node.enter(effect.ch, self, None)
        elif isinstance(effect, pc.Snapshot):
            body = await node.reads.snapshot(effect.ch, effect.fresh)
            return self.core.snapshot_ready(effect.ch, effect.ref, body)
        elif isinstance(effect, pc.Exit):
            await node.exit(effect.ch, self, effect.had_meta, effect.last)
        elif isinstance(effect, pc.PutMetas):
            node.check_backend()
            await node.put_metas(self.user, effect.metas)
        elif isinstance(effect, pc.QueryUsers):
            users = await node.reads.query_users(effect.users)
            self.send({"t": "result", "ref": effect.ref, "users": users})
        elif isinstance(effect, pc.Verify):
            claims = node.auth.verify(effect.token)
            return self.core.refreshed(claims, effect.ref)
        elif isinstance(effect, pc.DeviceUsed):  # engagement: devices used
            node.feed.device(self.user, effect.device)
        return None

    def _error(self, exc: PresenceError, ref: int | None) -> None:
        metrics = self.node.metrics
        metrics.errors.labels(exc.code).inc()
        if isinstance(exc, RateLimited | LimitExceeded):
            metrics.rate_limited.labels(exc.code).inc()
        self.send(error_frame(exc, ref))
