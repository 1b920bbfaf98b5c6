"""Chaos test: presence converges to the truth after every single fault.

    python -m loadtest.chaos --seed N --faults K [--base-port 7300] [--clients 60]
                             [--channels 8] [--classes a,b] [--json PATH]

Starts its own 6-node Redis Cluster (``config/redis-cluster/cluster.sh`` on ports
``base .. base+5``, default 7300 so it never meets the test fixture's 7100) and three
gateway processes (``presence serve``) on loopback, then drives ``--clients`` simulated
clients (``gateway.client.PresenceClient``) doing random joins, leaves, updates, clean
closes and abrupt drops (TCP abort). Meanwhile it injects ``--faults`` faults, every
class of :data:`CLASSES` at least once (the first six are a seeded permutation of them):

- ``kill_busy_master``: SIGKILL the master owning the most test channels;
- ``kill_idle_master``: SIGKILL a master owning none of them (the channels are chosen
  so that one slot range holds none);
- ``stop_master``: SIGSTOP a master past ``cluster-node-timeout`` (2 s), then SIGCONT;
- ``stop_gateway``: SIGSTOP a gateway past ``node_lease``, then SIGCONT;
- ``kill_gateway``: SIGKILL a gateway, start it again with the same ``--node-id``;
- ``restart_cluster``: restart the whole Redis Cluster empty.

After each fault has ended and a settle period of traffic, traffic pauses and the
invariant is polled until it holds (bounded by ``--converge-bound``): every ``/readyz``
is 200, and for every channel the snapshot a fresh client gets on each gateway, and the
mirror every open client built from its join snapshot and the diffs since, equal the
connections really open and joined, each with its latest status, device and note.
Killed Redis nodes are then restarted (they rejoin as replicas) and the next fault waits
until the cluster has six healthy nodes with every replica in sync.

Measured per fault: time to converge (from the end of the fault, and from the last
client action) and readiness downtime (per gateway, from injection to convergence). A
summary table per class is printed at the end. Exit status 0 when every fault
converged within the bound, 1 when one did not (the run stops there and prints what
differed), 2 when the set-up itself failed. Everything is seeded (the seed is printed),
every loop is bounded in count and time, and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from cluster import keys
from gateway.auth import mint_token
from gateway.client import ClientError, PresenceClient
from loadtest import procs
from presence.settings import LifetimeSettings

HOST = "127.0.0.1"
CLASSES = (
    "kill_busy_master",
    "kill_idle_master",
    "stop_master",
    "stop_gateway",
    "kill_gateway",
    "restart_cluster",
)
GATEWAYS = 3
LEASE = 4.0
READY_GRACE = 10.0
GATEWAY_ENV = {
    "PRESENCE_NODE_LEASE": str(LEASE),
    "PRESENCE_READY_GRACE": str(READY_GRACE),
    "PRESENCE_COALESCE_MS": "5",
    "PRESENCE_DRAIN_TIMEOUT": "3",
}
RESUME_TTL = 2.0
"""Lost connections are held this long for a resume (these clients never resume)."""
if "resume_ttl" in getattr(LifetimeSettings, "__dataclass_fields__", {}):
    GATEWAY_ENV["PRESENCE_RESUME_TTL"] = str(RESUME_TTL)
REQUEST_TIMEOUT = 12.0
"""A request waits this long for its reply: longer than a frozen gateway's pause, so a
request sent to it is answered after SIGCONT instead of being given up."""
CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 5.0
NO_CHANGE = frozenset({"rate_limited", "limit_exceeded", "not_joined"})
"""Error codes raised before a request changes anything: the model stays as it is.
Any other failure leaves the outcome unknown, so the client aborts its connection
(the truth becomes "not connected", which the servers must then converge to)."""
STATUSES = ("online", "away", "busy")
DEVICES = ("web", "mobile", "desktop")
PROBE_PREFIX = "probe-"

Triple = tuple[str, str, str]
View = dict[str, dict[str, Triple]]
"""user -> conn -> (status, device, note): a channel's presence as compared here."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- Redis


def _rc(port: int) -> redis.Redis:
    return redis.Redis(HOST, port, socket_timeout=1, socket_connect_timeout=1)


class RedisCluster:
    """The chaos run's own cluster: ``cluster.sh`` on ``base .. base+5``."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.ports = [base + i for i in range(6)]
        self.dir = Path(f"/tmp/presence-redis-cluster-{base}")

    @property
    def startup_nodes(self) -> str:
        return ",".join(f"{HOST}:{p}" for p in self.ports)

    def _script(self, action: str) -> None:
        res = subprocess.run(["bash", str(procs.CLUSTER_SCRIPT), action, str(self.base),
                              str(self.dir)], capture_output=True, timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"cluster.sh {action} failed: {res.stderr.decode()[-2000:]}")

    def start(self) -> None:
        """Start the missing nodes (a killed one rejoins from its nodes.conf) or create
        a fresh cluster; returns once cluster.sh says every node is ok and synced."""
        self._script("start")

    def stop(self) -> None:
        """SHUTDOWN NOSAVE every node (a paused one is resumed first) and drop the dir."""
        for p in self.ports:
            with contextlib.suppress(OSError, ValueError):
                os.kill(self.pid(p), signal.SIGCONT)
        self._script("stop")

    def pid(self, port: int) -> int:
        return int((self.dir / str(port) / "redis.pid").read_text().strip())

    def alive(self, port: int) -> bool:
        try:
            with _rc(port) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) as a live node sees it."""
        for p in self.ports:
            try:
                with _rc(p) as c:
                    slots = c.execute_command("CLUSTER SLOTS")
            except (redis.RedisError, OSError):
                continue
            return sorted((int(s), int(e), int(m[1])) for s, e, m, *_ in slots)
        raise RuntimeError("no cluster node answers")

    def healthy(self) -> bool:
        """Six nodes up, cluster_state ok with six known nodes each, three masters each
        with a replica, every replica's link up (else a kill takes the cluster down)."""
        masters = replicas = 0
        for p in self.ports:
            try:
                with _rc(p) as c:
                    info = c.execute_command("CLUSTER INFO")
                    repl = c.info("replication")
            except (redis.RedisError, OSError):
                return False
            fields = _info_fields(info)
            if fields.get("cluster_state") != "ok" or fields.get("cluster_known_nodes") != "6":
                return False
            if repl.get("role") == "master":
                masters += 1
                if int(repl.get("connected_slaves", 0)) < 1:
                    return False
            else:
                replicas += 1
                if repl.get("master_link_status") != "up":
                    return False
        return masters == 3 and replicas == 3

    async def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.healthy):
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster not healthy within {timeout} s")
            await asyncio.sleep(0.2)

    def signal(self, port: int, sig: signal.Signals) -> None:
        os.kill(self.pid(port), sig)


def _info_fields(info: Any) -> dict[str, str]:
    """CLUSTER INFO as a dict, whether redis-py parsed it or not."""
    if isinstance(info, dict):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def slot_range_of(slot: int, ranges: list[tuple[int, int, int]]) -> int:
    for i, (start, end, _m) in enumerate(ranges):
        if start <= slot <= end:
            return i
    raise RuntimeError(f"slot {slot} not covered")


def pick_channels(n: int, ranges: list[tuple[int, int, int]]) -> list[str]:
    """``n`` channel names whose slots avoid the last slot range (so one master owns
    none of them) and spread over the others."""
    quiet = len(ranges) - 1
    out: list[str] = []
    for i in range(10_000):
        ch = f"team:chaos{i}"
        if slot_range_of(keys.slot(keys.topic(ch)), ranges) != quiet:
            out.append(ch)
            if len(out) == n:
                return out
    raise RuntimeError("could not pick channels")


# --------------------------------------------------------------------------- gateways


class GatewayProc:
    """One gateway with fixed ports and node id, so a restart is the same node."""

    def __init__(self, idx: int, secret: str, cluster: str, logdir: Path,
                 log_level: str) -> None:
        self.idx = idx
        self.node_id = f"chaos-gw{idx}"
        self.secret = secret
        self.cluster = cluster
        self.port = procs.free_port()
        self.admin_port = procs.free_port()
        self.log_path = logdir / f"chaos-gw{idx}.log.tmp"
        self.env = {**GATEWAY_ENV, "PRESENCE_LOG_LEVEL": log_level}
        self.handle: procs.Gateway | None = None
        self.frozen = False

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    @property
    def ready_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}/readyz"

    @property
    def available(self) -> bool:
        """Where a client may connect: running and not frozen."""
        return (self.handle is not None and self.handle.proc.poll() is None
                and not self.frozen)

    async def start(self) -> None:
        self.handle = await asyncio.to_thread(
            procs.start_gateway, self.secret, self.env, self.cluster, self.node_id,
            20.0, self.port, self.admin_port, self.log_path)
        self.frozen = False

    def kill(self) -> None:
        assert self.handle is not None
        self.handle.proc.send_signal(signal.SIGKILL)
        self.handle.proc.wait(10)

    def freeze(self) -> None:
        assert self.handle is not None
        self.frozen = True
        self.handle.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.handle is not None
        self.handle.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(ProcessLookupError):
                self.handle.proc.send_signal(signal.SIGCONT)
            self.handle.stop(10)


# --------------------------------------------------------------------------- clients


class Gate:
    """Traffic on/off, and a count of client actions in flight (awaitable to zero)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.inflight = 0
        self.last_action = time.monotonic()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        self.last_action = time.monotonic()
        if self.inflight == 0:
            self.idle.set()

    async def quiesce(self, timeout: float) -> None:
        """Stop new actions and wait (bounded) until those in flight are done."""
        self.open.clear()
        await asyncio.wait_for(self.idle.wait(), timeout)


class Sim:
    """One simulated user's connection, and the model of what it really is: open or not,
    the channels it joined, its latest meta. The model changes only on a reply (or when
    the connection is gone), so it is the truth the servers must converge to."""

    def __init__(self, run: Run, slot: int, rng: random.Random) -> None:
        self.run = run
        self.slot = slot
        self.rng = rng
        self.gen = 0
        self.conn: PresenceClient | None = None
        self.user = ""
        self.joined: dict[str, Triple] = {}
        """Channel -> this connection's meta there: a join sets the joined channel's
        meta only, an update sets the meta of every channel joined."""
        self.actions = 0

    def refresh(self) -> None:
        """Notice a connection the server (or its death) has closed."""
        if self.conn is not None and self.conn.closed.is_set():
            self.forget()

    def forget(self) -> None:
        self.conn = None
        self.joined = {}

    @property
    def open(self) -> bool:
        self.refresh()
        return self.conn is not None

    async def loop(self, stop: asyncio.Event, max_actions: int) -> None:
        """Random actions while the gate is open, until ``stop`` or ``max_actions``."""
        while not stop.is_set() and self.actions < max_actions:
            await self.run.gate.open.wait()
            if stop.is_set():
                return
            self.run.gate.enter()
            try:
                await self.act()
            finally:
                self.run.gate.leave()
            self.actions += 1
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # think time, not a wait

    async def act(self) -> None:
        self.refresh()
        if self.conn is None:
            await self.connect()
            return
        choices: list[tuple[str, int]] = [("idle", 10), ("close", 4), ("drop", 4)]
        if len(self.joined) < 3:
            choices.append(("join", 30))
        if self.joined:
            choices += [("leave", 10), ("update", 35)]
        names, weights = zip(*choices, strict=True)
        what = self.rng.choices(names, weights)[0]
        if what == "join":
            ch = self.rng.choice(sorted(set(self.run.channels) - set(self.joined)))
            meta = self.random_meta()
            if await self.request(lambda c: c.join(ch, status=meta[0], device=meta[1],
                                                   note=meta[2])):
                self.joined[ch] = meta
        elif what == "leave":
            ch = self.rng.choice(sorted(self.joined))
            if await self.request(lambda c: c.leave(ch)):
                del self.joined[ch]
        elif what == "update":
            meta = self.random_meta()
            if await self.request(lambda c: c.update(status=meta[0], device=meta[1],
                                                     note=meta[2])):
                self.joined = dict.fromkeys(self.joined, meta)
        elif what == "close":
            conn, self.conn = self.conn, None
            self.joined = {}
            await conn.close()
        elif what == "drop":
            await self.drop()

    def random_meta(self) -> Triple:
        return (self.rng.choice(STATUSES), self.rng.choice(DEVICES),
                f"n{self.rng.randrange(1000)}")

    async def connect(self) -> None:
        gws = [g for g in self.run.gateways if g.available]
        if not gws:
            return
        gw = self.rng.choice(gws)
        self.gen += 1
        user = f"u{self.slot}x{self.gen}"
        token = mint_token(self.run.secret, user, ["*"], "member", ttl=7200)
        try:
            conn = await PresenceClient.connect(gw.ws_url, token, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ClientError, Exception):
            return
        self.conn, self.user, self.joined = conn, user, {}

    async def request(self, act: Callable[[PresenceClient], Awaitable[Any]]) -> bool:
        """Run one request; True when it was done. An unknown outcome drops the conn."""
        assert self.conn is not None
        try:
            await asyncio.wait_for(act(self.conn), REQUEST_TIMEOUT)
            return True
        except ClientError as exc:
            if exc.code in NO_CHANGE:
                return False
            self.run.counts["errors:" + exc.code] = self.run.counts.get(
                "errors:" + exc.code, 0) + 1
        except (TimeoutError, ConnectionError, Exception) as exc:
            name = "errors:" + type(exc).__name__
            self.run.counts[name] = self.run.counts.get(name, 0) + 1
        await self.drop()
        return False

    async def drop(self) -> None:
        """Abrupt end: abort the TCP connection (no close frame)."""
        conn, self.conn = self.conn, None
        self.joined = {}
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.ws.transport.abort()
            await conn.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    cls: str
    detail: str
    converged: bool
    converge_s: float
    """From the end of the fault to the first poll at which the invariant held."""
    quiet_s: float
    """From the last client action (traffic paused) to that poll."""
    ready_down_s: dict[int, float] = field(default_factory=dict)
    """Per gateway: seconds /readyz was not 200, from injection to convergence."""
    target_gw: int | None = None
    mismatch: str = ""


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed: int = args.seed
        self.rng = random.Random(self.seed)
        self.secret = secrets.token_hex(32)
        self.redis = RedisCluster(args.base_port)
        self.logdir = procs.RESULTS
        self.gateways: list[GatewayProc] = []
        self.channels: list[str] = []
        self.sims: list[Sim] = []
        self.gate = Gate()
        self.stop_traffic = asyncio.Event()
        self.ready_samples: dict[int, list[tuple[float, bool]]] = {}
        self.counts: dict[str, int] = {}
        self.probes = 0
        self.killed_redis: list[int] = []
        self.http: aiohttp.ClientSession | None = None

    # ---- invariant

    def truth(self) -> dict[str, View]:
        out: dict[str, View] = {ch: {} for ch in self.channels}
        for s in self.sims:
            if not s.open:
                continue
            assert s.conn is not None
            for ch, meta in s.joined.items():
                out[ch].setdefault(s.user, {})[s.conn.conn] = meta
        return out

    @staticmethod
    def view(presence: dict[str, list[dict[str, Any]]]) -> View:
        return {u: {str(m["conn"]): (str(m["status"]), str(m["device"]), str(m["note"]))
                    for m in metas}
                for u, metas in presence.items() if not u.startswith(PROBE_PREFIX)}

    async def ready(self, gw: GatewayProc) -> bool:
        assert self.http is not None
        try:
            async with self.http.get(gw.ready_url,
                                     timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def probe(self, gw: GatewayProc) -> dict[str, View]:
        """The snapshots a fresh client gets on ``gw`` for every channel."""
        self.probes += 1
        user = f"{PROBE_PREFIX}{self.probes}"
        token = mint_token(self.secret, user, ["*"], "member", ttl=600)
        client = await PresenceClient.connect(gw.ws_url, token, timeout=PROBE_TIMEOUT)
        try:
            out: dict[str, View] = {}
            for ch in self.channels:
                reply = await client.request({"t": "join", "ch": ch}, PROBE_TIMEOUT)
                out[ch] = self.view(reply["presence"])
            return out
        finally:
            await client.close()

    async def check(self, full: bool = False) -> str:
        """One poll of the invariant: "" when it holds, else what differs (the first
        problem, or with ``full`` every one found)."""
        problems: list[str] = []
        for gw in self.gateways:
            if not await self.ready(gw):
                problems.append(f"gw{gw.idx} /readyz is not 200")
                if not full:
                    return problems[0]
        truth = self.truth()
        for s in self.sims:
            if not s.open:
                continue
            assert s.conn is not None
            for ch in sorted(s.joined):
                state = s.conn.mirror.get(ch)
                got = self.view(state.to_wire()) if state is not None else {}
                # A connection gets no diff about its own changes: its own meta in its
                # mirror is the one of its join snapshot, so it is left out.
                want = without(truth[ch], s.user, s.conn.conn)
                got = without(got, s.user, s.conn.conn)
                if got != want:
                    problems.append(f"client {s.user} ({s.conn.conn}) mirror of {ch}: "
                                    + diff_views(want, got))
                    if not full:
                        return problems[0]
        for gw in self.gateways:
            try:
                snaps = await self.probe(gw)
            except Exception as exc:
                problems.append(f"gw{gw.idx} probe failed: {type(exc).__name__}: {exc}")
                if not full:
                    return problems[0]
                continue
            truth = self.truth()  # a server may have closed a connection meanwhile
            for ch in self.channels:
                if snaps[ch] != truth[ch]:
                    problems.append(f"gw{gw.idx} snapshot of {ch}: "
                                    + diff_views(truth[ch], snaps[ch]))
                    if not full:
                        return problems[0]
        return "\n  ".join(problems)

    async def converge(self, bound: float) -> tuple[bool, float, str]:
        """Poll the invariant until it holds or ``bound`` s pass; (held, time, last diff)."""
        start = time.monotonic()
        last = ""
        for _ in range(10_000):
            last = await self.check()
            if not last:
                return True, time.monotonic(), ""
            if time.monotonic() - start > bound:
                break
            await asyncio.sleep(0.25)  # poll cadence
        return False, time.monotonic(), await self.check(full=True)

    # ---- readiness monitor

    async def monitor_ready(self) -> None:
        while not self.stop_traffic.is_set():
            t = time.monotonic()
            oks = await asyncio.gather(*(self.ready(g) for g in self.gateways))
            for g, ok in zip(self.gateways, oks, strict=True):
                self.ready_samples.setdefault(g.idx, []).append((t, ok))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_traffic.wait(), 0.2)

    def downtime(self, idx: int, t0: float, t1: float) -> float:
        samples = [s for s in self.ready_samples.get(idx, []) if t0 <= s[0] <= t1]
        total = 0.0
        for (ta, ok), (tb, _ok) in zip(samples, [*samples[1:], (t1, True)], strict=True):
            if not ok:
                total += tb - ta
        return total

    # ---- faults

    def masters(self) -> dict[int, int]:
        """master port -> how many test channels it owns."""
        ranges = self.redis.slot_ranges()
        owners = {m: 0 for _s, _e, m in ranges}
        for ch in self.channels:
            owners[ranges[slot_range_of(keys.slot(keys.topic(ch)), ranges)][2]] += 1
        return owners

    async def inject(self, cls: str) -> tuple[float, str, int | None]:
        """Inject one fault; returns (time it ended, what was done, gateway hit)."""
        rng = self.rng
        if cls in ("kill_busy_master", "kill_idle_master"):
            owners = self.masters()
            if cls == "kill_busy_master":
                most = max(owners.values())
                port = rng.choice(sorted(p for p, n in owners.items() if n == most))
            else:
                idle = sorted(p for p, n in owners.items() if n == 0)
                if not idle:
                    raise RuntimeError(f"no master without test channels: {owners}")
                port = rng.choice(idle)
            self.redis.signal(port, signal.SIGKILL)
            self.killed_redis.append(port)
            return time.monotonic(), f"SIGKILL redis {port} ({owners[port]} channels)", None
        if cls == "stop_master":
            owners = self.masters()
            port = rng.choice(sorted(owners))
            hold = rng.uniform(4.0, 6.0)
            self.redis.signal(port, signal.SIGSTOP)
            try:
                await asyncio.sleep(hold)  # the fault's duration
            finally:
                self.redis.signal(port, signal.SIGCONT)
            return (time.monotonic(),
                    f"SIGSTOP redis {port} ({owners[port]} channels) {hold:.1f} s", None)
        if cls == "stop_gateway":
            gw = rng.choice(self.gateways)
            hold = LEASE + rng.uniform(2.0, 4.0)
            gw.freeze()
            try:
                await asyncio.sleep(hold)  # the fault's duration
            finally:
                gw.thaw()
            return time.monotonic(), f"SIGSTOP gw{gw.idx} {hold:.1f} s", gw.idx
        if cls == "kill_gateway":
            gw = rng.choice(self.gateways)
            down = rng.uniform(0.5, LEASE + 2.0)
            gw.kill()
            await asyncio.sleep(down)  # how long it stays dead
            await gw.start()
            return time.monotonic(), f"SIGKILL gw{gw.idx}, restarted after {down:.1f} s", \
                gw.idx
        if cls == "none":  # a baseline: no fault at all
            return time.monotonic(), "no fault", None
        if cls == "restart_cluster":
            await asyncio.to_thread(self.redis.stop)
            await asyncio.to_thread(self.redis.start)
            return time.monotonic(), "redis cluster restarted empty", None
        raise ValueError(cls)

    async def repair(self) -> None:
        """Bring killed Redis nodes back (they rejoin as replicas) and wait for health."""
        if self.killed_redis:
            await asyncio.to_thread(self.redis.start)
            self.killed_redis.clear()
        await self.redis.wait_healthy(60)
        for gw in self.gateways:
            if not gw.available:
                await gw.start()

    async def one_fault(self, n: int, cls: str) -> Result:
        rng = self.rng
        self.gate.open.set()
        await asyncio.sleep(rng.uniform(2.0, 4.0))  # traffic before the fault
        t_inject = time.monotonic()
        t_end, detail, target = await self.inject(cls)
        await asyncio.sleep(self.args.settle)  # traffic after the fault (settle period)
        await self.gate.quiesce(REQUEST_TIMEOUT + CONNECT_TIMEOUT + 5)
        t_quiet = self.gate.last_action
        held, t_hold, diff = await self.converge(self.args.converge_bound)
        res = Result(cls, detail, held, t_hold - t_end, t_hold - t_quiet,
                     {g.idx: self.downtime(g.idx, t_inject, t_hold) for g in self.gateways},
                     target, diff)
        down = " ".join(f"gw{i}:{d:.1f}" for i, d in res.ready_down_s.items())
        log(f"fault {n:>3} {cls:<17} {detail}: "
            + (f"converged {res.converge_s:.1f} s after (quiet {res.quiet_s:.1f} s)"
               if held else f"DID NOT CONVERGE within {self.args.converge_bound} s: {diff}")
            + f"; /readyz down {down}")
        return res

    # ---- the whole run

    def schedule(self) -> list[str]:
        classes = list(self.args.classes)
        first = classes[:]
        self.rng.shuffle(first)
        rest = [self.rng.choice(classes) for _ in range(self.args.faults - len(first))]
        return (first + rest)[: self.args.faults]

    async def main(self) -> int:
        args = self.args
        log(f"chaos: seed {self.seed}, {args.faults} faults, {args.clients} clients, "
            f"{args.channels} channels, redis {HOST}:{args.base_port}..{args.base_port + 5}")
        deadline = time.monotonic() + args.max_seconds
        results: list[Result] = []
        traffic: list[asyncio.Task[None]] = []
        monitor: asyncio.Task[None] | None = None
        rc = 0
        try:
            try:
                await asyncio.to_thread(self.redis.stop)
                await asyncio.to_thread(self.redis.start)
                await self.redis.wait_healthy(60)
                self.channels = pick_channels(args.channels, self.redis.slot_ranges())
                self.gateways = [GatewayProc(i, self.secret, self.redis.startup_nodes,
                                             self.logdir, args.log_level)
                                 for i in range(GATEWAYS)]
                for gw in self.gateways:  # a fresh log per run (restarts append)
                    gw.log_path.unlink(missing_ok=True)
                for gw in self.gateways:
                    await gw.start()
            except Exception as exc:
                log(f"set-up failed: {exc}")
                return 2
            self.http = aiohttp.ClientSession()
            monitor = asyncio.create_task(self.monitor_ready())
            self.sims = [Sim(self, i, random.Random(self.rng.getrandbits(64)))
                         for i in range(args.clients)]
            traffic = [asyncio.create_task(s.loop(self.stop_traffic, 100_000))
                       for s in self.sims]
            for n, cls in enumerate(self.schedule(), 1):
                if time.monotonic() > deadline:
                    log(f"time bound of {args.max_seconds} s reached before fault {n}")
                    rc = 1
                    break
                await self.repair()
                await self.gate.quiesce(REQUEST_TIMEOUT + CONNECT_TIMEOUT + 5)
                held, _t, diff = await self.converge(args.converge_bound)
                if not held:
                    log(f"invariant does not hold before fault {n} "
                        f"(after the repair of the previous one): {diff}")
                    rc = 1
                    break
                res = await self.one_fault(n, cls)
                results.append(res)
                if not res.converged:
                    rc = 1
                    self.dump_logs()
                    break
        finally:
            self.stop_traffic.set()
            self.gate.open.set()
            for t in traffic:
                t.cancel()
            await asyncio.gather(*traffic, return_exceptions=True)
            if monitor is not None:
                await asyncio.gather(monitor, return_exceptions=True)
            for s in self.sims:
                if s.conn is not None:
                    await s.conn.close()
            if self.http is not None:
                await self.http.close()
            for gw in self.gateways:
                await asyncio.to_thread(gw.stop)
            await asyncio.to_thread(self.redis.stop)
        print(summary(results, self))
        if args.json:
            data = json.dumps({"seed": self.seed, "faults": [r.__dict__ for r in results],
                               "counts": self.counts}, indent=1)
            await asyncio.to_thread(Path(args.json).write_text, data)
        if rc == 0 and len(results) < args.faults:
            rc = 1
        log(f"chaos: seed {self.seed}: " + ("PASS" if rc == 0 else "FAIL"))
        return rc

    def dump_logs(self) -> None:
        os.environ["LOADTEST_KEEP_LOGS"] = "1"  # the gateways' logs stay for a look
        for gw in self.gateways:
            print(f"--- gw{gw.idx} ({gw.node_id}) log tail: {gw.log_path}")
            if gw.handle is not None:
                print(gw.handle.log_tail(30))


def without(view: View, user: str, conn: str) -> View:
    """``view`` less one connection's meta."""
    out = {u: dict(cs) for u, cs in view.items()}
    if user in out:
        out[user].pop(conn, None)
        if not out[user]:
            del out[user]
    return out


def diff_views(want: View, got: View) -> str:
    missing = {(u, c) for u, cs in want.items() for c in cs} - \
        {(u, c) for u, cs in got.items() for c in cs}
    extra = {(u, c) for u, cs in got.items() for c in cs} - \
        {(u, c) for u, cs in want.items() for c in cs}
    stale = {(u, c, got[u][c], want[u][c]) for u, cs in want.items() for c in cs
             if u in got and c in got[u] and got[u][c] != want[u][c]}
    parts = []
    if missing:
        parts.append(f"missing {sorted(missing)[:8]}")
    if extra:
        parts.append(f"ghosts {sorted(extra)[:8]}")
    if stale:
        parts.append(f"stale (got, want) {sorted(stale)[:8]}")
    return "; ".join(parts)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):5.1f} / {max(values):5.1f}"


def summary(results: list[Result], run: Run) -> str:
    """The per-class table: converge and readiness downtime, median / max in seconds."""
    lines = [f"\nchaos summary, seed {run.seed}: {len(results)} faults, "
             f"{sum(r.converged for r in results)} converged",
             f"{'fault class':<17} {'n':>3} {'converge s':>13} {'after quiet s':>13} "
             f"{'ready down s':>13} {'target down s':>13}  (median / max)"]
    for cls in CLASSES:
        rs = [r for r in results if r.cls == cls]
        if not rs:
            continue
        others = [max((d for i, d in r.ready_down_s.items() if i != r.target_gw),
                      default=0.0) for r in rs]
        target = [r.ready_down_s[r.target_gw] for r in rs if r.target_gw is not None]
        failed = sum(not r.converged for r in rs)
        lines.append(f"{cls:<17} {len(rs):>3} {_fmt([r.converge_s for r in rs]):>13} "
                     f"{_fmt([r.quiet_s for r in rs]):>13} {_fmt(others):>13} "
                     f"{_fmt(target):>13}" + (f"  {failed} FAILED" if failed else ""))
    lines.append("ready down: the worst gateway other than the one the fault hit; "
                 "target down: the gateway the fault hit.")
    if run.counts:
        lines.append("client requests given up (connection aborted): "
                     + ", ".join(f"{k[7:]} {v}" for k, v in sorted(run.counts.items())))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--faults", type=int, default=len(CLASSES))
    p.add_argument("--base-port", type=int, default=7300)
    p.add_argument("--clients", type=int, default=60)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--classes", default=",".join(CLASSES),
                   help="comma-separated fault classes to draw from (default: all)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds of traffic after a fault before the invariant is polled")
    p.add_argument("--converge-bound", type=float, default=40.0,
                   help="seconds the invariant may take to hold after traffic pauses")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="bound of the whole run (default 60 + 90 per fault)")
    p.add_argument("--log-level", default="warning", help="the gateways' log level")
    p.add_argument("--json", default=None, help="write the per-fault results here")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    args.classes = [c for c in args.classes.split(",") if c]
    unknown = set(args.classes) - {*CLASSES, "none"}
    if unknown:
        p.error(f"unknown fault classes {sorted(unknown)}; known: {', '.join(CLASSES)}")
    if args.faults < len(args.classes):
        p.error(f"--faults must be at least {len(args.classes)}: every class at least once")
    if not 50 <= args.clients <= 100 and args.clients < 1:
        p.error("--clients must be positive")
    if args.max_seconds is None:
        args.max_seconds = 60 + 90 * args.faults
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(Run(args).main())


if __name__ == "__main__":
    sys.exit(main())
