"""An asyncio Python client that keeps a local mirror of the channels it joined.

Used by the tests, the demo simulator and load tools::

    client = await PresenceClient.connect("ws://127.0.0.1:8765/ws", token)
    await client.join("team:w1", status="online", device="web")
    client.mirror["team:w1"]          # presence.state.ChannelState, kept up to date
    event = await client.next_event(timeout=2)   # the next diff or churn frame

Replies are matched to requests by ``ref``; an ``error`` reply raises
:class:`ClientError`. Events (``diff``, ``churn``) are applied to the mirrors by the
reader task before they are queued, so the mirror is current when an event is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from presence.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, Format, decode, encode
from presence.state import ChannelState


class ClientError(Exception):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code = str(frame.get("code"))
        self.retry_after = frame.get("retry_after")


async def handshake(
    url: str,
    token: str | None,
    fmt: Format,
    *,
    header_token: bool,
    timeout: float,
    resume: str | None,
    kwargs: dict[str, Any],
) -> tuple[ClientConnection, dict[str, Any]]:
    """Open a WebSocket, send ``hello`` and return it with the ``welcome`` frame.

    Raises ConnectionClosed when the server closes instead (4001, 1012, 1013, ...),
    ClientError when it answers with another frame (the socket is then closed),
    OSError / TimeoutError / InvalidHandshake when no WebSocket could be opened.
    """
    sub = SUBPROTOCOL_MSGPACK if fmt is Format.MSGPACK else SUBPROTOCOL_JSON
    headers = {"Authorization": f"Bearer {token}"} if header_token and token else None
    ws = await asyncio.wait_for(
        connect(url, subprotocols=[Subprotocol(sub)], additional_headers=headers,
                compression=None, open_timeout=timeout, **kwargs),
        timeout,
    )
    try:
        hello: dict[str, Any] = {"t": "hello"}
        if token and not header_token:
            hello["token"] = token
        if resume is not None:
            hello["resume"] = resume
        await ws.send(encode(hello, fmt))
        raw = await asyncio.wait_for(ws.recv(), timeout)
        frame = decode(raw, fmt)
    except BaseException:
        ws.transport.abort()  # a socket nobody will read must not linger
        raise
    if frame["t"] != "welcome":
        await ws.close()
        raise ClientError(frame)
    return ws, frame


class PresenceClient:
    """One connection; see the module docstring."""

    def __init__(self, ws: ClientConnection, fmt: Format) -> None:
        self.ws = ws
        self.fmt = fmt
        self.welcome: dict[str, Any] = {}
        self.mirror: dict[str, ChannelState] = {}
        self.churn: dict[str, dict[str, dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.unmatched: list[dict[str, Any]] = []
        self._refs = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        fmt: str | Format = Format.JSON,
        *,
        header_token: bool = False,
        timeout: float = 5.0,
        resume: str | None = None,
        **kwargs: Any,
    ) -> PresenceClient:
        """Open, send ``hello`` and wait for ``welcome`` (raises ConnectionClosed when
        the server refuses, e.g. 4001). ``resume`` puts a resume token in the ``hello``
        (PROTOCOL.md "Resume"); ``welcome["resumed"]`` then tells whether it was taken."""
        fmt = Format(fmt)
        ws, welcome = await handshake(url, token, fmt, header_token=header_token,
                                       timeout=timeout, resume=resume, kwargs=kwargs)
        client = cls(ws, fmt)
        client._start(welcome)
        return client

    def _start(self, welcome: dict[str, Any]) -> None:
        """Take the ``welcome`` and start reading (whatever follows it, such as a
        resume's snapshots, is read by the reader task)."""
        self.welcome = welcome
        self._reader = asyncio.create_task(self._read())

    @property
    def conn(self) -> str:
        return str(self.welcome.get("conn", ""))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = decode(raw, self.fmt)
                self._on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))

    def _on_frame(self, frame: dict[str, Any]) -> None:
        t = frame["t"]
        if t == "diff":
            state = self.mirror.get(frame["ch"])
            if state is not None:
                state.apply_diff(frame)
            self.events.put_nowait(frame)
            return
        if t == "churn":
            recs = self.churn.setdefault(frame["ch"], {})
            for r in frame.get("records", []):
                recs[r["supplier"]] = r
            self.events.put_nowait(frame)
            return
        ref = frame.get("ref")
        fut = self._waiting.pop(ref, None) if isinstance(ref, int) else None
        if t == "joined":
            if "presence" in frame:
                self.mirror[frame["ch"]] = ChannelState.from_wire(frame["presence"])
            if "churn" in frame:
                self.churn[frame["ch"]] = {r["supplier"]: r for r in frame["churn"]}
        elif t == "left":
            self.mirror.pop(frame["ch"], None)
            self.churn.pop(frame["ch"], None)
            if ref is None:  # the server left the channel for us (a refresh took it away)
                self.events.put_nowait(frame)
        if fut is not None and not fut.done():
            fut.set_result(frame)
        else:
            self.unmatched.append(frame)

    async def request(self, frame: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send ``frame`` with a fresh ``ref`` and wait for the reply."""
        ref = next(self._refs)
        frame = {**frame, "ref": ref}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ref] = fut
        await self.ws.send(encode(frame, self.fmt))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(ref, None)
        if reply["t"] == "error":
            raise ClientError(reply)
        return reply

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def join(
        self, ch: str, meta: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        m = {**(meta or {}), **fields}
        frame: dict[str, Any] = {"t": "join", "ch": ch}
        if m:
            frame["meta"] = m
        return await self.request(frame)

    async def leave(self, ch: str) -> dict[str, Any]:
        return await self.request({"t": "leave", "ch": ch})

    async def update(self, **meta: Any) -> dict[str, Any]:
        return await self.request({"t": "update", "meta": meta})

    async def query(self, users: list[str]) -> dict[str, Any]:
        return await self.request({"t": "query", "users": users})

    async def ping(self) -> dict[str, Any]:
        return await self.request({"t": "ping"})

    async def refresh(self, token: str) -> dict[str, Any]:
        """Replace the connection's token in place (``refreshed`` with the new exp)."""
        return await self.request({"t": "refresh", "token": token})

    async def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def wait_for(
        self, predicate: Any, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The next event for which ``predicate(event)`` is true (others are dropped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if predicate(event):
                    return event

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        """Wait until the server closes the connection; its close code and reason."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.ws.close_code, self.ws.close_reason or ""

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)
