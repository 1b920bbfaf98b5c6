"""Engagement signals end to end: a real gateway, real clients, a fake clock.

Connects and disconnects are scripted minute by minute across UTC midnight; the
gateway's once-a-minute sampling is driven by calling ``Node.engagement_tick`` after
moving the fake clock (the real loop only decides *when* to call it). Fake days start
tomorrow (real time) because Redis expiries are absolute.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio

from cluster.engagement_redis import RedisEngagement
from cluster.redis_conn import RedisConfig
from gateway.client import PresenceClient
from gateway.node import Node
from presence.engagement import DAY_MS, day_key
from tests.cluster.conftest import flush as _flush
from tests.fixtures.servers import GatewayFactory, GatewayHandle

MINUTE = 60_000
T0 = (int(time.time() * 1000) // DAY_MS + 1) * DAY_MS
"""Tomorrow, 00:00 UTC."""
TIMEOUT = aiohttp.ClientTimeout(total=10)


class Clock:
    """The fake ``Node.clock_ms``: ms since the epoch, moved by the test."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def at(self, day: int, hh: int, mm: int, ss: int = 0) -> None:
        self.now = T0 + day * DAY_MS + ((hh * 60 + mm) * 60 + ss) * 1000


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


def with_clock(gw: GatewayHandle) -> Clock:
    clock = Clock(T0)
    gw.node.clock_ms = clock
    return clock


async def connect(gw: GatewayHandle, user: str, device: str | None = None
                  ) -> PresenceClient:
    """Connect ``user`` and join ``team:w1`` (with ``device``); engagement writes done."""
    c = await gw.client(user)
    if device is None:
        await c.join("team:w1")
    else:
        await c.join("team:w1", device=device)
    await gw.node.feed.flush()
    return c


async def disconnect(gw: GatewayHandle, c: PresenceClient) -> None:
    """Close ``c`` and wait until the server has cleaned the connection up."""
    session = next(s for s in gw.node.sessions if s.conn == c.conn)
    await c.close()
    async with asyncio.timeout(5):
        await session.finished.wait()


async def tick(node: Node, clock: Clock, day: int, hh: int, mm: int) -> int:
    clock.at(day, hh, mm, 1)
    return await node.engagement_tick()


async def engagement(http: aiohttp.ClientSession, gw: GatewayHandle, users: str,
                     role: str | None = "service") -> tuple[int, Any]:
    headers = {} if role is None else {"Authorization": f"Bearer {gw.token('ops', role=role)}"}
    async with http.get(f"{gw.admin_url}/v1/engagement", params={"users": users},
                        headers=headers) as resp:
        return resp.status, await resp.json()


async def test_scripted_day_across_midnight(gateway: GatewayHandle,
                                            http: aiohttp.ClientSession) -> None:
    gw, node = gateway, gateway.node
    clock = with_clock(gw)
    day0, day1 = day_key(T0), day_key(T0 + DAY_MS)

    # Day 0, 10:00: u1 on the web; 10:10 also on mobile (overlap counts once); the web
    # connection ends at 10:20:30, mobile at 10:29:30.
    clock.at(0, 10, 0)
    web = await connect(gw, "u1", device="web")
    for mm in range(1, 30):
        if mm == 10:
            clock.at(0, 10, 10)
            mobile = await connect(gw, "u1", device="mobile")
        assert await tick(node, clock, 0, 10, mm) == 1
        if mm == 20:
            clock.at(0, 10, 20, 30)
            await disconnect(gw, web)
    clock.at(0, 10, 29, 30)
    await disconnect(gw, mobile)
    assert await tick(node, clock, 0, 10, 30) == 0  # nobody left: nothing counted

    # Day 0, 23:58:30 -> day 1, 00:01:30: one connection across midnight.
    clock.at(0, 23, 58, 30)
    late = await connect(gw, "u1")
    await tick(node, clock, 0, 23, 59)
    await tick(node, clock, 1, 0, 0)
    await tick(node, clock, 1, 0, 1)
    clock.at(1, 0, 1, 30)
    await disconnect(gw, late)

    # Day 1, 09:00: u2 connects and stays.
    clock.at(1, 9, 0)
    await connect(gw, "u2")
    await tick(node, clock, 1, 9, 1)
    clock.at(1, 9, 1, 30)

    status, body = await engagement(http, gw, "u1,u2,ghost")
    assert status == 200, body
    assert body["generated_at"] == clock.now
    u1 = body["users"]["u1"]
    assert u1["days"] == [
        {"day": day1, "online_seconds": 2 * 60, "sessions": 0},
        {"day": day0, "online_seconds": (30 + 2) * 60, "sessions": 3},
    ]
    assert u1["online_seconds_30d"] == 34 * 60 and u1["sessions_30d"] == 3
    assert u1["online"] is False and isinstance(u1["last_seen"], int)
    assert u1["devices"] == ["mobile", "web"]
    u2 = body["users"]["u2"]
    assert u2["days"] == [{"day": day1, "online_seconds": 2 * 60, "sessions": 1}]
    assert u2["online"] is True and u2["last_seen"] == clock.now
    assert u2["devices"] == []
    assert body["users"]["ghost"] == {
        "days": [], "online_seconds_30d": 0, "sessions_30d": 0,
        "last_seen": None, "online": False, "devices": [],
    }

    # 30 days later day 0 has left the window; day 1 is its oldest day.
    clock.now = T0 + 30 * DAY_MS + MINUTE
    status, body = await engagement(http, gw, "u1")
    assert [d["day"] for d in body["users"]["u1"]["days"]] == [day1]


async def test_update_with_a_device_records_it(gateway: GatewayHandle,
                                               http: aiohttp.ClientSession) -> None:
    clock = with_clock(gateway)
    clock.at(0, 8, 0)
    c = await connect(gateway, "u1", device="web")
    clock.at(0, 8, 5)
    await c.update(status="busy")  # no device: nothing recorded
    await c.update(device="tablet")
    await gateway.node.feed.flush()
    _, body = await engagement(http, gateway, "u1")
    assert body["users"]["u1"]["devices"] == ["tablet", "web"]


async def test_route_checks_token_and_users(gateway: GatewayHandle,
                                            http: aiohttp.ClientSession) -> None:
    assert (await engagement(http, gateway, "u1", role="admin"))[0] == 200
    status, body = await engagement(http, gateway, "u1", role=None)
    assert status == 401 and body["error"] == "unauthorized"
    for role in ("member", "csm"):
        status, body = await engagement(http, gateway, "u1", role=role)
        assert status == 403 and body["error"] == "forbidden"
    for users in (",", " ", ",".join(f"u{i}" for i in range(101)), "x" * 129):
        status, body = await engagement(http, gateway, users)
        assert status == 400 and body["field"] == "users", users
    status, body = await engagement(http, gateway, ",".join(f"u{i}" for i in range(100)))
    assert status == 200 and len(body["users"]) == 100


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_engagement_backend_down_never_breaks_a_connection(
    gateway: GatewayHandle, http: aiohttp.ClientSession
) -> None:
    # A real Redis client pointed at a port nobody listens on.
    gateway.node.engagement = RedisEngagement(
        RedisConfig(url=f"redis://127.0.0.1:{_closed_port()}/0", op_timeout=2.0))
    c = await connect(gateway, "u1", device="web")
    await c.update(device="mobile")
    assert await gateway.node.engagement_tick() == 1
    await gateway.node.feed.flush()
    assert (await c.ping())["t"] == "pong"
    status, body = await engagement(http, gateway, "u1")
    assert status == 503 and body["error"] == "overloaded"


async def test_two_nodes_on_redis_count_once_and_a_stopped_node_stops_counting(
    gateway_factory: GatewayFactory, redis_single: str, http: aiohttp.ClientSession
) -> None:
    _flush(RedisConfig(url=redis_single))
    a = await gateway_factory(redis_url=redis_single)
    b = await gateway_factory(redis_url=redis_single)
    clock_a, clock_b = with_clock(a), with_clock(b)
    clock_a.at(0, 12, 0)
    clock_b.at(0, 12, 0)
    await connect(a, "u1", device="web")
    await connect(b, "u1", device="mobile")
    for mm in range(1, 5):
        await tick(a.node, clock_a, 0, 12, mm)
        await tick(b.node, clock_b, 0, 12, mm)
    await b.gateway.stop()  # node b goes; node a keeps its connection
    for mm in range(5, 8):
        await tick(a.node, clock_a, 0, 12, mm)
    _, body = await engagement(http, a, "u1")
    u1 = body["users"]["u1"]
    assert u1["days"] == [{"day": day_key(T0), "online_seconds": 8 * 60, "sessions": 2}]
    assert set(u1["devices"]) == {"web", "mobile"}
