"""Resume tokens, and the lost connections this node holds (PROTOCOL.md "Resume").

A resume token is ``<random>.<conn>``: 192 random bits and the id of the connection it
resumes. Only its SHA-256 is stored, with the connection's record in the user's slot
(:meth:`cluster.base.Store.add_connection`); a resume presents the token, the Store
checks the hash and replaces it (single use) and the connection passes to the resuming
node (:meth:`cluster.base.Store.resume`), on any gateway of the cluster.

Holding: when a connection of this node is lost (no clean end), its metas stay in the
Store and nobody sees a diff. This node keeps a timer of ``resume_ttl`` seconds; when it
fires, the metas are removed, if they are still this node's (a resume elsewhere took
them), and their leaves published with ``last_seen`` = the time of the loss. If this
node dies or is drained meanwhile, its lease (kept at least ``resume_ttl``) lapses and
a survivor's sweep removes them, with the node's last lease refresh as ``last_seen``.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from cluster.base import Adopted, Store
from gateway.metrics import Metrics
from gateway.ports import BackendError, now_ms
from presence.text import has_control, is_encodable

log = structlog.get_logger("presence.holds")

MAX_TOKEN = 256
"""Longest resume token accepted (PROTOCOL.md)."""


def new_token(conn: str) -> tuple[str, str]:
    """A fresh resume token for ``conn`` and its hash."""
    token = f"{secrets.token_urlsafe(24)}.{conn}"
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_conn(token: str) -> str | None:
    """The connection id a resume token names, or None for a token of no known shape."""
    if len(token) > MAX_TOKEN or not is_encodable(token) or has_control(token):
        return None
    _random, dot, conn = token.partition(".")
    return conn if dot and len(_random) >= 32 and conn else None


@dataclass(slots=True)
class Held:
    """A lost connection waiting for its client."""

    user: str
    channels: list[str]
    """Its presence channels (their metas stay in the Store)."""
    lost_at: int
    handle: asyncio.TimerHandle | None = None


Expire = Callable[[str, Held], Coroutine[Any, Any, None]]


class Holds:
    """This node's held connections and their timers. ``ttl`` 0 turns holding off."""

    def __init__(self, ttl: float, expire: Expire,
                 background: Callable[[Coroutine[Any, Any, None]], None], metrics: Metrics) -> None:
        self.ttl = ttl
        self._expire = expire
        self._background = background
        self._metrics = metrics
        self._held: dict[str, Held] = {}
        self._expiring: set[str] = set()  # expiries under way (see resume)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, conn: str, user: str, channels: list[str], lost_at: int) -> None:
        """Keep ``conn``'s metas until ``ttl`` seconds after ``lost_at``, then expire
        them."""
        self._start(conn, Held(user, channels, lost_at))

    def take(self, conn: str) -> Held | None:
        """``conn`` was resumed: stop its timer (here, or nothing if held elsewhere)."""
        held = self._held.pop(conn, None)
        if held is not None and held.handle is not None:
            held.handle.cancel()
        self._metrics.held.set(len(self._held))
        return held

    async def resume(self, store: Store, owner: str, user: str,
                     token: str) -> tuple[Adopted | None, str]:
        """Adopt for ``owner`` the connection ``token`` names (held here, elsewhere,
        or by a dead or drained node); with its new resume token. ``(None, "")`` when
        it cannot be resumed, also when the backend is down (the client starts
        afresh rather than wait).

        A connection held here has its timer stopped before the Store is asked (and
        again after: the old session of a connection resumed here may end only then),
        and one whose expiry has begun is refused: the expiry removes the connection's
        record as this node's, so a claim by this same node in between would be
        removed with it while the client is told ``resumed`` (another node's claim
        is seen by the expiry as :data:`cluster.base.RESUMED_ELSEWHERE`)."""
        conn = token_conn(token)
        if conn is not None and conn not in self._expiring:
            held = self.take(conn)
            new, new_hash = new_token(conn)
            try:
                adopted = await store.resume(owner, user, conn, token_hash(token), new_hash)
            except BackendError as exc:
                log.warning("resume_failed", error=type(exc).__name__)
                adopted = None
            if adopted is not None:
                # And a hold begun meanwhile: a stale session of this id, ending late.
                self.take(conn)
                self._metrics.resumes.labels("resumed").inc()
                return adopted, new
            if held is not None:  # not this token's to take: the hold goes on as it was
                self._start(conn, held)
        self._metrics.resumes.labels("not_resumed").inc()
        return None, ""

    def _start(self, conn: str, held: Held) -> None:
        left = self.ttl - (now_ms() - held.lost_at) / 1000
        held.handle = asyncio.get_running_loop().call_later(max(0.0, left), self._fire, conn)
        self._held[conn] = held
        self._metrics.held.set(len(self._held))

    def _fire(self, conn: str) -> None:
        held = self._held.pop(conn, None)
        self._metrics.held.set(len(self._held))
        if held is not None:
            self._expiring.add(conn)
            self._background(self._run_expiry(conn, held))

    async def _run_expiry(self, conn: str, held: Held) -> None:
        try:
            await self._expire(conn, held)
        finally:
            self._expiring.discard(conn)

    def close(self) -> None:
        """Node stop: the timers go; the node's lease covers what they held."""
        for held in self._held.values():
            if held.handle is not None:
                held.handle.cancel()
        self._held.clear()
        self._metrics.held.set(0)
