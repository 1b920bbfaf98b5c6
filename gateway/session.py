"""One client connection: authentication, request dispatch, replies and cleanup.

Requests of one connection are handled one at a time, in order. Every frame to the
client (replies, diffs, churn events) is written without waiting
(``websockets.broadcast``), so a client that does not read never blocks the node; its
unsent buffer is checked against ``max_buffer`` and the connection closed with 1008
when it passes it.

While a ``join`` is in flight the channel's diffs for this connection are held back and
written right after the ``joined`` reply, so the client always gets the snapshot first.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import structlog
from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.auth import QUERY_ROLES, Claims, bearer_token
from gateway.ports import BackendError, NodeServices, now_ms
from presence.channels import channel_allowed, is_churn
from presence.codec import Format, decode, encode
from presence.errors import (
    BadRequest,
    CloseCode,
    Forbidden,
    InternalError,
    LimitExceeded,
    MalformedFrame,
    NotJoined,
    Overloaded,
    PresenceError,
    RateLimited,
    Unauthorized,
    error_frame,
)
from presence.frames import Hello, Join, Leave, Ping, Query, Update, parse_ref, parse_request
from presence.meta import Meta, MetaPatch, new_meta
from presence.ratelimit import SlidingWindow, TokenBucket

log = structlog.get_logger("presence.session")

CLOSE_TIMEOUT = 2.0
"""Seconds a server-initiated close may take before the TCP connection is cut."""


class Session:
    """The server side of one WebSocket connection."""

    def __init__(self, ws: ServerConnection, node: NodeServices, fmt: Format) -> None:
        self.ws = ws
        self.node = node
        self.fmt = fmt
        self.settings = node.settings
        self.conn = node.new_conn_id()
        self.user = ""
        self.claims: Claims | None = None
        self.metas: dict[str, Meta] = {}
        self.churn_channels: set[str] = set()
        self.current = MetaPatch()
        self.backlog: dict[str, list[str | bytes]] = {}
        self.closing = False
        self.registered = False
        self.malformed = 0
        self.close_reason = ""
        self._finished: asyncio.Event | None = None
        self._done = False
        now = time.monotonic()
        s = self.settings
        self.updates = TokenBucket(s.quotas.updates_per_second, s.quotas.updates_burst, now)
        # Created on the first error: most connections never make one (memory per
        # connection is a target, and a deque costs ~600 bytes).
        self.errors: SlidingWindow | None = None

    __slots__ = (
        "_done", "_finished", "backlog", "churn_channels", "claims", "close_reason",
        "closing", "conn", "current", "errors", "fmt", "malformed", "metas", "node",
        "registered", "settings", "updates", "user", "ws",
    )

    def __hash__(self) -> int:
        return id(self)

    @property
    def finished(self) -> asyncio.Event:
        """Set once the connection is cleaned up (made on demand: tests and drains)."""
        if self._finished is None:
            self._finished = asyncio.Event()
            if self._done:
                self._finished.set()
        return self._finished

    # -- writing (the hub's Member protocol) --------------------------------------------
    def write_frame(self, data: str | bytes, ch: str | None = None) -> None:
        if self.closing:
            return
        if ch is not None and ch in self.backlog:
            self.backlog[ch].append(data)
            return
        broadcast([self.ws], data)
        if self.buffered() > self.settings.transport.max_buffer:
            self.slow_consumer()

    def direct(self, ch: str) -> ServerConnection | None:
        if self.closing or ch in self.backlog:
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
        self.node.count_out(1, len(data))

    def close_soon(self, code: int, reason: str) -> None:
        """Stop writing and close in the background (never blocks the caller)."""
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        self.node.metrics.closes.labels(str(code)).inc()
        self.node.background(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        # websockets' close() drains the write buffer first, with no deadline: a client
        # that stopped reading would keep the connection (and its buffer) forever.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code, reason)
        except Exception:
            if self.ws.transport is not None:
                self.ws.transport.abort()

    def abort(self) -> None:
        if self.ws.transport is not None:
            self.ws.transport.abort()

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
            async for message in self.ws:
                await self._on_frame(message)
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
        self.closing = True
        self.close_reason = reason
        node = self.node
        node.metrics.closes.labels(str(code)).inc()
        await self._close(code, reason)

    async def _authenticate(self) -> bool:
        """Wait for ``hello``, verify the token, register; False if the socket closed."""
        try:
            async with asyncio.timeout(self.settings.auth.auth_timeout):
                message = await self.ws.recv()
        except TimeoutError:
            await self._refuse(CloseCode.UNAUTHORIZED, "no hello in time")
            return False
        self.node.count_in(len(message))
        try:
            frame = decode(message, self.fmt)
            request = parse_request(frame)
            if not isinstance(request, Hello):
                raise Unauthorized("the first frame must be hello")
            header = self.ws.request.headers.get("Authorization") if self.ws.request else None
            claims = self.node.auth.verify(request.token or bearer_token(header))
        except PresenceError as exc:
            log.info("auth_failed", conn=self.conn, reason=exc.message)
            await self._refuse(CloseCode.UNAUTHORIZED, exc.message[:120])
            return False
        self.claims = claims
        self.user = claims.user
        # The handshake's headers (~2.5 KB a connection) are not needed past
        # authentication; websockets keeps them only for the application's use (the
        # request object itself must stay: websockets reads "no request" as "handshake
        # not done").
        if self.ws.request is not None:
            self.ws.request.headers.clear()
        self.ws.response = None
        count = await self.node.register(self)
        self.registered = True
        if count > self.settings.quotas.max_user_connections:
            self.send(error_frame(LimitExceeded(
                f"at most {self.settings.quotas.max_user_connections} connections per user"),
                request.ref))
            await self._refuse(CloseCode.POLICY_VIOLATION, "too many connections for this user")
            return False
        welcome: dict[str, Any] = {
            "t": "welcome",
            "conn": self.conn,
            "user": self.user,
            "node": self.node.node_id,
            "ping_interval": _num(self.settings.transport.ping_interval),
            "limits": {"max_channels": self._max_channels(),
                       "max_frame": self.settings.transport.max_frame},
        }
        if request.ref is not None:
            welcome["ref"] = request.ref
        self.send(welcome)
        self.node.engagement_opened(self.user)  # engagement: a session, online now
        log.info("connection_open", conn=self.conn, user=self.user, role=claims.role,
                 format=self.fmt.value)
        return True

    def _max_channels(self) -> int:
        assert self.claims is not None
        s = self.settings
        q = s.quotas
        return q.max_channels_paid if self.claims.tier == "paid" else q.max_channels_free

    async def _cleanup(self) -> None:
        node = self.node
        was_member = self.registered
        if self.registered:
            await node.unregister(self, [*self.churn_channels, *self.metas])
        self.metas.clear()
        self.churn_channels.clear()
        code = self.ws.close_code
        if code is not None and not self.closing:
            node.metrics.closes.labels(str(code)).inc()
        if was_member:
            log.info("connection_close", conn=self.conn, user=self.user, code=code,
                     reason=self.close_reason or self.ws.close_reason or "")
        self._done = True
        if self._finished is not None:
            self._finished.set()

    async def drain(self, jitter: float) -> None:
        """Node shutdown: remove our presence (leaves published), then close with 1012
        and a reconnect hint of a random delay, so clients do not all return at once."""
        channels = list(self.metas)
        for i, ch in enumerate(channels):
            del self.metas[ch]
            await self.node.exit(ch, self, True, i == len(channels) - 1)
        delay = random.uniform(0, jitter)
        self.close_soon(CloseCode.SERVICE_RESTART, f"server restarting; reconnect in {delay:.1f}s")

    # -- requests --------------------------------------------------------------------
    async def _on_frame(self, message: str | bytes) -> None:
        self.node.count_in(len(message))
        if self.closing:
            return
        try:
            frame = decode(message, self.fmt)
        except MalformedFrame as exc:
            self.malformed += 1
            if self.malformed > self.settings.quotas.max_malformed:
                self.close_soon(CloseCode.MALFORMED, "too many malformed frames")
            else:
                self._error(exc, None)
            return
        ref = parse_ref(frame)
        try:
            await self._dispatch(frame)
        except PresenceError as exc:
            self._error(exc, ref)
        except BackendError as exc:
            log.warning("backend_error", conn=self.conn, error=type(exc).__name__)
            self._error(Overloaded("backend unavailable, retry later", retry_after=2.0), ref)
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("request_failed", conn=self.conn)
            self._error(InternalError("internal error"), ref)

    def _error(self, exc: PresenceError, ref: int | None) -> None:
        self.node.metrics.errors.labels(exc.code).inc()
        if isinstance(exc, RateLimited | LimitExceeded):
            self.node.metrics.rate_limited.labels(exc.code).inc()
        self.send(error_frame(exc, ref))
        if self.errors is None:
            self.errors = SlidingWindow(self.settings.quotas.max_errors_per_minute, 60.0)
        if self.errors.hit(time.monotonic()) > 0:
            self.close_soon(CloseCode.POLICY_VIOLATION, "too many errors")

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        request = parse_request(frame)
        if isinstance(request, Update):
            await self._update(request)
        elif isinstance(request, Join):
            await self._join(request)
        elif isinstance(request, Leave):
            await self._leave(request)
        elif isinstance(request, Ping):
            self.send({"t": "pong", "ref": request.ref, "ts": now_ms()})
        elif isinstance(request, Query):
            await self._query(request)
        else:
            raise BadRequest("already authenticated: hello is only the first frame", field="t")

    def _authorize(self, ch: str) -> None:
        assert self.claims is not None
        if is_churn(ch) and not self.claims.may_read_churn:
            raise Forbidden(f"role {self.claims.role} may not join churn channels")
        if not channel_allowed(ch, self.claims.channels):
            raise Forbidden(f"token does not allow channel {ch}")

    async def _join(self, req: Join) -> None:
        ch = req.ch
        self._authorize(ch)
        node = self.node
        joined = ch in self.metas or ch in self.churn_channels
        if not joined:
            if len(self.metas) + len(self.churn_channels) >= self._max_channels():
                raise LimitExceeded(f"at most {self._max_channels()} channels per connection")
            retry = node.join_limiter(self.user).hit(time.monotonic())
            if retry > 0:
                raise RateLimited(
                    f"at most {self.settings.quotas.joins_per_minute} joins per minute",
                    retry_after=retry,
                )
            node.check_backend()
        reply: dict[str, Any] = {"t": "joined", "ref": req.ref, "ch": ch}
        if not joined:
            meta = None
            if not is_churn(ch):
                meta = new_meta(self.conn, self._defaults(req.meta), now_ms())
            await self._enter(ch, meta)
        try:
            reply.update(await node.snapshot(ch, fresh=not joined))
        except BaseException:
            # The membership stands (a retried join answers the snapshot), but nothing
            # may pile up behind a joined reply that will not come.
            self.backlog.pop(ch, None)
            raise
        self.send(reply)
        self._release(ch)
        if req.meta.device is not None:  # engagement: devices used
            self.node.engagement_device(self.user, req.meta.device)

    def _defaults(self, patch: MetaPatch) -> MetaPatch:
        """A join's meta inherits this connection's current status, device and note."""
        self.current = patch.over(self.current)
        return self.current

    async def _enter(self, ch: str, meta: Meta | None) -> None:
        """Become a member of ``ch`` (diffs held back until :meth:`_release`)."""
        self.backlog[ch] = []
        try:
            await self.node.enter(ch, self, meta)
        except BaseException:
            self.backlog.pop(ch, None)
            raise
        if meta is None:
            self.churn_channels.add(ch)
        else:
            self.metas[ch] = meta

    def _release(self, ch: str) -> None:
        held = self.backlog.pop(ch, None)
        for data in held or ():
            self.write_frame(data, ch)
            self.node.count_out(1, len(data))

    async def _leave(self, req: Leave) -> None:
        ch = req.ch
        if ch in self.churn_channels:
            self.churn_channels.discard(ch)
            await self.node.exit(ch, self, False, False)
        elif ch in self.metas:
            del self.metas[ch]
            await self.node.exit(ch, self, True, not self.metas)
        else:
            raise NotJoined(f"not joined to {ch}")
        self.send({"t": "left", "ref": req.ref, "ch": ch})

    async def _update(self, req: Update) -> None:
        retry = self.updates.take(time.monotonic())
        if retry > 0:
            raise RateLimited(
                f"at most {_num(self.settings.quotas.updates_per_second)} updates per second",
                retry_after=retry,
            )
        if not self.metas:
            raise NotJoined("join a presence channel before updating")
        self.node.check_backend()
        patch = req.meta
        self.current = patch.over(self.current)
        changed = {ch: meta.patched(patch) for ch, meta in self.metas.items()}
        self.metas.update(changed)
        await self.node.put_metas(self.user, changed)
        self.send({"t": "ok", "ref": req.ref})
        if patch.device is not None:  # engagement: devices used
            self.node.engagement_device(self.user, patch.device)

    async def _query(self, req: Query) -> None:
        assert self.claims is not None
        if self.claims.role not in QUERY_ROLES:
            raise Forbidden(f"role {self.claims.role} may not query")
        users = await self.node.query_users(req.users)
        self.send({"t": "result", "ref": req.ref, "users": users})


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
