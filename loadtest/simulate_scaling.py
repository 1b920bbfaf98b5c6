"""Simulate the autoscaler over a June Saturday evening and print the /admin/scaling body.

Drives the real controller step (``cluster.autoscaler.Autoscaler.step``, i.e. the pure
policy of ``presence/autoscale.py``) with a fake clock from 14:00 to 23:00 on Saturday
2026-06-13, Europe/London, one sample per ``--interval`` seconds. The load is a made-up
but plausible wedding-day curve: connections climb from 14,000 to 31,000 around the
17:00-21:00 coordination peak and fall to 8,000 by 23:00; propagation p95 and memory
follow the connections per node; a burst at 19:20 pushes p95 over its 2 s target for a
few minutes. Kubernetes is modelled as following the desired count one sample later.

    .venv/bin/python loadtest/simulate_scaling.py [--interval 60] [--compact]

Deterministic: the same arguments print the same body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog

from cluster.autoscaler import Autoscaler
from presence.autoscale import LoadSnapshot
from presence.settings import AutoscaleSettings

ZONE = ZoneInfo("Europe/London")
START = datetime(2026, 6, 13, 14, 0, tzinfo=ZONE)  # a Saturday
END = datetime(2026, 6, 13, 23, 0, tzinfo=ZONE)
MIB = 2**20
PROCESS_BASE = 100 * MIB  # interpreter, hub, Redis clients
PER_CONNECTION = 18_000  # bytes per idle connection (the design target)
LIMIT = 1024 * MIB  # the Deployment's memory limit


def connections_at(t: datetime) -> int:
    """Cluster connections: a smooth rise to the evening peak and a fall after it."""
    h = t.hour + t.minute / 60
    if h < 16.5:
        level = 14_000 + (h - 14) * 2_000  # the afternoon: ceremonies, venue set-up
    elif h < 18:
        level = 19_000 + (h - 16.5) / 1.5 * 12_000  # teams converge on the venues
    elif h < 20.5:
        level = 31_000 - (h - 18) * 400  # the reception: everyone online
    else:
        level = 30_000 - (h - 20.5) / 2.5 * 22_000  # winding down
    return round(level)


def load_at(t: datetime, replicas: int) -> LoadSnapshot:
    conns = connections_at(t)
    per_node = conns / replicas
    utilisation = per_node / 8_000
    p95 = 0.04 + 0.5 * utilisation**4
    if datetime(2026, 6, 13, 19, 20, tzinfo=ZONE) <= t < datetime(2026, 6, 13, 19, 24,
                                                                   tzinfo=ZONE):
        p95 += 2.5  # a photo-sharing burst saturates fan-out for a few minutes
    msgs_in = conns * 0.05
    return LoadSnapshot(
        replicas=replicas,
        connections=conns,
        propagation_p95=round(p95, 3),
        memory_fraction=round((PROCESS_BASE + per_node * PER_CONNECTION) / LIMIT, 4),
        loop_lag=round(0.002 + 0.02 * utilisation**2, 4),
        msgs_in_per_s=round(msgs_in, 1),
        msgs_out_per_s=round(msgs_in * 18, 1),  # ~18 other members per channel
    )


async def simulate(interval: float) -> dict[str, object]:
    cfg = AutoscaleSettings(interval=interval)
    clock = {"now": START}
    replicas = {"running": 4, "next": 4}  # the morning's count, kept by the Saturday freeze

    async def sample() -> LoadSnapshot:
        replicas["running"] = replicas["next"]  # Kubernetes follows one sample later
        return load_at(clock["now"], replicas["running"])

    scaler = Autoscaler(cfg, sample, clock=lambda: clock["now"])
    steps = math.floor((END - START).total_seconds() / interval) + 1
    for i in range(steps):
        clock["now"] = START + timedelta(seconds=i * interval)
        decision = await scaler.step()
        assert decision is not None
        replicas["next"] = decision.desired
    return scaler.body()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds between samples (default 60)")
    parser.add_argument("--compact", action="store_true", help="one line of JSON")
    args = parser.parse_args()
    # stdout is the JSON body: keep the controller's log lines out of it
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    body = asyncio.run(simulate(args.interval))
    print(json.dumps(body, indent=None if args.compact else 2))


if __name__ == "__main__":
    main()
