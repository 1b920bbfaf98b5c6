"""Webhooks from three real gateway processes on the real Redis Cluster: exactly one
event per transition across the cluster, also for a killed gateway's users (sent by the
node that sweeps them)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from gateway.client import PresenceClient
from tests.fixtures.processes import GatewayProcess, StartGateway
from tests.fixtures.receiver import Receiver

pytestmark = pytest.mark.redis

LEASE = 3.0
Spawn = Callable[[str], Awaitable[GatewayProcess]]


@pytest_asyncio.fixture
async def spawn(cluster_gateways: StartGateway, receiver: Receiver) -> Spawn:
    async def start(node_id: str) -> GatewayProcess:
        return await cluster_gateways(
            node_id, PRESENCE_NODE_LEASE=str(LEASE), PRESENCE_RESUME_TTL=str(LEASE),
            PRESENCE_WEBHOOK_URL=receiver.url + "/hook",
            PRESENCE_WEBHOOK_SECRET="cluster-secret")
    return start


def count(receiver: Receiver) -> Counter[tuple[str, str]]:
    """(type, user or channel) -> how many times it was delivered (ids de-duplicated)."""
    seen: dict[str, dict[str, Any]] = {e["id"]: e for e in receiver.delivered()}
    return Counter((e["type"], e.get("user") or e.get("ch", "")) for e in seen.values())


async def test_one_event_per_transition_across_three_gateways(
        spawn: Spawn, receiver: Receiver) -> None:
    g1, g2, g3 = await spawn("w1"), await spawn("w2"), await spawn("w3")
    # Two devices of one user on two gateways; two users of one channel on two more.
    d1 = await PresenceClient.connect(g1.ws_url, g1.token("dual"))
    d2 = await PresenceClient.connect(g2.ws_url, g2.token("dual"))
    a = await PresenceClient.connect(g2.ws_url, g2.token("amy"))
    b = await PresenceClient.connect(g3.ws_url, g3.token("ben"))
    await asyncio.gather(a.join("team:shared"), b.join("team:shared"))
    doomed = await PresenceClient.connect(g3.ws_url, g3.token("doomed"))
    await doomed.join("team:alone")
    expected = {("user.online", u) for u in ("dual", "amy", "ben", "doomed")} | {
        ("channel.occupied", "team:shared"), ("channel.occupied", "team:alone")}
    await receiver.wait_for(lambda: set(count(receiver)) >= expected, limit=15)

    await d1.close()
    await d2.close()
    await a.close()
    await b.close()
    await receiver.wait_for(lambda: {("user.offline", u) for u in ("dual", "amy", "ben")}
                            <= set(count(receiver)), limit=15)
    await g3.kill()  # doomed goes with its node: the sweeper tells
    done = expected | {("user.offline", u) for u in ("dual", "amy", "ben", "doomed")} | {
        ("channel.vacated", "team:shared"), ("channel.vacated", "team:alone")}
    await receiver.wait_for(lambda: set(count(receiver)) >= done, limit=LEASE + 15)
    await asyncio.sleep(LEASE)  # time for any duplicate to arrive: nothing to await
    # Only this test's users and channels: the survivors may also sweep what gateways
    # of earlier tests left held on the shared cluster (their events are right too).
    ours = {"dual", "amy", "ben", "doomed", "team:shared", "team:alone"}
    counts = Counter({k: n for k, n in count(receiver).items() if k[1] in ours})
    assert set(counts) == done, counts
    assert all(n == 1 for n in counts.values()), counts
    by_user = {e["user"]: e for e in receiver.delivered()
               if e["type"] == "user.offline" and e["user"] in ours}
    assert by_user["doomed"]["cause"] == "node_died"
    assert {by_user[u]["cause"] for u in ("dual", "amy", "ben")} == {"closed"}
