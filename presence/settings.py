"""Typed settings with visible defaults: frozen dataclasses by concern.

:class:`Settings` groups the knobs of a gateway process by concern (``auth``,
``transport``, ``quotas``, ``backend``, ``lifetime``, ``churn``, ``hooks``,
``autoscale``). Every value is checked on construction; a bad one, or one that cannot
be honoured, raises :class:`SettingsError` naming the setting. Setting names are unique
across the groups, so a setting is known by its plain name too (``max_frame``,
``PRESENCE_MAX_FRAME``): :meth:`Settings.of` builds from plain names. Reading files and
the environment is the gateway's job (gateway/config.py); nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a bad value; the message names it."""


DEFAULT_SEASON = (0.3, 0.4, 0.6, 0.8, 2.0, 3.0, 2.2, 1.8, 2.5, 2.0, 0.7, 0.5)


@dataclass(frozen=True, slots=True)
class PeakWindow:
    """A daily window [start_hour, end_hour) of the given weekdays (0 = Monday)."""

    start_hour: int
    end_hour: int
    multiplier: float
    weekdays: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)


DEFAULT_PEAKS = (
    PeakWindow(17, 21, 2.0),
    PeakWindow(10, 14, 1.5, (5, 6)),
)


@dataclass(frozen=True, slots=True)
class AutoscaleSettings:
    """Inputs of the autoscaling policy (DESIGN.md, "Autoscaling")."""

    enabled: bool = True
    interval: float = 5.0
    timezone: str = "Europe/London"
    min_replicas: int = 2
    max_replicas: int = 50
    connections_per_node: int = 8000
    base_connections: int = 4000
    season: tuple[float, ...] = DEFAULT_SEASON
    peaks: tuple[PeakWindow, ...] = DEFAULT_PEAKS
    prescale_minutes: int = 60
    buffer: float = 0.2
    latency_p95_target: float = 2.0
    memory_target: float = 0.80
    memory_max: float = 0.85
    loop_lag_target: float = 0.1
    cooldown: float = 300.0
    freeze_weekdays: tuple[int, ...] = (5,)
    history: int = 200

    def __post_init__(self) -> None:
        if len(self.season) != 12:
            raise SettingsError("autoscale.season must have 12 monthly multipliers")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise SettingsError("autoscale.min_replicas must be >= 1 and <= max_replicas")
        if self.connections_per_node <= 0:
            raise SettingsError("autoscale.connections_per_node must be positive")
        for name in ("interval", "cooldown"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"autoscale.{name} must be positive")
        if not 0 <= self.buffer <= 10:
            raise SettingsError("autoscale.buffer must lie in [0, 10]")
        if not 0 < self.memory_target <= self.memory_max <= 1:
            raise SettingsError("autoscale.memory_target <= memory_max must lie in (0, 1]")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:  # also refuses NaN
            raise SettingsError(f"{name} must be positive")


def _not_negative(obj: object, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) >= 0:
            raise SettingsError(f"{name} must not be negative")


def _at_least_one(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise SettingsError(f"{name} must be at least 1")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Token checks (PROTOCOL.md "Tokens")."""

    jwt_secret: str = ""
    jwt_algorithm: str = "HS256"
    jwt_public_key: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    auth_timeout: float = 5.0

    def __post_init__(self) -> None:
        _positive(self, "auth_timeout")
        if self.jwt_algorithm not in ("HS256", "RS256", "ES256"):
            raise SettingsError("jwt_algorithm must be HS256, RS256 or ES256")
        if self.jwt_algorithm != "HS256" and not self.jwt_public_key:
            raise SettingsError("jwt_public_key is required for RS256/ES256")


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """Listeners, WebSocket keepalive and frame bounds, fan-out coalescing."""

    host: str = "127.0.0.1"
    port: int = 8765
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_frame: int = 4096
    max_buffer: int = 512 * 1024
    max_connections: int = 20000
    listen_backlog: int = 2048
    coalesce_ms: int = 20

    def __post_init__(self) -> None:
        for name in ("port", "admin_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"{name} must be a TCP port (0-65535)")
        _positive(self, "ping_interval", "ping_timeout")
        _at_least_one(self, "max_frame", "max_buffer", "max_connections", "listen_backlog")
        if not 0 <= self.coalesce_ms <= 100:
            raise SettingsError("coalesce_ms must lie in 0..100 (PROTOCOL.md caps it at 100)")


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """Per-connection and per-user limits (PROTOCOL.md "Default quotas")."""

    max_channels_free: int = 50
    max_channels_paid: int = 500
    joins_per_minute: int = 100
    updates_per_second: float = 10.0
    updates_burst: int = 20
    # Every request of a connection (join, re-join, leave, update, query, ping, refresh)
    # draws on one bucket: a client cannot make the node do unbounded work.
    requests_per_second: float = 20.0
    requests_burst: int = 100
    max_user_connections: int = 10
    max_errors_per_minute: int = 30
    max_malformed: int = 5

    def __post_init__(self) -> None:
        _at_least_one(self, "max_channels_free", "max_channels_paid", "joins_per_minute",
                      "updates_burst", "requests_burst", "max_user_connections",
                      "max_errors_per_minute", "max_malformed")
        _positive(self, "updates_per_second", "requests_per_second")


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Where shared state lives, and how the node keeps its share of it alive."""

    backend: str = "memory"
    redis_url: str = ""
    redis_cluster: str = ""
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    """Sent by every Redis connection (AUTH); a ``redis_url`` may carry them instead."""
    node_lease: float = 15.0
    # /readyz stays 200 through a backend outage shorter than this (one shard's failover
    # must not take every pod out of the Service).
    ready_grace: float = 10.0
    last_seen_days: int = 30

    def __post_init__(self) -> None:
        if self.backend not in ("memory", "redis"):
            raise SettingsError("backend must be memory or redis")
        if self.backend == "redis" and not (self.redis_url or self.redis_cluster):
            raise SettingsError("backend = redis needs redis_cluster or redis_url")
        _positive(self, "node_lease")
        _not_negative(self, "ready_grace")
        _at_least_one(self, "last_seen_days")

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_cluster or self.redis_url)


@dataclass(frozen=True, slots=True)
class LifetimeSettings:
    """How connections end: the drain on shutdown and its reconnect hints, token
    expiry, the resume hold of lost connections."""

    drain_timeout: float = 10.0
    reconnect_jitter: float = 5.0
    # Seconds of grace on a token's exp (and nbf, iat) at hello, and before a
    # connection whose token expired without a refresh is closed with 4001.
    token_leeway: float = 5.0
    # Seconds a lost connection's metas stay for the client to resume (0: off).
    resume_ttl: float = 15.0

    def __post_init__(self) -> None:
        _not_negative(self, "drain_timeout", "reconnect_jitter", "token_leeway",
                      "resume_ttl")


@dataclass(frozen=True, slots=True)
class ChurnSettings:
    """The churn publication rule and bands (PROTOCOL.md "Churn-risk channels")."""

    churn_min_delta: float = 0.05
    churn_thresholds: tuple[float, float, float] = (0.30, 0.60, 0.80)

    def __post_init__(self) -> None:
        t = self.churn_thresholds
        if not (len(t) == 3 and 0 < t[0] < t[1] < t[2] < 1):
            raise SettingsError("churn_thresholds must be three increasing numbers in (0, 1)")
        if not 0 <= self.churn_min_delta <= 1:
            raise SettingsError("churn_min_delta must lie in [0, 1]")


WEBHOOK_EVENT_TYPES = ("user.online", "user.offline", "channel.occupied", "channel.vacated")
"""Every event type a webhook can subscribe to (PROTOCOL.md "Webhooks")."""


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """One operator-configured endpoint: events are POSTed to ``url``, signed with
    ``secret``; ``events`` lists the types it gets, empty for all of them."""

    url: str
    secret: str = field(repr=False)  # repr() of the settings must not print it
    events: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018  (raises on a port out of range)
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise SettingsError(f"webhook url must be an http or https URL, got {self.url!r}")
        if not isinstance(self.secret, str) or not self.secret:
            raise SettingsError("webhook secret must not be empty")
        for kind in self.events:
            if kind not in WEBHOOK_EVENT_TYPES:
                raise SettingsError(
                    f"webhook events must be among {', '.join(WEBHOOK_EVENT_TYPES)}, "
                    f"got {kind!r}")

    def wants(self, kind: str) -> bool:
        """Whether events of type ``kind`` go to this endpoint."""
        return not self.events or kind in self.events


@dataclass(frozen=True, slots=True)
class HookSettings:
    """Webhooks (PROTOCOL.md "Webhooks (operator-configured)"): the endpoints and how
    long an event is retried before it is dropped."""

    webhooks: tuple[WebhookTarget, ...] = ()
    # Seconds from an event's first delivery attempt until it is given up.
    webhook_retry_for: float = 600.0

    def __post_init__(self) -> None:
        _positive(self, "webhook_retry_for")
        for target in self.webhooks:
            if not isinstance(target, WebhookTarget):
                raise SettingsError(f"webhooks entries must be tables, got {target!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of a gateway process, by concern. Defaults follow PROTOCOL.md."""

    node_id: str = ""
    log_level: str = "info"
    demo: bool = False
    # The cyclic GC's thresholds (gc.set_threshold). CPython's (700, 10, 10) ran a full
    # collection each time the heap grew by a quarter: at 10,000 connections one took
    # ~0.36 s, a pause for every member, and the collector took 3.5 s of CPU over
    # 10,000 connects (docs/operations.md "Garbage collection").
    gc_thresholds: tuple[int, int, int] = (50_000, 20, 100)
    auth: AuthSettings = field(default_factory=AuthSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    backend: BackendSettings = field(default_factory=BackendSettings)
    lifetime: LifetimeSettings = field(default_factory=LifetimeSettings)
    churn: ChurnSettings = field(default_factory=ChurnSettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    autoscale: AutoscaleSettings = field(default_factory=AutoscaleSettings)

    def __post_init__(self) -> None:
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError("log_level must be debug, info, warning or error")
        t = self.gc_thresholds
        if len(t) != 3 or not all(isinstance(v, int) and v >= 1 for v in t):
            # 0 would turn automatic collection off: cycles would never be freed.
            raise SettingsError("gc_thresholds must be three integers >= 1 "
                                "(generation 0, 1, 2)")

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings from plain names (``max_frame=...``; ``autoscale`` takes an
        :class:`AutoscaleSettings`); unknown names raise :class:`SettingsError`."""
        return cls().with_overrides(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with settings replaced by plain name, validated again."""
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            group = GROUP_OF.get(name)
            if group is None:
                raise SettingsError(f"unknown setting {name}")
            if group == "":
                top[name] = value
            else:
                groups.setdefault(group, {})[name] = value
        for group, values in groups.items():
            top[group] = dataclasses.replace(getattr(self, group), **values)
        return dataclasses.replace(self, **top)


GROUPS = ("auth", "transport", "quotas", "backend", "lifetime", "churn", "hooks")  # docs order
"""The groups whose settings are known by their plain names."""

_GROUP_TYPES: dict[str, type] = {
    "auth": AuthSettings, "transport": TransportSettings, "quotas": QuotaSettings,
    "backend": BackendSettings, "lifetime": LifetimeSettings, "churn": ChurnSettings,
    "hooks": HookSettings,
}

GROUP_OF: dict[str, str] = {
    **{f.name: "" for f in dataclasses.fields(Settings) if f.name not in GROUPS},
    **{f.name: group for group, cls in _GROUP_TYPES.items() for f in dataclasses.fields(cls)},
}
"""Plain setting name -> its group attribute ("" for the top level; ``autoscale`` is
one top-level setting holding its own table)."""
