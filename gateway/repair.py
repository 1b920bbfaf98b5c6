"""Gap repair: bring the local view of a channel back to the Store's truth.

After a broker gap (a failover lost the channel's subscription for a while) messages
may have been lost. For each such channel with local members the repair re-asserts
this node's own metas there, reads the channel from the Store and sends local members
the difference between their view (the hub's mirror) and the Store.

Serialised with live delivery: from the moment the Store read starts until its result
is applied, live messages for that channel are held and then applied in order. A leave
that arrives during the read can therefore never be undone by the (older) read, and a
join during the read never turns into a spurious leave. A repair that fails (the Store
is failing over too) is retried with backoff until it succeeds or the channel has no
local member left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import structlog

from cluster.base import Store
from gateway.hub import Hub
from gateway.ports import now_ms
from presence.channels import is_churn
from presence.meta import Meta

log = structlog.get_logger("presence.repair")

SETTLE = 5.0
"""Seconds after a gap when its channels are repaired once more. Right after a failover
a frozen master woken up can answer as the master for a moment: a repair that read
there, and a subscription made there, missed what the new master took meanwhile, and
nothing would read again (``python -m loadtest.chaos --seed 1``: one gateway's members
kept an older meta of one user)."""

Delivery = Callable[[], None]


class GapRepair:
    """Per-channel repairs and the hold on live delivery while one reads the Store."""

    def __init__(self, store: Store, hub: Hub,
                 reassert: Callable[[str], Awaitable[None]], settle: float = SETTLE) -> None:
        self.store = store
        self._settle = settle
        self._later: set[asyncio.TimerHandle] = set()
        self.hub = hub
        self.reassert = reassert
        self._held: dict[str, list[Delivery]] = {}
        self._holds: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self.repaired = 0

    def deliver(self, ch: str, apply: Delivery) -> None:
        """Apply a live message now, or after the channel's running Store reads."""
        held = self._held.get(ch)
        if held is None:
            apply()
        else:
            held.append(apply)

    async def joined_read(self, ch: str) -> dict[str, list[Meta]]:
        """A joiner's Store read of ``ch``, made what every local member holds.

        The hub's mirror is, by contract, what every local member of the channel has
        been told; the joiner's snapshot is this read. So, with live delivery held, the
        read's difference from the mirror is sent to the members already there (a
        repair done with this read), and the mirror becomes the read. A joiner given a
        read that the mirror lacked (while a restarted Redis was being re-asserted)
        used to keep that difference for good: no later repair saw it. Until a read
        has filled the mirror (the channel's first local members, possibly several
        reading at once) a read just seeds it: nobody has been told anything yet.
        """
        self._hold(ch)
        try:
            fresh = await self.store.channel_presence(ch)
            channel = self.hub.channels.get(ch)
            if channel is not None and channel.seeded and len(channel.members) > 1:
                self._apply(ch, fresh)
            else:
                # The first read of the channel (several joiners may be reading at once,
                # each still waiting for its snapshot): nobody to tell a difference to.
                self.hub.seed(ch, fresh)
            return fresh
        finally:
            self._release(ch)

    async def on_gap(self, topics: Iterable[str]) -> None:
        """The broker's gap handler: start (or re-arm) a repair of each channel now,
        and once more ``settle`` seconds later."""
        channels = list(topics)
        self._start(channels)
        if self._settle > 0 and channels:
            box: list[asyncio.TimerHandle] = []
            box.append(asyncio.get_running_loop().call_later(
                self._settle, self._settled, box, channels))
            self._later.add(box[0])

    def _settled(self, box: list[asyncio.TimerHandle], channels: list[str]) -> None:
        self._later.discard(box[0])
        self._start(channels)

    def _start(self, topics: Iterable[str]) -> None:
        for ch in topics:
            if is_churn(ch) or ch not in self.hub.channels:
                continue
            if ch in self._tasks:
                self._again.add(ch)  # a gap during a repair: read once more after it
                continue
            self._tasks[ch] = asyncio.ensure_future(self._repair(ch))

    async def wait_idle(self) -> None:
        """Wait until no repair runs (tests, shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def _repair(self, ch: str) -> None:
        delay = 0.2
        try:
            while ch in self.hub.channels:
                self._again.discard(ch)
                if await self._attempt(ch):
                    if ch not in self._again:
                        return
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._tasks.pop(ch, None)

    async def _attempt(self, ch: str) -> bool:
        self._hold(ch)
        try:
            await self.reassert(ch)
            fresh = await self.store.channel_presence(ch)
            self._apply(ch, fresh)
        except Exception as exc:
            log.warning("gap_repair_failed", ch=ch, error=type(exc).__name__)
            return False
        finally:
            self._release(ch)
        self.repaired += 1
        log.info("gap_repaired", ch=ch)
        return True

    def _apply(self, ch: str, fresh: dict[str, list[Meta]]) -> None:
        """Send local members the difference between the mirror and ``fresh``."""
        mirror = self.hub.mirror(ch)
        if mirror is None:
            return
        ts = now_ms()
        truth = {(u, m.conn): m for u, ms in fresh.items() for m in ms}
        for user in list(mirror.users()):
            for meta in mirror.metas(user):
                if (user, meta.conn) not in truth:
                    self.hub.on_leave(ch, user, meta.conn, ts, ts)
        seen = {(u, m.conn): m for u in mirror.users() for m in mirror.metas(u)}
        for (user, conn), meta in truth.items():
            if seen.get((user, conn)) != meta:
                self.hub.on_join(ch, user, meta, ts)

    def _hold(self, ch: str) -> None:
        """Hold live delivery on ``ch`` (nested holds counted) until :meth:`_release`."""
        self._holds[ch] = self._holds.get(ch, 0) + 1
        self._held.setdefault(ch, [])

    def _release(self, ch: str) -> None:
        left = self._holds.get(ch, 0) - 1
        if left > 0:
            self._holds[ch] = left
            return
        self._holds.pop(ch, None)
        for apply in self._held.pop(ch, None) or ():
            apply()

    async def close(self) -> None:
        for handle in self._later:
            handle.cancel()
        self._later.clear()
        for task in self._tasks.values():
            task.cancel()
        await self.wait_idle()
