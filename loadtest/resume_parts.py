"""The pieces of ``loadtest.resume_bench`` that its storm workers use too
(``loadtest/resume_storm.py``): the resuming client, the figures and the reports.

The client connects with a JWT, joins its team's channel, keeps its last resume token,
and when its connection ends reconnects (after the server's reconnect hint, if any, and
a spread) with that token; a refused resume joins afresh, which everyone sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import resource
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

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
    welcomed: list[float] = field(default_factory=list)  # monotonic time of each result
    errors: list[str] = field(default_factory=list)  # why each failed reconnect failed
    stage: str = ""  # what open() was waiting for
    diffs: list[dict[str, Any]] = field(default_factory=list)
    online: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False

    async def open(self, url: str) -> None:
        self.stage = "handshake"
        ws = await connect(url, subprotocols=["presence.v1.json"],  # type: ignore[list-item]
                           open_timeout=TIMEOUT, ping_interval=None, compression=None)
        self.stage = "welcome"
        hello: dict[str, Any] = {"t": "hello", "token": self.token}
        if self.resume is not None:
            hello["resume"] = self.resume
        try:
            await ws.send(orjson.dumps(hello).decode())
            welcome = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        except BaseException:
            ws.transport.abort()  # no socket left open behind a failed attempt
            raise
        now = time.monotonic()
        if welcome.get("t") != "welcome":
            await ws.close()
            raise ConnectionError(f"no welcome: {welcome}")
        if self.resume is not None:
            self.welcomed.append(now)
            self.results.append(bool(welcome.get("resumed")))
            if welcome.get("resumed"):
                self.back.append(now - self.lost_at)
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
                try:
                    await self.open(random.choice(urls))
                    break
                except (OSError, TimeoutError, ConnectionError, ConnectionClosed,
                        InvalidHandshake) as exc:
                    self.errors.append(f"{type(exc).__name__} at {self.stage}")
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(random.uniform(0.1, 0.5))  # backoff before retrying




def raise_nofile() -> None:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (a client process holds
    thousands of sockets); when the kernel refuses, the soft limit stays."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def join_diffs_expected(n: int) -> int:
    """Distinct joins the clients see once every join is through: each pair of team
    mates is seen once (by the earlier joiner; the later one has it in its snapshot)."""
    sizes = [min(TEAM, n - start) for start in range(0, n, TEAM)]
    return sum(m * (m - 1) // 2 for m in sizes)


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(len(sorted_values) * q)] if sorted_values else float("nan")


def summarize(n: int, records: list[tuple[str, list[bool], list[float]]],
              diffs: list[tuple[str, dict[str, Any]]]) -> dict[str, float]:
    """The figures of a run from every client's ``(user, resume results, seconds to each
    resumed welcome)`` and the ``(seer, diff)`` frames received after the settle."""
    resumed = {user for user, results, _ in records if results and all(results)}
    times = sorted(t for _, _, ts in records for t in ts)
    back = {user: ts for user, _, ts in records}
    flaps = [(seer, d) for seer, d in diffs
             if resumed & (set(d.get("joins") or ()) | set(d.get("leaves") or ()))]
    for user, d in flaps[:3]:  # what a flap looked like, to find where it came from
        about = sorted(resumed & (set(d.get("joins") or ()) | set(d.get("leaves") or ())))
        when = "; ".join(f"{u} resumed after {', '.join(f'{t:.2f}' for t in back[u])} s"
                         for u in about[:3])
        print(f"  diff seen by {user} ({when}): {orjson.dumps(d).decode()[:300]}",
              flush=True)
    return {
        "clients": n, "resumed": len(resumed),
        "not_resumed": sum(1 for _, results, _ in records if results and not all(results)),
        "reconnects": sum(len(results) for _, results, _ in records),
        "resume_p50_ms": 1000 * quantile(times, 0.5),
        "resume_p95_ms": 1000 * quantile(times, 0.95),
        "resume_max_ms": 1000 * times[-1] if times else float("nan"),
        "diffs_about_resumed": len(flaps),
        "not_back": sum(1 for _, results, _ in records if not results),
    }


def reconnect_note(errors: Counter[str], fresh: list[float]) -> str:
    """Why reconnect attempts failed, and when the not-resumed welcomes came (seconds
    after the cut: past ``resume_ttl`` the hold had expired)."""
    fresh = sorted(fresh)
    text = f"failed reconnect attempts: {dict(errors.most_common()) or 0}"
    if fresh:
        text += (f"; not-resumed welcomes {fresh[0]:.1f} / {quantile(fresh, 0.5):.1f} / "
                 f"{fresh[-1]:.1f} s (first / median / last) after the cut")
    return text


class CpuMeter:
    """CPU seconds used between ``__init__`` and :meth:`stop` by groups of processes
    (from /proc/<pid>/stat) and by the Redis nodes (their INFO cpu)."""

    def __init__(self, groups: dict[str, list[int]], redis_ports: list[int]) -> None:
        self.groups, self.redis_ports = groups, redis_ports
        self.t0, self.before = time.monotonic(), self._sample()

    @staticmethod
    def _machine() -> tuple[float, float]:
        """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        idle = ticks[3] + ticks[4]  # idle + iowait
        return (sum(ticks) - idle) / hz, sum(ticks) / hz

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError, IndexError):
            out["machine busy"], out["machine"] = self._machine()
        for name, pids in self.groups.items():
            out[name] = 0.0
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    out[name] += procs.cpu_seconds(pid)
        out["redis"] = 0.0
        for port in self.redis_ports:
            with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                info = subprocess.run(["redis-cli", "-p", str(port), "info", "cpu"],
                                      capture_output=True, text=True, timeout=3).stdout
                for line in info.splitlines():
                    if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                        out["redis"] += float(line.split(":", 1)[1])
        return out

    def stop(self) -> str:
        wall, after = time.monotonic() - self.t0, self._sample()
        used = {name: after[name] - self.before.get(name, after[name]) for name in after}
        total = used.pop("machine", 0.0)
        busy = used.pop("machine busy", 0.0)
        parts = [f"{name} {v:.1f} s" for name, v in used.items()]
        return (f"cpu over {wall:.1f} s of wall time: " + ", ".join(parts)
                + f"; the whole machine busy {busy:.1f} of {total:.1f} cpu-s"
                + f" ({os.cpu_count()} cores)")


def _labelled(text: str, metric: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line[len(metric) + 1:].rsplit(" ", 1)
            key = labels.rstrip("}").split('"')[1] if '"' in labels else labels
            out[key] = out.get(key, 0.0) + float(value)
    return out


def gateway_report(gws: list[procs.Gateway]) -> list[str]:
    """One line per gateway: its resume, leave, error-frame and close counters, and the
    warning and error events of its log (with the first line of anything not JSON)."""
    lines = []
    for gw in gws:
        try:
            text = procs.http_get(f"{gw.admin_url}/metrics", timeout=5)
        except OSError as exc:
            text = ""
            lines.append(f"gateway {gw.port}: no metrics ({exc})")
        counters = []
        for label, metric in (("resumes", "presence_resumes_total"),
                              ("leaves", "presence_leaves_total"),
                              ("error frames", "presence_errors_total"),
                              ("closes", "presence_closes_total")):
            values = {k: int(v) for k, v in _labelled(text, metric).items() if v}
            counters.append(f"{label} {values or '-'}")
        events: Counter[str] = Counter()
        first: dict[str, str] = {}  # the other fields of each event's first line
        other: list[str] = []
        with contextlib.suppress(OSError):
            for raw in gw.log_path.read_text(errors="replace").splitlines():
                try:
                    entry = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    entry = None
                if isinstance(entry, dict):
                    if entry.get("level") in ("warning", "error", "critical"):
                        key = f"{entry.get('level')} {entry.get('event')}"
                        events[key] += 1
                        first.setdefault(key, str({k: v for k, v in entry.items() if k not in
                                                   ("level", "event", "timestamp")})[:200])
                elif raw.strip() and not raw.startswith("presence: serving"):
                    other.append(raw.strip())
        logged = ", ".join(f"{k} x{v} (first: {first[k]})"
                           for k, v in events.most_common()) or "none"
        if other:
            logged += f"; {len(other)} other lines, first: {other[0][:160]}"
        lines.append(f"gateway {gw.port}: " + ", ".join(counters) + f"; log: {logged}")
    return lines
