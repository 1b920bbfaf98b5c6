"""The admin port under idle and half-sent requests (issue 10 item 4), from outside,
with raw sockets against a real gateway; a canary keeps calling ``GET /healthz``.

Before gateway/admin_server.py, a request whose headers never finished was held for
more than 100 s and connections were accepted without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

import gateway.admin_server as admin_server
import gateway.churn_api as churn_api
from tests.fixtures.servers import GatewayFactory, GatewayHandle

HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "  # never finished


class Canary:
    """Calls ``GET /healthz`` on fresh connections every 50 ms; records every outcome."""

    def __init__(self, gw: GatewayHandle) -> None:
        self.url = gw.admin_url + "/healthz"
        self.ok = 0
        self.failures: list[str] = []
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        connector = aiohttp.TCPConnector(force_close=True)  # a new socket every time
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            while True:
                start = time.monotonic()
                try:
                    async with s.get(self.url) as r:
                        await r.read()
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self.failures.append(f"status {r.status}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures.append(repr(exc))
                self.worst = max(self.worst, time.monotonic() - start)
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> Canary:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def assert_served(self) -> None:
        assert self.ok >= 3, self.failures
        assert self.failures == []
        assert self.worst < 1.5  # a fresh connection and a request, on a busy machine


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def sockets() -> AsyncIterator[list[Conn]]:
    """Raw client sockets, all closed at the end of the test whatever happened."""
    conns: list[Conn] = []
    yield conns
    for _, writer in conns:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)


async def connect(gw: GatewayHandle, conns: list[Conn], data: bytes = HALF_HEAD) -> Conn:
    conn = await asyncio.open_connection("127.0.0.1", gw.gateway.admin_port)
    conns.append(conn)
    conn[1].write(data)
    await conn[1].drain()
    return conn


def guard(gw: GatewayHandle) -> admin_server.ConnectionGuard:
    runner = gw.gateway.admin_runner
    assert runner is not None
    site = next(iter(runner.sites))
    assert isinstance(site, admin_server.AdminSite)
    return site.guard


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP response: head and body (by Content-Length), within 3 s."""
    async with asyncio.timeout(3):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head, await reader.readexactly(length)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes (EOF or reset) within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


@pytest.fixture
async def small(gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[GatewayHandle]:
    monkeypatch.setattr(admin_server, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(admin_server, "KEEPALIVE_TIMEOUT", 0.5)
    monkeypatch.setattr(admin_server, "MAX_CONNECTIONS", 20)
    monkeypatch.setattr(admin_server, "LINGERING_TIME", 0.5)
    monkeypatch.setattr(churn_api, "BODY_TIMEOUT", 0.5)
    yield await gateway_factory()


async def test_unfinished_headers_are_closed_within_the_deadline(
        small: GatewayHandle, sockets: list[Conn]) -> None:
    async with Canary(small) as canary:
        start = time.monotonic()
        for _ in range(5):
            await connect(small, sockets)
        for reader, _ in sockets:
            assert await closed_within(reader, 3.0)
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.3)  # a few more canary rounds after the closes
    assert 0.4 <= elapsed < 3.0
    assert guard(small).timed_out == 5
    canary.assert_served()


async def test_sockets_past_the_bound_are_closed_and_the_canary_is_served(
        small: GatewayHandle, sockets: list[Conn]) -> None:
    async with Canary(small) as canary:
        for _ in range(60):
            await connect(small, sockets)
        assert guard(small).open <= 20
        # The oldest waiting sockets were evicted as newer ones (and the canary) came in.
        closed = [await closed_within(r, 0.2) for r, _ in sockets[:40]]
        assert sum(closed) == 40
        assert guard(small).evicted >= 40
        await asyncio.sleep(0.3)
    canary.assert_served()


@pytest.mark.parametrize("second", [b"", HALF_HEAD], ids=["idle", "half-sent"])
async def test_keep_alive_connections_are_closed_after_the_bound(
        small: GatewayHandle, sockets: list[Conn], second: bytes) -> None:
    async with Canary(small) as canary:
        reader, writer = await connect(small, sockets, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(second)  # nothing more, or a second request that never finishes
        await writer.drain()
        assert await closed_within(reader, 3.0)
    canary.assert_served()


async def test_a_trickled_body_gets_408_and_the_connection_ends(
        small: GatewayHandle, sockets: list[Conn]) -> None:
    token = small.token("etl", role="service")
    async with Canary(small) as canary:
        reader, _ = await connect(
            small, sockets,
            b"POST /v1/churn HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: 1000\r\n\r\n{\"org\":")
        head, body = await read_response(reader)
        assert await closed_within(reader, 3.0)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b'"error":"request_timeout"' in body
    assert await small.node.store.churn_snapshot("acme", 10) == []
    canary.assert_served()
