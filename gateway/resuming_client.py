"""A Python client that outlives its connections (PROTOCOL.md "Session lifetime").

:class:`ResumingClient` resumes after a loss (the same ``conn``, nobody sees a diff),
rejoins when the server could not take the resume, backs off as the close code says
(:func:`reconnect_delay`) and refreshes its token before it expires. Each of its
connections is a :class:`gateway.client.PresenceClient` sharing its mirrors::

    client = await ResumingClient.connect(url, token_provider=fetch_token)
    await client.join("team:w1", status="online")
    client.mirror["team:w1"]      # kept across reconnects
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway.client import ClientError, PresenceClient, handshake
from presence.codec import Format
from presence.state import ChannelState

# Close codes after which reconnecting with the same token cannot help (PROTOCOL.md
# "Errors"): bad or expired token, malformed frames, abuse, a frame too big.
FATAL_CLOSES = frozenset({4001, 4000, 1008, 1009})
RESTART = 1012  # the server drains: reconnect after its hint or a random delay
OVERLOADED = 1013  # try again later
_HINT = re.compile(r"reconnect in ([0-9.]+) ?s")

TokenProvider = Callable[[], Awaitable[str] | str]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays, in seconds (the browser client's defaults).

    ``initial`` and ``max`` bound the full-jitter exponential backoff; ``restart_jitter``
    bounds the delay after a 1012 whose reason has no hint; ``overloaded`` is the typical
    least delay after a 1013 (randomised by +-50 %).
    """

    initial: float = 0.5
    max: float = 30.0
    restart_jitter: float = 5.0
    overloaded: float = 10.0


def reconnect_delay(code: int | None, reason: str, attempt: int, backoff: Backoff,
                    rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnecting after a close ``code`` / ``reason``.

    1012: the server's own jittered hint (``reconnect in 2.5s`` in the reason), else a
    random delay in ``[0, restart_jitter)``. Otherwise full jitter: a random delay in
    ``[0, min(max, initial * 2**attempt))``, and after 1013 at least about
    ``overloaded``. ``attempt`` counts the failed tries since the last ``welcome``.
    """
    if code == RESTART:
        hint = _HINT.search(reason or "")
        if hint is not None:
            with contextlib.suppress(ValueError):
                seconds: float = float(str(hint.group(1)))
                return max(0.0, seconds)
        return rand() * backoff.restart_jitter
    bound = min(backoff.max, backoff.initial * 2.0 ** min(attempt, 32))
    delay = rand() * bound
    if code == OVERLOADED:
        return max(backoff.overloaded * (0.5 + rand()), delay)
    return delay


@dataclass(frozen=True, slots=True)
class Reconnect:
    """One reconnection of a :class:`ResumingClient`, recorded once it is complete
    (channels resumed or rejoined)."""

    close_code: int | None  # of the connection that was lost (1006: no close frame)
    close_reason: str
    delay: float  # seconds waited before the first attempt
    attempts: int  # connection attempts it took (1: the first one worked)
    resumed: bool  # the server took the resume token: same conn, no diff to anyone
    conn_before: str
    conn: str
    rejoin_failed: tuple[str, ...] = ()  # channels that could not be joined again


class _Link(PresenceClient):
    """One connection of a ResumingClient. It shares the owner's mirrors and event
    queue, and notes the ``joined`` frames with ``ref`` null (the snapshots a resume
    sends) and the channels the server left for it (``left`` with ``ref`` null)."""

    def __init__(self, ws: ClientConnection, fmt: Format, owner: ResumingClient) -> None:
        super().__init__(ws, fmt)
        self.owner = owner
        self.mirror = owner.mirror
        self.churn = owner.churn
        self.events = owner.events
        self.snapshots: set[str] = set()
        self.snapshot_seen = asyncio.Event()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        super()._on_frame(frame)
        if frame.get("ref") is not None:
            return
        if frame["t"] == "joined":
            self.snapshots.add(str(frame["ch"]))
            self.snapshot_seen.set()
        elif frame["t"] == "left":
            self.owner._server_left(str(frame["ch"]))


class ResumingClient:
    """A presence client that outlives its connections: it resumes after a loss and
    refreshes its token before ``exp`` (PROTOCOL.md "Session lifetime").

    ::

        client = await ResumingClient.connect(url, token, token_provider=get_token)
        await client.join("team:w1", status="online", device="web")
        client.mirror["team:w1"]       # kept current across reconnections

    Contract:

    - The first :meth:`connect` raises like :meth:`PresenceClient.connect` (a refused
      token, an unreachable server); after that the client reconnects on its own until
      :meth:`close`, a fatal close (4001 without a ``token_provider`` or twice in a row,
      4000, 1008, 1009), or ``max_attempts`` failed tries in a row.
    - Reconnection delays follow :func:`reconnect_delay` (the 1012 hint, 1013 later,
      full-jitter backoff otherwise). Each ``hello`` carries the resume token of the last
      ``welcome``. On ``resumed: true`` the mirrors are replaced from the ``joined``
      frames (``ref`` null) the server sends; a channel joined or left while the
      connection was being lost is joined or left then, and if the connection's meta
      differs from what the user last set, one ``update`` restores it. On ``resumed:
      false`` (or a server without resume) every channel is joined again, in the order
      first joined, with the meta the user set (join meta merged with later updates);
      channels the server refuses are dropped and listed in ``Reconnect.rejoin_failed``.
    - Requests made while disconnected wait for the next connection (bounded by their
      ``timeout``). A request whose connection is lost before its reply raises
      ConnectionError; the channels and meta it asked for are kept and re-established
      by the reconnection anyway.
    - With a ``token_provider`` (sync or async, returning a JWT for the same user), the
      token is refreshed in place at ``refresh_at`` (0.8) of its remaining lifetime
      (from ``welcome.exp`` / ``refreshed.exp``), and a fresh token is fetched before a
      ``hello`` when the current one is past that point.
    - ``events`` / ``next_event`` / ``wait_for`` and ``mirror`` / ``churn`` behave as on
      :class:`PresenceClient`, over every connection. ``reconnects`` lists each
      completed reconnection; :meth:`wait_reconnected` waits for one.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        fmt: str | Format = Format.JSON,
        *,
        token_provider: TokenProvider | None = None,
        backoff: Backoff | None = None,
        refresh_at: float = 0.8,
        timeout: float = 5.0,
        max_attempts: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < refresh_at < 1.0:
            raise ValueError("refresh_at must be in (0, 1)")
        self.url = url
        self.token = token
        self.fmt = Format(fmt)
        self.token_provider = token_provider
        self.backoff = backoff or Backoff()
        self.refresh_at = refresh_at
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._kwargs = kwargs
        self.mirror: dict[str, ChannelState] = {}
        self.churn: dict[str, dict[str, dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reconnects: list[Reconnect] = []
        self.refreshes: list[dict[str, Any]] = []  # every ``refreshed`` frame
        self.status = "idle"  # idle | connected | reconnecting | closed
        self.link: _Link | None = None
        self.exp: int | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        # What the user asked for: channel -> the meta to join it with (None: churn).
        self._channels: dict[str, dict[str, Any] | None] = {}
        # The connection's current meta fields (last join meta or update), which the
        # server applies to a join that leaves fields out.
        self._current: dict[str, Any] = {}
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # a reconnect or refresh completed, or closed
        self._exp_changed = asyncio.Event()
        self._refresh_point: float | None = None
        self._attempt = 0
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, token: str | None = None,
                      fmt: str | Format = Format.JSON, **options: Any) -> ResumingClient:
        """Connect once (raising as :meth:`PresenceClient.connect` does) and start
        watching the connection; ``options`` are the constructor's keyword arguments.
        Without ``token`` the ``token_provider`` gives one."""
        client = cls(url, token, fmt, **options)
        if client.token is None and client.token_provider is not None:
            client.token = await client._fetch_token()
        link = await client._open(None)
        client._adopt(link)
        client._supervisor = asyncio.create_task(client._supervise())
        client._refresher = asyncio.create_task(client._refresh_loop())
        return client

    # -- state --------------------------------------------------------------------------
    @property
    def welcome(self) -> dict[str, Any]:
        """The ``welcome`` of the current (or last) connection."""
        return self.link.welcome if self.link is not None else {}

    @property
    def conn(self) -> str:
        return self.link.conn if self.link is not None else ""

    @property
    def resume_token(self) -> str | None:
        """The resume token of the last ``welcome`` (None when the server gave none or
        turned resume off)."""
        return self.resume_token_of(self.link) if self.link is not None else None

    @property
    def channels(self) -> list[str]:
        """The channels this client keeps joined, in the order first joined."""
        return list(self._channels)

    # -- connections --------------------------------------------------------------------
    async def _open(self, resume: str | None) -> _Link:
        ws, welcome = await handshake(self.url, self.token, self.fmt, header_token=False,
                                       timeout=self.timeout, resume=resume,
                                       kwargs=self._kwargs)
        link = _Link(ws, self.fmt, self)
        link._start(welcome)
        return link

    def _adopt(self, link: _Link) -> None:
        self.link = link
        self._attempt = 0
        exp = link.welcome.get("exp")
        self.exp = exp if isinstance(exp, int) else None
        self._plan_refresh()
        self.status = "connected"

    async def _supervise(self) -> None:
        """Wait for the connection to end; reconnect, resume or rejoin; repeat."""
        while not self._closing and self.link is not None:
            link = self.link
            self._ready.set()
            await link.closed.wait()
            self._ready.clear()
            if self._closing:
                return
            code = link.ws.close_code
            reason = link.ws.close_reason or ""
            if not await self._reconnect(link, code, reason):
                return

    async def _reconnect(self, lost: _Link, code: int | None, reason: str) -> bool:
        """Reconnect after ``lost`` ended with ``code``; False when the client gave up."""
        if self._fatal(code, after_expiry=False):
            self._finish(code, reason)
            return False
        self.status = "reconnecting"
        delay = first_delay = reconnect_delay(code, reason, self._attempt, self.backoff)
        self._attempt += 1
        attempts = 0
        refused = code == 4001  # a fresh token is needed before the next hello
        while True:
            await asyncio.sleep(delay)  # the backoff itself, not a synchronisation
            attempts += 1
            try:
                if refused or self._refresh_due():
                    self.token = await self._fetch_token()
                link = await self._open(self.resume_token_of(lost))
                break
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if self._fatal(code, after_expiry=refused):
                    self._finish(code, reason)
                    return False
                refused = code == 4001
            except (OSError, TimeoutError, InvalidHandshake, ClientError) as exc:
                code, reason = None, str(exc)
            if self.max_attempts is not None and attempts >= self.max_attempts:
                self._finish(code, reason or "gave up reconnecting")
                return False
            delay = reconnect_delay(code, reason, self._attempt, self.backoff)
            self._attempt += 1
        resumed = link.welcome.get("resumed") is True and link.conn == lost.conn
        self._adopt(link)
        failed = await self._settle(link, resumed)
        self.reconnects.append(Reconnect(
            close_code=lost.ws.close_code, close_reason=lost.ws.close_reason or "",
            delay=first_delay, attempts=attempts, resumed=resumed, conn_before=lost.conn,
            conn=link.conn, rejoin_failed=tuple(failed)))
        self._changed.set()
        return True

    @staticmethod
    def resume_token_of(link: PresenceClient) -> str | None:
        token = link.welcome.get("resume")
        if not isinstance(token, str) or not token or link.welcome.get("resume_ttl") == 0:
            return None
        return token

    def _fatal(self, code: int | None, *, after_expiry: bool) -> bool:
        """Whether a close with ``code`` ends the client. A 4001 is retried once with a
        fresh token when there is a token provider."""
        if code not in FATAL_CLOSES:
            return False
        return not (code == 4001 and self.token_provider is not None and not after_expiry)

    def _finish(self, code: int | None, reason: str) -> None:
        self.status = "closed"
        self.close_code, self.close_reason = code, reason
        self.closed.set()
        self._changed.set()
        self._exp_changed.set()

    async def _settle(self, link: _Link, resumed: bool) -> list[str]:
        """Bring the new connection to what the user asked for; the channels that could
        not be joined again."""
        if resumed:
            await self._await_snapshots(link)
            held = set(link.snapshots)
            for ch in held - set(self._channels):
                with contextlib.suppress(ClientError, ConnectionError, TimeoutError):
                    await link.leave(ch)  # a leave that was in flight at the loss
            missing = [ch for ch in self._channels if ch not in held]
            failed = await self._join_all(link, missing)
            await self._restore_meta(link)
            return failed
        for ch in list(self.mirror):
            if ch not in self._channels:
                self.mirror.pop(ch, None)
        for ch in list(self.churn):
            if ch not in self._channels:
                self.churn.pop(ch, None)
        return await self._join_all(link, list(self._channels))

    async def _await_snapshots(self, link: _Link) -> None:
        """Wait for the ``joined`` frames of a resume: until every channel kept joined
        has one, or the reply to a ``ping`` sent after the ``welcome`` (the server sends
        the snapshots before it reads the next request) plus a short grace."""
        want = set(self._channels)
        pong = asyncio.ensure_future(link.request({"t": "ping"}, self.timeout))
        try:
            async with asyncio.timeout(self.timeout):
                while not want <= link.snapshots and not pong.done():
                    link.snapshot_seen.clear()
                    waiter = asyncio.ensure_future(link.snapshot_seen.wait())
                    await asyncio.wait({waiter, pong}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
            if not want <= link.snapshots:
                async with asyncio.timeout(min(1.0, self.timeout)):
                    while not want <= link.snapshots:
                        link.snapshot_seen.clear()
                        await link.snapshot_seen.wait()
        except TimeoutError:
            pass  # the channels without a snapshot are joined again
        finally:
            if not pong.done():
                pong.cancel()
            # asyncio.wait neither raises the pong's outcome nor swallows a cancellation
            # of this task (suppressing BaseException here kept close() waiting forever).
            await asyncio.wait({pong})
            if not pong.cancelled():
                pong.exception()  # retrieved: a failed ping only ends the wait

    async def _join_all(self, link: _Link, channels: list[str]) -> list[str]:
        failed: list[str] = []
        for ch in channels:
            if ch not in self._channels:
                continue
            try:
                await link.join(ch, self._channels[ch])
            except ClientError:
                failed.append(ch)
                self._channels.pop(ch, None)
                self.mirror.pop(ch, None)
                self.churn.pop(ch, None)
            except (ConnectionError, ConnectionClosed, TimeoutError):
                break  # lost again: the next reconnection tries
        return failed

    async def _restore_meta(self, link: _Link) -> None:
        """After a resume: if this connection's meta in a channel differs from what the
        user last set (an update lost with the connection), send one update."""
        user = str(link.welcome.get("user", ""))
        patch: dict[str, Any] = {}
        for ch, want in self._channels.items():
            state = self.mirror.get(ch)
            if want is None or state is None:
                continue
            meta = state.get(user, link.conn)
            if meta is None:
                continue
            for key, value in want.items():
                if getattr(meta, key, value) != value:
                    patch[key] = self._current.get(key, value)
        if patch:
            with contextlib.suppress(ClientError, ConnectionError, ConnectionClosed,
                                     TimeoutError):
                await link.update(**patch)

    def _server_left(self, ch: str) -> None:
        """The server left ``ch`` for us (a refresh took the grant away): forget it."""
        self._channels.pop(ch, None)

    async def _live(self, timeout: float) -> _Link:
        """The current connection, waiting up to ``timeout`` for one."""
        if self.status == "closed":
            raise ConnectionError("the client is closed")
        async with asyncio.timeout(timeout):
            while True:
                await self._ready.wait()
                if self.status == "closed":
                    raise ConnectionError("the client is closed")
                link = self.link
                if link is not None and not link.closed.is_set():
                    return link
                await asyncio.sleep(0)  # the supervisor clears _ready on its next step

    # -- token refresh ------------------------------------------------------------------
    async def _fetch_token(self) -> str | None:
        if self.token_provider is None:
            return self.token
        got = self.token_provider()
        token = await got if inspect.isawaitable(got) else got
        if not isinstance(token, str):
            raise TypeError("token_provider must return a str")
        return token

    def _plan_refresh(self) -> None:
        """Set the refresh point of the current token: ``refresh_at`` of its remaining
        lifetime from now, at least a second away unless it expires sooner (so that a
        provider returning the same token cannot make the client spin near ``exp``)."""
        if self.exp is None or self.token_provider is None:
            self._refresh_point = None
        else:
            now = time.time()
            remaining = max(0.0, self.exp - now)
            self._refresh_point = now + max(self.refresh_at * remaining, min(remaining, 1.0))
        self._exp_changed.set()

    def _refresh_due(self) -> bool:
        """Past the refresh point of the current token."""
        return self._refresh_point is not None and time.time() >= self._refresh_point

    async def _refresh_loop(self) -> None:
        """Refresh the token in place at its refresh point (with a token provider)."""
        if self.token_provider is None:
            return
        while not self._closing:
            self._exp_changed.clear()
            due = self._refresh_point
            if due is None:
                await self._exp_changed.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exp_changed.wait(), max(0.0, due - time.time()))
                continue  # a new exp (reconnected, or refreshed by hand): plan again
            try:
                token = await self._fetch_token()
                link = await self._live(self.timeout)
                reply = await link.refresh(str(token))
            except (ClientError, ConnectionError, ConnectionClosed, TimeoutError, TypeError):
                # Refused or lost: try again soon, without spinning near exp (a
                # reconnection meanwhile plans again from its welcome).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exp_changed.wait(), 1.0)
                continue
            self._accept_refresh(str(token), reply)

    def _accept_refresh(self, token: str, reply: dict[str, Any]) -> None:
        self.token = token
        exp = reply.get("exp")
        self.exp = exp if isinstance(exp, int) else self.exp
        self.refreshes.append(reply)
        self._plan_refresh()
        self._changed.set()

    # -- requests -----------------------------------------------------------------------
    async def request(self, frame: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send ``frame`` on the current connection (waiting for one) and return the
        reply; raises ClientError for an ``error`` reply, ConnectionError when the
        connection is lost first, TimeoutError past ``timeout``."""
        async with asyncio.timeout(timeout):
            link = await self._live(timeout)
            try:
                return await link.request(frame, timeout)
            except ConnectionClosed as exc:
                raise ConnectionError("connection lost") from exc

    async def join(
        self, ch: str, meta: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Join ``ch`` and keep it joined across reconnections (until :meth:`leave`)."""
        m = {**(meta or {}), **fields}
        known = ch in self._channels
        current = dict(self._current)
        if not known:
            if ch.startswith("churn:"):
                self._channels[ch] = None
            else:
                # The server fills the fields a join leaves out from the connection's
                # current meta: remember the meta that results, for a later rejoin.
                self._channels[ch] = {**self._current, **m}
                self._current.update(m)
        frame: dict[str, Any] = {"t": "join", "ch": ch}
        if m:
            frame["meta"] = m
        try:
            return await self.request(frame)
        except ClientError:
            if not known:
                self._channels.pop(ch, None)
                self._current = current
            raise

    async def leave(self, ch: str) -> dict[str, Any]:
        """Leave ``ch`` (also after a reconnection that happens meanwhile)."""
        self._channels.pop(ch, None)
        try:
            return await self.request({"t": "leave", "ch": ch})
        finally:
            self.mirror.pop(ch, None)
            self.churn.pop(ch, None)

    async def update(self, **meta: Any) -> dict[str, Any]:
        """Change this connection's meta in every presence channel; kept for rejoins.
        An update the server refuses is forgotten (as the server forgets it)."""
        saved = dict(self._current), {ch: dict(m) for ch, m in self._channels.items()
                                       if m is not None}
        self._current.update(meta)
        for m in self._channels.values():
            if m is not None:
                m.update(meta)
        try:
            return await self.request({"t": "update", "meta": meta})
        except ClientError:
            self._current = saved[0]
            for ch, m in saved[1].items():
                if ch in self._channels:
                    self._channels[ch] = m
            raise

    async def query(self, users: list[str]) -> dict[str, Any]:
        return await self.request({"t": "query", "users": users})

    async def ping(self) -> dict[str, Any]:
        return await self.request({"t": "ping"})

    async def refresh(self, token: str) -> dict[str, Any]:
        """Refresh by hand; the token is then used for later ``hello`` frames too."""
        reply = await self.request({"t": "refresh", "token": token})
        self._accept_refresh(token, reply)
        return reply

    # -- events -------------------------------------------------------------------------
    async def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        """The next event for which ``predicate(event)`` is true (others are dropped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if predicate(event):
                    return event

    async def wait_reconnected(self, count: int | None = None,
                               timeout: float = 10.0) -> Reconnect:
        """Wait until ``count`` reconnections have completed (default: one more than
        now) and return that one. Raises ConnectionError if the client closes first."""
        want = len(self.reconnects) + 1 if count is None else count
        await self._until(lambda: len(self.reconnects) >= want, "reconnecting", timeout)
        return self.reconnects[want - 1]

    async def wait_refreshed(self, count: int, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until ``count`` automatic or manual refreshes have succeeded; the
        ``refreshed`` frame of the last one counted."""
        await self._until(lambda: len(self.refreshes) >= count, "refreshing", timeout)
        return self.refreshes[count - 1]

    async def _until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until ``done()``; ConnectionError if the client closes first."""
        async with asyncio.timeout(timeout):
            while not done():
                if self.status == "closed":
                    raise ConnectionError(
                        f"closed ({self.close_code} {self.close_reason}) before {what}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        """Wait until the client gives up (a fatal close); its close code and reason."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code, self.close_reason

    async def close(self) -> None:
        """Close for good with 1000 (a clean end: the server publishes the leaves)."""
        self._closing = True
        for task in (self._supervisor, self._refresher):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=self.timeout)  # bounded, whatever it does
        if self.link is not None:
            await self.link.close()
        if self.status != "closed":
            self._finish(1000, "client closed")
