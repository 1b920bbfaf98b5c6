"""Churn ingest is atomic in the Store, on every backend (memory, Redis Cluster, plain
Redis): two concurrent posts for one supplier can no longer both read the same previous
record and have the later write drop the earlier one's publication baseline."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from cluster.base import Store
from gateway.churn_api import ingest_churn
from presence.churn import ChurnRecord
from presence.churn_ingest import parse_ingest
from presence.messages import ChurnMsg, decode_message
from presence.settings import Settings
from tests.cluster.test_contract import Backend, backend  # noqa: F401 (the fixture)


def req(supplier: str, score: float) -> object:
    return parse_ingest({"org": "acme", "scores": [
        {"supplier": supplier, "score": score, "model": "v3"}]})


def baseline(record: ChurnRecord) -> float:
    """The score subscribers hold for this record (the last one published)."""
    return record.score if record.published_score is None else record.published_score


async def test_concurrent_ingests_keep_the_published_baseline(
    backend: Backend,  # noqa: F811
) -> None:
    store = await backend.store()
    broker, inbox = await backend.broker()
    await broker.subscribe("churn:acme")
    settings = Settings()
    await ingest_churn(store, broker, settings, req("a", 0.30), 1)  # type: ignore[arg-type]
    # +0.06 is worth publishing; +0.03 from 0.30 is not, but it is from what the
    # other post published: whatever the interleaving, the stored baseline must be
    # the score last published.
    for i in range(5):
        up, small = 0.36 + i * 0.2 / 5, 0.33 + i * 0.2 / 5
        await asyncio.gather(
            ingest_churn(store, broker, settings, req("a", up), 10 + i),  # type: ignore[arg-type]
            ingest_churn(store, broker, settings, req("a", small), 20 + i),  # type: ignore[arg-type]
        )
    stored = (await store.churn_get("acme", ["a"]))["a"]

    def published() -> list[float]:
        out = []
        for _t, payload in inbox.got:
            msg = decode_message(payload)
            assert isinstance(msg, ChurnMsg)
            out += [r.score for r in msg.records if r.supplier == "a"]
        return out

    await inbox.until(lambda: bool(published()) and published()[-1] == baseline(stored))


async def test_churn_update_is_atomic(backend: Backend) -> None:  # noqa: F811
    store: Store = await backend.store()
    await store.churn_put("acme", [ChurnRecord("a", 0.0, "low", None, "v3", 0, {})])

    def bump(current: Mapping[str, ChurnRecord]) -> Sequence[ChurnRecord]:
        prev = current["a"]
        return [ChurnRecord("a", round(prev.score + 0.01, 6), prev.band, prev.band, "v3",
                            prev.at + 1, {})]

    await asyncio.gather(*(store.churn_update("acme", ["a"], bump) for _ in range(10)))
    got = (await store.churn_get("acme", ["a"]))["a"]
    assert (got.score, got.at) == (0.1, 10)
