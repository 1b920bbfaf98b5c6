#!/usr/bin/env python3
"""An example receiver of presence-server webhooks (docs/webhooks.md).

    WEBHOOK_SECRET='the secret of the [[webhooks]] entry' \\
        python config/webhook-receiver-example.py --port 8080

then point a webhook at ``http://127.0.0.1:8080/presence``. It checks each request's
signature and timestamp age (401 when either fails), hands every event it has not seen
before to ``handle`` (here: print it as a JSON line) and answers 204. Needs only aiohttp.

What a real receiver should copy:
- verify the signature over the raw body bytes, before parsing them, with a constant-time
  comparison; refuse a timestamp older than a few minutes (a replayed request);
- de-duplicate by ``id``: delivery is at least once, a batch is sent again when its 2xx
  was lost. Keep the seen ids where the effects are stored (a unique key in your
  database); the in-memory set here forgets them on restart;
- mark an id seen only once its event was handled, and answer quickly (queue slow work):
  an answer later than the server's request timeout (5 s) counts as a failure and the
  batch is sent again.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

MAX_AGE = 300.0
"""Seconds a request's timestamp may differ from the receiver's clock."""


def verify(secret: str, timestamp: str, body: bytes, signature: str, *,
           now: float | None = None, max_age: float = MAX_AGE) -> bool:
    """Whether ``signature`` (the ``X-Presence-Signature`` header) is the server's
    signature of ``body`` sent at ``timestamp`` (``X-Presence-Timestamp``, ms), and
    that time lies within ``max_age`` seconds of ``now`` (default: the clock)."""
    try:
        sent_ms = int(timestamp)
    except ValueError:
        return False
    now_ms = (time.time() if now is None else now) * 1000
    if abs(now_ms - sent_ms) > max_age * 1000:
        return False
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + mac.hexdigest(), signature)


class Seen:
    """The most recent ``limit`` event ids, oldest forgotten first."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self.ids

    def add(self, event_id: str) -> None:
        self.ids[event_id] = None
        if len(self.ids) > self.limit:
            self.ids.popitem(last=False)


def print_event(event: dict[str, Any]) -> None:
    print(json.dumps(event, sort_keys=True), flush=True)


def make_app(secret: str, handle: Callable[[dict[str, Any]], None] = print_event,
             path: str = "/presence") -> web.Application:
    """An aiohttp application receiving webhooks at ``path``."""
    seen = Seen()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, request.headers.get("X-Presence-Timestamp", ""), body,
                      request.headers.get("X-Presence-Signature", "")):
            return web.Response(status=401, text="bad signature or timestamp")
        try:
            events = json.loads(body)["events"]
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="not a webhook body")
        for event in events:  # in order: the events of one user arrive in order
            if event.get("id") in seen:
                continue  # a redelivery
            handle(event)
            seen.add(event["id"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post(path, receive)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--path", default="/presence")
    args = parser.parse_args(argv)
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        sys.exit("set WEBHOOK_SECRET to the secret of the webhook")
    web.run_app(make_app(secret, path=args.path), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
