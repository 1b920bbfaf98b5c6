"""Resume across real gateway processes on the real Redis Cluster.

* a lost connection resumes on another gateway, and nobody sees a diff;
* a SIGKILLed gateway's clients reconnect elsewhere within the lease, resume, and are
  never swept;
* a rolling restart of three gateways (SIGTERM, start again, one after the other) with
  a couple of hundred clients that resume on the others: zero leave or join diffs about
  anyone who resumed.

The clients are :class:`Roamer`: a raw WebSocket client that keeps its last resume
token and, when its connection ends, reconnects to a live gateway with it (what the
Python and browser clients do), recording every diff it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.fixtures.processes import GatewayProcess, StartGateway

pytestmark = pytest.mark.redis

LEASE = 4.0
TIMEOUT = 10.0

Spawn = Callable[[str], Awaitable[GatewayProcess]]


@pytest_asyncio.fixture
async def spawn(cluster_gateways: StartGateway) -> Spawn:
    SIGNAL.reset()

    async def start(node_id: str) -> GatewayProcess:
        return await cluster_gateways(
            node_id, PRESENCE_NODE_LEASE=str(LEASE), PRESENCE_RESUME_TTL=str(LEASE),
            PRESENCE_RECONNECT_JITTER="1")
    return start


class Signal:
    """Set whenever any roamer of a test sees something; waits on a condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    def reset(self) -> None:
        """A new event for a new test (an Event belongs to one event loop)."""
        self._event = asyncio.Event()

    async def until(self, pred: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._event.clear()
                if pred():
                    return
                await self._event.wait()


SIGNAL = Signal()


class Roamer:
    """A client that resumes wherever it can (see the module docstring)."""

    def __init__(self, user: str, token: str, urls: Callable[[], list[str]]) -> None:
        self.user = user
        self.token = token
        self.urls = urls
        self.resume: str | None = None
        self.conn = ""
        self.results: list[bool] = []  # resumed or not, at each reconnect
        self.diffs: list[dict[str, Any]] = []
        self.joined: dict[str, dict[str, Any]] = {}
        self.team: set[str] = set()  # who its join snapshot showed
        self.ch = ""
        self.ws: ClientConnection | None = None
        self.refs = 0
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.online = asyncio.Event()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    async def open(self, url: str) -> None:
        ws = await connect(url, subprotocols=["presence.v1.json"],  # type: ignore[list-item]
                           open_timeout=TIMEOUT, ping_interval=None)
        hello: dict[str, Any] = {"t": "hello", "token": self.token}
        if self.resume is not None:
            hello["resume"] = self.resume
        await ws.send(orjson.dumps(hello).decode())
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert welcome["t"] == "welcome", welcome
        if self.resume is not None:
            self.results.append(bool(welcome.get("resumed")))
        self.resume, self.conn, self.ws = welcome["resume"], welcome["conn"], ws
        self.online.set()
        SIGNAL.notify()

    async def run(self) -> None:
        """Read until stopped, reconnecting (with resume) whenever the socket ends."""
        while not self.stopping:
            ws = self.ws
            assert ws is not None
            try:
                async for raw in ws:
                    self.on_frame(orjson.loads(raw))
            except ConnectionClosed:
                pass
            if self.stopping:
                return
            self.online.clear()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(random.uniform(0.05, 0.5))  # reconnect backoff
                with contextlib.suppress(OSError, TimeoutError, ConnectionClosed):
                    await self.open(random.choice(self.urls()))
                    break
            else:
                raise AssertionError(f"{self.user} could not reconnect")

    def on_frame(self, frame: dict[str, Any]) -> None:
        SIGNAL.notify()
        if frame["t"] == "diff":
            self.diffs.append(frame)
        elif frame["t"] == "joined" and frame.get("ref") is None:
            self.joined[frame["ch"]] = frame
        ref = frame.get("ref")
        fut = self.replies.pop(ref, None) if isinstance(ref, int) else None
        if fut is not None and not fut.done():
            fut.set_result(frame)

    async def request(self, **frame: Any) -> dict[str, Any]:
        await asyncio.wait_for(self.online.wait(), TIMEOUT)
        self.refs += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[self.refs] = fut
        assert self.ws is not None
        await self.ws.send(orjson.dumps({**frame, "ref": self.refs}).decode())
        return await asyncio.wait_for(fut, TIMEOUT)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        self.stopping = True
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            await asyncio.wait_for(self.task, TIMEOUT)

    def seen_about(self, users: set[str]) -> list[dict[str, Any]]:
        """Diffs that carried a join or a leave of one of ``users``."""
        return [d for d in self.diffs
                if users & set(d["joins"]) or users & set(d["leaves"])]


async def roamers(gw: GatewayProcess, n: int, ch: Callable[[int], str],
                  urls: Callable[[], list[str]], prefix: str) -> list[Roamer]:
    out = []
    for i in range(n):
        r = Roamer(f"{prefix}{i}", gw.token(f"{prefix}{i}"), urls)
        await r.open(gw.ws_url)
        r.start()
        r.ch = ch(i)
        reply = await r.request(t="join", ch=r.ch, meta={"status": "busy", "note": f"n{i}"})
        r.team.update(reply["presence"])
        out.append(r)
    return out


async def test_a_lost_connection_resumes_on_another_gateway(spawn: Spawn) -> None:
    g1, g2 = await spawn("r1"), await spawn("r2")
    watcher = Roamer("watcher", g2.token("watcher"), lambda: [g2.ws_url])
    await watcher.open(g2.ws_url)
    watcher.start()
    await watcher.request(t="join", ch="team:roam")
    (r,) = await roamers(g1, 1, lambda i: "team:roam", lambda: [g2.ws_url], "roamer")
    await SIGNAL.until(lambda: bool(watcher.seen_about({"roamer0"})))
    watcher.diffs.clear()
    first_conn = r.conn
    assert r.ws is not None
    r.ws.transport.abort()  # lost: no close frame
    await SIGNAL.until(lambda: bool(r.results) and "team:roam" in r.joined)
    assert r.results == [True] and r.conn == first_conn
    assert "team:roam" in r.joined
    assert r.joined["team:roam"]["presence"]["roamer0"][0]["note"] == "n0"
    await r.request(t="update", meta={"note": "after"})
    await SIGNAL.until(lambda: bool(watcher.seen_about({"roamer0"})))
    (diff,) = watcher.seen_about({"roamer0"})
    assert diff["leaves"] == {} and diff["joins"]["roamer0"][0]["note"] == "after"
    await r.stop()
    await watcher.stop()


async def test_a_killed_gateways_clients_resume_elsewhere_and_are_never_swept(
        spawn: Spawn) -> None:
    g1, g2 = await spawn("k1"), await spawn("k2")
    alive = [g1.ws_url, g2.ws_url]
    watcher = Roamer("watcher", g2.token("watcher"), lambda: [g2.ws_url])
    await watcher.open(g2.ws_url)
    watcher.start()
    await watcher.request(t="join", ch="team:crash")
    crowd = await roamers(g1, 20, lambda i: "team:crash", lambda: alive, "c")
    names = {r.user for r in crowd}
    await SIGNAL.until(lambda: {u for d in watcher.diffs for u in d["joins"]} >= names)
    watcher.diffs.clear()
    alive.remove(g1.ws_url)
    await g1.kill()
    await SIGNAL.until(lambda: all(r.results for r in crowd), 2 * TIMEOUT)
    assert all(r.results == [True] for r in crowd), [r.results for r in crowd]
    # Past the dead node's lease and the hold (both LEASE) and a sweep: nobody left.
    await asyncio.sleep(LEASE + 3)  # waiting for a deadline to pass: nothing to await
    assert watcher.seen_about(names) == []
    for r in crowd:
        await r.stop()
    await watcher.stop()


async def test_rolling_restart_shows_no_diff_about_resumed_clients(spawn: Spawn) -> None:
    gateways = [await spawn(f"roll{i}") for i in range(3)]
    live = {g.node_id: g for g in gateways}

    def urls() -> list[str]:
        return [g.ws_url for g in live.values()]

    crowd: list[Roamer] = []
    try:
        await rolling_restart(gateways, live, crowd, urls)
    finally:
        for r in crowd:
            r.stopping = True
            if r.task is not None:
                r.task.cancel()
        for g in gateways[3:]:  # the restarted ones (the fixture stops the first three)
            await g.stop()


async def rolling_restart(gateways: list[GatewayProcess], live: dict[str, GatewayProcess],
                          crowd: list[Roamer], urls: Callable[[], list[str]]) -> None:
    for k, g in enumerate(list(gateways)):
        crowd += await roamers(g, 70, lambda i, k=k: f"team:roll-{(i + k) % 7}", urls,
                               f"g{k}u")
    names = {r.user for r in crowd}
    # Everyone has joined, and seen every team mate's join, before the restarts; from
    # here on, no join or leave.
    teams: dict[str, set[str]] = {}
    for r in crowd:
        teams.setdefault(r.ch, set()).add(r.user)
    await SIGNAL.until(lambda: all(
        r.team | {u for d in r.diffs for u in d["joins"]} >= teams[r.ch] for r in crowd), 30)
    for r in crowd:
        r.diffs.clear()
    for g in list(gateways):
        moved = [r for r in crowd if r.ws is not None and r.ws.remote_address[1] == g.port]
        before = {r.user: len(r.results) for r in moved}
        del live[g.node_id]
        assert await g.stop() == 0
        await SIGNAL.until(lambda moved=moved, before=before: all(
            len(r.results) > before[r.user] and r.online.is_set() for r in moved), 30)
        again = GatewayProcess(g.node_id, g.secret, g.env, *g.args)
        await again.start()
        live[again.node_id] = again
        gateways.append(again)
    resumed = [r for r in crowd if r.results and all(r.results)]
    assert len(resumed) == sum(1 for r in crowd if r.results), [
        r.results for r in crowd if not all(r.results)]
    seen = [d for r in crowd for d in r.seen_about({x.user for x in resumed})]
    print(f"\nrolling restart: {len(crowd)} clients, {len(resumed)} resumed "
          f"({sum(len(r.results) for r in crowd)} reconnects), diffs seen about them: "
          f"{len(seen)}")
    if seen:  # what the gateways said about it, to find where the diffs came from
        for g in gateways:
            print(g.node_id, "".join(line for line in g.log if '"warning"' in line
                                     or '"error"' in line or 'gap' in line
                                     or 'reassert' in line or 'swept' in line)[-3000:])
        print("diffs:", [(r.user, d["ch"], d["ts"], sorted(d["joins"]), sorted(d["leaves"]))
                         for r in crowd for d in r.diffs][:5])
    assert seen == []
    assert names  # every client was among the observers
    for r in crowd:
        await r.stop()
