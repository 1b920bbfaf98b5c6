"""Read paths of the node: join snapshots, user queries, channel presence.

Each returns the wire shape the protocol defines (PROTOCOL.md), so the WebSocket
session and the HTTP API answer from one code path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cluster.base import Store
from gateway.hub import Hub
from presence.channels import churn_org, is_churn
from presence.churn import MAX_SNAPSHOT
from presence.meta import Meta, metas_to_wire, overall_status, presence_to_wire

JoinedRead = Callable[[str], Awaitable[dict[str, list[Meta]]]]
"""A joiner's Store read of a presence channel, made what every local member holds
(``gateway.repair.GapRepair.joined_read``)."""


async def query_users(store: Store, users: Sequence[str]) -> dict[str, Any]:
    """The ``users`` body of a ``result`` reply (also ``GET /v1/presence``)."""
    found = await store.user_presence(users)
    out: dict[str, Any] = {}
    for user in users:
        up = found.get(user)
        metas = list(up.metas) if up is not None else []
        out[user] = {
            "status": overall_status(metas),
            "metas": metas_to_wire(metas),
            "last_seen": None if metas or up is None else up.last_seen,
        }
    return out


async def channel_presence(store: Store, ch: str) -> dict[str, list[dict[str, Any]]]:
    """The ``presence`` map of a channel (``GET /v1/channels/<ch>/presence``)."""
    return presence_to_wire(await store.channel_presence(ch))


class Reads:
    """The read paths bound to one node's Store and hub (what sessions and the admin
    API call)."""

    def __init__(self, store: Store, hub: Hub, joined_read: JoinedRead) -> None:
        self.store = store
        self.hub = hub
        self.joined_read = joined_read

    async def snapshot(self, ch: str, fresh: bool) -> dict[str, Any]:
        """The body of a ``joined`` reply: ``{"presence": ...}`` or ``{"churn": [...]}``.

        A re-join (not ``fresh``) of a channel with a local mirror is answered from it,
        with no Store read: re-joining cannot make the node read the Store each time.
        Any other presence read goes through :meth:`gateway.repair.GapRepair.joined_read`,
        which seeds or corrects the mirror, so that the joiner's snapshot and what the
        channel's other local members hold end equal.
        """
        if is_churn(ch):
            records = await self.store.churn_snapshot(churn_org(ch), MAX_SNAPSHOT)
            return {"churn": [r.to_wire() for r in records]}
        mirror = None if fresh else self.hub.mirror(ch)
        if mirror is not None:
            return {"presence": presence_to_wire({u: mirror.metas(u) for u in mirror.users()})}
        return {"presence": presence_to_wire(await self.joined_read(ch))}

    async def query_users(self, users: Sequence[str]) -> dict[str, Any]:
        """See :func:`query_users`."""
        return await query_users(self.store, users)
