"""The dashboard in a real headless Chromium (Debian's), against a real gateway.

Needs Debian's ``chromium`` package (/usr/bin/chromium) and the ``playwright`` Python
package; Playwright's own browser download is never used (``executable_path``).
Screenshots go to tests/browser/artifacts/ (not committed).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import aiohttp
import pytest

from tests.browser.support import CHROMIUM, open_dashboard
from tests.fixtures.servers import GatewayHandle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

pytest.importorskip("playwright.async_api", reason="pip install playwright")


async def post_churn(gw: GatewayHandle, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {gw.token('model', role='service')}",
               "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.post(f"{gw.admin_url}/v1/churn", data=io.BytesIO(json.dumps(body).encode()),
                   headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def test_dashboard_team_and_churn_live(browser: Any, gateway: GatewayHandle) -> None:
    fragment = {
        "token": gateway.token("carol", ["team:w1", "churn:acme"], role="csm"),
        "ws": gateway.ws_url, "team": "team:w1", "org": "acme",
    }
    page = await open_dashboard(browser, gateway, fragment)
    p = page.page
    await p.wait_for_selector("#conn[data-state='connected']")
    await p.wait_for_selector("#team-list li[data-user='carol'][data-status='online']")

    # a member connects from Python and shows up live
    pat = await gateway.client("pat", channels=["team:w1"])
    await pat.join("team:w1", {"status": "online", "device": "mobile", "note": "At the venue"})
    row = await p.wait_for_selector("#team-list li[data-user='pat'][data-status='online']")
    assert "At the venue" in await row.inner_text()
    assert "mobile" in await row.inner_text()

    # a status change
    await pat.update(status="busy", note="Ceremony")
    row = await p.wait_for_selector("#team-list li[data-user='pat'][data-status='busy']")
    assert "Ceremony" in await row.inner_text()
    assert "1 online" in await p.inner_text("#team-counts")
    await page.shot("team-360.png")

    # churn records posted to the ingest endpoint, ordered by score, live
    await post_churn(gateway, {"org": "acme", "scores": [
        {"supplier": "rosewood-venue", "score": 0.42, "model": "v3",
         "factors": {"days_since_login": 0.31, "open_tickets": 0.08}},
        {"supplier": "lens-and-light", "score": 0.12, "model": "v3"},
    ]})
    await p.click(".tabs [data-tab='churn']")
    await p.wait_for_selector("#churn-list li[data-supplier='rosewood-venue'] .b-medium")
    await post_churn(gateway, {"org": "acme", "scores": [
        {"supplier": "lens-and-light", "score": 0.86, "model": "v3",
         "factors": {"days_since_login": 0.5, "cancelled_bookings": 0.2}},
    ]})
    await p.wait_for_selector("#churn-list li:first-child[data-supplier='lens-and-light'] "
                              ".b-critical")
    order = await p.eval_on_selector_all("#churn-list li",
                                         "els => els.map(e => e.dataset.supplier)")
    assert order == ["lens-and-light", "rosewood-venue"]
    await p.click("#churn-list li[data-supplier='lens-and-light'] button")
    await p.wait_for_selector("#churn-list li[data-supplier='lens-and-light'] .factors")
    assert "cancelled_bookings" in await p.inner_text("#churn-list")
    await page.shot("churn-360.png")

    await p.click(".tabs [data-tab='node']")
    assert "admin" in (await p.inner_text("#node-msg")).lower()
    await page.shot("node-360.png")

    # the member leaves: shown as offline with a last-seen time
    await pat.close()
    await p.click(".tabs [data-tab='team']")
    row = await p.wait_for_selector("#team-list li[data-user='pat'][data-status='offline']")
    assert "last seen" in await row.inner_text()

    await p.set_viewport_size({"width": 1280, "height": 800})
    await p.click("#churn-list li[data-supplier='rosewood-venue'] button")
    await page.shot("dashboard-1280.png")
    assert await p.is_visible("#panel-team") and await p.is_visible("#panel-churn")
    assert page.errors == []


async def admin_cors(gw: GatewayHandle, origin: str) -> bool:
    """True when the admin API answers a CORS preflight for the dashboard's origin."""
    headers = {"Origin": origin, "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Headers": "authorization"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
            s.options(f"{gw.admin_url}/admin/stats", headers=headers) as resp:
        allowed = resp.headers.get("Access-Control-Allow-Origin")
        return resp.status < 300 and allowed in ("*", origin)


async def test_dashboard_node_panel(browser: Any, gateway: GatewayHandle) -> None:
    if not await admin_cors(gateway, gateway.http_url):
        pytest.skip("the admin API sends no CORS headers for the dashboard's origin")
    fragment = {"token": gateway.token("root", ["team:ops"], role="admin"),
                "ws": gateway.ws_url, "team": "team:ops", "admin": gateway.admin_url}
    page = await open_dashboard(browser, gateway, fragment, width=1280)
    p = page.page
    await p.wait_for_selector("#conn[data-state='connected']")
    await p.wait_for_selector("#node-stats div")
    stats = await p.inner_text("#node-stats")
    assert "Connections" in stats and "Propagation p95" in stats
    await p.wait_for_selector("#node-scaling .decision")
    await page.shot("node-1280.png")
    assert page.errors == []


async def test_dashboard_member_token_sees_clear_messages(browser: Any,
                                                          gateway: GatewayHandle) -> None:
    fragment = {"token": gateway.token("mia", ["team:w1"], role="member"),
                "ws": gateway.ws_url, "team": "team:w1", "org": "acme",
                "admin": gateway.admin_url}
    page = await open_dashboard(browser, gateway, fragment)
    p = page.page
    await p.wait_for_selector("#team-list li[data-user='mia']")
    await p.wait_for_function(
        "() => document.querySelector('#churn-msg').textContent.includes('csm')")
    node_msg = await p.inner_text("#node-msg")
    assert "admin token" in node_msg and "member" in node_msg
    assert page.errors == []


CLIENT_SCRIPT = """
async ([url, token, badToken]) => {
  const { PresenceClient } = await import('/client.js');
  const log = window.clientLog = [];
  const c = window.client = new PresenceClient({ url, token: badToken, backoffInitial: 200 });
  c.on('status', (s, info) => log.push([s, info && info.code]));
  try { await c.connect(); } catch (err) { log.push(['rejected', err.code]); }
  c.setToken(token);                    // a new token after 4001: reconnects
  c.on('presence', 'team:w1', (view) => { window.view = view; });
  await c.join('team:w1', { status: 'busy', device: 'web' });
  await c.update({ note: 'Rehearsal' });
  return log;
}
"""


async def test_client_reconnects_and_rejoins(browser: Any, gateway_factory: Any) -> None:
    """The browser client: no reconnect after 4001 until a new token; after a server
    restart (1012 with a hint) it reconnects and rejoins with its last meta."""
    gw1 = await gateway_factory()
    page = await open_dashboard(browser, gw1, {})
    p = page.page
    token = gw1.token("bea", ["team:w1"])
    log = await p.evaluate(CLIENT_SCRIPT, [gw1.ws_url, token, "not-a-jwt"])
    assert log[:2] == [["connecting", None], ["closed", 4001]]
    assert ["rejected", "unauthorized"] in log
    assert log[-1] == ["connected", None]

    port, secret = gw1.gateway.port, gw1.secret
    await gw1.gateway.stop()
    gw2 = await gateway_factory(port=port, jwt_secret=secret)
    await p.wait_for_function(
        "() => window.clientLog.some(e => e[0] === 'reconnecting' && e[1] === 1012)"
        " && window.client.status === 'connected' && window.view && window.view.bea")
    metas = (await gw2.node.store.channel_presence("team:w1"))["bea"]
    assert [(m.status, m.note) for m in metas] == [("busy", "Rehearsal")]
    # a member joining on the new server reaches the rejoined client's mirror
    other = await gw2.client("cy", channels=["team:w1"])
    await other.join("team:w1", {"status": "away"})
    await p.wait_for_function("() => window.view.cy && window.view.cy.status === 'away'")
    await p.evaluate("window.client.close()")
    # Chromium logs a refused WebSocket while the server restarts; nothing else may fail.
    assert [e for e in page.errors if "WebSocket connection to" not in e] == []
