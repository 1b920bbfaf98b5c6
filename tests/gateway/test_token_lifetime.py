"""Token lifetime (PROTOCOL.md "Session lifetime", "Token lifetime"): refresh in place,
grants replaced by the newest token, 4001 "token expired" at exp plus the leeway, and
the leeway applied at hello."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from websockets.asyncio.client import connect

from gateway.client import ClientError, PresenceClient
from tests.fixtures.servers import GatewayFactory


async def test_welcome_carries_exp_and_refresh_replaces_it(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    exp = int(time.time()) + 600
    async with connect(gw.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "token": gw.token("u1", exp=exp)}).decode())
        welcome = orjson.loads(await ws.recv())
        assert welcome["t"] == "welcome" and welcome["exp"] == exp
        later = exp + 3600
        await ws.send(orjson.dumps({"t": "refresh", "ref": 3,
                                    "token": gw.token("u1", exp=later)}).decode())
        assert orjson.loads(await ws.recv()) == {"t": "refreshed", "ref": 3, "exp": later}


async def test_refresh_with_another_user_or_a_bad_token_is_forbidden_and_keeps_the_token(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    a = await gw.client("u1")
    for token in (gw.token("u2"), "not-a-jwt", gw.token("u1", exp=int(time.time()) - 60)):
        with pytest.raises(ClientError) as info:
            await a.refresh(token)
        assert info.value.code == "forbidden"
    # Still served with its first token.
    assert (await a.join("team:w1"))["t"] == "joined"
    with pytest.raises(ClientError) as info:
        await a.request({"t": "refresh"})
    assert info.value.code == "bad_request"


async def test_channels_no_longer_granted_are_left(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    a = await PresenceClient.connect(gw.ws_url, gw.token("u1", ["team:*", "churn:*"], role="csm"))
    gw.clients.append(a)
    watcher = await gw.client("w")
    await a.join("team:keep")
    await a.join("team:drop")
    await a.join("churn:acme")
    await watcher.join("team:drop")
    # The new token grants team:keep only, and as a member (no churn).
    reply = await a.refresh(gw.token("u1", ["team:keep"], role="member"))
    assert reply["t"] == "refreshed"
    left = {a.events.get_nowait()["ch"], a.events.get_nowait()["ch"]}
    assert left == {"team:drop", "churn:acme"}
    diff = await watcher.wait_for(lambda e: "u1" in e["leaves"])
    assert diff["ch"] == "team:drop"
    assert set(a.mirror) == {"team:keep"}
    with pytest.raises(ClientError) as info:
        await a.join("team:drop")
    assert info.value.code == "forbidden"


async def test_expired_token_closes_4001_at_exp_plus_leeway_and_leaves_at_once(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(token_leeway=0.5)
    watcher = await gw.client("w")
    await watcher.join("team:w1")
    exp = int(time.time()) + 2
    a = await PresenceClient.connect(gw.ws_url, gw.token("u1", exp=exp))
    await a.join("team:w1")
    code, reason = await a.wait_closed(timeout=10)
    closed_at = time.time()
    assert (code, reason) == (4001, "token expired")
    assert closed_at >= exp + 0.5 - 0.05  # not before exp plus the leeway
    diff = await watcher.wait_for(lambda e: "u1" in e["leaves"], timeout=5)
    assert diff["leaves"]["u1"][0]["conn"] == a.conn


async def test_a_refresh_moves_the_deadline(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(token_leeway=0.0)
    a = await gw.client("u1")
    short = await PresenceClient.connect(gw.ws_url, gw.token("u2", exp=int(time.time()) + 2))
    await short.refresh(gw.token("u2", ttl=600))
    # The first token's deadline passes: the connection stays.
    await asyncio.sleep(3)  # waiting for a deadline to pass, nothing to await instead
    assert (await short.ping())["t"] == "pong"
    await short.close()
    assert (await a.ping())["t"] == "pong"


async def test_leeway_applies_at_hello(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(token_leeway=30.0)
    now = int(time.time())
    ok = await PresenceClient.connect(gw.ws_url, gw.token("u1", exp=now - 10))
    assert ok.conn
    await ok.close()
    early = await PresenceClient.connect(gw.ws_url, gw.token("u1", nbf=now + 10))
    await early.close()
    async with connect(gw.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "token": gw.token("u1", exp=now - 60)}).decode())
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert (ws.close_code, ws.close_reason) == (4001, "token expired")
