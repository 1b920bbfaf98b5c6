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

Sweeping is exactly once per claim: the claim script (one slot, the node's) checks the
lease, takes a sweep lock (a random token and a deadline) and renames the node's
ownership sets to its sweep keys; concurrent callers find the lock or nothing left and
get ``None``. The claim (sweep keys and lock) is kept until the sweeper has published
the leaves and calls ``sweep_finish``; a sweeper that dies or fails to publish leaves it
to expire, and the next one takes it over and reports the same metas again (leaves
published twice are harmless, lost ones are not). The claim also drops the lease key,
so the swept node's next ``refresh_lease`` returns False.

Writes of one connection's metas are serialised in this process (see ``_exclusive``):
with the write order above, that makes a channel entry without ownership impossible.

Every command that is not a plain single-key read goes through the one write path
(:class:`~cluster.redis_batch.WriteBatcher`); scripts run by SHA.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster import keys
from cluster.base import (
    SWEEP_CLAIM_MS,
    Adopted,
    BackendUnavailable,
    ChurnStep,
    SweptMeta,
    UserPresence,
    Written,
)
from cluster.redis_batch import Command
from cluster.redis_conn import RedisConfig, script, text
from cluster.redis_link import RedisLink
from presence.churn import ChurnRecord, snapshot_order
from presence.codec import pack, unpack
from presence.engagement import DAY_MS
from presence.meta import Meta

CHURN_CHUNK = 1000
CHURN_SWAP_ATTEMPTS = 20
"""Read-compute-swap rounds of one churn_update before it gives up (each lost round
means another writer of the same suppliers succeeded: progress is always made)."""
OWNED_CHUNK = 1000

CONN_ADD = script("conn_add")
CONN_REMOVE = script("conn_remove")
META_PUT = script("meta_put")
META_REMOVE = script("meta_remove")
META_ADOPT = script("meta_adopt")
RESUME_CLAIM = script("resume_claim")
USER_PUT = script("user_put")
LEASE_REFRESH = script("lease_refresh")
USER_LEAVE = script("user_leave")
USER_SWEEP = script("user_sweep")
SWEEP_CLAIM = script("sweep_claim")
SWEEP_DONE = script("sweep_done")
REGISTRY_PRUNE = script("registry_prune")
CHURN_PUT = script("churn_put")
CHURN_SWAP = script("churn_swap")
CHURN_SNAPSHOT = script("churn_snapshot")


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _pairs(raw: Any) -> list[tuple[Any, Any]]:
    """A flat ``[k1, v1, k2, v2 ...]`` reply (or pairs, or a dict) as pairs."""
    if isinstance(raw, dict):
        return list(raw.items())
    if raw and isinstance(raw[0], list | tuple):
        return [(k, v) for k, v in raw]
    return list(zip(raw[::2], raw[1::2], strict=True))


@dataclass(frozen=True, slots=True)
class _Claim:
    """A sweep this store claimed and has not finished: its lock value and the
    registry score read before it (to prune the registry entry afterwards)."""

    lock: str
    score: float | None


class RedisStore:
    """Store on Redis; ``config`` names a cluster or a single server."""

    def __init__(self, config: RedisConfig, last_seen_days: int = 30,
                 link: RedisLink | None = None) -> None:
        self.config = config
        self.last_seen_ms = last_seen_days * DAY_MS
        # The process's link, shared with the Broker (cluster/redis_link.py), or one
        # of its own.
        self._link = link if link is not None else RedisLink(config)
        self.redis = self._link.topology
        # Ownership records this process has written, per node: an update of a meta
        # already owned skips that round trip (it was half the cost of an update).
        # Each lease refresh writes them all again, so ownership lost in a failover
        # (asynchronous replication) comes back within one refresh interval.
        self._owned: dict[str, set[bytes]] = {}
        # Every write (metas, ownership, leases, sweeps) goes through one batcher.
        self._batch = self._link.batch
        # One meta change at a time per (node, user, conn); see _exclusive.
        self._locks: dict[tuple[str, str, str], tuple[asyncio.Lock, int]] = {}
        self._claims: dict[str, _Claim] = {}

    async def start(self) -> None:
        await self._link.attach(self)

    async def close(self) -> None:
        await self._link.detach(self)

    async def healthy(self) -> bool:
        return await self.redis.healthy()

    async def _run(self, commands: Sequence[Command]) -> list[Any]:
        return await self._batch.run(commands)

    async def _one(self, key: str, *args: Any) -> Any:
        (reply,) = await self._batch.run([(key, args)])
        return reply

    @asynccontextmanager
    async def _exclusive(self, node: str, user: str, conn: str) -> AsyncIterator[None]:
        """Serialise the meta writes of one connection.

        A put writes ownership then channel entries, a remove channel entries then
        ownership: each order alone never leaves a channel entry unowned, but two of
        them interleaved can (put's ownership, remove's channel delete, put's channel
        write, remove's ownership delete: an entry no sweep can find). Only the node
        that owns a connection writes its metas (sweepers claim, they do not write
        them), so serialising them in this process makes that interleaving impossible.
        """
        key = (node, user, conn)
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock_, left = self._locks[key]
            if left <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock_, left - 1)

    # -- connections -------------------------------------------------------------
    async def add_connection(self, node: str, user: str, conn: str,
                             resume_hash: str = "") -> int:
        owner_key = keys.node_conns(node)
        await self._run([
            (owner_key, ("SADD", owner_key, pack([user, conn]))),
            (keys.REGISTRY, ("ZADD", keys.REGISTRY, "NX", 0, node)),
        ])
        user_key = keys.user_conns(user)
        return int(await self._one(user_key, *CONN_ADD.call(
            [user_key, keys.user_resume(user)], [conn, node, resume_hash])))

    async def remove_connection(self, node: str, user: str, conn: str) -> int | None:
        user_key = keys.user_conns(user)
        left = await self._one(user_key, *CONN_REMOVE.call(
            [user_key, keys.user_resume(user), keys.user_channels(user, conn)], [conn, node]))
        await self._one(keys.node_conns(node), "SREM", keys.node_conns(node),
                        pack([user, conn]))
        return None if left is None else int(left)  # the script answers -1 for RESUMED_ELSEWHERE

    async def track_channel(self, node: str, user: str, conn: str, ch: str,
                            joined: bool) -> None:
        key = keys.user_channels(user, conn)
        await self._one(key, "SADD" if joined else "SREM", key, ch)

    async def resume(self, node: str, user: str, conn: str, resume_hash: str,
                     new_hash: str) -> Adopted | None:
        user_key, chans = keys.user_conns(user), keys.user_channels(user, conn)
        claimed = await self._one(user_key, *RESUME_CLAIM.call(
            [user_key, keys.user_resume(user), chans], [conn, resume_hash, new_hash, node]))
        if not claimed:
            return None
        old, channels = text(claimed[0]), sorted(text(c) for c in claimed[1:])
        presence = [ch for ch in channels if not ch.startswith("churn:")]
        # Ownership first (see the module docstring), then the entries move.
        entries = [pack([ch, user, conn]) for ch in presence]
        owner_key = keys.node_metas(node)
        field = keys.meta_field(user, conn)
        await self._run([
            (keys.node_conns(node), ("SADD", keys.node_conns(node), pack([user, conn]))),
            (keys.REGISTRY, ("ZADD", keys.REGISTRY, "NX", 0, node)),
            *([(owner_key, ("SADD", owner_key, *entries))] if entries else []),
        ])
        self._owned.setdefault(node, set()).update(entries)
        moved = await self._run([(keys.channel_metas(ch), META_ADOPT.call(
            [keys.channel_metas(ch)], [field, node])) for ch in presence])
        # The old node no longer owns any of it (a sweep of it must not find it).
        old_metas = keys.node_metas(old)
        await self._run([
            (keys.node_conns(old), ("SREM", keys.node_conns(old), pack([user, conn]))),
            *([(old_metas, ("SREM", old_metas, *entries))] if entries else []),
        ])
        self._owned.get(old, set()).difference_update(entries)
        out: dict[str, Meta | None] = {
            ch: Meta.from_wire(unpack(raw)) for ch, raw in zip(presence, moved, strict=True)
            if raw is not None}
        out.update({ch: None for ch in channels if ch.startswith("churn:")})
        return Adopted(conn, out)

    # -- metas -------------------------------------------------------------------
    async def put_metas(self, node: str, user: str, conn: str, metas: Mapping[str, Meta],
                        joins: Mapping[str, bytes] | None = None) -> Written:
        if not metas:
            return Written()
        async with self._exclusive(node, user, conn):
            known = self._owned.setdefault(node, set())
            owned = [k for k in (pack([ch, user, conn]) for ch in metas) if k not in known]
            if owned:
                # Ownership first: a crash between the two steps leaves no unowned entry.
                owner_key = keys.node_metas(node)
                await self._run([
                    (owner_key, ("SADD", owner_key, *owned)),
                    (keys.REGISTRY, ("ZADD", keys.REGISTRY, "NX", 0, node)),
                ])
                known.update(owned)
            field = keys.meta_field(user, conn)
            writes: list[Command] = []
            channels = list(metas)
            for ch, meta in metas.items():
                key = keys.channel_metas(ch)
                args = [field, node, pack([user, node, meta.to_wire()])]
                if joins is not None:
                    # The Broker's topic of ch (cluster/redis_broker.py): same slot.
                    args += [keys.topic(ch), joins[ch]]
                writes.append((key, META_PUT.call([key], args)))
            last = list(metas.values())[-1]
            user_keys = [keys.user_conns(user), keys.user_index(user),
                         keys.user_channels(user, conn)]
            writes.append((user_keys[0], USER_PUT.call(
                user_keys, [conn, node, pack(last.to_wire()), *channels])))
            done = [int(r) for r in await self._run(writes)]
            return Written((ch for ch, r in zip(channels, done, strict=False) if r > 0),
                           (ch for ch, r in zip(channels, done, strict=False) if r == 2),
                           published=joins is not None)

    async def remove_metas(
        self, node: str, user: str, conn: str, channels: Sequence[str], now: int, last: bool
    ) -> Written:
        if not channels and not last:
            return Written()
        async with self._exclusive(node, user, conn):
            field = keys.meta_field(user, conn)
            writes: list[Command] = []
            for ch in channels:
                key = keys.channel_metas(ch)
                writes.append((key, META_REMOVE.call([key], [field, node])))
            user_keys = [keys.user_index(user), keys.user_seen(user), keys.user_conns(user),
                         keys.user_channels(user, conn)]
            writes.append((user_keys[0], USER_LEAVE.call(user_keys, [
                conn, now, self.last_seen_ms, node, 1 if last else 0, *channels])))
            done = [int(r) for r in await self._run(writes)]
            if channels:
                # Ownership last, for the same reason as in put_metas (an entry another
                # node adopted is not ours either way).
                owned = [pack([ch, user, conn]) for ch in channels]
                owner_key = keys.node_metas(node)
                await self._run([(owner_key, ("SREM", owner_key, *owned))])
                self._owned.get(node, set()).difference_update(owned)
            return Written((ch for ch, r in zip(channels, done, strict=False) if r >= 0),
                           (ch for ch, r in zip(channels, done, strict=False) if r == 2))

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        raw = await self.redis.command("HGETALL", keys.channel_metas(ch))
        out: dict[str, list[Meta]] = {}
        for _field, value in _pairs(raw):
            user, _node, wire = unpack(value)
            out.setdefault(str(user), []).append(Meta.from_wire(wire))
        for metas in out.values():
            metas.sort(key=lambda m: m.conn)
        return out

    async def user_presence(self, users: Sequence[str]) -> dict[str, UserPresence]:
        if not users:
            return {}
        reads: list[Command] = []
        for u in users:
            reads.append((keys.user_index(u), ("HVALS", keys.user_index(u))))
            reads.append((keys.user_seen(u), ("GET", keys.user_seen(u))))
        res = await self._run(reads)
        out: dict[str, UserPresence] = {}
        for i, u in enumerate(users):
            metas = sorted((Meta.from_wire(unpack(v)) for v in res[2 * i]),
                           key=lambda m: m.conn)
            out[u] = UserPresence(metas=tuple(metas), last_seen=_int(res[2 * i + 1]))
        return out

    # -- leases ------------------------------------------------------------------
    async def refresh_lease(
        self, node: str, ttl: float, now: int, connections: int = 0
    ) -> bool:
        ttl_ms = max(1, int(ttl * 1000))
        expiry = now + ttl_ms
        lease, owner_key = keys.node_lease(node), keys.node_metas(node)
        writes: list[Command] = [
            (lease, LEASE_REFRESH.call([lease], [expiry, ttl_ms])),
            (keys.REGISTRY, ("ZADD", keys.REGISTRY, expiry, node)),
            (keys.LOADS, ("HSET", keys.LOADS, node, int(connections))),
            (keys.REFRESHED, ("HSET", keys.REFRESHED, node, now)),
        ]
        owned = list(self._owned.get(node, ()))
        for i in range(0, len(owned), OWNED_CHUNK):
            writes.append((owner_key, ("SADD", owner_key, *owned[i : i + OWNED_CHUNK])))
        previous = _int((await self._run(writes))[0])
        return previous is not None and previous >= now

    async def live_nodes(self, now: int) -> dict[str, int]:
        raw = await self.redis.command("ZRANGEBYSCORE", keys.REGISTRY, now, "+inf")
        nodes = sorted(text(m) for m in raw or [])
        if not nodes:
            return {}
        loads = await self.redis.command("HMGET", keys.LOADS, *nodes)
        out = {n: _int(v) or 0 for n, v in zip(nodes, loads, strict=True)}
        # Forget the figures of nodes that are gone (bounded hash).
        stale = await self.redis.command("HKEYS", keys.LOADS)
        gone = [k for k in (text(x) for x in stale or []) if k not in out]
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
        candidates = [(text(m), float(s)) for m, s in _pairs(raw or [])]
        if not candidates:
            return []
        reads: list[Command] = []
        for node, _score in candidates:
            lease = keys.node_lease(node)
            reads.append((lease, ("GET", lease)))
            reads.append((lease, (
                "EXISTS", keys.node_metas(node), keys.node_conns(node),
                keys.node_sweep_metas(node), keys.node_sweep_conns(node),
            )))
            reads.append((lease, ("GET", keys.node_sweep_lock(node))))
        res = await self._run(reads)
        dead: list[str] = []
        for i, (node, score) in enumerate(candidates):
            lease_at, owns, lock = _int(res[3 * i]), int(res[3 * i + 1]), res[3 * i + 2]
            if lease_at is not None and lease_at >= now:
                continue  # the registry copy lost a refresh; the lease key is alive
            if lock is not None and int(text(lock).rpartition(":")[2]) > now:
                continue  # claimed by a sweeper now
            if owns:
                dead.append(node)
            else:
                # Owns nothing: forget it, unless it refreshed meanwhile.
                await self.redis.eval(REGISTRY_PRUNE, [keys.REGISTRY], [node, repr(score)])
        return sorted(dead)

    async def sweep_node(self, node: str, now: int) -> list[SweptMeta] | None:
        score = await self.redis.command("ZSCORE", keys.REGISTRY, node)
        if score is not None and float(score) >= now:
            return None
        # A dead node's connections count as lost from its last lease refresh.
        seen = _int(await self.redis.command("HGET", keys.REFRESHED, node)) or now
        self._owned.pop(node, None)  # its ownership records are about to go
        token = uuid.uuid4().hex
        sweep_metas, sweep_conns = keys.node_sweep_metas(node), keys.node_sweep_conns(node)
        lock = keys.node_sweep_lock(node)
        claimed = await self.redis.eval(
            SWEEP_CLAIM,
            [keys.node_lease(node), keys.node_metas(node), keys.node_conns(node),
             sweep_metas, sweep_conns, lock],
            [now, token, SWEEP_CLAIM_MS],
        )
        if not int(claimed):
            return None
        raw_metas, raw_conns = await self._run([
            (sweep_metas, ("SMEMBERS", sweep_metas)),
            (sweep_conns, ("SMEMBERS", sweep_conns)),
        ])
        owned = sorted({tuple(unpack(r)) for r in raw_metas})
        conns = {tuple(unpack(r)) for r in raw_conns}
        claimed = [SweptMeta(ch, user, conn, seen) for ch, user, conn in owned]
        # The connection records (and resume hashes) go first, so that no resume takes
        # a connection once its leaves are on their way; a connection a resume took
        # already keeps its metas (its adoption may not have moved them yet).
        by_user: dict[str, set[str]] = {}
        for m in claimed:
            by_user.setdefault(m.user, set()).add(m.conn)
        for user, conn in conns:
            by_user.setdefault(user, set()).add(conn)
        writes: list[Command] = []
        users = sorted(by_user)
        for user in users:
            ordered = sorted(by_user[user])
            user_keys = [keys.user_conns(user), keys.user_index(user), keys.user_seen(user),
                         keys.user_resume(user),
                         *(keys.user_channels(user, c) for c in ordered)]
            writes.append((user_keys[0], USER_SWEEP.call(
                user_keys, [seen, self.last_seen_ms, node, *ordered])))
        results = await self._run(writes)
        elsewhere = {(u, text(c)) for u, r in zip(users, results, strict=True) for c in r[2:]}
        # The claim stays until sweep_finish: every claimed meta is reported, also
        # those an earlier (dead) sweeper already removed, whose leaves may be lost;
        # not those another node adopted (a resume), which stay where they are.
        claimed = [m for m in claimed if (m.user, m.conn) not in elsewhere]
        removed = await self._run([
            (keys.channel_metas(m.ch), META_REMOVE.call(
                [keys.channel_metas(m.ch)], [keys.meta_field(m.user, m.conn), node]))
            for m in claimed])
        swept = [SweptMeta(m.ch, m.user, m.conn, seen, vacated=int(r) == 2)
                 for m, r in zip(claimed, removed, strict=True) if int(r) >= 0]
        # user.offline: a user whose connections were forgotten and none is left; the
        # flag goes on one of the user's entries (one with no channel if it has none).
        offline = {u for u, r in zip(users, results, strict=True)
                   if int(r[0]) > 0 and int(r[1]) == 0}
        for i, m in enumerate(swept):
            if m.user in offline:
                swept[i] = SweptMeta(m.ch, m.user, m.conn, seen, m.vacated, offline=True)
                offline.discard(m.user)
        for user, conn in sorted(conns):
            if user in offline:
                swept.append(SweptMeta("", user, conn, seen, offline=True))
                offline.discard(user)
        self._claims[node] = _Claim(
            f"{token}:{now + SWEEP_CLAIM_MS}", None if score is None else float(score)
        )
        return swept

    async def sweep_finish(self, node: str) -> None:
        claim = self._claims.pop(node, None)
        if claim is None:
            return
        done = await self.redis.eval(
            SWEEP_DONE,
            [keys.node_sweep_metas(node), keys.node_sweep_conns(node),
             keys.node_sweep_lock(node)],
            [claim.lock],
        )
        if int(done) and claim.score is not None:
            await self.redis.eval(REGISTRY_PRUNE, [keys.REGISTRY],
                                  [node, repr(claim.score)])
        if int(done):
            await self.redis.command("HDEL", keys.REFRESHED, node)

    # -- churn -------------------------------------------------------------------
    async def churn_get(self, org: str, suppliers: Sequence[str]) -> dict[str, ChurnRecord]:
        if not suppliers:
            return {}
        values = await self.redis.command("HMGET", keys.churn_records(org), *suppliers)
        return {s: ChurnRecord.from_wire(unpack(v))
                for s, v in zip(suppliers, values, strict=True) if v is not None}

    async def churn_put(self, org: str, records: Sequence[ChurnRecord]) -> None:
        latest = {r.supplier: r for r in records}  # the last record of a supplier wins
        items = list(latest.values())
        for i in range(0, len(items), CHURN_CHUNK):
            args: list[Any] = []
            for r in items[i : i + CHURN_CHUNK]:
                args += [r.supplier, repr(float(r.score)), pack(r.to_store())]
            await self.redis.eval(CHURN_PUT, [keys.churn_records(org), keys.churn_scores(org)],
                                  args)

    async def churn_update(self, org: str, suppliers: Sequence[str],
                           step: ChurnStep) -> dict[str, ChurnRecord]:
        # Optimistic: read the raw records, let ``step`` compute in Python, and write
        # with a compare-and-set script that refuses if any record read has changed
        # (one script call, so one org's records and scores change together).
        names = list(dict.fromkeys(suppliers))
        wanted = set(names)
        rk, sk = keys.churn_records(org), keys.churn_scores(org)
        for _ in range(CHURN_SWAP_ATTEMPTS):
            raw = await self.redis.command("HMGET", rk, *names) if names else []
            current = {s: ChurnRecord.from_wire(unpack(v))
                       for s, v in zip(names, raw, strict=True) if v is not None}
            records = {r.supplier: r for r in step(current)}
            strays = set(records) - wanted
            if strays:
                raise ValueError(f"churn_update: records of suppliers not read: "
                                 f"{sorted(strays)}")
            args: list[Any] = [len(names)]
            for s, v in zip(names, raw, strict=True):
                args += [s, b"" if v is None else v]
            for r in records.values():
                args += [r.supplier, repr(float(r.score)), pack(r.to_store())]
            if int(await self.redis.eval(CHURN_SWAP, [rk, sk], args)):
                return current
        raise BackendUnavailable(f"churn records of {org} kept changing: "
                                 f"{CHURN_SWAP_ATTEMPTS} attempts lost")

    async def churn_snapshot(self, org: str, limit: int) -> list[ChurnRecord]:
        if limit <= 0:
            return []
        values = await self.redis.eval(
            CHURN_SNAPSHOT, [keys.churn_records(org), keys.churn_scores(org)], [limit]
        )
        records = [ChurnRecord.from_wire(unpack(v)) for v in values if v is not None]
        return snapshot_order(records, limit)


if TYPE_CHECKING:
    from cluster.base import Store

    _store: Store = RedisStore(RedisConfig(url="redis://127.0.0.1:6379"))
