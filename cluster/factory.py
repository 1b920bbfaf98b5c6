"""Build the Broker and Store that the settings ask for."""

from __future__ import annotations

from cluster.base import Broker, Store
from cluster.memory import MemoryBroker, MemoryStore
from presence.settings import Settings


def make_backend(settings: Settings) -> tuple[Broker, Store]:
    """The memory pair by default; Redis (cluster or single) when configured."""
    if settings.redis_cluster or settings.redis_url:
        raise NotImplementedError("the Redis backend is not built yet")
    return MemoryBroker(), MemoryStore(settings.last_seen_days)
