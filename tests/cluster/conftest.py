"""The backend parametrisation shared by the contract suites of this folder."""

from __future__ import annotations

import pytest
import redis

from cluster.redis_conn import RedisConfig, parse_nodes

BACKENDS = ["memory", "redis-cluster", "redis-single"]


def flush(config: RedisConfig) -> None:
    """Empty every master of the test Redis (the fixtures are session-scoped)."""
    if config.url:
        with redis.Redis.from_url(config.url) as c:
            c.flushall()
        return
    for host, port in parse_nodes(config.cluster):
        with redis.Redis(host, port, socket_timeout=2) as c:
            if c.execute_command("ROLE")[0] == b"master":
                c.flushall()


@pytest.fixture(params=BACKENDS)
def backend_config(request: pytest.FixtureRequest) -> tuple[str, RedisConfig | None]:
    """(backend name, Redis config or None for memory), the Redis one emptied first."""
    config: RedisConfig | None = None
    if request.param == "redis-cluster":
        config = RedisConfig(cluster=request.getfixturevalue("redis_cluster"))
    elif request.param == "redis-single":
        config = RedisConfig(url=request.getfixturevalue("redis_single"))
    if config is not None:
        flush(config)
    return request.param, config


@pytest.fixture(params=["redis-cluster", "redis-single"])
def redis_config(request: pytest.FixtureRequest) -> RedisConfig:
    """A Redis config for the cluster and for a plain Redis in turn, emptied first."""
    if request.param == "redis-cluster":
        cfg = RedisConfig(cluster=request.getfixturevalue("redis_cluster"))
    else:
        cfg = RedisConfig(url=request.getfixturevalue("redis_single"))
    flush(cfg)
    return cfg
