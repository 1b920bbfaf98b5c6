"""The autoscaling controller: sample the load, apply the pure policy, publish the decision.

Every ``interval`` seconds :class:`Autoscaler` awaits its ``sample()`` callable, calls
:func:`presence.autoscale.decide` with ``now`` from its clock (converted to the
configured zone), keeps the decision as :attr:`Autoscaler.current`, appends it to a
bounded history when the desired count or the reason changed, and calls
``on_decision(decision)`` (the gateway sets its Prometheus gauges there). A failing
sample or callback is logged and skipped: the loop only ends with :meth:`Autoscaler.stop`.

:func:`make_sampler` builds the ``sample()`` callable from a node's statistics; it takes
any object with ``local_stats()`` and ``cluster_stats()`` (see :class:`StatsSource`), so
this module does not import the gateway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from cluster.tasks import cancel_until_done
from presence.autoscale import Decision, LoadSnapshot, PolicyState, decide
from presence.settings import AutoscaleSettings

__all__ = ["Autoscaler", "Clock", "Sampler", "StatsSource", "make_sampler", "memory_limit"]

log = structlog.get_logger("presence.autoscaler")

Sampler = Callable[[], Awaitable[LoadSnapshot]]
Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
DecisionCallback = Callable[[Decision], None]


def _system_now() -> datetime:
    return datetime.now().astimezone()


class Autoscaler:
    """Runs the policy every ``cfg.interval`` seconds (see the module docstring).

    ``clock`` returns an aware datetime (any zone; default the system clock) and
    ``sleep`` waits between samples (default :func:`asyncio.sleep`): tests inject fakes
    for both. Not thread-safe; one event loop.
    """

    def __init__(
        self,
        cfg: AutoscaleSettings,
        sample: Sampler,
        *,
        on_decision: DecisionCallback | None = None,
        clock: Clock = _system_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.zone = ZoneInfo(cfg.timezone)
        self._sample = sample
        self._on_decision = on_decision
        self._clock = clock
        self._sleep = sleep
        self._state = PolicyState()
        self._current: Decision | None = None
        self._history: deque[Decision] = deque(maxlen=max(1, cfg.history))
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    @property
    def current(self) -> dict[str, Any] | None:
        """The latest decision as a JSON-ready dict, None before the first one."""
        return None if self._current is None else self._current.to_dict()

    @property
    def history(self) -> list[dict[str, Any]]:
        """Past decisions that changed the desired count or the reason, oldest first,
        at most ``cfg.history`` of them (the first decision is always recorded)."""
        return [d.to_dict() for d in self._history]

    @property
    def decision(self) -> Decision | None:
        """The latest decision object (None before the first one)."""
        return self._current

    def settings(self) -> dict[str, Any]:
        """The policy's settings, JSON-ready (peak windows as dicts)."""
        return dataclasses.asdict(self.cfg)

    def body(self) -> dict[str, Any]:
        """The ``/admin/scaling`` body: current decision, history and settings."""
        return {"current": self.current, "history": self.history, "settings": self.settings()}

    async def step(self) -> Decision | None:
        """Sample once and decide; None (logged) when the sample failed."""
        try:
            load = await self._sample()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            log.warning("autoscaler_sample_failed", error=repr(exc), failures=self.failures)
            return None
        now = self._clock().astimezone(self.zone)
        decision, self._state = decide(load, now, self._state, self.cfg)
        last = self._history[-1] if self._history else None
        if last is None or (last.desired, last.reason) != (decision.desired, decision.reason):
            self._history.append(decision)
            log.info("autoscaler_decision", desired=decision.desired, reason=decision.reason,
                     replicas=load.replicas, connections=load.connections)
        self._current = decision
        if self._on_decision is not None:
            try:
                self._on_decision(decision)
            except Exception as exc:  # a broken gauge must not stop the scaling signal
                log.warning("autoscaler_callback_failed", error=repr(exc))
        return decision

    async def _run(self) -> None:
        while True:
            await self.step()
            await self._sleep(self.cfg.interval)

    def start(self) -> None:
        """Start the loop in the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="autoscaler")

    async def stop(self) -> None:
        """Stop the loop and wait for it to end (a cancel of the caller still goes
        through)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_until_done(task)


class StatsSource(Protocol):
    """What :func:`make_sampler` reads: the gateway node provides both methods."""

    def local_stats(self) -> dict[str, Any]: ...

    async def cluster_stats(self) -> dict[str, Any]: ...


_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def memory_limit() -> int:
    """This container's memory limit in bytes: the cgroup limit, else physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return int(physical)


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else default


def make_sampler(node: StatsSource, limit_bytes: int | None = None) -> Sampler:
    """A ``sample()`` building a :class:`LoadSnapshot` from the node's statistics.

    Keys read from ``node.local_stats()``: ``connections``, ``frames_in_per_second``,
    ``frames_out_per_second``, ``propagation_seconds.p95``, ``event_loop_lag_seconds``,
    ``rss_bytes``, and ``memory_limit_bytes`` if present (else ``limit_bytes``, else the
    cgroup limit). From ``await node.cluster_stats()``: ``nodes`` (live gateway
    processes) and ``connections`` (cluster total). Without them the node counts as
    alone (1 replica) and the cluster total is this node's connections x replicas.
    """
    cached_limit = limit_bytes

    async def sample() -> LoadSnapshot:
        nonlocal cached_limit
        local = node.local_stats()
        cluster = await node.cluster_stats()
        replicas = max(1, int(_number(cluster.get("nodes"), 1)))
        own = int(_number(local.get("connections")))
        connections = int(_number(cluster.get("connections"), own * replicas))
        prop = local.get("propagation_seconds")
        p95 = _number(prop.get("p95")) if isinstance(prop, dict) else 0.0
        limit = int(_number(local.get("memory_limit_bytes")))
        if limit <= 0:
            if cached_limit is None:
                cached_limit = memory_limit()  # read once: a container's limit is fixed
            limit = cached_limit
        return LoadSnapshot(
            replicas=replicas,
            connections=connections,
            propagation_p95=p95,
            memory_fraction=_number(local.get("rss_bytes")) / limit if limit > 0 else 0.0,
            loop_lag=_number(local.get("event_loop_lag_seconds")),
            msgs_in_per_s=_number(local.get("frames_in_per_second")),
            msgs_out_per_s=_number(local.get("frames_out_per_second")),
        )

    return sample
