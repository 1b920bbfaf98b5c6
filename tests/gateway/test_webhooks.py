"""Webhook delivery (gateway/webhooks.py) against a real aiohttp receiver on loopback:
signature and headers, batching, filtering, order across retries, retry after a 5xx and
after a timeout, drops after webhook_retry_for and past the queue bound, close()."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from gateway.metrics import Metrics
from gateway.webhooks import Webhooks, sign
from presence.settings import HookSettings, WebhookTarget
from tests.fixtures.receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret"
LIMIT = 5.0  # seconds any single wait of these tests may take
FAST = {"backoff_base": 0.01, "backoff_max": 0.05, "request_timeout": 1.0}


@pytest.fixture
async def make(receiver: Receiver) -> AsyncIterator[Callable[..., Webhooks]]:
    """A factory of started-later Webhooks, all closed at the end of the test."""
    made: list[Webhooks] = []

    def factory(*targets: WebhookTarget, retry_for: float = 60.0, metrics: Metrics | None = None,
                **options: Any) -> Webhooks:
        hooks = Webhooks(targets or (WebhookTarget(receiver.url + "/hook", SECRET),),
                         retry_for, metrics, **{**FAST, **options})
        made.append(hooks)
        return hooks

    yield factory
    for hooks in made:
        await hooks.close(timeout=0.1)


def event(n: int, kind: str = "user.online", user: str = "u1") -> dict[str, Any]:
    body: dict[str, Any] = {"id": f"ev-{n}", "type": kind, "at": int(time.time() * 1000)}
    if kind.startswith("user."):
        body["user"] = user
    else:
        body["ch"] = "team:w1"
    if kind == "user.offline":
        body.update(last_seen=body["at"], cause="closed")
    return body


def count(metrics: Metrics, result: str, endpoint: str = "0") -> float:
    value = metrics.registry.get_sample_value(
        "presence_webhook_deliveries_total", {"endpoint": endpoint, "result": result})
    return value or 0.0


def gauge(metrics: Metrics, name: str, endpoint: str = "0") -> float:
    value = metrics.registry.get_sample_value(name, {"endpoint": endpoint})
    assert value is not None
    return value


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Computed here from the contract, not with the code under test."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


async def idle(hooks: Webhooks) -> None:
    async with asyncio.timeout(LIMIT):
        await hooks.wait_idle()


async def test_one_emit_is_one_signed_post(receiver: Receiver, make: Callable[..., Webhooks],
                                           ) -> None:
    metrics = Metrics()
    hooks = make(metrics=metrics)
    assert hooks.enabled
    await hooks.start()
    events = [event(1), event(2, "channel.occupied"), event(3, "user.offline", "u2")]
    before = int(time.time() * 1000)
    hooks.emit(events)
    await idle(hooks)
    assert len(receiver.requests) == 1
    req = receiver.requests[0]
    assert req.path == "/hook"
    assert req.headers["Content-Type"] == "application/json"
    timestamp = req.headers["X-Presence-Timestamp"]
    assert before <= int(timestamp) <= int(time.time() * 1000)
    assert req.headers["X-Presence-Signature"] == expected_signature(SECRET, timestamp, req.body)
    assert json.loads(req.body) == {"events": events}
    assert count(metrics, "ok") == 3
    assert count(metrics, "retried") == count(metrics, "dropped") == 0
    assert gauge(metrics, "presence_webhook_queued_events") == 0
    assert gauge(metrics, "presence_webhook_oldest_event_age_seconds") == 0
    assert metrics.registry.get_sample_value(
        "presence_webhook_delivery_seconds_count", {"endpoint": "0"}) == 3


async def test_each_target_gets_only_its_event_types(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    users = WebhookTarget(receiver.url + "/users", "k-users", ("user.online", "user.offline"))
    everything = WebhookTarget(receiver.url + "/all", "k-all")
    hooks = make(users, everything)
    await hooks.start()
    events = [event(1), event(2, "channel.occupied"), event(3, "user.offline"),
              event(4, "channel.vacated")]
    hooks.emit(events)
    await idle(hooks)
    assert receiver.delivered("/users") == [events[0], events[2]]
    assert receiver.delivered("/all") == events
    for req in receiver.requests:  # each signed with its own target's secret
        secret = "k-users" if req.path == "/users" else "k-all"
        assert req.headers["X-Presence-Signature"] == expected_signature(
            secret, req.headers["X-Presence-Timestamp"], req.body)
    # A call whose events none of a target's types match sends it nothing.
    hooks.emit([event(5, "channel.vacated")])
    await idle(hooks)
    assert len(receiver.ok("/users")) == 1 and len(receiver.ok("/all")) == 2


async def test_a_5xx_is_retried_and_the_order_of_a_user_is_kept(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    receiver.script = [503, 500]
    hooks = make(metrics=metrics)
    await hooks.start()
    online, offline = event(1, "user.online"), event(2, "user.offline")
    hooks.emit([online])
    await receiver.wait_for(lambda: len(receiver.requests) >= 1)
    hooks.emit([offline])  # queued behind the failing batch
    await idle(hooks)
    assert [r.status for r in receiver.requests] == [503, 500, 200, 200]
    assert [r.events for r in receiver.requests] == [[online], [online], [online], [offline]]
    assert receiver.delivered() == [online, offline]
    # Each attempt is signed afresh, with its own timestamp.
    for req in receiver.requests:
        assert req.headers["X-Presence-Signature"] == expected_signature(
            SECRET, req.headers["X-Presence-Timestamp"], req.body)
    assert count(metrics, "retried") == 2 and count(metrics, "ok") == 2
    assert count(metrics, "dropped") == 0


async def test_the_order_of_every_user_survives_repeated_failures(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    rng = random.Random(13)
    receiver.script = [rng.choice([200, 200, 500, 502, 503, 404]) for _ in range(40)]
    hooks = make(max_batch=3)
    await hooks.start()
    emitted: list[dict[str, Any]] = []
    for n in range(30):  # emitted while earlier batches are failing and being retried
        batch = [event(n * 10 + i, rng.choice(["user.online", "user.offline"]),
                       rng.choice(["a", "b", "c"])) for i in range(rng.randint(1, 3))]
        emitted += batch
        hooks.emit(batch)
        if n % 3 == 0:  # let the sender get on: its next request arrives
            seen = len(receiver.requests)
            await receiver.wait_for(lambda seen=seen: len(receiver.requests) > seen)
    await idle(hooks)
    assert any(r.status >= 400 for r in receiver.requests)
    assert receiver.delivered() == emitted  # nothing lost, nothing twice, all in order
    for user in "abc":
        assert [e["id"] for e in receiver.delivered() if e.get("user") == user] == [
            e["id"] for e in emitted if e["user"] == user]


async def test_a_receiver_slower_than_the_request_timeout_is_retried(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    receiver.script = ["hang"]
    hooks = make(metrics=metrics, request_timeout=0.2)
    await hooks.start()
    events = [event(1), event(2, user="u2")]
    hooks.emit(events)
    await idle(hooks)
    assert [r.status for r in receiver.requests] == [0, 200]
    assert receiver.delivered() == events
    assert count(metrics, "retried") == 2 and count(metrics, "ok") == 2


async def test_events_are_dropped_after_retry_for_and_counted(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    receiver.default = 500
    hooks = make(metrics=metrics, retry_for=0.3)
    await hooks.start()
    started = time.monotonic()
    hooks.emit([event(1), event(2)])
    await idle(hooks)
    assert time.monotonic() - started >= 0.3
    assert receiver.delivered() == []
    assert len(receiver.requests) >= 2
    assert count(metrics, "dropped") == 2 and count(metrics, "ok") == 0
    assert count(metrics, "retried") == 2 * (len(receiver.requests) - 1)
    # The queue is not stuck behind them: the next event goes out once the receiver is back.
    receiver.default = 200
    later = event(3)
    hooks.emit([later])
    await idle(hooks)
    assert receiver.delivered() == [later]


async def test_a_full_queue_drops_the_oldest(receiver: Receiver,
                                             make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    hooks = make(metrics=metrics, max_queue=3)
    events = [event(n) for n in range(10)]
    hooks.emit(events)  # before start: they wait
    assert gauge(metrics, "presence_webhook_queued_events") == 3
    assert gauge(metrics, "presence_webhook_oldest_event_age_seconds") >= 0
    assert count(metrics, "dropped") == 7
    await hooks.start()
    await idle(hooks)
    assert receiver.delivered() == events[7:]
    assert count(metrics, "ok") == 3


async def test_large_emits_are_split_into_batches_in_order(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    hooks = make(max_batch=4)
    await hooks.start()
    events = [event(n, user=f"u{n % 3}") for n in range(10)]
    hooks.emit(events)
    await idle(hooks)
    assert [len(r.events) for r in receiver.requests] == [4, 4, 2]
    assert receiver.delivered() == events


async def test_close_flushes_what_it_can_within_its_timeout(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    hooks = make(metrics=metrics)
    await hooks.start()
    events = [event(1), event(2)]
    hooks.emit(events)
    async with asyncio.timeout(LIMIT):
        await hooks.close(timeout=2.0)
    assert receiver.delivered() == events
    hooks.emit([event(3)])  # after close: dropped and counted, never raised
    assert count(metrics, "dropped") == 1


async def test_close_gives_up_on_a_receiver_that_does_not_answer(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    receiver.default = "hang"
    hooks = make(metrics=metrics, request_timeout=5.0)
    await hooks.start()
    hooks.emit([event(1), event(2)])
    await receiver.wait_for(lambda: len(receiver.requests) >= 1)
    hooks.emit([event(3)])
    started = time.monotonic()
    async with asyncio.timeout(LIMIT):
        await hooks.close(timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.5
    assert count(metrics, "dropped") == 3
    assert gauge(metrics, "presence_webhook_queued_events") == 0


async def test_close_retries_a_backing_off_endpoint_at_once(
        receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    receiver.script = [503]
    hooks = make(backoff_base=30.0, backoff_max=30.0)  # the next try would be 15-30 s away
    await hooks.start()
    hooks.emit([event(1)])
    await receiver.wait_for(lambda: len(receiver.requests) >= 1)
    async with asyncio.timeout(LIMIT):
        await hooks.close(timeout=2.0)
    assert [r.status for r in receiver.requests] == [503, 200]


async def test_a_redirect_is_not_followed(receiver: Receiver,
                                          make: Callable[..., Webhooks]) -> None:
    metrics = Metrics()
    receiver.script = [307]
    hooks = make(metrics=metrics)
    await hooks.start()
    hooks.emit([event(1)])
    await idle(hooks)
    assert [r.status for r in receiver.requests] == [307, 200]
    assert count(metrics, "retried") == 1


async def test_connection_errors_are_retried(make: Callable[..., Webhooks],
                                             unused_tcp_port: int) -> None:
    metrics = Metrics()
    hooks = make(WebhookTarget(f"http://127.0.0.1:{unused_tcp_port}/", SECRET),
                 metrics=metrics, retry_for=0.2)
    await hooks.start()
    hooks.emit([event(1)])
    await idle(hooks)
    assert count(metrics, "retried") >= 1 and count(metrics, "dropped") == 1


async def test_emit_never_raises(receiver: Receiver, make: Callable[..., Webhooks]) -> None:
    hooks = make()
    await hooks.start()
    good = event(2)
    hooks.emit([{"id": "bad", "type": "user.online", "at": 1, "user": {1, 2}}, good])
    hooks.emit([])
    await idle(hooks)
    assert receiver.delivered() == [good]


async def test_no_targets_is_disabled() -> None:
    hooks = Webhooks.from_settings(HookSettings(), Metrics())
    assert not hooks.enabled
    hooks.emit([event(1)])
    await hooks.start()
    await hooks.close()


async def test_from_settings(receiver: Receiver) -> None:
    target = WebhookTarget(receiver.url + "/hook", SECRET)
    hooks = Webhooks.from_settings(HookSettings((target,), 42.0), **FAST)
    assert hooks.enabled and hooks.retry_for == 42.0
    await hooks.start()
    one = event(1)
    hooks.emit([one])
    async with asyncio.timeout(LIMIT):
        await hooks.close()
    assert receiver.delivered() == [one]
    assert hooks.stats() == [{"endpoint": "0", "host": "127.0.0.1", "queued": 0,
                              "oldest_age": 0.0}]


def test_sign_follows_the_contract() -> None:
    body = b'{"events":[]}'
    assert sign(SECRET, "1700000000000", body) == expected_signature(
        SECRET, "1700000000000", body)


# -- the receiver example ---------------------------------------------------------------

def load_example() -> ModuleType:
    path = ROOT / "config" / "webhook-receiver-example.py"
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_verifies_a_signed_body() -> None:
    example = load_example()
    body = json.dumps({"events": [event(1)]}).encode()
    now = time.time()
    timestamp = str(int(now * 1000))
    signature = expected_signature(SECRET, timestamp, body)
    assert example.verify(SECRET, timestamp, body, signature)
    assert example.verify(SECRET, timestamp, body, sign(SECRET, timestamp, body), now=now)
    assert not example.verify("other", timestamp, body, signature)
    assert not example.verify(SECRET, timestamp, body + b" ", signature)
    assert not example.verify(SECRET, "not-a-number", body, signature)
    assert not example.verify(SECRET, timestamp, body, "sha256=" + "0" * 64)
    old = str(int((now - 600) * 1000))
    assert not example.verify(SECRET, old, body, expected_signature(SECRET, old, body))
    assert example.verify(SECRET, old, body, expected_signature(SECRET, old, body),
                          max_age=900)


async def test_the_example_receives_verifies_and_deduplicates(
        make: Callable[..., Webhooks]) -> None:
    example = load_example()
    handled: list[dict[str, Any]] = []
    runner = web.AppRunner(example.make_app(SECRET, handled.append))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/presence"
        metrics = Metrics()
        hooks = make(WebhookTarget(url, SECRET), metrics=metrics)
        await hooks.start()
        first, second = event(1), event(2, "user.offline")
        hooks.emit([first])
        hooks.emit([first, second])  # a redelivery of first, as after a lost 2xx
        await idle(hooks)
        assert handled == [first, second]
        assert count(metrics, "ok") == 3
        # A wrong secret is refused with a 401, which the sender retries.
        wrong = make(WebhookTarget(url, "wrong"), metrics=Metrics(), retry_for=0.1)
        await wrong.start()
        wrong.emit([event(3)])
        await idle(wrong)
        assert handled == [first, second]
    finally:
        await runner.cleanup()
