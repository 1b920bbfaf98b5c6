"""structlog set-up: one JSON object per line on stderr.

No log line carries a token or a secret: sessions log the user id, the connection id
and the reason of a failure, never the credential itself.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import structlog


def configure_logging(level: str = "info") -> None:
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    # websockets logs every failed handshake at INFO/ERROR; ours are structured already.
    logging.getLogger("websockets").setLevel(max(lvl, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


@contextlib.contextmanager
def timed_step(log: Any, step: str, limit: float) -> Iterator[None]:
    """Log ``slow_stop_step`` (a warning, with the seconds taken) when the block runs
    longer than ``limit`` seconds: a shutdown past the pod's grace period is cut by
    SIGKILL, and this names the step that used the time."""
    began = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - began
        if took > limit:
            log.warning("slow_stop_step", step=step, seconds=round(took, 2))
