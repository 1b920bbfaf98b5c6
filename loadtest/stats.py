"""Small statistics helpers shared by the bench driver and the acceptance command."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1, nearest rank) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50, p95, p99 and max of ``values`` (any order)."""
    s = sorted(values)
    return {
        "n": len(s),
        "p50": percentile(s, 0.50),
        "p95": percentile(s, 0.95),
        "p99": percentile(s, 0.99),
        "max": float(s[-1]) if s else None,
    }


def fmt(value: float | int | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value:,.{digits}f}{unit}"
