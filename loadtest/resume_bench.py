"""Resume under load: a rolling restart of every gateway, and a reconnect storm.

    python -m loadtest.resume_bench rolling --clients 2000 --gateways 3 [--runs 3]
    python -m loadtest.resume_bench storm --clients 2000 --gateways 2 [--runs 3]

Each run starts its own 6-node Redis Cluster on 127.0.0.1 (``--base-port``, default
7600) and ``--gateways`` gateway processes, and connects ``--clients`` clients spread
over them, in teams of 20 whose members sit on different gateways. Every client joins
its team's channel, keeps its last resume token, and when its connection ends
reconnects (honouring the server's "reconnect in N s" hint, at most 1 s here) to a live
gateway with it. Every client records the diffs it receives.

* ``rolling``: each gateway in turn is SIGTERMed (it drains: 1012 and a hint), and
  started again once its clients are back elsewhere.
* ``storm``: every client's TCP connection is cut at the same moment (no close frame),
  and all of them reconnect at once.

Figures: clients resumed / not resumed, time from losing the connection to the resumed
``welcome`` (p50, p95, max), the time until 99 % are back, and the join/leave diffs
about resumed clients that anyone saw (the promise: none). With ``--runs`` the run is
repeated and each figure is printed for every run with the median. Everything is
bounded: connects, reconnects and waits time out, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway.auth import mint_token
from loadtest import procs

TEAM = 20
TIMEOUT = 10.0
HINT = re.compile(r"reconnect in ([0-9.]+)s")


@dataclass
class Client:
    """One resuming client (see the module docstring)."""

    user: str
    token: str
    ch: str
    resume: str | None = None
    ws: ClientConnection | None = None
    lost_at: float = 0.0
    back: list[float] = field(default_factory=list)  # seconds from loss to resumed
    results: list[bool] = field(default_factory=list)
    diffs: list[dict[str, Any]] = field(default_factory=list)
    online: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False

    async def open(self, url: str) -> None:
        ws = await connect(url, subprotocols=["presence.v1.json"],  # type: ignore[list-item]
                           open_timeout=TIMEOUT, ping_interval=None, compression=None)
        hello: dict[str, Any] = {"t": "hello", "token": self.token}
        if self.resume is not None:
            hello["resume"] = self.resume
        await ws.send(orjson.dumps(hello).decode())
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if welcome.get("t") != "welcome":
            await ws.close()
            raise ConnectionError(f"no welcome: {welcome}")
        if self.resume is not None:
            self.results.append(bool(welcome.get("resumed")))
            if welcome.get("resumed"):
                self.back.append(time.monotonic() - self.lost_at)
            else:  # start afresh: join again (a join diff others will see)
                await ws.send(orjson.dumps({"t": "join", "ch": self.ch}).decode())
        self.resume, self.ws = welcome["resume"], ws
        self.online.set()

    async def run(self, urls: list[str]) -> None:
        """Read until stopped; reconnect with the resume token whenever the socket ends."""
        while not self.stopping:
            assert self.ws is not None
            hint = 0.0
            try:
                async for raw in self.ws:
                    frame = orjson.loads(raw)
                    if frame.get("t") == "diff":
                        self.diffs.append(frame)
            except ConnectionClosed:
                pass
            self.lost_at = time.monotonic()
            self.online.clear()
            if self.stopping:
                return
            match = HINT.search(self.ws.close_reason or "")
            if match:
                hint = min(1.0, float(match.group(1)))
            await asyncio.sleep(hint + random.uniform(0, 0.2))  # the hint, and a spread
            deadline = time.monotonic() + 60
            while not self.stopping:
                with contextlib.suppress(OSError, TimeoutError, ConnectionError,
                                         ConnectionClosed, InvalidHandshake):
                    await self.open(random.choice(urls))
                    break
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(random.uniform(0.1, 0.5))  # backoff before retrying


@dataclass
class Run:
    clients: list[Client]
    gateways: list[procs.Gateway]
    urls: list[str]
    cluster: str
    secret: str
    env: dict[str, str]


async def setup(n: int, gateways: int, base_port: int) -> Run:
    await asyncio.to_thread(procs.cluster, "start", base_port)
    cluster = ",".join(f"127.0.0.1:{base_port + i}" for i in range(3))
    secret = secrets.token_urlsafe(32)
    env = {"PRESENCE_RESUME_TTL": "15", "PRESENCE_RECONNECT_JITTER": "1",
           "PRESENCE_DRAIN_TIMEOUT": "10", "PRESENCE_MAX_USER_CONNECTIONS": "10"}
    gws = [await asyncio.to_thread(procs.start_gateway, secret, env, cluster)
           for _ in range(gateways)]
    urls = [g.ws_url for g in gws]
    clients = [Client(f"u{i}", mint_token(secret, f"u{i}", ["team:*"]), f"team:t{i // TEAM}")
               for i in range(n)]
    sem = asyncio.Semaphore(100)

    async def join(i: int, c: Client) -> None:
        async with sem:
            await c.open(urls[i % len(urls)])  # a team's members on different gateways
            assert c.ws is not None
            await c.ws.send(orjson.dumps({"t": "join", "ch": c.ch, "ref": 1}).decode())

    await asyncio.gather(*(join(i, c) for i, c in enumerate(clients)))
    return Run(clients, gws, urls, cluster, secret, env)


async def settle(run: Run, tasks: list[asyncio.Task[None]]) -> None:
    """Wait until every join diff has arrived (each client sees the team mates that
    joined after it: TEAM * (TEAM - 1) / 2 joins seen per team)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = sum(len({u for d in c.diffs for u in d["joins"]}) for c in run.clients)
        if seen >= len(run.clients) * (TEAM - 1) / 2:
            break
        await asyncio.sleep(0.2)  # polling a figure of many clients
    await asyncio.sleep(0.5)  # the last diffs in flight
    for c in run.clients:
        c.diffs.clear()
    assert not any(t.done() for t in tasks)


async def all_back(run: Run, timeout: float = 120) -> float:
    """Seconds until 99 % of the clients are online again."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if sum(c.online.is_set() for c in run.clients) >= 0.99 * len(run.clients):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)  # polling a figure of many clients
    return float("nan")


async def rolling(run: Run) -> dict[str, float]:
    back: list[float] = []
    for i, gw in enumerate(list(run.gateways)):
        run.urls.remove(gw.ws_url)
        await asyncio.sleep(0.01)
        for c in run.clients:
            if c.ws is not None and c.ws.remote_address[1] == gw.port:
                c.online.clear()  # it will reconnect
        stopped = asyncio.ensure_future(asyncio.to_thread(gw.stop, 20))
        back.append(await all_back(run))
        await stopped
        again = await asyncio.to_thread(procs.start_gateway, run.secret, run.env, run.cluster)
        run.gateways[i] = again
        run.urls.append(again.ws_url)
    return {"back_99_s": max(back)}


async def storm(run: Run) -> dict[str, float]:
    for c in run.clients:
        if c.ws is not None and c.ws.transport is not None:
            c.online.clear()
            c.ws.transport.abort()
    return {"back_99_s": await all_back(run)}


async def one_run(mode: str, n: int, gateways: int, base_port: int) -> dict[str, float]:
    run = await setup(n, gateways, base_port)
    tasks = [asyncio.ensure_future(c.run(run.urls)) for c in run.clients]
    try:
        await settle(run, tasks)
        figures = await (rolling(run) if mode == "rolling" else storm(run))
        await asyncio.sleep(1.0)  # diffs a flap would cause arrive within the coalescing
        resumed = {c.user for c in run.clients if c.results and all(c.results)}
        times = sorted(t for c in run.clients for t in c.back)
        flaps = [(c.user, d) for c in run.clients for d in c.diffs
                 if resumed & (set(d["joins"]) | set(d["leaves"]))]
        for user, d in flaps[:3]:  # what a flap looked like, to find where it came from
            print(f"  diff seen by {user}: {orjson.dumps(d).decode()[:300]}", flush=True)
        seen = len(flaps)
        figures.update({
            "clients": n, "resumed": len(resumed),
            "not_resumed": sum(1 for c in run.clients if c.results and not all(c.results)),
            "reconnects": sum(len(c.results) for c in run.clients),
            "resume_p50_ms": 1000 * times[len(times) // 2] if times else float("nan"),
            "resume_p95_ms": 1000 * times[int(len(times) * 0.95)] if times else float("nan"),
            "resume_max_ms": 1000 * times[-1] if times else float("nan"),
            "diffs_about_resumed": seen,
        })
        return figures
    finally:
        for c in run.clients:
            c.stopping = True
            if c.ws is not None:
                with contextlib.suppress(Exception):
                    c.ws.transport.abort()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gw in run.gateways:
            await asyncio.to_thread(gw.stop, 5)
        await asyncio.to_thread(procs.cluster, "stop", base_port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.resume_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["rolling", "storm"])
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--base-port", type=int, default=7600)
    args = p.parse_args(argv)
    runs = []
    for i in range(args.runs):
        figures = asyncio.run(asyncio.wait_for(
            one_run(args.mode, args.clients, args.gateways, args.base_port), 600))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, int | float)
                                           and k != "back_99_s" else f"{k} {v:.2f}"
                                           for k, v in figures.items()), flush=True)
        runs.append(figures)
    if len(runs) > 1:
        keys = runs[0].keys()
        print("median: " + ", ".join(
            f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in keys))
    failed = any(r["diffs_about_resumed"] or r["not_resumed"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
