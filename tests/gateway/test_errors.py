"""Every error code and close code of PROTOCOL.md, floods and oversized frames."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from cluster.memory import MemoryBroker, MemoryStore
from gateway.client import ClientError, PresenceClient
from presence.meta import Meta
from tests.fixtures.servers import GatewayFactory, GatewayHandle
from tests.gateway.test_session import closed_with


async def expect_error(coro: Any, code: str) -> dict[str, Any]:
    with pytest.raises(ClientError) as err:
        await coro
    assert err.value.code == code, err.value.frame
    frame = err.value.frame
    assert isinstance(frame["message"], str) and frame["message"]
    return frame


async def test_bad_request_names_the_field(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    f = await expect_error(a.request({"t": "frobnicate"}), "bad_request")
    assert "frobnicate" in f["message"]
    f = await expect_error(a.request({"t": "join", "ch": "Team:Upper"}), "bad_request")
    assert "ch" in f["message"]
    f = await expect_error(a.join("team:w1", status="sleeping"), "bad_request")
    assert "meta.status" in f["message"]
    f = await expect_error(a.join("team:w1", note="x" * 129), "bad_request")
    assert "meta.note" in f["message"]
    f = await expect_error(a.request({"t": "join", "ch": 42}), "bad_request")
    assert "ch" in f["message"]
    await expect_error(a.request({"t": "hello", "token": "again"}), "bad_request")
    # The connection survives all of that.
    assert (await a.ping())["t"] == "pong"


async def test_bad_ref_gets_null_ref(gateway: GatewayHandle) -> None:
    async with connect(gateway.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "token": gateway.token("u")}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"t": "ping", "ref": "seven"}).decode())
        err = orjson.loads(await ws.recv())
        assert err["t"] == "error" and err["ref"] is None and err["code"] == "bad_request"


async def test_forbidden(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1", channels=["team:w1", "org:acme:*"])
    await a.join("team:w1")
    await a.join("org:acme:planning")
    f = await expect_error(a.join("team:w2"), "forbidden")
    assert "team:w2" in f["message"]
    await expect_error(a.join("churn:acme"), "forbidden")
    csm = await gateway.client("c1", role="csm", channels=["churn:acme"])
    joined = await csm.join("churn:acme")
    assert joined["churn"] == [] and "presence" not in joined


async def test_not_joined(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    await expect_error(a.leave("team:w1"), "not_joined")
    await expect_error(a.update(status="away"), "not_joined")


async def test_update_flood_is_rate_limited(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    await a.join("team:w1")
    codes: list[str] = []
    retry: list[float] = []
    for i in range(30):
        try:
            await a.update(note=f"n{i}")
            codes.append("ok")
        except ClientError as exc:
            codes.append(exc.code)
            retry.append(float(exc.retry_after))
    # Burst 20, refill 10/s: the first 20 pass, most of the rest are refused.
    assert codes[:20] == ["ok"] * 20
    assert codes.count("rate_limited") >= 5
    assert all(0 < r <= 0.11 for r in retry)


async def test_join_rate_limit_per_user(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(joins_per_minute=3)
    a = await gw.client("u1")
    b = await gw.client("u1")
    await a.join("team:a")
    await a.join("team:b")
    await b.join("team:c")
    f = await expect_error(b.join("team:d"), "rate_limited")
    assert f["retry_after"] > 50


async def test_channel_quota(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_channels_free=2)
    a = await gw.client("u1")
    await a.join("team:a")
    await a.join("team:b")
    await a.join("team:b")  # re-join is not a new channel
    await expect_error(a.join("team:c"), "limit_exceeded")
    paid = await gw.client("u2", tier="paid")
    for ch in ("team:a", "team:b", "team:c"):
        await paid.join(ch)


async def test_connections_per_user(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_user_connections=2)
    await gw.client("u1")
    await gw.client("u1")
    async with connect(gw.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "ref": 1, "token": gw.token("u1")}).decode())
        err = orjson.loads(await ws.recv())
        assert err["t"] == "error" and err["code"] == "limit_exceeded" and err["ref"] == 1
        code, _ = await closed_with(ws)
    assert code == 1008
    # Another user is unaffected.
    await gw.client("u2")


async def test_overloaded_while_backend_down(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    await a.join("team:w1")
    gateway.node.health.force(False)  # what the health loop concludes when Redis is gone
    f = await expect_error(a.update(status="away"), "overloaded")
    assert f["retry_after"] > 0
    await expect_error(a.join("team:w2"), "overloaded")
    gateway.node.health.force(True)
    await a.update(status="away")


class FaultyStore(MemoryStore):
    """A memory store with one injected fault: nothing real fails this way on demand."""

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        if ch == "team:boom":
            raise RuntimeError("injected fault")
        return await super().channel_presence(ch)

    async def add_connection(self, node: str, user: str, conn: str,
                             resume_hash: str = "") -> int:
        if user == "crash":
            raise RuntimeError("injected fault")
        return await super().add_connection(node, user, conn, resume_hash)


async def test_internal_error_and_1011(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(broker=MemoryBroker(), store=FaultyStore())
    a = await gw.client("u1")
    f = await expect_error(a.join("team:boom"), "internal")
    assert "injected" not in f["message"]  # no internals leak to clients
    # Nothing is held back for a joined reply that will not come.
    session = next(s for s in gw.node.sessions if s.user == "u1")
    assert session.core.backlog == {}
    assert (await a.ping())["t"] == "pong"
    async with connect(gw.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "token": gw.token("crash")}).decode())
        code, _ = await closed_with(ws)
    assert code == 1011


async def test_malformed_frames_then_4000(gateway: GatewayHandle) -> None:
    async with connect(gateway.ws_url) as ws:
        await ws.send(orjson.dumps({"t": "hello", "token": gateway.token("u")}).decode())
        await ws.recv()
        bad: Sequence[str | bytes] = ["{not json", "[1,2]", '{"t": 5}', b"\x00\x01", "null", "{}"]
        replies = []
        for frame in bad[:5]:
            await ws.send(frame)
            replies.append(orjson.loads(await ws.recv()))
        assert all(r["t"] == "error" and r["code"] == "bad_request" for r in replies)
        await ws.send(bad[5])
        code, _ = await closed_with(ws)
    assert code == 4000


async def test_error_abuse_closes_1008(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_errors_per_minute=5)
    a = await gw.client("u1")
    for _ in range(5):
        await expect_error(a.leave("team:nope"), "not_joined")
    await a.send_raw(orjson.dumps({"t": "leave", "ch": "team:nope"}).decode())
    code, reason = await a.wait_closed()
    assert code == 1008 and "errors" in reason


async def test_oversized_frame_1009_and_others_unaffected(gateway: GatewayHandle) -> None:
    other = await gateway.client("u2")
    await other.join("team:w1")
    big = await gateway.client("u1")
    await big.join("team:w1")
    await big.send_raw("x" * (1024 * 1024))
    code, _ = await big.wait_closed()
    assert code == 1009
    diff = await other.wait_for(lambda e: "u1" in e["leaves"])
    assert diff["leaves"]["u1"][0]["conn"] == big.conn
    assert (await other.ping())["t"] == "pong"
    just_over = await gateway.client("u3")
    await just_over.send_raw("y" * 4097)
    assert (await just_over.wait_closed())[0] == 1009


async def test_max_connections_1013(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_connections=2)
    await gw.client("u1")
    await gw.client("u2")
    async with connect(gw.ws_url) as ws:
        code, _ = await closed_with(ws)
    assert code == 1013


async def test_drain_closes_1012_and_publishes_leaves_with_resume_off(
        gateway_factory: GatewayFactory) -> None:
    # With resume on, a drain holds instead (tests/gateway/test_resume.py).
    from cluster.memory import MemoryBus

    bus, store = MemoryBus(), MemoryStore()
    gw1 = await gateway_factory(broker=MemoryBroker(bus), store=store, resume_ttl=0.0)
    gw2 = await gateway_factory(broker=MemoryBroker(bus), store=store, resume_ttl=0.0)
    leaving = await gw1.client("u1")
    staying = await gw2.client("u2")
    await leaving.join("team:w1")
    await staying.join("team:w1")
    await gw1.gateway.stop()
    code, reason = await leaving.wait_closed()
    assert code == 1012 and "reconnect in" in reason
    diff = await staying.wait_for(lambda e: "u1" in e["leaves"])
    assert diff["leaves"]["u1"][0]["conn"] == leaving.conn
    assert set(staying.mirror["team:w1"].users()) == {"u2"}
    # A draining node refuses newcomers: its port is closed.
    with pytest.raises(OSError):
        await PresenceClient.connect(gw1.ws_url, gw1.token("late"), timeout=2)


async def test_stuck_client_is_closed_and_memory_bounded(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_buffer=64 * 1024, updates_per_second=10_000.0,
                               updates_burst=10_000, requests_per_second=10_000.0,
                               requests_burst=10_000, coalesce_ms=0)
    # A client whose socket takes little and which never reads.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.gateway.port))
    stuck = await connect(gw.ws_url, sock=sock, max_queue=1, ping_interval=None)
    await stuck.send(orjson.dumps({"t": "hello", "token": gw.token("stuck")}).decode())
    await stuck.send(orjson.dumps({"t": "join", "ch": "team:w1"}).decode())
    writer = await gw.client("w")
    await writer.join("team:w1")
    note = "n" * 128
    peak = 0
    session = next(s for s in gw.node.sessions if s.user == "stuck")
    # Keep the kernel from absorbing megabytes on loopback: the point is the node's buffer.
    server_sock = session.ws.transport.get_extra_info("socket")
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for i in range(3000):
        await writer.update(note=f"{i}{note}"[:128])
        peak = max(peak, session.buffered())
        if session.closing:
            break
    assert session.closing, f"the stuck client was never closed (peak {peak}, i {i})"
    assert gw.node.metrics.slow_consumers._value.get() == 1
    # The buffer never grew far past the bound (one frame of slack per write).
    assert peak <= 64 * 1024 + 4096
    await asyncio.wait_for(session.finished.wait(), 10)
    assert session not in gw.node.sessions
    stuck.transport.abort()
