"""Client worker processes of the bench driver (asyncio + uvloop, many sockets each).

A :class:`Job` lists the connections one worker process holds and the update schedule
it plays. Every worker goes through the same phases, each bounded in time:

1. *boot*: import, report ``booted``, wait for ``start`` (so that imports do not count
   in the connect rate);
2. *connect*: open every connection (gateway: WebSocket + ``hello`` + ``join``;
   socketio: connect + ``join`` call; bare: WebSocket only), report ``ready`` with the
   connect times;
3. *run*: wait for ``go``, then play ``schedule`` (a list of ``(updates/s, seconds)``
   steps spread over the connections marked as senders), counting every frame received
   and recording the propagation latency of every diff (receipt time minus its ``ts``,
   ms; the gateway and the workers share the clock) per step;
4. report ``result`` and close everything.

:func:`run_clients` runs a list of jobs in spawned processes and returns the reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.procs import tune_client_gc

STATUSES = ("online", "away", "busy")


@dataclass
class Conn:
    user: str
    channel: str = ""  # "" joins nothing
    send: bool = False


@dataclass
class Job:
    kind: str  # "gateway" | "socketio" | "bare"
    url: str
    secret: str = ""
    conns: list[Conn] = field(default_factory=list)
    schedule: list[tuple[float, float]] = field(default_factory=list)
    concurrency: int = 100
    connect_timeout: float = 60.0
    max_samples: int = 500_000
    # light: connections that send nothing count frames without parsing them (on a
    # fan-out they receive nothing but diffs), as the bare-server clients do.
    light: bool = False
    # Seconds between the sender loop's rounds: updates due in a round go out together,
    # and the gateway may merge what arrives in one loop tick into one diff.
    pace: float = 0.005
    # track: record which update (sender, note) each connection received, so that lost
    # deliveries are counted per update, not by join entries (a re-sent join of a
    # repair would hide a loss); updates then carry their number as ``ref``, and the
    # updates refused (an error reply) are recorded with the error's code.
    track: bool = False


@dataclass
class StepStats:
    frames: int = 0
    diffs: int = 0
    bytes: int = 0
    entries: int = 0
    sent: int = 0
    latencies: list[int] = field(default_factory=list)


class Worker:
    def __init__(self, job: Job, stop: Any = None) -> None:
        self.job = job
        self.stop = stop
        self.step = -1  # -1: not measuring yet
        self.steps = [StepStats() for _ in job.schedule]
        self.clients: list[Any] = []
        self.senders: list[Any] = []
        self.connect_ms: list[float] = []
        self.failures: dict[str, int] = {}
        self.dropped = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.session: Any = None  # the aiohttp session of socketio clients
        self.light: list[Any] = []  # websockets whose transport a FrameCounter reads
        self.parsing = 0  # connections whose frames are parsed
        self.user_of: dict[int, str] = {}  # id(sender) -> user
        self.sent_keys: list[list[tuple[str, str]]] = [[] for _ in job.schedule]
        self.seen: set[tuple[int, str, str]] = set()  # (receiver, sender, note), tracked
        self.refused: list[tuple[str, str, str]] = []  # (sender, note, code), tracked
        self.joined: list[tuple[str, str]] = []  # (user, channel) of every connection

    # -- receiving -------------------------------------------------------------------
    def on_frame(self, size: int, frame: dict[str, Any] | None, rid: int = 0) -> None:
        if not 0 <= self.step < len(self.steps):
            return  # before or after the measured schedule
        st = self.steps[self.step]
        st.frames += 1
        st.bytes += size
        if frame is None:
            st.diffs += 1
        elif frame.get("t") == "error" and self.job.track:
            ref = frame.get("ref")
            if isinstance(ref, int):
                self.refused.append((self.user_of.get(rid, ""), f"n{ref}",
                                     str(frame.get("code"))))
        elif frame.get("t") == "diff":
            st.diffs += 1
            ts = frame.get("ts")
            joins = frame.get("joins") or {}
            st.entries += sum(len(v) for v in joins.values())
            if self.job.track:
                for user, metas in joins.items():
                    for m in metas:
                        if isinstance(m, dict) and (note := m.get("note")):
                            self.seen.add((rid, user, note))
            if isinstance(ts, int) and len(st.latencies) < self.job.max_samples:
                st.latencies.append(int(time.time() * 1000) - ts)

    def on_frames(self, frames: int, nbytes: int) -> None:
        """Frames counted in bulk by a :class:`FrameCounter` (not parsed)."""
        if 0 <= self.step < len(self.steps):
            st = self.steps[self.step]
            st.frames += frames
            st.diffs += frames
            st.bytes += nbytes

    async def ws_reader(self, ws: Any, parse: bool) -> None:
        import orjson

        if not parse:
            # The socket is taken from websockets and its frames counted by header:
            # a fan-out measures the server, and websockets' client stack costs more
            # per frame than the server's write does (same clients for both servers).
            counter = FrameCounter(self)
            ws.transport.set_protocol(counter)
            self.light.append(ws)
            await counter.lost
            if 0 <= self.step < len(self.steps):
                self.dropped += 1
            return
        try:
            async for msg in ws:
                if parse:
                    self.on_frame(len(msg), orjson.loads(msg), id(ws))
                else:
                    self.on_frame(len(msg), None)
        except Exception:
            pass
        if self.step >= 0 and self.step < len(self.steps):
            self.dropped += 1

    # -- connecting ------------------------------------------------------------------
    def token(self, user: str, channel: str) -> str:
        import jwt

        now = int(time.time())
        chans = [channel] if channel else []
        return jwt.encode({"sub": user, "channels": chans, "iat": now, "exp": now + 3600},
                          self.job.secret, algorithm="HS256")

    async def open_gateway(self, c: Conn) -> Any:
        import orjson
        from websockets.asyncio.client import connect
        from websockets.typing import Subprotocol

        ws = await connect(self.job.url, subprotocols=[Subprotocol("presence.v1.json")],
                           compression=None, open_timeout=30, ping_interval=None,
                           close_timeout=2, max_size=2**20)
        await ws.send(orjson.dumps({"t": "hello", "token": self.token(c.user, c.channel)})
                      .decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
        if reply.get("t") != "welcome":
            raise RuntimeError(f"hello answered with {reply.get('t')}")
        if c.channel:
            await ws.send(orjson.dumps({"t": "join", "ref": 1, "ch": c.channel,
                                        "meta": {"status": "online", "device": "bench"}})
                          .decode())
            while True:
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                if reply.get("t") == "joined":
                    break
                if reply.get("t") == "error":
                    raise RuntimeError(f"join: {reply.get('code')}")
        # light: one sender per process parses what it gets (latency samples); the
        # rest, senders included, only count frames.
        parse = not self.job.light or (c.send and not self.parsing)
        self.parsing += parse
        self.tasks.append(asyncio.create_task(self.ws_reader(ws, parse=parse)))
        return ws

    async def open_bare(self, c: Conn) -> Any:
        from websockets.asyncio.client import connect

        ws = await connect(self.job.url, compression=None, open_timeout=30,
                           ping_interval=None, close_timeout=2, max_size=2**20)
        self.tasks.append(asyncio.create_task(self.ws_reader(ws, parse=False)))
        return ws

    async def open_socketio(self, c: Conn, session: Any) -> Any:
        import socketio

        sio = socketio.AsyncClient(reconnection=False, http_session=session)

        async def on_diff(data: dict[str, Any]) -> None:
            self.on_frame(0, data)

        sio.on("diff", on_diff)
        await sio.connect(self.job.url, transports=["websocket"],
                          auth={"token": self.token(c.user, c.channel)}, wait_timeout=30)
        if c.channel:
            reply = await sio.call("join", {"ch": c.channel,
                                            "meta": {"status": "online", "device": "bench"}},
                                   timeout=30)
            if not isinstance(reply, dict) or reply.get("t") != "joined":
                raise RuntimeError(f"join answered {reply!r}")
        return sio

    async def connect_all(self) -> None:
        sem = asyncio.Semaphore(self.job.concurrency)
        if self.job.kind == "socketio":
            import aiohttp

            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        session = self.session

        async def one(c: Conn) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    if self.job.kind == "gateway":
                        client = await self.open_gateway(c)
                    elif self.job.kind == "bare":
                        client = await self.open_bare(c)
                    else:
                        client = await self.open_socketio(c, session)
                except Exception as exc:
                    detail = exc if isinstance(exc, RuntimeError) else getattr(exc, "rcvd", "")
                    key = type(exc).__name__ + (f": {detail}" if detail else "")
                    self.failures[key[:120]] = self.failures.get(key[:120], 0) + 1
                    return
                self.connect_ms.append((time.perf_counter() - t0) * 1000)
                self.clients.append(client)
                self.joined.append((c.user, c.channel))
                if c.send:
                    self.senders.append(client)
                    self.user_of[id(client)] = c.user

        await asyncio.wait_for(asyncio.gather(*(one(c) for c in self.job.conns)),
                               self.job.connect_timeout)

    # -- sending ---------------------------------------------------------------------
    async def send_update(self, client: Any, n: int) -> None:
        meta = {"status": STATUSES[n % 3], "note": f"n{n}"}
        if self.job.kind == "socketio":
            await client.emit("update", {"meta": meta})
        else:
            import orjson

            msg: dict[str, Any] = {"t": "update", "meta": meta}
            if self.job.track:
                msg["ref"] = n
            await client.send(orjson.dumps(msg).decode())

    async def play(self) -> None:
        """Play the schedule; updates go round-robin over the senders at each step's rate."""
        order = list(self.senders)
        random.shuffle(order)
        n = 0
        for i, (rate, duration) in enumerate(self.job.schedule):
            self.step = i
            start = time.monotonic()
            end = start + duration
            sent_at_start = n
            while (now := time.monotonic()) < end:
                if self.stop is not None and self.stop.is_set():
                    break
                due = int(rate * (now - start)) - (n - sent_at_start)
                for _ in range(min(max(due, 0), 2000)):
                    if not order:
                        break
                    client = order[n % len(order)]
                    n += 1
                    if self.job.track:
                        self.sent_keys[i].append((self.user_of.get(id(client), ""), f"n{n}"))
                    with contextlib.suppress(Exception):
                        await self.send_update(client, n)
                self.steps[i].sent = n - sent_at_start
                await asyncio.sleep(self.job.pace)
        self.step = len(self.steps)  # stop counting

    async def close_all(self) -> None:
        for ws in self.light:
            # No close handshake: websockets no longer reads this socket.
            ws.transport.abort()
        light = set(map(id, self.light))

        async def close(client: Any) -> None:
            if id(client) in light:
                return
            with contextlib.suppress(Exception):
                if self.job.kind == "socketio":
                    await asyncio.wait_for(client.disconnect(), 3)
                else:
                    await asyncio.wait_for(client.close(), 3)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(close(c) for c in self.clients)), 20)
        for t in self.tasks:
            t.cancel()
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()


class FrameCounter(asyncio.Protocol):
    """Counts the data frames of a server-to-client WebSocket stream (unmasked frames)
    by their headers, without decoding them: a few operations per frame, where the
    websockets client stack costs tens of microseconds. Control frames are skipped."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buf = bytearray()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = frames = nbytes = 0
        end = len(buf)
        while end - pos >= 2:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if end - pos < head + length:
                break
            if buf[pos] & 0x0F in (1, 2):  # text or binary
                frames += 1
                nbytes += length
            pos += head + length
        del buf[:pos]
        if frames:
            self.worker.on_frames(frames, nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _worker_async(idx: int, job: Job, q: Any, start: Any, go: Any, stop: Any) -> None:
    loop = asyncio.get_running_loop()
    w = Worker(job, stop)
    q.put(("booted", idx, None))
    await loop.run_in_executor(None, start.wait, 120)
    t0, cpu0 = time.time(), time.process_time()
    try:
        await w.connect_all()
    except TimeoutError:
        w.failures["connect phase timed out"] = len(job.conns) - len(w.clients)
    t1, cpu1 = time.time(), time.process_time()
    q.put(("ready", idx, {"connected": len(w.clients), "failures": w.failures,
                          "connect_ms": w.connect_ms, "t0": t0, "t1": t1,
                          "cpu_s": cpu1 - cpu0}))
    if await loop.run_in_executor(None, go.wait, 300):
        await w.play()
    q.put(("result", idx, {
        "steps": [{"frames": s.frames, "diffs": s.diffs, "bytes": s.bytes,
                   "entries": s.entries,
                   "sent": s.sent, "latencies": s.latencies} for s in w.steps],
        "dropped": w.dropped,
        # tracked: the updates sent per step, and per update the receivers that got it
        "sent_keys": w.sent_keys if job.track else [],
        "refused": w.refused, "joined": w.joined if job.track else [],
        "seen": [[*k, c] for k, c in Counter((u, note) for _, u, note in w.seen).items()],
    }))
    await w.close_all()


def worker_main(idx: int, job: Job, q: Any, start: Any, go: Any, stop: Any) -> None:
    tune_client_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_worker_async(idx, job, q, start, go, stop))
    else:
        uvloop.run(_worker_async(idx, job, q, start, go, stop))


def _collect(q: Any, kind: str, n: int, timeout: float) -> dict[int, Any]:
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"only {len(out)}/{n} workers reported {kind!r} in {timeout} s")
        try:
            k, idx, data = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if k == kind:
            out[idx] = data
    return out


def run_clients(
    jobs: list[Job],
    when_ready: Callable[[list[dict[str, Any]]], Any] | None = None,
    after_go: Callable[[], Any] | None = None,
    connect_timeout: float = 120.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``jobs`` in one spawned process each; return (ready reports, results).

    ``when_ready`` runs once every worker has connected (e.g. to read the server's
    RSS), ``after_go`` right after the workers start their schedules (e.g. to tell a
    bare server to broadcast). Worker processes are always joined or killed.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start, go, stop = ctx.Event(), ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=worker_main, args=(i, job, q, start, go, stop), daemon=True)
             for i, job in enumerate(jobs)]
    for p in procs:
        p.start()
    try:
        _collect(q, "booted", len(jobs), 60)
        start.set()
        ready = _collect(q, "ready", len(jobs), connect_timeout + 10)
        ready_list = [ready[i] for i in range(len(jobs))]
        if when_ready is not None:
            when_ready(ready_list)
        go.set()
        if after_go is not None:
            after_go()
        longest = max((sum(d for _, d in job.schedule) for job in jobs), default=0.0)
        results = _collect(q, "result", len(jobs), longest + 60)
        return ready_list, [results[i] for i in range(len(jobs))]
    finally:
        stop.set()
        start.set()
        go.set()
        for p in procs:
            p.join(30)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def split(items: list[Conn], n: int) -> list[list[Conn]]:
    """Deal ``items`` over ``n`` workers so that each channel spans the workers."""
    return [items[i::n] for i in range(n)]
