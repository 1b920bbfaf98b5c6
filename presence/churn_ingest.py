"""Validation of the body of ``POST /v1/churn`` (PROTOCOL.md, "Internal HTTP API").

:func:`parse_ingest` takes the decoded JSON body and returns an :class:`IngestRequest`,
or raises :class:`presence.errors.BadRequest` whose ``field`` names the first bad value
(``"org"``, ``"scores"``, ``"scores[3].score"``, ``"scores[0].factors.tenure"``). The
whole body is checked before the caller stores anything, so a bad record anywhere
means nothing of the request is stored. It never raises anything but ``BadRequest``,
whatever JSON-like value it is given (property-tested).

Body::

    {"org": "acme",
     "scores": [{"supplier": "s1", "score": 0.82,
                 "factors": {"days_since_login": 0.31}, "model": "v3"}, ...]}

Rules: ``org`` makes a valid channel name after ``churn:``; 1..1000 records; supplier
ids are non-empty strings of at most 128 characters, unique within the request;
``score`` is a number in [0, 1] (booleans and NaN refused); ``factors`` (optional,
default empty) maps at most 32 names of 1..64 characters to finite numbers; ``model``
(optional, default ``"unknown"``) is a string of 1..32 characters. Unknown fields are
ignored, as in the WebSocket protocol.

:func:`plan_ingest` is the rest of the domain rule: given the stored records of the
request's suppliers, the records to store and those worth publishing. It is pure, so
the Store can run it inside its atomic read-modify-write (``Store.churn_update``) and
run it again when another writer got in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from presence.channels import CHURN_PREFIX, validate_channel
from presence.churn import DEFAULT_THRESHOLDS, ChurnRecord, next_record
from presence.errors import BadRequest
from presence.text import check_identifier

__all__ = [
    "MAX_FACTORS",
    "MAX_FACTOR_NAME",
    "MAX_MODEL",
    "MAX_RECORDS",
    "MAX_SUPPLIER",
    "IngestRequest",
    "ScoreIn",
    "parse_ingest",
]

MAX_RECORDS = 1000
MAX_SUPPLIER = 128
MAX_FACTORS = 32
MAX_FACTOR_NAME = 64
MAX_MODEL = 32
DEFAULT_MODEL = "unknown"


@dataclass(frozen=True, slots=True)
class ScoreIn:
    """One validated score of the request."""

    supplier: str
    score: float
    model: str = DEFAULT_MODEL
    factors: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IngestRequest:
    """A validated ingest body: the org and its scores, in request order."""

    org: str
    scores: tuple[ScoreIn, ...]

    @property
    def channel(self) -> str:
        """The churn channel (and broker topic) of the org: ``churn:<org>``."""
        return CHURN_PREFIX + self.org


def _number(value: object) -> float | None:
    """``value`` as a finite float if it is a JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return f if math.isfinite(f) else None


def _org(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise BadRequest("org must be a non-empty string", field="org")
    try:
        validate_channel(CHURN_PREFIX + raw, field="org")
    except BadRequest:
        raise BadRequest(
            "org must make a valid channel name after 'churn:' "
            "(lowercase letters, digits and _.:- ; at most 122 characters)",
            field="org",
        ) from None
    return raw


def _factors(raw: object, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be a map of name to number", field=where)
    if len(raw) > MAX_FACTORS:
        raise BadRequest(f"{where} holds more than {MAX_FACTORS} factors", field=where)
    out: dict[str, float] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_FACTOR_NAME:
            raise BadRequest(
                f"{where} names must be strings of 1 to {MAX_FACTOR_NAME} characters",
                field=where,
            )
        check_identifier(name, where)
        number = _number(value)
        if number is None:
            raise BadRequest(f"{where}.{name} must be a finite number", field=f"{where}.{name}")
        out[name] = number
    return out


def _score(raw: object, where: str) -> ScoreIn:
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be a map", field=where)
    supplier = raw.get("supplier")
    if not isinstance(supplier, str) or not 1 <= len(supplier) <= MAX_SUPPLIER:
        raise BadRequest(
            f"{where}.supplier must be a string of 1 to {MAX_SUPPLIER} characters",
            field=f"{where}.supplier",
        )
    check_identifier(supplier, f"{where}.supplier")
    score = _number(raw.get("score"))
    if score is None or not 0.0 <= score <= 1.0:
        raise BadRequest(f"{where}.score must be a number in [0, 1]", field=f"{where}.score")
    model = raw.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not 1 <= len(model) <= MAX_MODEL:
        raise BadRequest(
            f"{where}.model must be a string of 1 to {MAX_MODEL} characters",
            field=f"{where}.model",
        )
    check_identifier(model, f"{where}.model")
    factors = _factors(raw.get("factors"), f"{where}.factors")
    return ScoreIn(supplier, score, model, factors)


def parse_ingest(body: object) -> IngestRequest:
    """Validate a decoded ``POST /v1/churn`` body; raise :class:`BadRequest` naming the
    first bad field (``field=None`` when the body itself is not a JSON object)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    org = _org(body.get("org"))
    raw_scores = body.get("scores")
    if not isinstance(raw_scores, list) or not raw_scores:
        raise BadRequest("scores must be a non-empty list", field="scores")
    if len(raw_scores) > MAX_RECORDS:
        raise BadRequest(f"scores holds more than {MAX_RECORDS} records", field="scores")
    seen: set[str] = set()
    scores: list[ScoreIn] = []
    for i, raw in enumerate(raw_scores):
        item = _score(raw, f"scores[{i}]")
        if item.supplier in seen:
            raise BadRequest(
                f"scores[{i}].supplier repeats a supplier id of this request",
                field=f"scores[{i}].supplier",
            )
        seen.add(item.supplier)
        scores.append(item)
    return IngestRequest(org, tuple(scores))


@dataclass(frozen=True, slots=True)
class IngestPlan:
    """What one request does given the stored records: every new record (request
    order) and the subset worth publishing."""

    records: tuple[ChurnRecord, ...]
    published: tuple[ChurnRecord, ...]


def plan_ingest(
    req: IngestRequest,
    previous: Mapping[str, ChurnRecord],
    now: int,
    thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
    min_delta: float = 0.05,
) -> IngestPlan:
    """The records to store for ``req`` over ``previous`` (supplier -> stored record,
    absent when none) and those to publish (:func:`presence.churn.next_record`)."""
    records: list[ChurnRecord] = []
    published: list[ChurnRecord] = []
    for s in req.scores:
        record, publish = next_record(previous.get(s.supplier), s.supplier, s.score,
                                      s.factors, s.model, now, thresholds, min_delta)
        records.append(record)
        if publish:
            published.append(record)
    return IngestPlan(tuple(records), tuple(published))
