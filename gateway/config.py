"""Reading the settings: defaults, a TOML file, ``PRESENCE_*`` variables, flags.

Sources, later ones winning: the defaults of presence/settings.py, a TOML file
(``--config``), environment variables ``PRESENCE_<NAME>`` (``PRESENCE_AUTOSCALE_<NAME>``
for the ``[autoscale]`` table), then explicit overrides (command-line flags). In the
TOML file a setting is given by its plain name at the top level (``max_frame = 8192``)
or inside its group's table (``[transport]``); ``[autoscale]`` is a table. Text values
are cast to the setting's type here; the domain's dataclasses then validate them. A
bad or unknown setting raises :class:`~presence.settings.SettingsError` naming it.

Webhooks are the one list of tables: ``[[webhooks]]`` entries (``url``, ``secret``,
``events``) in the file, or a single hook from ``PRESENCE_WEBHOOK_URL`` and
``PRESENCE_WEBHOOK_SECRET`` (all events), which replaces the file's list as any
environment variable replaces the file's value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from presence.settings import (
    GROUP_OF,
    GROUPS,
    AutoscaleSettings,
    PeakWindow,
    Settings,
    SettingsError,
    WebhookTarget,
)

ENV_PREFIX = "PRESENCE_"


def _hints() -> dict[str, Any]:
    """Plain setting name -> annotated type (top level and every group)."""
    out: dict[str, Any] = {}
    top = typing.get_type_hints(Settings)
    for name, group in GROUP_OF.items():
        cls = top[group] if group else Settings
        out[name] = typing.get_type_hints(cls)[name] if group else top[name]
    return out


HINTS = _hints()


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
        item_tp = typing.get_args(tp)[0]
        if item_tp is PeakWindow:
            return tuple(_build(PeakWindow, v, f"{name}[]") for v in value)
        if item_tp is WebhookTarget:
            return tuple(_webhook(name, i, v) for i, v in enumerate(value))
        if item_tp in (int, float, str):
            return tuple(_cast(name, item_tp, v) for v in value)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return _build(tp, value, name)
    if isinstance(tp, types.UnionType):
        return value
    raise SettingsError(f"{name}: unsupported value {value!r}")


def _build(cls: Any, values: Any, prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping of its fields' raw values."""
    if not isinstance(values, Mapping):
        raise SettingsError(f"{prefix} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {prefix}.{key}")
        kwargs[key] = _cast(f"{prefix}.{key}", hints[key], value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SettingsError(f"{prefix}: {exc}") from None


def _webhook(name: str, index: int, value: Any) -> WebhookTarget:
    """One ``[[webhooks]]`` entry; its errors name its position in the list."""
    if isinstance(value, WebhookTarget):
        return value
    where = f"{name}[{index}]"
    try:
        target: WebhookTarget = _build(WebhookTarget, value, where)
    except SettingsError as exc:
        message = str(exc)
        raise SettingsError(message if where in message else f"{where}: {message}") from None
    return target


def _env_webhook(env: Mapping[str, str]) -> tuple[WebhookTarget, ...] | None:
    """The hook of ``PRESENCE_WEBHOOK_URL`` + ``PRESENCE_WEBHOOK_SECRET`` (all events),
    or None when neither is set; one without the other is an error. An empty value
    counts as unset (manifests often template a variable to "")."""
    url = env.get(ENV_PREFIX + "WEBHOOK_URL", "")
    secret = env.get(ENV_PREFIX + "WEBHOOK_SECRET", "")
    if not url and not secret:
        return None
    if not secret:
        raise SettingsError(
            "PRESENCE_WEBHOOK_URL is set without PRESENCE_WEBHOOK_SECRET (set both or neither)")
    if not url:
        raise SettingsError(
            "PRESENCE_WEBHOOK_SECRET is set without PRESENCE_WEBHOOK_URL (set both or neither)")
    try:
        return (WebhookTarget(url, secret),)
    except SettingsError as exc:
        raise SettingsError(f"PRESENCE_WEBHOOK_URL: {exc}") from None


def _flatten(table: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plain settings, autoscale table) of a TOML document."""
    plain: dict[str, Any] = {}
    auto: dict[str, Any] = {}
    for key, value in table.items():
        if key == "autoscale":
            if not isinstance(value, dict):
                raise SettingsError("autoscale must be a table")
            auto.update(value)
        elif key in GROUPS and isinstance(value, dict):
            for name, inner in value.items():
                if GROUP_OF.get(name) != key:
                    raise SettingsError(f"unknown setting {key}.{name}")
                plain[name] = inner
        else:
            plain[key] = value
    return plain, auto


def _env_values(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plain settings, autoscale values) from ``PRESENCE_*`` variables; variables
    naming no setting are ignored (the environment is shared with other software)."""
    plain: dict[str, Any] = {}
    auto: dict[str, Any] = {}
    sub = {f.name for f in dataclasses.fields(AutoscaleSettings)} - {"peaks"}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name.startswith("autoscale_") and name[len("autoscale_"):] in sub:
            auto[name[len("autoscale_"):]] = value
        elif name == "webhooks":
            raise SettingsError("webhooks cannot be a PRESENCE_WEBHOOKS variable; set "
                                "PRESENCE_WEBHOOK_URL and PRESENCE_WEBHOOK_SECRET")
        elif name in GROUP_OF and name != "autoscale":
            plain[name] = value
    hook = _env_webhook(env)
    if hook is not None:
        plain["webhooks"] = hook
    return plain, auto


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, a TOML file, ``PRESENCE_*`` and overrides
    (plain names; None values are ignored)."""
    plain: dict[str, Any] = {}
    auto: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                document = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from None
        plain, auto = _flatten(document)
    env_plain, env_auto = _env_values(os.environ if env is None else env)
    plain.update(env_plain)
    auto.update(env_auto)
    plain.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values: dict[str, Any] = {}
    for name, value in plain.items():
        if name not in GROUP_OF or name == "autoscale":
            raise SettingsError(f"unknown setting {name}")
        values[name] = _cast(name, HINTS[name], value)
    if auto:
        values["autoscale"] = _build(AutoscaleSettings, auto, "autoscale")
    return Settings.of(**values)
