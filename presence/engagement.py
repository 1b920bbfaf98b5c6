"""Engagement figures for the churn model: pure day arithmetic and the report.

Online time is *sampled*: every gateway node marks each user that has at least one
local connection as online for the current minute of the UTC day (at connection open,
then once a minute). A day's online seconds are the number of distinct minutes marked
times 60, so several devices or several nodes of one user count once, and the minutes
of a node that died simply stop being marked. Sessions are counted at each connection
open; devices are the ``device`` values clients set on their metas.

The stores (``cluster/engagement.py``) keep raw per-day figures (:class:`RawEngagement`);
:func:`build_report` turns them, with the user's last-seen and current presence, into
the wire shape of ``GET /v1/engagement`` (docs/operations.md)::

    {"days": [{"day": "2026-11-22", "online_seconds": 3600, "sessions": 3}, ...],
     "online_seconds_30d": 3600, "sessions_30d": 3,
     "last_seen": 1795372800000, "online": false, "devices": ["web", "mobile"]}

Days are UTC calendar days written ``YYYY-MM-DD``; times are integer ms since the
epoch, always passed in (nothing here reads a clock).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DAY_MS",
    "MAX_DEVICES",
    "MAX_DEVICE_LEN",
    "MINUTES_PER_DAY",
    "RETENTION_DAYS",
    "WINDOW_DAYS",
    "RawEngagement",
    "build_report",
    "day_key",
    "day_start_ms",
    "expire_at_ms",
    "minute_index",
    "normalize_device",
    "window_days",
]

DAY_MS = 86_400_000
MINUTE_MS = 60_000
MINUTES_PER_DAY = 1440
WINDOW_DAYS = 30
"""The report covers the 30 UTC days ending with today (today included)."""
RETENTION_DAYS = 31
"""Raw figures of a day are kept this many days after the end of that day."""
MAX_DEVICES = 20
"""Distinct devices remembered per user (the least recently used one goes first)."""
MAX_DEVICE_LEN = 32
"""Longer device names are cut to this length (the protocol allows no more anyway)."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def day_key(ms: int) -> str:
    """The UTC day of ``ms`` as ``YYYY-MM-DD``."""
    return _day_key(ms // DAY_MS)


# Both run on every connect (the engagement feed prunes a user's days): formatting and
# strptime were an eighth of a connect's CPU, and there are only a few days to know.
@functools.lru_cache(maxsize=128)
def _day_key(day_number: int) -> str:
    return (_EPOCH + dt.timedelta(days=day_number)).strftime("%Y-%m-%d")


@functools.lru_cache(maxsize=128)
def day_start_ms(day: str) -> int:
    """Midnight UTC at the start of ``day`` (``YYYY-MM-DD``), in ms."""
    d = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    return (d - _EPOCH) // dt.timedelta(milliseconds=1)


def minute_index(ms: int) -> int:
    """The minute of the UTC day of ``ms``: 0 (00:00) .. 1439 (23:59)."""
    return (ms % DAY_MS) // MINUTE_MS


def expire_at_ms(day: str) -> int:
    """When the raw figures of ``day`` may go: :data:`RETENTION_DAYS` after its end
    (so a day stays readable for as long as it is inside the report's window)."""
    return day_start_ms(day) + (1 + RETENTION_DAYS) * DAY_MS


def window_days(now: int, days: int = WINDOW_DAYS) -> list[str]:
    """The ``days`` UTC days ending with the day of ``now``, newest first."""
    if days < 1:
        raise ValueError("days must be at least 1")
    today = now - now % DAY_MS
    return [day_key(today - i * DAY_MS) for i in range(days)]


def normalize_device(device: str | None) -> str | None:
    """The device name as stored (stripped, cut to :data:`MAX_DEVICE_LEN`), or None
    for nothing worth recording."""
    if device is None:
        return None
    name = device.strip()[:MAX_DEVICE_LEN]
    return name or None


@dataclass(frozen=True, slots=True)
class RawEngagement:
    """What a store knows of one user, as stored (per UTC day).

    ``online_minutes``: day -> distinct minutes marked online (0..1440);
    ``sessions``: day -> connections opened; ``devices``: device -> last used (ms).
    Days or devices outside the report window may be present; the report drops them.
    """

    online_minutes: Mapping[str, int] = field(default_factory=dict)
    sessions: Mapping[str, int] = field(default_factory=dict)
    devices: Mapping[str, int] = field(default_factory=dict)


def build_report(
    raw: RawEngagement,
    last_seen: int | None,
    online: bool,
    now: int,
    days: int = WINDOW_DAYS,
) -> dict[str, Any]:
    """The wire report of one user (see the module docstring).

    ``days`` lists the days of the window with any activity (online time or a
    session), newest first; the totals add up that list. ``last_seen`` is ``now`` when
    the user is ``online`` (has presence somewhere now), else the Store's last-seen
    (None when unknown). ``devices`` are those used inside the window, most recently
    used first (ties by name).
    """
    window = window_days(now, days)
    rows: list[dict[str, Any]] = []
    for day in window:
        minutes = min(MINUTES_PER_DAY, max(0, int(raw.online_minutes.get(day, 0))))
        sessions = max(0, int(raw.sessions.get(day, 0)))
        if minutes or sessions:
            rows.append({"day": day, "online_seconds": minutes * 60, "sessions": sessions})
    oldest = day_start_ms(window[-1])
    used = [(ms, name) for name, ms in raw.devices.items() if ms >= oldest]
    used.sort(key=lambda item: (-item[0], item[1]))
    return {
        "days": rows,
        "online_seconds_30d": sum(r["online_seconds"] for r in rows),
        "sessions_30d": sum(r["sessions"] for r in rows),
        "last_seen": now if online else last_seen,
        "online": online,
        "devices": [name for _, name in used],
    }
