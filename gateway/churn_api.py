"""``POST /v1/churn``: churn-risk scores in, ``churn`` events out (PROTOCOL.md).

:func:`ingest_churn` is the whole effect of one validated request: in ONE atomic
read-modify-write of the Store (``Store.churn_update``), read the previous record of
every supplier, compute each new record and whether it is worth publishing
(:func:`presence.churn_ingest.plan_ingest`) and store the new records; then publish ONE
broker message on ``churn:<org>`` holding the records worth publishing. Two concurrent
posts for one supplier therefore never both start from the same previous record: the
Store runs the second one's computation again on the first one's result, so the
publication baseline is never lost and nothing is published that the Store does not
hold.

Which score "moved by at least ``churn_min_delta``" is measured from: the last
*published* score of the supplier, not the last stored one. Measured from the last
stored score, a score drifting by 0.04 per call would never be published until it
crossed a band threshold, and subscribers would keep a value ever further from the
truth; measured from the last published one, the drift is published once it adds up
to ``churn_min_delta``, so what subscribers hold is never more than ``churn_min_delta``
from the stored score. The baseline travels with the stored record
(``ChurnRecord.published_score``, set by :func:`presence.churn.next_record`, persisted
by the stores, never sent to clients), so this function only stores what
``next_record`` returns. A band change is always published, so the band of the stored
record is always the band last published.

Ordering: the records are stored first, then published, as presence updates are, so
that a client joining at any moment either reads the new records in its snapshot or
receives them in the event. Every record is encoded for both client formats (JSON and
msgpack), and the broker payload built, BEFORE anything is stored: a record the
service could store but not publish or send in a snapshot would poison the org's
channel (issue 10), so such a request is refused with nothing stored. If the
publication fails, the published suppliers' previous records are put back, so that
retrying the same body publishes them again (a supplier seen for the first time stays
stored: the Store has no delete). That undo is atomic too and only touches a record
that is still the one this request stored: a later post's record is never undone.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from cluster.base import BackendUnavailable, Broker, Store
from gateway.auth import INGEST_ROLES
from gateway.http import RouteNode, json_response, read_body, require_role
from presence.churn import ChurnRecord
from presence.churn_ingest import IngestPlan, IngestRequest, parse_ingest, plan_ingest
from presence.codec import Format, encode
from presence.errors import BadRequest
from presence.messages import encode_churn
from presence.settings import Settings

__all__ = ["BODY_TIMEOUT", "MAX_BODY", "add_churn_routes", "ingest_churn"]

MAX_BODY = 1024 * 1024
"""Largest accepted request body, in bytes (1,000 records with 32 factors fit easily)."""

BODY_TIMEOUT = 10.0
"""Seconds the whole body may take to arrive once its headers have (else 408): 1 MiB
at 100 KiB/s. A trickled body would otherwise hold a handler and a socket for good."""


def check_encodable(channel: str, records: Sequence[ChurnRecord], now: int) -> None:
    """Raise :class:`BadRequest` naming ``scores[i]`` unless every record encodes in both
    client formats (snapshot and event frames carry the wire map as it is).

    :func:`presence.churn_ingest.parse_ingest` already refuses the text that breaks
    encoders; this is the last line before the Store, so that no future field or rule
    can store what cannot be sent.
    """
    for i, record in enumerate(records):
        frame = {"t": "churn", "ch": channel, "ts": now, "records": [record.to_wire()]}
        for fmt in Format:
            try:
                encode(frame, fmt)
            except (TypeError, ValueError, OverflowError):  # orjson/msgpack encode errors
                raise BadRequest(f"scores[{i}] cannot be encoded for clients",
                                 field=f"scores[{i}]") from None


async def ingest_churn(
    store: Store, broker: Broker, settings: Settings, req: IngestRequest, now: int
) -> dict[str, int]:
    """Store the request's records and publish those worth it; return the counts
    ``{"accepted": n, "published": p, "unchanged": n - p}``.

    Raises :class:`BadRequest` (nothing stored) when a record cannot be encoded, and
    :class:`cluster.base.BackendUnavailable` when the Store or the Broker cannot be
    reached (nothing is published then; see the module docstring for what is kept).
    """
    suppliers = [s.supplier for s in req.scores]
    plan: IngestPlan | None = None
    payload = b""

    def step(previous: Mapping[str, ChurnRecord]) -> Sequence[ChurnRecord]:
        # Runs inside the Store's atomic update, again if another writer got in.
        nonlocal plan, payload
        plan = plan_ingest(req, previous, now, settings.churn.churn_thresholds,
                           settings.churn.churn_min_delta)
        check_encodable(req.channel, plan.records, now)
        payload = encode_churn(list(plan.published), now) if plan.published else b""
        return plan.records

    previous = await store.churn_update(req.org, suppliers, step)
    assert plan is not None
    records, published = plan.records, plan.published
    if published:
        try:
            await broker.publish([(req.channel, payload)])
        except BackendUnavailable:
            ours = {r.supplier: r for r in published if r.supplier in previous}

            def undo(current: Mapping[str, ChurnRecord]) -> Sequence[ChurnRecord]:
                return [previous[s] for s, r in ours.items() if current.get(s) == r]

            if ours:
                # The publication's error is the one to report.
                with contextlib.suppress(BackendUnavailable):
                    await store.churn_update(req.org, list(ours), undo)
            raise
    n = len(records)
    return {"accepted": n, "published": len(published), "unchanged": n - len(published)}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def add_churn_routes(app: web.Application, node: RouteNode) -> None:
    """Register ``POST /v1/churn`` (service or admin token) on the admin ``app``.

    Replies: 200 with the counts of :func:`ingest_churn`; 400
    ``{"error": "bad_request", "message": ..., "field": ...}`` for a body that is not
    JSON, is larger than 1 MiB or breaks a rule of :mod:`presence.churn_ingest`
    (nothing stored); 408 for a body slower than :data:`BODY_TIMEOUT`; 401/403 from
    :func:`gateway.http.require_role`; 503 ``{"error": "overloaded", ...}`` with
    ``Retry-After`` when the backend is down (rendered by gateway/http.py).
    """

    async def post_churn(request: web.Request) -> web.StreamResponse:
        require_role(request, INGEST_ROLES)
        raw = await read_body(request, MAX_BODY, BODY_TIMEOUT)
        try:
            # NaN and Infinity are not JSON, whatever Python's json accepts.
            body: Any = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise BadRequest("the body is not valid JSON") from None
        req = parse_ingest(body)
        return json_response(
            await ingest_churn(node.store, node.broker, node.settings, req, _now_ms()))

    app.router.add_post("/v1/churn", post_churn)
