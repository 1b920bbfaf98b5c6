"""The floor for fan-out: a bare websockets server that broadcasts one payload to all.

``python -m loadtest.bare_server --port N`` accepts WebSocket clients on any path
(compression off, as in the gateway) and answers two plain HTTP requests on the same
port:

- ``GET /start?size=S&duration=D``: for D seconds, ``websockets.broadcast()`` a text
  payload of S bytes to every connected client, as fast as the clients read it (a
  broadcast waits while any client's unsent buffer is above 256 KiB, so memory stays
  bounded and nobody is dropped);
- ``GET /stats``: JSON ``{"clients": n, "broadcasts": b, "frames": f, "running": bool}``.

The process stops on SIGTERM or after ``--max-runtime`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

HIGH_WATER = 256 * 1024


class Bare:
    def __init__(self) -> None:
        self.clients: set[ServerConnection] = set()
        self.broadcasts = 0
        self.frames = 0
        self.running = False

    async def handler(self, ws: ServerConnection) -> None:
        self.clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            self.clients.discard(ws)

    def backlog(self) -> int:
        worst = 0
        for ws in self.clients:
            transport: Any = ws.transport
            worst = max(worst, transport.get_write_buffer_size())
        return worst

    async def run(self, size: int, duration: float) -> None:
        payload = ('{"t":"diff","pad":"' + "x" * max(0, size - 20) + '"}')[:size]
        self.running = True
        end = time.monotonic() + duration
        try:
            while time.monotonic() < end:
                clients = list(self.clients)
                broadcast(clients, payload)
                self.broadcasts += 1
                self.frames += len(clients)
                await asyncio.sleep(0)
                # Polling, not an Event: the transports signal nothing when they drain.
                while self.backlog() > HIGH_WATER and time.monotonic() < end:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
        finally:
            self.running = False

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/start":
            q = parse_qs(url.query)
            size = int(q.get("size", ["1024"])[0])
            duration = float(q.get("duration", ["10"])[0])
            asyncio.get_running_loop().create_task(self.run(size, duration))
            return connection.respond(HTTPStatus.OK, "started\n")
        if url.path == "/stats":
            body = json.dumps({"clients": len(self.clients), "broadcasts": self.broadcasts,
                               "frames": self.frames, "running": self.running})
            return connection.respond(HTTPStatus.OK, body + "\n")
        return None


async def main_async(port: int, max_runtime: float) -> None:
    bare = Bare()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    async with serve(bare.handler, "127.0.0.1", port, compression=None,
                     process_request=bare.process_request, max_size=2**16, backlog=4096):
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(stop, max_runtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-runtime", type=float, default=600.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args.port, args.max_runtime))
    else:
        uvloop.run(main_async(args.port, args.max_runtime))


if __name__ == "__main__":
    main()
