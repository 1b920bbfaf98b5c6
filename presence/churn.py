"""Churn-risk records: bands and the "worth publishing" rule.

A record is published to ``churn:<org>`` when its band changed or its score moved by at
least ``min_delta`` since the score last *published* for that supplier (the first record
of a supplier is always published). Measuring from the last published score rather than
the last stored one means a slow drift (say 0.04 per update) is published once it adds
up to ``min_delta``, so subscribers never hold a score further than that from the truth.
The stored record carries that baseline in ``published_score``, which is not part of
the wire record (``to_wire``) but is kept by the stores (``to_store``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
    # The score last published for this supplier (the base of ``min_delta``); None when
    # it is ``score`` itself. Kept by stores, never sent to clients.
    published_score: float | None = None

    def to_store(self) -> dict[str, Any]:
        """The wire map plus ``published_score`` when set: what a store persists."""
        d = self.to_wire()
        if self.published_score is not None:
            d["published_score"] = self.published_score
        return d

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
            published_score=(
                None if d.get("published_score") is None else float(d["published_score"])
            ),
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
    """The record to store for a new score, and whether it is worth publishing.

    Worth publishing: the first record of a supplier, a band change, or a move of at
    least ``min_delta`` from the score last published. When not published, the record
    keeps the previous baseline in ``published_score``.
    """
    band = band_for(score, thresholds)
    prev_band = previous.band if previous is not None else None
    record = ChurnRecord(supplier, score, band, prev_band, model, now, dict(factors))
    if previous is None:
        return record, True
    base = previous.score if previous.published_score is None else previous.published_score
    if band != previous.band or abs(score - base) >= min_delta - 1e-12:
        return record, True
    return replace(record, published_score=base), False


def snapshot_order(records: list[ChurnRecord], limit: int = MAX_SNAPSHOT) -> list[ChurnRecord]:
    """Highest score first (ties by supplier id, for a stable order), at most ``limit``."""
    return sorted(records, key=lambda r: (-r.score, r.supplier))[:limit]
