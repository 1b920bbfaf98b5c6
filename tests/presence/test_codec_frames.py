"""The wire codecs (presence/codec.py) and request validation (presence/frames.py).

Contracts under test: :func:`decode` is total (a dict with a str ``t``, or
:class:`MalformedFrame`); :func:`parse_request` on any map with a str ``t`` returns a
request or raises :class:`BadRequest` naming the field at fault, except a ``query`` of
more than 100 users, which is :class:`LimitExceeded` (a quota, not a malformed request).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence.codec import (
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    SUBPROTOCOLS,
    Format,
    decode,
    encode,
)
from presence.errors import BadRequest, LimitExceeded, MalformedFrame, PresenceError
from presence.frames import (
    MAX_QUERY_USERS,
    Hello,
    Join,
    Leave,
    Ping,
    Query,
    Update,
    parse_ref,
    parse_request,
)
from presence.meta import MetaPatch

# -- strategies ---------------------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**64 - 1)  # what both orjson and msgpack carry
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
KEYS = st.text(max_size=8)
SCALARS = st.none() | st.booleans() | INT64 | FLOATS | st.text(max_size=20)


def values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
        max_leaves=12,
    )


JSON_VALUES = values(SCALARS)
MSGPACK_VALUES = values(SCALARS | st.binary(max_size=16))


def with_t(body: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda d, t: {**d, "t": t}, body, st.text(max_size=12))


JSON_FRAMES = with_t(st.dictionaries(KEYS, JSON_VALUES, max_size=5))
MSGPACK_FRAMES = with_t(st.dictionaries(KEYS, MSGPACK_VALUES, max_size=5))

# Every code point, lone surrogates included (a text frame from a broken client).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=64)


def json_ish() -> st.SearchStrategy[str]:
    """Arbitrary text, valid JSON of any shape, and valid JSON cut short."""
    docs = JSON_VALUES.map(json.dumps) | JSON_FRAMES.map(json.dumps)
    cut = st.builds(lambda s, n: s[: n % (len(s) + 1)], docs, st.integers(0, 1000))
    return ANY_TEXT | docs | cut


def msgpack_ish() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, valid msgpack of any shape, cut short or with trailing bytes."""
    docs = (MSGPACK_VALUES | MSGPACK_FRAMES).map(lambda v: msgpack.packb(v, use_bin_type=True))
    cut = st.builds(lambda b, n: b[: n % (len(b) + 1)], docs, st.integers(0, 1000))
    extra = st.builds(lambda b, tail: b + tail, docs, st.binary(min_size=1, max_size=4))
    return st.binary(max_size=64) | docs | cut | extra


def check_decoded(data: str | bytes, fmt: Format) -> None:
    try:
        frame = decode(data, fmt)
    except MalformedFrame as exc:
        assert exc.code == "bad_request"
        assert exc.message
        assert exc.field in (None, "t")
        return
    assert isinstance(frame, dict)
    assert isinstance(frame["t"], str)


# -- decode is total ----------------------------------------------------------------------
@settings(max_examples=150)
@given(json_ish())
def test_decode_json_text_gives_a_frame_or_malformed(data: str) -> None:
    check_decoded(data, Format.JSON)
    with pytest.raises(MalformedFrame):  # text on a msgpack connection
        decode(data, Format.MSGPACK)


@settings(max_examples=150)
@given(msgpack_ish())
def test_decode_msgpack_bytes_gives_a_frame_or_malformed(data: bytes) -> None:
    check_decoded(data, Format.MSGPACK)
    with pytest.raises(MalformedFrame):  # binary on a JSON connection
        decode(data, Format.JSON)


@given(JSON_VALUES)
def test_decoded_value_that_is_not_a_frame_names_t_when_it_is_a_map(value: Any) -> None:
    for fmt in Format:
        data: str | bytes = json.dumps(value) if fmt is Format.JSON else msgpack.packb(value)
        if isinstance(value, dict) and isinstance(value.get("t"), str):
            assert decode(data, fmt) == value
            continue
        with pytest.raises(MalformedFrame) as info:
            decode(data, fmt)
        assert info.value.field == ("t" if isinstance(value, dict) else None)


# -- round trips --------------------------------------------------------------------------
@given(JSON_FRAMES)
def test_json_round_trip(frame: dict[str, Any]) -> None:
    data = encode(frame, Format.JSON)
    assert isinstance(data, str)  # a text frame
    assert decode(data, Format.JSON) == frame


@given(MSGPACK_FRAMES)
def test_msgpack_round_trip(frame: dict[str, Any]) -> None:
    data = encode(frame, Format.MSGPACK)
    assert isinstance(data, bytes)  # a binary frame
    assert decode(data, Format.MSGPACK) == frame


def test_decode_examples() -> None:
    assert decode('{"t":"ping","ref":5}', Format.JSON) == {"t": "ping", "ref": 5}
    packed = msgpack.packb({"t": "ping", "ref": 5})
    assert decode(packed, Format.MSGPACK) == {"t": "ping", "ref": 5}
    bad: list[tuple[str | bytes, Format, str | None]] = [
        ("", Format.JSON, None),
        ("{", Format.JSON, None),
        ('[{"t":"ping"}]', Format.JSON, None),
        ("null", Format.JSON, None),
        ('{"t":"ping"} {}', Format.JSON, None),
        ("{}", Format.JSON, "t"),
        ('{"t":1}', Format.JSON, "t"),
        ('{"t":null}', Format.JSON, "t"),
        (b'{"t":"ping"}', Format.JSON, None),
        ('{"t":"ping"}', Format.MSGPACK, None),
        (b"", Format.MSGPACK, None),
        (b"\xc1", Format.MSGPACK, None),  # the one byte msgpack never uses
        (msgpack.packb({1: "x", "t": "ping"}), Format.MSGPACK, None),  # int map key
        (msgpack.packb({"t": b"ping"}), Format.MSGPACK, "t"),  # bin, not str
        (msgpack.packb({"t": "ping"}) + b"\x00", Format.MSGPACK, None),  # extra data
    ]
    for data, fmt, fld in bad:
        with pytest.raises(MalformedFrame) as info:
            decode(data, fmt)
        assert info.value.field == fld, data


def test_subprotocol_selects_the_format() -> None:
    assert SUBPROTOCOLS == ("presence.v1.json", "presence.v1.msgpack")
    assert Format.for_subprotocol(SUBPROTOCOL_MSGPACK) is Format.MSGPACK
    assert Format.for_subprotocol(SUBPROTOCOL_JSON) is Format.JSON
    assert Format.for_subprotocol(None) is Format.JSON  # no subprotocol offered: JSON


# -- parse_request never raises anything else -----------------------------------------------
CHANNEL = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,127}")  # PROTOCOL.md, "Channels"
FIELDS = {"t", "ref", "ch", "meta", "meta.status", "meta.device", "meta.note", "users", "token"}


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five, so that valid requests are common enough."""
    return st.integers(0, 4).flatmap(lambda n: bad if n == 0 else good)


TYPES = mostly(st.sampled_from(("hello", "join", "leave", "update", "query", "ping")),
               st.text(max_size=40))
CHANNELS = mostly(st.from_regex(r"[a-z0-9][a-z0-9_.:-]{0,127}", fullmatch=True),
                  st.text(max_size=130) | JSON_VALUES)
USER_IDS = mostly(
    st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(st.text(max_size=130) | JSON_VALUES, max_size=105) | JSON_VALUES,
)
METAS = mostly(
    st.fixed_dictionaries(
        {},
        optional={
            "status": mostly(st.sampled_from(("online", "away", "busy")), JSON_VALUES),
            "device": mostly(st.text(max_size=32), st.text(max_size=34) | JSON_VALUES),
            "note": mostly(st.text(max_size=128), st.text(max_size=130) | JSON_VALUES),
        },
    ),
    JSON_VALUES,
)
REQUESTS = st.builds(
    lambda t, fields, extra: {**extra, **fields, "t": t},
    TYPES,
    st.fixed_dictionaries(
        {},
        optional={
            "ref": mostly(st.integers(), JSON_VALUES),
            "ch": CHANNELS,
            "meta": METAS,
            "users": USER_IDS,
            "token": mostly(st.text(max_size=10), JSON_VALUES),
        },
    ),
    st.dictionaries(KEYS, JSON_VALUES, max_size=3),
)


@settings(max_examples=200)
@given(REQUESTS)
def test_parse_request_raises_only_bad_request_naming_a_field(frame: dict[str, Any]) -> None:
    try:
        req = parse_request(frame)
    except LimitExceeded as exc:
        assert frame["t"] == "query" and len(frame["users"]) > MAX_QUERY_USERS
        assert exc.field == "users" and exc.code == "limit_exceeded"
        return
    except BadRequest as exc:
        assert exc.code == "bad_request"
        assert exc.field in FIELDS, exc.message
        assert exc.message
        return
    assert isinstance(req, Hello | Join | Leave | Update | Query | Ping)
    assert req.ref == frame.get("ref")
    assert type(req).__name__.lower() == frame["t"]
    if isinstance(req, Join | Leave):
        assert CHANNEL.fullmatch(req.ch)


@given(st.dictionaries(KEYS, JSON_VALUES, max_size=4))
def test_parse_ref_never_raises(frame: dict[str, Any]) -> None:
    ref = parse_ref(frame)
    assert ref is None or (type(ref) is int and ref == frame["ref"])


# -- specific requests ----------------------------------------------------------------------
def bad_field(frame: dict[str, Any]) -> str | None:
    with pytest.raises(BadRequest) as info:
        parse_request(frame)
    assert type(info.value) is BadRequest
    return info.value.field


GOOD_CHANNELS = ["team:w123", "a" * 128, "0", "churn:acme", "a_b.c:d-e", "org:acme:team-1"]
BAD_CHANNELS: list[Any] = [
    "", "a" * 129, "Team:w1", "team:W1", "_team", "-team", ".team", ":team", "team w",
    "tëam", "team/1", "team*", 5, None, ["team"], {"ch": "team"},
    # "$" after re.match would accept a trailing newline; the whole name must match.
    "team\n", "a" * 128 + "\n", "\nteam",
]


@pytest.mark.parametrize("ch", GOOD_CHANNELS)
def test_join_and_leave_accept_valid_channels(ch: str) -> None:
    assert parse_request({"t": "join", "ch": ch}) == Join(None, ch, MetaPatch())
    assert parse_request({"t": "leave", "ref": 2, "ch": ch}) == Leave(2, ch)


@pytest.mark.parametrize("ch", BAD_CHANNELS)
def test_join_and_leave_refuse_invalid_channels(ch: Any) -> None:
    assert bad_field({"t": "join", "ch": ch}) == "ch"
    assert bad_field({"t": "leave", "ch": ch}) == "ch"


def test_join_and_leave_need_a_channel() -> None:
    assert bad_field({"t": "join"}) == "ch"
    assert bad_field({"t": "leave", "ref": 1}) == "ch"


def test_join_with_meta() -> None:
    frame = {"t": "join", "ref": 1, "ch": "team:w123",
             "meta": {"status": "online", "device": "web"}, "extra": [1, 2]}
    assert parse_request(frame) == Join(1, "team:w123", MetaPatch("online", "web", None))
    assert parse_request({"t": "join", "ch": "x", "meta": None}) == Join(None, "x", MetaPatch())
    assert parse_request({"t": "join", "ch": "x", "meta": {}}) == Join(None, "x", MetaPatch())


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"status": "away", "note": "Driving"}, MetaPatch("away", None, "Driving")),
        ({"status": "busy"}, MetaPatch("busy")),
        ({"device": "d" * 32}, MetaPatch(device="d" * 32)),
        ({"device": ""}, MetaPatch(device="")),
        ({"note": "n" * 128}, MetaPatch(note="n" * 128)),
        ({"note": ""}, MetaPatch(note="")),
        ({"status": None, "device": None, "note": None}, MetaPatch()),
        ({"other": 1}, MetaPatch()),
    ],
)
def test_update_valid_meta(meta: dict[str, Any], expected: MetaPatch) -> None:
    assert parse_request({"t": "update", "ref": 3, "meta": meta}) == Update(3, expected)


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ("away", "meta"),
        (["away"], "meta"),
        (5, "meta"),
        ({"status": "offline"}, "meta.status"),
        ({"status": "Online"}, "meta.status"),
        ({"status": ""}, "meta.status"),
        ({"status": 1}, "meta.status"),
        ({"status": ["online"]}, "meta.status"),
        ({"device": "d" * 33}, "meta.device"),
        ({"device": 7}, "meta.device"),
        ({"note": "n" * 129}, "meta.note"),
        ({"note": False}, "meta.note"),
        ({"status": "busy", "note": "n" * 129}, "meta.note"),
    ],
)
def test_update_invalid_meta(meta: Any, field: str) -> None:
    assert bad_field({"t": "update", "meta": meta}) == field
    assert bad_field({"t": "join", "ch": "team:w1", "meta": meta}) == field


def test_update_needs_meta() -> None:
    assert bad_field({"t": "update", "ref": 3}) == "meta"
    assert bad_field({"t": "update", "ref": 3, "meta": None}) == "meta"


def test_query() -> None:
    assert parse_request({"t": "query", "ref": 4, "users": ["u1", "u2"]}) == Query(
        4, ("u1", "u2")
    )
    # Duplicates collapse, order kept.
    assert parse_request({"t": "query", "users": ["b", "a", "b"]}) == Query(None, ("b", "a"))
    hundred = [f"u{i}" for i in range(MAX_QUERY_USERS)]
    assert parse_request({"t": "query", "users": hundred}) == Query(None, tuple(hundred))
    assert parse_request({"t": "query", "users": ["x" * 128]}) == Query(None, ("x" * 128,))


@pytest.mark.parametrize(
    "users", [None, [], "u1", {"u1": 1}, [1], [""], ["x" * 129], ["ok", None]]
)
def test_query_invalid_users(users: Any) -> None:
    frame = {"t": "query", "users": users} if users is not None else {"t": "query"}
    assert bad_field(frame) == "users"


def test_query_of_more_than_100_users_is_limit_exceeded() -> None:
    users = [f"u{i}" for i in range(MAX_QUERY_USERS + 1)]
    with pytest.raises(LimitExceeded) as info:
        parse_request({"t": "query", "ref": 4, "users": users})
    assert not isinstance(info.value, BadRequest)
    assert isinstance(info.value, PresenceError)
    assert info.value.code == "limit_exceeded"
    assert info.value.field == "users"


def test_query_counts_duplicates_once() -> None:
    """Issue 10 item 7: 150 copies of one id are one id, not a quota breach."""
    assert parse_request({"t": "query", "users": ["u1"] * 150}) == Query(None, ("u1",))
    hundred = [f"u{i}" for i in range(MAX_QUERY_USERS)]
    assert parse_request({"t": "query", "users": hundred * 3}) == Query(None, tuple(hundred))
    with pytest.raises(LimitExceeded):
        parse_request({"t": "query", "users": [*hundred, *hundred, "u100"]})


@pytest.mark.parametrize("user", ["\ud800", "u\ud800x", "u1\n", "u\x00", "\x1b[31m", "u\x85"])
def test_query_refuses_unencodable_or_control_ids(user: str) -> None:
    assert bad_field({"t": "query", "users": ["ok", user]}) == "users"


@pytest.mark.parametrize(("meta", "field"), [
    ({"device": "\ud800x"}, "meta.device"),
    ({"note": "x\udfff"}, "meta.note"),
])
def test_meta_text_must_encode(meta: dict[str, Any], field: str) -> None:
    assert bad_field({"t": "update", "meta": meta}) == field
    assert bad_field({"t": "join", "ch": "team:w1", "meta": meta}) == field


def test_meta_free_text_may_hold_a_newline() -> None:
    req = parse_request({"t": "update", "meta": {"note": "line 1\nline 2"}})
    assert req == Update(None, MetaPatch(note="line 1\nline 2"))


@pytest.mark.parametrize("token", ["\ud800", "abc\x00", "a.b.c\n"])
def test_hello_token_must_be_encodable_text(token: str) -> None:
    assert bad_field({"t": "hello", "token": token}) == "token"


def test_hello_and_ping() -> None:
    assert parse_request({"t": "hello", "token": "abc"}) == Hello(None, "abc")
    assert parse_request({"t": "hello", "ref": 0}) == Hello(0, None)  # token in the header
    assert bad_field({"t": "hello", "token": 5}) == "token"
    assert bad_field({"t": "hello", "token": ["abc"]}) == "token"
    assert parse_request({"t": "ping", "ref": 5}) == Ping(5)
    assert parse_request({"t": "ping", "ch": 5, "meta": "x"}) == Ping(None)  # extras ignored


@pytest.mark.parametrize("ref", [0, 1, -1, 2**62, 2**70])
def test_integer_ref_is_echoed(ref: int) -> None:
    assert parse_request({"t": "ping", "ref": ref}) == Ping(ref)
    assert parse_ref({"t": "ping", "ref": ref}) == ref


@pytest.mark.parametrize("ref", [True, False, 1.0, 1.5, "1", [1], {"r": 1}])
def test_ref_must_be_an_integer_and_bool_is_not(ref: Any) -> None:
    assert parse_ref({"t": "ping", "ref": ref}) is None
    assert bad_field({"t": "ping", "ref": ref}) == "ref"
    assert bad_field({"t": "join", "ref": ref, "ch": "team:w1"}) == "ref"


def test_null_ref_is_no_ref() -> None:
    assert parse_request({"t": "ping", "ref": None}) == Ping(None)


@pytest.mark.parametrize("t", ["", "JOIN", "joined", "welcome", "subscribe", "x" * 1000])
def test_unknown_type(t: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request({"t": t, "ref": 9})
    assert info.value.field == "t"
    assert len(info.value.message) < 100  # the echoed type is cut short
