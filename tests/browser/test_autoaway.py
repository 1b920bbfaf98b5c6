"""Auto-away in the dashboard (on by default), in real Chromium: a Python observer in
the same channel sees the browser user go away when the page is hidden or idle, and come
back to the status they chose on activity.

Headless Chromium keeps every page visible (minimising the window or switching tabs
changes nothing, and CDP has no visibility override), so the visibility change is
emulated in the page: ``document.visibilityState`` reads "hidden", then a
``visibilitychange`` event is dispatched, which is what the browser does when a tab goes
to the background.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from gateway.client import PresenceClient
from tests.browser.support import CHROMIUM, Page, open_dashboard
from tests.fixtures.servers import GatewayHandle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

pytest.importorskip("playwright.async_api", reason="pip install playwright")

SET_VISIBILITY = """
(state) => {
  Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => state });
  Object.defineProperty(document, 'hidden', { configurable: true, get: () => state === 'hidden' });
  document.dispatchEvent(new Event('visibilitychange'));
}
"""


def status_of(user: str, status: str) -> Any:
    """A predicate for a diff that shows ``user`` with ``status``."""
    def match(event: dict[str, Any]) -> bool:
        metas = event.get("joins", {}).get(user, [])
        return event["t"] == "diff" and any(m["status"] == status for m in metas)
    return match


def statuses_of(user: str, client: PresenceClient) -> list[str]:
    """The statuses ``user`` was shown with in the diffs queued so far (drains the queue)."""
    seen: list[str] = []
    while not client.events.empty():
        event = client.events.get_nowait()
        seen += [m["status"] for m in event.get("joins", {}).get(user, [])]
    return seen


async def dashboard_for(browser: Any, gw: GatewayHandle, user: str,
                        **extra: str) -> tuple[Page, PresenceClient]:
    """An observer in team:w1, then ``user``'s dashboard on team:w1, seen online."""
    observer = await gw.client("obs", channels=["team:w1"])
    await observer.join("team:w1", {"status": "online", "device": "desk"})
    fragment = {"token": gw.token(user, ["team:w1"]), "ws": gw.ws_url, "team": "team:w1",
                **extra}
    page = await open_dashboard(browser, gw, fragment)
    await page.page.wait_for_selector(f"#team-list li[data-user='{user}'][data-status='online']")
    await observer.wait_for(status_of(user, "online"))
    return page, observer


async def test_hidden_page_goes_away_and_back_to_chosen_status(
        browser: Any, gateway: GatewayHandle) -> None:
    page, observer = await dashboard_for(browser, gateway, "bea")
    p = page.page
    # the user chooses busy: that is the status to come back to
    await p.click("#me [data-status='busy']")
    await observer.wait_for(status_of("bea", "busy"))

    await p.evaluate(SET_VISIBILITY, "hidden")
    await observer.wait_for(status_of("bea", "away"))
    await p.wait_for_selector("#team-list li[data-user='bea'][data-status='away']")
    await p.wait_for_selector("#me[data-auto='hidden']")
    assert "hidden" in await p.inner_text("#me-auto")
    await page.shot("autoaway-hidden-360.png")

    await p.evaluate(SET_VISIBILITY, "visible")
    await observer.wait_for(status_of("bea", "busy"))
    await p.wait_for_selector("#team-list li[data-user='bea'][data-status='busy']")
    await p.wait_for_selector("#me[data-auto='']")
    # the server holds the chosen status again, and nothing else was sent meanwhile
    metas = (await gateway.node.store.channel_presence("team:w1"))["bea"]
    assert [m.status for m in metas] == ["busy"]
    assert page.errors == []


async def test_user_who_chose_away_is_left_alone(browser: Any, gateway: GatewayHandle) -> None:
    page, observer = await dashboard_for(browser, gateway, "cy")
    p = page.page
    await p.click("#me [data-status='away']")
    await observer.wait_for(status_of("cy", "away"))
    await p.evaluate(SET_VISIBILITY, "hidden")
    await p.wait_for_selector("#me[data-auto='hidden']")
    await p.evaluate(SET_VISIBILITY, "visible")
    await p.wait_for_selector("#me[data-auto='']")
    # a round trip after the page's last possible update: nothing was sent for cy
    await p.evaluate("window.presenceDashboard.state.client.ping()")
    await observer.ping()
    assert statuses_of("cy", observer) == []
    metas = (await gateway.node.store.channel_presence("team:w1"))["cy"]
    assert [m.status for m in metas] == ["away"]
    assert page.errors == []


IDLE_S = 1.5


async def test_idle_goes_away_and_activity_brings_back(browser: Any,
                                                       gateway: GatewayHandle) -> None:
    page, observer = await dashboard_for(browser, gateway, "dee", idle=str(IDLE_S))
    p = page.page
    # Input more often than the idle time, for twice the idle time: still online.
    for i in range(6):
        await p.mouse.move(20 + 10 * i, 300)
        await asyncio.sleep(IDLE_S / 3)
    assert "away" not in statuses_of("dee", observer)

    loop = asyncio.get_running_loop()
    still = loop.time()
    await observer.wait_for(status_of("dee", "away"), timeout=IDLE_S + 5)
    assert loop.time() - still >= IDLE_S * 0.6  # not before the idle time has (nearly) run
    await p.wait_for_selector("#team-list li[data-user='dee'][data-status='away']")
    await p.wait_for_selector("#me[data-auto='idle']")
    await page.shot("autoaway-idle-360.png")

    await p.keyboard.press("Shift")
    await observer.wait_for(status_of("dee", "online"))
    await p.wait_for_selector("#team-list li[data-user='dee'][data-status='online']")
    await p.wait_for_selector("#me[data-auto='']")
    assert page.errors == []
