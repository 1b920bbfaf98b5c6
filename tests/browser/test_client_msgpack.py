"""The browser client on the ``presence.v1.msgpack`` subprotocol, in real Chromium,
against a real gateway and a Python client in the same channel."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest

from tests.browser.support import CHROMIUM, open_dashboard
from tests.fixtures.servers import GatewayHandle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

pytest.importorskip("playwright.async_api", reason="pip install playwright")

MSGPACK_SCRIPT = """
async ([url, token]) => {
  const { PresenceClient } = await import('/client.js');
  const c = window.client = new PresenceClient({ url, token, format: 'msgpack' });
  c.on('presence', 'team:w1', (view) => { window.view = view; });
  await c.connect();
  const joined = await c.join('team:w1', { status: 'busy', device: 'web', note: 'Tasting' });
  return { wire: c.wire, format: c.format, conn: c.welcome.conn,
           members: Object.keys(joined.presence).sort() };
}
"""


def browser_joins(user: str, status: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        metas = event.get("joins", {}).get(user, [])
        return event["t"] == "diff" and any(m["status"] == status for m in metas)
    return match


async def test_msgpack_end_to_end(browser: Any, gateway: GatewayHandle) -> None:
    pat = await gateway.client("pat", channels=["team:w1"])
    await pat.join("team:w1", {"status": "online", "device": "mobile"})
    page = await open_dashboard(browser, gateway, {})
    p = page.page
    frames: list[Any] = []
    p.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(f)))

    info = await p.evaluate(MSGPACK_SCRIPT, [gateway.ws_url, gateway.token("bea", ["team:w1"])])
    assert info["wire"] == "msgpack" and info["format"] == "msgpack"
    assert info["members"] == ["bea", "pat"]

    # the Python client sees the browser member, with the meta it sent in msgpack
    diff = await pat.wait_for(browser_joins("bea", "busy"))
    (meta,) = diff["joins"]["bea"]
    assert (meta["device"], meta["note"], meta["conn"]) == ("web", "Tasting", info["conn"])

    # and the browser sees the Python client's diffs
    await pat.update(status="away", note="Driving")
    await p.wait_for_function("() => window.view.pat && window.view.pat.status === 'away'")
    note = await p.evaluate("window.view.pat.metas[0].note")
    assert note == "Driving"
    await pat.close()
    await p.wait_for_function("() => window.view.pat.status === 'offline'")
    assert isinstance(await p.evaluate("window.view.pat.last_seen"), int)

    # what went over the wire was MessagePack in binary frames, not JSON
    await p.wait_for_function("() => true")  # let Playwright deliver the last frame events
    assert frames and all(isinstance(f, bytes) for f in frames), frames[:3]
    kinds = [msgpack.unpackb(f, raw=False)["t"] for f in frames]
    assert kinds[:2] == ["welcome", "joined"] and "diff" in kinds
    await p.evaluate("window.client.close()")
    assert page.errors == []


async def test_dashboard_speaks_msgpack(browser: Any, gateway: GatewayHandle) -> None:
    pat = await gateway.client("pat", channels=["team:w1"])
    await pat.join("team:w1", {"status": "online", "device": "mobile", "note": "At the venue"})
    fragment = {"token": gateway.token("carol", ["team:w1"]), "ws": gateway.ws_url,
                "team": "team:w1", "format": "msgpack"}
    page = await open_dashboard(browser, gateway, fragment)
    p = page.page
    await p.wait_for_selector("#team-list li[data-user='carol'][data-status='online']")
    await p.wait_for_selector("#team-list li[data-user='pat'][data-status='online']")
    assert await p.evaluate("window.presenceDashboard.state.client.wire") == "msgpack"
    await pat.update(status="busy", note="Ceremony")
    row = await p.wait_for_selector("#team-list li[data-user='pat'][data-status='busy']")
    assert "Ceremony" in await row.inner_text()
    await page.shot("msgpack-team-360.png")
    assert page.errors == []
