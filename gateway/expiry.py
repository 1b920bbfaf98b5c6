"""Token expiry of a node's connections, checked by one loop.

A timer per connection costs about half a kilobyte (memory per idle connection is a
target); one loop that looks at every connection once a second costs nothing per
connection, and closes an expired one at most ``interval`` late (PROTOCOL.md: at
``exp`` plus ``token_leeway``). A refresh needs nothing here: each connection compares
with its current token's deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from gateway.ports import now_ms


class Expiring(Protocol):
    def expire_if_due(self, ms: int) -> None:
        """Close with 4001 "token expired" if the token's deadline passed at ``ms``."""
        ...


async def expiry_loop(connections: Callable[[], Iterable[Expiring]],
                      clock_ms: Callable[[], int] = now_ms, interval: float = 1.0) -> None:
    """Every ``interval`` seconds, tell each connection the time."""
    while True:
        await asyncio.sleep(interval)
        now = clock_ms()
        for conn in list(connections()):
            conn.expire_if_due(now)
