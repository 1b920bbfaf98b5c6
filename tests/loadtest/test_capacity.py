"""The capacity model's arithmetic (``loadtest/capacity.py``, docs/capacity.md), pure."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from loadtest import capacity as cap


def _costs(**kw: float) -> cap.UnitCosts:
    base = dict(
        gw_us_per_update=200.0, gw_us_per_broker_msg=100.0, gw_idle_us_per_s=0.0,
        gw_idle_us_per_conn_s=0.0, gw_kb_per_conn=16.0, gw_base_mb=60.0,
        gw_mirror_bytes_per_meta=0.0, diff_bytes=200.0, update_bytes=64.0,
        redis_us_per_update=50.0, redis_us_per_msg_out=2.0, redis_us_per_command=5.0,
        redis_idle_us_per_s=0.0, redis_cmds_per_update=8.0, redis_sent_per_update=3.0,
        redis_in_bytes_per_update=800.0, redis_out_bytes_per_update=400.0,
        redis_out_bytes_per_msg=180.0, redis_repl_bytes_per_update=400.0,
        redis_bytes_per_conn=2000.0, redis_bytes_per_subscription=300.0)
    base.update(kw)
    return cap.UnitCosts(**base)


def test_distinct_gateways_of_a_team() -> None:
    assert cap.distinct_gateways(20, 1) == 1.0
    assert cap.distinct_gateways(20, 2) == pytest.approx(2.0, abs=1e-5)
    assert cap.distinct_gateways(20, 3) == pytest.approx(3 * (1 - (2 / 3) ** 20))
    assert cap.distinct_gateways(20, 100) == pytest.approx(18.21, abs=0.01)
    # never more gateways than members, nor than gateways
    assert cap.distinct_gateways(20, 10_000) < 20
    assert cap.distinct_gateways(5, 3) <= 3


def test_fit_line() -> None:
    assert cap.fit_line([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))
    assert cap.fit_line([2, 2], [4, 6]) == (5.0, 0.0)
    assert cap.fit_line([1], [9]) == (9.0, 0.0)
    with pytest.raises(ValueError):
        cap.fit_line([], [])


def test_load_of_the_june_saturday() -> None:
    f = cap.fleet(_costs(), cap.Scenario())
    ld = f["load"]
    assert ld["connections"] == 1_000_000
    assert ld["updates_per_s"] == pytest.approx(1_000_000 / 30)
    assert ld["deliveries_per_s"] == pytest.approx(1_000_000 / 30 * 19)
    assert ld["teams"] == 50_000
    g = f["gateways"]["count"]
    assert ld["broker_messages_per_update"] == pytest.approx(cap.distinct_gateways(20, g))
    # the heavier reading: season and peak hour multiply the per-user rate as well
    heavy = cap.fleet(_costs(), cap.Scenario(rate_factor=6.0))["load"]
    assert heavy["updates_per_s"] == pytest.approx(200_000)


def test_gateways_by_cpu_carry_their_own_broker_messages() -> None:
    c = _costs()
    s = cap.Scenario()
    g = cap.fleet(c, s)["gateways"]
    n = g["by_cpu"]
    cores = lambda k: s.users / 30 * (200 + 100 * cap.distinct_gateways(20, k)) / 1e6  # noqa: E731
    assert cores(n) / n <= s.gateway_cpu_target
    assert cores(n - 1) / (n - 1) > s.gateway_cpu_target
    assert g["by_connections"] == 100
    assert g["count"] == max(g["by_cpu"], g["by_connections"], g["by_memory"])
    assert g["cpu_per_gateway"] == pytest.approx(cores(g["count"]) / g["count"])


def test_connections_bind_when_cpu_is_cheap() -> None:
    g = cap.fleet(_costs(gw_us_per_update=1.0, gw_us_per_broker_msg=1.0),
                  cap.Scenario())["gateways"]
    assert g["count"] == g["by_connections"] == 100
    assert g["connections_per_gateway"] == 10_000


def test_gateway_memory_counts_connections_and_mirrored_teams() -> None:
    c = _costs(gw_mirror_bytes_per_meta=600.0)
    s = cap.Scenario()
    g = cap.fleet(c, s)["gateways"]
    n = g["count"]
    channels = 50_000 * (1 - (1 - 1 / n) ** 20)
    expected = 60 + (1_000_000 / n * (16 * 1024 - 600) + channels * 20 * 600) / 2**20
    assert g["channels_per_gateway"] == pytest.approx(channels)
    assert g["rss_mb_per_gateway"] == pytest.approx(expected)
    # a tight limit makes memory the binding count
    tight = cap.fleet(c, replace(s, gateway_memory_limit_mb=100.0))["gateways"]
    assert tight["count"] == tight["by_memory"] > g["count"]
    assert tight["rss_mb_per_gateway"] <= 80.0


def test_redis_masters_from_cpu() -> None:
    c = _costs(redis_idle_us_per_s=10_000.0)
    s = cap.Scenario()
    f = cap.fleet(c, s)
    r = f["redis"]
    msgs = f["load"]["broker_messages_per_update"]
    work = (s.users / 30 * (50 + 2 * msgs) + s.users * 2 / 60 * 5) / 1e6
    assert r["masters"] == math.ceil(work / (0.5 - 0.01))
    assert r["cpu_per_master"] <= 0.5
    assert r["commands_per_s"] == pytest.approx(s.users / 30 * 8 + s.users * 2 / 60)
    assert r["pubsub_messages_per_s_per_master"] == pytest.approx(
        s.users / 30 * msgs / r["masters"])
    assert r["subscriptions"] == pytest.approx(50_000 * msgs)


def test_key_kind() -> None:
    assert cap.key_kind("presence:user:{u1}:chans:c-1f") == "user:{}:chans"
    assert cap.key_kind("presence:user:{a:b}:online:2026-06-13") == "user:{}:online"
    assert cap.key_kind("presence:ch:{team:x}:metas") == "ch:{}:metas"
    assert cap.key_kind("presence:nodes") == "nodes"
    assert cap.key_kind("presence:{nodes}:refreshed") == "{}:refreshed"


def _point(n: int, gw: float, redis: float, **kw: float) -> dict[str, object]:
    return {"gateways": n, "updates": 10_000, "broker_in_per_update": float(n),
            "frames_per_delivery": 1.0,
            "gw_cpu_us_per_update_net": gw, "redis_cpu_us_per_update_net": redis,
            "redis_out_bytes_per_update": 400.0 + 180.0 * n, "gw_kb_per_conn": 16.0,
            "gw_base_mb": 60.0, "diff_bytes": 200.0, "update_bytes": 64.0,
            "redis_cpu_us_per_command": 5.0, "redis_cmds_per_update": 8.0,
            "redis_sent_per_update": 3.0, "redis_in_bytes_per_update": 800.0,
            "redis_repl_bytes_per_update": 400.0, "redis_bytes_per_conn": 2000.0,
            "per_gateway": [{"connections": 2000 / n, "idle_cpu_per_s": 0.01}] * n,
            "redis_masters": {"7900": {"idle_cpu_per_s": 0.005}}, **kw}


def test_unit_costs_slopes_from_every_point_intercepts_from_the_chosen() -> None:
    pts = [_point(1, 300.0, 40.0), _point(2, 400.0, 45.0), _point(3, 500.0, 50.0)]
    c = cap.unit_costs(pts, {"mirror_bytes_per_meta": 600.0})
    assert c.gw_us_per_update == pytest.approx(200.0)
    assert c.gw_us_per_broker_msg == pytest.approx(100.0)
    assert c.redis_us_per_update == pytest.approx(35.0)
    assert c.redis_us_per_msg_out == pytest.approx(5.0)
    assert c.redis_out_bytes_per_msg == pytest.approx(180.0)
    assert c.gw_idle_us_per_s == pytest.approx(10_000.0)
    assert c.gw_idle_us_per_conn_s == 0.0
    # the fan-out measurement gives Redis's slope when it is the larger
    assert cap.unit_costs(pts, {}, {"us_per_message_out": 1.0}).redis_us_per_msg_out == \
        pytest.approx(5.0)
    c2 = cap.unit_costs(pts, {}, {"us_per_message_out": 9.0})
    assert c2.redis_us_per_msg_out == 9.0
    assert c2.redis_us_per_update == pytest.approx(27.0)
    # one point's own intercept
    c3 = cap.unit_costs(pts, {}, only=[pts[2]])
    assert c3.gw_us_per_update == pytest.approx(200.0)
    pts[2]["gw_cpu_us_per_update_net"] = 560.0
    c4 = cap.unit_costs(pts, {}, only=[pts[2]])
    assert c4.gw_us_per_update == pytest.approx(560.0 - 3 * c4.gw_us_per_broker_msg)


def test_by_gateways_takes_median_and_range_per_count() -> None:
    pts = [_point(1, 300.0, 40.0), _point(1, 340.0, 40.0), _point(1, 320.0, 40.0),
           _point(2, 400.0, 40.0)]
    s = cap.by_gateways(pts)
    assert s["1"]["gw_cpu_us_per_update_net"] == {"median": 320.0, "min": 300.0,
                                                  "max": 340.0}
    assert s["1"]["points"] == 3
    assert s["2"]["gw_cpu_us_per_update_net"]["median"] == 400.0


def test_policy_at_a_million_connections_hits_the_default_maximum() -> None:
    p = cap.policy_at(1_000_000, 100)
    assert p["terms"]["connections"] == 150
    assert (p["desired"], p["reason"]) == (50, "max")
    assert cap.policy_at(1_000_000, 100, max_replicas=200)["desired"] == 150


def test_points_that_merged_updates_are_left_out() -> None:
    pts = [_point(1, 300.0, 40.0), _point(2, 400.0, 45.0), _point(3, 500.0, 50.0),
           _point(1, 100.0, 10.0, frames_per_delivery=0.5)]
    assert not cap.representative(pts[3])
    c = cap.unit_costs(pts, {})
    assert (c.gw_us_per_update, c.gw_us_per_broker_msg) == pytest.approx((200.0, 100.0))
    assert [e["gateways"] for e in cap.model(pts, {})["fleet_from_each_point"]] == [1, 2, 3]
    with pytest.raises(ValueError):
        cap.unit_costs(pts[3:], {})
