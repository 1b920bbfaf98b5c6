"""Messages between gateway nodes, carried by the Broker as msgpack maps.

Kinds (field ``k``):

* ``j``: a join or update: ``u`` user, ``m`` meta (wire map), ``ts`` change time;
* ``l``: a leave, close or lost connection: ``u`` user, ``c`` conn, ``ls`` last seen, ``ts``;
* ``c``: churn records for a ``churn:`` channel: ``r`` records (wire maps), ``ts``.

Decoding is defensive (a payload from a newer node with unknown kinds is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from presence.churn import ChurnRecord
from presence.codec import pack, unpack
from presence.meta import Meta


@dataclass(frozen=True, slots=True)
class JoinMsg:
    user: str
    meta: Meta
    ts: int


@dataclass(frozen=True, slots=True)
class LeaveMsg:
    user: str
    conn: str
    last_seen: int
    ts: int


@dataclass(frozen=True, slots=True)
class ChurnMsg:
    records: tuple[ChurnRecord, ...]
    ts: int


Message = JoinMsg | LeaveMsg | ChurnMsg


def encode_join(user: str, meta: Meta, ts: int) -> bytes:
    return pack({"k": "j", "u": user, "m": meta.to_wire(), "ts": ts})


def encode_leave(user: str, conn: str, last_seen: int, ts: int) -> bytes:
    return pack({"k": "l", "u": user, "c": conn, "ls": last_seen, "ts": ts})


def encode_churn(records: list[ChurnRecord], ts: int) -> bytes:
    return pack({"k": "c", "r": [r.to_wire() for r in records], "ts": ts})


def decode_message(payload: bytes) -> Message | None:
    """Decode a broker payload; None for anything unknown or damaged."""
    try:
        d: Any = unpack(payload)
        kind = d["k"]
        if kind == "j":
            return JoinMsg(str(d["u"]), Meta.from_wire(d["m"]), int(d["ts"]))
        if kind == "l":
            return LeaveMsg(str(d["u"]), str(d["c"]), int(d["ls"]), int(d["ts"]))
        if kind == "c":
            return ChurnMsg(tuple(ChurnRecord.from_wire(r) for r in d["r"]), int(d["ts"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    except Exception:  # msgpack's own errors
        return None
    return None
