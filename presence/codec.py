"""Wire codecs: JSON (text frames) and MessagePack (binary frames).

:func:`decode` is total: on any input it returns a frame (a dict whose ``t`` is a str)
or raises :class:`MalformedFrame`; nothing else escapes (property-tested).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgpack
import orjson

from presence.errors import MalformedFrame

SUBPROTOCOL_JSON = "presence.v1.json"
SUBPROTOCOL_MSGPACK = "presence.v1.msgpack"


class Format(StrEnum):
    JSON = "json"
    MSGPACK = "msgpack"

    @classmethod
    def for_subprotocol(cls, name: str | None) -> Format:
        return cls.MSGPACK if name == SUBPROTOCOL_MSGPACK else cls.JSON


SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)


def encode(frame: dict[str, Any], fmt: Format) -> str | bytes:
    """Encode a frame: ``str`` (a text frame) for JSON, ``bytes`` for msgpack."""
    if fmt is Format.MSGPACK:
        return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]
    return orjson.dumps(frame).decode()


def decode(data: str | bytes, fmt: Format) -> dict[str, Any]:
    """Decode one client frame in the negotiated format.

    A JSON connection must send text frames and a msgpack connection binary frames.
    """
    try:
        if fmt is Format.MSGPACK:
            if isinstance(data, str):
                raise MalformedFrame("text frame on a msgpack connection; send binary frames")
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        else:
            if isinstance(data, bytes):
                raise MalformedFrame("binary frame on a JSON connection; send text frames")
            obj = orjson.loads(data)
    except MalformedFrame:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, ...)
        raise MalformedFrame(f"frame is not valid {fmt.value}: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise MalformedFrame("frame must be a map")
    t = obj.get("t")
    if not isinstance(t, str):
        raise MalformedFrame("frame must have a string field t", field="t")
    return obj


def pack(obj: Any) -> bytes:
    """msgpack for internal payloads (broker messages, store values)."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
