"""Coalescing of one channel's changes into ``diff`` frames.

Rules (they make "apply the diffs in order to the snapshot" exact):

* a conn appears at most once in a pending diff, either under ``joins`` (its newest
  meta) or under ``leaves``;
* a join or update after a pending leave of the same conn cannot be merged into one
  map (the client would not know the order), so the caller must flush first:
  :meth:`PendingDiff.add_join` returns False and leaves the diff untouched;
* a leave after a pending join replaces the join (the client may never have seen it;
  a leave of an unknown conn is a no-op for the client);
* ``ts`` is the time of the oldest change folded in.
"""

from __future__ import annotations

from typing import Any

from presence.meta import Meta


class PendingDiff:
    """The changes of one channel not yet sent."""

    __slots__ = ("_joins", "_leaves", "ts")

    def __init__(self) -> None:
        self._joins: dict[tuple[str, str], Meta] = {}
        self._leaves: dict[tuple[str, str], int] = {}
        self.ts: int | None = None

    def __bool__(self) -> bool:
        return bool(self._joins or self._leaves)

    def _stamp(self, ts: int) -> None:
        if self.ts is None or ts < self.ts:
            self.ts = ts

    def add_join(self, user: str, meta: Meta, ts: int) -> bool:
        """Fold in a join or update. False when a leave of that conn is pending."""
        key = (user, meta.conn)
        if key in self._leaves:
            return False
        current = self._joins.get(key)
        if current is None or current.seq < meta.seq:
            self._joins[key] = meta
        self._stamp(ts)
        return True

    def add_leave(self, user: str, conn: str, last_seen: int, ts: int) -> None:
        """Fold in a leave (or a lost connection)."""
        key = (user, conn)
        self._joins.pop(key, None)
        self._leaves[key] = last_seen
        self._stamp(ts)

    def conns(self) -> set[str]:
        """The conns this diff talks about (their own connections must not get it)."""
        return {c for _, c in self._joins} | {c for _, c in self._leaves}

    def frame(self, channel: str, exclude: str | None = None) -> dict[str, Any] | None:
        """The ``diff`` frame, without the entries of conn ``exclude``; None if empty."""
        joins: dict[str, list[dict[str, Any]]] = {}
        leaves: dict[str, list[dict[str, Any]]] = {}
        for (user, conn), meta in self._joins.items():
            if conn != exclude:
                joins.setdefault(user, []).append(meta.to_wire())
        for (user, conn), last_seen in self._leaves.items():
            if conn != exclude:
                leaves.setdefault(user, []).append({"conn": conn, "last_seen": last_seen})
        if not joins and not leaves:
            return None
        return {"t": "diff", "ch": channel, "ts": self.ts, "joins": joins, "leaves": leaves}
