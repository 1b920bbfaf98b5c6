"""A re-join flood costs the flooder, not the others (issue 10 item 1).

Joining a channel already joined used to skip the join rate limit and answer a whole
snapshot every time: one member re-joining a 300-member channel in a loop (a 41-byte
request earning a 75 KB reply) kept a canary's ping unanswered for 10 s. Now every
request draws on the connection's request budget and a re-join costs a join: past the
join window the flooder gets ``rate_limited``, then the abuse close (1008), and the
canary keeps being answered.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from presence.meta import MetaPatch, new_meta
from tests.fixtures.servers import GatewayFactory

MEMBERS = 300
FLOOD = 3000
CH = "team:big"


async def test_rejoin_flood_is_limited_and_the_canary_keeps_being_served(
        gateway_factory: GatewayFactory) -> None:
    # A buffer bound large enough that the request limits, not the slow-consumer
    # close, are what stops the flooder.
    gw = await gateway_factory(max_buffer=32 * 1024 * 1024)
    node = gw.node
    for i in range(MEMBERS):  # a big team, written straight to the Store
        meta = new_meta(f"seed-{i}", MetaPatch(note="n" * 100, device="web"), 1)
        await node.store.put_metas(node.owner, f"member-{i}", meta.conn, {CH: meta})
    canary = await gw.client("canary")
    abuser = await gw.client("abuser")
    first = await abuser.join(CH)
    assert len(first["presence"]) == MEMBERS + 1

    worst = 0.0
    answered = 0

    async def ping_loop(stop: asyncio.Event) -> None:
        nonlocal worst, answered
        while not stop.is_set():
            t0 = time.perf_counter()
            await canary.ping()  # times out (fails) after 5 s
            worst = max(worst, time.perf_counter() - t0)
            answered += 1
            await asyncio.sleep(0.01)  # pacing of the canary, not synchronisation

    stop = asyncio.Event()
    pinger = asyncio.ensure_future(ping_loop(stop))
    frame = orjson.dumps({"t": "join", "ch": CH}).decode()
    try:
        for _ in range(FLOOD):  # pipelined: the abuser never waits for a reply
            await abuser.send_raw(frame)
        code, reason = await abuser.wait_closed(timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(pinger, 10)
    print(f"\nre-join flood of {FLOOD} frames, {MEMBERS} members: abuser closed {code} "
          f"({reason}); canary answered {answered} pings, worst {worst * 1000:.0f} ms")
    assert code == 1008 and reason == "too many errors"
    assert answered > 0
    # The join window (joins_per_minute per user) bounds the snapshots served.
    joined = [e for e in abuser.unmatched if e.get("t") == "joined"]
    assert len(joined) <= gw.settings.quotas.joins_per_minute
    errors = [e for e in abuser.unmatched if e.get("t") == "error"]
    assert errors and {e["code"] for e in errors} == {"rate_limited"}
    # The canary is still served afterwards, and its view is intact.
    assert (await canary.ping())["t"] == "pong"
