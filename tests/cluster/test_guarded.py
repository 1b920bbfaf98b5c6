"""``cluster.redis_conn.guarded``: every failure of the Redis client is a
``BackendUnavailable``. redis-py's ``RedisClusterException`` (raised when no startup
node answers, e.g. while the whole cluster restarts) is not a ``RedisError``: it used
to escape, and it killed the broker's re-subscription loop for good (found by the
chaos test's ``restart_cluster``)."""

from __future__ import annotations

import pytest
from redis.exceptions import RedisClusterException

from cluster.base import BackendUnavailable
from cluster.redis_conn import guarded


async def _fail() -> None:
    raise RedisClusterException("Redis Cluster cannot be connected")


async def test_cluster_exception_is_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable):
        await guarded(_fail(), 1.0)
