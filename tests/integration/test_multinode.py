"""Several real gateway processes sharing presence through a real 6-node Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.client import PresenceClient
from tests.fixtures.processes import GatewayProcess, new_secret

pytestmark = pytest.mark.redis

LEASE = 4.0

Spawn = Callable[..., Awaitable[GatewayProcess]]


@pytest_asyncio.fixture
async def spawn(redis_cluster: str) -> AsyncIterator[Spawn]:
    """Start gateway processes on the test cluster; all are stopped after the test."""
    secret = new_secret()
    procs: list[GatewayProcess] = []
    clients: list[PresenceClient] = []

    async def start(node_id: str, **env: str) -> GatewayProcess:
        # A dead node is swept within max(node_lease, resume_ttl): both LEASE here.
        settings = {"PRESENCE_NODE_LEASE": str(LEASE), "PRESENCE_RESUME_TTL": str(LEASE),
                    "PRESENCE_COALESCE_MS": "5",
                    "PRESENCE_DRAIN_TIMEOUT": "3", "PRESENCE_LOG_LEVEL": "warning"}
        settings.update(env)
        p = GatewayProcess(node_id, secret, settings, "--redis-cluster", redis_cluster)
        await p.start()
        procs.append(p)
        original = p.client

        async def tracked(user: str, role: str = "member") -> PresenceClient:
            c = await original(user, role)
            clients.append(c)
            return c

        p.client = tracked  # type: ignore[method-assign]
        return p

    yield start
    for c in clients:
        await c.close()
    for p in procs:
        await p.stop()


def users_of(client: PresenceClient, ch: str) -> set[str]:
    return set(client.mirror[ch].users())


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait (bounded) for a condition fed by the clients' reader tasks; seconds taken."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_clients_on_different_gateways_see_each_other(spawn: Spawn) -> None:
    g1, g2, g3 = [await spawn(f"g{i}") for i in (1, 2, 3)]
    a, b, c = await g1.client("alice"), await g2.client("bob"), await g3.client("carol")
    await a.join("team:multi", device="web")
    await b.join("team:multi", device="mobile")
    joined = await c.join("team:multi")
    assert set(joined["presence"]) == {"alice", "bob", "carol"}
    await until(lambda: users_of(a, "team:multi") == {"alice", "bob", "carol"}, 5, "joins on g1")
    await b.update(status="busy", note="At the venue")
    diff = await c.wait_for(lambda e: "bob" in e["joins"], 5)
    assert diff["joins"]["bob"][0]["note"] == "At the venue"
    assert diff["joins"]["bob"][0]["seq"] == 2
    await a.leave("team:multi")
    diff = await b.wait_for(lambda e: "alice" in e["leaves"], 5)
    assert diff["leaves"]["alice"][0]["last_seen"] > 0
    await until(lambda: users_of(c, "team:multi") == {"bob", "carol"}, 5, "leave on g3")
    # The HTTP view of any gateway agrees.
    async with aiohttp.ClientSession() as http:
        url = f"{g1.admin_url}/v1/channels/team:multi/presence"
        headers = {"Authorization": f"Bearer {g1.token('svc', 'service')}"}
        async with http.get(url, headers=headers) as resp:
            body: dict[str, Any] = await resp.json()
    assert set(body["presence"]) == {"bob", "carol"}


async def test_sigkilled_gateway_members_leave_within_lease(spawn: Spawn) -> None:
    g1, g2, g3 = [await spawn(f"k{i}") for i in (1, 2, 3)]
    watcher = await g1.client("watcher")
    other = await g3.client("other")
    victims = [await g2.client(f"victim{i}") for i in range(3)]
    for x in (watcher, other, *victims):
        await x.join("team:kill")
    await until(lambda: len(users_of(watcher, "team:kill")) == 5, 5, "everyone joined")
    killed_at = time.monotonic()
    await g2.kill()
    took = await until(
        lambda: users_of(watcher, "team:kill") == {"watcher", "other"}, LEASE + 5,
        "the dead node's members to leave",
    )
    assert time.monotonic() - killed_at <= LEASE + 0.5, took
    await until(lambda: users_of(other, "team:kill") == {"watcher", "other"}, 3, "on g3 too")
    # Exactly once: with two survivors sweeping, no member is reported twice.
    result = await (await g1.client("csm", role="csm")).query(["victim0", "victim1"])
    assert all(u["status"] == "offline" and u["last_seen"] for u in result["users"].values())


async def test_restarted_gateway_converges(spawn: Spawn) -> None:
    g1 = await spawn("r1")
    g2 = await spawn("r2")
    watcher = await g1.client("watcher")
    await watcher.join("team:restart")
    mobile = await g2.client("mo")
    await mobile.join("team:restart", status="away")
    await until(lambda: "mo" in users_of(watcher, "team:restart"), 5, "mo joined")
    old_conn = mobile.conn
    await g2.kill()
    await g2.start()  # same node id and ports, a new incarnation
    again = await g2.client("mo")
    await again.join("team:restart", status="away")
    # The old connection is swept (it belonged to the previous incarnation), the new
    # one stays: exactly one meta for "mo", with the new conn.
    def settled() -> bool:
        metas = watcher.mirror["team:restart"].metas("mo")
        return [m.conn for m in metas] == [again.conn]

    await until(settled, LEASE + 5, "the restarted node's state to converge")
    assert again.conn != old_conn
    snap = await (await g1.client("late")).join("team:restart")
    assert [m["conn"] for m in snap["presence"]["mo"]] == [again.conn]


async def test_killed_redis_master_loses_no_member_and_leaves_no_ghost(
    spawn: Spawn, redis_cluster_control: Any
) -> None:
    from cluster import keys

    ctl = redis_cluster_control
    ch = "team:failover"
    g1, g2 = await spawn("f1"), await spawn("f2")
    a = await g1.client("ann")
    b = await g2.client("ben")
    gone = await g2.client("gus")
    for x in (a, b, gone):
        await x.join(ch)
    await until(lambda: users_of(a, ch) == {"ann", "ben", "gus"}, 5, "all joined")
    # Kill the master holding the channel's topic and metas (same slot by hash tag).
    master = ctl.master_of(keys.topic(ch))
    assert ctl.master_of(keys.channel_metas(ch)) == master
    ctl.kill(master)
    try:
        await ctl.wait_promoted(keys.topic(ch), master, timeout=30)
        # Changes after the failover: one leaves, one updates, one newcomer joins.
        await gone.close()
        async with asyncio.timeout(30):
            while True:  # writes may be refused (overloaded) until the node sees the map
                try:
                    await b.update(status="busy")
                    break
                except Exception:
                    await asyncio.sleep(0.5)
        c = await g1.client("cat")
        await c.join(ch)
        expected = {"ann", "ben", "cat"}

        def settled() -> bool:
            for client in (a, b, c):
                if users_of(client, ch) != expected:
                    return False
            metas = a.mirror[ch].metas("ben")
            return len(metas) == 1 and metas[0].status == "busy"

        await until(settled, 30, "every mirror to settle after the failover")
        snap = await (await g2.client("late")).join(ch)
        assert set(snap["presence"]) == expected | {"late"}
        assert [m["status"] for m in snap["presence"]["ben"]] == ["busy"]
    finally:
        await ctl.restore()
