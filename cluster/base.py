"""The two ports every backend implements: a :class:`Broker` and a :class:`Store`.

Implementations: :mod:`cluster.memory` (one process, the embedded default) and the
Redis ones. One contract test suite (``tests/cluster/test_contract.py``) runs against
all of them; each implementation module ends with a ``TYPE_CHECKING`` assignment to the
Protocol type so that mypy rejects a drifting class.

Times are integers in milliseconds since the epoch and are passed in by the caller
(the ports never read a clock for the values they store), so tests control them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from presence.churn import ChurnRecord
from presence.meta import Meta

MessageHandler = Callable[[str, bytes], None]
"""Called with (topic, payload) for every message received, in order per topic."""

GapHandler = Callable[[Sequence[str]], Awaitable[None]]
"""Called with topics whose messages may have been lost (after a resubscription)."""


SWEEP_CLAIM_MS = 15_000
"""How long a sweeper's claim on a dead node holds (by the callers' ``now``): a claim not
finished (:meth:`Store.sweep_finish`) within it is taken over by the next sweeper."""


class BackendUnavailable(Exception):
    """The backend cannot be reached now; the caller may retry later."""


@dataclass(frozen=True, slots=True)
class UserPresence:
    """What ``query`` reports of a user: current metas (any channel) and last seen."""

    metas: tuple[Meta, ...]
    last_seen: int | None


ChurnStep = Callable[[Mapping[str, ChurnRecord]], Sequence[ChurnRecord]]
"""Current records of some suppliers -> the records to store instead (pure, no I/O)."""


@dataclass(frozen=True, slots=True)
class SweptMeta:
    """A meta removed from a channel because its node died. ``last_seen``: the node's
    last lease refresh (a dead node's connections count as lost from then), or the
    sweep's ``now`` when the Store does not know it."""

    ch: str
    """The channel; "" for a connection that held no meta (reported for ``offline``)."""
    user: str
    conn: str
    last_seen: int = field(default=0, compare=False)
    vacated: bool = field(default=False, compare=False)
    """This removal left ``ch`` with no member (``channel.vacated``)."""
    offline: bool = field(default=False, compare=False)
    """The user has no connection left in the cluster (``user.offline``): set on one
    entry of each such user."""


class Written(list[str]):
    """The channels a write touched, and ``changed``: those of them whose occupancy it
    changed (a first member arrived: ``channel.occupied``; or the last one left:
    ``channel.vacated``)."""

    def __init__(self, channels: Iterable[str] = (), changed: Iterable[str] = (),
                 published: bool = False) -> None:
        super().__init__(channels)
        self.changed = list(changed)
        self.published = published
        """True when the write itself published the joins it was given (one per channel
        written): :meth:`Store.put_metas` with ``joins`` on a store that can."""


RESUMED_ELSEWHERE = -1
"""What :meth:`Store.remove_connection` returns for a connection another node resumed."""


@dataclass(frozen=True, slots=True)
class Adopted:
    """A connection taken over by :meth:`Store.resume`: its metas by channel (None for
    a churn channel), as they were."""

    conn: str
    channels: dict[str, Meta | None]


class Broker(Protocol):
    """Publish/subscribe of opaque payloads by topic (a topic is a channel name).

    Guarantees every implementation must keep:

    * at most once: a message may be lost across a backend failure (then the gap handler
      is called for the topics concerned), never duplicated;
    * per-topic order: messages published by one node on one topic are delivered to
      every subscriber in publication order;
    * a node receives its own publications on topics it subscribes to;
    * ``subscribe`` returns only once the subscription is active: a message published
      (by anyone) after it returns is delivered;
    * handlers are called on the event loop, never concurrently, and must not block.
    """

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        """Connect and begin delivering messages to ``on_message``."""
        ...

    async def close(self) -> None:
        """Stop delivering and release connections; idempotent."""
        ...

    async def subscribe(self, topic: str) -> None:
        """Start receiving ``topic``; subscribing twice is a no-op."""
        ...

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; unknown topics are ignored."""
        ...

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish (topic, payload) pairs, in order; returns once handed to the backend.

        Raises :class:`BackendUnavailable` when the backend cannot take them.
        """
        ...

    async def healthy(self) -> bool:
        """True when publishing and receiving work now."""
        ...


class Store(Protocol):
    """Shared state: presence metas with node ownership, connections, last-seen, churn.

    Every write names the node that owns it, so that when a node's lease lapses one
    survivor can remove everything it owned (:meth:`sweep_node`), exactly once.
    Raises :class:`BackendUnavailable` when the backend cannot be reached.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def healthy(self) -> bool:
        """True when reads and writes work now."""
        ...

    # -- connections -------------------------------------------------------------
    async def add_connection(self, node: str, user: str, conn: str,
                             resume_hash: str = "") -> int:
        """Record a live connection of ``user``; return the user's connection count
        (cluster-wide, this one included). A non-empty ``resume_hash`` (the hash of
        the connection's resume token) replaces the one kept for :meth:`resume`."""
        ...

    async def remove_connection(self, node: str, user: str, conn: str) -> int | None:
        """Forget a connection of ``node`` and its resume hash. Returns the user's
        connections left in the cluster (0: ``user.offline``); None for an unknown
        connection; :data:`RESUMED_ELSEWHERE` for one now owned by another node (a
        resume took it: its metas are that node's, or about to be), left alone."""
        ...

    async def track_channel(self, node: str, user: str, conn: str, ch: str,
                            joined: bool) -> None:
        """``conn`` joined (or left) the churn channel ``ch``: remembered so that a
        resume gets it back (presence channels are remembered by their metas)."""
        ...

    async def resume(self, node: str, user: str, conn: str, resume_hash: str,
                     new_hash: str) -> Adopted | None:
        """Adopt ``conn`` of ``user`` for ``node`` if ``resume_hash`` is its current
        resume hash (single use: ``new_hash`` replaces it). Every channel entry of the
        connection still in the Store moves to ``node`` as it is (no write anyone
        sees), whoever owned it: its old node (alive, dead, or drained), and a sweep
        of that node no longer touches it. None when the hash does not match, or
        nothing of the connection is left."""
        ...

    # -- presence metas ----------------------------------------------------------
    async def put_metas(self, node: str, user: str, conn: str, metas: Mapping[str, Meta],
                        joins: Mapping[str, bytes] | None = None) -> Written:
        """Store ``conn``'s meta in each channel of ``metas`` (channel -> meta), replacing
        what was there; the user's index then shows the last of them for ``conn``.
        A channel entry owned by another node (the connection was resumed there) is
        left alone: returns the channels written, ``changed`` those that had no
        member before (decided atomically: one writer sees it).

        ``joins`` (channel -> broker payload, for every channel of ``metas``): a store
        that shares its backend with the Broker publishes ``joins[ch]`` on topic ``ch``
        with each write that happened, in the same step (the Redis store: from the
        write's script), and sets ``published``; one that cannot ignores them and the
        caller publishes the channels written. A write retried after a lost reply may
        publish its join twice, which is harmless (the same meta replaces itself)."""
        ...

    async def remove_metas(
        self, node: str, user: str, conn: str, channels: Sequence[str], now: int, last: bool
    ) -> Written:
        """Remove ``conn``'s meta from ``channels``. With ``last`` (the connection has no
        presence channel left), drop it from the user's index and set the user's
        last-seen to ``now`` (kept ``last_seen_days``). An entry owned by another node
        (resumed there) is left alone, and so is everything else of the connection:
        returns the channels whose leave is to be published (removed now, or already
        gone: a leave published twice is harmless), ``changed`` those this removal
        left with no member."""
        ...

    async def channel_presence(self, ch: str) -> dict[str, list[Meta]]:
        """user -> metas of one channel (empty when nobody is there)."""
        ...

    async def user_presence(self, users: Sequence[str]) -> dict[str, UserPresence]:
        """Current metas (one per connection in any presence channel) and last-seen,
        for every requested user (unknown users: no metas, ``last_seen`` None)."""
        ...

    # -- node leases -------------------------------------------------------------
    async def refresh_lease(
        self, node: str, ttl: float, now: int, connections: int = 0
    ) -> bool:
        """Keep ``node`` alive until ``now + ttl`` seconds; ``connections`` is the
        node's connection count, reported by :meth:`live_nodes`.

        Returns True when the node's lease was alive (not expired at ``now``) when
        refreshed; False when it had lapsed, had been dropped or swept, or never
        existed (a node's first call). A node that gets False after its first call was
        frozen past its lease (or lost it otherwise): it must write its metas again.
        """
        ...

    async def live_nodes(self, now: int) -> dict[str, int]:
        """Nodes whose lease is alive at ``now``, with their last reported connection
        count (cluster totals for the admin API and the autoscaler)."""
        ...

    async def drop_lease(self, node: str) -> None:
        """A node that stops cleanly gives its lease up (after removing its metas)."""
        ...

    async def dead_nodes(self, now: int) -> list[str]:
        """Nodes whose lease expired before ``now`` and that still own state (or an
        unfinished sweep whose claim expired), excluding those claimed now."""
        ...

    async def sweep_node(self, node: str, now: int) -> list[SweptMeta] | None:
        """Claim a dead ``node``, remove everything it owned, return the metas removed.

        The caller then publishes their leaves and calls :meth:`sweep_finish`; until
        then the claim holds (for :data:`SWEEP_CLAIM_MS`), so leaves are never lost: a
        sweeper that dies or fails to publish leaves the claim to expire, after which
        :meth:`dead_nodes` lists the node again and ``sweep_node`` returns the same
        metas again (published twice is harmless, lost is not).

        Exactly once per claim: among concurrent callers one gets the list, the others
        ``None``; ``None`` also when the node is alive again or nothing is left. Users
        swept get last-seen: the node's last lease refresh (``now`` if unknown), which
        each :class:`SweptMeta` carries. The node's lease is dropped by the claim, so
        its next :meth:`refresh_lease` returns False. Entries of connections resumed
        on another node (:meth:`resume`) are not removed nor reported.
        """
        ...

    async def sweep_finish(self, node: str) -> None:
        """Release the claim this Store object took with its last :meth:`sweep_node`
        of ``node`` (its leaves are published): the claimed records are dropped. A
        no-op without such a claim, or when the claim expired and another sweeper took
        it over."""
        ...

    # -- churn records -----------------------------------------------------------
    async def churn_get(self, org: str, suppliers: Sequence[str]) -> dict[str, ChurnRecord]:
        """The latest record of each supplier that has one."""
        ...

    async def churn_put(self, org: str, records: Sequence[ChurnRecord]) -> None:
        """Store the latest record of each supplier (replacing the previous one)."""
        ...

    async def churn_update(self, org: str, suppliers: Sequence[str],
                           step: ChurnStep) -> dict[str, ChurnRecord]:
        """Replace the records of ``suppliers`` atomically: ``step`` gets the current
        record of each of them that has one and returns the records to store (only of
        ``suppliers``; the last one of a supplier wins). No other write of these
        suppliers lands between that read and this write: when one did, ``step`` runs
        again on a fresh read (bounded; :class:`BackendUnavailable` past the bound).
        An exception from ``step`` stores nothing and propagates. Returns the records
        ``step`` was last given."""
        ...

    async def churn_snapshot(self, org: str, limit: int) -> list[ChurnRecord]:
        """Latest records of an org, highest score first, at most ``limit``."""
        ...
