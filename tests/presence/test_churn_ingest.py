"""Validation of the ``POST /v1/churn`` body (presence/churn_ingest.py)."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from presence.churn_ingest import (
    DEFAULT_MODEL,
    MAX_FACTORS,
    MAX_RECORDS,
    IngestRequest,
    ScoreIn,
    parse_ingest,
)
from presence.codec import pack
from presence.errors import BadRequest


def body(*scores: dict[str, Any], org: Any = "acme") -> dict[str, Any]:
    return {"org": org, "scores": list(scores)}


def rec(supplier: str = "s1", score: Any = 0.5, **extra: Any) -> dict[str, Any]:
    return {"supplier": supplier, "score": score, **extra}


def field_of(raw: Any) -> str | None:
    with pytest.raises(BadRequest) as info:
        parse_ingest(raw)
    assert info.value.code == "bad_request"
    assert info.value.message
    return info.value.field


def test_good_body_is_parsed_in_order() -> None:
    req = parse_ingest(
        body(
            rec("s1", 0.82, factors={"days_since_login": 0.31, "tickets": 3}, model="v3"),
            rec("s2", 0),
            rec("s3", 1),
            org="acme-weddings.eu",
        )
    )
    assert req == IngestRequest(
        "acme-weddings.eu",
        (
            ScoreIn("s1", 0.82, "v3", {"days_since_login": 0.31, "tickets": 3.0}),
            ScoreIn("s2", 0.0, DEFAULT_MODEL, {}),
            ScoreIn("s3", 1.0, DEFAULT_MODEL, {}),
        ),
    )
    assert req.channel == "churn:acme-weddings.eu"
    assert isinstance(req.scores[1].score, float)


def test_unknown_fields_are_ignored_and_factors_may_be_null() -> None:
    req = parse_ingest({"org": "acme", "extra": 1, "scores": [rec(factors=None, x=[1])]})
    assert req.scores[0].factors == {}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], None),
        ("acme", None),
        (None, None),
        ({"scores": [rec()]}, "org"),
        (body(rec(), org=""), "org"),
        (body(rec(), org="Acme"), "org"),
        (body(rec(), org="acme corp"), "org"),
        (body(rec(), org=7), "org"),
        (body(rec(), org="a" * 123), "org"),
        ({"org": "acme"}, "scores"),
        (body(), "scores"),
        ({"org": "acme", "scores": {"s1": 0.5}}, "scores"),
        (body(*[rec(f"s{i}") for i in range(MAX_RECORDS + 1)]), "scores"),
        (body(rec(), "s2"), "scores[1]"),
        (body(rec(supplier="")), "scores[0].supplier"),
        (body(rec(supplier="x" * 129)), "scores[0].supplier"),
        (body(rec(supplier=12)), "scores[0].supplier"),
        (body(rec("s1"), rec("s2"), rec("s1")), "scores[2].supplier"),
        (body(rec(score=1.01)), "scores[0].score"),
        (body(rec(score=-0.01)), "scores[0].score"),
        (body(rec(score=True)), "scores[0].score"),
        (body(rec(score=math.nan)), "scores[0].score"),
        (body(rec(score=math.inf)), "scores[0].score"),
        (body(rec(score="0.5")), "scores[0].score"),
        (body(rec(score=None)), "scores[0].score"),
        (body(rec(score=10**400)), "scores[0].score"),
        (body({"supplier": "s1"}), "scores[0].score"),
        (body(rec(), rec("s2"), rec("s3"), rec("s4", 2)), "scores[3].score"),
        (body(rec(model="")), "scores[0].model"),
        (body(rec(model="m" * 33)), "scores[0].model"),
        (body(rec(model=3)), "scores[0].model"),
        (body(rec(factors=[1, 2])), "scores[0].factors"),
        (body(rec(factors={"": 1})), "scores[0].factors"),
        (body(rec(factors={"f" * 65: 1})), "scores[0].factors"),
        (body(rec(factors={f"f{i}": 1 for i in range(MAX_FACTORS + 1)})), "scores[0].factors"),
        (body(rec(factors={"tenure": "long"})), "scores[0].factors.tenure"),
        (body(rec(factors={"tenure": math.inf})), "scores[0].factors.tenure"),
        (body(rec(factors={"tenure": False})), "scores[0].factors.tenure"),
        (body(rec(factors={"tenure": 10**400})), "scores[0].factors.tenure"),
        # Issue 10 item 3: text that cannot be encoded, or control characters in ids.
        (body(rec(supplier="\ud800x")), "scores[0].supplier"),
        (body(rec(), rec("s2\udfff")), "scores[1].supplier"),
        (body(rec(supplier="s1\n")), "scores[0].supplier"),
        (body(rec(model="v\ud800")), "scores[0].model"),
        (body(rec(model="v3\x1b")), "scores[0].model"),
        (body(rec(factors={"ten\ud800ure": 0.1})), "scores[0].factors"),
        (body(rec(factors={"tenure\x00": 0.1})), "scores[0].factors"),
    ],
)
def test_bad_bodies_name_the_field(raw: Any, field: str | None) -> None:
    assert field_of(raw) == field


def test_limits_are_inclusive() -> None:
    req = parse_ingest(
        body(
            *[rec(f"s{i}") for i in range(MAX_RECORDS - 1)],
            rec(
                "x" * 128,
                factors={("f" * 62) + f"{i:02d}": -1e300 for i in range(MAX_FACTORS)},
                model="m" * 32,
            ),
            org="a" * 122,
        )
    )
    assert len(req.scores) == MAX_RECORDS
    assert len(req.scores[-1].factors) == MAX_FACTORS


# -- properties ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=20,
)

# Lone surrogates and control characters, which hypothesis leaves out of text by default.
odd_text = st.lists(
    st.characters(categories=["Cs"]) | st.characters(categories=["Cc"]) | st.characters(),
    max_size=4,
).map("".join)
near_score = st.fixed_dictionaries(
    {"supplier": odd_text | st.text(max_size=4) | json_scalars,
     "score": st.floats(-0.5, 1.5) | json_scalars},
    optional={"factors": st.dictionaries(odd_text | st.text(max_size=3), json_scalars,
                                         max_size=3)
              | json_values,
              "model": odd_text | st.text(max_size=3) | json_scalars},
)
near_body = st.fixed_dictionaries(
    {"org": st.sampled_from(["acme", "", "A", "org:x"]) | json_scalars,
     "scores": st.lists(near_score | json_values, max_size=4) | json_values},
)


@given(json_values | near_body)
def test_never_raises_anything_but_bad_request(raw: Any) -> None:
    try:
        req = parse_ingest(raw)
    except BadRequest as exc:
        assert exc.field is None or isinstance(exc.field, str)
        return
    assert req.scores
    # Whatever is accepted can be published and sent in a snapshot.
    for s in req.scores:
        pack([s.supplier, s.model, dict(s.factors)])
        orjson.dumps([s.supplier, s.model, dict(s.factors)])
    for s in req.scores:
        assert 0.0 <= s.score <= 1.0
        assert all(math.isfinite(v) for v in s.factors.values())
    assert len({s.supplier for s in req.scores}) == len(req.scores)


# Identifiers: any character but controls (Cc) and surrogates (Cs), see presence/text.py.
ident_chars = st.characters(exclude_categories=["Cc", "Cs"])
good_score = st.fixed_dictionaries(
    {"supplier": st.text(ident_chars, min_size=1, max_size=128),
     "score": st.floats(0, 1) | st.sampled_from([0, 1])},
    optional={"factors": st.dictionaries(st.text(ident_chars, min_size=1, max_size=64),
                                         st.floats(allow_nan=False, allow_infinity=False),
                                         max_size=MAX_FACTORS),
              "model": st.text(ident_chars, min_size=1, max_size=32)},
)


@given(st.lists(good_score, min_size=1, max_size=20, unique_by=lambda d: d["supplier"]))
def test_every_good_body_is_accepted_unchanged(scores: list[dict[str, Any]]) -> None:
    req = parse_ingest({"org": "acme", "scores": scores})
    assert [s.supplier for s in req.scores] == [d["supplier"] for d in scores]
    assert [s.score for s in req.scores] == [float(d["score"]) for d in scores]
    assert [dict(s.factors) for s in req.scores] == [d.get("factors", {}) for d in scores]
