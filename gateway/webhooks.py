"""Webhook delivery: presence events POSTed, signed, to operator-configured endpoints.

The contract (PROTOCOL.md "Webhooks (operator-configured)"; docs/webhooks.md):

- ``POST <url>`` with body ``{"events":[event,...]}`` and the headers
  ``Content-Type: application/json``, ``X-Presence-Timestamp: <ms>`` and
  ``X-Presence-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``,
  signed over the exact bytes sent (each attempt is signed afresh with its own time).
- A 2xx acknowledges the whole batch. Anything else (another status, a redirect, a
  connection error, no answer within ``request_timeout``) is retried with exponential
  backoff and jitter until ``retry_for`` seconds have passed since the batch's first
  attempt; then its events are dropped and counted.
- One ordered queue per endpoint and one request in flight per endpoint: events reach
  an endpoint in the order :meth:`Webhooks.emit` was called, so the events of one user
  stay in order. A failing batch blocks those behind it until it succeeds or expires.
- A queue holds at most ``max_queue`` waiting events (plus the batch in flight); past
  that the oldest waiting event is dropped and counted.
- Delivery is at least once (a batch whose 2xx was lost is sent again): receivers
  de-duplicate by the events' ``id``.

Producing the events exactly once across the cluster is the caller's job; this module
only queues and delivers what it is given. Endpoints are known to metrics and logs by
their position in the configured list (``0``, ``1``, ...), never by their URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from gateway.metrics import WEBHOOK_RESULTS, Metrics
from presence.settings import HookSettings, WebhookTarget

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "Webhooks", "sign"]

log = structlog.get_logger("presence.webhooks")

TIMESTAMP_HEADER = "X-Presence-Timestamp"
SIGNATURE_HEADER = "X-Presence-Signature"

DROP_LOG_INTERVAL = 10.0
"""Seconds between two warnings about dropped events of one endpoint (the counter has
every drop; a receiver down for an hour must not flood the logs)."""

RESPONSE_READ_LIMIT = 64 * 1024
"""Bytes of a response body read before the connection is released (only the status
matters; reading a small body lets the connection be reused)."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Presence-Signature`` value of ``body`` sent at ``timestamp`` (the
    ``X-Presence-Timestamp`` text): ``sha256=`` and the hex HMAC-SHA256 of
    ``"<timestamp>.<body>"`` keyed with ``secret``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass(slots=True)
class _Queued:
    """One event waiting for, or in, a delivery to one endpoint."""

    data: bytes  # the event's JSON, encoded once at emit
    at: float | None  # the event's own time (s), for the delivery latency
    queued: float  # monotonic time it was queued
    first_attempt: float | None = None  # monotonic time of its first POST


class _Endpoint:
    """The queue and the sender of one target; see the module docstring."""

    def __init__(self, owner: Webhooks, index: int, target: WebhookTarget) -> None:
        self.owner = owner
        self.label = str(index)
        self.target = target
        self.host = urlsplit(target.url).hostname or ""  # logs name the host, not the URL
        self.waiting: deque[_Queued] = deque()
        self.inflight: list[_Queued] = []
        self.ready = asyncio.Event()  # something was queued
        self.idle = asyncio.Event()  # nothing waiting, nothing in flight
        self.idle.set()
        self.wake = asyncio.Event()  # cut a backoff short (close() gives one last try)
        self.failures = 0  # consecutive failed attempts, for the backoff
        self.pending_drops: dict[str, int] = {}
        self.last_drop_log = -DROP_LOG_INTERVAL

    # -- queue ---------------------------------------------------------------------

    def depth(self) -> int:
        return len(self.waiting) + len(self.inflight)

    def oldest_age(self) -> float:
        oldest = self.inflight[0] if self.inflight else (self.waiting[0] if self.waiting
                                                         else None)
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest.queued)

    def put(self, items: list[_Queued]) -> None:
        overflow = 0
        for item in items:
            if len(self.waiting) >= self.owner.max_queue:
                self.waiting.popleft()
                overflow += 1
            self.waiting.append(item)
        if overflow:
            self.drop(overflow, "queue full")
        self.idle.clear()
        self.ready.set()

    def drop(self, n: int, reason: str) -> None:
        self.owner.count(self.label, "dropped", n)
        self.pending_drops[reason] = self.pending_drops.get(reason, 0) + n
        now = time.monotonic()
        if now - self.last_drop_log >= DROP_LOG_INTERVAL:
            self.last_drop_log = now
            log.warning("webhook events dropped", endpoint=self.label, host=self.host,
                        dropped=self.pending_drops)
            self.pending_drops = {}

    # -- sender --------------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Deliver batches in order until cancelled; never raises otherwise."""
        owner = self.owner
        while True:
            if not self.inflight:
                if not self.waiting:
                    self.idle.set()
                    self.ready.clear()
                    await self.ready.wait()
                    continue
                n = min(len(self.waiting), owner.max_batch)
                self.inflight = [self.waiting.popleft() for _ in range(n)]
            now = time.monotonic()
            for item in self.inflight:
                if item.first_attempt is None:
                    item.first_attempt = now
            if await self.post(session, self.inflight):
                self.acknowledged(self.inflight)
                self.inflight = []
                self.failures = 0
                continue
            now = time.monotonic()
            # Every event of the batch went out first in the same attempt, but an
            # event's own deadline is what the contract states: check each.
            keep = [i for i in self.inflight
                    if now - (i.first_attempt or now) < owner.retry_for]
            if len(keep) < len(self.inflight):
                self.drop(len(self.inflight) - len(keep), "retried for webhook_retry_for")
            self.inflight = keep
            if not keep:
                continue
            owner.count(self.label, "retried", len(keep))
            deadline = min(i.first_attempt or now for i in keep) + owner.retry_for
            # The last attempt is made at the deadline rather than skipped.
            delay = min(owner.backoff(self.failures), max(0.0, deadline - now))
            self.failures += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            self.wake.clear()

    async def post(self, session: aiohttp.ClientSession, batch: list[_Queued]) -> bool:
        """One signed POST of ``batch``; True on a 2xx."""
        body = b'{"events":[' + b",".join(item.data for item in batch) + b"]}"
        timestamp = str(time.time_ns() // 1_000_000)
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.target.secret, timestamp, body),
        }
        try:
            async with session.post(
                self.target.url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.owner.request_timeout),
            ) as response:
                status = response.status
                await response.content.read(RESPONSE_READ_LIMIT)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure: str = type(exc).__name__
        except Exception as exc:  # the sender must outlive any surprise
            log.exception("webhook post failed", endpoint=self.label, host=self.host)
            failure = type(exc).__name__
        else:
            if 200 <= status < 300:
                return True
            failure = f"status {status}"
        log.info("webhook attempt failed", endpoint=self.label, host=self.host,
                 events=len(batch), failure=failure, failures=self.failures + 1)
        return False

    def acknowledged(self, batch: list[_Queued]) -> None:
        self.owner.count(self.label, "ok", len(batch))
        metrics = self.owner.metrics
        if metrics is not None:
            now = time.time()
            histogram = metrics.webhook_latency.labels(self.label)
            for item in batch:
                if item.at is not None:
                    histogram.observe(max(0.0, now - item.at))


class Webhooks:
    """Delivers presence events to the configured webhook endpoints.

    ``targets``: the endpoints, each with its secret and the event types it gets.
    ``retry_for``: seconds from an event's first attempt until it is dropped.
    ``metrics``: where queue depth, oldest age and deliveries are counted (optional).
    ``max_queue``: waiting events per endpoint before the oldest are dropped.
    ``max_batch``: events per POST at most.
    ``request_timeout``: seconds one POST may take before it counts as failed.
    ``backoff_base`` / ``backoff_max``: the n-th consecutive failure of an endpoint
    waits a random time in [d/2, d] with d = min(backoff_max, backoff_base * 2**n).

    Use from one event loop: :meth:`emit` at any time (events emitted before
    :meth:`start` wait for it), :meth:`start` once, :meth:`close` once at the end.
    """

    def __init__(
        self,
        targets: Sequence[WebhookTarget],
        retry_for: float,
        metrics: Metrics | None = None,
        *,
        max_queue: int = 10_000,
        max_batch: int = 500,
        request_timeout: float = 5.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        if not retry_for > 0:
            raise ValueError("retry_for must be positive")
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        if not (request_timeout > 0 and 0 < backoff_base <= backoff_max):
            raise ValueError("request_timeout, backoff_base <= backoff_max must be positive")
        self.retry_for = retry_for
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.request_timeout = request_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._endpoints = [_Endpoint(self, i, t) for i, t in enumerate(targets)]
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        if metrics is not None:
            for ep in self._endpoints:
                metrics.webhook_queued.labels(ep.label).set_function(ep.depth)
                metrics.webhook_oldest_age.labels(ep.label).set_function(ep.oldest_age)
                for result in WEBHOOK_RESULTS:  # every series exists from the start
                    metrics.webhook_deliveries.labels(ep.label, result)

    @classmethod
    def from_settings(cls, hooks: HookSettings, metrics: Metrics | None = None,
                      **options: Any) -> Webhooks:
        """The deliverer of ``settings.hooks`` (``options`` as in the constructor)."""
        return cls(hooks.webhooks, hooks.webhook_retry_for, metrics, **options)

    @property
    def enabled(self) -> bool:
        """Whether any endpoint is configured (else :meth:`emit` does nothing)."""
        return bool(self._endpoints)

    def emit(self, events: Sequence[dict[str, Any]]) -> None:
        """Queue ``events`` (full event dicts, in order) for every endpoint that wants
        their types. Events of one call are sent in one POST per endpoint when they fit
        in ``max_batch``. Never blocks, never raises: an event that cannot be encoded
        as JSON is dropped and logged; events emitted after :meth:`close` are dropped."""
        if not self._endpoints or not events:
            return
        try:
            now = time.monotonic()
            encoded: list[tuple[str, bytes, float | None]] = []  # encoded once for all
            for event in events:
                try:
                    data = orjson.dumps(event)
                except TypeError:
                    log.error("webhook event not encodable", type=event.get("type"))
                    continue
                at = event.get("at")
                seconds = at / 1000 if isinstance(at, int | float) else None
                encoded.append((str(event.get("type")), data, seconds))
            for ep in self._endpoints:
                mine = [_Queued(data, at_s, now) for kind, data, at_s in encoded
                        if ep.target.wants(kind)]
                if not mine:
                    continue
                if self._closed:
                    ep.drop(len(mine), "emitted after close")
                else:
                    ep.put(mine)
        except Exception:  # emit is called from the presence paths: it must not fail them
            log.exception("webhook emit failed")

    async def start(self) -> None:
        """Start one sender per endpoint (nothing when none is configured)."""
        if not self._endpoints or self._tasks or self._closed:
            return
        # Certificates are checked as usual; redirects are not followed (post()), so
        # requests only ever go to the configured URLs.
        self._session = aiohttp.ClientSession(trust_env=False)
        self._tasks = [asyncio.create_task(ep.run(self._session), name=f"webhook-{ep.label}")
                       for ep in self._endpoints]

    async def close(self, timeout: float = 2.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, then stop.

        A failing endpoint in backoff gets one more attempt at once. Events still
        queued at the end are dropped and counted; later :meth:`emit` calls drop too.
        """
        self._closed = True
        if self._tasks:
            for ep in self._endpoints:
                ep.wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wait_idle()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        for ep in self._endpoints:
            left = ep.depth()
            ep.waiting.clear()
            ep.inflight = []
            ep.idle.set()
            if left:
                ep.last_drop_log = -DROP_LOG_INTERVAL  # the last word is always logged
                ep.drop(left, "still queued at close")
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_idle(self) -> None:
        """Return once no endpoint has an event waiting or in flight: every event
        emitted so far was delivered or dropped. Only a started instance gets there."""
        while True:
            busy = [ep for ep in self._endpoints if not ep.idle.is_set()]
            if not busy:
                return
            await busy[0].idle.wait()

    def stats(self) -> list[dict[str, Any]]:
        """Per endpoint, in configured order: its label, host, queued events and the
        age of the oldest (s), for the admin API."""
        return [{"endpoint": ep.label, "host": ep.host, "queued": ep.depth(),
                 "oldest_age": round(ep.oldest_age(), 3)} for ep in self._endpoints]

    # -- for the endpoints ---------------------------------------------------------

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the next attempt when ``failures`` consecutive
        attempts failed before this failed one: exponential, capped, with jitter so
        that many gateways do not retry in step."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** min(failures, 30))
        return random.uniform(delay / 2, delay)

    def count(self, label: str, result: str, n: int) -> None:
        if self.metrics is not None and n:
            self.metrics.webhook_deliveries.labels(label, result).inc(n)
