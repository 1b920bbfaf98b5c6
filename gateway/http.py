"""HTTP plumbing of the admin port: responses, role checks, CORS, error and rate-limit
middleware. Route modules (gateway/admin.py, churn_api.py, engagement_api.py) hold
routes only: they call :func:`require_role`, parse with :func:`users_param` or
:func:`read_body`, and raise the domain's errors (presence/errors.py); the middleware
here turns every outcome into a JSON answer.

Errors are ``{"error": <code>, "message": ..., "field": <name or null>}`` with the
status of :data:`STATUS`::

    BadRequest      400 bad_request      Unauthorized  401 (+ WWW-Authenticate)
    LimitExceeded   400 limit_exceeded   Forbidden     403
    NotJoined       404 not_joined       RateLimited   429 (+ Retry-After)
    Overloaded      503 (+ Retry-After)  anything else 500 internal, generic message
    cluster.base.BackendUnavailable      503 overloaded, Retry-After: 1
    aiohttp's own 4xx (404, 405, 408...) JSON with the reason as code (not_found, ...)

An unexpected exception is logged with its traceback on the server and answered with a
fixed message: nothing of the exception reaches the client.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter

from cluster.base import BackendUnavailable, Broker, Store
from cluster.engagement import EngagementStore
from gateway.auth import Authenticator, Claims, bearer_token
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
from presence.frames import MAX_QUERY_USERS, user_ids
from presence.ratelimit import SlidingWindow
from presence.settings import Settings

__all__ = [
    "AUTH_KEY",
    "CORS_HEADERS",
    "PREFLIGHT_HEADERS",
    "STATUS",
    "RateLimiter",
    "RateRule",
    "RouteNode",
    "cors_middleware",
    "error_middleware",
    "error_response",
    "json_response",
    "metrics_middleware",
    "rate_limit_middleware",
    "read_body",
    "require_role",
    "users_param",
]

log = structlog.get_logger("presence.http")

AUTH_KEY = web.AppKey("auth", Authenticator)
"""The authenticator :func:`require_role` verifies bearer tokens with."""
_CLAIMS_KEY = web.RequestKey("claims", Claims)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    """A JSON response encoded with orjson (dataclasses and tuples included)."""
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


STATUS: tuple[tuple[type[PresenceError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (RateLimited, 429),
    (LimitExceeded, 400),
    (BadRequest, 400),
    (NotJoined, 404),
    (Overloaded, 503),
)
"""HTTP status of each domain error (first match); any other is 500."""


def error_response(err: PresenceError) -> web.Response:
    """The JSON error response for ``err`` (status from :data:`STATUS`, Retry-After
    rounded up to whole seconds when the error carries ``retry_after``)."""
    status = next((s for cls, s in STATUS if isinstance(err, cls)), 500)
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
    :class:`Forbidden` (403) for another role. The token is verified once per request
    (the rate-limit middleware and the route share the result).
    """
    claims = request.get(_CLAIMS_KEY)
    if claims is None:
        token = bearer_token(request.headers.get("Authorization"))
        claims = request.app[AUTH_KEY].verify(token)
        request[_CLAIMS_KEY] = claims
    allowed = frozenset(roles)
    if claims.role not in allowed:
        raise Forbidden(f"role {claims.role} may not use this endpoint "
                        f"(needs {' or '.join(sorted(allowed))})")
    return claims


def users_param(request: web.Request, limit: int = MAX_QUERY_USERS,
                too_many: type[PresenceError] = LimitExceeded) -> tuple[str, ...]:
    """The ``users`` query parameter (repeated and/or comma-separated): blanks around
    ids and empty items dropped, then :func:`presence.frames.user_ids` (duplicates
    count once; ``too_many`` past ``limit``)."""
    raw = request.query.getall("users", [])
    items = (u.strip() for part in raw for u in part.split(","))
    return user_ids((u for u in items if u), "users", limit, too_many)


async def read_body(request: web.Request, max_bytes: int, timeout: float) -> bytes:
    """The request body: :class:`BadRequest` past ``max_bytes`` (announced or sent),
    408 when it has not all arrived ``timeout`` seconds after the handler asked."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BadRequest(f"the body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise BadRequest(f"the body is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        # A body trickled in slower than this holds a handler and a socket: cut it.
        raise web.HTTPRequestTimeout(headers={"Connection": "close"}) from None
    return b"".join(chunks)


class RouteNode(Protocol):
    """What the route modules (churn, engagement) need of the gateway node."""

    @property
    def store(self) -> Store: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def engagement(self) -> EngagementStore: ...

    @property
    def clock_ms(self) -> Callable[[], int]: ...


class RateLimiter:
    """At most ``count`` events per ``window`` seconds per key: one
    :class:`presence.ratelimit.SlidingWindow` per key.

    ``clock`` is monotonic seconds (injectable for tests). Memory is bounded by
    ``count`` timestamps per key active in the last window; idle keys are dropped.
    """

    def __init__(self, count: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count, self.window, self.clock = count, window, clock
        self._log: dict[str, SlidingWindow] = {}

    def hit(self, key: str) -> float:
        """Record one event; 0.0 if allowed, else the seconds until one would be."""
        now = self.clock()
        for k in [k for k, w in self._log.items() if w.idle(now)]:
            del self._log[k]  # forget idle keys so the map does not grow without bound
        window = self._log.get(key)
        if window is None:
            window = self._log[key] = SlidingWindow(self.count, self.window)
        return window.hit(now)


@dataclass(frozen=True, slots=True)
class RateRule:
    """Requests to a route under ``prefix`` need one of ``roles`` and count against a
    per-user limit of ``count`` per ``window`` seconds."""

    prefix: str
    roles: frozenset[str]
    count: int
    window: float


def rate_limit_middleware(rule: RateRule) -> Middleware:
    """Middleware enforcing ``rule``: :class:`Unauthorized`/:class:`Forbidden` before
    counting (an anonymous flood is refused by the token check and counts for nobody),
    then :class:`RateLimited` with ``retry_after`` past the limit. Unknown routes are
    left to the router (404), whatever their prefix."""
    limiter = RateLimiter(rule.count, rule.window)

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.path.startswith(rule.prefix)
                and request.match_info.http_exception is None):
            claims = require_role(request, rule.roles)
            wait = limiter.hit(claims.user)
            if wait > 0:
                raise RateLimited(
                    f"at most {rule.count} requests per {rule.window:g} s on {rule.prefix}*",
                    retry_after=wait)
        return await handler(request)

    return rate_limit


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render domain errors, backend outages, aiohttp's own 4xx and anything unexpected
    as JSON error bodies (see the module docstring for the table)."""
    try:
        return await handler(request)
    except PresenceError as err:
        return error_response(err)
    except BackendUnavailable:
        return error_response(Overloaded("the backend is unavailable, retry later"))
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "connection")}
        return json_response({"error": code, "message": exc.reason, "field": None},
                             exc.status, keep)
    except asyncio.CancelledError:
        raise
    except Exception:
        # The traceback goes to the server log only; the client learns nothing of it.
        log.exception("http_internal_error", method=request.method, route=_route(request))
        return json_response({"error": "internal", "message": "internal error",
                              "field": None}, 500)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})
"""Methods kept as metric labels; any other is ``other``."""


def metrics_middleware(registry: CollectorRegistry) -> Middleware:
    """Middleware counting answers in ``presence_http_requests_total{route, method,
    status}`` on ``registry``. Every label is bounded whatever a client sends: ``route``
    is a route template of the app or ``other`` (never the raw path), ``method`` one of
    :data:`KNOWN_METHODS` or ``other``, ``status`` a status code the server chose."""
    requests = Counter(
        "presence_http_requests_total",
        "Admin-port HTTP requests answered, by route template, method and status",
        ["route", "method", "status"], registry=registry,
    )

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            method = request.method if request.method in KNOWN_METHODS else "other"
            requests.labels(_route(request), method, str(status)).inc()

    return count


def _route(request: web.Request) -> str:
    """The matched route's template (never the raw path a client chose), else ``other``."""
    resource = request.match_info.route.resource
    if request.match_info.http_exception is not None or resource is None:
        return "other"
    return resource.canonical


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
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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

