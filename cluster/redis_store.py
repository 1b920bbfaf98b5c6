"""The Store on Redis (Cluster or single), see :mod:`cluster.keys` for the layout.

Writes that span slots are ordered so that a crash between two round trips never leaves
state nobody owns: ownership records (the node's sets, in the node's slot) are written
*before* the channel/user records and removed *after* them. A leftover ownership record
only costs a no-op at sweep time; a leftover channel record without one would be a
ghost forever.

Leases and failover. ``refresh_lease`` writes the lease twice, in two slots: the lease
key ``presence:node:{n}:lease`` (value = expiry ms, PX ttl) and the node's score in the
registry zset ``presence:nodes`` (= the same expiry). A node is reported dead only when
*both* copies say its lease expired before ``now`` (an absent lease key counts as
expired, the registry copy still decides), and ``sweep_node`` re-checks both (the lease
key inside the claim script). Replication is asynchronous, so a failover may lose the
latest refresh of one copy; the previous refresh then still holds for about 2/3 of the
ttl (the gateway refreshes every ``node_lease / 3``), the other copy usually lives on
another master, and the node's next refresh repairs both. So a failover does not make a
live node look dead.

Sweeping is exactly once: the claim script (one slot, the node's) checks the lease,
takes a sweep lock (PX, with a random token) and renames the node's ownership sets to
its sweep keys; concurrent callers find the lock or nothing left and get ``None``. A
sweeper that dies mid-way leaves the lock to expire; the next one takes the leftovers
over, and records already removed are not reported twice (HDEL says whether it removed).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from cluster import keys
from cluster.base import SweptMeta, UserPresence
from cluster.redis_batch import Command, WriteBatcher
from cluster.redis_conn import RedisConfig, Topology, load_script
from presence.churn import ChurnRecord, snapshot_order
from presence.meta import Meta

DAY_MS = 86_400_000
SWEEP_LOCK_MS = 30_000
CHURN_CHUNK = 1000


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


class RedisStore:
    """Store on Redis; ``config`` names a cluster or a single server."""

    def __init__(self, config: RedisConfig, last_seen_days: int = 30) -> None:
        self.config = config
        self.last_seen_ms = last_seen_days * DAY_MS
        self.redis = Topology(config)
        self._scripts = {
            name: load_script(name)
            for name in ("conn_add", "user_leave", "user_sweep", "sweep_claim",
                         "sweep_done", "registry_prune", "churn_put", "churn_snapshot")
        }
        # Ownership records this process has written, per node: an update of a meta
        # already owned skips that round trip (it was half the cost of an update).
        # Each lease refresh writes them all again, so ownership lost in a failover
        # (asynchronous replication) comes back within one refresh interval.
        self._owned: dict[str, set[bytes]] = {}
        # The per-update writes (metas in, metas out) of one loop turn go out together.
        self._batch = WriteBatcher(self.redis, config.op_timeout)

    async def start(self) -> None:
        await self.redis.start()

    async def close(self) -> None:
        await self._batch.close()
        await self.redis.close()

    async def healthy(self) -> bool:
        return await self.redis.healthy()

    async def _eval(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        return await self.redis.eval(self._scripts[name], keys_, args)

    def _pipe_eval(self, pipe: Any, name: str, keys_: list[str], args: list[Any]) -> None:
        pipe.execute_command("EVAL", self._scripts[name], len(keys_), *keys_, *args)

    # -- connections -------------------------------------------------------------
    async def add_connection(self, node: str, user: str, conn: str) -> int:
        pipe = self.redis.pipeline()
        pipe.execute_command("SADD", keys.node_conns(node), _pack([user, conn]))
        pipe.execute_command("ZADD", keys.REGISTRY, "NX", 0, node)
        await self.redis.run(pipe)
        count = await self._eval("conn_add", [keys.user_conns(user)], [conn, node])
        return int(count)

    async def remove_connection(self, node: str, user: str, conn: str) -> None:
        await self.redis.command("HDEL", keys.user_conns(user), conn)
        await self.redis.command("SREM", keys.node_conns(node), _pack([user, conn]))

    # -- metas -------------------------------------------------------------------
    async def put_metas(self, node: str, user: str, conn: str, metas: Mapping[str, Meta]) -> None:
        if not metas:
            return
        known = self._owned.setdefault(node, set())
        owned = [k for k in (_pack([ch, user, conn]) for ch in metas) if k not in known]
        if owned:
            # Ownership first: a crash between the two steps leaves no unowned entry.
            owner_key = keys.node_metas(node)
            await self._batch.run([
                (owner_key, ("SADD", owner_key, *owned)),
                (keys.REGISTRY, ("ZADD", keys.REGISTRY, "NX", 0, node)),
            ])
            known.update(owned)
        field = keys.meta_field(user, conn)
        writes: list[Command] = []
        last: Meta | None = None
        for ch, meta in metas.items():
            key = keys.channel_metas(ch)
            writes.append((key, ("HSET", key, field, _pack([user, node, meta.to_wire()]))))
            last = meta
        assert last is not None
        index = keys.user_index(user)
        writes.append((index, ("HSET", index, conn, _pack(last.to_wire()))))
        await self._batch.run(writes)

    async def remove_metas(
        self, node: str, user: str, conn: str, channels: Sequence[str], now: int, last: bool
    ) -> None:
        if not channels and not last:
            return
        field = keys.meta_field(user, conn)
        writes: list[Command] = []
        for ch in channels:
            key = keys.channel_metas(ch)
            writes.append((key, ("HDEL", key, field)))
        if last:
            index, seen = keys.user_index(user), keys.user_seen(user)
            writes.append((index, ("EVAL", self._scripts["user_leave"], 2, index, seen,
                                   conn, now, self.last_seen_ms)))
        await self._batch.run(writes)
        if channels:
            # Ownership last, for the same reason as in put_metas.
            owned = [_pack([ch, user, conn]) for ch in channels]
            owner_key = keys.node_metas(node)
            await self._batch.run([(owner_key, ("SREM", owner_key, *owned))])
            self._owned.get(node, set()).difference_update(owned)

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        raw = await self.redis.command("HGETALL", keys.channel_metas(ch))
        items: dict[bytes, bytes] = raw if isinstance(raw, dict) else dict(
            zip(raw[::2], raw[1::2], strict=True)
        )
        out: dict[str, list[Meta]] = {}
        for value in items.values():
            user, _node, wire = _unpack(value)
            out.setdefault(str(user), []).append(Meta.from_wire(wire))
        for metas in out.values():
            metas.sort(key=lambda m: m.conn)
        return out

    async def user_presence(self, users: Sequence[str]) -> dict[str, UserPresence]:
        if not users:
            return {}
        pipe = self.redis.pipeline()
        for u in users:
            pipe.execute_command("HVALS", keys.user_index(u))
            pipe.execute_command("GET", keys.user_seen(u))
        res = await self.redis.run(pipe)
        out: dict[str, UserPresence] = {}
        for i, u in enumerate(users):
            metas = sorted((Meta.from_wire(_unpack(v)) for v in res[2 * i]),
                           key=lambda m: m.conn)
            out[u] = UserPresence(metas=tuple(metas), last_seen=_int(res[2 * i + 1]))
        return out

    # -- leases ------------------------------------------------------------------
    async def refresh_lease(
        self, node: str, ttl: float, now: int, connections: int = 0
    ) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        expiry = now + ttl_ms
        pipe = self.redis.pipeline()
        pipe.execute_command("SET", keys.node_lease(node), expiry, "PX", ttl_ms)
        pipe.execute_command("ZADD", keys.REGISTRY, expiry, node)
        pipe.execute_command("HSET", keys.LOADS, node, int(connections))
        owned = list(self._owned.get(node, ()))
        for i in range(0, len(owned), 1000):
            pipe.execute_command("SADD", keys.node_metas(node), *owned[i : i + 1000])
        await self.redis.run(pipe)

    async def live_nodes(self, now: int) -> dict[str, int]:
        raw = await self.redis.command("ZRANGEBYSCORE", keys.REGISTRY, now, "+inf")
        nodes = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw or [])
        if not nodes:
            return {}
        loads = await self.redis.command("HMGET", keys.LOADS, *nodes)
        out = {n: _int(v) or 0 for n, v in zip(nodes, loads, strict=True)}
        # Forget the figures of nodes that are gone (bounded hash).
        stale = await self.redis.command("HKEYS", keys.LOADS)
        gone = [k for k in (x.decode() if isinstance(x, bytes) else str(x) for x in stale or [])
                if k not in out]
        if gone:
            await self.redis.command("HDEL", keys.LOADS, *gone)
        return out

    async def drop_lease(self, node: str) -> None:
        self._owned.pop(node, None)
        await self.redis.command("DEL", keys.node_lease(node))
        owns = await self.redis.command(
            "EXISTS", keys.node_metas(node), keys.node_conns(node)
        )
        if int(owns):
            await self.redis.command("ZADD", keys.REGISTRY, "XX", 0, node)
        else:
            await self.redis.command("ZREM", keys.REGISTRY, node)

    async def dead_nodes(self, now: int) -> list[str]:
        raw = await self.redis.command(
            "ZRANGEBYSCORE", keys.REGISTRY, "-inf", f"({now}", "WITHSCORES"
        )
        pairs = raw if raw and isinstance(raw[0], list | tuple) else list(
            zip(raw[::2], raw[1::2], strict=True)
        )
        candidates = [(m.decode() if isinstance(m, bytes) else str(m), float(s))
                      for m, s in pairs]
        if not candidates:
            return []
        pipe = self.redis.pipeline()
        for node, _score in candidates:
            pipe.execute_command("GET", keys.node_lease(node))
            pipe.execute_command(
                "EXISTS", keys.node_metas(node), keys.node_conns(node),
                keys.node_sweep_metas(node), keys.node_sweep_conns(node),
            )
        res = await self.redis.run(pipe)
        dead: list[str] = []
        for i, (node, score) in enumerate(candidates):
            lease = _int(res[2 * i])
            if lease is not None and lease >= now:
                continue  # the registry copy lost a refresh; the lease key is alive
            if int(res[2 * i + 1]):
                dead.append(node)
            else:
                # Owns nothing: forget it, unless it refreshed meanwhile.
                await self._eval("registry_prune", [keys.REGISTRY], [node, repr(score)])
        return sorted(dead)

    async def sweep_node(self, node: str, now: int) -> list[SweptMeta] | None:
        score = await self.redis.command("ZSCORE", keys.REGISTRY, node)
        if score is not None and float(score) >= now:
            return None
        self._owned.pop(node, None)  # its ownership records are about to go
        token = uuid.uuid4().hex
        claimed = await self._eval(
            "sweep_claim",
            [keys.node_lease(node), keys.node_metas(node), keys.node_conns(node),
             keys.node_sweep_metas(node), keys.node_sweep_conns(node),
             keys.node_sweep_lock(node)],
            [now, token, SWEEP_LOCK_MS],
        )
        if not int(claimed):
            return None
        pipe = self.redis.pipeline()
        pipe.execute_command("SMEMBERS", keys.node_sweep_metas(node))
        pipe.execute_command("SMEMBERS", keys.node_sweep_conns(node))
        raw_metas, raw_conns = await self.redis.run(pipe)
        owned = sorted(tuple(_unpack(r)) for r in raw_metas)
        conns = {tuple(_unpack(r)) for r in raw_conns}
        swept: list[SweptMeta] = []
        if owned:
            pipe = self.redis.pipeline()
            for ch, user, conn in owned:
                pipe.execute_command("HDEL", keys.channel_metas(ch), keys.meta_field(user, conn))
            removed = await self.redis.run(pipe)
            swept = [SweptMeta(ch, user, conn)
                     for (ch, user, conn), n in zip(owned, removed, strict=True) if int(n)]
        by_user: dict[str, set[str]] = {}
        for s in swept:
            by_user.setdefault(s.user, set()).add(s.conn)
        for user, conn in conns:
            by_user.setdefault(user, set()).add(conn)
        if by_user:
            pipe = self.redis.pipeline()
            for user, user_conns in sorted(by_user.items()):
                self._pipe_eval(
                    pipe, "user_sweep",
                    [keys.user_conns(user), keys.user_index(user), keys.user_seen(user)],
                    [now, self.last_seen_ms, *sorted(user_conns)],
                )
            await self.redis.run(pipe)
        await self._eval(
            "sweep_done",
            [keys.node_sweep_metas(node), keys.node_sweep_conns(node),
             keys.node_sweep_lock(node)],
            [token],
        )
        if score is not None:
            await self._eval("registry_prune", [keys.REGISTRY], [node, repr(float(score))])
        return swept

    # -- churn -------------------------------------------------------------------
    async def churn_get(self, org: str, suppliers: Sequence[str]) -> dict[str, ChurnRecord]:
        if not suppliers:
            return {}
        values = await self.redis.command("HMGET", keys.churn_records(org), *suppliers)
        return {s: ChurnRecord.from_wire(_unpack(v))
                for s, v in zip(suppliers, values, strict=True) if v is not None}

    async def churn_put(self, org: str, records: Sequence[ChurnRecord]) -> None:
        latest = {r.supplier: r for r in records}  # the last record of a supplier wins
        items = list(latest.values())
        for i in range(0, len(items), CHURN_CHUNK):
            args: list[Any] = []
            for r in items[i : i + CHURN_CHUNK]:
                args += [r.supplier, repr(float(r.score)), _pack(r.to_store())]
            await self._eval("churn_put", [keys.churn_records(org), keys.churn_scores(org)],
                             args)

    async def churn_snapshot(self, org: str, limit: int) -> list[ChurnRecord]:
        if limit <= 0:
            return []
        values = await self._eval(
            "churn_snapshot", [keys.churn_records(org), keys.churn_scores(org)], [limit]
        )
        records = [ChurnRecord.from_wire(_unpack(v)) for v in values if v is not None]
        return snapshot_order(records, limit)


if TYPE_CHECKING:
    from cluster.base import Store

    _store: Store = RedisStore(RedisConfig(url="redis://127.0.0.1:6379"))
