"""The bench's measurements, one function each; every one starts and stops its servers.

Each returns a JSON-able dict. Sizes come from :class:`Sizes` (``--quick`` shrinks them).
Every run is bounded: connect phases by ``Job.connect_timeout``, schedules by their
summed durations, servers by ``try/finally``.

Each takes an optional ``probe`` (:class:`loadtest.profiling.Probe`): it is begun on the
gateway process (the first one, with two) at the start of the window the measurement
is about and ended at its end, so that a profiler records just that window.

Propagation windows (``propagation``, ``cluster``) are followed by ``settle`` seconds
without updates, and preceded by as many after the warm-up: every delivery of an update
sent in the window is counted, none of the warm-up's, so that delivered against
expected (updates x (team - 1)) shows lost deliveries exactly. Server CPU per delivered
update is the gateways' CPU (``/proc/<pid>/stat``, summed) over the window and the
settle after it, divided by the deliveries.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtest import procs
from loadtest.profiling import Probe
from loadtest.stats import summary
from loadtest.wsload import Conn, Job, run_clients, split


@dataclass
class Sizes:
    procs: int = 2
    idle_conns: int = 10_000
    prop_clients: int = 2_000
    prop_rate: float = 1_000.0
    team: int = 20
    duration: float = 10.0
    warmup: float = 2.0
    settle: float = 1.0
    fanout_members: tuple[int, ...] = (250, 500, 1_000)
    fanout_publishers: int = 20
    fanout_duration: float = 5.0
    peer_clients: int = 1_000
    peer_rates: tuple[float, ...] = (250.0, 500.0, 1_000.0, 2_000.0, 4_000.0)
    peer_step: float = 4.0
    cluster_port: int = 7300
    acceptance_users: int = 2_000
    acceptance_duration: float = 60.0


QUICK = Sizes(procs=2, idle_conns=500, prop_clients=200, prop_rate=100.0, duration=4.0,
              warmup=1.0, fanout_members=(100, 200), fanout_publishers=5,
              fanout_duration=3.0, peer_clients=200, peer_rates=(100.0, 400.0), peer_step=3.0,
              acceptance_users=100, acceptance_duration=15.0)


def team_conns(prefix: str, n: int, team: int, senders: bool = True) -> list[Conn]:
    """``n`` distinct users, ``team`` per channel ``team:<prefix>-<k>``."""
    return [Conn(f"{prefix}-u{i}", f"team:{prefix}-{i // team}", senders) for i in range(n)]


def _connect_info(ready: list[dict[str, Any]]) -> dict[str, Any]:
    connected = sum(r["connected"] for r in ready)
    failures: dict[str, int] = {}
    for r in ready:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    t0 = min(r["t0"] for r in ready)
    t1 = max(r["t1"] for r in ready)
    times = [t for r in ready for t in r["connect_ms"]]
    client_cpu = sum(r.get("cpu_s", 0.0) for r in ready)
    return {"connected": connected, "failures": failures,
            "connect_rate": connected / max(t1 - t0, 1e-6),
            "connect_ms": summary(times), "connect_phase_s": t1 - t0,
            "client_cpu_us_per_connect": client_cpu / connected * 1e6 if connected else None}


class Window:
    """The gateways' CPU seconds between two offsets (s) from the workers' ``go``, and the
    probe (if any) begun and ended on the first gateway at those offsets.

    ``open`` is the ``after_go`` callback of :func:`run_clients`; ``close`` waits for the
    end (cut short when the clients are done early, e.g. on a failure) and returns the
    CPU seconds, None if a gateway could not be read.
    """

    def __init__(self, pids: list[int], start: float, end: float, probe: Probe | None = None,
                 label: str = "", counter: Callable[[], float | None] | None = None) -> None:
        self.pids, self.start, self.end = pids, start, end
        self.probe, self.label = probe, label
        self.cpu: float | None = None
        # counter: read at the window's two ends with the CPU (e.g. the frames a server
        # says it wrote); ``count`` is the difference, ``backlog_mb`` the machine's TCP
        # memory at the end.
        self.counter = counter
        self.count: float | None = None
        self.backlog_mb: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _cpu(self) -> float | None:
        try:
            return sum(procs.cpu_seconds(p) for p in self.pids)
        except (OSError, ValueError, IndexError):
            return None

    def _read(self) -> float | None:
        try:
            return self.counter() if self.counter is not None else None
        except (OSError, ValueError, KeyError):
            return None

    def _run(self, t0: float) -> None:
        self._done.wait(max(0.0, t0 + self.start - time.monotonic()))
        cpu0 = self._cpu()
        count0 = self._read()
        if self.probe is not None:
            self.probe.begin(self.pids[0], self.label)
        try:
            self._done.wait(max(0.0, t0 + self.end - time.monotonic()))
            cpu1 = self._cpu()
            count1 = self._read()
            self.backlog_mb = tcp_memory_mb()
            self.cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
            if count0 is not None and count1 is not None:
                self.count = count1 - count0
        finally:
            if self.probe is not None:
                self.probe.end()

    def open(self) -> None:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(self._t0,), daemon=True)
        self._thread.start()

    def close(self) -> float | None:
        if self._thread is not None:
            if time.monotonic() < self._t0 + self.end:
                self._done.set()  # the clients are done before the window's end
            self._thread.join(60)
        return self.cpu


def tcp_memory_mb() -> float | None:
    """The machine's TCP buffer memory now (``/proc/net/sockstat``, pages of 4 KiB): on
    a fan-out, mostly frames written and not yet read by the clients."""
    try:
        with open("/proc/net/sockstat") as fh:
            for line in fh:
                if line.startswith("TCP:"):
                    f = line.split()
                    return int(f[f.index("mem") + 1]) * 4 / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _merge_step(results: list[dict[str, Any]], *step_list: int) -> dict[str, Any]:
    """The counters of the given steps of every worker, added up."""
    steps = [r["steps"][i] for r in results for i in step_list]
    lat = [x for s in steps for x in s["latencies"]]
    return {"frames": sum(s["frames"] for s in steps), "diffs": sum(s["diffs"] for s in steps),
            "bytes": sum(s["bytes"] for s in steps),
            "entries": sum(s["entries"] for s in steps), "sent": sum(s["sent"] for s in steps),
            "latency_ms": summary(lat), "samples": lat}


def measure_idle(sz: Sizes, probe: Probe | None = None) -> dict[str, Any]:
    """(1) connections held and server RSS per idle connection; (2) connect rate.

    Two runs: ``hello`` only, and ``hello`` + ``join`` of a 20-member team channel (the
    real idle client). At most ``procs x 40`` connects are in flight: the gateway's
    listen backlog is asyncio's default of 100, and a burst above it costs SYN
    retransmits (1 s, 3 s, ...) that would measure the kernel, not the gateway. The
    probe records the connect phase of the ``hello`` + ``join`` run.
    """
    out: dict[str, Any] = {}
    for variant, join in (("hello", False), ("join", True)):
        out[variant] = _idle_run(sz, join, probe if join else None)
    j = out["join"]
    return {**j, "hello_only": out["hello"],
            "note": "connected: hello + join of one 20-member team channel"}


def _idle_run(sz: Sizes, join: bool, probe: Probe | None = None) -> dict[str, Any]:
    gw = procs.start_gateway(env={"PRESENCE_MAX_CONNECTIONS": str(sz.idle_conns + 1000)})
    box: dict[str, Any] = {}
    try:
        rss0 = procs.rss_kb(gw.pid)
        cpu0 = procs.cpu_seconds(gw.pid)

        def when_ready(ready: list[dict[str, Any]]) -> None:
            box["cpu"] = procs.cpu_seconds(gw.pid) - cpu0
            if probe is not None:
                probe.end()
            box["rss1"] = procs.rss_kb(gw.pid)
            box["gauge"] = procs.scrape(gw.admin_url, "presence_connections")

        conns = team_conns("idle", sz.idle_conns, sz.team, senders=False)
        if not join:
            for c in conns:
                c.channel = ""
        jobs = [Job("gateway", gw.ws_url, gw.secret, part, [(0.0, 0.5)], concurrency=40,
                    connect_timeout=150) for part in split(conns, sz.procs)]
        if probe is not None:
            probe.begin(gw.pid, "connect")
        try:
            ready, _ = run_clients(jobs, when_ready=when_ready, connect_timeout=150)
        finally:
            if probe is not None:
                probe.end()
    finally:
        gw.stop()
    info = _connect_info(ready)
    held = info["connected"]
    # The gateway's CPU from its start to every client connected (it idles while the
    # client processes boot): per connect, and as a share of the connect phase, which
    # says whether the gateway or the clients on the same two cores set the rate.
    cpu = box.get("cpu")
    info["server_cpu_us_per_connect"] = cpu / held * 1e6 if cpu is not None and held else None
    info["server_busy"] = (cpu / info["connect_phase_s"]
                           if cpu is not None and info["connect_phase_s"] > 0 else None)
    return {**info, "target": sz.idle_conns, "server_connections_gauge": box.get("gauge"),
            "rss_before_kb": rss0, "rss_after_kb": box.get("rss1"),
            "kb_per_connection": (box["rss1"] - rss0) / held if held else None}


def _propagation(urls: list[str], secret: str, sz: Sizes, prefix: str,
                 pids: list[int], admin_urls: list[str], concurrency: int = 100,
                 probe: Probe | None = None) -> dict[str, Any]:
    """Warm-up, settle, the measured window, settle (see the module docstring)."""
    conns = team_conns(prefix, sz.prop_clients, sz.team)
    parts = split(conns, max(sz.procs, len(urls)))
    jobs = []
    for i, part in enumerate(parts):
        rate = sz.prop_rate * len(part) / len(conns)
        jobs.append(Job("gateway", urls[i % len(urls)], secret, part,
                        [(rate, sz.warmup), (0.0, sz.settle), (rate, sz.duration),
                         (0.0, sz.settle)], concurrency=concurrency, track=True))
    start = sz.warmup + sz.settle
    window = Window(pids, start, start + sz.duration + sz.settle, probe, prefix)
    try:
        ready, results = run_clients(jobs, after_go=window.open)
    finally:
        cpu = window.close()
    measured = _merge_step(results, 2, 3)  # the window and the deliveries settling after it
    sent = _merge_step(results, 2)["sent"]
    # The gateway's own view (diff ts -> frame written), to tell server time from
    # time in the kernel and the clients; bucket upper bounds, first gateway only.
    server = procs.histogram_quantiles(admin_urls[0], "presence_propagation_seconds") \
        if admin_urls else {}
    tracked = _deliveries(results, 2)
    delivered = tracked["delivered"]
    return {**_connect_info(ready), "rate": sz.prop_rate, "channel_size": sz.team,
            "updates_sent": sent, "diffs_received": measured["frames"],
            "diffs_per_s": measured["frames"] / sz.duration,
            "expected_entries": tracked["expected"], "entries": delivered,
            "join_entries": measured["entries"], "deliveries": tracked,
            "latency_ms": measured["latency_ms"], "server_cpu_s": cpu,
            "cpu_us_per_delivery": cpu / delivered * 1e6 if cpu is not None and delivered
            else None, "cpu_window_s": sz.duration + sz.settle,
            "server_side_ms": {str(q): v * 1000 if v is not None else None
                               for q, v in server.items()},
            "dropped": sum(r["dropped"] for r in results), "samples": measured["samples"]}


def _deliveries(results: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """Per update sent in ``step``: how many of its receivers got it (tracked jobs).

    The receivers of an update are the other connected members of its sender's
    channel. ``delivered`` counts each (update, receiver) once, so that a join sent
    again (a repair, a re-seeded mirror) neither hides a loss nor counts twice; ``lost``
    includes the deliveries of updates the gateway refused (``refused``, by error
    code); ``extra`` would be receivers beyond the expected ones.
    """
    got: Counter[tuple[str, str]] = Counter()
    for r in results:
        for user, note, k in r.get("seen", []):
            got[(user, note)] += k
    channel = {u: ch for r in results for u, ch in r.get("joined", [])}
    members = Counter(channel.values())
    refused_code = {(user, note): code for r in results
                    for user, note, code in r.get("refused", [])}
    refused: Counter[str] = Counter()
    expected = delivered = lost = extra = with_loss = 0
    for r in results:
        for user, note in (r["sent_keys"][step] if r.get("sent_keys") else []):
            receivers = members[channel.get(user, "")] - 1
            c = got.get((user, note), 0)
            expected += receivers
            delivered += min(c, receivers)
            lost += max(receivers - c, 0)
            extra += max(c - receivers, 0)
            with_loss += c < receivers
            if (user, note) in refused_code:
                refused[refused_code[(user, note)]] += 1
    return {"expected": expected, "delivered": delivered, "lost": lost, "extra": extra,
            "updates_with_loss": with_loss, "refused_updates": sum(refused.values()),
            "refused_codes": dict(refused)}


def _single(sz: Sizes, prefix: str, probe: Probe | None = None) -> dict[str, Any]:
    gw = procs.start_gateway()
    try:
        return _propagation([gw.ws_url], gw.secret, sz, prefix, [gw.pid], [gw.admin_url],
                            probe=probe)
    finally:
        gw.stop()


def measure_propagation(sz: Sizes, probe: Probe | None = None) -> dict[str, Any]:
    """(3) propagation at ``prop_rate`` updates/s into ``team``-member channels."""
    return _single(sz, "prop", probe)


def measure_cluster(sz: Sizes, probe: Probe | None = None) -> dict[str, Any]:
    """(5) the same propagation through Redis Cluster across two gateways.

    Each run first measures one gateway process (memory backend) with the same load, so
    that p99 added and the ratio of CPU per delivered update (both gateways summed,
    against the one process) come from the same run. The probe records the first
    gateway of the cluster.
    """
    if not procs.cluster_script_exists():
        return {"skipped": f"{procs.CLUSTER_SCRIPT} does not exist yet"}
    single = _single(sz, "one")
    base = sz.cluster_port
    nodes = ",".join(f"127.0.0.1:{base + i}" for i in range(3))
    procs.cluster("start", base)
    gws: list[procs.Gateway] = []
    try:
        secret = secrets.token_hex(32)
        gws = [procs.start_gateway(secret, redis_cluster=nodes, node_id=f"bench-{i}")
               for i in range(2)]
        # Connects are paced (20 in flight per client process): a burst of joins makes
        # the subscriber's SSUBSCRIBE acks late and the backend flap (see the docs).
        out = _propagation([g.ws_url for g in gws], secret, sz, "clu", [g.pid for g in gws],
                           [g.admin_url for g in gws], concurrency=20, probe=probe)
    finally:
        for g in gws:
            g.stop()
        procs.cluster("stop", base)
    p99, p99_single = out["latency_ms"]["p99"], single["latency_ms"]["p99"]
    cpu, cpu_single = out["cpu_us_per_delivery"], single["cpu_us_per_delivery"]
    return {**out, "gateways": len(gws), "single": single,
            "p99_added_ms": p99 - p99_single if p99 is not None and p99_single is not None
            else None,
            "cpu_ratio": cpu / cpu_single if cpu is not None and cpu_single else None}


def measure_fanout(sz: Sizes, probe: Probe | None = None) -> dict[str, Any]:
    """(4) frames/s of one channel against bare ``websockets.broadcast()``, per size.

    The probe records the gateway's measured window at every size."""
    points: list[dict[str, Any]] = []
    bare = procs.start_module("loadtest.bare_server", ["--max-runtime", "900"])
    try:
        size = 200  # a one-join diff of this workload; corrected by each measured point
        for n in sz.fanout_members:
            points.append(_fanout_point(sz, n, bare, size, probe))
            size = points[-1]["payload_bytes"] or size
    finally:
        bare.stop()
    best = points[-1] if points else {}
    return {"points": points, "members": best.get("members"),
            "ratio": best.get("ratio"), "goal_ratio": 1.2}


def _fanout_point(sz: Sizes, n: int, bare: procs.PyServer, size: int,
                  probe: Probe | None = None) -> dict[str, Any]:
    """Bare broadcast first (the floor), then the gateway offered twice as much."""
    conns = [Conn(f"fan{n}-u{i}", f"team:fan-{n}") for i in range(n)]
    d = sz.fanout_duration
    bare_jobs = [Job("bare", f"ws://127.0.0.1:{bare.port}/", "", part, [(0.0, 1.0), (0.0, d)])
                 for part in split(conns, sz.procs)]
    b_ready, b_results, bare_cpu, bare_w = _bare_run(bare_jobs, bare, size, d)
    b = _merge_step(b_results, 1)
    bare_fps = b["frames"] / d
    # Offered to the gateway: twice the floor's frames/s (so that the gateway, not the
    # offer, is the limit when it is the faster), spread over publishers at 9
    # updates/s each (the quota is 10/s); coalesce_ms=0 so that one update is one diff
    # frame (merging would hide the fan-out cost).
    rate = max(10.0, 2.0 * bare_fps / max(n - 1, 1))
    pubs = min(n, max(1, math.ceil(rate / 9.0)))
    rate = min(rate, pubs * 9.0)
    for c in conns[:pubs]:
        c.send = True
    gw = procs.start_gateway(env={"PRESENCE_COALESCE_MS": "0"})
    try:
        parts = split(conns, sz.procs)
        jobs = []
        for part in parts:
            r = rate * sum(c.send for c in part) / pubs
            jobs.append(Job("gateway", gw.ws_url, gw.secret, part, [(r, 1.0), (r, d)],
                            light=True, pace=0.001))
        window = Window([gw.pid], 1.0, 1.0 + d, probe, str(n),
                        counter=lambda: _fanout_frames_written(gw.admin_url))
        try:
            ready, results = run_clients(jobs, after_go=window.open)
        finally:
            cpu = window.close()  # the measured window only
        gw_w = (window.count, window.backlog_mb)
        slow = procs.scrape(gw.admin_url, "presence_slow_consumer_closes_total")
    finally:
        gw.stop()
    g = _merge_step(results, 1)
    gw_fps = g["diffs"] / d
    gw_size = round(g["bytes"] / g["frames"]) if g["frames"] else None
    if gw_size and abs(gw_size - size) > 0.2 * size:
        # The gateway merges the changes of one loop tick, so its frames may be larger
        # than guessed: measure the floor again with the gateway's own frame size.
        size = gw_size
        b_ready, b_results, bare_cpu, bare_w = _bare_run(bare_jobs, bare, size, d)
        b = _merge_step(b_results, 1)
        bare_fps = b["frames"] / d
    # CPU per frame of each server over its measured window: the figure that other work
    # on the machine moves least (frames/s also depends on the CPU each one was given).
    gw_us = cpu / g["frames"] * 1e6 if cpu is not None and g["frames"] else None
    bare_us = bare_cpu / b["frames"] * 1e6 if bare_cpu is not None and b["frames"] else None
    # What each server says it wrote over its window, against what its clients read: a
    # server that writes faster than the clients (on the same two cores) read leaves
    # the difference unread in the kernel, and frames/s above measure the clients.
    gw_wps = gw_w[0] / d if gw_w[0] is not None else None
    bare_wps = bare_w[0] / d if bare_w[0] is not None else None
    return {"members": n, "publishers": pubs, "offered_updates_per_s": rate,
            "payload_bytes": size, "gateway_payload_bytes": gw_size,
            "gateway_latency_samples_from": "publishers only (receivers do not parse)",
            "gateway_connected": _connect_info(ready)["connected"],
            "bare_connected": _connect_info(b_ready)["connected"],
            "gateway_frames_per_s": gw_fps, "bare_frames_per_s": bare_fps,
            "ratio": gw_fps / bare_fps if bare_fps else None,
            "gateway_latency_ms": g["latency_ms"], "gateway_cpu_s": cpu,
            "gateway_cpu_us_per_frame": gw_us, "bare_cpu_s": bare_cpu,
            "bare_cpu_us_per_frame": bare_us,
            "cpu_ratio": bare_us / gw_us if bare_us and gw_us else None,
            "gateway_written_per_s": gw_wps, "bare_written_per_s": bare_wps,
            "written_ratio": gw_wps / bare_wps if gw_wps and bare_wps else None,
            "gateway_backlog_mb": gw_w[1], "bare_backlog_mb": bare_w[1],
            "gateway_dropped": sum(r["dropped"] for r in results),
            "slow_consumer_closes": slow,
            "bare_stats": _bare_stats(bare)}


def _fanout_frames_written(admin_url: str) -> float | None:
    """The frames a gateway has written to its clients less the frames it received:
    its diffs, without the one reply to each update of the fan-out's publishers."""
    got = procs.scrape_all(admin_url, ("presence_frames_sent_total",
                                       "presence_frames_received_total"))
    if got is None:
        return None
    return got["presence_frames_sent_total"] - got["presence_frames_received_total"]


def _bare_stats(bare: procs.PyServer) -> dict[str, Any]:
    """The bare server's ``/stats`` (loadtest/bare_server.py)."""
    stats: dict[str, Any] = json.loads(procs.http_get(f"http://127.0.0.1:{bare.port}/stats"))
    return stats


def _bare_run(jobs: list[Job], bare: procs.PyServer, size: int, d: float
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float | None,
                         tuple[float | None, float | None]]:
    """The bare server broadcasting ``size``-byte frames to ``jobs`` for ``d`` s (after
    a 1 s step of nothing); its CPU seconds over that window, and (frames it wrote in
    the window, TCP memory at its end in MB)."""
    window = Window([bare.pid], 1.0, 1.0 + d, counter=lambda: float(_bare_stats(bare)["frames"]))

    def go() -> None:
        window.open()
        procs.http_get(f"http://127.0.0.1:{bare.port}/start?size={size}&duration={d + 1.5}")

    try:
        ready, results = run_clients(jobs, after_go=go)
    finally:
        cpu = window.close()
    return ready, results, cpu, (window.count, window.backlog_mb)


def measure_peer(sz: Sizes, probe: Probe | None = None) -> dict[str, Any]:
    """(6) our gateway against python-socketio + AsyncRedisManager, stepped offered load.

    Server CPU is counted over the steps (not the connects); the probe records our
    gateway over the steps."""
    schedule = [(r, sz.peer_step) for r in sz.peer_rates]
    out: dict[str, Any] = {"clients": sz.peer_clients, "channel_size": sz.team}
    gw = procs.start_gateway()
    try:
        out["ours"] = _steps("gateway", gw.ws_url, gw.secret, sz, schedule, [gw.pid], probe)
    finally:
        gw.stop()
    redis = procs.start_redis()
    try:
        secret = secrets.token_hex(32)
        peer = procs.start_module("loadtest.peer_socketio",
                                  ["--redis", redis.url, "--secret", secret])
        try:
            out["peer"] = _steps("socketio", f"http://127.0.0.1:{peer.port}", secret, sz,
                                 schedule, [peer.pid])
        finally:
            peer.stop()
    finally:
        redis.stop()
    ours, theirs = out["ours"]["max_sustained"], out["peer"]["max_sustained"]
    out["ratio_sustained"] = ours / theirs if theirs else None
    cpu_ours, cpu_peer = out["ours"]["cpu_us_per_entry"], out["peer"]["cpu_us_per_entry"]
    out["ratio_cpu_efficiency"] = cpu_peer / cpu_ours if cpu_ours and cpu_peer else None
    out["goal_ratio"] = 3.0
    return out


def _steps(kind: str, url: str, secret: str, sz: Sizes, schedule: list[tuple[float, float]],
           pids: list[int], probe: Probe | None = None) -> dict[str, Any]:
    conns = team_conns(f"peer{kind[0]}", sz.peer_clients, sz.team)
    parts = split(conns, sz.procs)
    jobs = [Job(kind, url, secret, part,
                [(r * len(part) / len(conns), d) for r, d in schedule]) for part in parts]
    window = Window(pids, 0.0, sum(d for _, d in schedule), probe, "steps")
    try:
        ready, results = run_clients(jobs, after_go=window.open)
    finally:
        cpu = window.close()
    steps, total_entries, best = [], 0, 0.0
    for i, (rate, dur) in enumerate(schedule):
        s = _merge_step(results, i)
        expected = s["sent"] * (sz.team - 1)
        p99 = s["latency_ms"]["p99"]
        ok = bool(expected) and s["entries"] >= 0.9 * expected and p99 is not None \
            and p99 < 1000
        if ok:
            best = rate
        total_entries += s["entries"]
        steps.append({"offered": rate, "sent_per_s": s["sent"] / dur,
                      "delivered_per_s": s["entries"] / dur, "expected_per_s": expected / dur,
                      "latency_ms": s["latency_ms"], "sustained": ok,
                      "samples": s["samples"]})
    return {**_connect_info(ready), "steps": steps, "max_sustained": best,
            "server_cpu_s": cpu,
            "cpu_us_per_entry": cpu / total_entries * 1e6 if cpu is not None and total_entries
            else None,
            "dropped": sum(r["dropped"] for r in results)}
