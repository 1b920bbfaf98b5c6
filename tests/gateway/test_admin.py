"""The internal HTTP API on the admin port, against a real gateway on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import ADMIN_RATE, RateLimiter, metrics_on_decision
from gateway.metrics import Metrics
from presence.autoscale import REASONS, Decision, LoadSnapshot
from tests.fixtures.servers import GatewayHandle

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def get(http: aiohttp.ClientSession, gw: GatewayHandle, path: str,
              token: str | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with http.get(gw.admin_url + path, headers=headers) as resp:
        if resp.content_type == "application/json":
            body: Any = await resp.json()
        else:
            body = await resp.text()
        return resp.status, body, resp


def tok(gw: GatewayHandle, role: str | None, user: str = "ops") -> str | None:
    """A token of ``role``; None for no token, "bad" for a token that does not verify."""
    if role is None:
        return None
    if role == "bad":
        return gw.token(user, role="admin")[:-4] + "AAAA"
    if role == "expired":
        return gw.token(user, role="admin", ttl=-60)
    return gw.token(user, role=role)


def assert_error(status: int, body: Any, want: int, code: str) -> None:
    assert status == want, body
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert "field" in body


# -- probes and metrics ---------------------------------------------------------------

async def test_healthz(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    status, body, _ = await get(http, gateway, "/healthz")
    assert status == 200
    assert body == {"status": "ok", "node": gateway.node.node_id}


async def test_readyz_turns_503_while_draining(gateway: GatewayHandle,
                                               http: aiohttp.ClientSession) -> None:
    status, body, _ = await get(http, gateway, "/readyz")
    assert (status, body["ready"]) == (200, True)
    await gateway.gateway.drain()
    status, body, _ = await get(http, gateway, "/readyz")
    assert (status, body["ready"]) == (503, False)
    status, _, _ = await get(http, gateway, "/healthz")
    assert status == 200  # alive, just not ready


async def test_metrics_parse(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    await gateway.client("u1")
    autoscaler = gateway.gateway.autoscaler
    assert autoscaler is not None
    decision = await autoscaler.step()  # a decision now, not whenever the loop runs
    assert decision is not None
    status, text, resp = await get(http, gateway, "/metrics")
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    samples = {
        s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples
        if not s.labels
    }
    assert samples["presence_connections"].value == 1
    assert samples["presence_autoscaler_desired_replicas"].value == decision.desired
    reasons = {
        s.labels["reason"]: s.value for fam in text_string_to_metric_families(text)
        for s in fam.samples if s.name == "presence_autoscaler_decision_info"
    }
    assert reasons[decision.reason] == 1 and sum(reasons.values()) == 1


# -- admin endpoints ------------------------------------------------------------------

@pytest.mark.parametrize(("role", "status", "code"), [
    ("admin", 200, None), (None, 401, "unauthorized"), ("bad", 401, "unauthorized"),
    ("expired", 401, "unauthorized"), ("member", 403, "forbidden"), ("csm", 403, "forbidden"),
    ("service", 403, "forbidden"),
])
@pytest.mark.parametrize("path", ["/admin/stats", "/admin/scaling"])
async def test_admin_tokens(gateway: GatewayHandle, http: aiohttp.ClientSession, path: str,
                            role: str | None, status: int, code: str | None) -> None:
    got, body, resp = await get(http, gateway, path, tok(gateway, role))
    if code is None:
        assert got == 200
    else:
        assert_error(got, body, status, code)
        if status == 401:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_admin_stats_body(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    c = await gateway.client("u1")
    await c.join("team:w1")
    status, body, _ = await get(http, gateway, "/admin/stats", tok(gateway, "admin"))
    assert status == 200
    assert body["node"] == gateway.node.node_id
    assert body["connections"] == 1 and body["channels"] == 1
    assert {"propagation_seconds", "event_loop_lag_seconds", "rss_bytes", "backend",
            "draining"} <= set(body)
    assert isinstance(body["cluster"], dict)


async def test_admin_scaling_body(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    autoscaler = gateway.gateway.autoscaler
    assert autoscaler is not None
    decision = await autoscaler.step()
    assert decision is not None
    status, body, _ = await get(http, gateway, "/admin/scaling", tok(gateway, "admin"))
    assert status == 200
    assert set(body) == {"current", "history", "settings"}
    # the background loop may have decided again since: compare what cannot differ
    assert body["current"]["reason"] in REASONS
    assert body["current"]["desired"] >= gateway.settings.autoscale.min_replicas
    last = body["history"][-1]  # the history ends with the current (desired, reason)
    assert (last["desired"], last["reason"]) == (body["current"]["desired"],
                                                 body["current"]["reason"])
    assert body["settings"]["timezone"] == gateway.settings.autoscale.timezone
    assert len(body["settings"]["season"]) == 12


async def test_admin_rate_limit(gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    count, _ = ADMIN_RATE
    token = tok(gateway, "admin", "ops1")
    for _ in range(count):
        status, _, _ = await get(http, gateway, "/admin/stats", token)
        assert status == 200
    status, body, resp = await get(http, gateway, "/admin/scaling", token)
    assert_error(status, body, 429, "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # per admin user: another admin is not affected
    status, _, _ = await get(http, gateway, "/admin/stats", tok(gateway, "admin", "ops2"))
    assert status == 200
    # non-admin routes are not limited
    status, _, _ = await get(http, gateway, "/v1/presence?users=u1", token)
    assert status == 200


# -- /v1 endpoints ----------------------------------------------------------------------

@pytest.mark.parametrize(("role", "status"), [
    ("service", 200), ("admin", 200), ("csm", 200), ("member", 403), (None, 401),
    ("bad", 401),
])
async def test_presence_query_tokens(gateway: GatewayHandle, http: aiohttp.ClientSession,
                                     role: str | None, status: int) -> None:
    got, body, _ = await get(http, gateway, "/v1/presence?users=u1", tok(gateway, role))
    assert got == status, body
    if status != 200:
        assert body["error"] == ("forbidden" if status == 403 else "unauthorized")


async def test_presence_query_matches_the_websocket_result(
        gateway: GatewayHandle, http: aiohttp.ClientSession) -> None:
    a = await gateway.client("u1")
    await a.join("team:w1", {"status": "busy", "device": "web", "note": "At the venue"})
    b = await gateway.client("u2")
    await b.join("team:w1")
    await b.close()
    csm = await gateway.client("cs1", role="csm")
    via_ws = (await csm.query(["u1", "u2", "u3"]))["users"]
    status, body, _ = await get(http, gateway, "/v1/presence?users=u1,u2,u3",
                                tok(gateway, "service"))
    assert status == 200
    assert body == via_ws
    assert body["u1"]["status"] == "busy"
    assert body["u2"]["status"] == "offline" and body["u2"]["last_seen"] is not None
    assert body["u3"] == {"status": "offline", "metas": [], "last_seen": None}


async def test_presence_query_bad_input(gateway: GatewayHandle,
                                        http: aiohttp.ClientSession) -> None:
    token = tok(gateway, "service")
    status, body, _ = await get(http, gateway, "/v1/presence", token)
    assert_error(status, body, 400, "bad_request")
    assert body["field"] == "users"
    many = ",".join(f"u{i}" for i in range(101))
    status, body, _ = await get(http, gateway, f"/v1/presence?users={many}", token)
    assert_error(status, body, 400, "limit_exceeded")
    assert body["field"] == "users"


@pytest.mark.parametrize(("role", "status"), [
    ("service", 200), ("admin", 200), ("csm", 403), ("member", 403), (None, 401),
    ("expired", 401),
])
async def test_channel_presence(gateway: GatewayHandle, http: aiohttp.ClientSession,
                                role: str | None, status: int) -> None:
    a = await gateway.client("u1")
    joined = await a.join("team:w1", {"status": "away", "device": "mobile"})
    got, body, _ = await get(http, gateway, "/v1/channels/team:w1/presence",
                             tok(gateway, role))
    assert got == status, body
    if status == 200:
        assert body == {"ch": "team:w1", "presence": joined["presence"]}
        assert body["presence"]["u1"][0]["status"] == "away"
    else:
        assert body["error"] == ("forbidden" if status == 403 else "unauthorized")


async def test_channel_presence_bad_channel(gateway: GatewayHandle,
                                            http: aiohttp.ClientSession) -> None:
    status, body, _ = await get(http, gateway, "/v1/channels/Team%20W1/presence",
                                tok(gateway, "admin"))
    assert_error(status, body, 400, "bad_request")
    assert body["field"] == "ch"
    status, body, _ = await get(http, gateway, "/v1/channels/empty:1/presence",
                                tok(gateway, "admin"))
    assert (status, body) == (200, {"ch": "empty:1", "presence": {}})


async def test_unknown_route_is_a_json_404(gateway: GatewayHandle,
                                           http: aiohttp.ClientSession) -> None:
    status, body, _ = await get(http, gateway, "/nope")
    assert_error(status, body, 404, "not_found")


# -- pieces without a server --------------------------------------------------------------

def test_rate_limiter_window() -> None:
    now = [0.0]
    limiter = RateLimiter(2, 60.0, clock=lambda: now[0])
    assert limiter.hit("a") == 0.0 and limiter.hit("a") == 0.0
    assert limiter.hit("a") == pytest.approx(60.0)
    assert limiter.hit("b") == 0.0
    now[0] = 30.0
    assert limiter.hit("a") == pytest.approx(30.0)
    now[0] = 60.0
    assert limiter.hit("a") == 0.0
    now[0] = 1000.0
    limiter.hit("c")
    assert set(limiter._log) == {"c"}  # idle users are forgotten


def test_metrics_on_decision_sets_the_gauges() -> None:
    metrics = Metrics()
    on_decision = metrics_on_decision(metrics)
    at = datetime(2026, 6, 13, 18, tzinfo=UTC)
    on_decision(Decision(7, "peak_hour", at, LoadSnapshot(4, 20_000)))
    registry = metrics.registry
    assert registry.get_sample_value("presence_autoscaler_desired_replicas") == 7
    assert registry.get_sample_value("presence_autoscaler_decision_info",
                                     {"reason": "peak_hour"}) == 1
    assert registry.get_sample_value("presence_autoscaler_decision_info",
                                     {"reason": "connections"}) == 0
