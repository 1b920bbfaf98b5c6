"""Resume and token refresh in the dashboard, in real Chromium (Debian's).

The dashboard's WebSocket goes through a TCP proxy the test controls
(tests/browser/support.py): cutting it resets both sides with no close frame, a network
loss to the browser and to the gateway. Back within ``resume_ttl``, the connection
resumes: the member list never shows anyone offline, and a Python member of the team
sees no diff about the dashboard's user. Against a server that does not resume these
tests fail (the reconnection reports ``resumed: false``, the member sees a leave).
Screenshots go to tests/browser/artifacts/.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from gateway.client import PresenceClient
from tests.browser.support import CHROMIUM, TcpProxy, open_dashboard
from tests.fixtures.servers import GatewayFactory

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

pytest.importorskip("playwright.async_api", reason="pip install playwright")

# Records, in the page, every status each member was shown with (from the client's
# presence events and from the rendered list), and every reconnection the client reports.
WATCH = """
() => {
  const client = window.presenceDashboard.state.client;
  const seen = window.seenStatuses = [];
  window.reconnects = [];
  client.on('presence', 'team:w1', (view) => {
    seen.push(Object.fromEntries(Object.entries(view).map(([u, v]) => [u, v.status])));
  });
  client.on('reconnect', (info) => window.reconnects.push(info));
  new MutationObserver(() => {
    const rows = [...document.querySelectorAll('#team-list li')];
    seen.push(Object.fromEntries(rows.map((li) => [li.dataset.user, li.dataset.status])));
  }).observe(document.querySelector('#team-list'),
             { childList: true, subtree: true, attributes: true });
  return client.welcome.conn;
}
"""


def about(user: str) -> Any:
    return lambda e: e.get("t") == "diff" and (user in e["joins"] or user in e["leaves"])


async def events_until(member: PresenceClient, barrier: PresenceClient,
                       note: str) -> list[dict[str, Any]]:
    """Everything ``member`` receives up to ``barrier``'s update to ``note`` (the diffs of
    a channel arrive in order: whatever was published before is in the list)."""
    await barrier.update(note=note)
    seen: list[dict[str, Any]] = []
    while True:
        event = await member.next_event(timeout=5)
        seen.append(event)
        if any(m["note"] == note for m in event.get("joins", {}).get("q", [])):
            return seen


async def test_cut_connection_resumes_without_flicker_or_diff(
        browser: Any, gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(resume_ttl=10)
    proxy = await TcpProxy(gw.gateway.port).start()
    try:
        pat = await gw.client("pat", channels=["team:w1"])
        await pat.join("team:w1", {"status": "busy", "device": "mobile", "note": "At the venue"})
        fragment = {"token": gw.token("carol", ["team:w1"]), "ws": proxy.ws_url(),
                    "team": "team:w1", "autoaway": "0"}
        page = await open_dashboard(browser, gw, fragment)
        p = page.page
        await p.wait_for_selector("#team-list li[data-user='carol'][data-status='online']")
        await p.wait_for_selector("#team-list li[data-user='pat'][data-status='busy']")
        conn = await p.evaluate(WATCH)
        await pat.wait_for(about("carol"))  # carol's join, before the cut
        assert pat.events.empty()

        proxy.hold()
        assert proxy.cut() == 1
        await p.wait_for_function(
            "() => window.presenceDashboard.state.client.status === 'reconnecting'")
        await proxy.wait_accepted(2)  # the browser is back, waiting at the proxy
        # A change while the dashboard is away: it must come with the resume's snapshot.
        await pat.update(note="During the gap")
        await page.shot("resume-away-360.png")
        proxy.release()

        await p.wait_for_function("() => window.reconnects.length > 0")
        info = await p.evaluate("window.reconnects[0]")
        welcome = await p.evaluate("window.presenceDashboard.state.client.welcome")
        assert info["resumed"] is True, f"the server did not resume: {welcome}"
        assert info["conn"] == conn == welcome["conn"]
        assert await p.get_attribute("#conn", "data-state") == "connected"
        assert await p.get_attribute("#conn", "data-resumed") == "true"
        row = await p.wait_for_selector("#team-list li[data-user='pat'][data-status='busy']")
        assert "During the gap" in await row.inner_text()
        await page.shot("resume-back-360.png")

        # No flicker: every state the page showed had both members, neither offline.
        seen = await p.evaluate("window.seenStatuses")
        assert seen, "the page rendered nothing after the resume"
        for shown in seen:
            assert shown.get("carol") not in (None, "offline"), seen
            assert shown.get("pat") not in (None, "offline"), seen
        # No diff about carol reached the other member.
        q = await gw.client("q", channels=["team:w1"])
        await q.join("team:w1")
        received = await events_until(pat, q, "barrier")
        assert [e for e in received if about("carol")(e)] == []
        assert [m.conn for m in pat.mirror["team:w1"].metas("carol")] == [conn]
        assert [e for e in page.errors if "WebSocket connection to" not in e] == []
    finally:
        await proxy.close()


REFRESH_WATCH = """
(tokens) => {
  const client = window.presenceDashboard.state.client;
  window.refreshed = [];
  client.on('refreshed', (exp) => window.refreshed.push(exp));
  const left = [...tokens];
  window.presenceDashboard.tokenProvider = async () => left.shift() || null;
  return client.welcome;
}
"""


async def test_dashboard_refreshes_its_token_before_exp(
        browser: Any, gateway_factory: GatewayFactory) -> None:
    """A new ``#token=`` in the fragment refreshes in place; so does the page's token
    provider, called before exp: the connection outlives its first token."""
    gw = await gateway_factory(token_leeway=0.3)
    now = int(time.time())
    first = gw.token("dora", ["team:w1"], exp=now + 6)
    fragment = {"token": first, "ws": gw.ws_url, "team": "team:w1", "autoaway": "0"}
    page = await open_dashboard(browser, gw, fragment)
    p = page.page
    await p.wait_for_selector("#team-list li[data-user='dora'][data-status='online']")
    later = [gw.token("dora", ["team:w1"], exp=now + 60)]
    welcome = await p.evaluate(REFRESH_WATCH, later)
    assert welcome["exp"] == now + 6

    # 1. the fragment: only the token changes
    by_hash = gw.token("dora", ["team:w1"], exp=now + 9)
    await p.evaluate("(t) => { location.hash = location.hash.replace(/token=[^&]*/, "
                     "'token=' + t); }", by_hash)
    await p.wait_for_function("() => window.refreshed.length >= 1")
    # 2. the provider, at 80 % of the new token's remaining life (before now + 9 + 0.3)
    await p.wait_for_function("() => window.refreshed.length >= 2", timeout=15_000)
    assert await p.evaluate("window.refreshed") == [now + 9, now + 60]
    assert time.time() < now + 9 + 0.3
    client_state = await p.evaluate(
        "(() => { const c = window.presenceDashboard.state.client;"
        " return [c.status, c.welcome.conn, c.exp]; })()")
    assert client_state == ["connected", welcome["conn"], now + 60]
    # Past the first two exps: still the same connection, and still live.
    await p.wait_for_function(f"() => Date.now() / 1000 > {now + 9 + 0.5}", timeout=15_000)
    assert await p.evaluate("window.presenceDashboard.state.client.status") == "connected"
    watcher = await gw.client("w", channels=["team:w1"])
    await watcher.join("team:w1")
    assert [m.conn for m in watcher.mirror["team:w1"].metas("dora")] == [welcome["conn"]]
    assert page.errors == []


GET_TOKEN_SCRIPT = """
async ([url, bad, good]) => {
  const { PresenceClient } = await import('/client.js');
  const log = [];
  const c = new PresenceClient({ url, token: bad, getToken: async () => good });
  c.on('status', (s, info) => log.push([s, info && info.code]));
  const welcome = await c.connect();
  const again = new PresenceClient({ url, token: bad, getToken: async () => null });
  const refused = await again.connect().then(() => 'connected', (err) => err.code);
  c.close();
  return [welcome.user, log, refused, again.lastClose.code];
}
"""


async def test_client_retries_a_refused_token_once_with_get_token(
        browser: Any, gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    page = await open_dashboard(browser, gw, {})
    user, log, refused, code = await page.page.evaluate(
        GET_TOKEN_SCRIPT, [gw.ws_url, "not-a-jwt", gw.token("eve", ["team:w1"])])
    assert user == "eve"
    assert log == [["connecting", None], ["reconnecting", 4001], ["connected", None],
                   ["closed", 1000]]
    # No other token to try: the 4001 is final, as without getToken.
    assert (refused, code) == ("unauthorized", 4001)
