"""Churn-risk records: bands and the "worth publishing" rule.

A record is published to ``churn:<org>`` when its band changed or its score moved by at
least ``min_delta`` since the last stored record of that supplier (the first record of a
supplier is always published).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BANDS = ("low", "medium", "high", "critical")
DEFAULT_THRESHOLDS = (0.30, 0.60, 0.80)
MAX_SNAPSHOT = 500


def band_for(score: float, thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS) -> str:
    """low < t0 <= medium < t1 <= high < t2 <= critical."""
    for name, limit in zip(BANDS, thresholds, strict=False):
        if score < limit:
            return name
    return BANDS[-1]


@dataclass(frozen=True, slots=True)
class ChurnRecord:
    supplier: str
    score: float
    band: str
    prev_band: str | None
    model: str
    at: int
    factors: Mapping[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "supplier": self.supplier,
            "score": self.score,
            "band": self.band,
            "prev_band": self.prev_band,
            "factors": dict(self.factors),
            "model": self.model,
            "at": self.at,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ChurnRecord:
        return cls(
            supplier=str(d["supplier"]),
            score=float(d["score"]),
            band=str(d["band"]),
            prev_band=None if d.get("prev_band") is None else str(d["prev_band"]),
            model=str(d["model"]),
            at=int(d["at"]),
            factors={str(k): float(v) for k, v in (d.get("factors") or {}).items()},
        )


def next_record(
    previous: ChurnRecord | None,
    supplier: str,
    score: float,
    factors: Mapping[str, float],
    model: str,
    now: int,
    thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
    min_delta: float = 0.05,
) -> tuple[ChurnRecord, bool]:
    """The record to store for a new score, and whether it is worth publishing."""
    band = band_for(score, thresholds)
    prev_band = previous.band if previous is not None else None
    record = ChurnRecord(supplier, score, band, prev_band, model, now, dict(factors))
    if previous is None:
        return record, True
    moved = abs(score - previous.score) >= min_delta - 1e-12
    return record, moved or band != previous.band


def snapshot_order(records: list[ChurnRecord], limit: int = MAX_SNAPSHOT) -> list[ChurnRecord]:
    """Highest score first (ties by supplier id, for a stable order), at most ``limit``."""
    return sorted(records, key=lambda r: (-r.score, r.supplier))[:limit]
