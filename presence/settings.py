"""Typed settings with visible defaults, read once at start-up.

Sources, later ones winning: the defaults below, a TOML file (``--config``), environment
variables ``PRESENCE_<FIELD>`` (``PRESENCE_AUTOSCALE_<FIELD>`` for the ``[autoscale]``
table), then explicit overrides (command-line flags). Every value is checked on
construction; a bad one raises :class:`SettingsError` naming the setting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of a gateway process. Defaults follow PROTOCOL.md."""

    host: str = "127.0.0.1"
    port: int = 8765
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    node_id: str = ""
    # auth
    jwt_secret: str = ""
    jwt_algorithm: str = "HS256"
    jwt_public_key: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    auth_timeout: float = 5.0
    # transport
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_frame: int = 4096
    max_buffer: int = 512 * 1024
    max_connections: int = 20000
    listen_backlog: int = 2048
    drain_timeout: float = 10.0
    reconnect_jitter: float = 5.0
    # quotas
    max_channels_free: int = 50
    max_channels_paid: int = 500
    joins_per_minute: int = 100
    updates_per_second: float = 10.0
    updates_burst: int = 20
    max_user_connections: int = 10
    max_errors_per_minute: int = 30
    max_malformed: int = 5
    # Every request of a connection (join, re-join, leave, update, query, ping, refresh)
    # draws on one bucket: a client cannot make the node do unbounded work.
    requests_per_second: float = 20.0
    requests_burst: int = 40
    # fan-out
    coalesce_ms: int = 20
    # backend
    backend: str = "memory"
    redis_url: str = ""
    redis_cluster: str = ""
    node_lease: float = 15.0
    # /readyz stays 200 through a backend outage shorter than this (one shard's failover
    # must not take every pod out of the Service).
    ready_grace: float = 10.0
    last_seen_days: int = 30
    # churn
    churn_min_delta: float = 0.05
    churn_thresholds: tuple[float, float, float] = (0.30, 0.60, 0.80)
    # misc
    log_level: str = "info"
    demo: bool = False
    autoscale: AutoscaleSettings = field(default_factory=AutoscaleSettings)

    def __post_init__(self) -> None:
        for name in ("port", "admin_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"{name} must be a TCP port (0-65535)")
        for name in ("auth_timeout", "ping_interval", "ping_timeout", "node_lease"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be positive")
        for name in ("max_frame", "max_buffer", "max_connections", "max_user_connections",
                     "listen_backlog",
                     "max_channels_free", "max_channels_paid", "joins_per_minute",
                     "updates_burst", "requests_burst"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        for name in ("updates_per_second", "requests_per_second"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be positive")
        for name in ("max_errors_per_minute", "max_malformed", "last_seen_days"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        for name in ("drain_timeout", "reconnect_jitter", "ready_grace"):
            if not getattr(self, name) >= 0:
                raise SettingsError(f"{name} must not be negative")
        if not 0 <= self.coalesce_ms <= 100:
            raise SettingsError("coalesce_ms must lie in 0..100 (PROTOCOL.md caps it at 100)")
        if self.jwt_algorithm not in ("HS256", "RS256", "ES256"):
            raise SettingsError("jwt_algorithm must be HS256, RS256 or ES256")
        if self.jwt_algorithm != "HS256" and not self.jwt_public_key:
            raise SettingsError("jwt_public_key is required for RS256/ES256")
        if self.backend not in ("memory", "redis"):
            raise SettingsError("backend must be memory or redis")
        if self.backend == "redis" and not (self.redis_url or self.redis_cluster):
            raise SettingsError("backend = redis needs redis_cluster or redis_url")
        t = self.churn_thresholds
        if not (len(t) == 3 and 0 < t[0] < t[1] < t[2] < 1):
            raise SettingsError("churn_thresholds must be three increasing numbers in (0, 1)")
        if not 0 <= self.churn_min_delta <= 1:
            raise SettingsError("churn_min_delta must lie in [0, 1]")

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def float_or(value: Any, default: float = 0.0) -> float:
    """``float(value)``, or ``default`` when it is not a number (the cast reports it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _cast(name: str, tp: Any, value: Any) -> Any:
    """Cast a TOML or environment value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0",
                                                        "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise SettingsError(f"{name} must be a boolean, got {value!r}")
    if tp in (int, float, str):
        if tp is not str and isinstance(value, bool):  # int(True) == 1: refuse it
            raise SettingsError(f"{name} must be {tp.__name__}, got {value!r}")
        if tp is float and isinstance(value, str | float) and not math.isfinite(float_or(value)):
            raise SettingsError(f"{name} must be a finite number, got {value!r}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name} must be {tp.__name__}, got {value!r}") from None
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0]
        if item_tp is PeakWindow:
            return tuple(_build(PeakWindow, v, f"{name}[]") for v in value)
        if item_tp in (int, float, str):
            return tuple(_cast(name, item_tp, v) for v in value)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return _build(tp, value, name)
    if isinstance(tp, types.UnionType):
        return value
    raise SettingsError(f"{name}: unsupported value {value!r}")


def _build(cls: Any, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {prefix + '.' if prefix else ''}{key}")
        kwargs[key] = _cast(f"{prefix + '.' if prefix else ''}{key}", hints[key], value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SettingsError(f"{prefix or 'settings'}: {exc}") from None


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    auto: dict[str, Any] = {}
    top = {f.name for f in dataclasses.fields(Settings)}
    sub = {f.name for f in dataclasses.fields(AutoscaleSettings)} - {"peaks"}
    for key, value in env.items():
        if not key.startswith("PRESENCE_"):
            continue
        name = key[len("PRESENCE_") :].lower()
        if name.startswith("autoscale_") and name[len("autoscale_") :] in sub:
            auto[name[len("autoscale_") :]] = value
        elif name in top and name != "autoscale":
            out[name] = value
    if auto:
        out["autoscale"] = auto
    return out


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, a TOML file, ``PRESENCE_*`` and overrides."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                merged.update(tomllib.load(fh))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from None
    env_values = _env_values(os.environ if env is None else env)
    if not isinstance(merged.get("autoscale", {}), dict):
        raise SettingsError("autoscale must be a table")
    auto = dict(merged.get("autoscale", {}))
    auto.update(env_values.pop("autoscale", {}))
    merged.update(env_values)
    if auto:
        merged["autoscale"] = auto
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
    settings: Settings = _build(Settings, merged, "")
    return settings
