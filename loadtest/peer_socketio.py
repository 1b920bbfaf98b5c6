"""The peer we compare against: python-socketio with its Redis manager, same workload.

``python -m loadtest.peer_socketio --port N --redis redis://127.0.0.1:M/0 --secret S``
runs an ``socketio.AsyncServer`` (aiohttp, WebSocket transport) whose client manager is
``socketio.AsyncRedisManager``, so every room emit goes through Redis pub/sub exactly
as in a multi-process socket.io deployment. It emulates our presence workload:

- connect with ``auth={"token": <JWT>}`` (HS256, same claims as the gateway's);
- ``join`` ``{"ch", "meta"}`` -> enters the room, returns
  ``{"t": "joined", "ch", "presence": {user: [meta, ...]}}`` (the room snapshot);
- ``update`` ``{"meta"}`` -> updates this connection's meta in each joined room and
  emits ``diff`` ``{"ch", "ts", "joins": {user: [meta]}, "leaves": {}}`` to the room
  minus the sender, returns ``{"t": "ok"}``;
- disconnect -> a ``diff`` with ``leaves`` to each room.

``ts`` is the server time in ms when the update was handled, as in our diffs, so the
bench measures propagation the same way for both.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import jwt
import socketio
from aiohttp import web


def now_ms() -> int:
    return int(time.time() * 1000)


def build_app(redis_url: str, secret: str) -> web.Application:
    # redis-py 8's pool allows 100 connections and then raises "Too many connections";
    # socketio publishes once per emit, concurrently, so the default fails under this
    # load and every emit is lost. A larger pool is the least tuning that makes it work.
    mgr = socketio.AsyncRedisManager(redis_url, redis_options={"max_connections": 4096})
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=mgr,
                               cors_allowed_origins="*", logger=False,
                               engineio_logger=False)
    # sid -> (user, {room: meta}); room -> {sid: (user, meta)}
    sessions: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {}
    rooms: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    counter = [0]

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> bool:
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            claims = jwt.decode(token or "", secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.InvalidTokenError:
            return False
        sessions[sid] = (str(claims["sub"]), {})
        return True

    @sio.event
    async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        user, joined = sessions[sid]
        ch = str(data.get("ch", ""))
        counter[0] += 1
        meta = {"conn": sid, "status": "online", "device": "unknown", "note": "",
                "since": now_ms(), "seq": 1}
        meta.update({k: v for k, v in (data.get("meta") or {}).items()
                     if k in ("status", "device", "note")})
        joined[ch] = meta
        members = rooms.setdefault(ch, {})
        members[sid] = (user, meta)
        await sio.enter_room(sid, ch)
        await sio.emit("diff", {"t": "diff", "ch": ch, "ts": now_ms(), "joins": {user: [meta]},
                                "leaves": {}}, room=ch, skip_sid=sid)
        presence: dict[str, list[dict[str, Any]]] = {}
        for u, m in members.values():
            presence.setdefault(u, []).append(m)
        return {"t": "joined", "ch": ch, "presence": presence}

    @sio.event
    async def update(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        user, joined = sessions[sid]
        ts = now_ms()
        changes = {k: v for k, v in (data.get("meta") or {}).items()
                   if k in ("status", "device", "note")}
        for ch, meta in joined.items():
            meta.update(changes)
            meta["seq"] += 1
            await sio.emit("diff", {"t": "diff", "ch": ch, "ts": ts, "joins": {user: [meta]},
                                    "leaves": {}}, room=ch, skip_sid=sid)
        return {"t": "ok"}

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        user, joined = sessions.pop(sid, ("", {}))
        for ch in joined:
            rooms.get(ch, {}).pop(sid, None)
            await sio.emit("diff", {"t": "diff", "ch": ch, "ts": now_ms(), "joins": {},
                                    "leaves": {user: [{"conn": sid, "last_seen": now_ms()}]}},
                           room=ch)

    app = web.Application()
    sio.attach(app)
    return app


class _ShowRedisError(logging.Filter):
    """socketio logs Redis failures with the cause only in ``extra``: show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = getattr(record, "redis_exception", None)
        if cause:
            record.msg = f"{record.msg} ({cause})"
        return True


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ShowRedisError())
    parser = argparse.ArgumentParser(description="python-socketio peer of the gateway")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(args.redis, args.secret), host="127.0.0.1", port=args.port,
                print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
