"""The engagement port on Redis (Cluster or single), keys in :mod:`cluster.keys`.

Per user (all keys hash-tagged ``{<user>}``, so one user's keys share a slot):

* ``presence:user:{u}:online:<day>``: a 1440-bit bitmap; ``SETBIT`` of the minute.
  Idempotent, so every node may mark its users every minute and two devices or two
  nodes of one user count once. Online minutes = ``BITCOUNT``.
* ``presence:user:{u}:sessions:<day>``: a counter, ``INCR`` at each connection opened.
  One key per day (not one hash per user) so that each day expires on its own: Redis
  7.0 has no per-field expiry, and a per-user hash would keep days of users who never
  skip one.
* ``presence:user:{u}:devices``: hash device -> last used ms, trimmed to
  :data:`~presence.engagement.MAX_DEVICES` by a script (below).

Every key of a day gets ``PEXPIREAT`` :func:`~presence.engagement.expire_at_ms` of that
day; the devices hash expires :data:`~presence.engagement.RETENTION_DAYS` days after
its last write. Writes go through a write batcher of the store's own
(:class:`~cluster.redis_batch.WriteBatcher` on a :class:`~cluster.redis_link.RedisLink`
of its own, not the Store's): the writes of one loop turn go out as one pipeline per
master on the batcher's own connections. Each connection opened writes a session and an
online minute, so at a reconnect storm these writes ran through redis-py's cluster
pipeline at a cost of its own per write, a tenth of a gateway's CPU; ``mark_online``
sends every user's ``SETBIT`` + ``PEXPIREAT`` in chunks of :data:`CHUNK` users. Reads
(:meth:`RedisEngagement.engagement`) keep redis-py's pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster import keys
from cluster.redis_batch import Command
from cluster.redis_conn import RedisConfig, script, text
from cluster.redis_link import RedisLink
from presence import engagement as eng

__all__ = ["CHUNK", "DEVICE_SCRIPT", "RedisEngagement"]

CHUNK = 500
"""Users per pipeline (bounds one round trip's size)."""

DEVICE_SCRIPT = script("engagement_device")
"""Record one device use and evict the least recently used beyond the bound."""


class RedisEngagement:
    """:class:`~cluster.engagement.EngagementStore` on Redis; ``config`` names a
    cluster or a single server (its own connections, as Store and Broker have)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._link = RedisLink(config)
        self.redis = self._link.topology
        self._batch = self._link.batch

    async def start(self) -> None:
        await self._link.attach(self)

    async def close(self) -> None:
        await self._link.detach(self)

    async def record_session(self, user: str, now: int) -> None:
        day = eng.day_key(now)
        key = keys.user_sessions(user, day)
        await self._batch.run([(key, ("INCR", key)),
                               (key, ("PEXPIREAT", key, eng.expire_at_ms(day)))])

    async def mark_online(self, users: Sequence[str], now: int) -> None:
        day, minute = eng.day_key(now), eng.minute_index(now)
        expire = eng.expire_at_ms(day)
        unique = list(dict.fromkeys(users))
        for i in range(0, len(unique), CHUNK):
            commands: list[Command] = []
            for user in unique[i : i + CHUNK]:
                key = keys.user_online(user, day)
                commands.append((key, ("SETBIT", key, minute, 1)))
                commands.append((key, ("PEXPIREAT", key, expire)))
            await self._batch.run(commands)

    async def record_device(self, user: str, device: str, now: int) -> None:
        name = eng.normalize_device(device)
        if name is None:
            return
        expire = now + eng.RETENTION_DAYS * eng.DAY_MS
        key = keys.user_devices(user)
        await self._batch.run([(key, DEVICE_SCRIPT.call(
            [key], [name, now, eng.MAX_DEVICES, expire]))])

    async def engagement(
        self, users: Sequence[str], now: int, days: int = eng.WINDOW_DAYS
    ) -> dict[str, eng.RawEngagement]:
        window = eng.window_days(now, days)
        unique = list(dict.fromkeys(users))
        out: dict[str, eng.RawEngagement] = {}
        # Per user: one MGET of the session counters (one slot), one BITCOUNT per
        # day, one HGETALL; chunked so that a pipeline stays a few thousand commands.
        per_user = 2 + len(window)
        step = max(1, CHUNK * 4 // per_user)
        for i in range(0, len(unique), step):
            chunk = unique[i : i + step]
            pipe = self.redis.pipeline()
            for user in chunk:
                pipe.execute_command("MGET", *(keys.user_sessions(user, d) for d in window))
                for d in window:
                    pipe.execute_command("BITCOUNT", keys.user_online(user, d))
                pipe.execute_command("HGETALL", keys.user_devices(user))
            replies = await self.redis.run(pipe)
            for n, user in enumerate(chunk):
                part = replies[n * per_user : (n + 1) * per_user]
                counts, bits, devices = part[0], part[1:-1], part[-1]
                out[user] = eng.RawEngagement(
                    online_minutes={d: int(b) for d, b in zip(window, bits, strict=True) if b},
                    sessions={
                        d: int(c) for d, c in zip(window, counts, strict=True) if c is not None
                    },
                    devices=_devices(devices),
                )
        return {user: out[user] for user in users}


def _devices(reply: Any) -> dict[str, int]:
    items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2],
                                                              strict=True)
    return {text(k): int(v) for k, v in items}


if TYPE_CHECKING:
    from cluster.engagement import EngagementStore

    _redis_conforms: EngagementStore = RedisEngagement(RedisConfig(url="redis://x"))
