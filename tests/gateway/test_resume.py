"""Resume (PROTOCOL.md "Session lifetime", "Resume"), every rule, on the memory backend
and on the real Redis Cluster (in-process gateways; tests/integration/test_resume_cluster.py
has the same across real gateway processes).

The resuming client is a raw WebSocket, so that the test controls exactly how each
connection ends (a TCP abort, a close with 1000 or 1001) and what each hello carries;
watchers are ordinary clients. "Nobody sees a diff" is checked by making the resumed
connection change something afterwards: the watcher's next diff about the user must be
that change, not a leave or a join.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from cluster.memory import MemoryBroker, MemoryBus, MemoryStore
from cluster.redis_conn import RedisConfig
from gateway.client import PresenceClient
from tests.cluster.conftest import flush
from tests.fixtures.servers import GatewayFactory, GatewayHandle

TIMEOUT = 5.0


@dataclass
class Raw:
    """A raw client connection and what its welcome said."""

    ws: ClientConnection
    welcome: dict[str, Any]

    async def recv(self) -> dict[str, Any]:
        return dict(orjson.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT)))

    async def request(self, **frame: Any) -> dict[str, Any]:
        await self.ws.send(orjson.dumps(frame).decode())
        while True:
            reply = await self.recv()
            if reply.get("ref") == frame.get("ref"):
                return reply

    def drop(self) -> None:
        """Lose the connection: no close frame, the TCP connection cut."""
        self.ws.transport.abort()


async def raw(gw: GatewayHandle, token: str, resume: str | None = None) -> Raw:
    ws = await connect(gw.ws_url, subprotocols=["presence.v1.json"], open_timeout=TIMEOUT)  # type: ignore[list-item]
    hello: dict[str, Any] = {"t": "hello", "token": token}
    if resume is not None:
        hello["resume"] = resume
    await ws.send(orjson.dumps(hello).decode())
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert welcome["t"] == "welcome", welcome
    return Raw(ws, welcome)


@pytest.fixture(params=["memory", pytest.param("redis-cluster", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Gateway settings for the backend under test (the Redis Cluster emptied first)."""
    if request.param == "memory":
        return {}
    nodes = request.getfixturevalue("redis_cluster")
    flush(RedisConfig(cluster=nodes))
    return {"redis_cluster": nodes, "backend": "redis"}


@pytest_asyncio.fixture
async def pair(gateway_factory: GatewayFactory,
               backend: dict[str, Any]) -> AsyncIterator[tuple[GatewayHandle, ...]]:
    """Two gateways sharing one backend (with memory: one Store and bus in-process)."""
    bus, store = MemoryBus(), MemoryStore()
    secret = secrets.token_urlsafe(32)  # one for both: a token of one is good on the other
    gws = []
    for _ in range(2):
        shared = backend or {"broker": MemoryBroker(bus), "store": store}
        gws.append(await gateway_factory(**shared, jwt_secret=secret, resume_ttl=2.0,
                                         node_lease=2.0))
    yield tuple(gws)


async def watcher_on(gw: GatewayHandle, ch: str) -> PresenceClient:
    w = await PresenceClient.connect(gw.ws_url, gw.token("watcher"))
    gw.clients.append(w)
    await w.join(ch)
    return w


@dataclass
class Gate:
    """The Store's resume held at a gate: ``entered`` once a resume reached it,
    ``release`` lets it go; ``held`` once the node began a hold."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.contextmanager
def gated_resume(gw: GatewayHandle, after_claim: bool) -> Iterator[Gate]:
    """Hold ``gw``'s Store resumes at a gate, before the claim or (``after_claim``)
    once the Store has made it, and note every hold the node begins."""
    store, holds, gate = gw.node.store, gw.node.holds, Gate()
    resume, hold = store.resume, holds.hold

    async def gated(*args: Any, **kwargs: Any) -> Any:
        adopted = await resume(*args, **kwargs) if after_claim else None
        gate.entered.set()
        await gate.release.wait()
        return adopted if after_claim else await resume(*args, **kwargs)

    def noted(*args: Any, **kwargs: Any) -> None:
        hold(*args, **kwargs)
        gate.held.set()

    store.resume = gated  # type: ignore[method-assign]
    holds.hold = noted  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.release.set()
        store.resume = resume  # type: ignore[method-assign]
        holds.hold = hold  # type: ignore[method-assign]


async def no_diff_then_update(watcher: PresenceClient, r: Raw, user: str) -> dict[str, Any]:
    """The resumed connection updates its note; the watcher's first diff about
    ``user`` must be exactly that update (so it saw no leave and no join before)."""
    assert (await r.request(t="update", ref=99, meta={"note": "after"}))["t"] == "ok"
    diff = await watcher.wait_for(lambda e: user in e["joins"] or user in e["leaves"])
    assert diff["leaves"] == {}, diff
    (meta,) = diff["joins"][user]
    assert meta["note"] == "after"
    return dict(meta)


async def test_welcome_carries_resume_fields(gateway_factory: GatewayFactory,
                                            backend: dict[str, Any]) -> None:
    gw = await gateway_factory(**backend)
    r = await raw(gw, gw.token("u1"))
    w = r.welcome
    assert w["resume_ttl"] == 15 and "resumed" not in w
    random_part, _, conn = w["resume"].partition(".")
    assert conn == w["conn"] and len(random_part) >= 32  # 192 random bits, url-safe
    assert len(w["resume"]) <= 256
    await r.ws.close()


async def test_lost_connection_resumes_with_no_diff_and_its_snapshots(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    gw = await gateway_factory(**backend, resume_ttl=10.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1", ["team:*", "churn:*"], role="csm"))
    joined = await r.request(t="join", ref=1, ch="team:w1",
                             meta={"status": "busy", "device": "ios", "note": "venue"})
    before = joined["presence"]["u1"][0]
    await r.request(t="join", ref=2, ch="churn:acme")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    r.drop()
    await watcher.update(note="meanwhile")  # something the resumed client missed

    again = await raw(gw, gw.token("u1", ["team:*", "churn:*"], role="csm"),
                      resume=r.welcome["resume"])
    assert again.welcome["resumed"] is True
    assert again.welcome["conn"] == r.welcome["conn"]
    assert again.welcome["resume"] != r.welcome["resume"]
    frames = [await again.recv(), await again.recv()]
    assert {f["t"] for f in frames} == {"joined"} and all(f["ref"] is None for f in frames)
    by_ch = {f["ch"]: f for f in frames}
    assert set(by_ch) == {"team:w1", "churn:acme"} and by_ch["churn:acme"]["churn"] == []
    snapshot = by_ch["team:w1"]["presence"]
    assert snapshot["u1"] == [before]  # status, device, note, since and seq kept
    assert snapshot["watcher"][0]["note"] == "meanwhile"
    meta = await no_diff_then_update(watcher, again, "u1")
    assert meta["seq"] == before["seq"] + 1 and meta["status"] == "busy"
    await again.ws.close()


async def test_a_resume_token_is_single_use_and_bound_to_its_user(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    gw = await gateway_factory(**backend, resume_ttl=10.0)
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    r.drop()
    other = await raw(gw, gw.token("u2"), resume=r.welcome["resume"])
    assert other.welcome["resumed"] is False and other.welcome["conn"] != r.welcome["conn"]
    first = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    assert first.welcome["resumed"] is True
    first.drop()
    used = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    assert used.welcome["resumed"] is False and used.welcome["conn"] != r.welcome["conn"]
    for junk in ("", "x", "a" * 300, "\u0000." + r.welcome["conn"]):
        j = await raw(gw, gw.token("u1"), resume=junk)
        assert j.welcome["resumed"] is False
        await j.ws.close()
    # The newest token still resumes it.
    last = await raw(gw, gw.token("u1"), resume=first.welcome["resume"])
    assert last.welcome["resumed"] is True and last.welcome["conn"] == r.welcome["conn"]
    for c in (other, used, last):
        await c.ws.close()


async def test_not_resumed_in_time_leaves_with_the_time_of_the_loss(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    gw = await gateway_factory(**backend, resume_ttl=1.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    lost_at = int(time.time() * 1000)
    r.drop()
    diff = await watcher.wait_for(lambda e: "u1" in e["leaves"], timeout=5)
    seen_at = int(time.time() * 1000)
    (leave,) = diff["leaves"]["u1"]
    assert leave["conn"] == r.welcome["conn"]
    assert seen_at - lost_at >= 1000 - 50  # held for resume_ttl
    assert abs(leave["last_seen"] - lost_at) < 500  # the time of the loss
    late = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    assert late.welcome["resumed"] is False
    await late.ws.close()


async def test_a_resume_racing_the_hold_expiry_is_refused(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    """The hold expired and its leaves are on their way: a resume arriving then must be
    refused. It used to be accepted (the token outlived the leaves' publication), so
    the client was told ``resumed`` while everyone had seen it leave, and a joiner's
    snapshot lacked it (found by the 10,000-client storm)."""
    gw = await gateway_factory(**backend, resume_ttl=1.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    store = gw.node.store
    removing, release = asyncio.Event(), asyncio.Event()
    remove_metas = store.remove_metas

    async def gated(*args: Any, **kwargs: Any) -> Any:
        removing.set()
        await release.wait()
        return await remove_metas(*args, **kwargs)

    store.remove_metas = gated  # type: ignore[method-assign]
    try:
        r.drop()
        await asyncio.wait_for(removing.wait(), 5)  # the expiry is removing the metas
        late = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    finally:
        release.set()
        store.remove_metas = remove_metas  # type: ignore[method-assign]
    assert late.welcome["resumed"] is False
    diff = await watcher.wait_for(lambda e: "u1" in e["leaves"])
    assert diff["leaves"]["u1"][0]["conn"] == r.welcome["conn"]
    await late.ws.close()


async def test_a_resume_claimed_on_the_holding_node_is_not_expired(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    """The Store has handed the connection back to the node that holds it, and the
    hold's deadline passes before that node stops the timer. The expiry used to run
    anyway: it removed the record as its own and published the leave, while the client
    was told ``resumed`` (found by the 10,000-client storm: leaves of clients that
    resumed on the gateway they had lost)."""
    gw = await gateway_factory(**backend, resume_ttl=1.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    with gated_resume(gw, after_claim=True) as gate:
        r.drop()
        await asyncio.wait_for(gate.held.wait(), TIMEOUT)
        back_task = asyncio.ensure_future(raw(gw, gw.token("u1"), resume=r.welcome["resume"]))
        await asyncio.wait_for(gate.entered.wait(), TIMEOUT)
        await asyncio.sleep(1.5)  # what is awaited here is time: the hold's deadline
        gate.release.set()
        back = await asyncio.wait_for(back_task, TIMEOUT)
    assert back.welcome["resumed"] is True and back.welcome["conn"] == r.welcome["conn"]
    await no_diff_then_update(watcher, back, "u1")
    await back.ws.close()


async def test_a_resume_before_the_node_saw_the_loss_supersedes_the_old_session(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    """The client is back on the same gateway before that gateway noticed its old
    socket die (under load a dead socket is found out late; here the old socket is
    simply still open). The old session used to end later as a loss of its own, be
    held, and expire: the leave of a connection that was live on its new socket
    (found by the 10,000-client storm). Now the old socket is cut at once and its end
    holds nothing."""
    gw = await gateway_factory(**backend, resume_ttl=1.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    back = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    assert back.welcome["resumed"] is True and back.welcome["conn"] == r.welcome["conn"]
    r.drop()  # the old socket dies now (if the server has not cut it already)
    await asyncio.sleep(1.5)  # what is awaited here is time: a hold's deadline
    await no_diff_then_update(watcher, back, "u1")
    assert len(gw.node.holds) == 0
    assert len(gw.node.sessions) == 2  # the watcher and the resumed session
    await back.ws.close()


async def test_a_stale_session_ending_during_the_resume_holds_nothing(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    """As above, but the gateway notices the old socket's death while the Store is
    handing the connection to the new one: the old session's end begins a hold after
    the resume looked for one (found by the same storm, after the fix above)."""
    gw = await gateway_factory(**backend, resume_ttl=1.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    with gated_resume(gw, after_claim=True) as gate:
        back_task = asyncio.ensure_future(raw(gw, gw.token("u1"), resume=r.welcome["resume"]))
        await asyncio.wait_for(gate.entered.wait(), TIMEOUT)
        r.drop()
        await asyncio.wait_for(gate.held.wait(), TIMEOUT)  # the old session's end holds it
        gate.release.set()
        back = await asyncio.wait_for(back_task, TIMEOUT)
    assert back.welcome["resumed"] is True and back.welcome["conn"] == r.welcome["conn"]
    await asyncio.sleep(1.5)  # what is awaited here is time: the hold's deadline
    await no_diff_then_update(watcher, back, "u1")
    assert len(gw.node.holds) == 0
    await back.ws.close()


async def test_a_resume_whose_client_left_before_its_welcome_keeps_the_token(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    """A client that gives up waiting for its ``welcome`` (its timeout fired while the
    server was busy, as in a reconnect storm) never saw the new token, so the one it
    holds must stay good. It used to be spent: the retry was told ``resumed: false``,
    joined afresh, and everyone saw a join, then the hold's leave (found by the
    10,000-client storm)."""
    gw = await gateway_factory(**backend, resume_ttl=10.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    server = gw.gateway.server
    assert server is not None
    with gated_resume(gw, after_claim=False) as gate:
        r.drop()
        await asyncio.wait_for(gate.held.wait(), TIMEOUT)  # the loss is held
        gate.held.clear()
        before = set(server.connections)
        ws = await connect(gw.ws_url, subprotocols=["presence.v1.json"],  # type: ignore[list-item]
                           open_timeout=TIMEOUT)
        (side,) = set(server.connections) - before  # the server's end of it
        await ws.send(orjson.dumps({"t": "hello", "token": gw.token("u1"),
                                    "resume": r.welcome["resume"]}).decode())
        await asyncio.wait_for(gate.entered.wait(), TIMEOUT)  # the server is adopting it
        ws.transport.abort()  # the client gives up before its welcome
        await asyncio.wait_for(side.wait_closed(), TIMEOUT)
        gate.release.set()
        # Held again. (A retry that raced the abandoned adoption would still find the
        # new token; that window is left: docs/reliability.md.)
        await asyncio.wait_for(gate.held.wait(), TIMEOUT)
    back = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    assert back.welcome["resumed"] is True and back.welcome["conn"] == r.welcome["conn"]
    await no_diff_then_update(watcher, back, "u1")
    await back.ws.close()


async def test_clean_ends_leave_at_once_and_1001_is_a_loss(
        gateway_factory: GatewayFactory, backend: dict[str, Any]) -> None:
    gw = await gateway_factory(**backend, resume_ttl=30.0)
    watcher = await watcher_on(gw, "team:w1")
    conns = {}
    for user in ("closes", "goes-away"):
        conns[user] = await raw(gw, gw.token(user))
        await conns[user].request(t="join", ref=1, ch="team:w1")
        await watcher.wait_for(lambda e, u=user: u in e["joins"])
    await conns["goes-away"].ws.close(1001)
    await conns["closes"].ws.close(1000)
    r = conns["goes-away"]
    # 1000 is a clean end: its leave comes at once; 1001 is held (no leave for 30 s).
    diff = await watcher.wait_for(lambda e: e["leaves"], timeout=3)
    assert set(diff["leaves"]) == {"closes"}
    r = await raw(gw, gw.token("goes-away"), resume=r.welcome["resume"])
    assert r.welcome["resumed"] is True
    await r.ws.close()
    diff = await watcher.wait_for(lambda e: e["leaves"], timeout=3)
    assert set(diff["leaves"]) == {"goes-away"}


async def test_drain_holds_and_the_client_resumes_on_another_gateway(
        pair: tuple[GatewayHandle, GatewayHandle]) -> None:
    gw1, gw2 = pair
    watcher = await watcher_on(gw2, "team:w1")
    r = await raw(gw1, gw1.token("u1"))
    await r.request(t="join", ref=1, ch="team:w1", meta={"status": "away"})
    gone = await raw(gw1, gw1.token("u2"))
    await gone.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u2" in e["joins"])
    drained_at = int(time.time() * 1000)
    await gw1.gateway.stop()
    await asyncio.wait_for(r.ws.wait_closed(), TIMEOUT)
    assert r.ws.close_code == 1012 and "reconnect in" in (r.ws.close_reason or "")
    back = await raw(gw2, gw2.token("u1"), resume=r.welcome["resume"])
    assert back.welcome["resumed"] is True and back.welcome["node"] == gw2.gateway.node.node_id
    joined = await back.recv()
    assert joined["t"] == "joined" and joined["presence"]["u1"][0]["status"] == "away"
    meta = await no_diff_then_update(watcher, back, "u1")
    assert meta["conn"] == r.welcome["conn"]
    # u2 did not come back: the survivor sweeps it once the drained node's lease (at
    # least resume_ttl) lapses, with the time of the drain as its last-seen.
    diff = await watcher.wait_for(lambda e: "u2" in e["leaves"], timeout=10)
    assert abs(diff["leaves"]["u2"][0]["last_seen"] - drained_at) < 1000
    assert set(watcher.mirror["team:w1"].users()) == {"watcher", "u1"}
    await back.ws.close()


async def test_resume_off_publishes_leaves_at_once(gateway_factory: GatewayFactory,
                                                   backend: dict[str, Any]) -> None:
    gw = await gateway_factory(**backend, resume_ttl=0.0)
    watcher = await watcher_on(gw, "team:w1")
    r = await raw(gw, gw.token("u1"))
    assert r.welcome["resume_ttl"] == 0
    await r.request(t="join", ref=1, ch="team:w1")
    await watcher.wait_for(lambda e: "u1" in e["joins"])
    r.drop()
    await watcher.wait_for(lambda e: "u1" in e["leaves"], timeout=3)
    again = await raw(gw, gw.token("u1"), resume=r.welcome["resume"])
    assert again.welcome["resumed"] is False
    await again.ws.close()
