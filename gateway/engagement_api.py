"""``GET /v1/engagement?users=u1,u2``: engagement signals for the churn model.

The body is ``{"generated_at": ms, "users": {"u1": report, ...}}`` with one report per
requested user in the shape of :func:`presence.engagement.build_report` (documented in
docs/operations.md, "Engagement signals"). Online time, sessions and devices come from
the node's :class:`~cluster.engagement.EngagementStore`; ``last_seen`` and ``online``
from the presence Store (a user is online while they have presence in some channel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from cluster.base import BackendUnavailable, Store
from cluster.engagement import EngagementStore
from gateway.admin import json_response, require_role
from gateway.auth import INGEST_ROLES
from presence.engagement import WINDOW_DAYS, build_report
from presence.errors import BadRequest, Overloaded

__all__ = ["MAX_USERS", "EngagementNode", "add_engagement_routes", "engagement_report"]

MAX_USERS = 100
"""At most this many user ids per request."""
MAX_USER_LEN = 128


class EngagementNode(Protocol):
    """What the route needs of the gateway node."""

    @property
    def store(self) -> Store: ...

    @property
    def engagement(self) -> EngagementStore: ...

    @property
    def clock_ms(self) -> Callable[[], int]: ...


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


def parse_users(raw: Sequence[str]) -> list[str]:
    """User ids from ``users`` parameters (repeated or comma-separated): empty and
    duplicate ids dropped, order kept; :class:`BadRequest` naming ``users`` unless
    there are 1 .. :data:`MAX_USERS` ids of at most 128 characters."""
    users = list(dict.fromkeys(u.strip() for part in raw for u in part.split(",") if u.strip()))
    if not users:
        raise BadRequest("users must list at least one user id (users=u1,u2)", field="users")
    if len(users) > MAX_USERS:
        raise BadRequest(f"at most {MAX_USERS} users per request", field="users")
    if any(len(u) > MAX_USER_LEN for u in users):
        raise BadRequest(f"user ids are at most {MAX_USER_LEN} characters", field="users")
    return users


def add_engagement_routes(app: web.Application, node: EngagementNode) -> None:
    """Register ``GET /v1/engagement`` (service or admin token) on the admin ``app``.

    Replies: 200 with the reports; 400 ``bad_request`` with ``field: "users"`` for no
    user, more than 100 or an id over 128 characters; 401/403 from
    :func:`gateway.admin.require_role`; 503 ``overloaded`` with ``Retry-After`` when a
    backend is down.
    """

    async def get_engagement(request: web.Request) -> web.Response:
        require_role(request, INGEST_ROLES)
        users = parse_users(request.query.getall("users", []))
        now = node.clock_ms()
        try:
            reports = await engagement_report(node.engagement, node.store, users, now)
        except BackendUnavailable:
            raise Overloaded("the backend is unavailable, retry later", retry_after=1.0
                             ) from None
        return json_response({"generated_at": now, "users": reports})

    app.router.add_get("/v1/engagement", get_engagement)
