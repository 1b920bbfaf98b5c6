"""Shared test set-up: uvloop for every async test, and the fixture plugins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import uvloop

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.redis_cluster",
    "tests.fixtures.processes",
    "tests.fixtures.receiver",
]


def pytest_asyncio_loop_factories() -> dict[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
