"""Unit costs for the capacity model (docs/capacity.md), measured on a real Redis Cluster.

Usage (from the repository root, in the load venv)::

    python -m loadtest.capacity [--gateways 1,2,3] [--clients 2000] [--rate 1000]
                                [--duration 10] [--base-port 7900] [--procs 2]
                                [--coalesce-ms 0] [--out FILE]
    python -m loadtest.capacity --model [FILE]   # the fleet again from a capacity.json

A count may be repeated (``--gateways 1,2,3,1,2,3``): each is a point of its own.

Starts its own 6-node Redis Cluster on 127.0.0.1 (``base-port`` .. ``base-port + 5``,
stopped at the end whatever happens) and, for each gateway count N, N gateway processes
on the redis backend with the bench's propagation workload (``loadtest.measures``:
``clients`` clients in 20-member teams whose members are dealt over every gateway, so
every team has members on all N gateways, ``rate`` updates/s offered; warm-up, settle,
the measured window of ``duration`` s, settle, then an idle window with the same
connections and no updates). The gateways run with ``coalesce_ms`` = ``--coalesce-ms``
(default 0: one diff per change, as at the model's load, where a team changes 0.67
times a second; at this workload's 10 per second the product's 20 ms would merge
them). Between two counts every key is flushed, so that the next gateways find no
lease of the previous ones to sweep.

Measured for each N:

* over the window (and the settle after it, as the bench does): each gateway's CPU
  seconds (``/proc/<pid>/stat``), its frames and bytes in and out and broker messages in
  and out (its ``/metrics``), the deliveries its clients got (each (update, receiver)
  once) and the updates they sent; per Redis node the deltas of ``INFO``:
  ``total_commands_processed``, every ``cmdstat_*`` (calls and usec), ``used_cpu_sys`` +
  ``used_cpu_user``, ``total_net_input_bytes`` / ``total_net_output_bytes`` and the
  replication bytes;
* over the connect phase (hello + join of every client): each gateway's VmRSS after
  minus before per connection it holds, Redis ``used_memory`` and commands per
  connection, and every key's ``MEMORY USAGE`` grouped by kind (``user:{}:conns``,
  ``ch:{}:metas``, ...) per connection;
* over the idle window: the background CPU of each gateway and Redis node, of which
  the window's *net* figures are clear (the window's less the idle rate times its
  length);
* once, after the counts: Redis ``used_memory`` per sharded subscription (a client
  subscribing 2,000 channels of one master), Redis CPU per ``SPUBLISH`` and per message
  out (:func:`pubsub_fanout_cost`), and the gateway's memory per mirrored meta
  (``tracemalloc`` of hub channels with 20 metas each, in this process).

Unit costs derived: gateway CPU us per delivered update (per process and summed) and per
update sent, Redis commands, SPUBLISH and pub/sub messages out per update (per master
and in total), Redis CPU us per update, network bytes per update per master, KB per
connection. Then the model of docs/capacity.md (:func:`unit_costs`, :func:`fleet`) is
run on the :func:`representative` points and the fleet printed, with the autoscaling
policy's decision at its peak (:func:`policy_at`). Writes
``loadtest/results/capacity.json``; exit status 1 when a point lost deliveries or
missed a snapshot.

Everything is bounded: the client phases by ``loadtest.wsload``'s timeouts, every Redis
call by a socket timeout, the cluster script by its own; the gateways and the cluster
are stopped in ``finally`` blocks. Network: 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import secrets
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest import procs

RESULT = procs.RESULTS / "capacity.json"
HOST = "127.0.0.1"
TEAM = 20
ENGAGEMENT_COMMANDS = ("setbit", "pexpireat", "incr")
"""Written per connection per minute and per connect (cluster/engagement_redis.py), not
per update: left out of the per-update command count, modelled per connection."""


# -- the model (pure) --------------------------------------------------------------------


def distinct_gateways(members: int, gateways: int) -> float:
    """Expected number of gateways holding at least one of ``members`` connections placed
    independently and uniformly over ``gateways`` (the broker messages of one update)."""
    if gateways <= 1:
        return 1.0
    return gateways * (1.0 - (1.0 - 1.0 / gateways) ** members)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ``ys`` over ``xs``; slope 0 with one point."""
    if not xs or len(xs) != len(ys):
        raise ValueError("fit_line needs as many ys as xs, at least one")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


@dataclass
class Scenario:
    """The load to size for, and the utilisation targets (docs/capacity.md, "Load")."""

    users: int = 1_000_000  # concurrent, at the peak: season x3 and peak hour x2 included
    connections_per_user: float = 1.0
    update_interval_s: float = 30.0  # per connection, the base rate
    rate_factor: float = 1.0  # 6.0: season and peak hour multiply the per-user rate too
    team: int = TEAM
    channels_per_connection: int = 1
    gateway_cpu_target: float = 0.6  # of the one core a gateway process can use
    connections_per_gateway: int = 10_000  # DESIGN.md's per-process target
    gateway_memory_limit_mb: float = 1024.0  # the Deployment's limit
    gateway_memory_target: float = 0.8
    redis_cpu_target: float = 0.5  # of the one core a master's main thread can use
    engagement_commands_per_conn_s: float = 2 / 60  # SETBIT + PEXPIREAT a minute


@dataclass
class UnitCosts:
    """Measured unit costs the model reads (see :func:`unit_costs`)."""

    gw_us_per_update: float  # gateway CPU per update, all gateways, at 0 broker messages
    gw_us_per_broker_msg: float  # and per broker message received
    gw_idle_us_per_s: float  # a gateway's background CPU (us/s) at 0 connections
    gw_idle_us_per_conn_s: float  # and per connection it holds
    gw_kb_per_conn: float  # RSS per connection (hello + join), one mirrored meta included
    gw_base_mb: float  # RSS of a gateway holding nothing
    gw_mirror_bytes_per_meta: float  # a mirrored meta of a channel in the hub
    diff_bytes: float  # a diff frame to a client
    update_bytes: float  # an update frame from a client
    redis_us_per_update: float  # Redis CPU (every master) per update, at 0 messages out
    redis_us_per_msg_out: float  # and per pub/sub message delivered
    redis_us_per_command: float  # Redis CPU per command processed (engagement writes)
    redis_idle_us_per_s: float  # a master's background CPU (us/s)
    redis_cmds_per_update: float  # engagement writes left out, scripts' calls included
    redis_sent_per_update: float  # commands the gateways send per update
    redis_in_bytes_per_update: float
    redis_out_bytes_per_update: float  # at 0 messages out
    redis_out_bytes_per_msg: float  # per pub/sub message delivered
    redis_repl_bytes_per_update: float  # master -> replica
    redis_bytes_per_conn: float  # keys of one connection (hello + join)
    redis_bytes_per_subscription: float


def fleet(c: UnitCosts, s: Scenario) -> dict[str, Any]:
    """The load of scenario ``s`` and the fleet that carries it at the unit costs ``c``.

    Gateways: the most of the counts needed for CPU (at ``gateway_cpu_target`` of one
    core each; the broker messages per update grow with the fleet, see
    :func:`distinct_gateways`), for connections (``connections_per_gateway``) and for
    memory (``gateway_memory_target`` of the limit). Redis masters: for CPU at
    ``redis_cpu_target`` of one core each. Rates per second, bytes, MB.
    """
    conns = s.users * s.connections_per_user
    updates = conns * s.channels_per_connection / s.update_interval_s * s.rate_factor
    deliveries = updates * (s.team - 1)
    teams = conns * s.channels_per_connection / s.team

    def gw_cpu_cores(g: int) -> float:
        msgs = distinct_gateways(s.team, g)
        return (updates * (c.gw_us_per_update + c.gw_us_per_broker_msg * msgs)
                + g * c.gw_idle_us_per_s + conns * c.gw_idle_us_per_conn_s) / 1e6

    def gw_memory_mb(g: int) -> float:
        per_gw = conns / g
        channels = teams * (1.0 - (1.0 - 1.0 / g) ** s.team) if g > 1 else teams
        mirror = channels * s.team * c.gw_mirror_bytes_per_meta
        own = per_gw * (c.gw_kb_per_conn * 1024 - c.gw_mirror_bytes_per_meta)
        return c.gw_base_mb + (own + mirror) / 2**20

    by_conns = math.ceil(conns / s.connections_per_gateway)
    by_cpu = 1
    for _ in range(200):  # the smallest g that carries its own CPU: g grows, then stops
        need = max(1, math.ceil(gw_cpu_cores(by_cpu) / s.gateway_cpu_target))
        if need <= by_cpu:
            break
        by_cpu = need
    budget = s.gateway_memory_limit_mb * s.gateway_memory_target
    lo, hi = 1, 1_000_000  # memory per gateway falls as gateways are added: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if gw_memory_mb(mid) <= budget else (mid + 1, hi)
    by_memory = lo
    gateways = max(by_conns, by_cpu, by_memory)
    msgs = distinct_gateways(s.team, gateways)
    subscriptions = teams * msgs

    eng_cmds = conns * s.engagement_commands_per_conn_s
    redis_work = (updates * (c.redis_us_per_update + c.redis_us_per_msg_out * msgs)
                  + eng_cmds * c.redis_us_per_command) / 1e6
    masters = max(1, math.ceil(redis_work / (s.redis_cpu_target - c.redis_idle_us_per_s / 1e6)))
    redis_cores = redis_work + masters * c.redis_idle_us_per_s / 1e6
    commands = updates * c.redis_cmds_per_update + eng_cmds
    redis_mem = conns * c.redis_bytes_per_conn + subscriptions * c.redis_bytes_per_subscription
    out_per_update = c.redis_out_bytes_per_update + c.redis_out_bytes_per_msg * msgs
    return {
        "load": {
            "connections": conns, "updates_per_s": updates, "deliveries_per_s": deliveries,
            "teams": teams, "broker_messages_per_update": msgs,
            "pubsub_messages_per_s": updates * msgs,
        },
        "gateways": {
            "count": gateways, "by_cpu": by_cpu, "by_connections": by_conns,
            "by_memory": by_memory,
            "cpu_cores_total": gw_cpu_cores(gateways),
            "cpu_per_gateway": gw_cpu_cores(gateways) / gateways,
            "us_per_update": c.gw_us_per_update + c.gw_us_per_broker_msg * msgs,
            "connections_per_gateway": conns / gateways,
            "channels_per_gateway": teams * (1.0 - (1.0 - 1.0 / gateways) ** s.team)
            if gateways > 1 else teams,
            "rss_mb_per_gateway": gw_memory_mb(gateways),
            "memory_fraction": gw_memory_mb(gateways) / s.gateway_memory_limit_mb,
            "client_out_mbit_s": deliveries / gateways * c.diff_bytes * 8 / 1e6,
            "client_in_mbit_s": updates / gateways * c.update_bytes * 8 / 1e6,
            "redis_in_mbit_s": updates * msgs / gateways * c.redis_out_bytes_per_msg * 8 / 1e6,
            "redis_out_mbit_s": updates / gateways * c.redis_in_bytes_per_update * 8 / 1e6,
        },
        "redis": {
            "masters": masters, "cpu_cores_total": redis_cores,
            "cpu_per_master": redis_cores / masters,
            "commands_per_s": commands, "commands_per_s_per_master": commands / masters,
            "commands_sent_per_s_per_master": (updates * c.redis_sent_per_update + eng_cmds)
            / masters,
            "spublish_per_s_per_master": updates / masters,
            "pubsub_messages_per_s_per_master": updates * msgs / masters,
            "subscriptions": subscriptions,
            "memory_mb_total": redis_mem / 2**20, "memory_mb_per_master": redis_mem / masters
            / 2**20,
            "in_mbit_s_per_master": updates / masters * c.redis_in_bytes_per_update * 8 / 1e6,
            "out_mbit_s_per_master": updates / masters * out_per_update * 8 / 1e6,
            "repl_mbit_s_per_master": updates / masters * c.redis_repl_bytes_per_update * 8
            / 1e6,
        },
    }


def policy_at(connections: int, replicas: int, when: datetime | None = None,
              **settings: Any) -> dict[str, Any]:
    """The autoscaling policy's first decision (``presence.autoscale.decide``) for
    ``connections`` on ``replicas`` running pods at ``when`` (default Saturday
    2026-06-13 18:00 Europe/London), with the default settings or ``settings``."""
    from zoneinfo import ZoneInfo

    from presence.autoscale import LoadSnapshot, PolicyState, decide
    from presence.settings import AutoscaleSettings

    cfg = AutoscaleSettings(**settings)
    when = when or datetime(2026, 6, 13, 18, 0, tzinfo=ZoneInfo(cfg.timezone))
    decision, _ = decide(LoadSnapshot(replicas=replicas, connections=connections), when,
                         PolicyState(), cfg)
    return {"desired": decision.desired, "reason": decision.reason,
            "terms": decision.figures["terms"], "at": when.isoformat()}


# -- derived unit costs (pure: from the points of a run) -----------------------------------


def _per(x: float | None, n: float | None, scale: float = 1.0) -> float | None:
    return x / n * scale if x is not None and n else None


def unit_costs(points: Sequence[dict[str, Any]], memory: dict[str, Any],
               pubsub: dict[str, Any] | None = None,
               only: Sequence[dict[str, Any]] | None = None) -> UnitCosts:
    """The model's inputs from the measured points (one per gateway count and run).

    Only :func:`representative` points count. CPU per update (net of the background)
    and Redis output bytes per update are lines over the broker messages per update (N
    in these runs: every team has members on every gateway). Their slopes come from
    every point (a least-squares fit; for Redis CPU per message out, the larger of that
    fit and ``pubsub``, the fan-out measurement on one master, when there is one);
    their intercepts from the points of ``only`` (default: every point), as the mean of
    each point's figure less slope x its messages. A gateway's background
    CPU is a line over the connections it holds (one point per gateway process); KB per
    connection is that of the one-gateway points (the most connections on one process);
    commands, bytes in and a master's background are the mean over the points.
    """
    ok = [p for p in points if representative(p)]
    if not ok:
        raise ValueError("no representative point (updates, frames per delivery >= 0.9)")
    sel = [p for p in (only or ok) if p.get("updates")] or ok

    def slope(key: str) -> float:
        return fit_line([p["broker_in_per_update"] for p in ok], [p[key] for p in ok])[1]

    def intercept(key: str, k: float) -> float:
        return float(sum(p[key] - k * p["broker_in_per_update"] for p in sel)) / len(sel)

    def mean(key: str, pts: Sequence[dict[str, Any]] = sel) -> float:
        vals = [p[key] for p in pts if p.get(key) is not None]
        return sum(vals) / len(vals) if vals else 0.0

    gw1 = slope("gw_cpu_us_per_update_net")
    fan = (pubsub or {}).get("us_per_message_out")
    r1 = slope("redis_cpu_us_per_update_net")
    if isinstance(fan, int | float):
        r1 = max(r1, fan)
    o1 = slope("redis_out_bytes_per_update")
    procs_ = [g for p in ok for g in p["per_gateway"] if g.get("idle_cpu_per_s") is not None]
    idle_ys = [g["idle_cpu_per_s"] * 1e6 for g in procs_]
    idle_xs = [g["connections"] for g in procs_]
    i0, i1 = fit_line(idle_xs, idle_ys) if procs_ else (0.0, 0.0)
    if i1 < 0:  # no growth with connections to be seen: one figure per process
        i0, i1 = sum(idle_ys) / len(idle_ys), 0.0
    elif i0 < 0:  # a line through the origin: all of it per connection
        i0, i1 = 0.0, sum(x * y for x, y in zip(idle_xs, idle_ys, strict=True)) / sum(
            x * x for x in idle_xs)
    masters_idle = [m["idle_cpu_per_s"] * 1e6 for p in ok for m in p["redis_masters"].values()
                    if m.get("idle_cpu_per_s") is not None]
    fewest = min(p["gateways"] for p in ok)
    ones = [p for p in ok if p["gateways"] == fewest]
    return UnitCosts(
        gw_us_per_update=intercept("gw_cpu_us_per_update_net", gw1), gw_us_per_broker_msg=gw1,
        gw_idle_us_per_s=i0, gw_idle_us_per_conn_s=i1,
        gw_kb_per_conn=mean("gw_kb_per_conn", ones), gw_base_mb=mean("gw_base_mb", ones),
        gw_mirror_bytes_per_meta=memory.get("mirror_bytes_per_meta") or 0.0,
        diff_bytes=mean("diff_bytes"), update_bytes=mean("update_bytes"),
        redis_us_per_update=intercept("redis_cpu_us_per_update_net", r1),
        redis_us_per_msg_out=r1,
        redis_us_per_command=mean("redis_cpu_us_per_command"),
        redis_idle_us_per_s=sum(masters_idle) / len(masters_idle) if masters_idle else 0.0,
        redis_cmds_per_update=mean("redis_cmds_per_update"),
        redis_sent_per_update=mean("redis_sent_per_update"),
        redis_in_bytes_per_update=mean("redis_in_bytes_per_update"),
        redis_out_bytes_per_update=intercept("redis_out_bytes_per_update", o1),
        redis_out_bytes_per_msg=o1,
        redis_repl_bytes_per_update=mean("redis_repl_bytes_per_update"),
        redis_bytes_per_conn=mean("redis_bytes_per_conn"),
        redis_bytes_per_subscription=memory.get("redis_bytes_per_subscription") or 0.0,
    )


def representative(p: dict[str, Any]) -> bool:
    """A point with updates whose gateways wrote about one frame per delivery. Below 0.9
    a loop turn carried several changes of a team (a congested gateway, or the 20 ms
    window at this workload's 10 updates/s per team): every unit cost is then lower
    than at the model's load, where a team changes 0.67 times a second."""
    return bool(p.get("updates")) and (p.get("frames_per_delivery") or 0.0) >= 0.9


SCENARIOS = {"base": Scenario(), "rate_x6": Scenario(rate_factor=6.0)}


def model(points: Sequence[dict[str, Any]], memory: dict[str, Any],
          pubsub: dict[str, Any] | None = None) -> dict[str, Any]:
    """Unit costs and fleets: from every point, and from each point alone (the spread
    the noise of one point gives the fleet)."""
    costs = unit_costs(points, memory, pubsub)
    out: dict[str, Any] = {"unit_costs": asdict(costs),
                           "fleet": {k: fleet(costs, sc) for k, sc in SCENARIOS.items()}}
    each = []
    for p in points:
        if not representative(p):
            continue
        c = unit_costs(points, memory, pubsub, only=[p])
        f = {k: fleet(c, sc) for k, sc in SCENARIOS.items()}
        each.append({"gateways": p["gateways"], "gw_us_per_update": c.gw_us_per_update,
                     "redis_us_per_update": c.redis_us_per_update,
                     **{f"{k}_gateways": v["gateways"]["count"] for k, v in f.items()},
                     **{f"{k}_masters": v["redis"]["masters"] for k, v in f.items()}})
    out["fleet_from_each_point"] = each
    return out


def key_kind(key: str) -> str:
    """``presence:user:{u1}:chans:c-1`` -> ``user:{}:chans``: a key's kind, for grouping."""
    parts = re.sub(r"\{[^}]*\}", "{}", key).split(":")
    if parts and parts[0] == "presence":
        parts = parts[1:]
    if len(parts) > 1 and parts[1] == "{}":
        return ":".join(parts[:3])
    return ":".join(parts[:2])


# -- measuring -------------------------------------------------------------------------


def _redis(port: int) -> Any:
    import redis

    return redis.Redis(host=HOST, port=port, socket_timeout=10, socket_connect_timeout=5,
                       decode_responses=True)


def cluster_roles(base: int) -> dict[int, str]:
    """Port -> ``master`` / ``slave`` of the six nodes."""
    out = {}
    for port in range(base, base + 6):
        out[port] = str(_redis(port).info("replication")["role"])
    return out


def slot_owners(port: int) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) of every slot range, from CLUSTER SHARDS."""
    out = []
    for shard in _redis(port).execute_command("CLUSTER SHARDS"):
        shard = dict(zip(shard[::2], shard[1::2], strict=True)) if isinstance(shard, list) \
            else shard
        slots = shard["slots"]
        nodes = [dict(zip(n[::2], n[1::2], strict=True)) if isinstance(n, list) else n
                 for n in shard["nodes"]]
        master = next(int(n["port"]) for n in nodes if n["role"] == "master")
        for i in range(0, len(slots), 2):
            out.append((int(slots[i]), int(slots[i + 1]), master))
    return out


def node_info(port: int) -> dict[str, Any]:
    """The figures of one Redis node that a window's delta is taken of."""
    info = _redis(port).info("all")
    cmds = {k[len("cmdstat_"):]: v for k, v in info.items() if k.startswith("cmdstat_")}
    return {
        "role": info.get("role"),
        "commands": int(info["total_commands_processed"]),
        "cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        "cpu_main": float(info.get("used_cpu_sys_main_thread", 0))
        + float(info.get("used_cpu_user_main_thread", 0)),
        "net_in": int(info["total_net_input_bytes"]),
        "net_out": int(info["total_net_output_bytes"]),
        "repl_in": int(info.get("total_net_repl_input_bytes", 0)),
        "repl_out": int(info.get("total_net_repl_output_bytes", 0)),
        "used_memory": int(info["used_memory"]),
        "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
        "keys": sum(int(v["keys"]) for k, v in info.items()
                    if re.fullmatch(r"db\d+", k) and isinstance(v, dict)),
        "clients": int(info.get("connected_clients", 0)),
        "shard_channels": int(info.get("pubsubshard_channels", 0)),
        "calls": {k: int(v["calls"]) for k, v in cmds.items()},
        "usec": {k: int(v["usec"]) for k, v in cmds.items()},
    }


def redis_snapshot(ports: Iterable[int]) -> dict[int, dict[str, Any]]:
    return {p: node_info(p) for p in ports}


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = {n: v[n] - a.get(k, {}).get(n, 0) for n in v
                      if v[n] - a.get(k, {}).get(n, 0)}
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = v - a.get(k, 0)
        else:
            out[k] = v
    return out


def redis_delta(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]
                ) -> dict[int, dict[str, Any]]:
    return {p: _delta(a[p], b[p]) for p in b if p in a}


GW_METRICS = {
    "frames_out": "presence_frames_sent_total",
    "frames_in": "presence_frames_received_total",
    "bytes_out": "presence_sent_bytes_total",
    "bytes_in": "presence_received_bytes_total",
    "broker_in": 'presence_broker_messages_total{direction="in"}',
    "broker_out": 'presence_broker_messages_total{direction="out"}',
    "store_published": "presence_store_published_total",
    "connections": "presence_connections",
    "channels": "presence_channels",
    "members": "presence_members",
}


def gateway_metrics(admin_url: str) -> dict[str, float]:
    """The counters of :data:`GW_METRICS` from a gateway's ``/metrics`` (missing: 0)."""
    samples: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in procs.http_get(f"{admin_url}/metrics", timeout=5).splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
    return {k: samples.get(m, 0.0) for k, m in GW_METRICS.items()}


def gateway_snapshot(gws: Sequence[procs.Gateway]) -> list[dict[str, Any]]:
    out = []
    for g in gws:
        try:
            cpu: float | None = procs.cpu_seconds(g.pid)
            rss: int | None = procs.rss_kb(g.pid)
        except (OSError, ValueError, IndexError, RuntimeError):
            cpu = rss = None
        out.append({"cpu": cpu, "rss_kb": rss, **gateway_metrics(g.admin_url)})
    return out


class Snapshots:
    """Gateway and Redis snapshots at given offsets (s) from the clients' ``go``.

    ``open`` is the ``after_go`` callback of :func:`loadtest.wsload.run_clients`;
    ``close`` waits (bounded) for the last snapshot, cut short when the clients are
    done before it, and returns them all (None for one not taken).
    """

    def __init__(self, take: Callable[[], dict[str, Any]], offsets: Sequence[float]) -> None:
        self.take, self.offsets = take, list(offsets)
        self.taken: list[dict[str, Any] | None] = [None] * len(self.offsets)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _run(self) -> None:
        for i, at in enumerate(self.offsets):
            self._done.wait(max(0.0, self._t0 + at - time.monotonic()))
            self.taken[i] = self.take()

    def open(self) -> None:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> list[dict[str, Any] | None]:
        if self._thread is not None:
            if time.monotonic() < self._t0 + self.offsets[-1]:
                self._done.set()
            self._thread.join(60)
        return list(self.taken)


def key_memory(ports: Iterable[int]) -> dict[str, dict[str, int]]:
    """Every key of every master, ``MEMORY USAGE ... SAMPLES 0``, summed by kind."""
    out: dict[str, dict[str, int]] = {}
    for port in ports:
        r = _redis(port)
        names = list(r.scan_iter(count=1000))
        for i in range(0, len(names), 1000):
            chunk = names[i:i + 1000]
            pipe = r.pipeline(transaction=False)
            for k in chunk:
                pipe.execute_command("MEMORY USAGE", k, "SAMPLES", 0)
            for k, size in zip(chunk, pipe.execute(), strict=True):
                kind = out.setdefault(key_kind(k), {"keys": 0, "bytes": 0})
                kind["keys"] += 1
                kind["bytes"] += int(size or 0)
    return out


def topics_on(base: int, port: int, n: int, tag: str = "capsub") -> list[str]:
    """``n`` pub/sub channel names (``cluster.keys.topic``) in the slots of ``port``."""
    from redis.crc import key_slot

    from cluster import keys

    ranges = [(a, b) for a, b, m in slot_owners(base) if m == port]
    names: list[str] = []
    i = 0
    while len(names) < n and i < 50 * n + 1000:
        name = keys.topic(f"team:{tag}-{i}")
        slot = key_slot(name.encode())
        if any(a <= slot <= b for a, b in ranges):
            names.append(name)
        i += 1
    return names


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _drain(sock: Any, stop: threading.Event, got: list[int], i: int) -> None:
    """Read and drop what ``sock`` gets until ``stop``; count the bytes in ``got[i]``."""
    while not stop.is_set():
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        got[i] += len(data)


def pubsub_fanout_cost(base: int, port: int, subscribers: Sequence[int] = (1, 4, 16),
                       messages: int = 10_000, payload: int = 180, batch: int = 1
                       ) -> dict[str, Any]:
    """Redis CPU per SPUBLISH and per message delivered, on one master.

    For each count k of ``subscribers``: k plain sockets SSUBSCRIBE one channel and
    read (and drop) whatever comes, as fast as they can; a client sends ``messages``
    SPUBLISH of ``payload`` bytes, ``batch`` per pipeline (1: a message is written to
    each subscriber by a send of its own, the dearest case, and a fleet's: a master
    then gets a few messages per gateway per event-loop turn); the master's
    ``used_cpu_sys`` + ``used_cpu_user`` delta per SPUBLISH is fitted as a line over k:
    intercept = per SPUBLISH, slope = per message out.
    """
    import socket

    channel = topics_on(base, port, 1, "capfan")[0]
    body = "x" * payload
    r = _redis(port)
    points = []
    for k in subscribers:
        socks: list[socket.socket] = []
        stop = threading.Event()
        got = [0] * k
        threads = []
        try:
            for i in range(k):
                sock = socket.create_connection((HOST, port), 5)
                sock.settimeout(0.5)
                sock.sendall(_resp("SSUBSCRIBE", channel))
                socks.append(sock)
                t = threading.Thread(target=_drain, args=(sock, stop, got, i), daemon=True)
                t.start()
                threads.append(t)
            deadline = time.monotonic() + 10
            while int(r.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]) < k \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            info0 = r.info("cpu")
            t0 = time.monotonic()
            for i in range(0, messages, batch):
                pipe = r.pipeline(transaction=False)
                for _ in range(min(batch, messages - i)):
                    pipe.execute_command("SPUBLISH", channel, body)
                pipe.execute()
            # every subscriber has its bytes: the SSUBSCRIBE reply and every message
            want = len(_resp("ssubscribe", channel)) + 4 + messages * len(
                _resp("smessage", channel, body))
            deadline = time.monotonic() + 20
            while min(got) < want and time.monotonic() < deadline:
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            info1 = r.info("cpu")
        finally:
            stop.set()
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()
            for t in threads:
                t.join(2)
        cpu = (float(info1["used_cpu_sys"]) + float(info1["used_cpu_user"])
               - float(info0["used_cpu_sys"]) - float(info0["used_cpu_user"]))
        points.append({"subscribers": k, "cpu_s": cpu, "seconds": elapsed,
                       "us_per_spublish": cpu / messages * 1e6,
                       "complete": min(got) >= want})
    per_publish, per_msg = fit_line([p["subscribers"] for p in points],
                                    [p["us_per_spublish"] for p in points])
    return {"points": points, "us_per_spublish": per_publish, "us_per_message_out": per_msg,
            "payload": payload, "batch": batch, "messages": messages, "port": port}


def subscription_bytes(base: int, masters: Sequence[int], n: int = 2000) -> float | None:
    """Redis ``used_memory`` per sharded subscription: one client subscribes ``n``
    channels of the first master's slots (keys.topic names), then unsubscribes."""
    port = masters[0]
    names = topics_on(base, port, n)
    r = _redis(port)
    ps = r.pubsub()
    try:
        before = int(r.info("memory")["used_memory"])
        for name in names:  # one per command: the channels of one SSUBSCRIBE share a slot
            ps.ssubscribe(name)
        confirmed, deadline = 0, time.monotonic() + 20
        while confirmed < len(names) and time.monotonic() < deadline:
            msg = ps.get_message(timeout=0.5)
            confirmed += bool(msg and msg.get("type") == "ssubscribe")
        after = int(r.info("memory")["used_memory"])
    finally:
        with contextlib.suppress(Exception):
            ps.close()
    return (after - before) / confirmed if confirmed == len(names) and names else None


def mirror_bytes_per_meta(channels: int = 500, team: int = TEAM) -> float:
    """Python heap per mirrored meta: ``channels`` hub channels (gateway/hub.py) whose
    mirrors hold ``team`` metas each, decoded from msgpack as the gateway gets them."""
    import gc
    import tracemalloc

    import msgpack

    from gateway.hub import Channel
    from presence.meta import Meta

    wires = [msgpack.packb({"conn": f"cap-0-{c * team + m:x}", "status": "online",
                            "device": "bench", "note": f"n{c * team + m}",
                            "since": 1_790_000_000_000 + m, "seq": 3})
             for c in range(channels) for m in range(team)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = []
        for c in range(channels):
            ch = Channel(f"team:cap-{c}")
            for m in range(team):
                meta = Meta.from_wire(msgpack.unpackb(wires[c * team + m]))
                ch.mirror.merge(f"cap-u{c * team + m}", meta)
            held.append(ch)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_channel_empty = _empty_channel_bytes()
    return (after - before - per_channel_empty * channels) / (channels * team)


def _empty_channel_bytes(n: int = 500) -> float:
    import tracemalloc

    from gateway.hub import Channel

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [Channel(f"team:cap-{c}") for c in range(n)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del held
    return (after - before) / n


def _wait_ready(gws: Sequence[procs.Gateway], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for g in gws:
        while True:
            try:
                procs.http_get(f"{g.admin_url}/readyz", timeout=3)
                break
            except (OSError, urllib.error.HTTPError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway {g.port} not ready after {timeout} s") \
                        from None
                time.sleep(0.2)


@dataclass
class Options:
    gateways: tuple[int, ...] = (1, 2, 3)
    clients: int = 2000
    rate: float = 1000.0
    duration: float = 10.0
    base_port: int = 7900
    procs: int = 2
    warmup: float = 2.0
    settle: float = 1.0
    idle: float = 6.0  # connected, no updates: the background the window is net of
    idle_gap: float = 2.0  # after the window's settle, before the idle window
    concurrency: int = 20
    coalesce_ms: int = 0


def measure_point(n: int, o: Options, nodes: str, ports: Sequence[int],
                  masters: Sequence[int], index: int = 0) -> dict[str, Any]:
    """N gateways, the propagation workload, every snapshot; the raw figures."""
    from loadtest.measures import _connect_info, _deliveries, _merge_step, team_conns
    from loadtest.wsload import Job, run_clients, split

    prefix = f"cap{index}n{n}"
    secret = secrets.token_hex(32)
    env = {"PRESENCE_MAX_CONNECTIONS": "20000", "PRESENCE_COALESCE_MS": str(o.coalesce_ms)}
    gws: list[procs.Gateway] = []
    try:
        for i in range(n):
            gws.append(procs.start_gateway(secret, redis_cluster=nodes,
                                           node_id=f"{prefix}-{i}", env=env))
        _wait_ready(gws)
        time.sleep(1.0)
        idle = {"gateways": gateway_snapshot(gws), "redis": redis_snapshot(ports)}
        conns = team_conns(prefix, o.clients, TEAM)
        parts = split(conns, max(o.procs, n))
        jobs = []
        for i, part in enumerate(parts):
            rate = o.rate * len(part) / len(conns)
            jobs.append(Job("gateway", gws[i % n].ws_url, secret, part,
                            [(rate, o.warmup), (0.0, o.settle), (rate, o.duration),
                             (0.0, o.settle), (0.0, o.idle_gap + o.idle)],
                            concurrency=o.concurrency,
                            track=True))
        box: dict[str, Any] = {}

        def when_ready(_ready: list[dict[str, Any]]) -> None:
            time.sleep(1.0)  # the joins' background writes (engagement) land
            box["connected"] = {"gateways": gateway_snapshot(gws),
                                "redis": redis_snapshot(ports)}
            box["keys"] = key_memory(masters)

        def take() -> dict[str, Any]:
            return {"t": time.monotonic(), "gateways": gateway_snapshot(gws),
                    "redis": redis_snapshot(ports)}

        start = o.warmup + o.settle
        end = start + o.duration + o.settle
        snaps = Snapshots(take, [start, end, end + o.idle_gap, end + o.idle_gap + o.idle])
        try:
            ready, results = run_clients(jobs, when_ready=when_ready, after_go=snaps.open)
        finally:
            taken = snaps.close()
    finally:
        for g in gws:
            g.stop()
    # per gateway: the updates its clients sent in the window and the deliveries they got
    window_keys = {tuple(k) for r in results for k in (r["sent_keys"][2]
                                                       if r.get("sent_keys") else [])}
    sent = [0] * n
    got = [0] * n
    for i, r in enumerate(results):
        sent[i % n] += r["steps"][2]["sent"]
        got[i % n] += sum(k for u, note, k in r.get("seen", []) if (u, note) in window_keys)
    measured = _merge_step(results, 2, 3)
    return {
        "gateways": n, "pids": [g.pid for g in gws], "connect": _connect_info(ready),
        "updates": sum(sent), "updates_per_gateway": sent, "delivered_per_gateway": got,
        "deliveries": _deliveries(results, 2), "window_s": o.duration + o.settle,
        "duration_s": o.duration,
        "frames_received_by_clients": measured["frames"],
        "bytes_received_by_clients": measured["bytes"],
        "latency_ms": measured["latency_ms"],
        "dropped": sum(r["dropped"] for r in results),
        "idle": idle, "connected": box.get("connected"), "keys": box.get("keys"),
        "window": taken[:2], "idle_window": taken[2:], "idle_s": o.idle,
    }


def _net(window: float, idle: float | None, dt_w: float, dt_i: float) -> float:
    """``window``'s figure less the background: the idle window's rate times the window."""
    return window - idle / dt_i * dt_w if idle is not None and dt_i > 0 else window


def derive(raw: dict[str, Any], masters: Sequence[int]) -> dict[str, Any]:
    """The unit costs of one point from its raw figures (pure).

    ``*_net`` figures are those of the window less the background measured in the idle
    window after it (same connections, no updates), at the idle window's rate: what the
    updates cost. The others are gross. Commands include those a Lua script runs
    (Redis counts them in ``total_commands_processed`` and ``cmdstat_*``);
    ``redis_sent_per_update`` counts the commands the gateways send (``EVALSHA``,
    ``SPUBLISH``, plain writes) and not the scripts' own: the joins a meta write's
    script publishes (``presence_store_published_total``) are taken off ``SPUBLISH``.
    """
    n = raw["gateways"]
    first, second = raw["window"]
    idle0, third = raw.get("idle_window") or [None, None]
    if not idle0 or not third:
        idle0 = third = None
    if not first or not second or not raw.get("connected"):
        return {"gateways": n, "error": "a snapshot is missing"}
    dt_w = second["t"] - first["t"]
    dt_i = third["t"] - idle0["t"] if third and idle0 else 0.0
    updates = raw["updates"]
    delivered = raw["deliveries"]["delivered"]
    connected = raw["connect"]["connected"]
    gw = []
    for i in range(n):
        a, b = first["gateways"][i], second["gateways"][i]
        c0 = idle0["gateways"][i] if idle0 else None
        c = third["gateways"][i] if third else None
        cpu = b["cpu"] - a["cpu"] if a["cpu"] is not None and b["cpu"] is not None else None
        idle_cpu = c["cpu"] - c0["cpu"] if c and c0 and c["cpu"] is not None \
            and c0["cpu"] is not None else None
        # .get: a record from before a counter existed has none (0).
        d = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in GW_METRICS
             if k not in ("connections", "channels", "members")}
        idle = raw["idle"]["gateways"][i]
        conn = raw["connected"]["gateways"][i]
        held = conn["connections"]
        got = raw["delivered_per_gateway"][i]
        cpu_net = _net(cpu, idle_cpu, dt_w, dt_i) if cpu is not None else None
        gw.append({
            "cpu_s": cpu, "cpu_net_s": cpu_net,
            "idle_cpu_per_s": idle_cpu / dt_i if idle_cpu is not None and dt_i else None,
            **d, "updates": raw["updates_per_gateway"][i], "delivered": got,
            "cpu_us_per_delivery": _per(cpu, got, 1e6),
            "cpu_us_per_delivery_net": _per(cpu_net, got, 1e6),
            "connections": held, "channels": conn["channels"],
            "rss_idle_kb": idle["rss_kb"], "rss_connected_kb": conn["rss_kb"],
            "kb_per_conn": _per(conn["rss_kb"] - idle["rss_kb"], held)
            if conn["rss_kb"] is not None and idle["rss_kb"] is not None else None,
        })
    have_cpu = all(g["cpu_s"] is not None for g in gw)
    cpu_sum = sum(g["cpu_s"] for g in gw) if have_cpu else None
    cpu_net = sum(g["cpu_net_s"] for g in gw) if have_cpu else None
    gw_idle = [g["idle_cpu_per_s"] for g in gw]
    gw_idle_sum = sum(gw_idle) if all(x is not None for x in gw_idle) else None
    rd = redis_delta(first["redis"], second["redis"])
    ri = redis_delta(idle0["redis"], third["redis"]) if third and idle0 else None
    conn_d = redis_delta(raw["idle"]["redis"], raw["connected"]["redis"])

    def eng_calls(d: dict[str, Any]) -> int:
        return sum(d["calls"].get(c, 0) for c in ENGAGEMENT_COMMANDS)

    def rnet(port: int, key: str) -> float:
        if key == "commands":  # the engagement ticks of either window left out
            return _net(rd[port][key] - eng_calls(rd[port]),
                        ri[port][key] - eng_calls(ri[port]) if ri else None, dt_w, dt_i)
        return _net(rd[port][key], ri[port][key] if ri else None, dt_w, dt_i)

    per_master = {}
    for p in masters:
        d = rd[p]
        eng = eng_calls(d)
        per_master[str(p)] = {
            "commands": d["commands"], "engagement_commands": eng,
            "commands_per_update": _per(rnet(p, "commands"), updates),
            "spublish_per_update": _per(d["calls"].get("spublish", 0), updates),
            "cpu_s": d["cpu"], "cpu_us_per_update": _per(d["cpu"], updates, 1e6),
            "cpu_us_per_update_net": _per(rnet(p, "cpu"), updates, 1e6),
            "idle_cpu_per_s": ri[p]["cpu"] / dt_i if ri and dt_i else None,
            "net_in_per_update": _per(rnet(p, "net_in"), updates),
            "net_out_per_update": _per(rnet(p, "net_out"), updates),
            "repl_out_per_update": _per(rnet(p, "repl_out"), updates),
            "calls": d["calls"],
            "usec_per_call": {k: round(d["usec"].get(k, 0) / v, 2)
                              for k, v in d["calls"].items() if v},
            "used_memory_per_conn": _per(conn_d[p]["used_memory"], connected),
            "dataset_per_conn": _per(conn_d[p]["used_memory_dataset"], connected),
            "commands_per_connect": _per(conn_d[p]["commands"], connected),
        }
    replicas = [p for p in rd if p not in masters]

    def tot(key: str) -> float:
        return float(sum(rnet(p, key) for p in masters))

    eng_total = sum(m["engagement_commands"] for m in per_master.values())
    calls: dict[str, int] = {}
    for p in masters:
        for k, v in rd[p]["calls"].items():
            calls[k] = calls.get(k, 0) + v
    sent_kinds = ("evalsha", "eval", "spublish")
    broker_in = sum(g["broker_in"] for g in gw)
    frames_out = sum(g["frames_out"] for g in gw)
    keys = raw.get("keys") or {}
    redis_idle = sum(ri[p]["cpu"] for p in masters) / dt_i if ri and dt_i else None
    key_bytes = sum(v["bytes"] for v in keys.values())
    return {
        "gateways": n, "updates": updates, "delivered": delivered,
        "expected": raw["deliveries"]["expected"], "lost": raw["deliveries"]["lost"],
        "updates_per_s": updates / raw["duration_s"], "window_s": dt_w, "idle_s": dt_i,
        "latency_ms": raw["latency_ms"], "connected": connected,
        "per_gateway": gw,
        "gw_cpu_s": cpu_sum, "gw_cpu_net_s": cpu_net,
        "gw_cpu_us_per_delivery": _per(cpu_sum, delivered, 1e6),
        "gw_cpu_us_per_delivery_net": _per(cpu_net, delivered, 1e6),
        "gw_cpu_us_per_update": _per(cpu_sum, updates, 1e6),
        "gw_cpu_us_per_update_net": _per(cpu_net, updates, 1e6),
        "gw_idle_cpu_per_s": gw_idle_sum,
        "gw_idle_us_per_conn_s": _per(gw_idle_sum, connected, 1e6),
        "frames_per_delivery": _per(frames_out, delivered),
        "broker_in_per_update": _per(broker_in, updates),
        "broker_out_per_update": _per(sum(g["broker_out"] for g in gw), updates),
        "diff_bytes": _per(sum(g["bytes_out"] for g in gw), frames_out),
        "update_bytes": _per(sum(g["bytes_in"] for g in gw), sum(g["frames_in"] for g in gw)),
        "gw_kb_per_conn": _per(sum(g["rss_connected_kb"] - g["rss_idle_kb"] for g in gw),
                               connected),
        "gw_base_mb": sum(g["rss_idle_kb"] for g in gw) / n / 1024,
        "redis_masters": per_master,
        "redis_cmds_per_update": _per(tot("commands"), updates),
        "redis_engagement_commands": eng_total,
        "redis_sent_per_update": _per(sum(calls.get(k, 0) for k in sent_kinds)
                                      - sum(g["store_published"] for g in gw), updates),
        "redis_calls_per_update": {k: round(v / updates, 3) for k, v in sorted(calls.items())}
        if updates else {},
        "spublish_per_update": _per(calls.get("spublish", 0), updates),
        "pubsub_messages_out_per_update": _per(broker_in, updates),
        "redis_cpu_us_per_update": _per(sum(rd[p]["cpu"] for p in masters), updates, 1e6),
        "redis_cpu_us_per_update_net": _per(tot("cpu"), updates, 1e6),
        "redis_cpu_us_per_command": _per(sum(rd[p]["cpu"] for p in masters),
                                         sum(rd[p]["commands"] for p in masters), 1e6),
        "redis_idle_cpu_per_s": redis_idle,
        "redis_idle_us_per_conn_s": _per(redis_idle, connected, 1e6),
        "redis_replica_cpu_us_per_update": _per(sum(rd[p]["cpu"] for p in replicas),
                                                updates, 1e6),
        "redis_in_bytes_per_update": _per(tot("net_in"), updates),
        "redis_out_bytes_per_update": _per(tot("net_out"), updates),
        "redis_repl_bytes_per_update": _per(tot("repl_out"), updates),
        "redis_used_memory_per_conn": _per(sum(conn_d[p]["used_memory"] for p in masters),
                                           connected),
        "redis_dataset_per_conn": _per(
            sum(conn_d[p]["used_memory_dataset"] for p in masters), connected),
        "redis_bytes_per_conn": _per(key_bytes, connected),
        "redis_commands_per_connect": _per(sum(conn_d[p]["commands"] for p in masters),
                                           connected),
        "redis_key_bytes_per_conn": {k: round(v["bytes"] / connected, 1)
                                     for k, v in sorted(keys.items())} if connected else {},
    }


SUMMARY_KEYS = (
    "gw_cpu_us_per_delivery", "gw_cpu_us_per_delivery_net", "gw_cpu_us_per_update_net",
    "frames_per_delivery", "broker_in_per_update", "redis_sent_per_update",
    "redis_cmds_per_update", "spublish_per_update", "pubsub_messages_out_per_update",
    "redis_cpu_us_per_update_net", "redis_cpu_us_per_command", "redis_in_bytes_per_update",
    "redis_out_bytes_per_update", "redis_repl_bytes_per_update", "gw_kb_per_conn",
    "redis_bytes_per_conn", "redis_commands_per_connect", "diff_bytes",
)


def by_gateways(points: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per gateway count: median, min and max of :data:`SUMMARY_KEYS` over its
    :func:`representative` points (``left_out``: how many others it had)."""
    out: dict[str, dict[str, Any]] = {}
    for n in sorted({p["gateways"] for p in points}):
        mine = [p for p in points if p["gateways"] == n]
        pts = [p for p in mine if representative(p)]
        row: dict[str, Any] = {"points": len(pts), "left_out": len(mine) - len(pts)}
        for k in SUMMARY_KEYS:
            vals = sorted(p[k] for p in pts if p.get(k) is not None)
            if vals:
                mid = len(vals) // 2
                med = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
                row[k] = {"median": med, "min": vals[0], "max": vals[-1]}
        out[str(n)] = row
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError):
        load = os.getloadavg()[0]
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "load_average_1m_at_start": load}


def run(o: Options) -> dict[str, Any]:
    base = o.base_port
    ports = list(range(base, base + 6))
    busy = procs.ports_in_use(ports)
    if busy:
        raise RuntimeError(f"ports {busy} are in use: pick another --base-port")
    nodes = ",".join(f"{HOST}:{base + i}" for i in range(3))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    mach = machine()
    procs.cluster("start", base)
    points, raws = [], []
    memory: dict[str, Any] = {}
    try:
        roles = cluster_roles(base)
        masters = sorted(p for p, r in roles.items() if r == "master")
        for index, n in enumerate(o.gateways):
            for p in masters:
                _redis(p).flushall()
            time.sleep(0.5)
            print(f"capacity: {n} gateway(s) ...", file=sys.stderr, flush=True)
            raw = measure_point(n, o, nodes, ports, masters, index)
            raws.append(raw)
            points.append(derive(raw, masters))
        memory["redis_bytes_per_subscription"] = subscription_bytes(base, masters)
        try:
            pubsub = pubsub_fanout_cost(base, masters[0])
        except Exception as exc:  # a side measurement: the points stand without it
            pubsub = {"error": repr(exc)}
    finally:
        procs.cluster("stop", base)
    memory["mirror_bytes_per_meta"] = mirror_bytes_per_meta()
    out: dict[str, Any] = {
        "generated_at": started, "command": " ".join(["python -m loadtest.capacity",
                                                       *sys.argv[1:]]),
        "machine": mach, "options": asdict(o), "masters": masters, "points": points,
        "by_gateways": by_gateways(points), "memory": memory, "pubsub_fanout": pubsub,
        "raw": [{k: v for k, v in r.items()
                 if k not in ("window", "idle", "connected", "idle_window")}
                for r in raws],
    }
    try:
        out.update(model(points, memory, pubsub))
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        out["model_error"] = repr(exc)
    return out


# -- printing --------------------------------------------------------------------------


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(out: dict[str, Any]) -> str:
    rows = [
        ("gateways", "gateways", 0),
        ("representative (frames/delivery >= 0.9)", None, 0),
        ("updates in window", "updates", 0),
        ("offered -> sent updates/s", "updates_per_s", 0),
        ("delivered / expected", None, 0),
        ("latency p50 / p99 ms", None, 0),
        ("gw CPU us / delivery (sum)", "gw_cpu_us_per_delivery", 1),
        ("gw CPU us / delivery (sum, net)", "gw_cpu_us_per_delivery_net", 1),
        ("gw CPU us / delivery per process, net", None, 1),
        ("gw CPU us / update (sum, net)", "gw_cpu_us_per_update_net", 0),
        ("gw background CPU, cores (sum)", "gw_idle_cpu_per_s", 3),
        ("frames / delivery", "frames_per_delivery", 3),
        ("broker msgs in / update", "broker_in_per_update", 2),
        ("Redis cmds sent / update", "redis_sent_per_update", 2),
        ("Redis cmds run / update (net)", "redis_cmds_per_update", 2),
        ("Redis cmds run / update per master", None, 2),
        ("SPUBLISH / update", "spublish_per_update", 2),
        ("pub/sub msgs out / update", "pubsub_messages_out_per_update", 2),
        ("Redis CPU us / update (masters)", "redis_cpu_us_per_update", 1),
        ("Redis CPU us / update (masters, net)", "redis_cpu_us_per_update_net", 1),
        ("Redis CPU us / update per master, net", None, 1),
        ("Redis CPU us / command run", "redis_cpu_us_per_command", 2),
        ("Redis background CPU, cores (masters)", "redis_idle_cpu_per_s", 3),
        ("Redis replicas CPU us / update", "redis_replica_cpu_us_per_update", 1),
        ("Redis net in B / update", "redis_in_bytes_per_update", 0),
        ("Redis net out B / update", "redis_out_bytes_per_update", 0),
        ("Redis net out B / update per master", None, 0),
        ("Redis repl out B / update", "redis_repl_bytes_per_update", 0),
        ("gw RSS KB / connection", "gw_kb_per_conn", 1),
        ("gw RSS KB / connection per process", None, 1),
        ("Redis key B / connection", "redis_bytes_per_conn", 0),
        ("Redis used_memory B / connection", "redis_used_memory_per_conn", 0),
        ("Redis cmds run / connect", "redis_commands_per_connect", 1),
        ("diff frame B / update frame B", None, 0),
    ]
    pts = [p for p in out["points"] if "error" not in p]
    lines = []
    for label, key, d in rows:
        cells = []
        for p in pts:
            if key:
                cells.append(_f(p.get(key), d))
            elif label.startswith("representative"):
                cells.append("yes" if representative(p) else "no: left out")
            elif label.startswith("delivered"):
                cells.append(f"{p['delivered']:,} / {p['expected']:,}")
            elif label.startswith("latency"):
                lat = p["latency_ms"]
                cells.append(f"{_f(lat.get('p50'), 0)} / {_f(lat.get('p99'), 0)}")
            elif label.startswith("gw CPU us / delivery per"):
                cells.append(" ".join(_f(g["cpu_us_per_delivery_net"], d)
                                      for g in p["per_gateway"]))
            elif label.startswith("gw RSS"):
                cells.append(" ".join(_f(g["kb_per_conn"], d) for g in p["per_gateway"]))
            elif label.startswith("diff frame"):
                cells.append(f"{_f(p['diff_bytes'], 0)} / {_f(p['update_bytes'], 0)}")
            else:
                field_ = {"Redis cmds run / update per master": "commands_per_update",
                          "Redis CPU us / update per master, net": "cpu_us_per_update_net",
                          "Redis net out B / update per master": "net_out_per_update"}[label]
                cells.append(" ".join(_f(m[field_], d) for m in p["redis_masters"].values()))
        lines.append(f"{label:40s} | " + " | ".join(f"{c:>22s}" for c in cells))
    for p in out["points"]:
        if "error" in p:
            lines.append(f"{p['gateways']} gateway(s): {p['error']}")
    return "\n".join(lines)


def fleet_text(name: str, f: dict[str, Any]) -> str:
    ld, g, r = f["load"], f["gateways"], f["redis"]
    return "\n".join([
        f"{name}: {ld['connections']:,.0f} connections, {ld['updates_per_s']:,.0f} updates/s, "
        f"{ld['deliveries_per_s']:,.0f} deliveries/s, {ld['broker_messages_per_update']:.1f} "
        f"broker messages per update ({ld['pubsub_messages_per_s']:,.0f}/s)",
        f"  gateways {g['count']} (CPU {g['by_cpu']}, connections {g['by_connections']}, "
        f"memory {g['by_memory']}): {g['cpu_per_gateway']:.2f} core, "
        f"{g['connections_per_gateway']:,.0f} conns, {g['rss_mb_per_gateway']:.0f} MB, "
        f"clients out {g['client_out_mbit_s']:.1f} Mbit/s, Redis in "
        f"{g['redis_in_mbit_s']:.1f} Mbit/s each",
        f"  Redis masters {r['masters']}: {r['cpu_per_master']:.2f} core, "
        f"{r['commands_per_s_per_master']:,.0f} cmds/s, "
        f"{r['pubsub_messages_per_s_per_master']:,.0f} pub/sub msgs/s, "
        f"{r['memory_mb_per_master']:.0f} MB, out {r['out_mbit_s_per_master']:.0f} Mbit/s each",
    ])


def print_model(out: dict[str, Any]) -> None:
    if "unit_costs" not in out:
        print(f"model: {out.get('model_error', 'no unit costs')}")
        return
    print("\nunit costs: " + ", ".join(f"{k} {v:,.3g}" for k, v in out["unit_costs"].items()))
    for name, f in out.get("fleet", {}).items():
        print(fleet_text(name, f))
    each = out.get("fleet_from_each_point") or []
    if each:
        print("from each point alone (gateways, masters): " + ", ".join(
            f"N={e['gateways']}: {e['base_gateways']}/{e['base_masters']}, x6 "
            f"{e['rate_x6_gateways']}/{e['rate_x6_masters']}" for e in each))
    base = out.get("fleet", {}).get("base")
    if base:
        conns = int(base["load"]["connections"])
        p = policy_at(conns, base["gateways"]["count"])
        print(f"autoscaling policy, defaults, {conns:,} connections on "
              f"{base['gateways']['count']} pods at {p['at']}: desired {p['desired']} "
              f"({p['reason']}; terms {p['terms']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.capacity",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateways", default="1,2,3", help="gateway counts, comma-separated")
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=1000.0, help="offered updates/s")
    ap.add_argument("--duration", type=float, default=10.0, help="measured window (s)")
    ap.add_argument("--base-port", type=int, default=7900)
    ap.add_argument("--procs", type=int, default=2, help="client processes (at least N)")
    ap.add_argument("--coalesce-ms", type=int, default=0,
                    help="the gateways' diff window (0: one diff per change, as at the "
                         "model's 0.67 updates/s per team; the product default is 20)")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--model", nargs="?", const=RESULT, type=Path, metavar="FILE",
                    help="measure nothing: recompute the model from the points of FILE "
                         "(default the result file), print it and write it into FILE")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.model is not None:
        out = json.loads(a.model.read_text())
        out["by_gateways"] = by_gateways(out["points"])
        out.update(model(out["points"], out.get("memory", {}), out.get("pubsub_fanout")))
        print(table(out))
        print_model(out)
        a.model.write_text(json.dumps(out, indent=1, default=str) + "\n")
        return 0
    counts = tuple(int(x) for x in a.gateways.split(",") if x.strip())
    if not counts or min(counts) < 1:
        raise SystemExit("--gateways: positive counts, e.g. 1,2,3")
    o = Options(gateways=counts, clients=a.clients, rate=a.rate, duration=a.duration,
                base_port=a.base_port, procs=a.procs, coalesce_ms=a.coalesce_ms)
    out = run(o)
    print(table(out))
    print_model(out)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"\nwritten: {a.out}")
    bad = [p for p in out["points"] if "error" in p or p.get("lost")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
