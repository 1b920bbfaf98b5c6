"""The autoscaling controller loop, with a fake clock, a gated fake sleep and a scripted
sampler: every step is released by the test, so nothing waits on real time."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cluster.autoscaler import Autoscaler, make_sampler, memory_limit
from presence.autoscale import Decision, LoadSnapshot
from presence.settings import AutoscaleSettings

START = datetime(2026, 1, 12, 9, 0, tzinfo=UTC)  # a Monday, 09:00 in London too
WAIT = 5.0  # bound on every await in these tests


class FakeTime:
    """A clock that moves only when the loop sleeps, and a sleep the test releases."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.gate: asyncio.Queue[None] = asyncio.Queue()

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await self.gate.get()
        self.now += timedelta(seconds=seconds)

    def release(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.gate.put_nowait(None)


class Harness:
    def __init__(self, cfg: AutoscaleSettings, loads: Callable[[int], LoadSnapshot],
                 on_decision: Callable[[Decision], None] | None = None) -> None:
        self.time = FakeTime(START)
        self.calls = 0
        self.decisions: asyncio.Queue[Decision] = asyncio.Queue()
        self.samples: asyncio.Queue[int] = asyncio.Queue()
        self._loads = loads
        self._extra = on_decision

        async def sample() -> LoadSnapshot:
            self.calls += 1
            self.samples.put_nowait(self.calls)
            return self._loads(self.calls)

        def record(d: Decision) -> None:
            self.decisions.put_nowait(d)
            if self._extra is not None:
                self._extra(d)

        self.scaler = Autoscaler(cfg, sample, on_decision=record, clock=self.time.clock,
                                 sleep=self.time.sleep)

    async def next_decision(self) -> Decision:
        return await asyncio.wait_for(self.decisions.get(), WAIT)

    async def next_sample(self) -> int:
        return await asyncio.wait_for(self.samples.get(), WAIT)


CFG = AutoscaleSettings(interval=5.0, history=3)


async def test_loop_samples_every_interval_in_the_configured_zone() -> None:
    h = Harness(CFG, lambda n: LoadSnapshot(2, 1000))
    h.scaler.start()
    try:
        first = await h.next_decision()
        h.time.release()
        second = await h.next_decision()
    finally:
        await h.scaler.stop()
    assert str(first.at.tzinfo) == "Europe/London"
    assert first.at == START
    assert (second.at - first.at).total_seconds() == CFG.interval
    current = h.scaler.current
    assert current is not None and current["ts"] == int(second.at.timestamp() * 1000)


async def test_history_is_bounded_and_keeps_the_latest_changes() -> None:
    # Connections grow every step: the desired count goes up every time.
    h = Harness(CFG, lambda n: LoadSnapshot(2, 8000 * n))
    h.scaler.start()
    try:
        seen = [await h.next_decision()]
        for _ in range(5):
            h.time.release()
            seen.append(await h.next_decision())
    finally:
        await h.scaler.stop()
    history = h.scaler.history
    assert len(history) == CFG.history
    assert [e["desired"] for e in history] == [d.desired for d in seen[-3:]]
    assert all(e["reason"] == "connections" for e in history)


async def test_history_records_changes_only() -> None:
    h = Harness(CFG, lambda n: LoadSnapshot(2, 1000))
    h.scaler.start()
    try:
        await h.next_decision()
        for _ in range(4):
            h.time.release()
            await h.next_decision()
    finally:
        await h.scaler.stop()
    assert len(h.scaler.history) == 1
    current = h.scaler.current
    assert current is not None
    assert current["ts"] > h.scaler.history[0]["ts"]


async def test_failing_sample_is_logged_and_skipped() -> None:
    def loads(n: int) -> LoadSnapshot:
        if n == 2:
            raise ConnectionError("backend away")
        return LoadSnapshot(2, 1000 * n)

    h = Harness(CFG, loads)
    h.scaler.start()
    try:
        await h.next_decision()
        h.time.release()
        assert await h.next_sample() == 1
        assert await h.next_sample() == 2  # the failing one
        h.time.release()
        third = await h.next_decision()
    finally:
        await h.scaler.stop()
    assert h.scaler.failures == 1
    assert third.load.connections == 3000


async def test_failing_callback_does_not_stop_the_loop() -> None:
    def broken(d: Decision) -> None:
        raise RuntimeError("gauge broken")

    h = Harness(CFG, lambda n: LoadSnapshot(2, 1000), on_decision=broken)
    h.scaler.start()
    try:
        await h.next_decision()
        h.time.release()
        await h.next_decision()
    finally:
        await h.scaler.stop()
    assert h.scaler.decision is not None


async def test_start_is_idempotent_and_stop_ends_the_task() -> None:
    h = Harness(CFG, lambda n: LoadSnapshot(2, 1000))
    h.scaler.start()
    task = h.scaler._task
    h.scaler.start()
    assert h.scaler._task is task
    await h.next_decision()
    await h.scaler.stop()
    assert task is not None and task.done()
    await h.scaler.stop()  # stopping twice is harmless


async def test_scaling_body_is_json_ready() -> None:
    h = Harness(CFG, lambda n: LoadSnapshot(2, 1000))
    assert h.scaler.body()["current"] is None
    assert await h.scaler.step() is not None
    body = json.loads(json.dumps(h.scaler.body()))
    assert set(body) == {"current", "history", "settings"}
    assert body["settings"]["peaks"][0] == {
        "start_hour": 17, "end_hour": 21, "multiplier": 2.0,
        "weekdays": [0, 1, 2, 3, 4, 5, 6],
    }


class StatsNode:
    """Stands in for the gateway node's two statistics methods (plain data)."""

    def __init__(self, local: dict[str, Any], cluster: dict[str, Any]) -> None:
        self.local, self.cluster = local, cluster

    def local_stats(self) -> dict[str, Any]:
        return self.local

    async def cluster_stats(self) -> dict[str, Any]:
        return self.cluster


LOCAL = {
    "connections": 500,
    "frames_in_per_second": 12.5,
    "frames_out_per_second": 250.0,
    "propagation_seconds": {"p50": 0.01, "p95": 0.2, "p99": 0.4},
    "event_loop_lag_seconds": 0.003,
    "rss_bytes": 256 * 2**20,
}


async def test_sampler_reads_node_and_cluster_stats() -> None:
    node = StatsNode(LOCAL, {"nodes": 3, "connections": 1800})
    snap = await make_sampler(node, limit_bytes=2**30)()
    assert snap == LoadSnapshot(
        replicas=3, connections=1800, propagation_p95=0.2, memory_fraction=0.25,
        loop_lag=0.003, msgs_in_per_s=12.5, msgs_out_per_s=250.0,
    )


async def test_sampler_without_cluster_totals() -> None:
    local = dict(LOCAL, propagation_seconds={"p50": None, "p95": None, "p99": None},
                 memory_limit_bytes=2**29)
    snap = await make_sampler(StatsNode(local, {"backend": "MemoryStore"}))()
    assert (snap.replicas, snap.connections, snap.propagation_p95) == (1, 500, 0.0)
    assert snap.memory_fraction == pytest.approx(0.5)


def test_memory_limit_is_positive() -> None:
    assert memory_limit() > 0


async def test_real_sampler_drives_the_loop() -> None:
    node = StatsNode(LOCAL, {"nodes": 2, "connections": 40_000})
    time = FakeTime(START)
    got: asyncio.Queue[Decision] = asyncio.Queue()
    cfg = dataclasses.replace(CFG, history=10)
    scaler = Autoscaler(cfg, make_sampler(node, 2**30), on_decision=got.put_nowait,
                        clock=time.clock, sleep=time.sleep)
    scaler.start()
    try:
        d = await asyncio.wait_for(got.get(), WAIT)
    finally:
        await scaler.stop()
    assert (d.desired, d.reason) == (6, "connections")  # 40,000 x 1.2 / 8,000
