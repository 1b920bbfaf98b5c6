"""Figures of one node: traffic counters, propagation latency, event-loop lag, memory.

They feed ``/admin/stats``, the Prometheus metrics and the autoscaler's sampler.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from cluster.base import Store
from gateway.metrics import Metrics


def quantiles(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 of ``samples`` (None each when there are none)."""
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(samples)
    n = len(s)
    return {
        "p50": s[min(n - 1, int(n * 0.50))],
        "p95": s[min(n - 1, int(n * 0.95))],
        "p99": s[min(n - 1, int(n * 0.99))],
    }


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class NodeStats:
    """Counters and samples of one node (all methods run on the event loop)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.started_at = time.time()
        self.latencies: deque[float] = deque(maxlen=4096)
        self.loop_lag = 0.0
        self._rates: deque[tuple[float, float, float]] = deque(maxlen=32)
        self._frames_in = 0
        self._frames_out = 0

    def on_flush(self, frames: int, nbytes: int, latency: float) -> None:
        """The hub wrote ``frames``; ``latency`` (s) is the propagation, < 0 if none."""
        self.count_out(frames, nbytes)
        if latency >= 0:
            self.metrics.propagation.observe(latency)
            self.latencies.append(latency)

    def count_out(self, frames: int, nbytes: int) -> None:
        self._frames_out += frames
        self.metrics.frames_out.inc(frames)
        self.metrics.bytes_out.inc(nbytes)

    def count_in(self, nbytes: int) -> None:
        self._frames_in += 1
        self.metrics.frames_in.inc()
        self.metrics.bytes_in.inc(nbytes)

    async def lag_loop(self) -> None:
        """Measure event-loop lag and sample the frame rates every half second."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.5)
            self.loop_lag = max(0.0, loop.time() - start - 0.5)
            self.metrics.loop_lag.set(self.loop_lag)
            self._rates.append((time.monotonic(), self._frames_in, self._frames_out))

    def figures(self) -> dict[str, Any]:
        """Rates, latency quantiles, loop lag, memory and uptime."""
        rate_in = rate_out = 0.0
        if len(self._rates) >= 2:
            (t0, i0, o0), (t1, i1, o1) = self._rates[0], self._rates[-1]
            if t1 > t0:
                rate_in, rate_out = (i1 - i0) / (t1 - t0), (o1 - o0) / (t1 - t0)
        return {
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "frames_in_per_second": round(rate_in, 1),
            "frames_out_per_second": round(rate_out, 1),
            "propagation_seconds": quantiles(list(self.latencies)),
            "event_loop_lag_seconds": round(self.loop_lag, 4),
            "rss_bytes": rss_bytes(),
        }


async def cluster_figures(store: Store, owner: str, connections: int, now: int) -> dict[str, Any]:
    """Live nodes and connections from the nodes' leases (each node's count as of its
    last lease refresh; ``owner``'s, this node's, is ``connections``, as of now)."""
    try:
        loads = await store.live_nodes(now)
    except Exception as exc:
        return {"backend": type(store).__name__, "error": type(exc).__name__}
    loads[owner] = connections
    return {"backend": type(store).__name__, "nodes": len(loads),
            "connections": sum(loads.values()), "per_node": loads}
