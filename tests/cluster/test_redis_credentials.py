"""Where the Redis credentials come from, and that they never show in a repr."""

from __future__ import annotations

from cluster.factory import redis_config
from cluster.redis_conn import RedisConfig
from gateway.config import load_settings


def test_a_url_carries_its_own_credentials() -> None:
    cfg = RedisConfig(url="redis://app:p%40ss@127.0.0.1:6379/0")
    assert cfg.credentials() == ("app", "p@ss")
    assert cfg.auth_command() == ("AUTH", "app", "p@ss")
    assert RedisConfig(url="redis://:pw@h:1/0").auth_command() == ("AUTH", "pw")


def test_configured_credentials_win_and_none_means_no_auth() -> None:
    cfg = RedisConfig(url="redis://app:old@h:1/0", password="new")
    assert cfg.auth_command() == ("AUTH", "new")
    assert RedisConfig(cluster="h:1").auth_command() == ()
    assert RedisConfig(url="redis://h:1/0").auth_command() == ()


def test_the_settings_reach_the_config_and_no_repr_shows_the_password() -> None:
    settings = load_settings(env={"PRESENCE_REDIS_CLUSTER": "127.0.0.1:7000",
                                  "PRESENCE_REDIS_URL": "redis://127.0.0.1:6379/0",
                                  "PRESENCE_REDIS_USERNAME": "gw",
                                  "PRESENCE_REDIS_PASSWORD": "hunter2"})
    cfg = redis_config(settings)
    assert (cfg.cluster, cfg.url) == ("127.0.0.1:7000", "")  # the cluster wins
    assert cfg.auth_command() == ("AUTH", "gw", "hunter2")
    assert "hunter2" not in repr(cfg) and "hunter2" not in repr(settings)
