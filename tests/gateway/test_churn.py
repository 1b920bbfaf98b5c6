"""Churn-risk ingest (gateway/churn_api.py) and the churn feed over real WebSockets."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest

from cluster.base import BackendUnavailable
from cluster.memory import MemoryBroker, MemoryStore
from gateway.churn_api import MAX_BODY, ingest_churn
from gateway.client import ClientError
from presence.churn import ChurnRecord
from presence.churn_ingest import parse_ingest
from presence.messages import ChurnMsg, decode_message
from presence.settings import Settings
from tests.fixtures.servers import GatewayHandle

# The "last published score" baseline needs ChurnRecord.published_score (see
# gateway/churn_api.py); until presence/churn.py has it, moves are measured from the
# last stored score and the slow-drift test is expected to fail.
HAS_PUBLISHED_BASELINE = "published_score" in getattr(ChurnRecord, "__slots__", ())


class Recorder:
    """A real memory broker subscribed to one topic, keeping what it receives."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.messages: list[ChurnMsg] = []
        self.event = asyncio.Event()

    async def start(self, topic: str) -> None:
        await self.broker.start(self._on, self._gap)
        await self.broker.subscribe(topic)

    def _on(self, topic: str, payload: bytes) -> None:
        msg = decode_message(payload)
        assert isinstance(msg, ChurnMsg)
        self.messages.append(msg)
        self.event.set()

    async def _gap(self, topics: Sequence[str]) -> None:
        return None


@pytest.fixture
async def backend() -> tuple[MemoryStore, MemoryBroker, Recorder]:
    store, broker = MemoryStore(), MemoryBroker()
    rec = Recorder(MemoryBroker(broker.bus))
    await rec.start("churn:acme")
    return store, broker, rec


def req(*scores: tuple[str, float], org: str = "acme") -> Any:
    return parse_ingest(
        {"org": org, "scores": [{"supplier": s, "score": v, "model": "v3"} for s, v in scores]}
    )


async def drain() -> None:
    """Let the memory broker's call_soon deliveries run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_first_scores_are_stored_and_published_once(backend: Any) -> None:
    store, broker, rec = backend
    counts = await ingest_churn(store, broker, Settings(), req(("s1", 0.82), ("s2", 0.1)), 1000)
    assert counts == {"accepted": 2, "published": 2, "unchanged": 0}
    await drain()
    assert len(rec.messages) == 1  # one broker message for the whole request
    [msg] = rec.messages
    assert msg.ts == 1000
    assert [(r.supplier, r.band, r.prev_band) for r in msg.records] == [
        ("s1", "critical", None), ("s2", "low", None)]
    stored = await store.churn_get("acme", ["s1", "s2"])
    assert stored["s1"].score == 0.82 and stored["s1"].model == "v3" and stored["s1"].at == 1000


async def test_band_changes_and_small_moves(backend: Any) -> None:
    store, broker, rec = backend
    s = Settings()
    await ingest_churn(store, broker, s, req(("a", 0.50), ("b", 0.58)), 1)
    # a: +0.03 in the same band: unchanged; b: +0.03 crosses 0.60: published
    counts = await ingest_churn(store, broker, s, req(("a", 0.53), ("b", 0.61)), 2)
    assert counts == {"accepted": 2, "published": 1, "unchanged": 1}
    # a moves by exactly min_delta from its last score: published
    counts = await ingest_churn(store, broker, s, req(("a", 0.58)), 3)
    assert counts["published"] == 1
    await drain()
    assert [[(r.supplier, r.score, r.band, r.prev_band) for r in m.records]
            for m in rec.messages] == [
        [("a", 0.50, "medium", None), ("b", 0.58, "medium", None)],
        [("b", 0.61, "high", "medium")],
        [("a", 0.58, "medium", "medium")],
    ]
    stored = await store.churn_get("acme", ["a", "b"])
    assert stored["a"].score == 0.58 and stored["b"].band == "high"


async def test_nothing_published_when_nothing_moved(backend: Any) -> None:
    store, broker, rec = backend
    await ingest_churn(store, broker, Settings(), req(("a", 0.2)), 1)
    counts = await ingest_churn(store, broker, Settings(), req(("a", 0.2)), 2)
    assert counts == {"accepted": 1, "published": 0, "unchanged": 1}
    await drain()
    assert len(rec.messages) == 1
    assert (await store.churn_get("acme", ["a"]))["a"].at == 2  # the latest is stored


async def test_settings_thresholds_and_min_delta_are_used(backend: Any) -> None:
    store, broker, rec = backend
    s = Settings.of(churn_thresholds=(0.1, 0.2, 0.9), churn_min_delta=0.5)
    await ingest_churn(store, broker, s, req(("a", 0.25)), 1)
    counts = await ingest_churn(store, broker, s, req(("a", 0.70)), 2)  # +0.45, same band
    assert counts["published"] == 0
    counts = await ingest_churn(store, broker, s, req(("a", 0.95)), 3)  # band change
    assert counts["published"] == 1
    await drain()
    assert [(r.score, r.band, r.prev_band) for m in rec.messages for r in m.records] == [
        (0.25, "high", None), (0.95, "critical", "high")]


@pytest.mark.xfail(not HAS_PUBLISHED_BASELINE, strict=True,
                   reason="presence/churn.py lacks ChurnRecord.published_score")
async def test_slow_drift_is_published_once_it_adds_up(backend: Any) -> None:
    store, broker, _ = backend
    s = Settings()
    published = []
    for i, score in enumerate((0.32, 0.36, 0.40, 0.44, 0.48)):
        counts = await ingest_churn(store, broker, s, req(("a", score)), i)
        published.append(counts["published"])
    # 0.32 first; 0.36 (+0.04) no; 0.40 (+0.08 from 0.32) yes; 0.44 no; 0.48 yes
    assert published == [1, 0, 1, 0, 1]
    stored = (await store.churn_get("acme", ["a"]))["a"]
    assert stored.score == 0.48
    assert "published_score" not in stored.to_wire()


class FailingBroker(MemoryBroker):
    """A broker whose backend is down (fault injection)."""

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        raise BackendUnavailable("down")


async def test_failed_publication_restores_previous_records() -> None:
    store = MemoryStore()
    await ingest_churn(store, MemoryBroker(), Settings(), req(("a", 0.2)), 1)
    with pytest.raises(BackendUnavailable):
        await ingest_churn(store, FailingBroker(), Settings(), req(("a", 0.9)), 2)
    assert (await store.churn_get("acme", ["a"]))["a"].score == 0.2
    # retrying the same body publishes it
    counts = await ingest_churn(store, MemoryBroker(), Settings(), req(("a", 0.9)), 3)
    assert counts["published"] == 1


# -- HTTP ---------------------------------------------------------------------------------

async def post(gw: GatewayHandle, body: Any, token: str | None = None, raw: bytes | None = None
               ) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = io.BytesIO(raw if raw is not None else json.dumps(body).encode())
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
        f"{gw.admin_url}/v1/churn", data=data, headers=headers
    ) as resp:
        return resp.status, await resp.json()


GOOD = {"org": "acme", "scores": [
    {"supplier": "s1", "score": 0.82, "factors": {"days_since_login": 0.31}, "model": "v3"},
    {"supplier": "s2", "score": 0.2, "model": "v3"},
]}


async def test_http_ingest_good_body(gateway: GatewayHandle) -> None:
    status, body = await post(gateway, GOOD, gateway.token("etl", role="service"))
    assert (status, body) == (200, {"accepted": 2, "published": 2, "unchanged": 0})
    status, body = await post(gateway, GOOD, gateway.token("root", role="admin"))
    assert (status, body) == (200, {"accepted": 2, "published": 0, "unchanged": 2})
    snap = await gateway.node.store.churn_snapshot("acme", 10)
    assert [(r.supplier, r.band) for r in snap] == [("s1", "critical"), ("s2", "low")]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", None),
        (b"", None),
        (b'{"org":"acme","scores":[{"supplier":"s1","score":NaN}]}', None),
        (json.dumps({"org": "ACME", "scores": GOOD["scores"]}).encode(), "org"),
        (json.dumps({"org": "acme", "scores": [*GOOD["scores"], {"supplier": "s3",
                                                                 "score": 1.5}]}).encode(),
         "scores[2].score"),
        (json.dumps({"org": "acme", "scores": [*GOOD["scores"], GOOD["scores"][0]]}).encode(),
         "scores[2].supplier"),
        (b'{"org":"acme","scores":[' + b'{"supplier":"s","score":0.1},' * 60000 + b"1]}",
         None),
    ],
    ids=["invalid-json", "empty", "nan", "org", "score", "duplicate", "over-1mb"],
)
async def test_http_bad_bodies_store_nothing(gateway: GatewayHandle, raw: bytes,
                                             field: str | None) -> None:
    if field is None and len(raw) > 1000:
        assert len(raw) > MAX_BODY
    status, body = await post(gateway, None, gateway.token("etl", role="service"), raw=raw)
    assert status == 400
    assert body["error"] == "bad_request"
    assert body["field"] == field
    assert body["message"]
    assert await gateway.node.store.churn_snapshot("acme", 10) == []


@pytest.mark.parametrize(
    ("role", "status"), [(None, 401), ("bad", 401), ("member", 403), ("csm", 403)]
)
async def test_http_tokens(gateway: GatewayHandle, role: str | None, status: int) -> None:
    token = None
    if role is not None:
        token = "not-a-jwt" if role == "bad" else gateway.token("u", role=role)
    got, body = await post(gateway, GOOD, token)
    assert got == status
    assert body["error"] in ("unauthorized", "forbidden")
    assert await gateway.node.store.churn_snapshot("acme", 10) == []


# -- WebSocket ----------------------------------------------------------------------------

async def test_roles_for_churn_channels(gateway: GatewayHandle) -> None:
    csm = await gateway.client("carol", role="csm")
    reply = await csm.join("churn:acme")
    assert reply["churn"] == [] and "presence" not in reply
    member = await gateway.client("mia", role="member")
    with pytest.raises(ClientError) as info:
        await member.join("churn:acme")
    assert info.value.code == "forbidden"
    # joining a churn channel adds no presence meta
    assert await gateway.node.store.channel_presence("churn:acme") == {}


async def test_join_snapshot_is_ordered_and_capped(gateway: GatewayHandle) -> None:
    scores = [{"supplier": f"s{i:03d}", "score": round(i / 600, 6)} for i in range(520)]
    scores.append({"supplier": "s300-tie", "score": 0.5})  # same score as s300
    status, body = await post(gateway, {"org": "acme", "scores": scores},
                              gateway.token("etl", role="service"))
    assert status == 200 and body["accepted"] == 521
    csm = await gateway.client("carol", role="csm")
    snap = (await csm.join("churn:acme"))["churn"]
    assert len(snap) == 500
    keys = [(-r["score"], r["supplier"]) for r in snap]
    assert keys == sorted(keys)
    assert snap[0]["supplier"] == "s519"
    assert set(snap[0]) == {"supplier", "score", "band", "prev_band", "factors", "model", "at"}


async def test_csm_receives_churn_event(gateway: GatewayHandle) -> None:
    csm = await gateway.client("carol", role="csm")
    await csm.join("churn:acme")
    other = await gateway.client("dan", role="csm")
    await other.join("churn:other")
    status, _ = await post(gateway, GOOD, gateway.token("etl", role="service"))
    assert status == 200
    event = await csm.wait_for(lambda e: e["t"] == "churn", timeout=5)
    assert event["ch"] == "churn:acme"
    assert isinstance(event["ts"], int)
    assert [r["supplier"] for r in event["records"]] == ["s1", "s2"]
    s1 = event["records"][0]
    assert s1 == {"supplier": "s1", "score": 0.82, "band": "critical", "prev_band": None,
                  "factors": {"days_since_login": 0.31}, "model": "v3", "at": s1["at"]}
    assert csm.churn["churn:acme"]["s2"]["band"] == "low"
    # a band change later carries prev_band
    await post(gateway, {"org": "acme", "scores": [{"supplier": "s2", "score": 0.65}]},
               gateway.token("etl", role="service"))
    event = await csm.wait_for(lambda e: e["t"] == "churn", timeout=5)
    assert [(r["supplier"], r["band"], r["prev_band"]) for r in event["records"]] == [
        ("s2", "high", "low")]
    # the other org's subscriber got nothing
    with pytest.raises(TimeoutError):
        await other.next_event(timeout=0.2)


async def test_http_chunked_body_over_limit_is_refused(gateway: GatewayHandle) -> None:
    chunk = b'{"supplier":"s","score":0.1},' * 1000

    async def body() -> Any:
        yield b'{"org":"acme","scores":['
        for _ in range(MAX_BODY // len(chunk) + 2):
            yield chunk
        yield b"1]}"

    headers = {"Authorization": f"Bearer {gateway.token('etl', role='service')}",
               "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            session.post(f"{gateway.admin_url}/v1/churn", data=body(), headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"
    assert await gateway.node.store.churn_snapshot("acme", 10) == []


async def test_demo_drives_presence_and_churn(gateway: GatewayHandle) -> None:
    from gateway.demo import TEAMS, run_demo

    watcher = await gateway.client("watcher", role="csm")
    for team in TEAMS:
        await watcher.join(team)
    await watcher.join("churn:acme")
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_demo(gateway.ws_url, gateway.admin_url, gateway.secret, stop, rng_seed=7))
    try:
        churn = await watcher.wait_for(lambda e: e["t"] == "churn", timeout=10)
        assert churn["ch"] == "churn:acme" and churn["records"]
        diff = await watcher.wait_for(lambda e: e["t"] == "diff" and e.get("joins"), timeout=20)
        assert diff["ch"] in TEAMS
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)

    # every demo connection is closed once it returns: the teams empty out (the
    # watcher's mirrors follow the diffs; the last leaves may still be in flight)
    def only_watcher(_: Any = None) -> bool:
        return all(set(watcher.mirror[t].users()) <= {"watcher"} for t in TEAMS)

    if not only_watcher():
        await watcher.wait_for(lambda e: e["t"] == "diff" and only_watcher(), timeout=10)
