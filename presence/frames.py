"""Validation of client requests: a decoded frame in, a typed request out.

:func:`parse_request` raises :class:`BadRequest` naming the offending field; it never
raises anything else for a map with a string ``t`` (property-tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from presence.channels import validate_channel
from presence.errors import BadRequest, LimitExceeded, PresenceError
from presence.meta import MetaPatch, parse_patch
from presence.text import check_identifier, check_text

MAX_QUERY_USERS = 100
MAX_USER_ID = 128


@dataclass(frozen=True, slots=True)
class Hello:
    ref: int | None
    token: str | None
    resume: str | None = None


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


@dataclass(frozen=True, slots=True)
class Refresh:
    ref: int | None
    token: str


Request = Hello | Join | Leave | Update | Query | Ping | Refresh


def parse_ref(frame: dict[str, Any]) -> int | None:
    """The request's ``ref`` if it is an integer, else None (never raises)."""
    ref = frame.get("ref")
    if isinstance(ref, int) and not isinstance(ref, bool):
        return ref
    return None


def user_ids(
    items: Iterable[object],
    field: str = "users",
    limit: int = MAX_QUERY_USERS,
    too_many: type[PresenceError] = LimitExceeded,
) -> tuple[str, ...]:
    """The distinct user ids of ``items``, in first-seen order: the one parser of user-id
    lists (WebSocket ``query``, HTTP ``?users=``).

    Every item must be a string of 1 to :data:`MAX_USER_ID` characters that passes
    :func:`presence.text.check_identifier`, else :class:`BadRequest` naming ``field``.
    Duplicates are dropped BEFORE counting: 150 copies of one id are one id. No id at
    all is :class:`BadRequest`; more than ``limit`` distinct ids raise ``too_many``
    (:class:`LimitExceeded` by default: a quota, not a malformed request).
    """
    distinct: dict[str, None] = {}
    for u in items:
        if not isinstance(u, str) or not u or len(u) > MAX_USER_ID:
            raise BadRequest(
                f"{field} must hold strings of 1 to {MAX_USER_ID} characters", field=field
            )
        distinct[check_identifier(u, field)] = None
    if not distinct:
        raise BadRequest(f"{field} must list at least one user id", field=field)
    if len(distinct) > limit:
        raise too_many(f"{field} holds more than {limit} distinct user ids", field=field)
    return tuple(distinct)


def validate_user_ids(raw: object, field: str, limit: int) -> tuple[str, ...]:
    """A non-empty list of user ids, checked by :func:`user_ids`."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{field} must be a non-empty list of user ids", field=field)
    return user_ids(raw, field, limit)


def _patch(raw: object) -> MetaPatch:
    """A meta patch whose text fields encode (device and note are free text)."""
    patch = parse_patch(raw)
    if patch.device is not None:
        check_text(patch.device, "meta.device")
    if patch.note is not None:
        check_text(patch.note, "meta.note")
    return patch


def parse_request(frame: dict[str, Any]) -> Request:
    """Turn a decoded frame into a request, or raise :class:`BadRequest`."""
    t = frame["t"]
    raw_ref = frame.get("ref")
    if raw_ref is not None and parse_ref(frame) is None:
        raise BadRequest("ref must be an integer", field="ref")
    ref = parse_ref(frame)
    if t == "join":
        raw_meta = frame.get("meta")
        patch = MetaPatch() if raw_meta is None else _patch(raw_meta)
        return Join(ref, validate_channel(frame.get("ch")), patch)
    if t == "update":
        return Update(ref, _patch(frame.get("meta")))
    if t == "leave":
        return Leave(ref, validate_channel(frame.get("ch")))
    if t == "ping":
        return Ping(ref)
    if t == "query":
        return Query(ref, validate_user_ids(frame.get("users"), "users", MAX_QUERY_USERS))
    if t == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest("refresh must carry a token string", field="token")
        return Refresh(ref, check_identifier(token, "token"))
    if t == "hello":
        token = frame.get("token")
        if token is not None and not isinstance(token, str):
            raise BadRequest("token must be a string", field="token")
        if token is not None:
            check_identifier(token, "token")
        resume = frame.get("resume")
        if resume is not None and not isinstance(resume, str):
            raise BadRequest("resume must be a string", field="resume")
        # Any string: one of no known shape is an unknown token (resumed: false).
        return Hello(ref, token, resume)
    raise BadRequest(f"unknown frame type {t[:32]!r}", field="t")
