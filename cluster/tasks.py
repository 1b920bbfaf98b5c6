"""Ending a task for good, for the stop paths of long-running loops."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_until_done(task: asyncio.Task[Any], tries: int = 20) -> bool:
    """Cancel ``task`` until it ends, waiting a tenth of a second after each cancel;
    True once it has. A cancel that lands while the task is about to resume from a
    Redis read can be swallowed on the way (seen with the cluster client: the loop then
    went on to its next sleep, and the process never exited); the next one lands in that
    sleep."""
    for _ in range(tries):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: the loop's own errors are logged where they happen
    return task.done()
