"""Presence transitions as webhook events (PROTOCOL.md "Webhooks").

The Store decides each transition atomically, so exactly one node learns of it: the
node whose write made a user's first connection (``user.online``), removed its last one
(``user.offline``, after the resume hold: a resumed connection is never removed), put
a channel's first member (``channel.occupied``) or removed its last
(``channel.vacated``); for a dead node's connections, the node that swept them. That
node makes the event here and hands it to the sink (gateway/webhooks.py).

Events made in one loop turn are handed over together ("events of one moment"), in the
order they were made, so the events of one user stay in order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from cluster.base import SweptMeta

Event = dict[str, Any]
Sink = Callable[[list[Event]], None]


class Transitions:
    """Makes events with ids unique across the cluster (``<owner>-<counter>``)."""

    def __init__(self, owner: str, clock_ms: Callable[[], int], sink: Sink | None) -> None:
        self._owner = owner
        self._clock = clock_ms
        self.sink = sink
        self._ids = itertools.count(1)
        self._batch: list[Event] = []

    def online(self, user: str) -> None:
        self._add("user.online", user=user)

    def offline(self, user: str, last_seen: int, cause: str) -> None:
        """``cause``: closed, lost, expired or node_died."""
        self._add("user.offline", user=user, last_seen=last_seen, cause=cause)

    def occupied(self, *channels: str) -> None:
        for ch in channels:
            self._add("channel.occupied", ch=ch)

    def vacated(self, *channels: str) -> None:
        for ch in channels:
            self._add("channel.vacated", ch=ch)

    def swept(self, swept: Sequence[SweptMeta]) -> None:
        """This node's sweep removed a dead node's metas: their channels left empty,
        their users left with no connection."""
        for m in swept:
            if m.vacated:
                self.vacated(m.ch)
            if m.offline:
                self.offline(m.user, m.last_seen, "node_died")

    def _add(self, kind: str, **fields: Any) -> None:
        if self.sink is None:
            return
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append({"id": f"{self._owner}-{next(self._ids):x}", "type": kind,
                            "at": self._clock(), **fields})

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch and self.sink is not None:
            self.sink(batch)
