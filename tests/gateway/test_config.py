"""Reading the settings (gateway/config.py) and their validation (presence/settings.py):
defaults, TOML file, environment, overrides; every bad value names its setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings
from presence.settings import (
    GROUP_OF,
    AutoscaleSettings,
    PeakWindow,
    Settings,
    SettingsError,
    WebhookTarget,
)


def test_defaults_follow_the_protocol() -> None:
    s = Settings()
    assert (s.transport.port, s.transport.admin_port) == (8765, 9090)
    assert s.auth.auth_timeout == 5.0
    assert s.transport.ping_interval == 20.0
    assert s.transport.max_frame == 4096
    assert (s.quotas.max_channels_free, s.quotas.max_channels_paid) == (50, 500)
    assert s.quotas.joins_per_minute == 100
    assert (s.quotas.updates_per_second, s.quotas.updates_burst) == (10.0, 20)
    assert s.quotas.max_user_connections == 10
    assert 0 <= s.transport.coalesce_ms <= 100
    assert s.backend.node_lease == 15.0
    assert s.churn.churn_min_delta == 0.05
    assert s.churn.churn_thresholds == (0.30, 0.60, 0.80)
    assert s.auth.jwt_algorithm == "HS256"
    assert s.backend.backend == "memory"
    assert s.autoscale == AutoscaleSettings()
    # Nothing in the environment or a file: the defaults.
    assert load_settings(env={}) == s


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "presence.toml"
    path.write_text(text)
    return path


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
port = 9000
admin_port = 9001
coalesce_ms = 50
node_id = "from-file"
churn_thresholds = [0.2, 0.5, 0.9]

[autoscale]
min_replicas = 3
max_replicas = 7
""")
    from_file = load_settings(cfg, env={})
    t = from_file.transport
    assert (t.port, t.admin_port, t.coalesce_ms) == (9000, 9001, 50)
    assert from_file.churn.churn_thresholds == (0.2, 0.5, 0.9)
    assert (from_file.autoscale.min_replicas, from_file.autoscale.max_replicas) == (3, 7)

    env = {
        "PRESENCE_PORT": "9100",
        "PRESENCE_DEMO": "yes",
        "PRESENCE_UPDATES_PER_SECOND": "2.5",
        "PRESENCE_AUTOSCALE_MAX_REPLICAS": "9",
        "PRESENCE_AUTOSCALE_FREEZE_WEEKDAYS": "5,6",
        "OTHER_PORT": "1",
    }
    s = load_settings(cfg, env=env, overrides={"port": 9200, "node_id": None, "admin_port": "9300"})
    assert s.transport.port == 9200  # override beats env beats file
    assert s.transport.admin_port == 9300  # overrides are cast too
    assert s.node_id == "from-file"  # a None override (a flag not given) changes nothing
    assert s.demo is True
    assert s.quotas.updates_per_second == 2.5
    assert s.transport.coalesce_ms == 50  # from the file, nothing later set it
    # The [autoscale] table and PRESENCE_AUTOSCALE_* merge key by key.
    assert (s.autoscale.min_replicas, s.autoscale.max_replicas) == (3, 9)
    assert s.autoscale.freeze_weekdays == (5, 6)

    env_only = load_settings(env={"PRESENCE_PORT": "9100"})
    assert (env_only.transport.port, env_only.transport.admin_port) == (9100, 9090)


def test_process_environment_is_read_when_env_is_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRESENCE_NODE_ID", "n-env")
    monkeypatch.setenv("PRESENCE_CHURN_THRESHOLDS", "0.1,0.2,0.3")
    s = load_settings()
    assert s.node_id == "n-env"
    assert s.churn.churn_thresholds == (0.1, 0.2, 0.3)


def test_peaks_from_toml(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
[[autoscale.peaks]]
start_hour = 8
end_hour = 9
multiplier = 1.25
weekdays = [0, 1]
""")
    s = load_settings(cfg, env={})
    assert s.autoscale.peaks == (PeakWindow(8, 9, 1.25, (0, 1)),)


def settings_error(**kwargs: Any) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PRESENCE_PORT": "abc"}, "port"),
        ({"PRESENCE_PORT": "70000"}, "port"),
        ({"PRESENCE_ADMIN_PORT": "-1"}, "admin_port"),
        ({"PRESENCE_MAX_FRAME": "0"}, "max_frame"),
        ({"PRESENCE_AUTH_TIMEOUT": "0"}, "auth_timeout"),
        ({"PRESENCE_NODE_LEASE": "-1"}, "node_lease"),
        ({"PRESENCE_UPDATES_PER_SECOND": "0"}, "updates_per_second"),
        ({"PRESENCE_UPDATES_BURST": "1.5"}, "updates_burst"),
        ({"PRESENCE_COALESCE_MS": "101"}, "coalesce_ms"),
        ({"PRESENCE_DEMO": "maybe"}, "demo"),
        ({"PRESENCE_JWT_ALGORITHM": "none"}, "jwt_algorithm"),
        ({"PRESENCE_JWT_ALGORITHM": "RS256"}, "jwt_public_key"),
        ({"PRESENCE_BACKEND": "etcd"}, "backend"),
        ({"PRESENCE_CHURN_THRESHOLDS": "0.6,0.3,0.8"}, "churn_thresholds"),
        ({"PRESENCE_CHURN_THRESHOLDS": "0.3,0.6"}, "churn_thresholds"),
        ({"PRESENCE_CHURN_THRESHOLDS": "0.3,x,0.8"}, "churn_thresholds"),
        ({"PRESENCE_CHURN_MIN_DELTA": "2"}, "churn_min_delta"),
        ({"PRESENCE_AUTOSCALE_SEASON": "1,2,3"}, "autoscale.season"),
        ({"PRESENCE_AUTOSCALE_MIN_REPLICAS": "9", "PRESENCE_AUTOSCALE_MAX_REPLICAS": "3"},
         "autoscale.min_replicas"),
        ({"PRESENCE_AUTOSCALE_ENABLED": "2"}, "autoscale.enabled"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], name: str) -> None:
    assert name in settings_error(env=env)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("port = 80.5", "port"),
        ('port = "x"', "port"),
        ("demo = 1", "demo"),
        ("churn_thresholds = 0.3", "churn_thresholds"),
        ("[autoscale]\nseason = [1.0]", "autoscale.season"),
        ("[[autoscale.peaks]]\nstart_hour = 8", "autoscale.peaks"),
    ],
)
def test_bad_file_values_name_the_setting(tmp_path: Path, text: str, name: str) -> None:
    assert name in settings_error(config_file=write(tmp_path, text), env={})


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    assert "unknown setting bogus" in settings_error(
        config_file=write(tmp_path, "bogus = 1"), env={}
    )
    assert "unknown setting autoscale.bogus" in settings_error(
        config_file=write(tmp_path, "[autoscale]\nbogus = 1"), env={}
    )
    assert "unknown setting bogus" in settings_error(env={}, overrides={"bogus": 1})
    # The environment is shared with other software: unknown PRESENCE_* names are not
    # settings and are left alone.
    assert load_settings(env={"PRESENCE_BOGUS": "1", "PRESENCE_AUTOSCALE_BOGUS": "1"}) == (
        Settings()
    )


def test_unreadable_or_invalid_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert str(missing) in settings_error(config_file=missing, env={})
    broken = write(tmp_path, "port = = 1")
    assert str(broken) in settings_error(config_file=broken, env={})


def test_with_overrides_validates() -> None:
    assert Settings().with_overrides(port=0).transport.port == 0
    with pytest.raises(SettingsError, match="coalesce_ms"):
        Settings().with_overrides(coalesce_ms=500)
    with pytest.raises(SettingsError, match=r"autoscale\.min_replicas"):
        AutoscaleSettings(min_replicas=0)


@pytest.mark.parametrize("text", ["port = true", "updates_per_second = true"])
def test_bool_is_not_a_number(tmp_path: Path, text: str) -> None:
    settings_error(config_file=write(tmp_path, text), env={})


def test_autoscale_override_that_is_not_a_table() -> None:
    assert "autoscale" in settings_error(env={}, overrides={"autoscale": 3})


@pytest.mark.parametrize("text", ["autoscale = 3", 'autoscale = "x"', "autoscale = [1]"])
def test_autoscale_that_is_not_a_table_in_the_file(tmp_path: Path, text: str) -> None:
    assert "autoscale" in settings_error(config_file=write(tmp_path, text), env={})


@pytest.mark.parametrize("name", ["PRESENCE_UPDATES_PER_SECOND", "PRESENCE_NODE_LEASE"])
def test_nan_is_not_positive(name: str) -> None:
    assert name[len("PRESENCE_"):].lower() in settings_error(env={name: "nan"})


def test_group_tables_in_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
[transport]
max_frame = 8192

[quotas]
requests_per_second = 5
""")
    s = load_settings(cfg, env={})
    assert s.transport.max_frame == 8192 and s.quotas.requests_per_second == 5.0
    assert "unknown setting transport.joins_per_minute" in settings_error(
        config_file=write(tmp_path, "[transport]\njoins_per_minute = 1"), env={})


def test_a_setting_that_cannot_be_honoured_stops_the_process() -> None:
    # A Redis backend with no address used to run on memory, silently.
    assert "redis_cluster or redis_url" in settings_error(env={"PRESENCE_BACKEND": "redis"})
    s = load_settings(env={"PRESENCE_BACKEND": "redis", "PRESENCE_REDIS_URL": "redis://x"})
    assert s.backend.uses_redis


def test_plain_names_are_unique_across_groups() -> None:
    assert GROUP_OF["max_frame"] == "transport" and GROUP_OF["node_id"] == ""
    with pytest.raises(SettingsError, match="unknown setting nope"):
        Settings.of(nope=1)


def test_the_example_file_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "presence.example.toml"
    s = load_settings(example, env={})
    assert (s.transport.host, s.quotas.requests_burst) == ("0.0.0.0", 40)
    assert s.autoscale.freeze_weekdays == (5,)


def test_webhooks_from_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
webhook_retry_for = 30

[[webhooks]]
url = "https://hooks.example.com/presence"
secret = "s1"
events = ["user.online", "user.offline"]

[[webhooks]]
url = "http://127.0.0.1:8080/hook"
secret = "s2"
""")
    s = load_settings(cfg, env={})
    assert s.hooks.webhooks == (
        WebhookTarget("https://hooks.example.com/presence", "s1", ("user.online", "user.offline")),
        WebhookTarget("http://127.0.0.1:8080/hook", "s2"),
    )
    assert s.hooks.webhook_retry_for == 30.0
    assert s.hooks.webhooks[0].wants("user.online")
    assert not s.hooks.webhooks[0].wants("channel.vacated")
    assert s.hooks.webhooks[1].wants("channel.vacated")  # no events: all of them
    # The group table works too, and the environment sets the retry window.
    grouped = write(tmp_path, """
[hooks]
webhook_retry_for = 5

[[hooks.webhooks]]
url = "http://127.0.0.1:8080/hook"
secret = "s"
""")
    s = load_settings(grouped, env={"PRESENCE_WEBHOOK_RETRY_FOR": "7.5"})
    assert s.hooks.webhooks == (WebhookTarget("http://127.0.0.1:8080/hook", "s"),)
    assert s.hooks.webhook_retry_for == 7.5
    assert Settings().hooks.webhooks == () and Settings().hooks.webhook_retry_for == 600.0


def test_the_secret_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(Settings.of(webhooks=(WebhookTarget("http://h/", "hunter2"),)))


def test_one_webhook_from_the_environment(tmp_path: Path) -> None:
    env = {"PRESENCE_WEBHOOK_URL": "https://h.example/p", "PRESENCE_WEBHOOK_SECRET": "k"}
    assert load_settings(env=env).hooks.webhooks == (WebhookTarget("https://h.example/p", "k"),)
    # Later sources win: the environment's hook replaces the file's list.
    cfg = write(tmp_path, '[[webhooks]]\nurl = "http://a/"\nsecret = "s"\n')
    assert load_settings(cfg, env=env).hooks.webhooks == (
        WebhookTarget("https://h.example/p", "k"),)
    # Empty values are unset: the file's list stays.
    blank = {"PRESENCE_WEBHOOK_URL": "", "PRESENCE_WEBHOOK_SECRET": ""}
    assert load_settings(cfg, env=blank).hooks.webhooks == (WebhookTarget("http://a/", "s"),)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PRESENCE_WEBHOOK_URL": "http://h/"}, "PRESENCE_WEBHOOK_SECRET"),
        ({"PRESENCE_WEBHOOK_SECRET": "k"}, "PRESENCE_WEBHOOK_URL"),
        ({"PRESENCE_WEBHOOK_URL": "ftp://h/", "PRESENCE_WEBHOOK_SECRET": "k"},
         "PRESENCE_WEBHOOK_URL"),
        ({"PRESENCE_WEBHOOKS": "http://h/"}, "PRESENCE_WEBHOOK_URL"),
        ({"PRESENCE_WEBHOOK_RETRY_FOR": "0"}, "webhook_retry_for"),
        ({"PRESENCE_WEBHOOK_RETRY_FOR": "nan"}, "webhook_retry_for"),
        ({"PRESENCE_WEBHOOK_RETRY_FOR": "soon"}, "webhook_retry_for"),
    ],
)
def test_bad_webhook_environment_names_the_setting(env: dict[str, str], name: str) -> None:
    assert name in settings_error(env=env)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('url = "ftp://h/"\nsecret = "s"', "webhooks[0]: webhook url"),
        ('url = "not a url"\nsecret = "s"', "webhooks[0]: webhook url"),
        ('url = "http://h:99999/"\nsecret = "s"', "webhooks[0]: webhook url"),
        ('url = "http://h/"\nsecret = ""', "webhooks[0]: webhook secret"),
        ('url = "http://h/"', "webhooks[0]"),
        ('url = "http://h/"\nsecret = "s"\nevents = ["user.away"]', "webhooks[0]: webhook events"),
        ('url = "http://h/"\nsecret = "s"\nname = "x"', "unknown setting webhooks[0].name"),
        ('url = "http://h/"\nsecret = "s"\nevents = 3', "webhooks[0].events must be a list"),
    ],
)
def test_bad_webhook_entries_name_the_setting(tmp_path: Path, entry: str, message: str) -> None:
    assert message in settings_error(config_file=write(tmp_path, f"[[webhooks]]\n{entry}\n"),
                                     env={})


@pytest.mark.parametrize("text", ['webhooks = "http://h/"', "webhooks = [1]"])
def test_webhooks_must_be_a_list_of_tables(tmp_path: Path, text: str) -> None:
    assert "webhooks" in settings_error(config_file=write(tmp_path, text), env={})


def test_gc_thresholds_from_env_and_file_and_refused_when_they_would_stop_collection(
        tmp_path: Path) -> None:
    assert load_settings(env={}).gc_thresholds == (50_000, 20, 100)
    env = load_settings(env={"PRESENCE_GC_THRESHOLDS": "10000,10,50"})
    assert env.gc_thresholds == (10_000, 10, 50)
    cfg = write(tmp_path, "gc_thresholds = [700, 10, 10]\n")
    assert load_settings(cfg, env={}).gc_thresholds == (700, 10, 10)
    for bad in ("0,10,10", "1000,10", "1000,ten,10", "1000,10,10,10"):
        with pytest.raises(SettingsError, match="gc_thresholds"):
            load_settings(env={"PRESENCE_GC_THRESHOLDS": bad})
