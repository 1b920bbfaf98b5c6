"""Presence metas: one per connection per presence channel.

A meta is what the protocol sends: ``{"conn", "status", "device", "note", "since",
"seq"}``. It is immutable here; an update makes a new meta with ``seq + 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from presence.errors import BadRequest

STATUSES = ("online", "away", "busy")
MAX_DEVICE = 32
MAX_NOTE = 128
DEFAULT_DEVICE = "unknown"


@dataclass(frozen=True, slots=True)
class MetaPatch:
    """The fields a client may set on its meta; ``None`` means "leave as it is"."""

    status: str | None = None
    device: str | None = None
    note: str | None = None

    def over(self, base: MetaPatch) -> MetaPatch:
        """This patch's fields, ``base``'s where this one leaves them ``None``."""
        return MetaPatch(
            status=base.status if self.status is None else self.status,
            device=base.device if self.device is None else self.device,
            note=base.note if self.note is None else self.note,
        )


@dataclass(frozen=True, slots=True)
class Meta:
    conn: str
    status: str = "online"
    device: str = DEFAULT_DEVICE
    note: str = ""
    since: int = 0
    seq: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {
            "conn": self.conn,
            "status": self.status,
            "device": self.device,
            "note": self.note,
            "since": self.since,
            "seq": self.seq,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Meta:
        """Rebuild a meta from its wire map (trusted input: the store or the broker)."""
        return cls(
            conn=str(data["conn"]),
            status=str(data["status"]),
            device=str(data["device"]),
            note=str(data["note"]),
            since=int(data["since"]),
            seq=int(data["seq"]),
        )

    def patched(self, patch: MetaPatch) -> Meta:
        """The meta after ``patch``, with ``seq`` advanced by one."""
        return replace(
            self,
            status=self.status if patch.status is None else patch.status,
            device=self.device if patch.device is None else patch.device,
            note=self.note if patch.note is None else patch.note,
            seq=self.seq + 1,
        )


def new_meta(conn: str, patch: MetaPatch | None, now: int) -> Meta:
    """The first meta of ``conn`` in a channel, joined at ``now``."""
    p = patch or MetaPatch()
    return Meta(
        conn=conn,
        status=p.status or "online",
        device=p.device if p.device is not None else DEFAULT_DEVICE,
        note=p.note if p.note is not None else "",
        since=now,
        seq=1,
    )


def parse_patch(raw: object, field: str = "meta") -> MetaPatch:
    """Validate a client's ``meta`` map; raise :class:`BadRequest` naming the bad field."""
    if not isinstance(raw, dict):
        raise BadRequest(f"{field} must be a map", field=field)
    status = raw.get("status")
    device = raw.get("device")
    note = raw.get("note")
    if status is not None and status not in STATUSES:
        raise BadRequest(
            f"{field}.status must be one of online, away, busy", field=f"{field}.status"
        )
    if device is not None and (not isinstance(device, str) or len(device) > MAX_DEVICE):
        raise BadRequest(
            f"{field}.device must be a string of at most {MAX_DEVICE} characters",
            field=f"{field}.device",
        )
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise BadRequest(
            f"{field}.note must be a string of at most {MAX_NOTE} characters",
            field=f"{field}.note",
        )
    return MetaPatch(status=status, device=device, note=note)


def overall_status(metas: Iterable[Meta]) -> str:
    """A user's status: busy if any meta is busy, else online if any is, else away.

    No metas at all means ``offline``.
    """
    seen = {m.status for m in metas}
    if not seen:
        return "offline"
    if "busy" in seen:
        return "busy"
    if "online" in seen:
        return "online"
    return "away"


def metas_to_wire(metas: Iterable[Meta]) -> list[dict[str, Any]]:
    """Metas as sent on the wire, in a stable order (by connection id)."""
    return [m.to_wire() for m in sorted(metas, key=lambda m: m.conn)]


def presence_to_wire(presence: Mapping[str, Iterable[Meta]]) -> dict[str, list[dict[str, Any]]]:
    """A channel's ``presence`` map (user -> metas) as sent on the wire, users sorted."""
    return {user: metas_to_wire(metas) for user, metas in sorted(presence.items())}
