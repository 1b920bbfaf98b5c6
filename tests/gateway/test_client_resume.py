"""The resuming Python client (gateway.resuming_client.ResumingClient) against in-process gateways:
resume after a network cut and after a drain (PROTOCOL.md "Resume"), a fresh rejoin with
the user's metas when the server does not resume, and refresh through a token callback
before ``exp`` ("Token lifetime").

The connections go through a TCP proxy the test controls (tests/browser/support.py), so
a cut is a real loss: no close frame, a reset on both sides. These tests need a server
that resumes: against one that does not, they fail (``resumed`` is false or absent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cluster.memory import MemoryBroker, MemoryBus, MemoryStore
from gateway.client import PresenceClient
from gateway.resuming_client import Backoff, ResumingClient, reconnect_delay
from tests.browser.support import TcpProxy
from tests.fixtures.servers import GatewayFactory, GatewayHandle

FAST = Backoff(initial=0.05, max=0.2, restart_jitter=0.2, overloaded=0.2)
META = {"status": "busy", "device": "tablet", "note": "Ceremony"}


@pytest.fixture
async def proxies() -> AsyncIterator[list[TcpProxy]]:
    made: list[TcpProxy] = []
    yield made
    for p in made:
        await p.close()


async def proxy_to(proxies: list[TcpProxy], gw: GatewayHandle) -> TcpProxy:
    p = await TcpProxy(gw.gateway.port).start()
    proxies.append(p)
    return p


async def resuming(gw: GatewayHandle, url: str, user: str, **kwargs: Any) -> ResumingClient:
    kwargs.setdefault("backoff", FAST)
    c = await ResumingClient.connect(url, gw.token(user, ["team:*"]), **kwargs)
    gw.clients.append(c)  # the fixture closes it
    return c


def about(user: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("t") == "diff" and (user in e["joins"] or user in e["leaves"])


async def diffs_until_barrier(watcher: PresenceClient, barrier: PresenceClient,
                              note: str) -> list[dict[str, Any]]:
    """Every event the watcher gets up to ``barrier``'s update to ``note``: diffs of one
    channel arrive in order, so anything published before the barrier is in the list."""
    await barrier.update(note=note)
    seen: list[dict[str, Any]] = []
    while True:
        event = await watcher.next_event(timeout=5)
        seen.append(event)
        metas = event.get("joins", {}).get(barrier.welcome["user"], [])
        if any(m["note"] == note for m in metas):
            return seen


def test_reconnect_delay_follows_the_close_code() -> None:
    b = Backoff(initial=0.5, max=4.0, restart_jitter=5.0, overloaded=10.0)
    # 1012 with the server's hint: exactly the hint, whatever the attempt count.
    assert reconnect_delay(1012, "server restarting; reconnect in 2.5s", 7, b) == 2.5
    # 1012 without a hint: random in [0, restart_jitter).
    assert reconnect_delay(1012, "bye", 0, b, rand=lambda: 0.5) == 2.5
    # 1013: at least half the overloaded delay, even on the first attempt.
    assert reconnect_delay(1013, "", 0, b, rand=lambda: 0.0) == 5.0
    assert reconnect_delay(1013, "", 0, b, rand=lambda: 0.99) == pytest.approx(14.9)
    # anything else: full jitter over a bound that doubles and stops at max.
    assert reconnect_delay(1006, "", 0, b, rand=lambda: 0.999) < 0.5
    assert reconnect_delay(None, "", 2, b, rand=lambda: 0.5) == 1.0
    assert reconnect_delay(1011, "", 10, b, rand=lambda: 0.5) == 2.0


async def test_resumes_after_a_cut_and_nobody_sees_a_diff(
        gateway_factory: GatewayFactory, proxies: list[TcpProxy]) -> None:
    gw = await gateway_factory(resume_ttl=10)
    proxy = await proxy_to(proxies, gw)
    watcher = await gw.client("w")
    await watcher.join("team:w1")
    a = await resuming(gw, proxy.ws_url(), "u1")
    assert a.welcome.get("resume_ttl") == 10 and a.resume_token
    await a.join("team:w1", META)
    await a.join("team:w2")
    await watcher.wait_for(about("u1"))
    conn = a.conn
    seq = watcher.mirror["team:w1"].metas("u1")[0].seq

    proxy.hold()
    assert proxy.cut() == 1
    await proxy.wait_accepted(2)  # the client came back and waits at the proxy
    # Someone joins while it is away: the resumed client must learn it from the snapshot.
    v = await gw.client("v")
    await v.join("team:w1", status="online")
    proxy.release()
    r = await a.wait_reconnected()

    assert r.resumed, f"the server did not resume: {a.welcome}"
    assert (r.close_code, r.conn_before, r.conn, a.conn) == (1006, conn, conn, conn)
    assert a.welcome.get("resumed") is True and a.resume_token not in (None, "")
    assert set(a.mirror) == {"team:w1", "team:w2"}
    assert set(a.mirror["team:w1"].users()) == {"w", "u1", "v"}
    mine = a.mirror["team:w1"].metas("u1")
    assert [(m.conn, m.status, m.device, m.note, m.seq) for m in mine] == [
        (conn, "busy", "tablet", "Ceremony", seq)]

    seen = await diffs_until_barrier(watcher, v, "barrier")
    assert [e for e in seen if about("u1")(e)] == []
    # The resumed connection is the same member: its update reaches the others.
    await a.update(status="online")
    diff = await watcher.wait_for(about("u1"))
    assert [(m["conn"], m["status"], m["note"]) for m in diff["joins"]["u1"]] == [
        (conn, "online", "Ceremony")]
    assert a.reconnects == [r]


async def test_requests_made_while_away_wait_for_the_resume(
        gateway_factory: GatewayFactory, proxies: list[TcpProxy]) -> None:
    gw = await gateway_factory(resume_ttl=10)
    proxy = await proxy_to(proxies, gw)
    watcher = await gw.client("w")
    await watcher.join("team:w1")
    await watcher.join("team:w3")
    a = await resuming(gw, proxy.ws_url(), "u1")
    await a.join("team:w1", META)
    await watcher.wait_for(about("u1"))
    conn = a.conn

    proxy.hold()
    proxy.cut()
    await proxy.wait_accepted(2)
    assert a.status == "reconnecting"
    update = asyncio.ensure_future(a.update(status="away"))
    join = asyncio.ensure_future(a.join("team:w3"))
    await asyncio.sleep(0)
    assert not update.done() and not join.done()  # waiting for the connection
    proxy.release()
    assert (await asyncio.wait_for(update, 10))["t"] == "ok"
    assert (await asyncio.wait_for(join, 10))["t"] == "joined"
    r = a.reconnects[-1]
    assert r.resumed and a.conn == conn and a.channels == ["team:w1", "team:w3"]
    # The others see what the user did while away, and nothing about the loss.
    changes = [await watcher.wait_for(about("u1")), await watcher.wait_for(about("u1"))]
    assert all(not e["leaves"] for e in changes)
    assert {(e["ch"], e["joins"]["u1"][0]["status"]) for e in changes} == {
        ("team:w1", "away"), ("team:w3", "away")}
    assert all(e["joins"]["u1"][0]["conn"] == conn for e in changes)


@pytest.mark.parametrize("resume_ttl", [0.3, 0.0], ids=["hold-expired", "resume-off"])
async def test_not_resumed_rejoins_with_the_metas_the_user_set(
        gateway_factory: GatewayFactory, proxies: list[TcpProxy], resume_ttl: float) -> None:
    gw = await gateway_factory(resume_ttl=resume_ttl)
    proxy = await proxy_to(proxies, gw)
    watcher = await gw.client("w")
    await watcher.join("team:w1")
    a = await resuming(gw, proxy.ws_url(), "u1")
    assert (a.resume_token is None) == (resume_ttl == 0)
    await a.join("team:w1", META)
    await a.update(note="Later")
    await watcher.wait_for(lambda e: about("u1")(e) and
                           e["joins"]["u1"][0]["note"] == "Later")
    conn = a.conn

    proxy.hold()
    proxy.cut()
    # Not resumed in time (or resume off): the others see the leave...
    leave = await watcher.wait_for(about("u1"), timeout=10)
    assert [e["conn"] for e in leave["leaves"]["u1"]] == [conn]
    proxy.release()
    r = await a.wait_reconnected()
    assert not r.resumed and r.conn != conn and a.conn == r.conn
    assert r.rejoin_failed == ()
    # ...then the join of the new connection, with the status, device and note set before.
    join = await watcher.wait_for(about("u1"))
    assert [(m["conn"], m["status"], m["device"], m["note"]) for m in join["joins"]["u1"]] == [
        (r.conn, "busy", "tablet", "Later")]
    assert set(a.mirror["team:w1"].users()) == {"w", "u1"}


async def test_drain_resumes_on_another_gateway_after_the_hint(
        gateway_factory: GatewayFactory, proxies: list[TcpProxy]) -> None:
    bus, store = MemoryBus(), MemoryStore()
    gw1 = await gateway_factory(broker=MemoryBroker(bus), store=store, resume_ttl=10,
                                reconnect_jitter=1.0)
    gw2 = await gateway_factory(broker=MemoryBroker(bus), store=store, resume_ttl=10,
                                jwt_secret=gw1.secret)
    proxy = await proxy_to(proxies, gw1)
    watcher = await gw2.client("w")
    await watcher.join("team:w1")
    a = await resuming(gw1, proxy.ws_url(), "u1")
    await a.join("team:w1", META)
    await watcher.wait_for(about("u1"))
    conn = a.conn

    proxy.upstream = gw2.gateway.port  # the next connection lands on the other gateway
    await gw1.gateway.stop()
    r = await a.wait_reconnected(timeout=15)

    assert r.close_code == 1012 and "reconnect in" in r.close_reason
    assert r.delay == reconnect_delay(1012, r.close_reason, 0, FAST)  # the hint, as given
    assert r.resumed, f"the server did not resume: {a.welcome}"
    assert a.conn == conn and a.welcome["node"] == gw2.node.node_id
    v = await gw2.client("v")
    await v.join("team:w1")
    seen = await diffs_until_barrier(watcher, v, "barrier")
    assert [e for e in seen if about("u1")(e)] == []
    assert [m.conn for m in watcher.mirror["team:w1"].metas("u1")] == [conn]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_refreshes_before_exp_through_the_token_callback(
        gateway_factory: GatewayFactory, kind: str) -> None:
    gw = await gateway_factory(token_leeway=0.3)
    minted: list[int] = []

    def mint() -> str:
        exp = int(time.time()) + 3
        minted.append(exp)
        return gw.token("u1", ["team:*"], exp=exp)

    async def mint_async() -> str:
        return mint()

    provider: Any = mint_async if kind == "async" else mint
    a = await ResumingClient.connect(gw.ws_url, token_provider=provider, backoff=FAST)
    gw.clients.append(a)
    await a.join("team:w1")
    first_exp, conn = a.welcome["exp"], a.conn
    assert first_exp == minted[0]

    # Two refreshes in a row, each well before the current token's exp plus the leeway.
    second = await a.wait_refreshed(1, timeout=10)
    assert second["exp"] == minted[1] and time.time() < first_exp + 0.3
    third = await a.wait_refreshed(2, timeout=10)
    assert third["exp"] == minted[2] and a.exp == minted[2]
    # The connection outlived its first token: no 4001, no reconnect, same conn.
    assert time.time() > first_exp + 0.3
    assert (await a.ping())["t"] == "pong"
    assert a.reconnects == [] and a.conn == conn and a.status == "connected"
    assert len(minted) == 3  # one token at hello, one per refresh


async def test_expiry_without_a_token_callback_ends_the_client(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(token_leeway=0.2)
    a = await ResumingClient.connect(
        gw.ws_url, gw.token("u1", exp=int(time.time()) + 1), backoff=FAST)
    gw.clients.append(a)
    assert await a.wait_closed(timeout=10) == (4001, "token expired")
    assert a.status == "closed" and a.reconnects == []
    with pytest.raises(ConnectionError):
        await a.ping()
