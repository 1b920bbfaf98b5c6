"""One contract suite for every EngagementStore: memory, Redis Cluster, plain Redis.

Several store instances on one backend play several gateway nodes. Fake ``now`` values
start at tomorrow's midnight UTC (real time): Redis expiries are absolute, so dates in
the past would expire the keys at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from cluster import keys
from cluster.engagement import EngagementStore, MemoryEngagement
from cluster.engagement_redis import CHUNK, RedisEngagement
from cluster.redis_conn import RedisConfig, parse_nodes
from presence.engagement import (
    DAY_MS,
    MAX_DEVICES,
    RawEngagement,
    day_key,
    expire_at_ms,
)

MINUTE = 60_000
T0 = (int(time.time() * 1000) // DAY_MS + 1) * DAY_MS
"""Tomorrow, 00:00 UTC."""


class Engagements:
    """Makes engagement stores ("nodes") sharing one backend; closes them at the end."""

    def __init__(self, kind: str, config: RedisConfig | None) -> None:
        self.kind = kind
        self.config = config
        self.memory = MemoryEngagement()
        self._open: list[EngagementStore] = []

    async def node(self) -> EngagementStore:
        if self.config is None:
            return self.memory
        store = RedisEngagement(self.config)
        await store.start()
        self._open.append(store)
        return store

    def raw_client(self) -> Any:
        """A synchronous client routing by key (Redis kinds only)."""
        assert self.config is not None
        if self.config.url:
            return redis.Redis.from_url(self.config.url, socket_timeout=2)
        host, port = parse_nodes(self.config.cluster)[0]
        return redis.RedisCluster(host=host, port=port, socket_timeout=2)

    async def close(self) -> None:
        for store in reversed(self._open):
            await store.close()


@pytest.fixture
async def engagements(
    backend_config: tuple[str, RedisConfig | None],
) -> AsyncIterator[Engagements]:
    e = Engagements(*backend_config)
    try:
        yield e
    finally:
        await e.close()


def minutes(raw: RawEngagement) -> dict[str, int]:
    return dict(raw.online_minutes)


async def test_online_minutes_count_once_across_nodes_and_devices(
    engagements: Engagements,
) -> None:
    a, b = await engagements.node(), await engagements.node()
    t = T0 + 10 * 60 * MINUTE  # 10:00
    await a.mark_online(["u1", "u2"], t)
    await b.mark_online(["u1"], t + 30_000)  # same minute, another node
    await a.mark_online(["u1", "u1"], t + 59_999)  # same minute, twice in one batch
    await b.mark_online(["u1"], t + MINUTE)  # 10:01
    got = await a.engagement(["u1", "u2", "nobody"], t + 2 * MINUTE)
    day = day_key(t)
    assert minutes(got["u1"]) == {day: 2}
    assert minutes(got["u2"]) == {day: 1}
    assert got["nobody"] == RawEngagement()


async def test_minutes_and_sessions_split_at_utc_midnight(engagements: Engagements) -> None:
    s = await engagements.node()
    before, after = T0 + DAY_MS - MINUTE, T0 + DAY_MS  # 23:59 and 00:00 next day
    await s.record_session("u", before)
    await s.mark_online(["u"], before)
    await s.mark_online(["u"], after)
    await s.record_session("u", after)
    await s.record_session("u", after + 1000)
    got = (await s.engagement(["u"], after + MINUTE))["u"]
    assert minutes(got) == {day_key(before): 1, day_key(after): 1}
    assert dict(got.sessions) == {day_key(before): 1, day_key(after): 2}


async def test_engagement_reads_only_the_window(engagements: Engagements) -> None:
    s = await engagements.node()
    for d in range(0, 5):
        await s.mark_online(["u"], T0 + d * DAY_MS)
        await s.record_session("u", T0 + d * DAY_MS)
    now = T0 + 4 * DAY_MS + MINUTE
    got = (await s.engagement(["u"], now, days=2))["u"]
    assert set(got.online_minutes) == {day_key(T0 + 4 * DAY_MS), day_key(T0 + 3 * DAY_MS)}
    assert set(got.sessions) == set(got.online_minutes)
    full = (await s.engagement(["u"], now))["u"]
    assert len(full.online_minutes) == 5 and sum(full.sessions.values()) == 5


async def test_devices_are_bounded_and_least_recently_used_goes(
    engagements: Engagements,
) -> None:
    s = await engagements.node()
    await s.record_device("u", "  web ", T0)
    await s.record_device("u", "", T0)  # ignored
    await s.record_device("u", "m" * 50, T0 + 1)  # cut to 32 characters
    for i in range(MAX_DEVICES + 5):
        await s.record_device("u", f"d{i:02}", T0 + 10 + i)
    await s.record_device("u", "web", T0 + 100)  # used again: kept, newest
    got = (await s.engagement(["u"], T0 + 200))["u"]
    assert len(got.devices) == MAX_DEVICES
    assert got.devices["web"] == T0 + 100
    assert "m" * 32 not in got.devices and "m" * 50 not in got.devices
    expected = {"web"} | {f"d{i:02}" for i in range(6, MAX_DEVICES + 5)}
    assert set(got.devices) == expected
    await s.record_device("u", "web", T0 + 50)  # an older use never moves it back
    assert (await s.engagement(["u"], T0 + 200))["u"].devices["web"] == T0 + 100


async def test_batches_larger_than_one_pipeline(engagements: Engagements) -> None:
    s = await engagements.node()
    users = [f"user-{i}" for i in range(CHUNK + 20)]
    await s.mark_online(users, T0)
    for user in users[:100]:
        await s.record_session(user, T0)
    got = await s.engagement(users[:100], T0 + 1)
    assert list(got) == users[:100]
    assert all(minutes(r) == {day_key(T0): 1} for r in got.values())
    assert all(dict(r.sessions) == {day_key(T0): 1} for r in got.values())


async def test_a_device_is_recorded_on_a_redis_that_lost_its_scripts(
    engagements: Engagements,
) -> None:
    """Device writes run their script by SHA: a master that forgot it (restarted,
    promoted, flushed) answers NOSCRIPT and the write is sent again as EVAL."""
    s = await engagements.node()
    await s.record_device("u", "web", T0)
    if engagements.config is not None:
        raw = engagements.raw_client()
        if isinstance(raw, redis.RedisCluster):
            for node in raw.get_primaries():
                raw.execute_command("SCRIPT", "FLUSH", target_nodes=node)
        else:
            raw.script_flush()
        raw.close()
    await s.record_device("u", "phone", T0 + 1)
    got = (await s.engagement(["u"], T0 + 2))["u"]
    assert got.devices == {"web": T0, "phone": T0 + 1}


async def test_user_ids_with_braces_stay_apart(engagements: Engagements) -> None:
    s = await engagements.node()
    await s.mark_online(["a}b", "{a}"], T0)
    await s.record_session("{a}", T0)
    got = await s.engagement(["a}b", "{a}", "a"], T0)
    assert minutes(got["a}b"]) == {day_key(T0): 1} and not got["a}b"].sessions
    assert dict(got["{a}"].sessions) == {day_key(T0): 1}
    assert got["a"] == RawEngagement()


async def test_everything_expires(engagements: Engagements) -> None:
    s = await engagements.node()
    await s.mark_online(["u"], T0)
    await s.record_session("u", T0)
    await s.record_device("u", "web", T0)
    day = day_key(T0)
    if engagements.config is None:
        # Memory prunes on write: a write past the day's expiry drops it.
        later = expire_at_ms(day)
        await s.record_session("u", later)
        got = (await s.engagement(["u"], later, days=40))["u"]
        assert day not in got.sessions and day not in got.online_minutes
        assert "web" not in got.devices
        return
    checks: list[tuple[str, Callable[[int], bool]]] = [
        (keys.user_online("u", day), lambda e: e == expire_at_ms(day)),
        (keys.user_sessions("u", day), lambda e: e == expire_at_ms(day)),
        (keys.user_devices("u"), lambda e: abs(e - (T0 + 31 * DAY_MS)) < 1000),
    ]
    with engagements.raw_client() as c:
        for key, ok in checks:
            assert ok(int(c.execute_command("PEXPIRETIME", key))), key


def test_one_users_engagement_keys_share_a_slot() -> None:
    day = day_key(T0)
    slots = {keys.slot(k) for k in (keys.user_online("u{1}", day),
                                   keys.user_sessions("u{1}", day),
                                   keys.user_devices("u{1}"), keys.user_seen("u{1}"))}
    assert len(slots) == 1
    assert keys.user_online("a", day) != keys.user_online("a}", day)
