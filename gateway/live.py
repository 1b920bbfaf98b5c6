"""The connections a node serves, by connection id.

A resume may hand a connection back to the node that served it before that node has
noticed the loss (under load a dead socket is found out late): two sessions then carry
one connection id, and only the newer one owns it. :meth:`Live.add` says which session
the new one supersedes, and :meth:`Live.discard` tells the superseded one, when it
ends, that the connection is not its own any more (its end must neither hold nor
forget what the newer session carries on).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from gateway.ports import LocalConnection


class Live(Collection[LocalConnection]):
    """The node's live sessions, at most one per connection id."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[str, LocalConnection] = {}

    def add(self, conn: LocalConnection) -> LocalConnection | None:
        """Add ``conn``; the session it supersedes (same id), now removed, or None."""
        old = self._by_id.get(conn.conn)
        self._by_id[conn.conn] = conn
        return old if old is not conn else None

    def discard(self, conn: LocalConnection) -> bool:
        """Remove ``conn``; False when it was not there (superseded, or never added)."""
        if self._by_id.get(conn.conn) is conn:
            del self._by_id[conn.conn]
            return True
        return False

    def __contains__(self, conn: object) -> bool:
        key = getattr(conn, "conn", None)
        return isinstance(key, str) and self._by_id.get(key) is conn

    def __iter__(self) -> Iterator[LocalConnection]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
