"""The internal HTTP API on the admin port (PROTOCOL.md, "Internal HTTP API"): routes.

Routes::

    GET /healthz                    200 while the process runs (no token)
    GET /readyz                     200 when ``await node.ready()``, else 503 (no token)
    GET /metrics                    Prometheus text of ``node.metrics.registry``
    GET /admin/stats                admin      node.local_stats() + {"cluster": ...}
    GET /admin/scaling              admin      {"current", "history", "settings"}
    GET /v1/presence?users=u1,u2    service, admin, csm   same body as result.users
    GET /v1/channels/{ch}/presence  service, admin        {"ch", "presence"}

Tokens come as ``Authorization: Bearer <JWT>``; the ``/admin/*`` routes take
:data:`ADMIN_RATE` requests per admin user. Responses, errors and middleware live in
gateway/http.py: handlers here and in other modules raise
:class:`presence.errors.PresenceError` and the middleware renders it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster.autoscaler import Autoscaler
from cluster.base import Store
from gateway import reads
from gateway.admin_server import handler_args
from gateway.auth import Authenticator
from gateway.http import (
    AUTH_KEY,
    RateLimiter,
    RateRule,
    cors_middleware,
    error_middleware,
    error_response,
    json_response,
    metrics_middleware,
    rate_limit_middleware,
    require_role,
    users_param,
)
from gateway.metrics import Metrics
from gateway.reads import Reads
from presence.autoscale import REASONS, Decision
from presence.channels import validate_channel
from presence.settings import Settings

__all__ = [
    "ADMIN_RATE",
    "AUTOSCALER_KEY",
    "NODE_KEY",
    "AdminNode",
    "RateLimiter",
    "error_response",
    "json_response",
    "make_admin_app",
    "metrics_on_decision",
    "require_role",
]

log = structlog.get_logger("presence.admin")

ADMIN_RATE = (10, 60.0)
"""``/admin/*`` requests allowed per admin user: (count, window seconds)."""

ADMIN_ROLES = frozenset({"admin"})
QUERY_ROLES = ("service", "admin", "csm")
CHANNEL_ROLES = ("service", "admin")


class AdminNode(Protocol):
    """What the admin API needs from the gateway node (gateway/node.py provides it)."""

    node_id: str
    settings: Settings
    metrics: Metrics
    auth: Authenticator

    async def ready(self) -> bool: ...

    def local_stats(self) -> dict[str, Any]: ...

    async def cluster_stats(self) -> dict[str, Any]: ...

    @property
    def reads(self) -> Reads: ...

    @property
    def store(self) -> Store: ...


NODE_KEY = web.AppKey("node", AdminNode)
AUTOSCALER_KEY = web.AppKey("autoscaler", Autoscaler)


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "node": request.app[NODE_KEY].node_id})


async def _readyz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    try:
        ready = await node.ready()
    except Exception as exc:  # an unready backend may raise: that is "not ready", not 500
        log.warning("readyz_failed", error=repr(exc))
        ready = False
    return json_response({"ready": ready, "node": node.node_id}, 200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[NODE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _stats(request: web.Request) -> web.Response:
    require_role(request, ADMIN_ROLES)
    node = request.app[NODE_KEY]
    body = dict(node.local_stats())
    body["cluster"] = await node.cluster_stats()
    return json_response(body)


async def _scaling(request: web.Request) -> web.Response:
    require_role(request, ADMIN_ROLES)
    autoscaler = request.app.get(AUTOSCALER_KEY)
    if autoscaler is None:
        settings = dataclasses.asdict(request.app[NODE_KEY].settings.autoscale)
        return json_response({"current": None, "history": [], "settings": settings})
    return json_response(autoscaler.body())


async def _presence(request: web.Request) -> web.Response:
    require_role(request, QUERY_ROLES)
    users = users_param(request)
    return json_response(await request.app[NODE_KEY].reads.query_users(users))


async def _channel_presence(request: web.Request) -> web.Response:
    require_role(request, CHANNEL_ROLES)
    ch = validate_channel(request.match_info["ch"], field="ch")
    presence = await reads.channel_presence(request.app[NODE_KEY].store, ch)
    return json_response({"ch": ch, "presence": presence})


def make_admin_app(node: AdminNode, autoscaler: Autoscaler | None = None) -> web.Application:
    """The admin application; run it with an ``aiohttp.web.AppRunner`` and a
    :class:`gateway.admin_server.AdminSite` (header deadline, socket bound) on the
    admin port.

    Other modules add routes to the returned app (``app.router.add_post(...)``) before
    it starts, reading the node as ``request.app[NODE_KEY]``.
    """
    admin_rule = RateRule("/admin/", ADMIN_ROLES, *ADMIN_RATE)
    app = web.Application(
        middlewares=[metrics_middleware(node.metrics.registry), cors_middleware,
                     error_middleware, rate_limit_middleware(admin_rule)],
        handler_args=handler_args(),  # keep-alive bound (gateway/admin_server.py)
    )
    app[NODE_KEY] = node
    app[AUTH_KEY] = node.auth
    if autoscaler is not None:
        app[AUTOSCALER_KEY] = autoscaler
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/stats", _stats)
    app.router.add_get("/admin/scaling", _scaling)
    app.router.add_get("/v1/presence", _presence)
    app.router.add_get("/v1/channels/{ch}/presence", _channel_presence)
    return app


def metrics_on_decision(metrics: Metrics) -> Callable[[Decision], None]:
    """An ``on_decision`` callback for :class:`Autoscaler` that sets the two gauges:
    ``presence_autoscaler_desired_replicas`` and ``presence_autoscaler_decision_info``
    (1 for the current reason, 0 for the others)."""

    def on_decision(decision: Decision) -> None:
        metrics.desired_replicas.set(decision.desired)
        for reason in REASONS:
            metrics.desired_reason.labels(reason=reason).set(
                1 if reason == decision.reason else 0)

    return on_decision
