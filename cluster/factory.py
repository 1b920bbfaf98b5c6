"""Build the Broker and Store that the settings ask for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.base import Broker, Store
from cluster.engagement import EngagementStore, MemoryEngagement
from cluster.memory import MemoryBroker, MemoryStore
from presence.settings import Settings

if TYPE_CHECKING:
    from cluster.redis_conn import RedisConfig


def make_backend(settings: Settings) -> tuple[Broker, Store]:
    """The memory pair by default; Redis when configured: ``redis_cluster``
    ("host:port,host:port" startup nodes) wins over ``redis_url`` (one plain Redis).

    Broker and Store share one Redis link (cluster/redis_link.py): one slot map, one
    client per master and one write path; the last of them to close closes it.
    """
    if settings.backend.redis_cluster or settings.backend.redis_url:
        from cluster.redis_broker import RedisBroker
        from cluster.redis_link import RedisLink
        from cluster.redis_store import RedisStore

        config = redis_config(settings)
        link = RedisLink(config)
        return (RedisBroker(config, link=link),
                RedisStore(config, settings.backend.last_seen_days, link=link))
    return MemoryBroker(), MemoryStore(settings.backend.last_seen_days)


def make_engagement(settings: Settings) -> EngagementStore:
    """The engagement store the settings ask for: memory by default, Redis with the
    same ``redis_cluster`` / ``redis_url`` settings as :func:`make_backend` (its own
    connections)."""
    if settings.backend.redis_cluster or settings.backend.redis_url:
        from cluster.engagement_redis import RedisEngagement

        return RedisEngagement(redis_config(settings))
    return MemoryEngagement()


def redis_config(settings: Settings) -> RedisConfig:
    """Where Redis is and the credentials to use, from the backend settings."""
    from cluster.redis_conn import RedisConfig

    b = settings.backend
    # redis_cluster wins over redis_url (make_backend).
    return RedisConfig(cluster=b.redis_cluster, url="" if b.redis_cluster else b.redis_url,
                       username=b.redis_username, password=b.redis_password)
