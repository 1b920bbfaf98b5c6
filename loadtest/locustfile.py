"""Locust scenarios for the presence gateway (gevent; no asyncio, uvloop or redis here).

Run from the repository root in the load venv, against a running gateway::

    PRESENCE_JWT_SECRET=... locust -f loadtest/locustfile.py --headless \\
        --host ws://127.0.0.1:8765 -u 2000 -r 200 -t 60s --scenario steady

Each Locust user is one distinct presence user (the gateway allows 10 connections and
100 joins a minute per user) holding one WebSocket (subprotocol ``presence.v1.json``):
``hello`` with a token minted here from ``PRESENCE_JWT_SECRET`` (pyjwt, HS256), ``join``
of a team channel ``team:lt-<n>`` (~20 users per team), then ``update`` every few
seconds and, rarely, a reconnect. A gevent greenlet per user reads frames.

Several gateways: ``--hosts ws://a,ws://b`` (or the environment variable
``LOADTEST_HOSTS``, the same comma-separated list) spreads the users over them, user
``i`` of a process on gateway ``i % N`` for all its connections; teams are consecutive
users, so the members of a team sit on different gateways. Without it every user
connects to ``--host``.

Recorded in Locust's tables and CSV (``events.request.fire``):

- ``WS connect``: connect + hello + welcome + join -> joined, in ms;
- ``WS reconnect`` / ``WS storm reconnect``: the same for reconnects (a storm reconnect
  that resumes has no join: connect + hello + welcome + the resume's ``joined``);
- ``RESUME resumed`` / ``RESUME not resumed``: in the ``storm`` scenario, whether the
  server took the resume token (PROTOCOL.md "Resume"), with the time from the drop to
  the channel being back (resumed: its snapshot; not resumed: the fresh join's reply).
  Not resumed is not a failure (a server with resume off answers so), only counted;
- ``DIFF propagation``: receipt time minus the diff's ``ts`` (ms), for every diff
  received (the gateway and the load generator share the clock here). Samples are
  buffered and fired in batches by one greenlet per process, every 0.5 s, so the
  receive loops stay cheap at high volume;
- failures: connect/hello/join errors, error replies, unexpected closes.

Scenarios (``--scenario``):

- ``steady``: team traffic, an update every 3-7 s per user;
- ``season``: June, 3x the update rate of ``steady`` (``--season-multiplier``);
- ``surge``: the 5-8 pm surge: ``-u`` users, then twice as many ramped in (LoadTestShape);
- ``storm``: every ``--storm-every`` s all users of a process drop their connections at
  once (no close frame: a network loss, which the server holds for ``resume_ttl``) and
  reconnect immediately, each with the resume token of its last ``welcome``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import time
from typing import Any

import gevent
import jwt
import orjson
import websocket
from gevent.lock import Semaphore
from locust import LoadTestShape, User, events, task
from locust.env import Environment
from locust.exception import StopUser

TEAM_SIZE = 20
SUBPROTOCOL = "presence.v1.json"
STATUSES = ("online", "away", "busy")
DEVICES = ("web", "mobile", "tablet")
HOSTS_ENV = "LOADTEST_HOSTS"

_ids = itertools.count()
_pending: list[tuple[str, str, float, int, BaseException | None]] = []
_users: set[PresenceUser] = set()
_flusher: gevent.Greenlet | None = None


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--scenario", choices=["steady", "season", "surge", "storm"],
                        default="steady", help="presence load scenario")
    parser.add_argument("--season-multiplier", type=float, default=3.0,
                        help="update-rate multiplier of the season scenario (June: 3)")
    parser.add_argument("--storm-every", type=float, default=20.0,
                        help="seconds between reconnect storms (storm scenario)")
    parser.add_argument("--team-size", type=int, default=TEAM_SIZE,
                        help="users per team channel")
    parser.add_argument("--hosts", env_var=HOSTS_ENV, default="",
                        help="comma-separated gateway URLs to spread the users over "
                             "(user i on gateway i %% N); empty: every user on --host")


def record(kind: str, name: str, ms: float, length: int = 0,
           exc: BaseException | None = None) -> None:
    """Queue one sample; the flusher greenlet fires it into Locust's statistics."""
    _pending.append((kind, name, ms, length, exc))


def _flush(environment: Environment) -> None:
    while True:
        gevent.sleep(0.5)
        _drain(environment)


def _drain(environment: Environment) -> None:
    batch = _pending[:]
    del _pending[: len(batch)]
    fire = environment.events.request.fire
    for kind, name, ms, length, exc in batch:
        fire(request_type=kind, name=name, response_time=ms, response_length=length,
             exception=exc, context={})


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    global _flusher
    if _flusher is None and not _is_master(environment):
        _flusher = gevent.spawn(_flush, environment)
    opts = environment.parsed_options
    if opts is not None and opts.scenario == "storm" and not _is_master(environment):
        gevent.spawn(_storms, float(opts.storm_every))


@events.test_stopping.add_listener
def _stopping(environment: Environment, **_: Any) -> None:
    _drain(environment)


def _is_master(environment: Environment) -> bool:
    from locust.runners import MasterRunner

    return isinstance(environment.runner, MasterRunner)


def _storms(every: float) -> None:
    """Drop every user's connection at once, every ``every`` seconds."""
    while True:
        gevent.sleep(every)
        users = list(_users)
        for u in users:
            u.storm_pending = True
        for u in users:
            u.drop()


def _worker_index(environment: Environment) -> int:
    runner = environment.runner
    return int(getattr(runner, "worker_index", 0) or 0) if runner is not None else 0


class PresenceUser(User):
    """One presence user on one WebSocket, in one team channel."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        self.scenario = opts.scenario if opts is not None else "steady"
        self.team_size = opts.team_size if opts is not None else TEAM_SIZE
        mult = opts.season_multiplier if opts is not None else 3.0
        self.rate_mult = mult if self.scenario == "season" else 1.0
        index = _worker_index(environment) * 1_000_000 + next(_ids)
        self.user = f"lt-{os.getpid()}-{index}"
        self.channel = f"team:lt-{index // self.team_size}"
        hosts = [h.strip() for h in str(getattr(opts, "hosts", "") or "").split(",")
                 if h.strip()]
        # User i on gateway i % N: a team's consecutive members land on different ones.
        base = (hosts[index % len(hosts)] if hosts
                else self.host or "ws://127.0.0.1:8765").rstrip("/")
        self.url = base if base.endswith("/ws") else base + "/ws"
        self.secret = os.environ.get("PRESENCE_JWT_SECRET", "")
        self.ws: websocket.WebSocket | None = None
        self.lock = Semaphore()
        self.reader: gevent.Greenlet | None = None
        self.storm_pending = False
        self.closing = False
        self.n = 0
        self.resume: str | None = None  # the resume token of the last welcome
        self.dropped_at = 0.0

    def wait_time(self) -> float:
        return random.uniform(3.0, 7.0) / self.rate_mult

    # -- connection ---------------------------------------------------------------
    def token(self) -> str:
        now = int(time.time())
        return jwt.encode({"sub": self.user, "channels": [self.channel], "role": "member",
                           "iat": now, "exp": now + 3600}, self.secret, algorithm="HS256")

    def connect(self, name: str, resume: str | None = None) -> bool:
        """Connect, hello (with ``resume`` when not empty), then join, unless the server
        resumed the connection: its channel then comes back as a ``joined`` with ``ref``
        null, and joining again would only cost a join. With ``resume`` given (even
        empty: the server gave no token) the outcome is recorded as ``RESUME``."""
        t0 = time.perf_counter()
        resumed = False
        try:
            # skip_utf8_validation: websocket-client validates UTF-8 in pure Python, which
            # took a quarter of the load generator's CPU (py-spy); orjson-made text is valid.
            ws = websocket.create_connection(self.url, subprotocols=[SUBPROTOCOL], timeout=30,
                                             enable_multithread=False, skip_utf8_validation=True)
            hello: dict[str, Any] = {"t": "hello", "token": self.token()}
            if resume:
                hello["resume"] = resume
            ws.send(json.dumps(hello))
            welcome = json.loads(ws.recv())
            if welcome.get("t") != "welcome":
                raise ConnectionError(f"hello answered with {welcome.get('t')!r}")
            token = welcome.get("resume")
            self.resume = token if isinstance(token, str) and welcome.get("resume_ttl") else None
            resumed = bool(resume) and welcome.get("resumed") is True
            if not resumed:
                meta = {"status": "online", "device": random.choice(DEVICES)}
                ws.send(json.dumps({"t": "join", "ref": 1, "ch": self.channel, "meta": meta}))
            while True:
                reply = json.loads(ws.recv())
                if reply.get("t") == "joined" and (not resumed or reply.get("ch") == self.channel):
                    break
                if reply.get("t") == "error":
                    raise ConnectionError(f"join refused: {reply.get('code')}")
            ws.settimeout(None)
        except Exception as exc:
            record("WS", name, (time.perf_counter() - t0) * 1000, 0, exc)
            return False
        record("WS", name, (time.perf_counter() - t0) * 1000)
        if resume is not None:
            since = self.dropped_at or t0
            record("RESUME", "resumed" if resumed else "not resumed",
                   (time.perf_counter() - since) * 1000)
        self.ws = ws
        self.reader = gevent.spawn(self.read_loop, ws)
        return True

    def read_loop(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                data = ws.recv()
            except Exception as exc:
                if not self.closing and not self.storm_pending and self.ws is ws:
                    record("WS", "unexpected close", 0, 0, exc)
                    self.ws = None
                break
            if not data:
                if not self.closing and not self.storm_pending and self.ws is ws:
                    record("WS", "unexpected close", 0, 0, ConnectionError("closed"))
                    self.ws = None
                break
            now = time.time() * 1000
            try:
                frame = orjson.loads(data)
            except ValueError as exc:
                record("WS", "bad frame", 0, len(data), exc)
                continue
            t = frame.get("t")
            if t == "diff" and isinstance(frame.get("ts"), int):
                record("DIFF", "propagation", max(0.0, now - frame["ts"]), len(data))
            elif t == "error":
                record("WS", f"error {frame.get('code')}", 0, 0,
                       RuntimeError(frame.get("message", "")))
        if self.storm_pending and not self.closing:
            self.storm_pending = False
            with self.lock:
                self.connect("storm reconnect", resume=self.resume or "")

    def drop(self) -> None:
        """Close the socket without the user noticing (a network drop: no close frame)."""
        ws = self.ws
        self.dropped_at = time.perf_counter()
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.shutdown()

    def close(self) -> None:
        """Close the socket: stop the reader first so that only one greenlet reads it."""
        self.closing = True
        ws, self.ws = self.ws, None
        reader, self.reader = self.reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=True, timeout=1)
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close(timeout=1)
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------
    def on_start(self) -> None:
        if not self.secret:
            raise StopUser("PRESENCE_JWT_SECRET is not set")
        _users.add(self)
        with self.lock:
            self.connect("connect")

    def on_stop(self) -> None:
        _users.discard(self)
        self.close()

    @task(20)
    def update(self) -> None:
        with self.lock:
            if self.ws is None:
                if not self.storm_pending:
                    self.connect("reconnect")
                return
            self.n += 1
            meta = {"status": STATUSES[self.n % 3], "note": f"update {self.n}"}
            try:
                self.ws.send(json.dumps({"t": "update", "meta": meta}))
            except Exception as exc:
                record("WS", "update", 0, 0, exc)
                self.ws = None

    @task(1)
    def reconnect(self) -> None:
        """Occasional reconnect: a phone changing networks, a tab reloaded."""
        if random.random() < 0.2 and not self.storm_pending:
            with self.lock:
                self.close()
                self.connect("reconnect")


class ScenarioShape(LoadTestShape):
    """The user count over time for every scenario (uses ``-u``, ``-r`` and ``-t``).

    ``surge`` ramps to ``-u`` users, holds a third of the run, then ramps in ``-u`` more
    (x2, the 5-8 pm peak) and holds; the others ramp to ``-u`` and hold. The shape ends
    the run at ``-t`` (default 60 s).
    """

    use_common_options = True  # -u, -r and -t are inputs of this shape, not conflicts

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options if self.runner else None
        users = int(getattr(opts, "num_users", None) or 100)
        rate = float(getattr(opts, "spawn_rate", None) or 50)
        run_time = float(getattr(opts, "run_time", None) or 60)
        scenario = getattr(opts, "scenario", "steady")
        now = self.get_run_time()
        if now >= run_time:
            return None
        if scenario == "surge" and now >= run_time / 3:
            return users * 2, rate
        return users, rate
