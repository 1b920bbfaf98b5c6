"""The protocol state machine of one client connection, with no I/O.

:class:`Connection` is what a session knows about its client: the token's grants, the
channels joined (with this connection's meta in each presence channel), the meta patch
the client set last, the rate buckets and abuse counters, and the diffs held back while
a join is in flight. It takes what the client sent and answers with *effects*, plain
values that say what must happen (write this frame, store these metas, enter that
channel, close with this code); the gateway's session executes them in order and
reports back the outcome of the ones that touch the backends. Nothing here awaits,
reads a clock or touches a socket: the caller passes ``now`` (monotonic seconds, for
the rate limits) and ``ms`` (the server clock, for the protocol's times).

The model is python-websockets' ``protocol.py`` (events in, events out) and its
asyncio layer that only executes it.

Executing the effects of one call:

* effects run in the order given; :class:`Enter`, :class:`Snapshot`,
  :class:`PutMetas`, :class:`Exit` and :class:`QueryUsers` touch the backends;
* after :class:`Verify` (a ``refresh``) it calls :meth:`Connection.refreshed` with the
  new token's grants, and the token's deadline moves (:meth:`Connection.expires_ms`,
  :meth:`Connection.expired` when the timer fires);
* after :class:`Enter` succeeds the executor calls :meth:`Connection.entered`; after
  :class:`Snapshot` it calls :meth:`Connection.snapshot_ready` with the body it read
  and executes the effects returned (the ``joined`` reply, then the diffs held back);
  after :class:`QueryUsers` it sends ``result`` with what it read;
* if an effect fails, the executor stops there and executes
  :meth:`Connection.failed` with the error (a :class:`~presence.errors.PresenceError`;
  backend outages as :class:`~presence.errors.Overloaded`): the error reply for the
  request, the undoing of its hold-back, and the abuse close when errors pile up.

Requests of one connection are handled one at a time: a call for the next request
comes only after the effects of the previous one ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from presence.channels import channel_allowed, is_churn
from presence.codec import Format, decode
from presence.errors import (
    BadRequest,
    CloseCode,
    Forbidden,
    LimitExceeded,
    MalformedFrame,
    NotJoined,
    PresenceError,
    RateLimited,
    Unauthorized,
)
from presence.frames import (
    Hello,
    Join,
    Leave,
    Ping,
    Query,
    Refresh,
    Update,
    parse_ref,
    parse_request,
)
from presence.meta import Meta, MetaPatch, new_meta
from presence.ratelimit import SlidingWindow, TokenBucket
from presence.settings import QuotaSettings

Wire = str | bytes
"""An encoded frame, as the hub hands it to its members."""

NO_CHANNELS: frozenset[str] = frozenset()


class Grants(Protocol):
    """What a verified token grants (``gateway.auth.Claims`` has this shape)."""

    @property
    def user(self) -> str: ...
    @property
    def channels(self) -> tuple[str, ...]: ...
    @property
    def role(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def exp(self) -> int: ...
    @property
    def may_read_churn(self) -> bool: ...


# -- effects -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Write ``frame`` to the client."""

    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Write an already encoded frame (a diff held back during a join) to the client."""

    data: Wire


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the request ``ref`` with the error frame of ``error`` (and count it)."""

    error: PresenceError
    ref: int | None


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code``; nothing is written to the client after it."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Enter:
    """Become a local member of ``ch``; with ``meta`` (a presence channel) store and
    publish it as a join. On success call :meth:`Connection.entered`."""

    ch: str
    meta: Meta | None
    before: MetaPatch
    """The connection's current patch before this join (restored if it fails)."""


@dataclass(frozen=True, slots=True)
class Adopt:
    """A resumed connection's channel (already recorded by :meth:`Connection.resumed`):
    become a local member of ``ch`` again (no Store write, nothing published: the Store
    already holds ``meta``)."""

    ch: str
    meta: Meta | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Read the body of the ``joined`` reply for ``ch`` (``fresh``: from the Store;
    otherwise the node may answer from its local mirror) and pass it to
    :meth:`Connection.snapshot_ready`."""

    ch: str
    ref: int | None
    fresh: bool


@dataclass(frozen=True, slots=True)
class Exit:
    """Leave ``ch``; with ``had_meta`` remove its meta and publish the leave (``last``:
    no presence channel is left, so the user's last-seen is set)."""

    ch: str
    had_meta: bool
    last: bool


@dataclass(frozen=True, slots=True)
class PutMetas:
    """Store the changed metas (channel -> meta) and publish them as joins."""

    metas: Mapping[str, Meta]
    before: Mapping[str, Meta]
    """The metas they replace, and the patch before the update (restored if it fails)."""
    patch_before: MetaPatch


@dataclass(frozen=True, slots=True)
class QueryUsers:
    """Read the presence of ``users`` and answer ``result`` to ``ref``."""

    users: tuple[str, ...]
    ref: int | None


@dataclass(frozen=True, slots=True)
class Verify:
    """Check ``token`` (a ``refresh``) and pass its grants to
    :meth:`Connection.refreshed`; a token that does not verify fails the effect with
    :class:`~presence.errors.Unauthorized`."""

    token: str
    ref: int | None


@dataclass(frozen=True, slots=True)
class DeviceUsed:
    """Engagement signal: the client named ``device`` in a join or an update."""

    device: str


Effect = (Send | Deliver | Fail | Close | Enter | Adopt | Snapshot | Exit | PutMetas
          | QueryUsers | Verify | DeviceUsed)


def num(value: float) -> int | float:
    """A setting as the wire shows it: ``20`` rather than ``20.0``."""
    return int(value) if float(value).is_integer() else value


class Connection:
    """The state of one client connection (see the module docstring)."""

    __slots__ = (
        "backlog", "churn_channels", "closed", "conn", "current", "errors", "grants",
        "joins", "malformed", "metas", "quotas", "ref", "requests", "updates",
    )

    def __init__(self, conn: str, quotas: QuotaSettings, now: float) -> None:
        self.conn = conn
        self.quotas = quotas
        self.grants: Grants | None = None
        self.metas: dict[str, Meta] = {}
        # Shared and empty until a churn join (most connections never make one; an
        # empty set costs 216 bytes and memory per connection is a target).
        self.churn_channels: set[str] | frozenset[str] = NO_CHANNELS
        self.current = MetaPatch()
        # Channel -> diffs held back while its join is in flight (written after joined).
        self.backlog: dict[str, list[Wire]] = {}
        self.closed = False
        self.malformed = 0
        self.ref: int | None = None  # of the request being handled
        self.updates = TokenBucket(quotas.updates_per_second, quotas.updates_burst, now)
        self.requests = TokenBucket(quotas.requests_per_second, quotas.requests_burst, now)
        # Made on the first error: most connections never make one (memory per
        # connection is a target, and a deque costs ~600 bytes).
        self.errors: SlidingWindow | None = None
        self.joins: Callable[[str], SlidingWindow] | None = None

    # -- authentication ------------------------------------------------------------------
    @staticmethod
    def hello(message: Wire, fmt: Format) -> Hello:
        """The first frame, which must be ``hello``; else :class:`Unauthorized`."""
        try:
            request = parse_request(decode(message, fmt))
        except PresenceError as exc:
            raise Unauthorized(exc.message) from None
        if not isinstance(request, Hello):
            raise Unauthorized("the first frame must be hello")
        return request

    def authenticated(self, grants: Grants, joins: Callable[[str], SlidingWindow]) -> None:
        """The token checked out; ``joins(user)`` gives the user's join window (shared
        by the user's connections on this node)."""
        self.grants = grants
        self.joins = joins

    @property
    def user(self) -> str:
        return "" if self.grants is None else self.grants.user

    def max_channels(self) -> int:
        q = self.quotas
        paid = self.grants is not None and self.grants.tier == "paid"
        return q.max_channels_paid if paid else q.max_channels_free

    def registered(self, user_connections: int, ref: int | None, node: str,
                   ping_interval: float, max_frame: int,
                   resume: tuple[str, float, bool | None] = ("", 0.0, None)) -> list[Effect]:
        """The node counted ``user_connections`` of this user (this one included):
        the welcome, or the per-user limit and a close. ``resume`` is (this
        connection's resume token, ``resume_ttl``, whether the hello's resume
        succeeded: None when it asked none)."""
        limit = self.quotas.max_user_connections
        if user_connections > limit:
            self.closed = True
            return [Fail(LimitExceeded(f"at most {limit} connections per user"), ref),
                    Close(CloseCode.POLICY_VIOLATION, "too many connections for this user")]
        frame: dict[str, Any] = {
            "t": "welcome", "conn": self.conn, "user": self.user, "node": node,
            "ping_interval": num(ping_interval),
            "limits": {"max_channels": self.max_channels(), "max_frame": max_frame},
            "exp": 0 if self.grants is None else self.grants.exp,
            "resume": resume[0], "resume_ttl": num(resume[1]),
        }
        if resume[2] is not None:
            frame["resumed"] = resume[2]
        if ref is not None:
            frame["ref"] = ref
        return [Send(frame)]

    # -- requests ------------------------------------------------------------------------
    def receive(self, message: Wire, fmt: Format, now: float, ms: int) -> list[Effect]:
        """One frame from the authenticated client."""
        if self.closed:
            return []
        try:
            frame = decode(message, fmt)
        except MalformedFrame as exc:
            self.malformed += 1
            if self.malformed > self.quotas.max_malformed:
                return self._close(CloseCode.MALFORMED, "too many malformed frames")
            return self._error(exc, None, now)
        ref = self.ref = parse_ref(frame)
        try:
            return self._dispatch(frame, ref, now, ms)
        except PresenceError as exc:
            return self._error(exc, ref, now)

    def _dispatch(self, frame: dict[str, Any], ref: int | None, now: float,
                  ms: int) -> list[Effect]:
        request = parse_request(frame)
        # One budget for every request: whatever it asks, a client cannot make the
        # node do unbounded work (a re-join flood re-encoded a whole snapshot each time).
        retry = self.requests.take(now)
        if retry > 0:
            raise RateLimited(
                f"at most {num(self.quotas.requests_per_second)} requests per second",
                retry_after=retry)
        if isinstance(request, Update):
            return self._update(request, now)
        if isinstance(request, Join):
            return self._join(request, now, ms)
        if isinstance(request, Leave):
            return self._leave(request)
        if isinstance(request, Ping):
            return [Send({"t": "pong", "ref": request.ref, "ts": ms})]
        if isinstance(request, Query):
            assert self.grants is not None
            if not self.grants.may_read_churn:  # the query roles are the churn roles
                raise Forbidden(f"role {self.grants.role} may not query")
            return [QueryUsers(request.users, request.ref)]
        if isinstance(request, Refresh):
            return [Verify(request.token, request.ref)]
        raise BadRequest("already authenticated: hello is only the first frame", field="t")

    def _join(self, req: Join, now: float, ms: int) -> list[Effect]:
        ch = req.ch
        grants = self.grants
        assert grants is not None and self.joins is not None
        refusal = self._refusal(ch)
        if refusal is not None:
            raise Forbidden(refusal)
        joined = ch in self.metas or ch in self.churn_channels
        if not joined and len(self.metas) + len(self.churn_channels) >= self.max_channels():
            raise LimitExceeded(f"at most {self.max_channels()} channels per connection")
        # A re-join costs like a join (it is answered from the node's mirror, but its
        # reply is a whole snapshot).
        retry = self.joins(grants.user).hit(now)
        if retry > 0:
            raise RateLimited(f"at most {self.quotas.joins_per_minute} joins per minute",
                              retry_after=retry)
        device = [DeviceUsed(req.meta.device)] if req.meta.device is not None else []
        if joined:
            return [Snapshot(ch, req.ref, fresh=False), *device]
        meta = None
        before = self.current
        if not is_churn(ch):
            # A join's meta inherits this connection's current status, device and note.
            self.current = req.meta.over(self.current)
            meta = new_meta(self.conn, self.current, ms)
        self.backlog[ch] = []
        return [Enter(ch, meta, before), Snapshot(ch, req.ref, fresh=True), *device]

    def resumed(self, channels: Mapping[str, Meta | None]) -> list[Effect]:
        """A resume adopted this connection with ``channels`` (channel -> its meta,
        None for churn): one ``joined`` (``ref`` null) per channel, diffs held back
        until each is written; a channel the token presented no longer grants is
        left (``left`` with ``ref`` null, the others see the leave). A channel that
        cannot be adopted here closes the connection with 1012 (it is held again). The current patch
        comes from the metas, so later joins inherit what the client had set."""
        effects: list[Effect] = []
        for ch, meta in channels.items():
            if self._refusal(ch) is not None:  # the token presented no longer grants it
                effects += [Exit(ch, meta is not None, not self.metas),
                            Send({"t": "left", "ref": None, "ch": ch})]
                continue
            if meta is not None:
                self.current = MetaPatch(meta.status, meta.device, meta.note)
            # Recorded at once: whatever happens next, the connection holds it (its
            # end holds or removes it; nothing adopted may stay in the Store unowned).
            self.entered(ch, meta)
            self.backlog[ch] = []
            effects += [Adopt(ch, meta), Snapshot(ch, None, fresh=True)]
        return effects

    def entered(self, ch: str, meta: Meta | None) -> None:
        """:class:`Enter` succeeded: the connection is a member of ``ch``."""
        if meta is None:
            self.churn_channels = self.churn_channels | {ch}
        else:
            self.metas[ch] = meta

    def snapshot_ready(self, ch: str, ref: int | None, body: Mapping[str, Any]) -> list[Effect]:
        """The ``joined`` reply, then the diffs held back since the join began."""
        held = self.backlog.pop(ch, None) or ()
        return [Send({"t": "joined", "ref": ref, "ch": ch, **body}),
                *(Deliver(data) for data in held)]

    def _leave(self, req: Leave) -> list[Effect]:
        ch = req.ch
        if ch in self.churn_channels:
            self.churn_channels = self.churn_channels - {ch}
            effect = Exit(ch, had_meta=False, last=False)
        elif ch in self.metas:
            del self.metas[ch]
            effect = Exit(ch, had_meta=True, last=not self.metas)
        else:
            raise NotJoined(f"not joined to {ch}")
        return [effect, Send({"t": "left", "ref": req.ref, "ch": ch})]

    def _update(self, req: Update, now: float) -> list[Effect]:
        retry = self.updates.take(now)
        if retry > 0:
            raise RateLimited(
                f"at most {num(self.quotas.updates_per_second)} updates per second",
                retry_after=retry)
        if not self.metas:
            raise NotJoined("join a presence channel before updating")
        patch = req.meta
        before, patch_before = dict(self.metas), self.current
        self.current = patch.over(self.current)
        changed = {ch: meta.patched(patch) for ch, meta in self.metas.items()}
        self.metas.update(changed)
        device = [DeviceUsed(patch.device)] if patch.device is not None else []
        return [PutMetas(changed, before, patch_before), Send({"t": "ok", "ref": req.ref}), *device]

    # -- token lifetime ----------------------------------------------------------------
    def refreshed(self, grants: Grants, ref: int | None) -> list[Effect]:
        """:class:`Verify` succeeded: the newest token's grants, role and tier replace
        the old ones; a channel they no longer grant is left (``left`` with ``ref``
        null, the others see the leave at once). A token of another user is refused
        (``forbidden``) and the connection keeps its current token."""
        assert self.grants is not None
        if grants.user != self.grants.user:
            return [Fail(Forbidden("the new token names another user"), ref)]
        self.grants = grants
        effects: list[Effect] = []
        for ch in self.joined_channels():
            if self._refusal(ch) is not None:
                effects += self._leave(Leave(None, ch))
        return [*effects, Send({"t": "refreshed", "ref": ref, "exp": grants.exp})]

    def _refusal(self, ch: str) -> str | None:
        """Why the current token does not grant ``ch``; None when it does."""
        grants = self.grants
        assert grants is not None
        if is_churn(ch) and not grants.may_read_churn:
            return f"role {grants.role} may not join churn channels"
        if not channel_allowed(ch, grants.channels):
            return f"token does not allow channel {ch}"
        return None

    def expires_ms(self, leeway: float) -> int | None:
        """When the connection is closed for its token (``exp`` plus ``leeway``
        seconds), in the server clock's ms; None before authentication."""
        if self.grants is None:
            return None
        return int((self.grants.exp + leeway) * 1000)

    def expired(self, ms: int, leeway: float) -> list[Effect]:
        """The expiry timer fired at ``ms``: 4001 "token expired" (a clean end) unless
        a refresh moved the deadline past ``ms``."""
        deadline = self.expires_ms(leeway)
        if self.closed or deadline is None or ms < deadline:
            return []
        return self._close(CloseCode.UNAUTHORIZED, "token expired")

    # -- outcomes --------------------------------------------------------------------
    def failed(self, effect: Effect, error: PresenceError, now: float) -> list[Effect]:
        """``effect`` of the request being handled failed with ``error``: the error
        reply, and the request undone as far as the client can tell."""
        if isinstance(effect, Adopt):
            # A resumed channel this node cannot serve now (its subscription failed, or
            # the node is stopping): the connection is held again, not left, and the
            # client told to come back, so that nobody sees a flap.
            self.backlog.pop(effect.ch, None)
            return self._close(CloseCode.SERVICE_RESTART, "server restarting; reconnect")
        if isinstance(effect, Verify):
            # A refresh whose token does not verify: the connection keeps its token.
            error = Forbidden(f"refresh refused: {error.message}")
        if isinstance(effect, Enter | Adopt | Snapshot):
            # Nothing may pile up behind a joined reply that will not come. A failed
            # snapshot leaves the membership standing: a retried join answers it.
            self.backlog.pop(effect.ch, None)
        if isinstance(effect, Enter):
            self.current = effect.before
        elif isinstance(effect, PutMetas):
            # The client is told the update failed: it is not applied here either (the
            # node re-asserts what this connection holds once the backend is back).
            self.current = effect.patch_before
            for ch, meta in effect.before.items():
                if ch in self.metas:
                    self.metas[ch] = meta
        return self._error(error, self.ref, now)

    def _error(self, error: PresenceError, ref: int | None, now: float) -> list[Effect]:
        if self.errors is None:
            self.errors = SlidingWindow(self.quotas.max_errors_per_minute, 60.0)
        effects: list[Effect] = [Fail(error, ref)]
        if self.errors.hit(now) > 0:
            effects += self._close(CloseCode.POLICY_VIOLATION, "too many errors")
        return effects

    def _close(self, code: int, reason: str) -> list[Effect]:
        self.closed = True
        return [Close(code, reason)]

    # -- frames from the node ----------------------------------------------------------
    def hold(self, ch: str | None, data: Wire) -> bool:
        """True if ``data`` (a frame of ``ch``) is held back until ``ch``'s joined
        reply; False if it is to be written now."""
        if ch is None:
            return False
        held = self.backlog.get(ch)
        if held is None:
            return False
        held.append(data)
        return True

    # -- the end -----------------------------------------------------------------------
    def drain(self, reconnect_in: float) -> list[Effect]:
        """Node shutdown: every presence meta removed (leaves published), then 1012 with
        a reconnect hint of ``reconnect_in`` seconds."""
        channels = list(self.metas)
        self.metas.clear()
        exits: list[Effect] = [Exit(ch, True, i == len(channels) - 1)
                               for i, ch in enumerate(channels)]
        return [*exits, *self._close(CloseCode.SERVICE_RESTART,
                                     f"server restarting; reconnect in {reconnect_in:.1f}s")]

    def joined_channels(self) -> list[str]:
        """Every channel joined: churn channels first, then presence channels."""
        return [*self.churn_channels, *self.metas]

    def end(self) -> None:
        """The connection is gone (its channels were left): forget everything."""
        self.closed = True
        self.metas.clear()
        self.churn_channels = NO_CHANNELS
        self.backlog.clear()
