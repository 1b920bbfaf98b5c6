"""gateway/http.py: error rendering, rate limiting and the users parameter, on a real
aiohttp server on loopback (port 0)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from cluster.base import BackendUnavailable
from gateway.auth import Authenticator, mint_token
from gateway.http import (
    AUTH_KEY,
    RateRule,
    cors_middleware,
    error_middleware,
    json_response,
    rate_limit_middleware,
    require_role,
    users_param,
)
from presence.errors import (
    Forbidden,
    InternalError,
    LimitExceeded,
    NotJoined,
    Overloaded,
    RateLimited,
)
from presence.settings import Settings
from tests.fixtures.servers import GatewayHandle

SECRET = secrets.token_urlsafe(32)
TIMEOUT = aiohttp.ClientTimeout(total=10)


def token(role: str, user: str = "ops") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, role=role)}"}


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail /etc/passwd")


async def backend_down(request: web.Request) -> web.Response:
    raise BackendUnavailable("redis node 10.0.0.7 refused")


async def domain(request: web.Request) -> web.Response:
    errors = {"forbidden": Forbidden("no"), "not_joined": NotJoined("no"),
              "rate": RateLimited("slow down", retry_after=2.2),
              "limit": LimitExceeded("too many", field="users"),
              "overloaded": Overloaded("busy", retry_after=3.0),
              "internal": InternalError("failed")}
    raise errors[request.match_info["kind"]]


async def users(request: web.Request) -> web.Response:
    return json_response(list(users_param(request)))


async def limited(request: web.Request) -> web.Response:
    return json_response({"user": require_role(request, ("admin",)).user})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[str]:
    rule = RateRule("/admin/", frozenset({"admin"}), 3, 60.0)
    app = web.Application(middlewares=[cors_middleware, error_middleware,
                                       rate_limit_middleware(rule)])
    app[AUTH_KEY] = Authenticator(Settings.of(jwt_secret=SECRET))
    app.router.add_get("/boom", boom)
    app.router.add_get("/down", backend_down)
    app.router.add_get("/domain/{kind}", domain)
    app.router.add_get("/users", users)
    app.router.add_get("/admin/x", limited)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def get(url: str, headers: dict[str, str] | None = None
              ) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_unexpected_error_is_a_generic_500(server: str) -> None:
    status, body, headers = await get(server + "/boom")
    assert status == 500
    assert body == {"error": "internal", "message": "internal error", "field": None}
    assert headers["Access-Control-Allow-Origin"] == "*"


async def test_backend_outage_is_503_overloaded(server: str) -> None:
    status, body, headers = await get(server + "/down")
    assert (status, body["error"], headers["Retry-After"]) == (503, "overloaded", "1")
    assert "10.0.0.7" not in body["message"]


@pytest.mark.parametrize(("kind", "status", "code", "retry"), [
    ("forbidden", 403, "forbidden", None), ("not_joined", 404, "not_joined", None),
    ("rate", 429, "rate_limited", "3"), ("limit", 400, "limit_exceeded", None),
    ("overloaded", 503, "overloaded", "3"), ("internal", 500, "internal", None),
])
async def test_domain_errors_map_to_status(server: str, kind: str, status: int, code: str,
                                           retry: str | None) -> None:
    got, body, headers = await get(f"{server}/domain/{kind}")
    assert (got, body["error"]) == (status, code)
    assert headers.get("Retry-After") == retry


async def test_rate_limit_counts_per_user_after_the_token_check(server: str) -> None:
    assert (await get(server + "/admin/x"))[0] == 401  # anonymous: refused, not counted
    assert (await get(server + "/admin/x", token("member")))[0] == 403
    for _ in range(3):
        assert (await get(server + "/admin/x", token("admin")))[0] == 200
    status, body, headers = await get(server + "/admin/x", token("admin"))
    assert (status, body["error"]) == (429, "rate_limited")
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await get(server + "/admin/x", token("admin", "other")))[0] == 200
    # an unknown route under the prefix is the router's 404, not a token check
    assert (await get(server + "/admin/nope"))[0] == 404


@pytest.mark.parametrize(("query", "want"), [
    ("users=u1,u2,u1", ["u1", "u2"]),
    ("users=u1&users=%20u2%20,,u1", ["u1", "u2"]),
    ("users=" + ",".join(["u1"] * 150), ["u1"]),  # duplicates count once
    ("users=" + ",".join(f"u{i % 100}" for i in range(300)), [f"u{i}" for i in range(100)]),
])
async def test_users_parameter(server: str, query: str, want: list[str]) -> None:
    status, body, _ = await get(f"{server}/users?{query}")
    assert (status, body) == (200, want)


@pytest.mark.parametrize(("query", "code"), [
    ("", "bad_request"), ("users=,%20,", "bad_request"),
    ("users=" + ",".join(f"u{i}" for i in range(101)), "limit_exceeded"),
    ("users=u1,u%0A2", "bad_request"), ("users=u%00", "bad_request"),
    ("users=" + "x" * 129, "bad_request"),
])
async def test_bad_users_parameter(server: str, query: str, code: str) -> None:
    status, body, _ = await get(f"{server}/users?{query}")
    assert (status, body["error"], body["field"]) == (400, code, "users")


async def test_presence_route_refuses_control_characters(gateway: GatewayHandle) -> None:
    headers = {"Authorization": f"Bearer {gateway.token('svc', role='service')}"}
    status, body, _ = await get(f"{gateway.admin_url}/v1/presence?users=u1,u%0D%0A2",
                                headers)
    assert (status, body["error"], body["field"]) == (400, "bad_request", "users")


async def test_http_metric_labels_are_bounded(gateway: GatewayHandle) -> None:
    """Issue 10 item 6 for the admin port: paths and methods a client chooses never
    become label values (route templates and known methods, else ``other``)."""
    canary = await gateway.client("canary")
    auth = {"Authorization": f"Bearer {gateway.token('svc', role='service')}"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for i in range(60):
            for method, path in [("GET", f"/nope-{i}"), ("GET", f"/v1/channels/c{i}/presence"),
                                 (f"X{i}", "/healthz"), ("DELETE", f"/admin/{i}")]:
                async with s.request(method, gateway.admin_url + path, headers=auth) as r:
                    await r.read()
            if i % 20 == 0:
                assert (await canary.ping())["t"] == "pong"
        async with s.get(gateway.admin_url + "/metrics") as r:
            text = await r.text()
    series = [line for line in text.splitlines()
              if line.startswith("presence_http_requests_total{")]
    routes = {line.split('route="')[1].split('"')[0] for line in series}
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    assert routes <= {"other", "/healthz", "/v1/channels/{ch}/presence"}, routes
    assert "/v1/channels/{ch}/presence" in routes and "other" in routes
    assert methods <= {"GET", "HEAD", "POST", "OPTIONS", "other"}, methods
    assert len(series) <= 8, series


async def test_websocket_query_and_http_share_the_user_list_rules(
        gateway: GatewayHandle) -> None:
    """Issue 10 item 7: 150 copies of one id are one id on both paths."""
    a = await gateway.client("u1")
    await a.join("team:w1")
    csm = await gateway.client("cs1", role="csm")
    via_ws = (await csm.query(["u1"] * 150))["users"]
    headers = {"Authorization": f"Bearer {gateway.token('svc', role='service')}"}
    status, via_http, _ = await get(
        f"{gateway.admin_url}/v1/presence?users={','.join(['u1'] * 150)}", headers)
    assert status == 200
    assert via_ws == via_http and list(via_ws) == ["u1"]
    assert via_ws["u1"]["status"] == "online"
