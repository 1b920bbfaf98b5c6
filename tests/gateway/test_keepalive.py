"""The server's WebSocket keepalive (one task for every connection, gateway/keepalive.py)
keeps PROTOCOL.md's contract: it pings every ``ping_interval`` seconds and closes a
connection whose pong is late, with 1011 as websockets' own keepalive did.

The client is websockets' sans-I/O protocol over a raw socket, so the test sees every
ping and decides whether the pong goes out.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from gateway.keepalive import Keepalive
from gateway.transport import KEEPALIVE_PING, BoundedConnection
from tests.fixtures.servers import GatewayFactory, GatewayHandle

INTERVAL = 0.4
TIMEOUT = 0.4
BOUND = 10.0  # a hang fails here


@dataclass
class RawClient:
    """One WebSocket connection whose pongs go out only when :attr:`answer` is set."""

    protocol: ClientProtocol
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answer: bool = True

    @classmethod
    async def open(cls, gw: GatewayHandle, answer: bool) -> RawClient:
        protocol = ClientProtocol(parse_uri(gw.ws_url))
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw))
        client = cls(protocol, reader, writer, answer)
        protocol.send_request(protocol.connect())
        client._flush()
        while not any(isinstance(e, Response) for e in await client._read()):
            pass
        return client

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)

    async def _read(self) -> list[object]:
        data = await self.reader.read(65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        events: list[object] = list(self.protocol.events_received())
        outgoing = self.protocol.data_to_send()
        # The protocol queues a pong for every ping: it goes out only if we answer.
        if self.answer:
            for chunk in outgoing:
                if chunk:
                    self.writer.write(chunk)
        if not data:
            events.append(None)
        return events

    async def next_frame(self) -> Frame | None:
        """The next frame from the server; None at the end of the stream."""
        while True:
            for event in await self._read():
                if event is None or isinstance(event, Frame):
                    return event

    def close(self) -> None:
        self.writer.close()


def _port(gw: GatewayHandle) -> int:
    return int(gw.ws_url.rsplit(":", 1)[1].split("/", 1)[0])


async def _pings_and_end(client: RawClient, until: float) -> tuple[list[float], Frame | None]:
    """Arrival times of keepalive pings, and the close frame (or None at EOF or when
    ``until`` seconds have passed)."""
    pings: list[float] = []
    start = time.monotonic()
    try:
        async with asyncio.timeout(until):
            while True:
                frame = await client.next_frame()
                if frame is None:
                    return pings, None
                if frame.opcode is Opcode.PING and frame.data == KEEPALIVE_PING:
                    pings.append(time.monotonic() - start)
                elif frame.opcode is Opcode.CLOSE:
                    return pings, frame
    except TimeoutError:
        return pings, None


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> GatewayHandle:
    return await gateway_factory(ping_interval=INTERVAL, ping_timeout=TIMEOUT)


async def test_a_connection_that_answers_is_pinged_every_interval_and_kept(
        gw: GatewayHandle) -> None:
    client = await RawClient.open(gw, answer=True)
    try:
        pings, close = await _pings_and_end(client, 8 * INTERVAL)
    finally:
        client.close()
    assert close is None, f"closed although every ping was answered: {close}"
    # 8 intervals: a ping every interval, each late by at most one sweep (0.05 s), plus
    # the delays of a loaded machine (the bounds leave room for them, not for a ping
    # every sweep, nor for one every other interval).
    assert 4 <= len(pings) <= 8, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(INTERVAL * 0.9 <= g <= 2 * INTERVAL - 0.05 for g in gaps), gaps


async def test_a_connection_that_does_not_answer_is_closed_with_1011(
        gw: GatewayHandle) -> None:
    client = await RawClient.open(gw, answer=False)
    try:
        pings, close = await _pings_and_end(client, BOUND)
    finally:
        client.close()
    assert len(pings) == 1, pings
    assert close is not None, "no close frame for a connection that never answered"
    reason = Close.parse(close.data)
    assert (reason.code, reason.reason) == (1011, "keepalive ping timeout")


async def test_every_connection_of_the_node_is_swept(gw: GatewayHandle) -> None:
    """Silent clients among answering ones: only the silent ones are closed."""
    clients = [await RawClient.open(gw, answer=i % 2 == 0) for i in range(6)]
    try:
        results = await asyncio.gather(*(_pings_and_end(c, 6 * INTERVAL) for c in clients))
    finally:
        for c in clients:
            c.close()
    closed = [close is not None for _, close in results]
    assert closed == [False, True, False, True, False, True]


class _Probe(BoundedConnection):
    """A connection as the sweep sees it, without a socket: records its turns, or
    raises."""

    turns: ClassVar[list[str]] = []

    def __init__(self, name: str, fails: bool) -> None:  # no socket, no protocol
        self.name_ = name
        self.fails = fails

    __slots__ = ("fails", "name_")

    def keepalive_due(self, now: float, interval: float, timeout: float) -> bool | None:
        if self.fails:
            raise RuntimeError("broken connection")
        self.turns.append(self.name_)
        return True


def test_a_connection_that_raises_does_not_stop_the_sweep_of_the_others() -> None:
    probes = [_Probe("a", False), _Probe("b", True), _Probe("c", False)]
    _Probe.turns.clear()
    keepalive = Keepalive(lambda: probes, interval=1.0, timeout=1.0)
    assert keepalive.sweep(10.0) == (2, 0)
    assert _Probe.turns == ["a", "c"]


FROZEN_CLIENT = """
import asyncio, sys
from gateway.client import PresenceClient

async def main():
    c = await PresenceClient.connect(sys.argv[1], sys.argv[2], "json")
    await c.join("team:frozen", status="online")
    print("joined", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_frozen_client_process_is_closed_and_its_team_sees_it_leave(
        gateway_factory: GatewayFactory) -> None:
    """SIGSTOP of a real client process: its kernel keeps the TCP connection up (and
    even acknowledges what the server sends), so only the missing pong tells."""
    gw = await gateway_factory(ping_interval=INTERVAL, ping_timeout=TIMEOUT, resume_ttl=0)
    watcher = await gw.client("watcher")
    await watcher.join("team:frozen", status="online")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FROZEN_CLIENT, gw.ws_url, gw.token("frozen"),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), BOUND)
        assert line.strip() == b"joined"
        await watcher.wait_for(lambda e: e.get("t") == "diff" and "frozen" in e.get("joins", {}))
        proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        leave = await watcher.wait_for(
            lambda e: e.get("t") == "diff" and "frozen" in e.get("leaves", {}), BOUND)
        took = time.monotonic() - frozen_at
    finally:
        proc.kill()
        await proc.wait()
    assert leave["leaves"]["frozen"][0]["last_seen"] > 0
    # A ping within an interval, the pong timeout, the close grace (1 s), two sweeps.
    assert took < INTERVAL + TIMEOUT + 1.0 + 1.0, took
    assert not any(s.user == "frozen" for s in gw.node.sessions)
