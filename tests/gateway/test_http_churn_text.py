"""POST /v1/churn with text that cannot be encoded (issue 10 item 3), and a fuzz test.

Before the fix, ``"supplier": "\\ud800x"`` passed validation, was stored, then failed
to encode for publication: 500 with a traceback, and every later join of
``churn:<org>`` answered ``internal``, for JSON and msgpack clients alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster.memory import MemoryBroker, MemoryStore
from gateway.churn_api import ingest_churn
from gateway.client import PresenceClient
from presence.churn_ingest import IngestRequest, ScoreIn
from presence.errors import BadRequest
from presence.settings import Settings
from tests.fixtures.servers import GatewayHandle

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def post_raw(http: aiohttp.ClientSession, gw: GatewayHandle, raw: bytes
                   ) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {gw.token('etl', role='service')}"}
    async with http.post(f"{gw.admin_url}/v1/churn", data=raw, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


def dumps(body: Any) -> bytes:
    # ensure_ascii (the default) writes a lone surrogate as a \ud800 escape: what a
    # client in any language can send, since the raw code point is not UTF-8.
    return json.dumps(body).encode()


GOOD = {"supplier": "s1", "score": 0.5, "model": "v3", "factors": {"tenure": 0.2}}
POISON = [
    ({**GOOD, "supplier": "\ud800x"}, "scores[0].supplier"),
    ({**GOOD, "model": "v\udfff"}, "scores[0].model"),
    ({**GOOD, "factors": {"ten\ud800ure": 0.1}}, "scores[0].factors"),
    ({**GOOD, "supplier": "s1\n"}, "scores[0].supplier"),
]


@pytest.mark.parametrize(("record", "field"), POISON,
                         ids=["supplier", "model", "factor", "control"])
async def test_unencodable_text_is_400_stores_nothing_and_channel_stays_joinable(
        gateway: GatewayHandle, http: aiohttp.ClientSession, record: dict[str, Any],
        field: str) -> None:
    canary = await gateway.client("canary")
    status, body = await post_raw(http, gateway, dumps({"org": "acme", "scores": [record]}))
    assert status == 400, body
    assert body["error"] == "bad_request" and body["field"] == field
    assert "Traceback" not in json.dumps(body)
    assert await gateway.node.store.churn_snapshot("acme", 10) == []
    assert (await canary.ping())["t"] == "pong"
    # The org's channel answers both formats, and a good post still reaches them.
    clients: list[PresenceClient] = []
    for fmt in ("json", "msgpack"):
        c = await gateway.client(f"csm-{fmt}", fmt, role="csm")
        assert (await c.join("churn:acme"))["churn"] == []
        clients.append(c)
    status, _ = await post_raw(http, gateway, dumps({"org": "acme", "scores": [GOOD]}))
    assert status == 200
    for c in clients:
        event = await c.wait_for(lambda e: e["t"] == "churn", timeout=5)
        assert [r["supplier"] for r in event["records"]] == ["s1"]


async def test_a_record_that_cannot_be_encoded_is_never_stored() -> None:
    """The last line before the Store: even a request that bypassed parse_ingest."""
    store, broker = MemoryStore(), MemoryBroker()
    req = IngestRequest("acme", (ScoreIn("ok", 0.1), ScoreIn("bad\ud800", 0.9)))
    with pytest.raises(BadRequest) as info:
        await ingest_churn(store, broker, Settings(), req, 1000)
    assert info.value.field == "scores[1]"
    assert await store.churn_snapshot("acme", 10) == []


# -- fuzz: 400 and nothing stored, or 200 and consistent; never anything else -----------

def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five, so that accepted bodies are common enough."""
    return st.integers(0, 4).flatmap(lambda n: bad if n == 0 else good)


# Lone surrogates and control characters, which hypothesis leaves out of text by default.
ODD_TEXT = st.lists(
    st.characters(categories=["Cs"]) | st.characters(categories=["Cc"]) | st.characters(),
    min_size=1, max_size=6,
).map("".join)
GOOD_TEXT = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=8)
TEXT = mostly(GOOD_TEXT, ODD_TEXT)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False) | TEXT)
SCORE = st.fixed_dictionaries(
    {"supplier": mostly(TEXT, SCALARS),
     "score": mostly(st.floats(0, 1), st.floats(-0.2, 1.2) | SCALARS)},
    optional={"model": mostly(TEXT, SCALARS),
              "factors": mostly(st.dictionaries(TEXT, st.floats(-1e6, 1e6), max_size=3),
                                st.dictionaries(TEXT, SCALARS, max_size=2) | SCALARS)},
)
BODY = st.fixed_dictionaries(
    {"org": mostly(st.sampled_from(["acme", "beta"]), TEXT | SCALARS),
     "scores": mostly(st.lists(SCORE, min_size=1, max_size=4,
                               unique_by=lambda d: repr(d["supplier"])),
                      st.lists(SCORE | SCALARS, max_size=3) | SCALARS)},
)
ORGS = ("acme", "beta")


async def snapshots(gw: GatewayHandle) -> dict[str, list[Any]]:
    return {org: await gw.node.store.churn_snapshot(org, 1000) for org in ORGS}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY)
async def test_fuzz_post_churn(gateway: GatewayHandle, http: aiohttp.ClientSession,
                               body: dict[str, Any]) -> None:
    before = await snapshots(gateway)
    status, reply = await post_raw(http, gateway, dumps(body))
    assert status in (200, 400), reply
    if status == 400:
        assert reply["error"] == "bad_request"
        assert await snapshots(gateway) == before
        return
    # What the server read: an escaped surrogate pair ("\ud800\udc00", two code
    # points in ``body``) is one character in JSON.
    sent = json.loads(dumps(body))
    org, scores = sent["org"], sent["scores"]
    assert reply["accepted"] == len(scores)
    stored = await gateway.node.store.churn_get(org, [s["supplier"] for s in scores])
    for s in scores:
        record = stored[s["supplier"]]
        assert math.isclose(record.score, s["score"])
        assert record.model == s.get("model", "unknown")
    for fmt in ("json", "msgpack"):
        c = await PresenceClient.connect(gateway.ws_url, gateway.token("csm", role="csm"), fmt)
        try:
            assert (await c.join(f"churn:{org}"))["t"] == "joined"
        finally:
            await c.close()



# -- fuzz over raw bodies: any JSON-ish text, weird numbers, escapes, bytes -------------

def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


# Number literals JSON parsers disagree about, or that overflow a float or an int64.
ODD_NUMBERS = st.sampled_from([
    "1e400", "-1e400", "1e-400", "-0", "-0.0", "NaN", "-NaN", "Infinity", "-Infinity",
    "1" * 400, "0." + "0" * 400 + "1", "9007199254740993", "1E2", "00", "01", ".5", "5.",
    "+1", "0x10", "1_000", "0.30000000000000004", "4.9e-324", "1.7976931348623157e308",
])
NUMBER_TEXT = mostly(st.floats(0, 1).map(repr) | st.integers(-5, 5).map(str),
                     ODD_NUMBERS | st.floats().map(repr) | st.integers().map(str))
# Escapes a client can write in JSON text: lone or reversed surrogates, NUL, bad escapes.
ODD_STRINGS = st.sampled_from([
    '"\\ud800"', '"x\\udfff"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"',
    '"a\\nb"', '"\\x41"', '"\\u12"', '"unterminated', '""', '"\\\\"', '"\u2028"',
])
STRING_TEXT = mostly(GOOD_TEXT.map(json.dumps), ODD_STRINGS | TEXT.map(json.dumps))
LEAF_TEXT = NUMBER_TEXT | STRING_TEXT | st.sampled_from(["true", "false", "null"])
JSONISH = st.recursive(
    LEAF_TEXT,
    lambda inner: (st.lists(inner, max_size=3).map(_array)
                   | st.lists(st.tuples(STRING_TEXT, inner), max_size=3).map(_object)),
    max_leaves=10,
)
ORG_TEXT = mostly(st.sampled_from(['"acme"', '"beta"']), STRING_TEXT | JSONISH)


def often(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten: a body has several fields, each may go wrong."""
    return st.integers(0, 9).flatmap(lambda n: bad if n == 0 else good)


SCORE_TEXT = st.tuples(
    often(STRING_TEXT, JSONISH), often(NUMBER_TEXT, JSONISH),
    st.none() | often(STRING_TEXT, JSONISH),
    st.none() | often(st.lists(st.tuples(STRING_TEXT, NUMBER_TEXT), max_size=2)
                      .map(_object), JSONISH),
).map(lambda t: _object([('"supplier"', t[0]), ('"score"', t[1])]
                        + ([('"model"', t[2])] if t[2] is not None else [])
                        + ([('"factors"', t[3])] if t[3] is not None else [])))
SHAPED = st.tuples(ORG_TEXT, often(st.lists(SCORE_TEXT, min_size=1, max_size=3)
                                   .map(_array), JSONISH)).map(
    lambda t: _object([('"org"', t[0]), ('"scores"', t[1])]))
RAW_BODY = st.one_of(
    SHAPED.map(str.encode),
    SHAPED.map(str.encode),
    JSONISH.map(str.encode),
    SHAPED.map(lambda s: s.encode()[: len(s) // 2]),          # truncated
    st.binary(max_size=64),                                   # not even UTF-8
    SHAPED.map(lambda s: b"\xef\xbb\xbf" + s.encode()),         # a byte-order mark
    SHAPED.map(lambda s: s.encode("utf-16")),
)


def store_contents(gw: GatewayHandle) -> dict[str, dict[str, Any]]:
    """Every churn record of the memory Store, whatever org a body named."""
    store = gw.node.store
    assert isinstance(store, MemoryStore)
    return {org: dict(recs) for org, recs in store._churn.items()}


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=RAW_BODY)
async def test_fuzz_post_churn_raw_bodies(gateway: GatewayHandle, http: aiohttp.ClientSession,
                                          raw: bytes) -> None:
    """Any body: 200, or a 4xx with a JSON error that stored nothing; never a 5xx."""
    before = store_contents(gateway)
    status, reply = await post_raw(http, gateway, raw)
    event(f"status {status}")
    assert status == 200 or 400 <= status < 500, (status, reply)
    if status != 200:
        assert isinstance(reply, dict) and reply["error"], reply
        assert store_contents(gateway) == before
        return
    body = json.loads(raw)
    assert reply["accepted"] == len(body["scores"])
    org = body["org"]
    assert set(store_contents(gateway)[org]) >= {s["supplier"] for s in body["scores"]}
    c = await PresenceClient.connect(gateway.ws_url, gateway.token("csm", role="csm"), "msgpack")
    try:
        assert (await c.join(f"churn:{org}"))["t"] == "joined"
    finally:
        await c.close()
