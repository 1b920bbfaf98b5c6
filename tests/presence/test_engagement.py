"""Pure engagement arithmetic and the report's wire shape (presence/engagement.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from presence.engagement import (
    DAY_MS,
    MAX_DEVICE_LEN,
    RawEngagement,
    build_report,
    day_key,
    day_start_ms,
    expire_at_ms,
    minute_index,
    normalize_device,
    window_days,
)


def ms(text: str) -> int:
    """``"2026-11-22T10:15:30"`` (UTC) -> ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_day_key_and_minute_index_are_utc() -> None:
    assert day_key(ms("2026-11-22T00:00:00")) == "2026-11-22"
    assert day_key(ms("2026-11-22T23:59:59.999")) == "2026-11-22"
    assert day_key(ms("2026-11-23T00:00:00")) == "2026-11-23"
    assert minute_index(ms("2026-11-22T00:00:59")) == 0
    assert minute_index(ms("2026-11-22T10:15:30")) == 615
    assert minute_index(ms("2026-11-22T23:59:59")) == 1439
    assert day_start_ms("2026-11-22") == ms("2026-11-22T00:00:00")
    assert day_key(0) == "1970-01-01"


@given(st.integers(min_value=0, max_value=4_102_444_800_000))  # up to 2100
def test_day_and_minute_decompose_any_instant(t: int) -> None:
    start = day_start_ms(day_key(t))
    assert start <= t < start + DAY_MS
    assert 0 <= minute_index(t) < 1440
    assert start + minute_index(t) * 60_000 <= t < start + (minute_index(t) + 1) * 60_000


def test_window_is_newest_first_and_crosses_months() -> None:
    days = window_days(ms("2026-03-02T08:00:00"), 4)
    assert days == ["2026-03-02", "2026-03-01", "2026-02-28", "2026-02-27"]
    assert len(window_days(ms("2026-03-02T08:00:00"))) == 30
    with pytest.raises(ValueError):
        window_days(0, 0)


def test_expiry_outlives_the_window() -> None:
    day = "2026-11-22"
    expire = expire_at_ms(day)
    assert expire == ms("2026-12-24T00:00:00")  # end of the day + 31 days
    last_reported = ms("2026-12-21T23:59:59")  # the last instant the day is in the window
    assert day in window_days(last_reported)
    assert day not in window_days(last_reported + 1000)
    assert expire > last_reported


def test_normalize_device() -> None:
    assert normalize_device(None) is None
    assert normalize_device("   ") is None
    assert normalize_device(" web ") == "web"
    assert normalize_device("x" * 40) == "x" * MAX_DEVICE_LEN


def test_report_wire_shape() -> None:
    now = ms("2026-11-22T12:00:00")
    raw = RawEngagement(
        online_minutes={"2026-11-22": 60, "2026-11-20": 2, "2026-10-01": 99},
        sessions={"2026-11-22": 3, "2026-11-21": 1, "2026-10-01": 7},
        devices={"web": now - 1000, "mobile": now - 5000, "old": now - 40 * DAY_MS},
    )
    report = build_report(raw, last_seen=now - 60_000, online=False, now=now)
    assert report == {
        "days": [
            {"day": "2026-11-22", "online_seconds": 3600, "sessions": 3},
            {"day": "2026-11-21", "online_seconds": 0, "sessions": 1},
            {"day": "2026-11-20", "online_seconds": 120, "sessions": 0},
        ],
        "online_seconds_30d": 3720,
        "sessions_30d": 4,
        "last_seen": now - 60_000,
        "online": False,
        "devices": ["web", "mobile"],
    }


def test_report_online_and_unknown_user() -> None:
    now = ms("2026-11-22T12:00:00")
    assert build_report(RawEngagement(), None, False, now) == {
        "days": [], "online_seconds_30d": 0, "sessions_30d": 0,
        "last_seen": None, "online": False, "devices": [],
    }
    online = build_report(RawEngagement(), now - DAY_MS, True, now)
    assert online["online"] is True and online["last_seen"] == now


def test_report_clamps_minutes_and_orders_device_ties_by_name() -> None:
    now = ms("2026-11-22T12:00:00")
    raw = RawEngagement(online_minutes={"2026-11-22": 5000}, devices={"b": now, "a": now})
    report = build_report(raw, None, False, now)
    assert report["days"][0]["online_seconds"] == 86_400
    assert report["devices"] == ["a", "b"]
