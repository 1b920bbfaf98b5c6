"""Webhook delivery under load: events/s a local receiver gets, and the time from a
transition to its delivery.

    python -m loadtest.webhook_bench [--users 2000] [--rounds 3] [--runs 3]

Starts one gateway (memory backend) whose webhook points at an aiohttp receiver in this
process on 127.0.0.1, then, ``--rounds`` times, connects ``--users`` users (each joins a
channel of its own: ``user.online`` and ``channel.occupied``) and closes them again
(``user.offline`` and ``channel.vacated``), 100 at a time. The receiver checks every
signature and records each event with its arrival time. Printed: events delivered (of
those expected), events/s over the run, and p50 / p95 / max of arrival minus the event's
``at``. Bounded: every connect and wait has a timeout, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.auth import mint_token
from gateway.client import PresenceClient
from gateway.webhooks import sign
from loadtest import procs

HOOK_SECRET = secrets.token_urlsafe(16)


class Receiver:
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.bad = 0
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get("X-Presence-Timestamp", "")
        if request.headers.get("X-Presence-Signature") != sign(HOOK_SECRET, ts, body):
            self.bad += 1
            return web.Response(status=401)
        now = time.time() * 1000
        self.arrivals += [(now, e) for e in orjson.loads(body)["events"]]
        self.changed.set()
        return web.Response(status=204)


async def one_run(users: int, rounds: int) -> dict[str, float]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    secret = secrets.token_urlsafe(32)
    gw = await asyncio.to_thread(procs.start_gateway, secret, {
        "PRESENCE_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
        "PRESENCE_WEBHOOK_SECRET": HOOK_SECRET, "PRESENCE_MAX_CONNECTIONS": "20000"})
    sem = asyncio.Semaphore(100)
    t0 = time.monotonic()
    try:
        for r in range(rounds):
            async def cycle(i: int, r: int = r) -> PresenceClient:
                async with sem:
                    c = await PresenceClient.connect(
                        gw.ws_url, mint_token(secret, f"u{i}", ["*"]), timeout=10)
                    await c.join(f"team:c{i}")
                    return c
            clients = await asyncio.gather(*(cycle(i) for i in range(users)))

            async def close(c: PresenceClient) -> None:
                async with sem:
                    await c.close()
            await asyncio.gather(*(close(c) for c in clients))
        expected = 4 * users * rounds
        async with asyncio.timeout(60):
            while len(rec.arrivals) < expected:
                rec.changed.clear()
                await rec.changed.wait()
        elapsed = time.monotonic() - t0
    finally:
        await asyncio.to_thread(gw.stop, 10)
        await runner.cleanup()
    lags = sorted(now - e["at"] for now, e in rec.arrivals)
    return {"delivered": len(rec.arrivals), "expected": expected,
            "bad_signatures": rec.bad, "events_per_s": len(rec.arrivals) / elapsed,
            "lag_p50_ms": lags[len(lags) // 2], "lag_p95_ms": lags[int(len(lags) * 0.95)],
            "lag_max_ms": lags[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.webhook_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args(argv)
    runs = []
    for i in range(args.runs):
        figures = asyncio.run(asyncio.wait_for(one_run(args.users, args.rounds), 600))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in figures.items()),
              flush=True)
        runs.append(figures)
    if len(runs) > 1:
        print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.0f}"
                                     for k in runs[0]))
    return 0 if all(r["delivered"] == r["expected"] and not r["bad_signatures"]
                    for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
