"""Prometheus metrics of one gateway process (``presence_`` prefix, base units).

Metrics live in a dedicated :class:`CollectorRegistry` per :class:`Metrics` instance so
that several in-process nodes (tests) do not collide; ``/metrics`` renders it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1006, 1008, 1009, 1011, 1012, 1013, 4000, 4001})
"""Close codes that get a ``presence_closes_total`` series of their own; a client may
send any code from 1000 to 4999, so every other code shares the ``other`` series."""

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
)

WEBHOOK_RESULTS = ("ok", "retried", "dropped")
"""``result`` of ``presence_webhook_deliveries_total``, counted per event: acknowledged
by a 2xx, in an attempt that failed and will be retried, or given up (retried for
``webhook_retry_for``, pushed out of a full queue, or still queued at shutdown)."""


def close_label(code: int | None) -> str:
    """The ``code`` label of a close: the number of a known code, ``none`` when the
    connection ended without one, else ``other``."""
    if code is None:
        return "none"
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


class Metrics:
    """Every metric the gateway exports.

    Label values are bounded sets chosen by the server, never by a client: close codes
    through :meth:`count_close`, protocol error codes (``PresenceError.code``), rate
    limit kinds, broker directions (``in``/``out``), autoscaling reasons, webhook
    endpoints by their position in the configured list (``0``, ``1``, ...) and
    :data:`WEBHOOK_RESULTS`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.connections = Gauge(
            "presence_connections", "Open WebSocket connections on this node", registry=r
        )
        self.connections_opened = Counter(
            "presence_connections_opened_total", "WebSocket connections accepted", registry=r
        )
        self.channels = Gauge(
            "presence_channels", "Channels with at least one local member", registry=r
        )
        self.members = Gauge(
            "presence_members", "Local channel memberships (connection x channel)", registry=r
        )
        self.frames_in = Counter(
            "presence_frames_received_total", "Frames received from clients", registry=r
        )
        self.frames_out = Counter(
            "presence_frames_sent_total", "Frames written to clients", registry=r
        )
        self.bytes_in = Counter(
            "presence_received_bytes_total", "Bytes of frames received from clients",
            registry=r,
        )
        self.bytes_out = Counter(
            "presence_sent_bytes_total", "Bytes of frames written to clients", registry=r
        )
        self.errors = Counter(
            "presence_errors_total", "Error frames sent, by protocol code", ["code"], registry=r
        )
        self.closes = Counter(
            "presence_closes_total", "Connections closed, by close code", ["code"], registry=r
        )
        self.rate_limited = Counter(
            "presence_rate_limited_total", "Requests refused by a rate limit or quota",
            ["kind"], registry=r,
        )
        self.held = Gauge(
            "presence_held_connections", "Lost connections held for resume on this node",
            registry=r,
        )
        self.resumes = Counter(
            "presence_resumes_total", "Resume attempts at hello, by result",
            ["result"], registry=r,
        )
        self.leaves = Counter(
            "presence_leaves_total",
            "Connections whose presence ended (leaves published), by cause",
            ["cause"], registry=r,
        )
        self.slow_consumers = Counter(
            "presence_slow_consumer_closes_total",
            "Connections closed because their unsent buffer passed max_buffer", registry=r,
        )
        self.propagation = Histogram(
            "presence_propagation_seconds",
            "From a change's server time (diff ts) to the diff frame being written",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.loop_lag = Gauge(
            "presence_event_loop_lag_seconds", "Latest measured event-loop lag", registry=r
        )
        self.backend_up = Gauge(
            "presence_backend_up", "1 when the Store and Broker answer, else 0", registry=r
        )
        self.broker_messages = Counter(
            "presence_broker_messages_total", "Broker messages, by direction",
            ["direction"], registry=r,
        )
        # Bound once: labels() per message was a few per cent of a connect's and of a
        # delivery's CPU.
        self.broker_in = self.broker_messages.labels("in")
        self.broker_out = self.broker_messages.labels("out")
        self.store_published = Counter(
            "presence_store_published_total",
            "Of the broker messages out, those a Store write published itself (the joins "
            "of the Redis store's meta writes, sent from its script)", registry=r,
        )
        self.desired_replicas = Gauge(
            "presence_autoscaler_desired_replicas", "Replicas the autoscaling policy asks for",
            registry=r,
        )
        self.desired_reason = Gauge(
            "presence_autoscaler_decision_info",
            "1 for the reason of the current autoscaling decision", ["reason"], registry=r,
        )

        self.webhook_queued = Gauge(
            "presence_webhook_queued_events",
            "Webhook events waiting or in flight, per endpoint", ["endpoint"], registry=r,
        )
        self.webhook_oldest_age = Gauge(
            "presence_webhook_oldest_event_age_seconds",
            "Time since the oldest queued webhook event was queued, per endpoint (0 when none)",
            ["endpoint"], registry=r,
        )
        self.webhook_deliveries = Counter(
            "presence_webhook_deliveries_total",
            "Webhook events by delivery result (ok, retried, dropped), per endpoint",
            ["endpoint", "result"], registry=r,
        )
        self.webhook_latency = Histogram(
            "presence_webhook_delivery_seconds",
            "From an event's time (its at) to its acknowledgement by the endpoint",
            ["endpoint"], buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 300.0), registry=r,
        )

    def count_close(self, code: int | None) -> None:
        """Count one closed connection under :func:`close_label` of ``code`` (at most
        twelve series, whatever codes clients send)."""
        self.closes.labels(close_label(code)).inc()
