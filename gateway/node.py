"""A gateway node: the hub, the backends and the background duties of one process.

The node owns what outlives a single connection: the Store and Broker, the local hub,
the lease and sweeper loops, backend health, statistics and the drain on shutdown.
Sessions (gateway/session.py) call :meth:`Node.subscribe`, :meth:`Node.put_presence`,
:meth:`Node.drop_presence`, ... which write the Store and publish on the Broker; the
broker's delivery (this node's own publications included) feeds the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from cluster.base import BackendUnavailable, Broker, Store
from cluster.engagement import EngagementStore
from cluster.factory import make_engagement
from gateway.auth import Authenticator
from gateway.hub import Hub, Member
from gateway.metrics import Metrics
from presence.channels import churn_org, is_churn
from presence.churn import MAX_SNAPSHOT
from presence.errors import Overloaded
from presence.messages import ChurnMsg, JoinMsg, LeaveMsg, decode_message, encode_join, encode_leave
from presence.meta import Meta, overall_status
from presence.ratelimit import SlidingWindow
from presence.settings import Settings

if TYPE_CHECKING:
    from gateway.session import Session

log = structlog.get_logger("presence.node")


def now_ms() -> int:
    return int(time.time() * 1000)


def quantiles(samples: Sequence[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(samples)
    n = len(s)
    return {
        "p50": s[min(n - 1, int(n * 0.50))],
        "p95": s[min(n - 1, int(n * 0.95))],
        "p99": s[min(n - 1, int(n * 0.99))],
    }


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Node:
    """One gateway process's shared machinery (see the module docstring)."""

    def __init__(self, settings: Settings, broker: Broker, store: Store,
                 engagement: EngagementStore | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id or secrets.token_hex(4)
        self.broker = broker
        self.store = store
        self.auth = Authenticator(settings)
        self.metrics = Metrics()
        self.hub = Hub(settings.coalesce_ms, settings.max_buffer, self._on_flush, now_ms)
        self.sessions: set[Session] = set()
        self.draining = False
        self.backend_ok = False  # until start() has reached the backend
        self.started_at = time.time()
        self._ids = itertools.count(1)
        # A per-start prefix keeps connection ids unique even when --node-id is reused.
        self._id_prefix = f"{self.node_id}-{now_ms():x}"
        # State in the Store is owned by this incarnation, not by the node id: a node
        # restarted with the same id must not keep its previous life's metas alive
        # by refreshing the same lease; survivors sweep the old incarnation.
        self.owner = self._id_prefix
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._loop_lag = 0.0
        self._rates: deque[tuple[float, float, float]] = deque(maxlen=32)
        self._frames_in = 0
        self._frames_out = 0
        self._join_limits: dict[str, SlidingWindow] = {}
        # Removals that failed while the backend was down, retried when it returns.
        self._deferred: list[tuple[str, str, list[str]]] = []
        # Engagement signals for the churn model (see the "engagement" section below).
        # ``clock_ms`` dates them; tests replace it to script whole days.
        self.engagement = engagement if engagement is not None else make_engagement(settings)
        self.clock_ms: Callable[[], int] = now_ms
        self._engagement_pending: set[asyncio.Future[None]] = set()

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Connect the backends (retrying, with backoff, until they answer: the process
        stays alive and not ready meanwhile) and start the background duties."""
        delay = 0.5
        while True:
            try:
                await self.store.start()
                await self.broker.start(self._on_message, self._on_gap)
                await self.engagement.start()
                break
            except BackendError as exc:
                self.backend_ok = False
                self.metrics.backend_up.set(0)
                log.warning("backend_unavailable_at_start", error=type(exc).__name__,
                            retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.backend_ok = True
        self.metrics.backend_up.set(1)
        lease_ttl = self.settings.node_lease * 0.8
        await self.store.refresh_lease(self.owner, lease_ttl, now_ms())
        self._spawn(self._lease_loop(lease_ttl))
        self._spawn(self._sweep_loop())
        self._spawn(self._health_loop())
        self._spawn(self._lag_loop())
        self._spawn(self._engagement_loop())
        log.info("node_started", node=self.node_id, backend=type(self.store).__name__)

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    def background(self, coro: Awaitable[None]) -> None:
        """Run a short task (a close, say), keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.engagement_flush(), 2.0)
        with contextlib.suppress(Exception):
            await self.engagement.close()
        with contextlib.suppress(Exception):
            await self.store.drop_lease(self.owner)
        with contextlib.suppress(Exception):
            await self.broker.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    def new_conn_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    async def ready(self) -> bool:
        return self.backend_ok and not self.draining

    # -- operations used by sessions ----------------------------------------------
    async def subscribe(self, ch: str, member: Member) -> None:
        """Make ``member`` a local member of ``ch``; subscribe the node on first use."""
        if self.hub.add(ch, member):
            try:
                await self.broker.subscribe(ch)
            except Exception:
                self.hub.remove(ch, member)
                raise
        self._gauge_channels()

    async def unsubscribe(self, ch: str, member: Member) -> None:
        if self.hub.remove(ch, member):
            with contextlib.suppress(Exception):
                await self.broker.unsubscribe(ch)
        self._gauge_channels()

    def _gauge_channels(self) -> None:
        self.metrics.channels.set(len(self.hub.channels))
        self.metrics.members.set(self.hub.member_count())

    async def put_presence(self, user: str, metas: Mapping[str, Meta]) -> None:
        """Store a connection's metas (channel -> meta) and publish them as joins."""
        conn = next(iter(metas.values())).conn
        await self.store.put_metas(self.owner, user, conn, metas)
        ts = now_ms()
        await self.publish([(ch, encode_join(user, meta, ts)) for ch, meta in metas.items()])

    async def drop_presence(
        self, user: str, conn: str, channels: Sequence[str], last: bool
    ) -> None:
        """Remove a connection's metas from ``channels`` and publish the leaves."""
        if not channels:
            return
        ts = now_ms()
        await self.store.remove_metas(self.owner, user, conn, channels, ts, last)
        await self.publish([(ch, encode_leave(user, conn, ts, ts)) for ch in channels])

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        if messages:
            await self.broker.publish(messages)
            self.metrics.broker_messages.labels("out").inc(len(messages))

    def join_limiter(self, user: str) -> SlidingWindow:
        """The per-user join window (``joins_per_minute``), shared by the user's
        connections on this node."""
        window = self._join_limits.get(user)
        if window is None:
            if len(self._join_limits) > 4 * max(1, len(self.sessions)) + 1000:
                now = time.monotonic()
                for u in [u for u, w in self._join_limits.items() if w.idle(now)]:
                    del self._join_limits[u]
            window = self._join_limits[user] = SlidingWindow(self.settings.joins_per_minute, 60.0)
        return window

    def defer_removal(self, user: str, conn: str, channels: list[str]) -> None:
        """Remember a closed connection whose metas could not be removed (backend down)."""
        self._deferred.append((user, conn, channels))

    async def retry_removals(self) -> None:
        pending, self._deferred = self._deferred, []
        for user, conn, channels in pending:
            try:
                await self.drop_presence(user, conn, channels, last=True)
                await self.store.remove_connection(self.owner, user, conn)
            except Exception:
                self._deferred.append((user, conn, channels))

    async def channel_snapshot(self, ch: str) -> dict[str, list[Meta]]:
        presence = await self.store.channel_presence(ch)
        self.hub.seed(ch, presence)
        return presence

    async def churn_snapshot(self, ch: str) -> list[dict[str, Any]]:
        records = await self.store.churn_snapshot(churn_org(ch), MAX_SNAPSHOT)
        return [r.to_wire() for r in records]

    async def query_users(self, users: Sequence[str]) -> dict[str, Any]:
        """The ``users`` body of a ``result`` reply (also ``GET /v1/presence``)."""
        found = await self.store.user_presence(users)
        out: dict[str, Any] = {}
        for user in users:
            up = found.get(user)
            metas = list(up.metas) if up is not None else []
            out[user] = {
                "status": overall_status(metas),
                "metas": [m.to_wire() for m in sorted(metas, key=lambda m: m.conn)],
                "last_seen": None if metas or up is None else up.last_seen,
            }
        return out

    async def channel_presence(self, ch: str) -> dict[str, list[dict[str, Any]]]:
        """The ``presence`` map of a channel (``GET /v1/channels/<ch>/presence``)."""
        presence = await self.store.channel_presence(ch)
        return {
            u: [m.to_wire() for m in sorted(ms, key=lambda m: m.conn)]
            for u, ms in sorted(presence.items())
        }

    # -- broker delivery ---------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        self.metrics.broker_messages.labels("in").inc()
        msg = decode_message(payload)
        if isinstance(msg, JoinMsg):
            self.hub.on_join(topic, msg.user, msg.meta, msg.ts)
        elif isinstance(msg, LeaveMsg):
            self.hub.on_leave(topic, msg.user, msg.conn, msg.last_seen, msg.ts)
        elif isinstance(msg, ChurnMsg) and is_churn(topic):
            self.hub.broadcast(
                topic,
                {"t": "churn", "ch": topic, "ts": msg.ts,
                 "records": [r.to_wire() for r in msg.records]},
            )

    async def _on_gap(self, topics: Sequence[str]) -> None:
        """Messages of ``topics`` may have been lost (broker failover): re-assert our
        local metas there, re-read the Store and send local members the difference."""
        for ch in topics:
            if is_churn(ch) or ch not in self.hub.channels:
                continue
            try:
                await self._reassert(ch)
                fresh = await self.store.channel_presence(ch)
            except Exception as exc:
                log.warning("gap_repair_failed", ch=ch, error=type(exc).__name__)
                continue
            mirror = self.hub.mirror(ch)
            if mirror is None:
                continue
            ts = now_ms()
            fresh_keys = {(u, m.conn) for u, ms in fresh.items() for m in ms}
            for user in list(mirror.users()):
                for meta in mirror.metas(user):
                    if (user, meta.conn) not in fresh_keys:
                        self.hub.on_leave(ch, user, meta.conn, ts, ts)
            for user, metas in fresh.items():
                for meta in metas:
                    self.hub.on_join(ch, user, meta, ts)
            log.info("gap_repaired", ch=ch)

    async def _reassert(self, ch: str) -> None:
        for session in list(self.sessions):
            meta = session.metas.get(ch)
            if meta is not None:
                await self.put_presence(session.user, {ch: meta})

    async def reassert_all(self) -> None:
        """Write every live connection's metas again (after the Store came back)."""
        for session in list(self.sessions):
            if session.metas:
                await self.put_presence(session.user, dict(session.metas))

    # -- background loops ------------------------------------------------------------
    async def _lease_loop(self, ttl: float) -> None:
        interval = self.settings.node_lease / 4
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.refresh_lease(self.owner, ttl, now_ms(), len(self.sessions))
            except Exception as exc:
                log.warning("lease_refresh_failed", error=type(exc).__name__)

    async def _sweep_loop(self) -> None:
        interval = min(1.0, self.settings.node_lease / 10)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("sweep_failed", error=type(exc).__name__)

    async def sweep_once(self) -> int:
        """Remove the state of dead nodes and publish their leaves; returns metas swept."""
        now = now_ms()
        count = 0
        for node in await self.store.dead_nodes(now):
            if node == self.owner:
                continue
            swept = await self.store.sweep_node(node, now)
            if swept is None:
                continue
            if swept:
                await self.publish(
                    [(s.ch, encode_leave(s.user, s.conn, now, now)) for s in swept]
                )
            # Only once the leaves are out: a failed publish leaves the claim to expire
            # and the node to be swept again.
            await self.store.sweep_finish(node)
            count += len(swept)
            log.info("node_swept", dead_node=node, metas=len(swept))
        return count

    async def _health_loop(self) -> None:
        while True:
            try:
                ok = await asyncio.wait_for(self._healthy(), timeout=3.0)
            except Exception:
                ok = False
            if ok and not self.backend_ok:
                log.info("backend_recovered")
                with contextlib.suppress(Exception):
                    await self.store.refresh_lease(
                        self.owner, self.settings.node_lease * 0.8, now_ms()
                    )
                    await self.reassert_all()
                    await self.retry_removals()
            elif not ok and self.backend_ok:
                log.warning("backend_unavailable")
            self.backend_ok = ok
            self.metrics.backend_up.set(1 if ok else 0)
            await asyncio.sleep(1.0)

    async def _healthy(self) -> bool:
        return await self.store.healthy() and await self.broker.healthy()

    async def _lag_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.5)
            self._loop_lag = max(0.0, loop.time() - start - 0.5)
            self.metrics.loop_lag.set(self._loop_lag)
            self._rates.append((time.monotonic(), self._frames_in, self._frames_out))

    # -- engagement signals (presence/engagement.py) --------------------------------
    # Written in the background: a slow or failing backend must never delay or break
    # a connection, so failures are only logged (the figures then miss a sample).
    def engagement_opened(self, user: str) -> None:
        """A connection of ``user`` opened (called after its welcome): count a session
        and mark the user online for the current minute."""
        now = self.clock_ms()
        self._engagement_write("opened", self._engagement_opened(user, now))

    async def _engagement_opened(self, user: str, now: int) -> None:
        await self.engagement.record_session(user, now)
        await self.engagement.mark_online([user], now)

    def engagement_device(self, user: str, device: str) -> None:
        """A join or update of ``user`` carried ``device``."""
        self._engagement_write(
            "device", self.engagement.record_device(user, device, self.clock_ms()))

    def _engagement_write(self, what: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(_logged(what, coro))
        self._engagement_pending.add(task)
        task.add_done_callback(self._engagement_pending.discard)

    async def engagement_flush(self) -> None:
        """Wait until the engagement writes started so far are done (or failed)."""
        while self._engagement_pending:
            await asyncio.gather(*self._engagement_pending)

    async def engagement_tick(self) -> int:
        """Mark every user with a local connection online for the current minute (one
        batched call); returns the number of users marked."""
        users = sorted({s.user for s in self.sessions})
        if users:
            await _logged("tick", self.engagement.mark_online(users, self.clock_ms()))
        return len(users)

    async def _engagement_loop(self) -> None:
        while True:
            # Wake just after each wall-clock minute begins: a plain 60 s period drifts
            # and now and then would skip a minute of a user connected all along.
            await asyncio.sleep(60.5 - time.time() % 60)
            await self.engagement_tick()

    # -- accounting ------------------------------------------------------------------
    def _on_flush(self, frames: int, nbytes: int, latency: float) -> None:
        self.count_out(frames, nbytes)
        if latency >= 0:
            self.metrics.propagation.observe(latency)
            self._latencies.append(latency)

    def count_out(self, frames: int, nbytes: int) -> None:
        self._frames_out += frames
        self.metrics.frames_out.inc(frames)
        self.metrics.bytes_out.inc(nbytes)

    def count_in(self, nbytes: int) -> None:
        self._frames_in += 1
        self.metrics.frames_in.inc()
        self.metrics.bytes_in.inc(nbytes)

    def local_stats(self) -> dict[str, Any]:
        """Figures of this node for ``/admin/stats`` and the autoscaler's sampler."""
        rate_in = rate_out = 0.0
        if len(self._rates) >= 2:
            (t0, i0, o0), (t1, i1, o1) = self._rates[0], self._rates[-1]
            if t1 > t0:
                rate_in, rate_out = (i1 - i0) / (t1 - t0), (o1 - o0) / (t1 - t0)
        return {
            "node": self.node_id,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "connections": len(self.sessions),
            "channels": len(self.hub.channels),
            "members": self.hub.member_count(),
            "frames_in_per_second": round(rate_in, 1),
            "frames_out_per_second": round(rate_out, 1),
            "propagation_seconds": quantiles(list(self._latencies)),
            "event_loop_lag_seconds": round(self._loop_lag, 4),
            "rss_bytes": rss_bytes(),
            "backend": {"type": type(self.store).__name__, "healthy": self.backend_ok},
            "draining": self.draining,
            "max_connections": self.settings.max_connections,
        }

    async def cluster_stats(self) -> dict[str, Any]:
        """Cluster-wide figures from the nodes' leases: live nodes and connections
        (each node's count as of its last lease refresh, this node's as of now)."""
        try:
            loads = await self.store.live_nodes(now_ms())
        except Exception as exc:
            return {"backend": type(self.store).__name__, "error": type(exc).__name__}
        loads[self.owner] = len(self.sessions)
        return {
            "backend": type(self.store).__name__,
            "nodes": len(loads),
            "connections": sum(loads.values()),
            "per_node": loads,
        }

    def check_backend(self) -> None:
        """Refuse work early while the backend is known to be down."""
        if not self.backend_ok:
            raise Overloaded("backend unavailable, retry later", retry_after=2.0)


async def _logged(what: str, aw: Awaitable[None]) -> None:
    """Await an engagement write; log (never raise) its failure."""
    try:
        await aw
    except Exception as exc:
        log.warning("engagement_write_failed", what=what, error=type(exc).__name__)


BackendError = (BackendUnavailable, ConnectionError, OSError, asyncio.TimeoutError)
"""Exceptions from the backends that mean "unavailable", not "bug"."""
