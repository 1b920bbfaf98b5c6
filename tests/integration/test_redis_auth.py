"""Gateways on a Redis that requires a password: every connection sends AUTH first.

Two gateway processes share the channel, so a join and an update made on one reach the
other's client only through Redis pub/sub, the connection that authenticated by
itself (the command client and the write path take redis-py's settings). A refused
password keeps the gateway alive and not ready, with the reason in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.fixtures.processes import GatewayProcess, new_secret
from tests.fixtures.redis_cluster import AUTH_PASSWORD, ClusterControl, plain_redis

pytestmark = pytest.mark.redis

ENV = {"PRESENCE_LOG_LEVEL": "warning", "PRESENCE_COALESCE_MS": "5"}


@pytest.fixture
def single_with_password() -> Iterator[int]:
    """One plain redis-server with ``requirepass``; yields its port."""
    with plain_redis(AUTH_PASSWORD) as port:
        yield port


def busy(event: dict[str, Any], user: str) -> bool:
    return bool(event.get("joins", {}).get(user, [{}])[0].get("status") == "busy")


async def see_each_other(g1: GatewayProcess, g2: GatewayProcess) -> None:
    a = await g1.client("ann")
    b = await g2.client("ben")
    try:
        await a.join("team:auth")
        snap = await b.join("team:auth")
        assert "ann" in snap["presence"]
        await a.wait_for(lambda e: "ben" in e.get("joins", {}), 10)
        await b.update(status="busy")
        await a.wait_for(lambda e: busy(e, "ben"), 10)
    finally:
        await a.close()
        await b.close()


async def run_pair(env: dict[str, str], *args: str) -> None:
    secret = new_secret()
    gateways = [GatewayProcess(f"auth{i}", secret, env, *args) for i in range(2)]
    try:
        for g in gateways:
            await g.start(timeout=30)
        await see_each_other(*gateways)
    finally:
        for g in gateways:
            await g.stop()


async def test_gateways_on_a_password_protected_cluster_see_each_other(
        redis_cluster_auth: ClusterControl) -> None:
    await run_pair({**ENV, "PRESENCE_REDIS_PASSWORD": AUTH_PASSWORD},
                   "--redis-cluster", redis_cluster_auth.startup_nodes)


async def test_a_password_in_the_url_reaches_pub_sub(single_with_password: int) -> None:
    await run_pair(ENV, "--redis-url",
                   f"redis://:{AUTH_PASSWORD}@127.0.0.1:{single_with_password}/0")


async def test_a_refused_password_keeps_the_gateway_unready_and_says_why(
        redis_cluster_auth: ClusterControl) -> None:
    g = GatewayProcess("auth-wrong", new_secret(),
                       {**ENV, "PRESENCE_REDIS_PASSWORD": "not-" + AUTH_PASSWORD},
                       "--redis-cluster", redis_cluster_auth.startup_nodes)
    # It never gets to "serving": start() fails once its wait is over, and the log,
    # read until then, must say why.
    starting = asyncio.ensure_future(g.start(timeout=8))
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(20):
                while True:  # another process: its HTTP endpoint is the only signal
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{g.admin_url}/healthz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.1)
            async with http.get(f"{g.admin_url}/readyz") as resp:
                assert resp.status == 503
        with pytest.raises(TimeoutError):
            await starting
        said = "".join(g.log)
        assert "backend_unavailable_at_start" in said, said
        assert "WRONGPASS" in said or "invalid username-password" in said, said
        assert AUTH_PASSWORD not in said  # neither password is ever logged
    finally:
        if not starting.done():
            starting.cancel()
        await g.stop()
