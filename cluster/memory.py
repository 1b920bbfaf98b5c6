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

from cluster.base import (
    RESUMED_ELSEWHERE,
    SWEEP_CLAIM_MS,
    Adopted,
    ChurnStep,
    GapHandler,
    MessageHandler,
    SweptMeta,
    UserPresence,
    Written,
)
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


def _with(index: dict[str, tuple[str, ...]], key: str, item: str) -> tuple[str, ...]:
    """Add ``item`` to the tuple at ``key`` (made on first use); the tuple after."""
    items = index.get(key, ())
    if item not in items:
        items = index[key] = (*items, item)
    return items


def _without(index: dict[str, tuple[str, ...]], key: str, item: str) -> int:
    """Remove ``item`` from the tuple at ``key``, and the key once it is empty; how many
    items are left."""
    items = tuple(x for x in index.get(key, ()) if x != item)
    if items:
        index[key] = items
    else:
        index.pop(key, None)
    return len(items)


class MemoryStore:
    """All shared state in dicts. Methods never suspend, so each is atomic."""

    def __init__(self, last_seen_days: int = 30) -> None:
        self.last_seen_ms = last_seen_days * DAY_MS
        self._channels: dict[str, ChannelState] = {}
        self._owner: dict[tuple[str, str, str], str] = {}
        self._node_metas: dict[str, set[tuple[str, str, str]]] = {}
        self._node_conns: dict[str, set[tuple[str, str]]] = {}
        # A user's connections and a connection's channels are few: tuples (48 bytes for
        # one) rather than sets (216), as both are kept for every connection.
        self._user_conns: dict[str, tuple[str, ...]] = {}
        self._user_index: dict[str, dict[str, Meta]] = {}
        self._conn_node: dict[str, str] = {}
        self._conn_channels: dict[str, tuple[str, ...]] = {}  # channels with a meta
        self._churn_joined: dict[str, set[str]] = {}
        self._resume: dict[tuple[str, str], str] = {}
        self._refreshed: dict[str, int] = {}
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
    def _foreign(self, node: str, conn: str) -> bool:
        """``conn`` is recorded as another node's (resumed there)."""
        return self._conn_node.get(conn, node) != node

    async def add_connection(self, node: str, user: str, conn: str,
                             resume_hash: str = "") -> int:
        if self._foreign(node, conn):
            return len(self._user_conns.get(user, ()))
        conns = _with(self._user_conns, user, conn)
        self._node_conns.setdefault(node, set()).add((user, conn))
        self._conn_node[conn] = node
        if resume_hash:
            self._resume[(user, conn)] = resume_hash
        return len(conns)

    async def remove_connection(self, node: str, user: str, conn: str) -> int | None:
        if self._foreign(node, conn):
            return RESUMED_ELSEWHERE
        if conn not in self._conn_node:
            return None
        return self._forget_connection(node, user, conn)

    def _forget_connection(self, node: str, user: str, conn: str) -> int:
        """Forget ``conn``; the user's connections left."""
        left = 0
        if user in self._user_conns:
            left = _without(self._user_conns, user, conn)
        self._node_conns.get(node, set()).discard((user, conn))
        self._conn_node.pop(conn, None)
        self._resume.pop((user, conn), None)
        self._churn_joined.pop(conn, None)
        return left

    async def track_channel(self, node: str, user: str, conn: str, ch: str,
                            joined: bool) -> None:
        if self._foreign(node, conn):
            return
        if joined:
            self._churn_joined.setdefault(conn, set()).add(ch)
        else:
            self._churn_joined.get(conn, set()).discard(ch)

    async def resume(self, node: str, user: str, conn: str, resume_hash: str,
                     new_hash: str) -> Adopted | None:
        key = (user, conn)
        old = self._conn_node.get(conn)
        if self._resume.get(key) != resume_hash or old is None:
            return None
        self._resume[key] = new_hash
        channels: dict[str, Meta | None] = {}
        for ch in sorted(self._conn_channels.get(conn, ())):
            state = self._channels.get(ch)
            meta = state.get(user, conn) if state is not None else None
            if meta is None:
                continue
            entry = (ch, user, conn)
            self._node_metas.get(self._owner.get(entry, old), set()).discard(entry)
            self._owner[entry] = node
            self._node_metas.setdefault(node, set()).add(entry)
            channels[ch] = meta
        for ch in sorted(self._churn_joined.get(conn, ())):
            channels[ch] = None
        self._node_conns.get(old, set()).discard(key)
        self._node_conns.setdefault(node, set()).add(key)
        self._conn_node[conn] = node
        _with(self._user_conns, user, conn)
        return Adopted(conn, channels)

    # -- metas -------------------------------------------------------------------
    async def put_metas(self, node: str, user: str, conn: str, metas: Mapping[str, Meta],
                        joins: Mapping[str, bytes] | None = None) -> Written:
        # ``joins`` ignored: this store and the MemoryBroker are separate objects, the
        # caller publishes (``published`` stays False).
        if self._foreign(node, conn):
            return Written()
        owned = self._node_metas.setdefault(node, set())
        written = Written()
        for ch, meta in metas.items():
            key = (ch, user, conn)
            if self._owner.get(key, node) != node:
                continue
            state = self._channels.get(ch)
            if state is None:
                state = self._channels[ch] = ChannelState()
                written.changed.append(ch)
            state.put(user, meta)
            self._owner[key] = node
            owned.add(key)
            _with(self._conn_channels, conn, ch)
            self._user_index.setdefault(user, {})[conn] = meta
            written.append(ch)
        return written

    async def remove_metas(
        self, node: str, user: str, conn: str, channels: Sequence[str], now: int, last: bool
    ) -> Written:
        if self._foreign(node, conn):
            return Written()
        gone = Written(ch for ch in channels if self._owner.get((ch, user, conn), node) == node)
        for ch in gone:
            if self._remove_one(ch, user, conn) and ch not in self._channels:
                gone.changed.append(ch)
        if last:
            self._drop_from_index(user, conn)
            self._set_last_seen(user, now)
        return gone

    def _remove_one(self, ch: str, user: str, conn: str) -> bool:
        state = self._channels.get(ch)
        removed = state.remove(user, conn) if state is not None else None
        if state is not None and not len(state):
            del self._channels[ch]
        owner = self._owner.pop((ch, user, conn), None)
        if owner is not None:
            self._node_metas.get(owner, set()).discard((ch, user, conn))
        if conn in self._conn_channels:
            _without(self._conn_channels, conn, ch)
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
        self._refreshed[node] = now
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
        seen = self._refreshed.get(node, now)
        removed: list[SweptMeta] = []
        for ch, user, conn in sorted(keys):
            if self._owner.get((ch, user, conn), node) != node:
                continue  # resumed on another node: not ours to remove
            self._remove_one(ch, user, conn)
            removed.append(SweptMeta(ch, user, conn, seen, vacated=ch not in self._channels))
        offline: set[str] = set()
        for user, conn in conns:
            if not self._foreign(node, conn) and not self._forget_connection(node, user, conn):
                offline.add(user)
        for m in removed:  # the flag on one entry per user that went offline
            swept.add(SweptMeta(m.ch, m.user, m.conn, seen, m.vacated, m.user in offline))
            offline.discard(m.user)
        for user, conn in sorted(conns):
            if user in offline:  # offline with no meta to carry the flag
                swept.add(SweptMeta("", user, conn, seen, offline=True))
                offline.discard(user)
        for user, conn in {(s.user, s.conn) for s in swept} | conns:
            if not self._foreign(node, conn):
                self._drop_from_index(user, conn)
                self._set_last_seen(user, seen)
        self._leases.pop(node, None)
        self._loads.pop(node, None)
        self._claims[node] = _Claim(now + SWEEP_CLAIM_MS, swept)
        return sorted(swept, key=lambda m: (m.ch, m.user, m.conn))

    async def sweep_finish(self, node: str) -> None:
        # One process, one object: whoever finishes, the claim is the same one.
        if self._claims.pop(node, None) is not None:
            self._refreshed.pop(node, None)

    # -- churn -------------------------------------------------------------------
    async def churn_get(self, org: str, suppliers: Sequence[str]) -> dict[str, ChurnRecord]:
        recs = self._churn.get(org, {})
        return {s: recs[s] for s in suppliers if s in recs}

    async def churn_put(self, org: str, records: Sequence[ChurnRecord]) -> None:
        recs = self._churn.setdefault(org, {})
        for r in records:
            recs[r.supplier] = r

    async def churn_update(self, org: str, suppliers: Sequence[str],
                           step: ChurnStep) -> dict[str, ChurnRecord]:
        # Atomic by construction: no await between the read and the write.
        recs = self._churn.setdefault(org, {})
        wanted = set(suppliers)
        current = {s: recs[s] for s in suppliers if s in recs}
        records = step(current)
        strays = {r.supplier for r in records} - wanted
        if strays:
            raise ValueError(f"churn_update: records of suppliers not read: {sorted(strays)}")
        for r in records:
            recs[r.supplier] = r
        return current

    async def churn_snapshot(self, org: str, limit: int) -> list[ChurnRecord]:
        return snapshot_order(list(self._churn.get(org, {}).values()), limit)


if TYPE_CHECKING:
    from cluster.base import Broker, Store

    _broker: Broker = MemoryBroker()
    _store: Store = MemoryStore()
