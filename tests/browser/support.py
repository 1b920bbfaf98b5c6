"""What the browser tests share: Debian's Chromium driven by Playwright, pages that record
their errors, screenshots into tests/browser/artifacts/ (not committed), and a TCP proxy
that can cut the connections through it like a network loss.

Playwright's own browser download is never used (``executable_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
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


class TcpProxy:
    """A TCP proxy on 127.0.0.1 that a test controls, between clients and a gateway.

    - :meth:`cut` aborts every connection through it on both sides (a TCP reset, no
      WebSocket close frame): to the client and to the server it is a network loss.
    - :meth:`hold` makes new connections wait (accepted, not forwarded) until
      :meth:`release`, so a test can change things while a client is away.
    - ``upstream`` (a port) may be changed: later connections go to the new server.
    - ``accepted`` counts connections accepted; :meth:`wait_accepted` waits for a count.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._arrived = asyncio.Event()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def cut(self) -> int:
        """Abort every forwarded connection on both sides; how many were cut."""
        pairs, self._pairs = self._pairs, set()
        for down, up in pairs:
            down.transport.abort()
            up.transport.abort()
        return len(pairs)

    async def wait_accepted(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.accepted < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        self._closed = True
        self._open.set()  # held connections see _closed and are dropped
        self.cut()
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self._arrived.set()
        try:
            await self._open.wait()
            if self._closed:
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            except OSError:
                writer.transport.abort()  # the server is down: refused, as without a proxy
                return
            pair = (writer, up_writer)
            self._pairs.add(pair)
            pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                     asyncio.create_task(self._pump(up_reader, writer))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for p in pumps:
                p.cancel()
            self._pairs.discard(pair)
            for w in pair:
                w.close()
        finally:
            self._tasks.discard(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
