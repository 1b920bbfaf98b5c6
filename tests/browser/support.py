"""What the browser tests share: Debian's Chromium driven by Playwright, pages that record
their errors, screenshots into tests/browser/artifacts/ (not committed).

Playwright's own browser download is never used (``executable_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.fixtures.servers import GatewayHandle

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 10_000


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text} ({msg.location})")

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


async def open_dashboard(browser: Any, gw: GatewayHandle, fragment: dict[str, str],
                         width: int = 360) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": 760},
                                        device_scale_factor=1)
    page = Page(await context.new_page())
    page.page.set_default_timeout(TIMEOUT_MS)
    await page.page.goto(f"{gw.http_url}/static/dashboard.html#{urlencode(fragment)}")
    return page
