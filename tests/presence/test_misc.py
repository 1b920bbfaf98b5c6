"""Settings, churn records, broker messages, rate limits, errors and channel rules:
the small pure modules of presence/, with a fake clock where time matters."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence.channels import channel_allowed, churn_org, is_churn, validate_channel
from presence.churn import (
    BANDS,
    MAX_SNAPSHOT,
    ChurnRecord,
    band_for,
    next_record,
    snapshot_order,
)
from presence.codec import Format, encode
from presence.errors import (
    BadRequest,
    CloseCode,
    Forbidden,
    InternalError,
    LimitExceeded,
    MalformedFrame,
    NotJoined,
    Overloaded,
    PresenceError,
    RateLimited,
    Unauthorized,
    error_frame,
)
from presence.messages import (
    ChurnMsg,
    JoinMsg,
    LeaveMsg,
    decode_message,
    encode_churn,
    encode_join,
    encode_leave,
)
from presence.meta import Meta
from presence.ratelimit import SlidingWindow, TokenBucket

# == churn =====================================================================================


@pytest.mark.parametrize(
    ("score", "band"),
    [
        (0.0, "low"), (0.29999, "low"), (0.30, "medium"), (0.59999, "medium"),
        (0.60, "high"), (0.79999, "high"), (0.80, "critical"), (1.0, "critical"),
    ],
)
def test_band_boundaries(score: float, band: str) -> None:
    assert band_for(score) == band


def test_band_with_custom_thresholds() -> None:
    t = (0.1, 0.2, 0.9)
    assert [band_for(s, t) for s in (0.05, 0.1, 0.2, 0.89, 0.9)] == [
        "low", "medium", "high", "high", "critical"
    ]


@given(st.floats(0, 1), st.floats(0, 1))
def test_band_is_monotonic(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert BANDS.index(band_for(lo)) <= BANDS.index(band_for(hi))


def rec(score: float, supplier: str = "s1", at: int = 1) -> ChurnRecord:
    return ChurnRecord(supplier, score, band_for(score), None, "v3", at, {})


def test_first_record_is_always_published() -> None:
    record, publish = next_record(None, "s1", 0.1, {"tenure": 0.2}, "v3", 1000)
    assert publish
    assert record == ChurnRecord("s1", 0.1, "low", None, "v3", 1000, {"tenure": 0.2})


@pytest.mark.parametrize(
    ("before", "after", "publish"),
    [
        (0.30, 0.34, False),  # same band, moved 0.04
        (0.30, 0.35, True),  # moved exactly min_delta (0.35 - 0.30 < 0.05 in floats)
        (0.45, 0.40, True),  # down by min_delta
        (0.45, 0.41, False),
        (0.50, 0.50, False),
        (0.5999, 0.60, True),  # tiny move, band medium -> high
        (0.80, 0.7999, True),  # tiny move, band critical -> high
    ],
)
def test_next_record_publish_rule(before: float, after: float, publish: bool) -> None:
    previous = rec(before)
    record, worth = next_record(previous, "s1", after, {}, "v4", 2000)
    assert worth is publish
    assert record.prev_band == previous.band
    assert record.band == band_for(after)
    assert (record.score, record.model, record.at) == (after, "v4", 2000)


def test_next_record_uses_its_thresholds_and_delta() -> None:
    _, worth = next_record(rec(0.5), "s1", 0.55, {}, "v3", 2, min_delta=0.1)
    assert not worth
    record, worth = next_record(rec(0.5), "s1", 0.55, {}, "v3", 2, thresholds=(0.1, 0.52, 0.9))
    assert worth and record.band == "high"


records = st.lists(
    st.builds(rec, st.floats(0, 1), st.sampled_from([f"s{i}" for i in range(20)])),
    max_size=40,
)


@given(records, st.integers(0, 50))
def test_snapshot_order_highest_first_and_capped(rs: list[ChurnRecord], limit: int) -> None:
    out = snapshot_order(rs, limit)
    assert len(out) == min(len(rs), limit)
    keys = [(-r.score, r.supplier) for r in out]
    assert keys == sorted(keys)
    # The ones kept are the highest: nothing left out ranks before the last one kept.
    left_out = list(rs)
    for r in out:
        left_out.remove(r)
    if out and left_out:
        assert min((-r.score, r.supplier) for r in left_out) >= keys[-1]


def test_snapshot_default_cap_is_500() -> None:
    rs = [rec(i / 1000, f"s{i:04}") for i in range(600)]
    out = snapshot_order(rs)
    assert len(out) == MAX_SNAPSHOT == 500
    assert out[0].supplier == "s0599" and out[-1].supplier == "s0100"
    tied = snapshot_order([rec(0.5, "b"), rec(0.5, "a"), rec(0.7, "c")])
    assert [r.supplier for r in tied] == ["c", "a", "b"]


# == broker messages ===========================================================================


def test_messages_round_trip() -> None:
    meta = Meta("n1-7", "busy", "mobile", "At the venue", 1_700_000_000_000, 4)
    assert decode_message(encode_join("u1", meta, 123)) == JoinMsg("u1", meta, 123)
    assert decode_message(encode_leave("u1", "n1-7", 99, 124)) == LeaveMsg("u1", "n1-7", 99, 124)
    churn = [
        ChurnRecord("s1", 0.82, "critical", "high", "v3", 5, {"days_since_login": 0.31}),
        ChurnRecord("s2", 0.1, "low", None, "v3", 6, {}),
    ]
    assert decode_message(encode_churn(churn, 125)) == ChurnMsg(tuple(churn), 125)
    assert decode_message(encode_churn([], 126)) == ChurnMsg((), 126)


metas = st.builds(
    Meta,
    conn=st.text(max_size=10),
    status=st.sampled_from(("online", "away", "busy")),
    device=st.text(max_size=32),
    note=st.text(max_size=128),
    since=st.integers(0, 2**53),
    seq=st.integers(1, 2**31),
)


@given(st.text(max_size=10), metas, st.integers(0, 2**53))
def test_join_message_round_trip(user: str, meta: Meta, ts: int) -> None:
    assert decode_message(encode_join(user, meta, ts)) == JoinMsg(user, meta, ts)


ANY = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=8,
)
SHAPED = st.builds(
    lambda k, d: {**d, "k": k},
    st.sampled_from(("j", "l", "c", "x")) | ANY,
    st.fixed_dictionaries({}, optional={
        "u": ANY, "c": ANY, "ls": ANY, "ts": ANY, "r": st.lists(ANY, max_size=2) | ANY,
        "m": st.fixed_dictionaries({}, optional={k: ANY for k in Meta.__slots__}) | ANY,
    }),
)


def check_total(payload: bytes) -> None:
    msg = decode_message(payload)
    assert msg is None or isinstance(msg, JoinMsg | LeaveMsg | ChurnMsg)


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_decode_message_on_garbage_bytes_never_raises(payload: bytes) -> None:
    check_total(payload)


@settings(max_examples=200)
@given(SHAPED | ANY)
def test_decode_message_on_damaged_maps_never_raises(value: Any) -> None:
    payload = msgpack.packb(value, use_bin_type=True)
    check_total(payload)
    check_total(payload[: len(payload) // 2])


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb("j"),
        msgpack.packb({"k": "x", "u": "u1"}),  # a kind from a newer node
        msgpack.packb({"k": "l", "u": "u1", "c": "n1"}),  # fields missing
        msgpack.packb({"k": "l", "u": "u1", "c": "n1", "ls": "soon", "ts": 1}),
        msgpack.packb({"k": "l", "u": "u1", "c": "n1", "ls": math.inf, "ts": 1}),
        msgpack.packb({"k": "j", "u": "u1", "m": [], "ts": 1}),
        msgpack.packb({"k": "c", "r": [{"supplier": "s1"}], "ts": 1}),
        msgpack.packb({"k": "c", "r": 5, "ts": 1}),
    ],
)
def test_decode_message_returns_none_for_what_it_cannot_read(payload: bytes) -> None:
    assert decode_message(payload) is None


# == rate limits ===============================================================================


def test_token_bucket_burst_then_refill() -> None:
    # Powers of two keep the float arithmetic exact.
    bucket = TokenBucket(rate=4.0, burst=8, now=100.0)
    assert [bucket.take(100.0) for _ in range(8)] == [0.0] * 8
    assert bucket.take(100.0) == 0.25  # one token takes 1/rate seconds
    assert bucket.take(100.125) == 0.125  # half a token is back
    assert bucket.take(100.25) == 0.0  # the whole token is back
    assert bucket.take(100.25) == 0.25
    # A long pause refills to the burst and no further.
    assert [bucket.take(1000.0) for _ in range(9)] == [0.0] * 8 + [0.25]


def test_token_bucket_clock_going_back_adds_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == 1.0
    assert bucket.take(6.0) == 0.0


@given(
    st.floats(0.5, 50),
    st.integers(1, 30),
    st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_token_bucket_never_exceeds_burst_plus_rate(
    rate: float, burst: int, gaps: list[float]
) -> None:
    now = start = 1000.0
    bucket = TokenBucket(rate, burst, now)
    taken = 0
    for gap in gaps:
        now += gap
        retry = bucket.take(now)
        if retry == 0.0:
            taken += 1
            continue
        assert 0 < retry <= 1 / rate + 1e-9
        # Retrying after retry_after succeeds (a hair later, for float rounding).
        now += retry + 1e-9
        assert bucket.take(now) == 0.0
        taken += 1
    assert taken <= burst + rate * (now - start) + 1e-6


def test_sliding_window_limit_window_idle() -> None:
    win = SlidingWindow(limit=3, window=60.0)
    assert win.idle(0.0)
    assert [win.hit(t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert win.hit(3.0) == 57.0  # until the event at 0 leaves the window
    assert win.count(3.0) == 3  # the refused hit recorded nothing
    assert win.hit(59.0) == 1.0
    assert win.hit(60.0) == 0.0  # the event at 0 is out at exactly 0 + window
    assert win.count(60.0) == 3
    assert not win.idle(61.5)
    assert win.count(61.5) == 2
    assert win.idle(120.0)
    assert win.count(120.0) == 0


@given(st.integers(1, 5), st.integers(1, 20), st.lists(st.integers(0, 10), max_size=60))
def test_sliding_window_never_holds_more_than_limit(
    limit: int, window: int, gaps: list[int]
) -> None:
    # Whole seconds keep ``first + window - now`` exact.
    win = SlidingWindow(limit, float(window))
    accepted: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        retry = win.hit(now)
        if retry == 0.0:
            accepted.append(now)
        else:
            assert 0 < retry <= window
            assert win.hit(now + retry) == 0.0
            now += retry
            accepted.append(now)
        assert sum(1 for t in accepted if t > now - window) <= limit
        assert win.count(now) == sum(1 for t in accepted if t > now - window)


# == errors ====================================================================================

PROTOCOL_CODES = {
    "bad_request", "forbidden", "not_joined", "rate_limited", "limit_exceeded",
    "overloaded", "internal",
}


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (BadRequest("ch must be a string", field="ch"), "bad_request"),
        (MalformedFrame("frame must be a map"), "bad_request"),
        (Forbidden("no"), "forbidden"),
        (NotJoined("join first"), "not_joined"),
        (LimitExceeded("too many", field="users"), "limit_exceeded"),
        (InternalError("oops"), "internal"),
    ],
)
def test_error_frame_without_retry_after(err: PresenceError, code: str) -> None:
    assert code in PROTOCOL_CODES
    frame = error_frame(err, 7)
    assert frame == {"t": "error", "ref": 7, "code": code, "message": err.message}
    assert error_frame(err, None)["ref"] is None
    for fmt in Format:
        encode(frame, fmt)  # serialisable in both formats


def test_error_frame_with_retry_after() -> None:
    assert error_frame(RateLimited("slow down", retry_after=0.123456), 3) == {
        "t": "error", "ref": 3, "code": "rate_limited", "message": "slow down",
        "retry_after": 0.124,  # rounded up to the millisecond
    }
    frame = error_frame(Overloaded("busy"), None)
    assert frame == {"t": "error", "ref": None, "code": "overloaded", "message": "busy",
                     "retry_after": 1.0}
    assert error_frame(Overloaded("busy", retry_after=2), 1)["retry_after"] == 2.0


def test_error_tree_and_close_codes() -> None:
    assert issubclass(MalformedFrame, BadRequest)
    assert not issubclass(LimitExceeded, BadRequest)
    for cls in (BadRequest, Unauthorized, Forbidden, NotJoined, RateLimited, LimitExceeded,
                Overloaded, InternalError):
        assert issubclass(cls, PresenceError)
    assert Unauthorized("bad token").code == "unauthorized"
    assert BadRequest("x", field="meta.note").field == "meta.note"
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000, "POLICY_VIOLATION": 1008, "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011, "SERVICE_RESTART": 1012, "TRY_AGAIN_LATER": 1013,
        "MALFORMED": 4000, "UNAUTHORIZED": 4001,
    }


# == channels ==================================================================================


@pytest.mark.parametrize(
    ("channel", "patterns", "allowed"),
    [
        ("team:w123", ("team:*",), True),
        ("team:w123:sub", ("team:*",), True),  # * crosses ':'
        ("team", ("team:*",), False),
        ("teams:w1", ("team:*",), False),
        ("org:acme:sales", ("org:acme:*",), True),
        ("org:acme", ("org:acme:*",), False),
        ("org:acmex:sales", ("org:acme:*",), False),
        ("org:other:sales", ("team:w123", "org:acme:*"), False),
        ("team:w123", ("team:w123", "org:acme:*"), True),
        ("team:w124", ("team:w123",), False),
        ("team:w123", ("TEAM:*",), False),  # case-sensitive
        ("team:w123", ("*",), True),
        ("team:w123", (), False),
        ("churn:acme", ("churn:*",), True),
        ("team:w1", ("team:w?",), True),
    ],
)
def test_channel_allowed(channel: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert channel_allowed(channel, patterns) is allowed


def test_churn_channel_names() -> None:
    assert is_churn("churn:acme") and churn_org("churn:acme") == "acme"
    assert not is_churn("team:churn") and not is_churn("churnx")
    assert validate_channel("churn:acme") == "churn:acme"
    with pytest.raises(BadRequest) as info:
        validate_channel("Bad", field="org")
    assert info.value.field == "org"
