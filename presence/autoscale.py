"""The autoscaling policy: a pure function of (load, local time, state, settings).

:func:`decide` reads no clock and does no I/O; the controller (``cluster/autoscaler.py``)
samples the load, passes ``now`` and keeps the returned :class:`PolicyState` for the next
call. The decision is a *signal*: Kubernetes (HPA on an external metric, or KEDA) moves
the pods (DESIGN.md, "Autoscaling").

How the desired replica count is made, each term in replicas:

* ``connections``: ``ceil(cluster connections x (1 + buffer) / connections_per_node)``.
* ``season``: the predicted floor ``ceil(base_connections x season[month] x (1 + buffer)
  / connections_per_node)``.
* ``peak_hour``: the same floor times the multiplier of the peak window in force. A window
  counts from ``prescale_minutes`` *before* its start until its end, on its weekdays (the
  weekday of the day the window starts); when windows overlap the largest multiplier wins.
* ``latency``: propagation p95 over its target, or event-loop lag over its target (the
  loop is the CPU of a single-threaded node, a lagging loop delays every frame):
  ``max(replicas + 1, ceil(replicas x min(ratio, MAX_PRESSURE_FACTOR)))``, where
  ``ratio`` is measured / target. Latency is not linear in load near saturation, so the
  ratio is capped: at most doubling per decision, again next sample if still over.
* ``memory``: memory fraction (RSS / limit) over ``memory_target``: memory per node is
  proportional to connections per node, so ``ceil(replicas x fraction / memory_target)``
  spreads the same connections over enough nodes to fall under the target; at least one
  more replica, at least two once past ``memory_max`` (the node is close to its limit).
* ``min``: ``min_replicas``.

Connections stay on the node they opened on, so new replicas relieve latency and memory
only as new connections arrive: for ``PRESSURE_SETTLE`` seconds after a change the
latency and memory terms are capped at the previous desired count, so that one episode
of pressure is not answered again and again before the first answer took effect (the
absolute terms, connections and predictions, are never capped).

The *target* is the largest term; its reason is the first of ``memory``, ``latency``,
``connections``, ``peak_hour``, ``season``, ``min`` among the terms equal to it (measured
signals before predictions). Then, from the previous desired count (``previous``):

* target above previous: scale up at once, whatever the cooldown or the day;
* target below previous: on a freeze day (``freeze_weekdays``, the whole local day) stay,
  reason ``freeze``; else within ``cooldown`` seconds of the last change stay, reason
  ``steady``; else go down ONE replica (reason: the target's);
* the result is clamped to ``[min_replicas, max_replicas]``; reason ``max`` when the
  clamp to the maximum binds (the bounds win over the freeze: a lowered maximum applies).

Reasons, therefore: ``connections``, ``latency``, ``memory``, ``season``, ``peak_hour``,
``min``, ``freeze``, ``steady``, ``max``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from presence.settings import AutoscaleSettings, PeakWindow

__all__ = [
    "MAX_PRESSURE_FACTOR",
    "PRESSURE_SETTLE",
    "REASONS",
    "Decision",
    "LoadSnapshot",
    "PolicyState",
    "decide",
    "peak_multiplier",
    "predicted_floor",
]

MAX_PRESSURE_FACTOR = 2.0
"""Latency and loop-lag terms grow the replicas by at most this factor per decision."""

PRESSURE_SETTLE = 120.0
"""Seconds after a change during which latency and memory cannot raise the count again:
pods start, turn ready and take new connections in about that time. (A candidate for
``AutoscaleSettings``.)"""

REASONS = (
    "connections", "latency", "memory", "season", "peak_hour", "min", "freeze", "steady",
    "max",
)

# Order in which equal terms name the reason: measured pressure first, predictions last.
_PRECEDENCE = ("memory", "latency", "connections", "peak_hour", "season", "min")


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """What the controller measured. Rates per second, times in seconds.

    ``replicas`` is the number of gateway processes running now (at least 1);
    ``connections`` the cluster-wide total; ``propagation_p95`` the local p95 from a
    change's server time to its diff being written (0 when nothing was sent);
    ``memory_fraction`` RSS / memory limit of this process; ``loop_lag`` the latest
    event-loop lag.
    """

    replicas: int
    connections: int
    propagation_p95: float = 0.0
    memory_fraction: float = 0.0
    loop_lag: float = 0.0
    msgs_in_per_s: float = 0.0
    msgs_out_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "connections": self.connections,
            "propagation_p95": round(self.propagation_p95, 4),
            "memory_fraction": round(self.memory_fraction, 4),
            "loop_lag": round(self.loop_lag, 4),
            "msgs_in_per_s": round(self.msgs_in_per_s, 1),
            "msgs_out_per_s": round(self.msgs_out_per_s, 1),
        }


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between calls: the last desired count and when it changed.

    The initial state (``desired=None``) takes the running replicas as the previous count
    and starts the cooldown at the first decision, so a restarted controller never scales
    down on its first sample.
    """

    desired: int | None = None
    changed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The desired replica count, why, the figures that led to it and when."""

    desired: int
    reason: str
    at: datetime
    load: LoadSnapshot
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``at`` in ISO 8601 with offset, ``ts`` in epoch ms)."""
        return {
            "desired": self.desired,
            "reason": self.reason,
            "at": self.at.isoformat(timespec="seconds"),
            "ts": int(self.at.timestamp() * 1000),
            "load": self.load.to_dict(),
            "figures": dict(self.figures),
        }


def _window_spans(w: PeakWindow, now: datetime) -> Iterator[tuple[datetime, datetime]]:
    """[start, end) of the window on yesterday, today and tomorrow, in local wall time."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    length = (w.end_hour - w.start_hour) % 24 or 24
    for offset in (-1, 0, 1):
        day = today + timedelta(days=offset)
        if day.weekday() in w.weekdays:
            start = day + timedelta(hours=w.start_hour)
            yield start, start + timedelta(hours=length)


def peak_multiplier(now: datetime, cfg: AutoscaleSettings) -> float:
    """The multiplier in force at local time ``now``, pre-scale lead included (else 1.0).

    Compared in local wall-clock time, so a DST change does not move a window.
    """
    wall = now.replace(tzinfo=None)
    lead = timedelta(minutes=cfg.prescale_minutes)
    best = 1.0
    for w in cfg.peaks:
        for start, end in _window_spans(w, now):
            if start - lead <= wall < end:
                best = max(best, w.multiplier)
    return best


def predicted_floor(now: datetime, cfg: AutoscaleSettings) -> tuple[int, int, float, float]:
    """(season floor, season x peak floor, season multiplier, peak multiplier) at ``now``."""
    season = cfg.season[now.month - 1]
    peak = peak_multiplier(now, cfg)
    base = cfg.base_connections * season * (1 + cfg.buffer)
    return (
        math.ceil(base / cfg.connections_per_node),
        math.ceil(base * peak / cfg.connections_per_node),
        season,
        peak,
    )


def _pressure(replicas: int, ratio: float) -> int:
    """Replicas for a latency-like signal ``ratio`` (measured / target) over 1."""
    return max(replicas + 1, math.ceil(replicas * min(ratio, MAX_PRESSURE_FACTOR)))


def _terms(load: LoadSnapshot, now: datetime, cfg: AutoscaleSettings) -> dict[str, int]:
    """Every term of the target (see the module docstring), in replicas (0 = not in play)."""
    replicas = max(1, load.replicas)
    season_floor, peak_floor, _, peak = predicted_floor(now, cfg)
    terms = {
        "connections": math.ceil(
            max(0, load.connections) * (1 + cfg.buffer) / cfg.connections_per_node
        ),
        "season": season_floor,
        "peak_hour": peak_floor if peak > 1.0 else 0,
        "min": cfg.min_replicas,
        "latency": 0,
        "memory": 0,
    }
    ratios = []
    if load.propagation_p95 > cfg.latency_p95_target:
        ratios.append(load.propagation_p95 / cfg.latency_p95_target)
    if load.loop_lag > cfg.loop_lag_target:
        ratios.append(load.loop_lag / cfg.loop_lag_target)
    if ratios:
        terms["latency"] = _pressure(replicas, max(ratios))
    if load.memory_fraction > cfg.memory_target:
        extra = 2 if load.memory_fraction > cfg.memory_max else 1
        terms["memory"] = max(
            replicas + extra, math.ceil(replicas * load.memory_fraction / cfg.memory_target)
        )
    return terms


def decide(
    load: LoadSnapshot, now: datetime, state: PolicyState, cfg: AutoscaleSettings
) -> tuple[Decision, PolicyState]:
    """The decision at ``now`` and the state to pass to the next call.

    ``now`` must be timezone-aware and expressed in the configured zone
    (``cfg.timezone``): its wall clock gives the month, the weekday and the hour. The
    caller converts (``now.astimezone(ZoneInfo(cfg.timezone))``); this function does no
    zone lookup. Deterministic: same arguments, same result.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, in the configured zone")
    previous = state.desired if state.desired is not None else max(1, load.replicas)
    previous = min(max(previous, cfg.min_replicas), cfg.max_replicas)
    changed_at = state.changed_at if state.changed_at is not None else now
    frozen = now.weekday() in cfg.freeze_weekdays
    since_change = (now - changed_at).total_seconds()
    settling = state.changed_at is not None and since_change < PRESSURE_SETTLE
    terms = _terms(load, now, cfg)
    if settling:
        for name in ("latency", "memory"):
            terms[name] = min(terms[name], previous)
    target = max(terms.values())
    target_reason = next(r for r in _PRECEDENCE if terms[r] == target)

    if target >= previous:
        desired, reason = target, target_reason
    elif frozen:
        desired, reason = previous, "freeze"
    elif since_change < cfg.cooldown:
        desired, reason = previous, "steady"
    else:
        desired, reason = previous - 1, target_reason
    if desired > cfg.max_replicas:
        desired, reason = cfg.max_replicas, "max"
    if desired < cfg.min_replicas:
        desired, reason = cfg.min_replicas, "min"

    if desired != previous or state.changed_at is None:
        changed_at = now
    _, _, season, peak = predicted_floor(now, cfg)
    figures: dict[str, Any] = {
        "target": target,
        "previous": previous,
        "terms": terms,
        "season_multiplier": season,
        "peak_multiplier": peak,
        "predicted_connections": round(cfg.base_connections * season * peak),
        "capacity_per_node": cfg.connections_per_node,
        "frozen": frozen,
        "settling": settling,
        "cooldown_remaining": round(max(0.0, cfg.cooldown - since_change), 1)
        if desired == previous and target < previous else 0.0,
    }
    decision = Decision(desired, reason, now, load, figures)
    return decision, PolicyState(desired, changed_at)
