"""The reconnect storm of ``resume_bench`` with its clients spread over processes.

``python -m loadtest.resume_bench storm --procs P`` runs here (the scenario and the
figures are in that module's docstring). The parent starts the Redis Cluster and the
gateways as the one-process path does, then P spawned worker processes (asyncio on
uvloop when it is installed, the file-descriptor soft limit raised to the hard one).
Worker ``k`` holds the clients ``i`` with ``i % P == k``; client ``i`` first connects to
gateway ``i % gateways`` and joins team ``i // 20``, so a team spans gateways and
processes. The phases go over one pipe per worker, the parent asking and every worker
answering, each answer awaited a bounded time:

1. ``connect``: every client connects, says hello, joins and waits for ``joined`` (100
   in flight over all workers; a failed connect, or a join answered with an error, is
   retried twice), then reads and reconnects with its resume token as in the
   one-process path (which does not wait for ``joined``);
2. ``count``, polled: the distinct joins the clients saw, until every join diff has
   arrived; then ``clear`` forgets the diffs received so far;
3. ``cut`` with a ``time.monotonic()`` moment half a second ahead: at that moment every
   worker aborts all its transports (no close frame); ``online``, polled, counts the
   clients back, until all are (or 10 s past 99 %, or 120 s), then once more when
   ``resume_ttl`` + 2 s have passed since the cut (an expired hold's leaves, and the
   1012 of a resumed connection whose channel could not be subscribed, come by then);
4. ``report``: per client its resume results and the monotonic time of each
   ``welcome``, and every diff it received since ``clear``; the parent merges them
   (whether a diff is about a resumed client is only known across workers), and the
   times count from the common moment (CLOCK_MONOTONIC is system-wide on Linux);
5. ``stop``: every connection aborted, the worker exits; one still alive 15 s later
   is killed. The gateways and the cluster are stopped whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway.auth import mint_token
from loadtest import procs
from loadtest.resume_parts import (
    TEAM,
    TIMEOUT,
    Client,
    CpuMeter,
    gateway_report,
    join_diffs_expected,
    raise_nofile,
    reconnect_note,
    summarize,
)

CONNECTS_IN_FLIGHT = 100  # over all workers, as in the one-process path
CUT_AHEAD = 0.5  # seconds between choosing the cut moment and the cut
SETTLE_TIMEOUT = 60.0
BACK_TIMEOUT = 120.0
STRAGGLERS = 10.0  # seconds waited past 99 % back for the last clients
QUIET = 2.0  # seconds past resume_ttl after the cut before the figures are taken
ANSWER_TIMEOUT = 30.0


# -- worker process --------------------------------------------------------------------
class _Worker:
    def __init__(self, conn: Connection, spec: dict[str, Any]) -> None:
        self.conn = conn
        self.urls: list[str] = spec["urls"]
        self.concurrency: int = spec["concurrency"]
        self.connect_timeout: float = spec["connect_timeout"]
        self.clients = {i: Client(f"u{i}", mint_token(spec["secret"], f"u{i}", ["team:*"]),
                                  f"team:t{i // TEAM}") for i in spec["indices"]}
        self.tasks: list[asyncio.Task[None]] = []
        self.handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "connect": self.connect, "count": self.count, "clear": self.clear,
            "cut": self.cut, "online": self.online, "report": self.report}

    async def command(self, timeout: float) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.conn.poll, timeout):
            raise TimeoutError(f"no command from the parent in {timeout:.0f} s")
        cmd, arg = self.conn.recv()  # EOFError when the parent is gone
        return str(cmd), arg

    async def join(self, c: Client, refused: Counter[str]) -> None:
        """Join ``c``'s team channel and wait for ``joined``; an ``error`` answer is
        retried after its ``retry_after`` (twice; then ConnectionError)."""
        assert c.ws is not None
        for _attempt in range(3):
            await c.ws.send(orjson.dumps({"t": "join", "ch": c.ch, "ref": 1}).decode())
            while True:
                frame = orjson.loads(await asyncio.wait_for(c.ws.recv(), TIMEOUT))
                if frame.get("t") == "joined":
                    return
                if frame.get("t") == "diff":
                    c.diffs.append(frame)
                elif frame.get("t") == "error":
                    refused[str(frame.get("code"))] += 1
                    await asyncio.sleep(min(float(frame.get("retry_after") or 1.0), 5.0))
                    break
        raise ConnectionError(f"join of {c.ch} refused three times")

    async def connect(self, _: Any) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.concurrency)
        failures: Counter[str] = Counter()
        refused: Counter[str] = Counter()

        async def one(i: int, c: Client) -> None:
            async with sem:
                for _attempt in range(3):
                    try:
                        await c.open(self.urls[i % len(self.urls)])
                        await self.join(c, refused)
                        return
                    except (OSError, TimeoutError, ConnectionError, ConnectionClosed,
                            InvalidHandshake) as exc:
                        failures[type(exc).__name__] += 1
                        if c.ws is not None:
                            c.ws.transport.abort()
                        c.ws, c.resume = None, None  # the next attempt is a fresh hello
                        await asyncio.sleep(random.uniform(0.2, 1.0))

        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(i, c) for i, c in
                                                    self.clients.items())),
                                   self.connect_timeout)
        ok = [c for c in self.clients.values() if c.ws is not None]
        self.tasks = [asyncio.ensure_future(c.run(self.urls)) for c in ok]
        return {"connected": len(ok), "failures": dict(failures), "refused": dict(refused),
                "seconds": time.monotonic() - t0}

    async def count(self, _: Any) -> int:
        return sum(len({u for d in c.diffs for u in d.get("joins") or ()})
                   for c in self.clients.values())

    async def clear(self, _: Any) -> int:
        for c in self.clients.values():
            c.diffs.clear()
        return sum(t.done() for t in self.tasks)

    async def cut(self, moment: float) -> dict[str, float]:
        # + 1 ms: uvloop's timers step by 1 ms and may fire that much early
        await asyncio.sleep(max(0.0, moment - time.monotonic()) + 0.001)
        start = time.monotonic()
        for c in self.clients.values():
            if c.ws is not None and c.ws.transport is not None:
                c.online.clear()
                c.ws.transport.abort()
        return {"start": start, "end": time.monotonic()}

    async def online(self, _: Any) -> int:
        return sum(c.online.is_set() for c in self.clients.values())

    async def report(self, _: Any) -> dict[str, Any]:
        return {"clients": [(c.user, list(c.results), list(c.welcomed), list(c.errors))
                            for c in self.clients.values()],
                "diffs": [(c.user, d) for c in self.clients.values() for d in c.diffs]}

    async def close(self) -> None:
        for c in self.clients.values():
            c.stopping = True
            if c.ws is not None:
                with contextlib.suppress(Exception):
                    c.ws.transport.abort()
        for t in self.tasks:
            t.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 10)


async def _worker(conn: Connection, spec: dict[str, Any]) -> None:
    w = _Worker(conn, spec)
    conn.send(("booted", os.getpid()))
    try:
        while True:
            cmd, arg = await w.command(spec["idle_timeout"])
            if cmd == "stop":
                return
            try:
                answer: tuple[str, Any] = ("ok", await w.handlers[cmd](arg))
            except Exception as exc:
                answer = ("error", f"{cmd}: {type(exc).__name__}: {exc}")
            conn.send(answer)
    finally:
        await w.close()


def worker_main(conn: Connection, spec: dict[str, Any]) -> None:
    raise_nofile()
    procs.tune_client_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_worker(conn, spec))
    else:
        uvloop.run(_worker(conn, spec))


# -- parent ----------------------------------------------------------------------------
class Pool:
    """The worker processes and their pipes; :meth:`close` always ends them."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def _get(self, i: int, what: str, deadline: float) -> Any:
        conn = self.conns[i]
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"client process {i}: no answer to {what!r} in time")
        try:
            kind, data = conn.recv()
        except EOFError:
            self.procs[i].join(1)
            raise RuntimeError(f"client process {i} exited ({self.procs[i].exitcode}) "
                               f"during {what!r}") from None
        if kind == "error":
            raise RuntimeError(f"client process {i}: {data}")
        return data

    def booted(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [self._get(i, "boot", deadline) for i in range(len(self.conns))]

    def ask(self, cmd: str, arg: Any = None, timeout: float = ANSWER_TIMEOUT) -> list[Any]:
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            conn.send((cmd, arg))
        return [self._get(i, cmd, deadline) for i in range(len(self.conns))]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop", None))
        deadline = time.monotonic() + 15
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


def run(n: int, gateways: int, base_port: int, nprocs: int, env: dict[str, str],
        timeout: float = 600.0) -> tuple[dict[str, float], list[str]]:
    """One storm with ``n`` clients in ``nprocs`` processes; (figures, notes to print)."""
    end = time.monotonic() + timeout

    def left(cap: float) -> float:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the run took longer than {timeout:.0f} s")
        return min(cap, remaining)

    notes: list[str] = []
    gws: list[procs.Gateway] = []
    pool: Pool | None = None
    procs.cluster("start", base_port)
    try:
        cluster = ",".join(f"127.0.0.1:{base_port + i}" for i in range(3))
        secret = secrets.token_urlsafe(32)
        for _ in range(gateways):
            gws.append(procs.start_gateway(secret, env, cluster))
        urls = [g.ws_url for g in gws]
        connect_timeout = 60 + n / 50
        pool = Pool([{"indices": list(range(k, n, nprocs)), "urls": urls, "secret": secret,
                      "concurrency": -(-CONNECTS_IN_FLIGHT // nprocs),
                      "connect_timeout": connect_timeout, "idle_timeout": timeout}
                     for k in range(nprocs)])
        pids = pool.booted(left(60))

        connected = pool.ask("connect", timeout=left(connect_timeout + ANSWER_TIMEOUT))
        failures: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for c in connected:
            failures.update(c["failures"])
            refused.update(c["refused"])
        got = sum(c["connected"] for c in connected)
        if got < n:
            raise RuntimeError(f"only {got} of {n} clients connected ({dict(failures)})")
        notes.append(f"connect: {n} clients joined in "
                     f"{max(c['seconds'] for c in connected):.1f} s over {nprocs} processes"
                     + (f", failed attempts retried: {dict(failures)}" if failures else "")
                     + (f", joins refused then retried: {dict(refused)}" if refused else ""))

        expected, settle_end = join_diffs_expected(n), time.monotonic() + left(SETTLE_TIMEOUT)
        while (seen := sum(pool.ask("count", timeout=left(ANSWER_TIMEOUT)))) < expected:
            if time.monotonic() > settle_end:
                notes.append(f"settle: only {seen} of {expected} join diffs arrived")
                break
            time.sleep(0.5)  # polling a figure of many clients
        time.sleep(0.5)  # the last diffs in flight
        if done := sum(pool.ask("clear", timeout=left(ANSWER_TIMEOUT))):
            raise RuntimeError(f"{done} clients stopped reading before the storm")

        meter = CpuMeter({"gateways": [g.pid for g in gws],
                          f"clients ({nprocs} processes)": pids},
                         [base_port + i for i in range(6)])
        moment = time.monotonic() + CUT_AHEAD
        cuts = pool.ask("cut", moment, timeout=left(ANSWER_TIMEOUT))
        back_end, at_99 = time.monotonic() + left(BACK_TIMEOUT), None
        while time.monotonic() < back_end:
            online = sum(pool.ask("online", timeout=left(ANSWER_TIMEOUT)))
            if online >= n:
                break
            if at_99 is None and online >= 0.99 * n:
                at_99 = time.monotonic()
            if at_99 is not None and time.monotonic() - at_99 > STRAGGLERS:
                break
            time.sleep(0.1)  # polling a figure of many clients
        notes.insert(0, meter.stop())
        notes.insert(1, "cut: connections aborted from "
                        f"{1000 * (min(c['start'] for c in cuts) - moment):.0f} to "
                        f"{1000 * (max(c['end'] for c in cuts) - moment):.0f} ms after the "
                        "common moment")
        # Diffs a flap would cause arrive within the coalescing; a hold that expired
        # publishes its leaves resume_ttl after the loss, and a resumed connection whose
        # channel cannot be subscribed is closed (1012) after the join's 5 s wait: the
        # figures are taken once both had their time.
        ttl = float(env.get("PRESENCE_RESUME_TTL", "15"))
        time.sleep(left(max(1.0, moment + ttl + QUIET - time.monotonic())))
        online = sum(pool.ask("online", timeout=left(ANSWER_TIMEOUT)))
        notes.insert(2, f"online when the figures were taken ({time.monotonic() - moment:.1f}"
                        f" s after the cut): {online} of {n}")
        reports = pool.ask("report", timeout=left(60))

        records: list[tuple[str, list[bool], list[float]]] = []
        backs: list[float] = []
        diffs: list[tuple[str, dict[str, Any]]] = []
        errors: Counter[str] = Counter()
        fresh: list[float] = []
        for rep in reports:
            for user, results, welcomed, errs in rep["clients"]:
                after = [(w - moment, r) for w, r in zip(welcomed, results, strict=True)
                         if w >= moment]
                records.append((user, results, [t for t, r in after if r]))
                backs.append(after[0][0] if after else math.inf)
                fresh += [t for t, r in after if not r]
                errors.update(errs)
            diffs += rep["diffs"]
        notes.insert(3, reconnect_note(errors, fresh))
        backs.sort()
        back_99 = backs[max(0, math.ceil(0.99 * n) - 1)] if backs else math.inf
        figures: dict[str, float] = {"back_99_s": back_99 if back_99 < math.inf
                                     else float("nan")}
        figures.update(summarize(n, records, diffs))
        notes += gateway_report(gws)
        return figures, notes
    finally:
        if pool is not None:
            pool.close()
        for gw in gws:
            with contextlib.suppress(Exception):
                gw.stop(5)
        procs.cluster("stop", base_port)
