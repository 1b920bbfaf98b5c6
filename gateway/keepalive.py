"""WebSocket keepalive for every connection of a server from one task.

websockets' own keepalive runs a task per connection (the task, its coroutine, a timer
and a future waiting for each pong: about 1.5 KB a connection, a tenth of an idle
connection's memory). :class:`Keepalive` keeps the same contract with two floats a
connection (:class:`~gateway.transport.BoundedConnection`'s ``ping_due`` and
``ping_sent``) and one sweep of the server's connections every ``tick`` seconds:

- every open connection is sent a Ping frame ``interval`` seconds after it was first
  seen open, then ``interval`` seconds after the previous ping, once that one is
  answered (websockets' ``ping_interval``);
- a connection whose Pong for that ping has not come ``timeout`` seconds after the ping
  was sent is failed with 1011 "keepalive ping timeout", as websockets does
  (``ping_timeout``), and cut ``close_grace`` seconds later if it has not closed.

Each deadline is overrun by at most ``tick``, an eighth of the shorter bound (2.5 s at
the default 20 s). A sweep looks at every connection (a clock comparison for those not
due: about 0.3 us each) and writes only to those due; connections are pinged in the
tick they come due, so a burst of connects is pinged as it came, spread over ticks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

import structlog
from websockets.asyncio.server import ServerConnection

from gateway.transport import BoundedConnection

log = structlog.get_logger("presence.keepalive")

TICKS_PER_BOUND = 8


class Keepalive:
    """Pings ``connections()`` (the server's open and opening connections) every
    ``interval`` seconds and fails those whose pong is ``timeout`` seconds late.

    Connections that are not :class:`BoundedConnection` are left alone.
    """

    def __init__(
        self,
        connections: Callable[[], Collection[ServerConnection]],
        interval: float,
        timeout: float,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        self.connections = connections
        self.interval = interval
        self.timeout = timeout
        self.tick = min(interval, timeout) / TICKS_PER_BOUND

    async def loop(self) -> None:
        """Sweep every ``tick`` seconds, until cancelled (a node duty: ``Node.run_duty``)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            self.sweep(loop.time())

    def sweep(self, now: float) -> tuple[int, int]:
        """One pass over the connections at loop time ``now``: (pings sent, connections
        failed for a late pong)."""
        pinged = failed = 0
        for c in list(self.connections()):
            if not isinstance(c, BoundedConnection):
                continue
            try:
                verdict = c.keepalive_due(now, self.interval, self.timeout)
            except Exception:
                # One connection's failure must not end the keepalive of all the others.
                log.exception("keepalive_failed")
                continue
            if verdict is None:
                continue
            if verdict:
                pinged += 1
            else:
                failed += 1
        return pinged, failed


__all__ = ["Keepalive"]
