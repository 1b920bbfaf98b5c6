"""A gateway on a plain Redis that goes away and comes back (state lost meanwhile)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.client import ClientError
from gateway.node import STOP_BUDGET
from tests.fixtures.processes import GatewayProcess, free_port, new_secret

pytestmark = pytest.mark.redis


class RedisServer:
    """One plain redis-server without persistence, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="presence-outage-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    r = RedisServer()
    yield r
    r.kill()
    shutil.rmtree(r.dir, ignore_errors=True)


async def ready_status(http: aiohttp.ClientSession, gw: GatewayProcess) -> int:
    async with http.get(f"{gw.admin_url}/readyz") as resp:
        return resp.status


async def wait_ready(http: aiohttp.ClientSession, gw: GatewayProcess, want: int,
                     timeout: float = 20) -> None:
    # Readiness lives in another process: polling its HTTP endpoint is the only signal.
    async with asyncio.timeout(timeout):
        while await ready_status(http, gw) != want:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_redis_outage_keeps_clients_and_converges(redis_server: RedisServer) -> None:
    gw = GatewayProcess("out1", new_secret(), {"PRESENCE_LOG_LEVEL": "warning"},
                        "--redis-url", f"redis://127.0.0.1:{redis_server.port}/0")
    # The gateway starts before Redis: it waits, alive but not ready.
    start = asyncio.ensure_future(gw.start(timeout=40))
    async with aiohttp.ClientSession() as http:
        try:
            async with asyncio.timeout(20):
                while True:
                    try:
                        async with http.get(f"{gw.admin_url}/healthz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
            assert await ready_status(http, gw) == 503
            redis_server.start()
            await start
            await wait_ready(http, gw, 200)
            a = await gw.client("ann")
            b = await gw.client("ben")
            await a.join("team:out")
            await b.join("team:out")

            redis_server.kill()
            await wait_ready(http, gw, 503)
            # Local clients stay connected; writes are refused with a retry hint.
            assert (await a.ping())["t"] == "pong"
            with pytest.raises(ClientError) as err:
                await a.update(status="away")
            assert err.value.code == "overloaded" and err.value.retry_after

            # Redis returns empty: the node re-asserts its live members.
            redis_server.start()
            await wait_ready(http, gw, 200)
            c = await gw.client("cat")
            async with asyncio.timeout(15):
                while True:
                    snap = await c.join("team:out")
                    if set(snap["presence"]) == {"ann", "ben", "cat"}:
                        break
                    await asyncio.sleep(0.2)
            await b.update(status="busy")
            await a.wait_for(
                lambda e: e["joins"].get("ben", [{}])[0].get("status") == "busy", 5
            )
            assert [m.status for m in a.mirror["team:out"].metas("ben")] == ["busy"]
            for client in (a, b, c):
                await client.close()
        finally:
            if not start.done():
                start.cancel()
            await gw.stop()


async def test_a_gateway_stopped_while_redis_is_frozen_exits_within_its_budget(
        redis_server: RedisServer) -> None:
    """SIGTERM with Redis frozen (SIGSTOP: connections open, nothing answers): the
    drain gets ``drain_timeout``, the node's stop after it ``STOP_BUDGET``; the process
    exits cleanly within their sum."""
    drain = 2.0
    gw = GatewayProcess("frozen-stop", new_secret(),
                        {"PRESENCE_LOG_LEVEL": "warning", "PRESENCE_DRAIN_TIMEOUT": str(drain)},
                        "--redis-url", f"redis://127.0.0.1:{redis_server.port}/0")
    redis_server.start()
    await gw.start(timeout=40)
    assert redis_server.proc is not None
    try:
        a = await gw.client("ann")
        await a.join("team:frozen")
        await a.update(status="busy")
        redis_server.proc.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        rc = await gw.stop(timeout=30)
        took = time.monotonic() - began
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        await gw.stop()
    assert rc == 0
    # 2 s of margin for the interpreter's exit on a loaded machine.
    assert took < drain + STOP_BUDGET + 2.0, (took, "".join(gw.log[-20:]))
