"""Gateways on the real Redis Cluster while one master dies (SIGKILL).

Two cases, both must recover within a bound after the replica's promotion:

* the dead master holds none of the test channel's slots: nothing the gateways
  subscribed moves, but their slot maps and per-master connections still point at the
  dead node (it used to keep ``/readyz`` at 503 for good);
* the dead master owns the channel: its topic must be re-subscribed on the promoted
  replica.

Recovered means: ``/readyz`` 200 on every gateway, a join and an update work, and an
update made on one gateway reaches the members on the other one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from cluster import keys
from gateway.client import ClientError, PresenceClient
from tests.fixtures.processes import GatewayProcess, StartGateway
from tests.fixtures.redis_cluster import ClusterControl

pytestmark = pytest.mark.redis

LEASE = 4.0
RECOVERY = 10.0
"""Seconds after the promotion within which the gateways must be fully back."""

Spawn = Callable[[str], Awaitable[GatewayProcess]]


@pytest_asyncio.fixture
async def spawn(cluster_gateways: StartGateway) -> Spawn:
    async def start(node_id: str) -> GatewayProcess:
        return await cluster_gateways(
            node_id, PRESENCE_NODE_LEASE=str(LEASE), PRESENCE_RESUME_TTL=str(LEASE),
            PRESENCE_DRAIN_TIMEOUT="3")
    return start


def key_on(ctl: ClusterControl, master: int) -> str:
    """A key whose slot the master ``master`` owns (to watch its promotion)."""
    for i in range(10_000):
        key = f"probe:{i}"
        if ctl.master_of(key) == master:
            return key
    raise AssertionError(f"no key found on {master}")


async def ready(http: aiohttp.ClientSession, gw: GatewayProcess) -> bool:
    try:
        async with http.get(f"{gw.admin_url}/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def retry_until(deadline: float, what: str, act: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``act`` until it does not raise ``overloaded``, or fail at ``deadline``."""
    while True:
        try:
            return await act()
        except (ClientError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} still failing: {exc!r}") from exc
        await asyncio.sleep(0.25)


@pytest.mark.parametrize("victim", ["other-master", "channel-master"])
async def test_gateways_recover_after_a_master_is_killed(
    spawn: Spawn, redis_cluster_control: ClusterControl, victim: str
) -> None:
    ctl = redis_cluster_control
    await ctl.wait_healthy()
    await ctl.wait_replicas_synced()
    ch = "team:faults"
    owner = ctl.master_of(keys.topic(ch))
    dead = owner if victim == "channel-master" else ctl.other_masters(owner)[0]
    probe = keys.topic(ch) if dead == owner else key_on(ctl, dead)

    g1, g2 = await spawn("rf1"), await spawn("rf2")
    clients: list[PresenceClient] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        try:
            a, b = await g1.client("ann"), await g2.client("ben")
            clients += [a, b]
            await a.join(ch)
            await b.join(ch)
            await a.wait_for(lambda e: "ben" in e.get("joins", {}), 5)
            assert await ready(http, g1) and await ready(http, g2)

            ctl.kill(dead)
            await ctl.wait_promoted(probe, dead, timeout=30)
            deadline = time.monotonic() + RECOVERY

            # Polling the other processes' HTTP endpoint is the only signal there is.
            for gw in (g1, g2):
                while not await ready(http, gw):
                    assert time.monotonic() < deadline, f"{gw.node_id} /readyz still 503"
                    await asyncio.sleep(0.25)

            c = await g1.client("cat")
            clients.append(c)
            await retry_until(deadline, "join", lambda: c.join(ch))
            left = max(1.0, deadline - time.monotonic())
            await b.wait_for(lambda e: "cat" in e.get("joins", {}), left)
            await retry_until(deadline, "update", lambda: b.update(status="busy"))
            diff = await a.wait_for(
                lambda e: any(m.get("status") == "busy" for m in e.get("joins", {}).get("ben", [])),
                max(1.0, deadline - time.monotonic()),
            )
            assert diff["joins"]["ben"][0]["status"] == "busy"
        finally:
            for x in clients:
                await x.close()
            await ctl.restore()
