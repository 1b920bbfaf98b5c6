"""The internal HTTP API on the admin port (PROTOCOL.md, "Internal HTTP API"), aiohttp.

Routes::

    GET /healthz                    200 while the process runs (no token)
    GET /readyz                     200 when ``await node.ready()``, else 503 (no token)
    GET /metrics                    Prometheus text of ``node.metrics.registry``
    GET /admin/stats                admin      node.local_stats() + {"cluster": ...}
    GET /admin/scaling              admin      {"current", "history", "settings"}
    GET /v1/presence?users=u1,u2    service, admin, csm   same body as result.users
    GET /v1/channels/{ch}/presence  service, admin        {"ch", "presence"}

Tokens come as ``Authorization: Bearer <JWT>``. Errors are JSON
``{"error": <code>, "message": ..., "field": <name or null>}``: 401 ``unauthorized``
(missing or invalid token), 403 ``forbidden`` (role), 400 ``bad_request`` /
``limit_exceeded`` (field named), 429 ``rate_limited`` with ``Retry-After`` (the
``/admin/*`` routes take 10 requests per minute per admin user), 404/405 for unknown
routes or methods. Handlers added by other modules use :func:`require_role` and may
raise any :class:`presence.errors.PresenceError`: the error middleware renders it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster.autoscaler import Autoscaler
from gateway.auth import Authenticator, Claims, bearer_token
from gateway.metrics import Metrics
from presence.autoscale import REASONS, Decision
from presence.channels import validate_channel
from presence.errors import (
    BadRequest,
    Forbidden,
    LimitExceeded,
    NotJoined,
    Overloaded,
    PresenceError,
    RateLimited,
    Unauthorized,
)
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

MAX_QUERY_USERS = 100
"""At most this many ids per ``/v1/presence`` request (as the WebSocket ``query``)."""


class AdminNode(Protocol):
    """What the admin API needs from the gateway node (gateway/node.py provides it)."""

    node_id: str
    settings: Settings
    metrics: Metrics
    auth: Authenticator

    async def ready(self) -> bool: ...

    def local_stats(self) -> dict[str, Any]: ...

    async def cluster_stats(self) -> dict[str, Any]: ...

    async def query_users(self, users: Sequence[str]) -> dict[str, Any]: ...

    async def channel_presence(self, ch: str) -> dict[str, list[dict[str, Any]]]: ...


NODE_KEY = web.AppKey("node", AdminNode)
AUTOSCALER_KEY = web.AppKey("autoscaler", Autoscaler)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    """A JSON response encoded with orjson (dataclasses and tuples included)."""
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


_STATUS: tuple[tuple[type[PresenceError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (RateLimited, 429),
    (LimitExceeded, 400),
    (BadRequest, 400),
    (NotJoined, 404),
    (Overloaded, 503),
)


def error_response(err: PresenceError) -> web.Response:
    """The JSON error response for ``err`` (status from its class, Retry-After if any)."""
    status = next((s for cls, s in _STATUS if isinstance(err, cls)), 500)
    headers: dict[str, str] = {}
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="presence"'
    body = {"error": err.code, "message": err.message, "field": err.field}
    return json_response(body, status, headers)


def require_role(request: web.Request, roles: Iterable[str]) -> Claims:
    """The verified claims of the request's bearer token, whose role is one of ``roles``.

    Raises :class:`Unauthorized` (401) for a missing or invalid token and
    :class:`Forbidden` (403) for another role; the app's middleware renders both.
    """
    node = request.app[NODE_KEY]
    token = bearer_token(request.headers.get("Authorization"))
    claims = node.auth.verify(token)
    allowed = frozenset(roles)
    if claims.role not in allowed:
        raise Forbidden(f"role {claims.role} may not use this endpoint "
                        f"(needs {' or '.join(sorted(allowed))})")
    return claims


class RateLimiter:
    """At most ``count`` events per ``window`` seconds per key (sliding window log).

    ``clock`` is monotonic seconds (injectable for tests). Memory is bounded by
    ``count`` timestamps per key seen in the last window; idle keys are dropped.
    """

    def __init__(self, count: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count, self.window, self.clock = count, window, clock
        self._log: dict[str, deque[float]] = {}

    def hit(self, key: str) -> float:
        """Record one event; 0.0 if allowed, else the seconds until one would be."""
        now = self.clock()
        for k in [k for k, q in self._log.items() if q[-1] <= now - self.window]:
            del self._log[k]  # forget idle keys so the map does not grow without bound
        q = self._log.setdefault(key, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= self.count:
            return q[0] + self.window - now
        q.append(now)
        return 0.0


_LIMITER_KEY = web.AppKey("admin_limiter", RateLimiter)


def _admin(request: web.Request) -> Claims:
    claims = require_role(request, ("admin",))
    wait = request.app[_LIMITER_KEY].hit(claims.user)
    if wait > 0:
        raise RateLimited(f"at most {ADMIN_RATE[0]} admin requests per minute",
                          retry_after=wait)
    return claims


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render PresenceErrors and aiohttp's own 4xx as JSON error bodies."""
    try:
        return await handler(request)
    except PresenceError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
        return json_response({"error": code, "message": exc.reason, "field": None},
                             exc.status, {k: v for k, v in exc.headers.items()
                                          if k.lower() == "allow"})


CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After",
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let the dashboard (served by the public port: another origin) call this API.

    Bearer tokens only, no cookies: allowing any origin gives a foreign page nothing it
    could not do with a token it already holds. Preflights carry no token and get 204.
    """
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers=PREFLIGHT_HEADERS)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(CORS_HEADERS)
        raise
    response.headers.update(CORS_HEADERS)
    return response


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
    _admin(request)
    node = request.app[NODE_KEY]
    body = dict(node.local_stats())
    body["cluster"] = await node.cluster_stats()
    return json_response(body)


async def _scaling(request: web.Request) -> web.Response:
    _admin(request)
    autoscaler = request.app.get(AUTOSCALER_KEY)
    if autoscaler is None:
        settings = dataclasses.asdict(request.app[NODE_KEY].settings.autoscale)
        return json_response({"current": None, "history": [], "settings": settings})
    return json_response(autoscaler.body())


async def _presence(request: web.Request) -> web.Response:
    require_role(request, ("service", "admin", "csm"))
    raw = request.query.getall("users", [])
    users = list(dict.fromkeys(u.strip() for part in raw for u in part.split(",") if u.strip()))
    if not users:
        raise BadRequest("users must list at least one user id (users=u1,u2)", field="users")
    if len(users) > MAX_QUERY_USERS:
        raise LimitExceeded(f"at most {MAX_QUERY_USERS} users per request", field="users")
    if any(len(u) > 128 for u in users):
        raise BadRequest("user ids are at most 128 characters", field="users")
    return json_response(await request.app[NODE_KEY].query_users(users))


async def _channel_presence(request: web.Request) -> web.Response:
    require_role(request, ("service", "admin"))
    ch = validate_channel(request.match_info["ch"], field="ch")
    presence = await request.app[NODE_KEY].channel_presence(ch)
    return json_response({"ch": ch, "presence": presence})


def make_admin_app(node: AdminNode, autoscaler: Autoscaler | None = None) -> web.Application:
    """The admin application; run it with an ``aiohttp.web.AppRunner`` on the admin port.

    Other modules add routes to the returned app (``app.router.add_post(...)``) before
    it starts, reading the node as ``request.app[NODE_KEY]``.
    """
    app = web.Application(middlewares=[_cors, _errors])
    app[NODE_KEY] = node
    if autoscaler is not None:
        app[AUTOSCALER_KEY] = autoscaler
    app[_LIMITER_KEY] = RateLimiter(*ADMIN_RATE)
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
