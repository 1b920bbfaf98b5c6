"""In-memory Broker and Store: the embedded default, for one process.

A :class:`MemoryBus` can be shared by several :class:`MemoryBroker` instances (several
gateway nodes in one process, as the contract tests do); likewise one
:class:`MemoryStore` may be shared. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.base import SWEEP_CLAIM_MS, GapHandler, MessageHandler, SweptMeta, UserPresence
from presence.churn import ChurnRecord, snapshot_order
from presence.engagement import DAY_MS
from presence.meta import Meta
from presence.state import ChannelState


class MemoryBus:
    """The in-process "network" that memory brokers publish into."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryBroker]] = {}

    def deliver(self, topic: str, payload: bytes) -> None:
        for broker in tuple(self.subscribers.get(topic, ())):
            broker.receive(topic, payload)


class MemoryBroker:
    """Delivers through a :class:`MemoryBus`; messages reach handlers on a later loop
    iteration (never re-entrantly inside ``publish``), in publication order."""

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus or MemoryBus()
        self._handler: MessageHandler | None = None
        self._topics: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        self._handler = on_message
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for topic in tuple(self._topics):
            await self.unsubscribe(topic)
        self._handler = None

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)
        self.bus.subscribers.setdefault(topic, set()).add(self)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        subs = self.bus.subscribers.get(topic)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self.bus.subscribers[topic]

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            self.bus.deliver(topic, payload)

    def receive(self, topic: str, payload: bytes) -> None:
        if self._handler is not None and self._loop is not None:
            # call_soon keeps FIFO order and avoids re-entering the publisher.
            self._loop.call_soon(self._dispatch, topic, payload)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if self._handler is not None and topic in self._topics:
            self._handler(topic, payload)

    async def healthy(self) -> bool:
        return True


@dataclass(slots=True)
class _Claim:
    """A sweep of a dead node not finished yet: what it removed, and until when."""

    until: int
    metas: set[SweptMeta]


class MemoryStore:
    """All shared state in dicts. Methods never suspend, so each is atomic."""

    def __init__(self, last_seen_days: int = 30) -> None:
        self.last_seen_ms = last_seen_days * DAY_MS
        self._channels: dict[str, ChannelState] = {}
        self._owner: dict[tuple[str, str, str], str] = {}
        self._node_metas: dict[str, set[tuple[str, str, str]]] = {}
        self._node_conns: dict[str, set[tuple[str, str]]] = {}
        self._user_conns: dict[str, set[str]] = {}
        self._user_index: dict[str, dict[str, Meta]] = {}
        self._conn_node: dict[str, str] = {}
        self._last_seen: dict[str, int] = {}
        self._leases: dict[str, int] = {}
        self._loads: dict[str, int] = {}
        self._churn: dict[str, dict[str, ChurnRecord]] = {}
        self._claims: dict[str, _Claim] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    # -- connections -------------------------------------------------------------
    async def add_connection(self, node: str, user: str, conn: str) -> int:
        conns = self._user_conns.setdefault(user, set())
        conns.add(conn)
        self._node_conns.setdefault(node, set()).add((user, conn))
        self._conn_node[conn] = node
        return len(conns)

    async def remove_connection(self, node: str, user: str, conn: str) -> None:
        conns = self._user_conns.get(user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._user_conns[user]
        self._node_conns.get(node, set()).discard((user, conn))
        self._conn_node.pop(conn, None)

    # -- metas -------------------------------------------------------------------
    async def put_metas(self, node: str, user: str, conn: str, metas: Mapping[str, Meta]) -> None:
        owned = self._node_metas.setdefault(node, set())
        for ch, meta in metas.items():
            self._channels.setdefault(ch, ChannelState()).put(user, meta)
            key = (ch, user, conn)
            self._owner[key] = node
            owned.add(key)
            self._user_index.setdefault(user, {})[conn] = meta

    async def remove_metas(
        self, node: str, user: str, conn: str, channels: Sequence[str], now: int, last: bool
    ) -> None:
        for ch in channels:
            self._remove_one(ch, user, conn)
        if last:
            self._drop_from_index(user, conn)
            self._set_last_seen(user, now)

    def _remove_one(self, ch: str, user: str, conn: str) -> bool:
        state = self._channels.get(ch)
        removed = state.remove(user, conn) if state is not None else None
        if state is not None and not len(state):
            del self._channels[ch]
        owner = self._owner.pop((ch, user, conn), None)
        if owner is not None:
            self._node_metas.get(owner, set()).discard((ch, user, conn))
        return removed is not None

    def _drop_from_index(self, user: str, conn: str) -> None:
        idx = self._user_index.get(user)
        if idx is not None:
            idx.pop(conn, None)
            if not idx:
                del self._user_index[user]

    def _set_last_seen(self, user: str, now: int) -> None:
        self._last_seen[user] = now
        horizon = now - self.last_seen_ms
        if len(self._last_seen) > 10_000:  # amortised expiry of 30-day-old entries
            for u in [u for u, t in self._last_seen.items() if t < horizon]:
                del self._last_seen[u]

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        state = self._channels.get(ch)
        if state is None:
            return {}
        return {u: state.metas(u) for u in state.users()}

    async def user_presence(self, users: Sequence[str]) -> dict[str, UserPresence]:
        return {
            u: UserPresence(
                metas=tuple(self._user_index.get(u, {}).values()),
                last_seen=self._last_seen.get(u),
            )
            for u in users
        }

    # -- leases ------------------------------------------------------------------
    async def refresh_lease(
        self, node: str, ttl: float, now: int, connections: int = 0
    ) -> bool:
        alive = self._leases.get(node, -1) >= now
        self._leases[node] = now + int(ttl * 1000)
        self._loads[node] = connections
        return alive

    async def live_nodes(self, now: int) -> dict[str, int]:
        return {n: self._loads.get(n, 0) for n, exp in sorted(self._leases.items()) if exp >= now}

    async def drop_lease(self, node: str) -> None:
        self._leases.pop(node, None)
        self._loads.pop(node, None)

    async def dead_nodes(self, now: int) -> list[str]:
        owners = set(self._node_metas) | set(self._node_conns) | set(self._claims)
        return sorted(
            n for n in owners
            if (self._node_metas.get(n) or self._node_conns.get(n) or n in self._claims)
            and self._leases.get(n, 0) < now
            and not self._claimed(n, now)
        )

    def _claimed(self, node: str, now: int) -> bool:
        claim = self._claims.get(node)
        return claim is not None and claim.until > now

    async def sweep_node(self, node: str, now: int) -> list[SweptMeta] | None:
        if self._leases.get(node, 0) >= now or self._claimed(node, now):
            return None
        keys = self._node_metas.pop(node, set())
        conns = self._node_conns.pop(node, set())
        claim = self._claims.pop(node, None)
        if not keys and not conns and claim is None:
            return None
        swept = set() if claim is None else claim.metas
        for ch, user, conn in keys:
            self._remove_one(ch, user, conn)
            swept.add(SweptMeta(ch, user, conn))
        for user, conn in conns:
            await self.remove_connection(node, user, conn)
        for user, conn in {(s.user, s.conn) for s in swept} | conns:
            self._drop_from_index(user, conn)
            self._set_last_seen(user, now)
        self._leases.pop(node, None)
        self._loads.pop(node, None)
        self._claims[node] = _Claim(now + SWEEP_CLAIM_MS, swept)
        return sorted(swept, key=lambda m: (m.ch, m.user, m.conn))

    async def sweep_finish(self, node: str) -> None:
        # One process, one object: whoever finishes, the claim is the same one.
        self._claims.pop(node, None)

    # -- churn -------------------------------------------------------------------
    async def churn_get(self, org: str, suppliers: Sequence[str]) -> dict[str, ChurnRecord]:
        recs = self._churn.get(org, {})
        return {s: recs[s] for s in suppliers if s in recs}

    async def churn_put(self, org: str, records: Sequence[ChurnRecord]) -> None:
        recs = self._churn.setdefault(org, {})
        for r in records:
            recs[r.supplier] = r

    async def churn_snapshot(self, org: str, limit: int) -> list[ChurnRecord]:
        return snapshot_order(list(self._churn.get(org, {}).values()), limit)


if TYPE_CHECKING:
    from cluster.base import Broker, Store

    _broker: Broker = MemoryBroker()
    _store: Store = MemoryStore()
