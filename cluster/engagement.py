"""The engagement port (:class:`EngagementStore`) and its in-memory implementation.

Engagement figures feed the churn model (see :mod:`presence.engagement` for what they
mean). The Redis implementation is :class:`cluster.engagement_redis.RedisEngagement`;
``tests/cluster/test_engagement_contract.py`` runs one suite against both.

Times are integer ms since the epoch, passed in by the caller, as in
:mod:`cluster.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from presence.engagement import (
    DAY_MS,
    MAX_DEVICES,
    RETENTION_DAYS,
    WINDOW_DAYS,
    RawEngagement,
    day_key,
    expire_at_ms,
    minute_index,
    normalize_device,
    window_days,
)

__all__ = ["EngagementStore", "MemoryEngagement"]


class EngagementStore(Protocol):
    """Per-user, per-UTC-day engagement figures shared by every gateway node.

    Guarantees every implementation must keep:

    * online time is a set of marked minutes per day: marking the same user and minute
      twice (two devices, two nodes) counts once;
    * ``record_session`` counts every call (one per connection opened);
    * at most :data:`~presence.engagement.MAX_DEVICES` devices per user are kept, the
      least recently used going first; names are normalised with
      :func:`~presence.engagement.normalize_device`;
    * storage is bounded in time: the figures of a day go at the latest
      :func:`~presence.engagement.expire_at_ms` of that day (Redis: key expiry; memory:
      pruned on write), and a device not used for
      :data:`~presence.engagement.RETENTION_DAYS` days may go;
    * every method raises :class:`cluster.base.BackendUnavailable` when the backend
      cannot be reached; nothing else is raised for valid arguments.
    """

    async def start(self) -> None:
        """Connect (a no-op for memory)."""
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...

    async def record_session(self, user: str, now: int) -> None:
        """Count one connection opened by ``user`` on the day of ``now``."""
        ...

    async def mark_online(self, users: Sequence[str], now: int) -> None:
        """Mark every user of ``users`` online for the minute of ``now`` (one batched
        call: the gateway passes all its local users once a minute)."""
        ...

    async def record_device(self, user: str, device: str, now: int) -> None:
        """Remember that ``user`` used ``device`` at ``now`` (empty names ignored)."""
        ...

    async def engagement(
        self, users: Sequence[str], now: int, days: int = WINDOW_DAYS
    ) -> dict[str, RawEngagement]:
        """Raw figures of each of ``users`` for the ``days`` UTC days ending with the
        day of ``now`` (days without data absent); unknown users get an empty
        :class:`RawEngagement`. Every requested user is a key of the result."""
        ...


@dataclass(slots=True)
class _User:
    minutes: dict[str, set[int]] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)

    def prune(self, now: int) -> None:
        """Drop days (and devices) past their retention."""
        for per_day in (self.minutes, self.sessions):
            for day in [d for d in per_day if expire_at_ms(d) <= now]:
                del per_day[day]
        # As Redis expires the devices hash RETENTION_DAYS after its last write.
        horizon = now - RETENTION_DAYS * DAY_MS
        for name in [n for n, ms in self.devices.items() if ms <= horizon]:
            del self.devices[name]

    def empty(self) -> bool:
        return not (self.minutes or self.sessions or self.devices)


class MemoryEngagement:
    """:class:`EngagementStore` in process memory (one node; nothing survives it).

    A user's old days are pruned whenever that user is written; once per UTC day
    every user is pruned and users left empty are forgotten, so users who never come
    back do not hold memory for more than :data:`~presence.engagement.RETENTION_DAYS`
    days.
    """

    def __init__(self) -> None:
        self._users: dict[str, _User] = {}
        self._pruned_day = ""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _user(self, user: str, now: int) -> _User:
        today = day_key(now)
        if today != self._pruned_day:
            self._pruned_day = today
            for name, record in list(self._users.items()):
                record.prune(now)
                if record.empty():
                    del self._users[name]
        found = self._users.get(user)
        if found is None:
            found = self._users[user] = _User()
        else:
            found.prune(now)
        return found

    async def record_session(self, user: str, now: int) -> None:
        u = self._user(user, now)
        day = day_key(now)
        u.sessions[day] = u.sessions.get(day, 0) + 1

    async def mark_online(self, users: Sequence[str], now: int) -> None:
        day, minute = day_key(now), minute_index(now)
        for user in users:
            self._user(user, now).minutes.setdefault(day, set()).add(minute)

    async def record_device(self, user: str, device: str, now: int) -> None:
        name = normalize_device(device)
        if name is None:
            return
        u = self._user(user, now)
        u.devices[name] = max(now, u.devices.get(name, now))
        while len(u.devices) > MAX_DEVICES:
            others = [(ms, n) for n, ms in u.devices.items() if n != name]
            oldest = min(others)[1]  # least recently used, never the one just used
            del u.devices[oldest]

    async def engagement(
        self, users: Sequence[str], now: int, days: int = WINDOW_DAYS
    ) -> dict[str, RawEngagement]:
        window = window_days(now, days)
        out: dict[str, RawEngagement] = {}
        for user in users:
            u = self._users.get(user)
            if u is None:
                out[user] = RawEngagement()
                continue
            out[user] = RawEngagement(
                online_minutes={d: len(u.minutes[d]) for d in window if d in u.minutes},
                sessions={d: u.sessions[d] for d in window if d in u.sessions},
                devices=dict(u.devices),
            )
        return out


if TYPE_CHECKING:
    _memory_conforms: EngagementStore = MemoryEngagement()
