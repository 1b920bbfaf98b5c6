"""A gateway frozen past its lease (SIGSTOP) is swept; when it wakes up its live
members become visible again everywhere (issue: they used to stay invisible)."""

from __future__ import annotations

import pytest

from tests.integration.test_multinode import (  # noqa: F401 (spawn: the fixture)
    LEASE,
    Spawn,
    spawn,
    until,
    users_of,
)

pytestmark = pytest.mark.redis


async def test_frozen_gateway_swept_then_wakes_and_reasserts(spawn: Spawn) -> None:  # noqa: F811
    g1, g2 = await spawn("f1"), await spawn("f2")
    watcher = await g1.client("watcher")
    sleeper = await g2.client("sleeper")
    await watcher.join("team:frozen")
    await sleeper.join("team:frozen", status="busy", note="At the venue")
    await until(lambda: users_of(watcher, "team:frozen") == {"watcher", "sleeper"}, 5,
                "both joined")
    g2.freeze()
    try:
        # The survivor sweeps the frozen node and publishes the leave (right).
        await watcher.wait_for(lambda e: "sleeper" in e["leaves"], LEASE + 5)
        assert users_of(watcher, "team:frozen") == {"watcher"}
    finally:
        g2.thaw()
    # Awake again: its member is re-asserted with its latest meta.
    diff = await watcher.wait_for(lambda e: "sleeper" in e["joins"], LEASE + 3)
    meta = diff["joins"]["sleeper"][0]
    assert (meta["status"], meta["note"]) == ("busy", "At the venue")
    fresh = await (await g1.client("late")).join("team:frozen")
    assert "sleeper" in fresh["presence"]
    # ... and stays visible: no later sweep takes it away again.
    with pytest.raises(TimeoutError):
        await watcher.wait_for(lambda e: "sleeper" in e["leaves"], LEASE * 2)
    assert (await sleeper.ping())["t"] == "pong"
    late = await (await g1.client("later")).join("team:frozen")
    assert "sleeper" in late["presence"]
