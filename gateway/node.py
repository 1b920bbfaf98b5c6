"""A gateway node: what one process shares between its connections.

The node wires the Store and Broker to the local hub and runs the duties that outlive
a single connection, each in a module of its own:

- :mod:`gateway.subscriptions`: one broker subscription per channel with local members;
- :mod:`gateway.repair`: gap repair after a broker failover, serialised with delivery;
- :mod:`gateway.leases`: this node's lease, self-sweep detection, sweeping dead nodes;
- :mod:`gateway.live`: live connections, their registration and end;
- :mod:`gateway.holds`: lost connections held for resume, resume tokens;
- :mod:`gateway.health`: backend probing, the readiness grace, recovery;
- :mod:`gateway.writes`: Store writes that failed, retried until done;
- :mod:`gateway.stats` and :mod:`gateway.engagement_feed`: figures and signals.
Sessions use the node only through :class:`gateway.ports.NodeServices`; the node sees
them as :class:`gateway.ports.LocalConnection`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from cluster.base import Adopted, Broker, Store
from cluster.engagement import EngagementStore
from cluster.factory import make_engagement
from cluster.tasks import cancel_until_done
from gateway import reads
from gateway.auth import Authenticator
from gateway.delivery import deliver
from gateway.engagement_feed import EngagementFeed
from gateway.expiry import expiry_loop
from gateway.health import Health, until_connected
from gateway.hub import Hub
from gateway.leases import Leases
from gateway.live import Connections
from gateway.logs import timed_step
from gateway.metrics import Metrics
from gateway.ports import BackendError, LocalConnection, NodeServices, now_ms
from gateway.reassert import Lanes, reassert_all, reassert_channel
from gateway.repair import GapRepair
from gateway.stats import NodeStats, cluster_figures
from gateway.subscriptions import Subscriptions
from gateway.transitions import Transitions
from gateway.webhooks import Webhooks
from gateway.writes import RetryQueue, retrying
from presence.channels import is_churn
from presence.errors import Overloaded
from presence.messages import encode_join, encode_leave
from presence.meta import Meta
from presence.ratelimit import KeyedWindows, SlidingWindow
from presence.settings import Settings

log = structlog.get_logger("presence.node")

STOP_BUDGET = 3.0
"""Seconds the node's stop may take after the drain: the pod's grace period is the
preStop delay + ``drain_timeout`` + this + the interpreter's exit (config/k8s)."""

T = TypeVar("T")


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
        self.stats = NodeStats(self.metrics)
        self.hub = Hub(settings.transport.coalesce_ms, settings.transport.max_buffer,
                       self.stats.on_flush, now_ms)
        self.lanes = Lanes()  # a connection's re-assertion vs its departure
        # A connection's meta writes, each with its publication, one at a time: two
        # interleaved (an update during a re-assertion) published in the opposite
        # order of their writes, and every view kept the older meta (chaos seed 1).
        self._meta_order = Lanes()
        self.draining = False
        self._ids = itertools.count(1)
        # A per-start prefix keeps connection ids unique even when --node-id is reused.
        self._id_prefix = f"{self.node_id}-{now_ms():x}"
        # State in the Store is owned by this incarnation, not by the node id: a node
        # restarted with the same id must not keep its previous life's metas alive
        # by refreshing the same lease; survivors sweep the old incarnation.
        self.owner = self._id_prefix
        self.subscriptions = Subscriptions(broker, self.hub, self.metrics)
        # Webhook events of presence transitions (gateway/transitions.py, webhooks.py).
        self.webhooks = Webhooks.from_settings(settings.hooks, self.metrics)
        self.transitions = Transitions(
            self.owner, now_ms, self.webhooks.emit if self.webhooks.enabled else None)
        self.writes = RetryQueue()
        self.connections = Connections(
            store, self.owner, resume_ttl=settings.lifetime.resume_ttl, lanes=self.lanes,
            subscriptions=self.subscriptions, writes=self.writes, transitions=self.transitions,
            metrics=self.metrics, retrying=self._retrying, drop_presence=self.drop_presence,
            background=self.background)
        self.sessions, self.holds = self.connections.live, self.connections.holds
        self.repair = GapRepair(store, self.hub, functools.partial(
            reassert_channel, self.sessions, reput=self.reput_metas, lanes=self.lanes))
        self.reads = reads.Reads(store, self.hub, self.repair.joined_read)
        self.leases = Leases(store, self.owner, settings.backend.node_lease, self.publish,
                             self.reassert_all, self.connection_count,
                             hold=settings.lifetime.resume_ttl,
                             swept=self.transitions.swept, metrics=self.metrics)
        self.health = Health(self._probe, settings.backend.ready_grace, self.metrics,
                             self._recovered)
        self._deliver = functools.partial(deliver, self.hub, self.repair, self.metrics)
        # Engagement signals (gateway/engagement_feed.py); tests swap the store and clock.
        self.engagement = engagement or make_engagement(settings)
        self.clock_ms: Callable[[], int] = now_ms
        self.feed = EngagementFeed(lambda: self.engagement, lambda: self.clock_ms())
        # A client's write rides through a failover this long before ``overloaded``.
        self._write_retry = min(5.0, settings.backend.ready_grace)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()
        self._join_limits = KeyedWindows(settings.quotas.joins_per_minute, 60.0)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Connect the backends (retrying, with backoff, until they answer: the process
        stays alive and not ready meanwhile) and start the background duties."""
        await until_connected(self.store.start,
                              lambda: self.broker.start(self._deliver, self.repair.on_gap),
                              self.engagement.start)
        await self.leases.refresh()
        await self.webhooks.start()
        self.health.mark(True)
        for duty in (self.leases.lease_loop(), self.leases.sweep_loop(), self.health.loop(),
                     self.stats.lag_loop(), self.feed.loop(self.engagement_tick),
                     expiry_loop(lambda: self.sessions)):
            self.run_duty(duty)
        log.info("node_started", node=self.node_id, backend=type(self.store).__name__)

    def run_duty(self, duty: Coroutine[Any, Any, None]) -> None:
        """Run ``duty``, a loop, until :meth:`stop` cancels it with the node's own."""
        self._tasks.append(asyncio.ensure_future(duty))

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        """Stop the duties, then flush and close, within :data:`STOP_BUDGET` seconds in
        all: the steps run in turn, most needed first, under one deadline; a step that
        fails does not stop the next, one that runs out of time is cut and logged
        (``stop_step_cut``), and the steps after it are skipped. Nothing here is needed
        for correctness: a lease not released lapses and a survivor sweeps it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_BUDGET
        tasks, self._tasks = self._tasks, []

        async def duties() -> None:
            # Cancelled again until each ends: a cancel swallowed on its way out of a
            # backend read would otherwise hold this step, and every step after it, to
            # the budget's end.
            await asyncio.gather(*(cancel_until_done(t) for t in tasks))

        self.holds.close()
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("duties", duties), ("repair", self.repair.close),
            ("leases", self.leases.close), ("subscriptions", self.subscriptions.close),
            ("writes", self.writes.close), ("lease_release", self.leases.release),
            ("feed", lambda: asyncio.wait_for(self.feed.flush(), 2.0)),
            ("engagement", self.engagement.close), ("webhooks", self.webhooks.close),
            ("broker", self.broker.close), ("store", self.store.close))
        for i, (name, close) in enumerate(steps):
            budget = asyncio.timeout_at(deadline)
            try:
                with timed_step(log, name, 1.0):
                    async with budget:
                        await close()
            except Exception as exc:
                if budget.expired():
                    log.warning("stop_step_cut", step=name, budget=STOP_BUDGET,
                                skipped=[n for n, _ in steps[i + 1:]])
                    return
                log.warning("stop_step_failed", step=name, error=repr(exc))

    def new_conn_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    async def ready(self) -> bool:
        """Readiness: serving, not draining, backend usable (within ``ready_grace``)."""
        return bool(self._tasks) and not self.draining and self.health.usable()

    def check_backend(self) -> None:
        if not self.health.usable():
            raise Overloaded("backend unavailable, retry later", retry_after=2.0)

    # -- connections (gateway/ports.py NodeServices) ---------------------------------
    def connection_count(self) -> int:
        return len(self.sessions)

    async def register(self, conn: LocalConnection, resume_hash: str, resumed: bool) -> int:
        return await self.connections.register(conn, resume_hash, resumed)

    async def unregister(self, conn: LocalConnection, channels: Sequence[str],
                         cause: str) -> None:
        await self.connections.unregister(conn, channels, cause)

    async def resume(self, user: str, token: str) -> tuple[Adopted | None, str]:
        return await self.connections.resume(user, token)

    async def enter(self, ch: str, member: LocalConnection, meta: Meta | None) -> None:
        await self.writes.settle((member.conn, ch))  # an owed leave first, never dropped
        await self.subscriptions.join(ch, member)
        if meta is None:
            if is_churn(ch):  # remembered for a resume (presence: by the metas)
                await self._retrying(lambda: self.store.track_channel(
                    self.owner, member.user, member.conn, ch, True))
            return
        try:
            await self.put_metas(member.user, {ch: meta})
        except BaseException:
            await self.exit(ch, member, True, not any(c != ch for c in member.metas))
            raise

    async def exit(self, ch: str, member: LocalConnection, had_meta: bool, last: bool) -> None:
        await self.subscriptions.leave(ch, member)
        user, cid = member.user, member.conn

        async def leave() -> None:
            if is_churn(ch):
                await self.store.track_channel(self.owner, user, cid, ch, False)
            elif had_meta:
                await self.drop_presence(user, cid, [ch], last)

        await self.writes.attempt((cid, ch), leave)

    async def put_metas(self, user: str, metas: Mapping[str, Meta]) -> None:
        """Store a connection's metas (channel -> meta); publish those taken as joins."""
        if not metas:
            return
        conn = next(iter(metas.values())).conn
        async with self._meta_order.exclusive(conn):
            await self._put_metas(user, conn, metas)

    async def reput_metas(self, conn: LocalConnection, ch: str | None) -> None:
        """Re-assert ``conn``'s current metas (all, or ``ch``'s), read in their turn
        (gateway/reassert.py ``Reput``)."""
        async with self._meta_order.exclusive(conn.conn):
            metas = {c: m for c, m in conn.metas.items() if ch is None or c == ch}
            if metas:
                await self._put_metas(conn.user, conn.conn, metas)

    async def _put_metas(self, user: str, conn: str, metas: Mapping[str, Meta]) -> None:
        ts = now_ms()
        joins = {ch: encode_join(user, meta, ts) for ch, meta in metas.items()}
        # The Redis store publishes the joins from its write (one round trip, not two).
        written = await self._retrying(
            lambda: self.store.put_metas(self.owner, user, conn, metas, joins))
        self.transitions.occupied(*written.changed)
        if written.published:
            self.metrics.broker_out.inc(len(written))
            self.metrics.store_published.inc(len(written))
            return
        await self._retrying(lambda: self.publish([(ch, joins[ch]) for ch in written]))

    async def drop_presence(self, user: str, conn: str, channels: Sequence[str],
                            last: bool, last_seen: int | None = None) -> list[str]:
        """Remove a connection's metas from ``channels`` and publish the leaves (not
        for entries now another node's: a resume took them); the channels left."""
        if not channels:
            return []
        async with self._meta_order.exclusive(conn):
            ts = now_ms()
            seen = ts if last_seen is None else last_seen
            gone = await self.store.remove_metas(self.owner, user, conn, channels, seen, last)
            self.transitions.vacated(*gone.changed)
            await self.publish([(ch, encode_leave(user, conn, seen, ts)) for ch in gone])
            return gone

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        if messages:
            await self.broker.publish(messages)
            self.metrics.broker_out.inc(len(messages))

    def _retrying(self, make: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return retrying(make, self._write_retry, BackendError, self.health.usable)

    def join_limiter(self, user: str) -> SlidingWindow:
        return self._join_limits.get(user, time.monotonic(), len(self.sessions))

    # -- re-assertion, recovery (delivery: gateway/delivery.py) -----------------------
    async def reassert_all(self, close_failed: bool = True) -> None:
        """Write every live connection again (gateway/reassert.py)."""
        await reassert_all(self.store, self.owner, self.sessions, self.reput_metas,
                           close_failed, self.lanes)

    async def _probe(self) -> bool:
        return await self.store.healthy() and await self.broker.healthy()

    async def _recovered(self) -> None:
        # Always re-assert: a promoted replica or a restarted Redis may lack our writes.
        await self.leases.refresh()
        await self.reassert_all(close_failed=False)
        await self.writes.run_now()

    # -- figures and engagement ----------------------------------------------------
    def local_stats(self) -> dict[str, Any]:
        """Figures of this node for ``/admin/stats`` and the autoscaler's sampler."""
        return {"node": self.node_id, **self.stats.figures(),
                "connections": len(self.sessions), "channels": len(self.hub.channels),
                "members": self.hub.member_count(),
                "backend": {"type": type(self.store).__name__, "healthy": self.health.ok},
                "draining": self.draining,
                "max_connections": self.settings.transport.max_connections}

    async def cluster_stats(self) -> dict[str, Any]:
        return await cluster_figures(self.store, self.owner, len(self.sessions), now_ms())

    async def engagement_tick(self) -> int:
        """Mark every user with a local connection online for the current minute."""
        return await self.feed.tick([c.user for c in self.sessions])


if TYPE_CHECKING:
    _conforms: NodeServices = Node.__new__(Node)
