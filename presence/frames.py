"""Validation of client requests: a decoded frame in, a typed request out.

:func:`parse_request` raises :class:`BadRequest` naming the offending field; it never
raises anything else for a map with a string ``t`` (property-tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from presence.channels import validate_channel
from presence.errors import BadRequest, LimitExceeded
from presence.meta import MetaPatch, parse_patch

MAX_QUERY_USERS = 100
MAX_USER_ID = 128


@dataclass(frozen=True, slots=True)
class Hello:
    ref: int | None
    token: str | None


@dataclass(frozen=True, slots=True)
class Join:
    ref: int | None
    ch: str
    meta: MetaPatch


@dataclass(frozen=True, slots=True)
class Leave:
    ref: int | None
    ch: str


@dataclass(frozen=True, slots=True)
class Update:
    ref: int | None
    meta: MetaPatch


@dataclass(frozen=True, slots=True)
class Query:
    ref: int | None
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    ref: int | None


Request = Hello | Join | Leave | Update | Query | Ping


def parse_ref(frame: dict[str, Any]) -> int | None:
    """The request's ``ref`` if it is an integer, else None (never raises)."""
    ref = frame.get("ref")
    if isinstance(ref, int) and not isinstance(ref, bool):
        return ref
    return None


def validate_user_ids(raw: object, field: str, limit: int) -> tuple[str, ...]:
    """A list of 1..limit non-empty user ids of at most 128 characters."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{field} must be a non-empty list of user ids", field=field)
    if len(raw) > limit:
        raise LimitExceeded(f"{field} holds more than {limit} user ids", field=field)
    for u in raw:
        if not isinstance(u, str) or not u or len(u) > MAX_USER_ID:
            raise BadRequest(
                f"{field} must hold strings of 1 to {MAX_USER_ID} characters", field=field
            )
    return tuple(dict.fromkeys(raw))


def parse_request(frame: dict[str, Any]) -> Request:
    """Turn a decoded frame into a request, or raise :class:`BadRequest`."""
    t = frame["t"]
    raw_ref = frame.get("ref")
    if raw_ref is not None and parse_ref(frame) is None:
        raise BadRequest("ref must be an integer", field="ref")
    ref = parse_ref(frame)
    if t == "join":
        raw_meta = frame.get("meta")
        patch = MetaPatch() if raw_meta is None else parse_patch(raw_meta)
        return Join(ref, validate_channel(frame.get("ch")), patch)
    if t == "update":
        return Update(ref, parse_patch(frame.get("meta")))
    if t == "leave":
        return Leave(ref, validate_channel(frame.get("ch")))
    if t == "ping":
        return Ping(ref)
    if t == "query":
        return Query(ref, validate_user_ids(frame.get("users"), "users", MAX_QUERY_USERS))
    if t == "hello":
        token = frame.get("token")
        if token is not None and not isinstance(token, str):
            raise BadRequest("token must be a string", field="token")
        return Hello(ref, token)
    raise BadRequest(f"unknown frame type {t[:32]!r}", field="t")
