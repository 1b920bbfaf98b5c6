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
repeated and each figure is printed for every run with the median. ``not_back``
counts the clients that had not reconnected at all when the figures were taken. After
each run, for a storm: the CPU seconds the gateways, the client process(es), the Redis
nodes and the whole machine used from the cut until the clients were back (the machine
is shared: what the others leave shows there), why reconnect attempts failed and when
the not-resumed welcomes came; for both modes one line per gateway with its resume,
leave, error-frame and close counters and the warnings and errors of its log.
``--backlog N`` sets the gateways' ``listen_backlog``. Everything is bounded: connects,
reconnects and waits time out, and the run stops by itself.

``--procs P`` (storm only) spreads the clients over P client processes
(``loadtest/resume_storm.py``; default 4 from 5,000 clients, else 1): at 10,000 clients
one asyncio process, not the gateways, would be what limits the figure. Client ``i``
still goes to gateway ``i % gateways`` and belongs to team ``i // 20``, and the clients
are dealt round-robin over the processes, so a team spans processes. Every process
aborts all its connections at one common moment (a ``time.monotonic()`` deadline:
CLOCK_MONOTONIC is system-wide on Linux), and the times to resumed and ``back_99_s``
are measured from that moment; with ``--procs 1`` everything runs in this process as
before, with the times to resumed measured from each client seeing its loss. The
storm waits for every client to be back (at most 10 s past the 99 %), and for
``resume_ttl`` + 2 s after the cut (an expired hold publishes its leaves by then),
before the figures are taken; a note says how many clients were online at that moment.

    python -m loadtest.resume_bench storm --clients 10000 --gateways 2 --procs 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import orjson

from gateway.auth import mint_token
from loadtest import procs, resume_storm
from loadtest.resume_parts import (
    TEAM,
    Client,
    CpuMeter,
    gateway_report,
    raise_nofile,
    reconnect_note,
    summarize,
)

# The gateways' settings for every run (``--backlog`` adds PRESENCE_LISTEN_BACKLOG). The
# defaults hold 10,000 clients on 2 gateways otherwise (max_connections 20,000 per
# process, under the descriptors' hard limit, which the gateway raises its soft one to).
GATEWAY_ENV = {"PRESENCE_RESUME_TTL": "15", "PRESENCE_RECONNECT_JITTER": "1",
               "PRESENCE_DRAIN_TIMEOUT": "10", "PRESENCE_MAX_USER_CONNECTIONS": "10"}


@dataclass
class Run:
    clients: list[Client]
    gateways: list[procs.Gateway]
    urls: list[str]
    cluster: str
    secret: str
    env: dict[str, str]
    cut_at: float = 0.0  # the storm's moment (monotonic)


async def setup(n: int, gateways: int, base_port: int, env: dict[str, str]) -> Run:
    await asyncio.to_thread(procs.cluster, "start", base_port)
    cluster = ",".join(f"127.0.0.1:{base_port + i}" for i in range(3))
    secret = secrets.token_urlsafe(32)
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
    run.cut_at = time.monotonic()
    for c in run.clients:
        if c.ws is not None and c.ws.transport is not None:
            c.online.clear()
            c.ws.transport.abort()
    return {"back_99_s": await all_back(run)}


async def one_run(mode: str, n: int, gateways: int, base_port: int,
                  env: dict[str, str]) -> tuple[dict[str, float], list[str]]:
    run = await setup(n, gateways, base_port, env)
    tasks = [asyncio.ensure_future(c.run(run.urls)) for c in run.clients]
    notes: list[str] = []
    try:
        await settle(run, tasks)
        if mode == "rolling":
            figures = await rolling(run)
        else:
            meter = await asyncio.to_thread(
                CpuMeter, {"gateways": [g.pid for g in run.gateways],
                           "clients (1 process)": [os.getpid()]},
                [base_port + i for i in range(6)])
            figures = await storm(run)
            notes.append(await asyncio.to_thread(meter.stop))
            notes.append(reconnect_note(
                Counter(e for c in run.clients for e in c.errors),
                [w - run.cut_at for c in run.clients
                 for w, r in zip(c.welcomed, c.results, strict=True) if not r]))
        await asyncio.sleep(1.0)  # diffs a flap would cause arrive within the coalescing
        figures.update(summarize(
            n, [(c.user, c.results, c.back) for c in run.clients],
            [(c.user, d) for c in run.clients for d in c.diffs]))
        notes += await asyncio.to_thread(gateway_report, run.gateways)
        return figures, notes
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
    p.add_argument("--procs", type=int, default=None,
                   help="client processes (storm only; default 4 from 5,000 clients, else 1)")
    p.add_argument("--backlog", type=int, default=None,
                   help="the gateways' listen_backlog (default: theirs, 2048; the kernel "
                        "caps it at net.core.somaxconn)")
    args = p.parse_args(argv)
    nprocs = args.procs or (4 if args.mode == "storm" and args.clients >= 5000 else 1)
    if nprocs < 1 or (nprocs > 1 and args.mode != "storm"):
        p.error("--procs: at least 1, and more than 1 only with storm")
    env = dict(GATEWAY_ENV)
    if args.backlog is not None:
        env["PRESENCE_LISTEN_BACKLOG"] = str(args.backlog)
    raise_nofile()
    runs = []
    for i in range(args.runs):
        if nprocs > 1:

            figures, notes = resume_storm.run(args.clients, args.gateways, args.base_port,
                                              nprocs, env, timeout=600)
        else:
            figures, notes = asyncio.run(asyncio.wait_for(
                one_run(args.mode, args.clients, args.gateways, args.base_port, env), 600))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, int | float)
                                           and k != "back_99_s" else f"{k} {v:.2f}"
                                           for k, v in figures.items()), flush=True)
        for line in notes:
            print(f"  {line}", flush=True)
        runs.append(figures)
    if len(runs) > 1:
        keys = runs[0].keys()
        print("median: " + ", ".join(
            f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in keys))
    failed = any(r["diffs_about_resumed"] or r["not_resumed"] or r["not_back"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
