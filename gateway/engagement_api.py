"""``GET /v1/engagement?users=u1,u2``: engagement signals for the churn model.

The body is ``{"generated_at": ms, "users": {"u1": report, ...}}`` with one report per
requested user in the shape of :func:`presence.engagement.build_report` (documented in
docs/operations.md, "Engagement signals"). Online time, sessions and devices come from
the node's :class:`~cluster.engagement.EngagementStore`; ``last_seen`` and ``online``
from the presence Store (a user is online while they have presence in some channel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from cluster.base import Store
from cluster.engagement import EngagementStore
from gateway.auth import INGEST_ROLES
from gateway.http import RouteNode, json_response, require_role, users_param
from presence.engagement import WINDOW_DAYS, build_report
from presence.errors import BadRequest

__all__ = ["MAX_USERS", "add_engagement_routes", "engagement_report"]

MAX_USERS = 100
"""At most this many distinct user ids per request."""


async def engagement_report(
    engagement: EngagementStore, store: Store, users: Sequence[str], now: int
) -> dict[str, dict[str, Any]]:
    """One report per user of ``users`` at ``now`` (raises
    :class:`~cluster.base.BackendUnavailable` when a backend cannot be reached)."""
    raw = await engagement.engagement(users, now, WINDOW_DAYS)
    presence = await store.user_presence(users)
    out: dict[str, dict[str, Any]] = {}
    for user in users:
        up = presence.get(user)
        online = up is not None and bool(up.metas)
        last_seen = None if up is None else up.last_seen
        out[user] = build_report(raw[user], last_seen, online, now, WINDOW_DAYS)
    return out


def add_engagement_routes(app: web.Application, node: RouteNode) -> None:
    """Register ``GET /v1/engagement`` (service or admin token) on the admin ``app``.

    Replies: 200 with the reports; 400 ``bad_request`` with ``field: "users"`` for no
    user, more than 100 distinct ids or a bad id (:func:`presence.frames.user_ids`);
    401/403 from :func:`gateway.http.require_role`; 503 ``overloaded`` with
    ``Retry-After`` when a backend is down (rendered by gateway/http.py).
    """

    async def get_engagement(request: web.Request) -> web.Response:
        require_role(request, INGEST_ROLES)
        # bad_request (not limit_exceeded) past the limit: this route always said so.
        users = users_param(request, MAX_USERS, too_many=BadRequest)
        now = node.clock_ms()
        reports = await engagement_report(node.engagement, node.store, users, now)
        return json_response({"generated_at": now, "users": reports})

    app.router.add_get("/v1/engagement", get_engagement)
