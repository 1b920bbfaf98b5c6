"""The pure autoscaling policy, driven with a fake clock (plain datetimes)."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence.autoscale import (
    PRESSURE_SETTLE,
    REASONS,
    LoadSnapshot,
    PolicyState,
    decide,
    peak_multiplier,
    predicted_floor,
)
from presence.settings import AutoscaleSettings, PeakWindow

CFG = AutoscaleSettings()
ZONE = ZoneInfo(CFG.timezone)


def at(y: int, mo: int, d: int, h: int = 12, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=ZONE)


# 2026-06-13 is a Saturday, 2026-06-10 a Wednesday, 2026-01-14 a Wednesday.
SATURDAY = at(2026, 6, 13)
WEDNESDAY = at(2026, 6, 10)

times = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31),
).map(lambda d: d.replace(tzinfo=ZONE))
loads = st.builds(
    LoadSnapshot,
    replicas=st.integers(1, 60),
    connections=st.integers(0, 600_000),
    propagation_p95=st.floats(0, 10),
    memory_fraction=st.floats(0, 1),
    loop_lag=st.floats(0, 1),
)
states = st.builds(
    PolicyState,
    desired=st.none() | st.integers(1, 80),
    changed_at=st.none() | times,
)


def test_prescale_before_june_evening_peak() -> None:
    """At 16:05 in June the floor already includes the x2 of the 17:00-21:00 peak."""
    load = LoadSnapshot(replicas=2, connections=0)
    season_floor, peak_floor, season, _ = predicted_floor(at(2026, 6, 10, 16, 5), CFG)
    assert season == 3.0
    assert peak_floor > season_floor
    d, _ = decide(load, at(2026, 6, 10, 16, 5), PolicyState(), CFG)
    assert d.figures["peak_multiplier"] == 2.0
    assert d.reason == "peak_hour"
    # 4000 x 3.0 x 2 x 1.2 / 8000 = 3.6 -> 4 replicas
    assert d.desired == 4
    d, _ = decide(load, at(2026, 6, 10, 15, 55), PolicyState(), CFG)
    assert d.figures["peak_multiplier"] == 1.0
    assert d.desired == 2


def test_peak_windows_by_weekday_and_end() -> None:
    assert peak_multiplier(at(2026, 6, 10, 20, 59), CFG) == 2.0
    assert peak_multiplier(at(2026, 6, 10, 21, 0), CFG) == 1.0
    # weekend coordination 10:00-14:00 x1.5, pre-scaled from 09:00, weekends only
    assert peak_multiplier(at(2026, 6, 13, 9, 0), CFG) == 1.5
    assert peak_multiplier(at(2026, 6, 13, 8, 59), CFG) == 1.0
    assert peak_multiplier(at(2026, 6, 10, 11, 0), CFG) == 1.0


def test_window_crossing_midnight_prescales_the_day_before() -> None:
    cfg = dataclasses.replace(CFG, peaks=(PeakWindow(0, 2, 3.0, (6,)),))  # Sundays 00-02
    assert peak_multiplier(at(2026, 6, 13, 23, 0), cfg) == 3.0  # Saturday 23:00
    assert peak_multiplier(at(2026, 6, 14, 1, 59), cfg) == 3.0
    assert peak_multiplier(at(2026, 6, 14, 2, 0), cfg) == 1.0
    assert peak_multiplier(at(2026, 6, 12, 23, 0), cfg) == 1.0  # Friday: no


def test_season_follows_the_month() -> None:
    january = decide(LoadSnapshot(2, 0), at(2026, 1, 14), PolicyState(), CFG)[0]
    assert january.figures["season_multiplier"] == 0.3
    assert january.reason == "min"
    cfg = dataclasses.replace(CFG, min_replicas=1)
    june = decide(LoadSnapshot(1, 0), WEDNESDAY, PolicyState(desired=1), cfg)[0]
    assert (june.desired, june.reason) == (2, "season")


def test_connections_with_buffer() -> None:
    # 40,000 x 1.2 / 8,000 = 6
    d, _ = decide(LoadSnapshot(2, 40_000), WEDNESDAY, PolicyState(), CFG)
    assert (d.desired, d.reason) == (6, "connections")
    d, _ = decide(LoadSnapshot(2, 40_001), WEDNESDAY, PolicyState(), CFG)
    assert d.desired == 7


def test_pressure_terms() -> None:
    base = LoadSnapshot(replicas=4, connections=0)
    lat = decide(dataclasses.replace(base, propagation_p95=2.5), WEDNESDAY, PolicyState(), CFG)[0]
    assert (lat.desired, lat.reason) == (5, "latency")  # ceil(4 x 1.25)
    capped = decide(dataclasses.replace(base, propagation_p95=9.0), WEDNESDAY,
                    PolicyState(), CFG)[0]
    assert capped.desired == 8  # at most doubling per decision
    lag = decide(dataclasses.replace(base, loop_lag=0.15), WEDNESDAY, PolicyState(), CFG)[0]
    assert (lag.desired, lag.reason) == (6, "latency")
    mem = decide(dataclasses.replace(base, memory_fraction=0.82), WEDNESDAY,
                 PolicyState(), CFG)[0]
    assert (mem.desired, mem.reason) == (5, "memory")
    hot = decide(dataclasses.replace(base, memory_fraction=0.86), WEDNESDAY,
                 PolicyState(), CFG)[0]
    assert hot.desired == 6  # past memory_max: at least two more


def test_pressure_waits_for_the_previous_answer() -> None:
    """Latency answered once is not answered again before PRESSURE_SETTLE seconds; the
    absolute terms (connections) still act at once."""
    long_ago = PolicyState(desired=4, changed_at=WEDNESDAY - timedelta(hours=1))
    d1, s1 = decide(LoadSnapshot(4, 0, propagation_p95=3.0), WEDNESDAY, long_ago, CFG)
    assert (d1.desired, d1.reason) == (6, "latency")  # ceil(4 x 1.5)
    soon = WEDNESDAY + timedelta(seconds=60)
    d2, s2 = decide(LoadSnapshot(6, 0, propagation_p95=3.0), soon, s1, CFG)
    assert (d2.desired, d2.figures["settling"]) == (6, True)
    d2c, _ = decide(LoadSnapshot(6, 80_000, propagation_p95=3.0), soon, s1, CFG)
    assert (d2c.desired, d2c.reason) == (12, "connections")
    later = WEDNESDAY + timedelta(seconds=PRESSURE_SETTLE)
    d3, _ = decide(LoadSnapshot(6, 0, propagation_p95=3.0), later, s2, CFG)
    assert (d3.desired, d3.reason) == (9, "latency")


def test_reasons_are_documented() -> None:
    assert set(REASONS) == {"connections", "latency", "memory", "season", "peak_hour",
                            "min", "freeze", "steady", "max"}


@settings(max_examples=300, deadline=None)
@given(loads, times, states)
def test_bounds_respected(load: LoadSnapshot, now: datetime, state: PolicyState) -> None:
    d, new = decide(load, now, state, CFG)
    assert CFG.min_replicas <= d.desired <= CFG.max_replicas
    assert d.reason in REASONS
    assert new.desired == d.desired
    assert d.at == now


@settings(max_examples=300, deadline=None)
@given(loads, loads, times, states)
def test_monotone_in_load(a: LoadSnapshot, b: LoadSnapshot, now: datetime,
                          state: PolicyState) -> None:
    lo = dataclasses.replace(
        a, connections=min(a.connections, b.connections),
        propagation_p95=min(a.propagation_p95, b.propagation_p95),
        memory_fraction=min(a.memory_fraction, b.memory_fraction),
        loop_lag=min(a.loop_lag, b.loop_lag),
    )
    hi = dataclasses.replace(
        a, connections=max(a.connections, b.connections),
        propagation_p95=max(a.propagation_p95, b.propagation_p95),
        memory_fraction=max(a.memory_fraction, b.memory_fraction),
        loop_lag=max(a.loop_lag, b.loop_lag),
    )
    assert decide(lo, now, state, CFG)[0].desired <= decide(hi, now, state, CFG)[0].desired


@settings(max_examples=300, deadline=None)
@given(loads, st.integers(0, 24 * 3600 - 1), states)
def test_never_down_on_a_freeze_day(load: LoadSnapshot, second: int,
                                    state: PolicyState) -> None:
    now = SATURDAY.replace(hour=0) + timedelta(seconds=second)
    assert now.weekday() == 5
    previous = state.desired if state.desired is not None else max(1, load.replicas)
    d, _ = decide(load, now, state, CFG)
    assert d.desired >= min(max(previous, CFG.min_replicas), CFG.max_replicas)
    if d.desired == previous and d.figures["target"] < previous:
        assert d.reason == "freeze"


@settings(max_examples=300, deadline=None)
@given(loads, st.integers(1, 80), st.floats(0, CFG.cooldown - 0.001))
def test_scale_up_is_immediate(load: LoadSnapshot, previous: int, elapsed: float) -> None:
    """Even just after a change (inside the cooldown) a higher target is taken at once."""
    now = WEDNESDAY
    state = PolicyState(desired=previous, changed_at=now - timedelta(seconds=elapsed))
    d, _ = decide(load, now, state, CFG)
    target = min(d.figures["target"], CFG.max_replicas)
    if target > previous:
        assert d.desired == target


def _walk(loads_seq: list[int], step: timedelta, start: datetime,
          cfg: AutoscaleSettings = CFG) -> list[tuple[datetime, int, str]]:
    state, out, now = PolicyState(), [], start
    for conns in loads_seq:
        d, state = decide(LoadSnapshot(max(1, state.desired or 2), conns), now, state, cfg)
        out.append((now, d.desired, d.reason))
        now += step
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 400_000), min_size=2, max_size=80), st.integers(1, 400))
def test_cooldown_between_downs(conns: list[int], step_s: int) -> None:
    """No two scale-downs within ``cooldown``, each by one replica; on weekdays only."""
    walk = _walk(conns, timedelta(seconds=step_s), at(2026, 1, 12, 0, 0))  # Monday 00:00
    last_change: datetime | None = walk[0][0]
    for (_, prev, _), (now, desired, _) in itertools.pairwise(walk):
        if desired < prev:
            assert desired == prev - 1
            assert now.weekday() not in CFG.freeze_weekdays
            assert last_change is not None
            assert (now - last_change).total_seconds() >= CFG.cooldown
        if desired != prev:
            last_change = now


def test_scale_down_one_step_per_cooldown() -> None:
    every_minute = timedelta(minutes=1)
    walk = _walk([200_000] + [0] * 60, every_minute, at(2026, 1, 12, 0, 0))
    desired = [d for _, d, _ in walk]
    assert desired[0] == 30  # 200,000 x 1.2 / 8,000
    assert desired[1:5] == [30] * 4  # steady inside the 300 s cooldown
    assert [r for _, _, r in walk[1:5]] == ["steady"] * 4
    assert desired[5] == 29 and desired[10] == 28 and desired[60] == 18


def test_freeze_holds_all_saturday_then_resumes() -> None:
    every_10min = timedelta(minutes=10)
    start = at(2026, 6, 12, 23, 55)  # Friday 23:55
    walk = _walk([100_000] + [0] * 150, every_10min, start)  # until Sunday 01:05
    saturday = [(d, r) for now, d, r in walk if now.weekday() == 5]
    assert saturday and all(d == 15 for d, _ in saturday)
    assert {r for _, r in saturday} == {"freeze"}
    sunday = [d for now, d, _ in walk if now.weekday() == 6]
    assert sunday[0] == 14  # Sunday 00:05: the first step down


def test_first_decision_never_scales_down() -> None:
    d, state = decide(LoadSnapshot(10, 0), at(2026, 1, 12), PolicyState(), CFG)
    assert (d.desired, d.reason) == (10, "steady")
    assert state.changed_at == at(2026, 1, 12)


def test_max_binds_over_everything() -> None:
    d, _ = decide(LoadSnapshot(2, 10_000_000), WEDNESDAY, PolicyState(), CFG)
    assert (d.desired, d.reason) == (CFG.max_replicas, "max")
    # a lowered maximum applies even on a freeze day
    d, _ = decide(LoadSnapshot(2, 0), SATURDAY, PolicyState(desired=80), CFG)
    assert d.desired == CFG.max_replicas


def test_naive_time_refused() -> None:
    with pytest.raises(ValueError):
        decide(LoadSnapshot(2, 0), datetime(2026, 6, 13, 12), PolicyState(), CFG)


def test_decision_is_json_ready() -> None:
    import json

    d, _ = decide(LoadSnapshot(3, 12_345, 0.5, 0.3, 0.01, 10.0, 100.0), SATURDAY,
                  PolicyState(), CFG)
    body = json.loads(json.dumps(d.to_dict()))
    assert body["at"] == "2026-06-13T12:00:00+01:00"
    assert body["ts"] == int(SATURDAY.timestamp() * 1000)
    assert body["load"]["connections"] == 12_345
    assert body["figures"]["terms"]["connections"] == 2
