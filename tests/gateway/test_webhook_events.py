"""Webhook events of real presence transitions (PROTOCOL.md "Webhooks"), end to end:
a gateway on the memory backend, real clients, a real receiver on loopback.

user.online / user.offline per user across devices, debounced by the resume hold (a
resumed connection produces nothing), with the cause and last-seen of each end;
channel.occupied / channel.vacated per channel.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from websockets.asyncio.client import connect

from gateway.client import PresenceClient
from presence.settings import WebhookTarget
from tests.fixtures.receiver import Receiver
from tests.fixtures.servers import GatewayFactory, GatewayHandle

SECRET = "hook-secret"


async def hooked(gateway_factory: GatewayFactory, receiver: Receiver,
                 **settings: Any) -> GatewayHandle:
    target = WebhookTarget(receiver.url + "/hook", SECRET)
    return await gateway_factory(webhooks=(target,), **settings)


def kinds(receiver: Receiver, **match: Any) -> list[str]:
    """The types of the events delivered so far whose fields match ``match``."""
    return [e["type"] for e in receiver.delivered()
            if all(e.get(k) == v for k, v in match.items())]


async def test_online_offline_once_per_user_across_devices(
        gateway_factory: GatewayFactory, receiver: Receiver) -> None:
    gw = await hooked(gateway_factory, receiver)
    phone = await PresenceClient.connect(gw.ws_url, gw.token("ann"))
    laptop = await PresenceClient.connect(gw.ws_url, gw.token("ann"))
    await receiver.wait_for(lambda: "user.online" in kinds(receiver, user="ann"))
    await phone.close()  # 1000: a clean end, but ann is still online on the laptop
    await laptop.join("team:w1")
    await laptop.close()
    await receiver.wait_for(lambda: "user.offline" in kinds(receiver, user="ann"))
    assert kinds(receiver, user="ann") == ["user.online", "user.offline"]
    offline = next(e for e in receiver.delivered() if e["type"] == "user.offline")
    assert offline["cause"] == "closed" and isinstance(offline["last_seen"], int)
    assert kinds(receiver, ch="team:w1") == ["channel.occupied", "channel.vacated"]
    events = receiver.delivered()
    assert len({e["id"] for e in events}) == len(events)  # every event its own id
    assert all(isinstance(e["at"], int) for e in events)


async def test_a_resumed_connection_produces_nothing_and_a_lost_one_goes_offline_later(
        gateway_factory: GatewayFactory, receiver: Receiver) -> None:
    gw = await hooked(gateway_factory, receiver, resume_ttl=1.0)

    async def raw(resume: str | None = None) -> tuple[Any, dict[str, Any]]:
        ws = await connect(gw.ws_url)
        hello: dict[str, Any] = {"t": "hello", "token": gw.token("bo")}
        if resume:
            hello["resume"] = resume
        await ws.send(orjson.dumps(hello).decode())
        return ws, orjson.loads(await ws.recv())

    ws, welcome = await raw()
    await ws.send(orjson.dumps({"t": "join", "ref": 1, "ch": "team:w2"}).decode())
    await ws.recv()
    await receiver.wait_for(lambda: "channel.occupied" in kinds(receiver, ch="team:w2"))
    ws.transport.abort()  # lost
    ws2, again = await raw(welcome["resume"])
    assert again["resumed"] is True
    ws2.transport.abort()  # lost again; this time nobody comes back
    lost_at = int(time.time() * 1000)
    await receiver.wait_for(lambda: "user.offline" in kinds(receiver, user="bo"))
    assert kinds(receiver, user="bo") == ["user.online", "user.offline"]
    assert kinds(receiver, ch="team:w2") == ["channel.occupied", "channel.vacated"]
    offline = next(e for e in receiver.delivered() if e["type"] == "user.offline")
    assert offline["cause"] == "lost" and abs(offline["last_seen"] - lost_at) < 500
    # The user's events came in order, in as few requests as moments.
    order = [e["type"] for e in receiver.delivered() if e.get("user") == "bo"]
    assert order == ["user.online", "user.offline"]


async def test_an_expired_token_ends_with_cause_expired(
        gateway_factory: GatewayFactory, receiver: Receiver) -> None:
    gw = await hooked(gateway_factory, receiver, token_leeway=0.0)
    c = await PresenceClient.connect(gw.ws_url, gw.token("cy", exp=int(time.time()) + 1))
    assert (await c.wait_closed(timeout=5))[0] == 4001
    await receiver.wait_for(lambda: "user.offline" in kinds(receiver, user="cy"))
    offline = next(e for e in receiver.delivered() if e["type"] == "user.offline")
    assert offline["cause"] == "expired"
