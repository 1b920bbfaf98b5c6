"""Channel state (user -> conn -> meta) and the rules for applying snapshots and diffs.

The same class serves the in-memory store (the server's truth) and the client's mirror
(built from a ``joined`` snapshot and the ``diff`` frames that follow), so the property
"applying the diffs in order to the snapshot gives the server's state" compares two
instances of one type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from presence.meta import Meta


class ChannelState:
    """The metas of one presence channel, grouped by user."""

    __slots__ = ("_users",)

    def __init__(self) -> None:
        self._users: dict[str, dict[str, Meta]] = {}

    def __len__(self) -> int:
        return sum(len(c) for c in self._users.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChannelState) and self._users == other._users

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ChannelState({self.to_wire()!r})"

    def users(self) -> Iterator[str]:
        return iter(self._users)

    def metas(self, user: str) -> list[Meta]:
        return list(self._users.get(user, {}).values())

    def get(self, user: str, conn: str) -> Meta | None:
        return self._users.get(user, {}).get(conn)

    def put(self, user: str, meta: Meta) -> None:
        """Insert or replace the meta of ``meta.conn`` unconditionally."""
        self._users.setdefault(user, {})[meta.conn] = meta

    def merge(self, user: str, meta: Meta) -> bool:
        """Insert ``meta`` unless a meta with a higher or equal ``seq`` is already held.

        This is the client rule: keep the meta with the highest ``seq`` for a conn.
        Returns True when the state changed.
        """
        current = self.get(user, meta.conn)
        if current is not None and current.seq >= meta.seq:
            return False
        self.put(user, meta)
        return True

    def remove(self, user: str, conn: str) -> Meta | None:
        conns = self._users.get(user)
        if conns is None:
            return None
        meta = conns.pop(conn, None)
        if not conns:
            del self._users[user]
        return meta

    def to_wire(self) -> dict[str, list[dict[str, Any]]]:
        """The ``presence`` map of a ``joined`` reply, metas ordered by conn."""
        return {
            user: [conns[c].to_wire() for c in sorted(conns)]
            for user, conns in sorted(self._users.items())
        }

    @classmethod
    def from_wire(cls, presence: Mapping[str, Any]) -> ChannelState:
        state = cls()
        for user, metas in presence.items():
            for m in metas:
                state.merge(str(user), Meta.from_wire(m))
        return state

    def apply_diff(self, diff: Mapping[str, Any]) -> None:
        """Apply a ``diff`` frame's ``joins`` and ``leaves`` (either may be absent)."""
        for user, entries in (diff.get("leaves") or {}).items():
            for e in entries:
                self.remove(str(user), str(e["conn"]))
        for user, metas in (diff.get("joins") or {}).items():
            for m in metas:
                self.merge(str(user), Meta.from_wire(m))
